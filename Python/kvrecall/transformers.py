"""Hugging Face transformers decoders on KVRecall: a cache and an attention function.

    import kvrecall.transformers                      # registers the attention function "kvrecall"
    from kvrecall.transformers import KVRecallCache
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="kvrecall")
    cache = KVRecallCache(model.config, method="auto")
    out = model.generate(ids, max_new_tokens=64, past_key_values=cache)   # or cache=cache

Full-attention layers keep their keys and values in a `kvrecall.Session`; sliding-window (and
chunked) layers stay in transformers' own `DynamicSlidingWindowLayer`. The prompt (every forward
until the first single-token step) attends exactly, in torch; at the first single-token step the
cache hands the session every full-attention layer's keys, values and prefill queries (all query
heads, one row per position and query head) and builds the indexes once (`build_indexes()` does
it explicitly). From then on each token's full-attention layers are answered by the session with
the chosen method; the torch copies of those layers' keys and values are dropped.

Batch 1 only: a larger batch (`num_beams` or `num_return_sequences` above 1, several prompts) is
refused with `UnsupportedBatchError`; `crop` (rollback) works, beam reordering is refused. Keys
and values must arrive as float32, float16 or bfloat16 (`UnsupportedDtypeError` otherwise).
Layouts the session cannot hold (linear attention, shared KV layers, encoder-decoder models,
layers of different head counts...) are refused by the constructor with `UnsupportedModelError`.

Needs the optional extra: `pip install './Python[transformers]'` (torch, transformers >= 5.25, gguf,
accelerate).
"""
import inspect
import math
import os
import time
import weakref

import numpy as np

import kvrecall

try:
    import torch
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import (DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, DynamicLayer,
                                          get_layer_types_and_kwargs)
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"kvrecall.transformers needs torch and transformers (>= 5.25) ({error}); install the optional extra: "
        "pip install './Python[transformers]' (Tools/python_test.sh installs it into Python/.venv)") from error

TESTED_TRANSFORMERS = "5.25.0"


def _check_transformers_api():
    """The cache-layer API this module follows (transformers 5.25): refuse others clearly."""
    problems = []
    params = list(inspect.signature(DynamicLayer.get_mask_sizes).parameters)
    if params != ["self", "query_length"]:
        problems.append(f"CacheLayerMixin.get_mask_sizes{tuple(params[1:])} (expected (query_length,))")
    if not hasattr(Cache, "get_query_offset"):
        problems.append("Cache.get_query_offset is missing")
    if problems:
        raise ImportError(f"kvrecall.transformers follows the Cache interface of transformers {TESTED_TRANSFORMERS}; "
                          f"transformers {transformers.__version__} differs: {'; '.join(problems)}. "
                          f"Install transformers=={TESTED_TRANSFORMERS} (pip install './Python[transformers]').")


_check_transformers_api()

__all__ = ["KVRecallCache", "KVRecallLayer", "kvrecall_attention_forward", "register", "load_gguf",
           "UnsupportedModelError", "UnsupportedBatchError", "UnsupportedDtypeError", "UnsupportedMaskError",
           "ATTENTION_NAME", "STORED_DTYPES"]

ATTENTION_NAME = "kvrecall"
# torch dtypes whose keys and values the session can store (as f32, f16 or bf16; scores always in f32).
STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SESSION_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_SERVED_LAYERS = ("full_attention",)
_TRANSFORMERS_LAYERS = ("sliding_attention", "chunked_attention")


class UnsupportedModelError(ValueError):
    """The model's layout cannot be served (layer kinds, head counts, encoder-decoder...)."""


class UnsupportedBatchError(ValueError):
    """A batch the cache cannot serve: it holds one sequence (batch 1), and beam reordering is refused."""


class UnsupportedDtypeError(TypeError):
    """Keys, values or queries of a dtype the session cannot store (it stores float32, float16, bfloat16)."""


class UnsupportedMaskError(ValueError):
    """An attention mask other than the causal one (padding) on a layer the session serves."""


# ---------------------------------------------------------------------------------------------
# The attention function


