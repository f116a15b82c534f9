/* KVRecall C ABI, version 2: a decoder-facing KV cache with top-k retrieval attention.
 *
 * Handles are opaque ids, never pointers to memory: each open returns a new id that is never
 * handed out again in the process, so a closed handle is refused (KVRECALL_ERR_HANDLE) even
 * after later opens, and is never dereferenced. Integer status codes (0 = success);
 * kvrecall_last_error() gives the message of the calling thread's last failure. No Swift error
 * or object crosses this boundary, and every pointer argument is checked.
 *
 * Layouts (row-major):
 *   keys, values, prefill queries:  [kv_heads][tokens][head_dim]
 *   decode queries and outputs:     [kv_heads][query_heads_per_kv][head_dim]
 *   log-sum-exp:                    [kv_heads][query_heads_per_kv]
 *
 * Attention convention. For query head j of KV head h and the positions S the method attends
 * (sinks, window, the retrieved positions, and every position appended since the index was last
 * extended):
 *   s_i = scale * dot(q_j, k_i)      scale = config.scale, or 1/sqrt(head_dim) when 0
 *   out_j = sum_{i in S} exp(s_i - lse_j) v_i,   lse_j = log sum_{i in S} exp(s_i)
 * Scores are computed in float32 whatever the storage dtype. `estimate` adds clusters below the
 * retrieval cut through their mean key and value sum (RetroInfer); `exact` attends every position.
 * Two results over disjoint position sets merge exactly (flash-decoding):
 *   m = max(lse_a, lse_b); w_a = exp(lse_a - m); w_b = exp(lse_b - m);
 *   out = (w_a out_a + w_b out_b) / (w_a + w_b);  lse = m + log(w_a + w_b).
 *
 * Thread safety. Calls on one session are serialised by the library (a per-session lock):
 * several threads may share a session, but its calls run one at a time; kvrecall_session_close
 * waits for a call in progress. Different sessions run fully in parallel. kvrecall_last_error()
 * is per thread. A store directory may be open in one session (or KVStore) per process at a
 * time, and its heads have one writer at a time across processes: a second open of the same
 * directory gets KVRECALL_ERR_BUSY.
 *
 * Crash contract. An append is one transaction for every KV head of the layer: after a failure
 * or a crash either all heads hold the new tokens or none does. Appends are not synced to disk
 * one by one (a killed process loses nothing committed; a machine crash may lose the steps since
 * the last checkpoint, never corrupt the store). kvrecall_session_checkpoint() saves the indexes
 * and syncs. kvrecall_session_resume() reopens a session in a consistent state: every layer and
 * head is cut back to the last step every layer completed (the shortest layer), the prefill
 * queries to the count every head has (none when no token survived); indexes saved by the last checkpoint are loaded and a head whose index is
 * missing while others have theirs is rebuilt. When no index was saved (the process died between
 * kvrecall_session_build_indexes and the next checkpoint) the heads attend exactly until the
 * build is run again. kvrecall_session_resume_ex() reports what it found and did.
 */
#ifndef KVRECALL_H
#define KVRECALL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI this header describes; kvrecall_abi_version() is the library's. Version 2 added
 * everything marked "ABI 2"; a version-1 caller (its smaller kvrecall_config) is still accepted. */
#define KVRECALL_ABI_VERSION 2

enum kvrecall_status {
    KVRECALL_OK = 0,
    KVRECALL_ERR_NULL = 1,      /* a required pointer was NULL */
    KVRECALL_ERR_ARGUMENT = 2,  /* a size, count or option is invalid */
    KVRECALL_ERR_ORDER = 3,     /* a call made in the wrong order (e.g. attend before append) */
    KVRECALL_ERR_LAYER = 4,     /* the layer (or KV head) does not exist */
    KVRECALL_ERR_STORE = 5,     /* the store failed (I/O, full disk, foreign or newer store) */
    KVRECALL_ERR_INDEX = 6,     /* an index could not be built, loaded or searched */
    KVRECALL_ERR_HANDLE = 7,    /* the session handle is unknown or already closed */
    KVRECALL_ERR_INTERNAL = 8,
    KVRECALL_ERR_BUSY = 9,      /* ABI 2: the store is open elsewhere in this process, or its heads have another writer */
    KVRECALL_ERR_ABORTED = 10   /* ABI 2: a progress callback asked to stop */
};

