"""KVRecall from Python: a decoder's KV cache with retrieval attention, numpy in and out.

    import numpy as np, kvrecall
    with kvrecall.Session(layers=2, kv_heads=2, query_heads_per_kv=4, head_dim=64, method="hnsw") as s:
        s.append(0, keys, values)          # [kv_heads, tokens, head_dim] float32 or float16
        s.build_indexes()
        out = s.attend(0, queries)         # [kv_heads, query_heads_per_kv, head_dim] -> same shape

Everything goes through the C ABI (include/kvrecall.h, libKVRecallC.so); arrays are checked
here before the library sees them.
"""
import ctypes
import math
import os

import numpy as np

from . import _lib
from ._lib import LibraryNotFound

__version__ = "0.2.0"

__all__ = ["Session", "ResumeInfo", "Error", "NullPointerError", "ArgumentError", "OrderError", "LayerError",
           "StoreError", "IndexBuildError", "HandleError", "InternalError", "BusyError", "AbortedError",
           "LibraryNotFound", "library_version", "METHODS", "DTYPES"]

# The largest finite magnitude of each 16-bit storage type (numpy has no bfloat16: its bit pattern 0x7F7F0000).
_LARGEST_FINITE = {"f16": 65504.0, "bf16": float(np.frombuffer(np.uint32(0x7F7F0000).tobytes(), dtype=np.float32)[0])}
_LARGEST_FINITE_TEXT = {"f16": "65504", "bf16": "3.3895314e+38"}

# In C-value order (enum kvrecall_method); a test checks it against the library's own table.
METHODS = ("exact", "retrieval", "hip", "landmark", "hnsw", "ivf", "lsh", "tree", "estimate", "auto", "streaming", "quantized")
DTYPES = ("f32", "f16", "bf16")


class Error(Exception):
    """A failure reported by the library: `status` is the C status code, the message the library's."""
    status = None

    def __init__(self, message, status=None):
        super().__init__(message)
        if status is not None:
            self.status = status


class NullPointerError(Error): status = 1
class ArgumentError(Error): status = 2
class OrderError(Error): status = 3
class LayerError(Error): status = 4
class StoreError(Error): status = 5
class IndexBuildError(Error): status = 6
class HandleError(Error): status = 7
class InternalError(Error): status = 8
class BusyError(Error): status = 9
class AbortedError(Error): status = 10


_ERRORS = {cls.status: cls for cls in (NullPointerError, ArgumentError, OrderError, LayerError, StoreError,
                                        IndexBuildError, HandleError, InternalError, BusyError, AbortedError)}


def _check(status):
    if status != 0:
        message = _lib.library().kvrecall_last_error().decode("utf-8", "replace")
        raise _ERRORS.get(status, Error)(message, status)


def library_version():
    """The C library's version string (kvrecall_version())."""
    return _lib.library().kvrecall_version().decode()


class ResumeInfo:
    """What `Session.resume` found and did: `tokens` per layer now, `longest` layer before (more
    when a step was cut short), heads whose index was loaded, rebuilt, or is missing."""

    def __init__(self, info):
        self.tokens = info.tokens
        self.longest = info.longest
        self.indexes_loaded = info.indexes_loaded
        self.indexes_rebuilt = info.indexes_rebuilt
        self.indexes_missing = info.indexes_missing

    def __repr__(self):
        return (f"ResumeInfo(tokens={self.tokens}, longest={self.longest}, indexes_loaded={self.indexes_loaded}, "
                f"indexes_rebuilt={self.indexes_rebuilt}, indexes_missing={self.indexes_missing})")


_PARAMS = {"ef", "nprobe", "threads"}


def _uint(name, value, low=0, high=2**32 - 1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer (got {type(value).__name__})")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be in {low}...{high} (got {value})")
    return int(value)


def _optional_number(name, value, valid, requirement):
    """None, or a real number (not a bool) for which `valid` holds; else TypeError / ValueError."""
    if value is None:
        return
    if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number or None (got {type(value).__name__})")
    if not valid(value):
        raise ValueError(f"{name} must be {requirement} (got {value})")