def _exact_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs):
    """Exact attention as transformers computes it: its `sdpa` function, or, with a logit soft-cap
    (which sdpa lacks), the eager formula (`softcap * tanh(s / softcap)` before the mask), in blocks
    of queries so a long prompt never holds all its scores at once."""
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    keys, values = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len, kv_len = query.shape[2], keys.shape[2]
    outputs = []
    block = max(1, (1 << 24) // max(1, kv_len * query.shape[1]))
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        scores = torch.matmul(query[:, :, start:stop], keys.transpose(2, 3)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            m = attention_mask[:, :, start:stop, :kv_len]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        elif q_len > 1:
            rows = torch.arange(start, stop, device=query.device)[:, None] + (kv_len - q_len)
            scores = scores.masked_fill(torch.arange(kv_len, device=query.device)[None, :] > rows, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        outputs.append(torch.matmul(weights, values))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def kvrecall_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               sliding_window=None, softcap=None, **kwargs):
    """The attention function registered as "kvrecall". On a layer a `KVRecallCache` serves it
    attends exactly during the prompt (and gives the cache the prompt's queries) and asks the
    session afterwards; on any other layer (sliding windows, or no KVRecallCache) it is exact
    attention, as transformers' `sdpa` (eager with a soft-cap)."""
    layer = getattr(key, "_kvrecall_layer", None)
    if layer is None:
        return _exact_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs)
    cache = layer.cache
    if cache is None:
        raise RuntimeError("this KVRecallCache was garbage-collected while its layer was in use")
    return cache._attend(layer, module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs)


def register():
    """Registers the attention function and its mask (transformers' sdpa mask) under "kvrecall"
    (done on import; idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvrecall_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()


# ---------------------------------------------------------------------------------------------
# The cache


def _mark(tensor, layer):
    tensor._kvrecall_layer = layer
    return tensor


class KVRecallLayer(CacheLayerMixin):
    """A full-attention layer whose keys and values the session holds. During the prompt it also
    keeps them (and the prompt's queries) in torch, to attend exactly and to hand them over once."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, cache, layer_idx, session_layer):
        super().__init__()
        self._cache = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.session_layer = session_layer
        self.tokens = 0
        self.queries = None       # prompt queries [1, query heads, tokens, d] until the hand-over
        self.pending = None       # (keys, values) of the last update, until the attention function takes them
        self.scaling = None
        self.softcap = None

    @property
    def cache(self):
        return self._cache()

    def __repr__(self):
        return f"KVRecallLayer(layer={self.layer_idx}, session layer={self.session_layer}, tokens={self.tokens})"

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = torch.empty((1, key_states.shape[1], 0, key_states.shape[3]), dtype=key_states.dtype, device=self.device)
        self.values = torch.empty((1, value_states.shape[1], 0, value_states.shape[3]), dtype=value_states.dtype,
                                  device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        cache = self.cache
        cache._check_kv(self, key_states, value_states)
        if self.pending is not None:
            raise RuntimeError(
                f"layer {self.layer_idx}: the attention function did not take the previous step's keys: a KVRecallCache "
                f"needs the attention implementation {ATTENTION_NAME!r} (load the model with "
                f"attn_implementation={ATTENTION_NAME!r}, or model.set_attn_implementation({ATTENTION_NAME!r}), after "
                "`import kvrecall.transformers`)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if cache._phase == "prompt" and n == 1 and self.tokens > 0:
            cache.build_indexes()  # the first single-token step ends the prompt
        self.tokens += n
        self.pending = (key_states, value_states)
        if cache._phase == "prompt":
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            return _mark(self.keys, self), self.values
        return _mark(key_states, self), value_states

    def get_mask_sizes(self, query_length):
        return self.tokens + query_length, 0

    def get_seq_length(self):
        return self.tokens

    def get_max_length(self):
        return -1

    def reset(self):
        self.keys = self.values = self.queries = self.pending = None
        self.tokens = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove):
        self.cache.crop(tokens_to_remove)

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx):
        self.cache.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats):
        self.cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        self.cache.batch_select_indices(indices)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def _config_int(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


class KVRecallCache(Cache):
    """A transformers `Cache` whose full-attention layers live in a `kvrecall.Session`.

    `config` is the model's configuration (`model.config`). `method` is a session method
    (`kvrecall.METHODS`; "auto": each KV head gets the policy its prefill queries call for).
    `dtype` is how the session stores vectors ("f32", "f16", "bf16"; None: "bf16" for a bfloat16
    model, else "f16"). `k`, `sinks`, `window`, `budget_mass`, `ef`, `nprobe`, `threads` and `path`
    (a store directory; None: a temporary store removed at `close()`) are the session's, see
    `kvrecall.Session`. The softmax scale and logit soft-cap are the ones the model passes its
    attention function (Gemma 3: `query_pre_attn_scalar ** -0.5`; Gemma 2: its soft-cap).
    `build_progress(done, total)` is called while the indexes are built.

    The session is opened at the end of the prompt; `session`, `report()`, `build_seconds` and
    `close()` are available then; `attention_seconds` adds up the time spent in the session's
    append and attend calls after the prompt (every served layer).
    """

    def __init__(self, config, method="auto", *, dtype=None, k=100, sinks=4, window=64, budget_mass=0.9, path=None,
                 ef=None, nprobe=None, threads=0, build_progress=None):
        if method not in kvrecall.METHODS:
            raise ValueError(f"method must be one of {', '.join(kvrecall.METHODS)} (got {method!r})")
        if dtype is not None and dtype not in _SESSION_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_SESSION_DTYPES)} or None (got {dtype!r})")
        if build_progress is not None and not callable(build_progress):
            raise TypeError(f"build_progress must be callable or None (got {type(build_progress).__name__})")
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"{type(config).__name__} is an encoder-decoder model: KVRecallCache serves decoder-only models "
                "(one self-attention cache per layer)")
        text = _text_config(config)
        try:
            layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        except Exception as error:
            raise UnsupportedModelError(f"cannot read the layer layout of {type(text).__name__}: {error}") from error
        unsupported = sorted({t for t in layer_types if t not in _SERVED_LAYERS + _TRANSFORMERS_LAYERS})
        if unsupported:
            raise UnsupportedModelError(
                f"{type(text).__name__} has layers of kind {', '.join(unsupported)}: KVRecallCache serves "
                f"{', '.join(_SERVED_LAYERS)} layers and leaves {', '.join(_TRANSFORMERS_LAYERS)} layers to transformers; "
                "linear attention, shared-KV ('dummy') and indexed layers are not supported")
        served = [i for i, t in enumerate(layer_types) if t in _SERVED_LAYERS]
        if not served:
            raise UnsupportedModelError(
                f"{type(text).__name__} has no full-attention layer (all {len(layer_types)} are "
                f"{', '.join(sorted(set(layer_types)))}): nothing for a KVRecall session to hold; use DynamicCache")
        heads = _config_int(text, "num_attention_heads")
        kv_heads = _config_int(text, "num_key_value_heads") or heads
        head_dim = _config_int(text, "head_dim")
        hidden = _config_int(text, "hidden_size")
        if heads is None or (head_dim is None and hidden is None):
            raise UnsupportedModelError(f"{type(text).__name__} does not say num_attention_heads and head_dim/hidden_size")
        if head_dim is None:
            head_dim = hidden // heads
        if kv_heads < 1 or heads % kv_heads != 0:
            raise UnsupportedModelError(f"{heads} query heads are not a multiple of {kv_heads} key-value heads")
        per_layer = getattr(text, "per_layer_config", None)
        if getattr(text, "is_heterogeneous", False) and per_layer is not None:
            for i in served:
                lc = per_layer[i]
                shape = (_config_int(lc, "num_attention_heads"), _config_int(lc, "num_key_value_heads") or heads,
                         _config_int(lc, "head_dim") or head_dim)
                if shape != (heads, kv_heads, head_dim):
                    raise UnsupportedModelError(
                        f"layer {i} has (query heads, KV heads, head_dim) {shape}, others {(heads, kv_heads, head_dim)}: "
                        "one session needs one shape for every full-attention layer")
        self.method = method
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.group = heads // kv_heads
        self.served_layers = served
        self.layer_types = list(layer_types)
        self._options = dict(dtype=dtype, k=k, sinks=sinks, window=window, budget_mass=budget_mass, path=path,
                             threads=threads)
        if ef is not None:
            self._options["ef"] = ef
        if nprobe is not None:
            self._options["nprobe"] = nprobe
        # Check the session options now (a temporary probe session), not at the end of a long prompt.
        probe = dict(self._options, dtype=dtype or "f16", path=None)
        kvrecall.Session(1, kv_heads, self.group, head_dim, method=method, **probe).close()
        self.build_progress = build_progress
        self.session = None
        self.build_seconds = None
        self.attention_seconds = 0.0  # time in the session's append + attend calls after the prompt
        self._phase = "prompt"
        layers = []
        for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
            if kind in _SERVED_LAYERS:
                layers.append(KVRecallLayer(self, i, served.index(i)))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
        super().__init__(layers=layers)

    # -- state

    @property
    def phase(self):
        """"prompt" until the indexes are built, then "decode"."""
        return self._phase

    def _served(self):
        return [self.layers[i] for i in self.served_layers]

    def get_seq_length(self, layer_idx=0):
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def __repr__(self):
        return (f"KVRecallCache(method={self.method!r}, phase={self._phase!r}, tokens={self._served()[0].tokens}, "
                f"served layers={self.served_layers})")

    # -- checks

    def _check_kv(self, layer, key_states, value_states):
        if not isinstance(key_states, torch.Tensor) or not isinstance(value_states, torch.Tensor):
            raise TypeError(f"layer {layer.layer_idx}: keys and values must be torch tensors")
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise UnsupportedModelError(
                f"layer {layer.layer_idx}: keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} must both "
                "be [batch, kv_heads, tokens, head_dim]")
        batch, kv, _, d = key_states.shape
        if batch != 1:
            raise UnsupportedBatchError(
                f"KVRecallCache serves one sequence (batch 1); layer {layer.layer_idx} got a batch of {batch} "
                "(several prompts, num_beams > 1 or num_return_sequences > 1 make one): run one sequence per cache")
        if (kv, d) != (self.kv_heads, self.head_dim):
            raise UnsupportedModelError(
                f"layer {layer.layer_idx}: keys have {kv} heads of dimension {d}, the configuration says "
                f"{self.kv_heads} of {self.head_dim}")
        for name, t in (("keys", key_states), ("values", value_states)):
            if t.dtype not in STORED_DTYPES:
                raise UnsupportedDtypeError(
                    f"layer {layer.layer_idx}: {name} are {t.dtype}; a KVRecall session stores float32, float16 or "
                    "bfloat16 (load the model with dtype=torch.float32, torch.bfloat16 or torch.float16)")

    @staticmethod
    def _check_causal(layer, attention_mask, q_len, kv_len):
        """The mask of a served layer must be the plain causal one: the session knows no padding."""
        if attention_mask is None:
            return
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
            raise UnsupportedMaskError(f"layer {layer.layer_idx}: unsupported attention mask {type(attention_mask).__name__}")
        m = attention_mask[0, 0, -q_len:, -kv_len:]
        visible = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        rows = torch.arange(q_len, device=m.device)[:, None] + (kv_len - q_len)
        causal = torch.arange(kv_len, device=m.device)[None, :] <= rows
        if attention_mask.shape[-1] < kv_len or attention_mask.shape[-2] < q_len or not torch.equal(visible, causal):
            raise UnsupportedMaskError(
                f"layer {layer.layer_idx}: the attention mask hides positions the causal mask shows (a padded prompt?): "
                "KVRecallCache serves one unpadded sequence; drop the padding (attention_mask of ones)")

    # -- attention

    def _attend(self, layer, module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs):
        pending = layer.pending
        if pending is None:
            raise RuntimeError(f"layer {layer.layer_idx}: attention called without a cache update (called twice?)")
        layer.pending = None
        if dropout:
            raise ValueError("KVRecallCache is for inference: attention dropout must be 0 (call model.eval())")
        if query.dim() != 4 or query.shape[0] != 1 or query.shape[1] != self.heads or query.shape[3] != self.head_dim:
            raise UnsupportedModelError(
                f"layer {layer.layer_idx}: queries {tuple(query.shape)}, expected [1, {self.heads}, tokens, {self.head_dim}]")
        if query.dtype not in STORED_DTYPES:
            raise UnsupportedDtypeError(f"layer {layer.layer_idx}: queries are {query.dtype}; expected float32, "
                                        "float16 or bfloat16")
        scale = float(scaling) if scaling is not None else self.head_dim ** -0.5
        cap = None if softcap is None else float(softcap)
        if layer.scaling is None:
            layer.scaling, layer.softcap = scale, cap
        elif not math.isclose(layer.scaling, scale, rel_tol=1e-6) or layer.softcap != cap:
            raise UnsupportedModelError(
                f"layer {layer.layer_idx}: scale {scale} and soft-cap {cap} differ from this layer's earlier calls "
                f"({layer.scaling}, {layer.softcap})")
        q_len = query.shape[2]
        if self._phase == "prompt":
            self._check_causal(layer, attention_mask, q_len, layer.tokens)
            out, _ = _exact_attention(module, query, key, value, attention_mask, 0.0, scaling, softcap, kwargs)
            q = query.detach()
            layer.queries = q if layer.queries is None else torch.cat([layer.queries, q], dim=2)
            return out, None
        self._check_causal(layer, attention_mask, q_len, layer.tokens)
        keys, values = pending
        s = self.session
        start = time.perf_counter()
        out = torch.empty((1, q_len, self.heads, self.head_dim), dtype=query.dtype, device=query.device)
        for t in range(q_len):
            s.append(layer.session_layer, _numpy(keys[0, :, t:t + 1, :]), _numpy(values[0, :, t:t + 1, :]))
            q = _numpy(query[0, :, t, :]).reshape(self.kv_heads, self.group, self.head_dim)
            o = s.attend(layer.session_layer, q)
            out[0, t] = torch.from_numpy(o.reshape(self.heads, self.head_dim)).to(device=query.device, dtype=query.dtype)
        self.attention_seconds += time.perf_counter() - start
        return out, None

    # -- the hand-over

    def build_indexes(self):
        """Ends the prompt: opens the session, hands it every full-attention layer's keys, values and
        prompt queries (every query head: row t * group + j is query head j of position t), builds
        the indexes once, and drops the torch copies. Called by the first single-token step."""
        if self._phase != "prompt":
            raise RuntimeError("the indexes are already built (the prompt ended); call crop() or reset() to change it")
        layers = self._served()
        counts = {l.tokens for l in layers}
        if len(counts) != 1 or 0 in counts:
            raise RuntimeError(f"cannot build the indexes: full-attention layers hold {sorted(counts)} tokens "
                               "(run the prompt through the model first)")
        for l in layers:
            if l.pending is not None:
                raise RuntimeError(
                    f"layer {l.layer_idx}: the attention function did not take the prompt's keys: a KVRecallCache needs "
                    f"the attention implementation {ATTENTION_NAME!r} (load the model with "
                    f"attn_implementation={ATTENTION_NAME!r} after `import kvrecall.transformers`)")
            if l.queries is None or l.queries.shape[2] != l.tokens:
                raise RuntimeError(f"layer {l.layer_idx}: prompt queries for {0 if l.queries is None else l.queries.shape[2]} "
                                   f"of {l.tokens} positions")
        scales = {(l.scaling, l.softcap) for l in layers}
        if len(scales) != 1:
            raise UnsupportedModelError(f"full-attention layers use different (scale, soft-cap) pairs {sorted(scales, key=str)}: "
                                        "one session has one")
        scale, cap = scales.pop()
        options = dict(self._options)
        if options["dtype"] is None:
            options["dtype"] = "bf16" if layers[0].dtype == torch.bfloat16 else "f16"
        session = kvrecall.Session(len(layers), self.kv_heads, self.group, self.head_dim, method=self.method,
                                   scale=scale, soft_cap=cap, **options)
        try:
            for l in layers:
                session.append(l.session_layer, _numpy(l.keys[0]), _numpy(l.values[0]))
                # [1, kv * g, T, d] -> [kv, T, g, d] -> [kv, T * g, d]
                q = l.queries[0].reshape(self.kv_heads, self.group, l.tokens, self.head_dim).permute(0, 2, 1, 3)
                session.prefill_queries(l.session_layer, _numpy(q.reshape(self.kv_heads, l.tokens * self.group,
                                                                          self.head_dim)))
            start = time.perf_counter()
            session.build_indexes(progress=self.build_progress)
            self.build_seconds = time.perf_counter() - start
        except BaseException:
            session.close()
            raise
        self.session = session
        for l in layers:
            l.keys = l.values = l.queries = None
        self._phase = "decode"

    def report(self):
        """The session's report: one line per (layer, KV head) with its method and index."""
        if self.session is None:
            raise RuntimeError("no session yet: the indexes are built at the end of the prompt")
        return self.session.report()

    # -- rollback, beams, batches

    def crop(self, tokens_to_remove):
        """Removes the last `-tokens_to_remove` tokens (a negative number, as transformers' layers take
        it; a positive one is the length to keep). Served layers are cut in the session (`truncate`,
        indexes holding dropped keys are rebuilt by the library); sliding layers as transformers crops them."""
        layers = self._served()
        length = layers[0].tokens
        keep = length - abs(tokens_to_remove) if tokens_to_remove <= 0 else min(length, tokens_to_remove)
        if keep < 0:
            raise ValueError(f"cannot remove {abs(tokens_to_remove)} tokens from a cache of {length}")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, KVRecallLayer):
                layer.crop(keep - length if tokens_to_remove > 0 else tokens_to_remove)
        if keep == length:
            return
        if self._phase == "prompt":
            for l in layers:
                if l.keys is not None:
                    l.keys, l.values = l.keys[..., :keep, :], l.values[..., :keep, :]
                if l.queries is not None:
                    l.queries = l.queries[..., :keep, :]
                l.tokens = keep
        else:
            self.session.truncate(keep)
            for l in layers:
                l.tokens = keep
        for l in layers:
            l.pending = None

    def reorder_cache(self, beam_idx):
        idx = torch.as_tensor(beam_idx).flatten().tolist()
        if idx != [0]:
            raise UnsupportedBatchError(
                f"KVRecallCache serves one sequence: beam reordering {idx} is not supported (use num_beams=1)")

    def batch_repeat_interleave(self, repeats):
        if repeats != 1:
            raise UnsupportedBatchError(
                f"KVRecallCache serves one sequence: it cannot be repeated {repeats} times (num_beams or "
                "num_return_sequences above 1)")

    def batch_select_indices(self, indices):
        idx = torch.as_tensor(indices).flatten().tolist()
        if idx != [0]:
            raise UnsupportedBatchError(f"KVRecallCache serves one sequence: cannot select batch rows {idx}")

    def reset(self):
        """Forgets everything (the session is closed; the next forward is a new prompt)."""
        self.close()
        for layer in self.layers:
            layer.reset()
        self._phase = "prompt"
        self.build_seconds = None
        self.attention_seconds = 0.0

    def offload(self, layer_idx, only_non_sliding=True):
        pass

    def prefetch(self, layer_idx, only_non_sliding=True):
        pass

    @property
    def is_compileable(self):
        return False

    def __deepcopy__(self, memo):
        raise TypeError("a KVRecallCache cannot be copied: its session is one store with one writer (run a second "
                        "sequence with a second KVRecallCache)")

    def __reduce__(self):
        raise TypeError("a KVRecallCache cannot be pickled: its session is a store open in this process")

    def close(self):
        """Closes the session (a temporary store is removed). Idempotent."""
        if self.session is not None:
            self.session.close()
            self.session = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _numpy(t):
    """A C-contiguous float32 (or float16) numpy copy of a torch tensor, on the CPU."""
    t = t.detach()
    if t.dtype != torch.float16:
        t = t.to(torch.float32)
    return np.ascontiguousarray(t.to("cpu").numpy())