enum kvrecall_dtype { KVRECALL_F32 = 0, KVRECALL_F16 = 1, KVRECALL_BF16 = 2 };

enum kvrecall_method {
    KVRECALL_METHOD_EXACT = 0,
    KVRECALL_METHOD_RETRIEVAL = 1, /* RetrievalAttention graph, trained on prefill queries */
    KVRECALL_METHOD_HIP = 2,
    KVRECALL_METHOD_LANDMARK = 3,
    KVRECALL_METHOD_HNSW = 4,
    KVRECALL_METHOD_IVF = 5,
    KVRECALL_METHOD_LSH = 6,
    KVRECALL_METHOD_TREE = 7,
    KVRECALL_METHOD_ESTIMATE = 8,  /* RetroInfer estimation zone over IVF clusters */
    KVRECALL_METHOD_AUTO = 9,      /* ABI 2: per KV head, the policy its prefill queries call for */
    KVRECALL_METHOD_STREAMING = 10, /* ABI 2: sinks and window only */
    KVRECALL_METHOD_QUANTIZED = 11  /* ABI 2: a scan of 4-bit key codes, the best candidates exact, the rest through their codes */
};

typedef struct kvrecall_config {
    size_t struct_size;          /* sizeof(kvrecall_config): set by kvrecall_config_default */
    uint32_t layers;
    uint32_t kv_heads;
    uint32_t query_heads_per_kv; /* GQA group size */
    uint32_t head_dim;           /* 1...65536 */
    int32_t dtype;               /* enum kvrecall_dtype: how vectors are stored */
    int32_t method;              /* enum kvrecall_method */
    uint32_t k;                  /* positions retrieved beyond sinks and window (e.g. 100) */
    uint32_t sinks;              /* e.g. 4 */
    uint32_t window;             /* e.g. 64 */
    uint32_t ef;                 /* graph beam width (retrieval, hnsw); 0 (default): calibrated per head at build */
    uint32_t nprobe;             /* ivf lists probed; 0 (default): calibrated per head at build */
    /* ABI 2 */
    float scale;                 /* softmax scale; 0 = 1/sqrt(head_dim) */
    float soft_cap;              /* logit soft-cap applied to the scaled score s: cap * tanh(s / cap); 0: none */
    uint32_t threads;            /* threads per call (KV heads in parallel, index builds); 0 = all cores */
    /* ABI 2, extended: a config of the first ABI-2 size (without this field) is still accepted, with a fixed k. */
    float budget_mass;           /* adaptive budget of index methods: at build, each head's k is raised
                                    (at most to 10% of its keys) until its neediest query head keeps this
                                    much attention mass with its exact top-k on held-out prefill queries;
                                    0: k stays fixed. Default 0.9. */
    /* ABI 2, extended again: a config of the two earlier ABI-2 sizes is still accepted, with the default. */
    double refresh_fraction;     /* long generations: once the keys a head indexed during decoding pass this
                                    fraction of those its plan was made over, its plan, budget, index and
                                    calibration are made again over all its keys (trained on its prefill and
                                    recorded decode queries) on a background thread and swapped in at a step
                                    boundary. At most 1e6. 0: the default (0.5); negative: never refresh. */
    /* ABI 2, extended a third time: a config of the three earlier ABI-2 sizes is still accepted, with the default. */
    double target_error;         /* auto: the median output error against exact attention (on a head's held-out
                                    prefill queries) its plan may reach; the cheapest candidate within it wins,
                                    exact attention when none is cheaper. 0: the default (0.02). */
} kvrecall_config;

typedef struct kvrecall_session kvrecall_session;

/* ABI 2: the name of a kvrecall_method value ("exact", "retrieval", ...; what the CLI and Python
 * call it), or NULL for a value this library does not know. The string lives as long as the library. */