class Session:
    """A decoder's KV cache on a KVRecall store (temporary when `path` is None).

    Shapes (C order): keys, values and prefill queries `[kv_heads, tokens, head_dim]`; decode
    queries and outputs `[kv_heads, query_heads_per_kv, head_dim]`; log-sum-exp
    `[kv_heads, query_heads_per_kv]`. `method` is one of METHODS, `dtype` (storage) one of DTYPES;
    `scale` is the softmax scale (None: 1/sqrt(head_dim)), `soft_cap` a logit soft-cap (None: none,
    else scores s become soft_cap * tanh(s / soft_cap)); `budget_mass` the adaptive budget of index
    methods (at build each head's k is raised, at most to 10% of its keys, until its neediest query
    head keeps this much attention mass with its exact top-k; None: k stays fixed); `refresh_fraction`
    when a head's plan and index are made again during a long decode (once the keys indexed since
    pass this fraction of those planned over; on a background thread; None: never); `target_error`
    the output error `auto`'s plan for a head may reach against exact attention on its held-out
    queries (the cheapest candidate within it wins); `params` may set `ef`, `nprobe`
    (search knobs) and `threads` (0: all cores). Calls on one session are serialised by the
    library; separate sessions run in parallel (ctypes releases the GIL during each call).
    """

    def __init__(self, layers, kv_heads, query_heads_per_kv, head_dim, *, method="retrieval", dtype="f16", k=100,
                 sinks=4, window=64, scale=None, soft_cap=None, budget_mass=0.9, refresh_fraction=0.5, target_error=0.02, path=None, **params):
        unknown = set(params) - _PARAMS
        if unknown:
            raise TypeError(f"unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_PARAMS))}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
        _optional_number("scale", scale, lambda x: math.isfinite(x) and x > 0, "finite and positive")
        _optional_number("soft_cap", soft_cap, lambda x: math.isfinite(x) and x > 0, "finite and positive")
        _optional_number("budget_mass", budget_mass, lambda x: 0 < x <= 1, "in (0, 1], or None for a fixed k")
        _optional_number("refresh_fraction", refresh_fraction, lambda x: 0 < x <= 1e6,
                         "positive and at most 1e6, or None to never refresh")
        if target_error is None:
            raise ValueError("target_error must be finite and positive (got None)")
        _optional_number("target_error", target_error, lambda x: math.isfinite(x) and x > 0, "finite and positive")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike (got {type(path).__name__})")
        shape = [_uint("layers", layers, 1), _uint("kv_heads", kv_heads, 1),
                 _uint("query_heads_per_kv", query_heads_per_kv, 1), _uint("head_dim", head_dim, 1, 65536)]
        lib = _lib.library()
        c = _lib.Config()
        lib.kvrecall_config_default(ctypes.byref(c), *shape)
        c.method = METHODS.index(method)
        c.dtype = DTYPES.index(dtype)
        c.k = _uint("k", k, 1)
        c.sinks = _uint("sinks", sinks)
        c.window = _uint("window", window)
        if "ef" in params:
            c.ef = _uint("ef", params["ef"], 1)
        if "nprobe" in params:
            c.nprobe = _uint("nprobe", params["nprobe"], 1)
        c.threads = _uint("threads", params.get("threads", 0))
        c.scale = 0.0 if scale is None else float(scale)
        c.soft_cap = 0.0 if soft_cap is None else float(soft_cap)
        c.budget_mass = 0.0 if budget_mass is None else float(budget_mass)
        c.refresh_fraction = -1.0 if refresh_fraction is None else float(refresh_fraction)
        c.target_error = float(target_error)
        handle = ctypes.c_void_p()
        directory = None if path is None else os.fsencode(path)
        _check(lib.kvrecall_session_open(ctypes.byref(c), directory, ctypes.byref(handle)))
        self._adopt(handle, c)
        self.resume_info = None

    def _adopt(self, handle, config):
        self._handle = handle
        self.layers = config.layers
        self.kv_heads = config.kv_heads
        self.query_heads_per_kv = config.query_heads_per_kv
        self.head_dim = config.head_dim
        self.method = METHODS[config.method] if 0 <= config.method < len(METHODS) else str(config.method)
        self.dtype = DTYPES[config.dtype]
        self.k, self.sinks, self.window = config.k, config.sinks, config.window
        self.scale = None if config.scale == 0 else config.scale
        self.soft_cap = None if config.soft_cap == 0 else config.soft_cap
        self.budget_mass = None if config.budget_mass == 0 else config.budget_mass
        self.refresh_fraction = None if config.refresh_fraction < 0 else config.refresh_fraction
        self.target_error = config.target_error

    @classmethod
    def resume(cls, path):
        """Reopens the session stored at `path` in a consistent state (every layer cut back to
        the last step all layers completed; checkpointed indexes loaded). `resume_info` says what
        was done."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike (got {type(path).__name__})")
        lib = _lib.library()
        info = _lib.ResumeInfo()
        info.struct_size = ctypes.sizeof(info)
        handle = ctypes.c_void_p()
        _check(lib.kvrecall_session_resume_ex(os.fsencode(path), ctypes.byref(info), ctypes.byref(handle)))
        c = _lib.Config()
        c.struct_size = ctypes.sizeof(c)
        session = cls.__new__(cls)
        try:
            _check(lib.kvrecall_session_get_config(handle, ctypes.byref(c)))
        except Error:
            lib.kvrecall_session_close(handle)
            raise
        session._adopt(handle, c)
        session.resume_info = ResumeInfo(info)
        return session

    # -- lifecycle

    def close(self):
        """Closes the session (a temporary store is removed). Idempotent."""
        handle = getattr(self, "_handle", None)
        if handle is not None and handle.value is not None:
            _lib.library().kvrecall_session_close(handle)
            self._handle = ctypes.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _h(self):
        if self._handle.value is None:
            raise HandleError("the session is closed", 7)
        return self._handle

    # -- checks (before the library sees anything)

    def _layer(self, layer):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer must be an integer (got {type(layer).__name__})")
        if not 0 <= int(layer) < self.layers:
            raise ValueError(f"layer {layer} does not exist (the session has {self.layers} layers: 0...{self.layers - 1})")
        return int(layer)

    def _array(self, name, a, shape, allow_f16=True):
        """`a` checked: an ndarray of float32 (or float16), C-contiguous, finite, of `shape`
        (None: any positive length)."""
        expected = "[" + ", ".join("tokens" if s is None else str(s) for s in shape) + "]"
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray of shape {expected} (got {type(a).__name__})")
        allowed = (np.float32, np.float16) if allow_f16 else (np.float32,)
        if a.dtype not in allowed:
            raise TypeError(f"{name} must be {' or '.join(np.dtype(t).name for t in allowed)} (got {a.dtype})")
        if a.ndim != len(shape):
            raise ValueError(f"{name} must have shape {expected} ({len(shape)} dimensions; got {a.ndim}: {a.shape})")
        for axis, (want, got) in enumerate(zip(shape, a.shape)):
            if want is None and got < 1:
                raise ValueError(f"{name} must hold at least one token (shape {a.shape}, expected {expected})")
            if want is not None and want != got:
                raise ValueError(f"{name} must have shape {expected} (got {a.shape}: axis {axis} is {got}, not {want})")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
        if not np.isfinite(a).all():
            bad = np.argwhere(~np.isfinite(a))[0]
            raise ValueError(f"{name} holds NaN or Inf (first at index {tuple(int(i) for i in bad)})")
        return a

    def _storable(self, call, name, a):
        """Refuses a finite value the session's storage type cannot hold (f16: |x| > 65504; bf16
        beyond 3.39e38): stored, it would become Inf and attention would answer NaN."""
        limit = _LARGEST_FINITE.get(self.dtype)
        if limit is None or a.dtype != np.float32:
            return  # float16 input always fits f16 and bf16
        over = np.abs(a) > limit
        if over.any():
            index = tuple(int(i) for i in np.argwhere(over)[0])
            wider = "dtype='f32' or 'bf16'" if self.dtype == "f16" else "dtype='f32'"
            raise ValueError(
                f"{call}: {name}[{', '.join(map(str, index))}] (KV head, token, column) is {float(a[index])!r}, beyond "
                f"{self.dtype}'s range (|x| <= {_LARGEST_FINITE_TEXT[self.dtype]}), the session's storage type: "
                f"stored it would become Inf; open the session with {wider}, or scale the input")

    # -- calls

    def append(self, layer, keys, values):
        """Appends tokens to every KV head of `layer`, atomically: `keys` and `values` are
        `[kv_heads, tokens, head_dim]`, both float32 or both float16."""
        layer = self._layer(layer)
        shape = (self.kv_heads, None, self.head_dim)
        keys = self._array("keys", keys, shape)
        values = self._array("values", values, shape)
        if keys.shape != values.shape:
            raise ValueError(f"values must have the shape of keys {keys.shape} (got {values.shape})")
        if keys.dtype != values.dtype:
            raise TypeError(f"keys and values must have one dtype (got {keys.dtype} and {values.dtype})")
        self._storable("Session.append", "keys", keys)
        self._storable("Session.append", "values", values)
        tokens = keys.shape[1]
        lib = _lib.library()
        if keys.dtype == np.float16:
            u16 = ctypes.POINTER(ctypes.c_uint16)
            _check(lib.kvrecall_session_append_f16(self._h(), layer, keys.ctypes.data_as(u16), values.ctypes.data_as(u16), tokens))
        else:
            f = ctypes.POINTER(ctypes.c_float)
            _check(lib.kvrecall_session_append(self._h(), layer, keys.ctypes.data_as(f), values.ctypes.data_as(f), tokens))

    def prefill_queries(self, layer, queries):
        """Stores a prompt's queries for `layer`, `[kv_heads, tokens, head_dim]` (one query head
        per KV head, or the group's sum): the retrieval graph learns from them."""
        layer = self._layer(layer)
        queries = self._array("queries", queries, (self.kv_heads, None, self.head_dim))
        self._storable("Session.prefill_queries", "queries", queries)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        _check(_lib.library().kvrecall_session_prefill_queries(
            self._h(), layer, q.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), q.shape[1]))

    def build_indexes(self, progress=None):
        """Builds every head's index (after prefill). `progress(done, total)` is called after each
        (layer, KV head); returning False stops the build (AbortedError), and an exception it
        raises stops it and is re-raised."""
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be callable or None (got {type(progress).__name__})")
        lib = _lib.library()
        p = _lib.BuildParams()
        lib.kvrecall_build_params_default(ctypes.byref(p))
        raised = []
        if progress is not None:
            def call(done, total, _user):
                try:
                    return 1 if progress(done, total) is False else 0
                except BaseException as e:  # carried over the C frames, re-raised below
                    raised.append(e)
                    return 1
            p.progress = _lib.PROGRESS(call)
        try:
            _check(lib.kvrecall_session_build_indexes_ex(self._h(), ctypes.byref(p)))
        except AbortedError:
            if raised:
                raise raised[0]
            raise

    def attend(self, layer, queries, return_lse=False):
        """Attention of one decode step: `queries` `[kv_heads, query_heads_per_kv, head_dim]`
        (float32, or float16 converted) -> outputs of the same shape, float32; with `return_lse`,
        also each query head's log-sum-exp `[kv_heads, query_heads_per_kv]` over the attended
        positions (to merge exactly with attention computed elsewhere)."""
        layer = self._layer(layer)
        shape = (self.kv_heads, self.query_heads_per_kv, self.head_dim)
        q = np.ascontiguousarray(self._array("queries", queries, shape), dtype=np.float32)
        out = np.empty(shape, dtype=np.float32)
        lse = np.empty(shape[:2], dtype=np.float32) if return_lse else None
        f = ctypes.POINTER(ctypes.c_float)
        _check(_lib.library().kvrecall_session_attend_ex(
            self._h(), layer, q.ctypes.data_as(f), out.ctypes.data_as(f), out.size,
            lse.ctypes.data_as(f) if return_lse else None, lse.size if return_lse else 0))
        return (out, lse) if return_lse else out

    def length(self, layer):
        """Tokens cached for `layer`."""
        layer = self._layer(layer)
        n = ctypes.c_size_t()
        _check(_lib.library().kvrecall_session_length(self._h(), layer, ctypes.byref(n)))
        return n.value

    def head_length(self, layer, kv_head):
        """(tokens, indexed) of one KV head: its cached tokens and how many its index holds."""
        layer = self._layer(layer)
        _uint("kv_head", kv_head, 0, self.kv_heads - 1)
        n, indexed = ctypes.c_size_t(), ctypes.c_size_t()
        _check(_lib.library().kvrecall_session_head_length(self._h(), layer, int(kv_head), ctypes.byref(n), ctypes.byref(indexed)))
        return n.value, indexed.value

    def report(self):
        """One line per (layer, KV head): its method (for `auto`, the policy chosen from its
        prefill queries and why), its index and the calibrated search knob."""
        lib = _lib.library()
        length = ctypes.c_size_t()
        _check(lib.kvrecall_session_report(self._h(), None, 0, ctypes.byref(length)))
        buffer = ctypes.create_string_buffer(length.value + 1)
        _check(lib.kvrecall_session_report(self._h(), buffer, length.value + 1, ctypes.byref(length)))
        return buffer.value.decode("utf-8").split("\n")

    def truncate(self, tokens):
        """Cuts every layer and head back to `tokens` (rollback); indexes holding dropped
        positions are rebuilt."""
        tokens = _uint("tokens", tokens, 0, 2**63 - 1)
        _check(_lib.library().kvrecall_session_truncate(self._h(), tokens))

    def checkpoint(self):
        """Saves the indexes and syncs the store: `Session.resume(path)` continues from here."""
        _check(_lib.library().kvrecall_session_checkpoint(self._h()))

    def __repr__(self):
        return (f"kvrecall.Session(layers={self.layers}, kv_heads={self.kv_heads}, query_heads_per_kv={self.query_heads_per_kv}, "
                f"head_dim={self.head_dim}, method={self.method!r}, dtype={self.dtype!r})")
