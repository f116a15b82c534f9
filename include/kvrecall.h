/* KVRecall C ABI: a decoder-facing KV cache with top-k retrieval attention.
 *
 * Opaque handles, integer status codes (0 = success), and kvrecall_last_error() for the message of
 * the calling thread's last failure. No Swift error or object crosses this boundary; every pointer
 * argument is checked, and a handle that was closed or never opened is refused, not dereferenced.
 *
 * Layouts (row-major float32):
 *   keys, values, prefill queries:  [kv_heads][tokens][head_dim]
 *   decode queries and outputs:     [kv_heads][query_heads_per_kv][head_dim]
 */
#ifndef KVRECALL_H
#define KVRECALL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum kvrecall_status {
    KVRECALL_OK = 0,
    KVRECALL_ERR_NULL = 1,      /* a required pointer was NULL */
    KVRECALL_ERR_ARGUMENT = 2,  /* a size, count or option is invalid */
    KVRECALL_ERR_ORDER = 3,     /* a call made in the wrong order (e.g. attend before append) */
    KVRECALL_ERR_LAYER = 4,     /* the layer does not exist */
    KVRECALL_ERR_STORE = 5,     /* the store failed (I/O, full disk, foreign or newer store) */
    KVRECALL_ERR_INDEX = 6,     /* an index could not be built, loaded or searched */
    KVRECALL_ERR_HANDLE = 7,    /* the session handle is unknown or already closed */
    KVRECALL_ERR_INTERNAL = 8
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
    KVRECALL_METHOD_ESTIMATE = 8   /* RetroInfer estimation zone over IVF clusters */
};

typedef struct kvrecall_config {
    size_t struct_size;          /* sizeof(kvrecall_config): guards against a mismatched header */
    uint32_t layers;
    uint32_t kv_heads;
    uint32_t query_heads_per_kv; /* GQA group size */
    uint32_t head_dim;
    int32_t dtype;               /* enum kvrecall_dtype */
    int32_t method;              /* enum kvrecall_method */
    uint32_t k;                  /* positions retrieved beyond sinks and window (e.g. 100) */
    uint32_t sinks;              /* e.g. 4 */
    uint32_t window;             /* e.g. 64 */
    uint32_t ef;                 /* graph beam width (retrieval, hnsw), e.g. 400 */
    uint32_t nprobe;             /* ivf lists probed, e.g. 64 */
} kvrecall_config;

typedef struct kvrecall_session kvrecall_session;

/* Fills `config` with defaults for the given shape (method retrieval, f16, k 100, sinks 4, window 64). */
void kvrecall_config_default(kvrecall_config *config, uint32_t layers, uint32_t kv_heads,
                             uint32_t query_heads_per_kv, uint32_t head_dim);

/* Opens a session on the store directory `directory` (created if missing), or on a temporary store
 * removed at close when `directory` is NULL. */
int kvrecall_session_open(const kvrecall_config *config, const char *directory, kvrecall_session **out);

/* Reopens a checkpointed session (its configuration and indexes come from the store). */
int kvrecall_session_resume(const char *directory, kvrecall_session **out);

/* Appends `tokens` tokens of keys and values to every KV head of `layer`. */
int kvrecall_session_append(kvrecall_session *session, uint32_t layer, const float *keys, const float *values,
                            size_t tokens);

/* Stores prefill queries ([kv_heads][tokens][head_dim]) that the retrieval graph learns from. */
int kvrecall_session_prefill_queries(kvrecall_session *session, uint32_t layer, const float *queries, size_t tokens);

/* Builds every head's index once, after prefill. Decode steps then keep the indexes up to date. */
int kvrecall_session_build_indexes(kvrecall_session *session);

/* Attention for one decode step of `layer`; `out` must hold `out_floats` =
 * kv_heads * query_heads_per_kv * head_dim floats. */
int kvrecall_session_attend(kvrecall_session *session, uint32_t layer, const float *queries, float *out,
                            size_t out_floats);

/* Tokens cached for `layer`. */
int kvrecall_session_length(kvrecall_session *session, uint32_t layer, size_t *out);

/* Makes the session durable and resumable (indexes saved, data synced). */
int kvrecall_session_checkpoint(kvrecall_session *session);

/* Closes the session; the handle is invalid afterwards. NULL is ignored. */
void kvrecall_session_close(kvrecall_session *session);

/* Message of the calling thread's last failure ("" if none). Valid until the thread's next call. */
const char *kvrecall_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