const char *kvrecall_method_name(int32_t method);

/* ABI 2: the library's version ("0.2.0") and ABI version (KVRECALL_ABI_VERSION when they match). */
const char *kvrecall_version(void);
int kvrecall_abi_version(void);

/* ABI 2: log messages (errors of failing calls at ERROR, resume reports at INFO/WARN) go to
 * `callback` with `user_data`; NULL (the default) is silent. Process-wide; the callback may be
 * called from any thread that calls the library, and must not call back into it. */
enum kvrecall_log_level { KVRECALL_LOG_ERROR = 0, KVRECALL_LOG_WARN = 1, KVRECALL_LOG_INFO = 2 };
typedef void (*kvrecall_log_callback)(int level, const char *message, void *user_data);
void kvrecall_set_log_callback(kvrecall_log_callback callback, void *user_data);

/* Fills `config` with defaults for the given shape (method retrieval, f16, k 100, sinks 4,
 * window 64, scale 0, soft_cap 0, threads 0, budget_mass 0.9, refresh_fraction 0.5, target_error 0.02). */
void kvrecall_config_default(kvrecall_config *config, uint32_t layers, uint32_t kv_heads,
                             uint32_t query_heads_per_kv, uint32_t head_dim);

/* Opens a session on the store directory `directory` (created if missing), or on a temporary store
 * removed at close when `directory` is NULL. A directory that already holds a session must hold
 * this exact configuration (else KVRECALL_ERR_ARGUMENT naming the differing fields; use resume). */
int kvrecall_session_open(const kvrecall_config *config, const char *directory, kvrecall_session **out);

/* Reopens a session from its store (configuration and checkpointed indexes come from the store),
 * in the consistent state of the crash contract above. */
int kvrecall_session_resume(const char *directory, kvrecall_session **out);

/* ABI 2: what resume found and did. */
typedef struct kvrecall_resume_info {
    size_t struct_size;          /* sizeof(kvrecall_resume_info), set by the caller */
    size_t tokens;               /* tokens every layer and head holds now */
    size_t longest;              /* the longest layer before (> tokens: a cut-short step was dropped) */
    uint32_t indexes_loaded;     /* heads whose checkpointed index was loaded */
    uint32_t indexes_rebuilt;    /* heads whose index was rebuilt from their keys */
    uint32_t indexes_missing;    /* heads with no saved index (none checkpointed since the build):
                                    they attend exactly until kvrecall_session_build_indexes */
} kvrecall_resume_info;
int kvrecall_session_resume_ex(const char *directory, kvrecall_resume_info *info, kvrecall_session **out);

/* ABI 2: the session's configuration (after resume, the stored one). Set out->struct_size first. */
int kvrecall_session_get_config(kvrecall_session *session, kvrecall_config *out);

/* Appends `tokens` tokens of keys and values (float32) to every KV head of `layer`, atomically.
 * NaN, Inf, and finite values the session's dtype cannot hold (f16: |x| > 65504; bf16: beyond
 * 3.39e38, which would be stored as Inf) are refused with KVRECALL_ERR_ARGUMENT and a message naming
 * the layer, KV head, token, column and value; nothing is appended. The same holds for every append
 * and for prefill queries. */
int kvrecall_session_append(kvrecall_session *session, uint32_t layer, const float *keys, const float *values,
                            size_t tokens);
/* ABI 2: the same from IEEE half (f16) or bfloat16 (bf16) input, as raw 16-bit words. */
int kvrecall_session_append_f16(kvrecall_session *session, uint32_t layer, const uint16_t *keys,
                                const uint16_t *values, size_t tokens);
int kvrecall_session_append_bf16(kvrecall_session *session, uint32_t layer, const uint16_t *keys,
                                 const uint16_t *values, size_t tokens);

/* Stores prefill queries ([kv_heads][tokens][head_dim]) that the retrieval graph learns from. */
int kvrecall_session_prefill_queries(kvrecall_session *session, uint32_t layer, const float *queries, size_t tokens);