# ---------------------------------------------------------------------------------------------
# Loading a GGUF model


def load_gguf(path, *, dtype=torch.float32, attn_implementation=ATTENTION_NAME, converted=None):
    """(model, tokenizer) from a GGUF file through transformers' GGUF loading (which dequantizes it
    with the `gguf` package; Gemma 3 is supported). The conversion is slow (about two minutes for
    Gemma 3 270M on two cores), so the result is saved once as safetensors in `converted` (default:
    `<file>.hf/` beside the file; False: never saved) and loaded from there afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path} (Tools/fetch_model.sh fetches Gemma 3 270M)")
    target = path + ".hf" if converted is None else converted
    stamp = os.path.join(target, "kvrecall-source.txt") if target else None
    source = f"{os.path.basename(path)} {os.path.getsize(path)} {int(os.path.getmtime(path))} transformers {transformers.__version__}"
    if target and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == source:
                tokenizer = AutoTokenizer.from_pretrained(target)
                model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation=attn_implementation)
                return model.eval(), tokenizer
    directory, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory or ".", gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory or ".", gguf_file=name, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    if target:
        os.makedirs(target, exist_ok=True)
        # The weights are dequantized already (float32): save them as a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        with open(stamp, "w") as f:
            f.write(source + "\n")
    return model.to(dtype).eval(), tokenizer