/* ABI 2: how indexes are built. kvrecall_build_params_default fills the library's defaults. */
typedef int (*kvrecall_progress_callback)(size_t done, size_t total, void *user_data); /* nonzero: abort */
typedef struct kvrecall_build_params {
    size_t struct_size;          /* sizeof(kvrecall_build_params) */
    uint32_t threads;            /* 0 = the session's thread count */
    uint32_t hnsw_m;             /* HNSW neighbours per node (16) */
    uint32_t ef_construction;    /* HNSW / graph candidate list while inserting (200) */
    uint32_t nlist;              /* IVF clusters; 0 = 4 sqrt(N) */
    uint32_t kmeans_iterations;  /* IVF, tree (20) */
    uint32_t lsh_tables;         /* LSH tables L (150) */
    uint32_t lsh_bits;           /* LSH bits per table K (10) */
    uint32_t graph_degree;       /* retrieval graph degree cap (128) */
    uint64_t seed;               /* 42 */
    /* Called after each (layer, KV head) with done/total heads; returning nonzero stops the build
     * (KVRECALL_ERR_ABORTED): heads built so far keep their index, the others attend exactly
     * until the next build. NULL: no callback. */
    kvrecall_progress_callback progress;
    void *user_data;
} kvrecall_build_params;
void kvrecall_build_params_default(kvrecall_build_params *params);

/* Builds every head's index once, after prefill (default parameters). Decode steps then keep the
 * indexes up to date. */
int kvrecall_session_build_indexes(kvrecall_session *session);
/* ABI 2: the same with parameters and a progress/abort callback (`params` NULL = defaults). */
int kvrecall_session_build_indexes_ex(kvrecall_session *session, const kvrecall_build_params *params);

/* Attention for one decode step of `layer`; `out` must hold `out_floats` =
 * kv_heads * query_heads_per_kv * head_dim floats. */
int kvrecall_session_attend(kvrecall_session *session, uint32_t layer, const float *queries, float *out,
                            size_t out_floats);
/* ABI 2: the same, plus the log-sum-exp of each query head's scores over the attended positions
 * (`lse` NULL, or `lse_floats` = kv_heads * query_heads_per_kv floats). */
int kvrecall_session_attend_ex(kvrecall_session *session, uint32_t layer, const float *queries, float *out,
                               size_t out_floats, float *lse, size_t lse_floats);

/* Tokens cached for `layer` (every KV head of a layer holds the same number). */
int kvrecall_session_length(kvrecall_session *session, uint32_t layer, size_t *out);
/* ABI 2: tokens cached for one KV head, and how many of them its index holds (`indexed` may be
 * NULL; the rest, sinks and window included, are attended exactly). */
int kvrecall_session_head_length(kvrecall_session *session, uint32_t layer, uint32_t kv_head, size_t *tokens,
                                 size_t *indexed);

/* ABI 2: what each (layer, KV head) runs, one line per head: the method, or for `auto` the policy its
 * prefill queries called for and why; its index and the search knob calibrated for it. Writes at most
 * `capacity` bytes of the NUL-terminated text into `buffer` (may be NULL with capacity 0) and the
 * text's full length, without the NUL, into `length`: call once to size the buffer, then again. */
int kvrecall_session_report(kvrecall_session *session, char *buffer, size_t capacity, size_t *length);

/* ABI 2: cuts every layer and head back to `tokens` (speculative-decoding rollback, repair after a
 * failed step), atomically; indexes holding dropped positions are rebuilt. Prefill queries stay
 * (they train indexes, they are not positions) unless `tokens` is 0. `tokens` larger than the
 * longest layer: KVRECALL_ERR_ARGUMENT. */
int kvrecall_session_truncate(kvrecall_session *session, size_t tokens);

/* Makes the session durable and resumable (indexes saved, data synced). */
int kvrecall_session_checkpoint(kvrecall_session *session);

/* Closes the session; the handle is refused afterwards. NULL and closed handles are ignored. */
void kvrecall_session_close(kvrecall_session *session);

/* Message of the calling thread's last failure ("" if none). Valid until the thread's next call. */
const char *kvrecall_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
