"""ctypes declarations of include/kvrecall.h (ABI 2) and how the shared library is found."""
import ctypes
import os

ABI_VERSION = 2

_HERE = os.path.dirname(os.path.abspath(__file__))
_BUILD_HINT = ("build it with `swift build -c release --product KVRecallC` in the KVRecall repository "
               "(then reinstall with `pip install ./Python`), or point KVRECALL_LIBRARY at a libKVRecallC.so")


class LibraryNotFound(ImportError):
    """No usable libKVRecallC.so: the message says where it looked and how to build one."""


def _candidates():
    """(path, origin) in the order they are tried."""
    env = os.environ.get("KVRECALL_LIBRARY")
    if env:
        yield env, "KVRECALL_LIBRARY"
        return
    yield os.path.join(_HERE, "lib", "libKVRecallC.so"), "the package's copy (placed at install time)"
    repo_file = os.path.join(_HERE, "_repository.txt")
    repo = None
    if os.path.exists(repo_file):
        with open(repo_file) as f:
            repo = f.read().strip()
    else:  # running from the source tree
        repo = os.path.dirname(os.path.dirname(_HERE))
    if repo:
        yield os.path.join(repo, ".build", "release", "libKVRecallC.so"), "the repository's release build"


def _load():
    tried = []
    for path, origin in _candidates():
        if not os.path.exists(path):
            tried.append(f"{path} ({origin}): missing")
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path} ({origin}): {e}")
            continue
        if not hasattr(lib, "kvrecall_abi_version"):
            tried.append(f"{path} ({origin}): ABI 1 library (no kvrecall_abi_version); this package needs ABI {ABI_VERSION}")
            continue
        lib.kvrecall_abi_version.restype = ctypes.c_int
        if lib.kvrecall_abi_version() != ABI_VERSION:
            tried.append(f"{path} ({origin}): ABI {lib.kvrecall_abi_version()}, this package needs ABI {ABI_VERSION}")
            continue
        return _declare(lib), path
    raise LibraryNotFound("cannot load KVRecall's C library:\n  " + "\n  ".join(tried) + "\n" + _BUILD_HINT)


class Config(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("layers", ctypes.c_uint32),
        ("kv_heads", ctypes.c_uint32),
        ("query_heads_per_kv", ctypes.c_uint32),
        ("head_dim", ctypes.c_uint32),
        ("dtype", ctypes.c_int32),
        ("method", ctypes.c_int32),
        ("k", ctypes.c_uint32),
        ("sinks", ctypes.c_uint32),
        ("window", ctypes.c_uint32),
        ("ef", ctypes.c_uint32),
        ("nprobe", ctypes.c_uint32),
        ("scale", ctypes.c_float),
        ("soft_cap", ctypes.c_float),
        ("threads", ctypes.c_uint32),
        ("budget_mass", ctypes.c_float),
        ("refresh_fraction", ctypes.c_double),
        ("target_error", ctypes.c_double),
    ]


class ResumeInfo(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("tokens", ctypes.c_size_t),
        ("longest", ctypes.c_size_t),
        ("indexes_loaded", ctypes.c_uint32),
        ("indexes_rebuilt", ctypes.c_uint32),
        ("indexes_missing", ctypes.c_uint32),
    ]


PROGRESS = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p)


class BuildParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("threads", ctypes.c_uint32),
        ("hnsw_m", ctypes.c_uint32),
        ("ef_construction", ctypes.c_uint32),
        ("nlist", ctypes.c_uint32),
        ("kmeans_iterations", ctypes.c_uint32),
        ("lsh_tables", ctypes.c_uint32),
        ("lsh_bits", ctypes.c_uint32),
        ("graph_degree", ctypes.c_uint32),
        ("seed", ctypes.c_uint64),
        ("progress", PROGRESS),
        ("user_data", ctypes.c_void_p),
    ]


def _declare(lib):
    P, F, U16 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint16)
    I, SZ, U32 = ctypes.c_int, ctypes.c_size_t, ctypes.c_uint32
    signatures = {
        "kvrecall_version": (ctypes.c_char_p, []),
        "kvrecall_last_error": (ctypes.c_char_p, []),
        "kvrecall_method_name": (ctypes.c_char_p, [ctypes.c_int32]),
        "kvrecall_config_default": (None, [ctypes.POINTER(Config), U32, U32, U32, U32]),
        "kvrecall_session_open": (I, [ctypes.POINTER(Config), ctypes.c_char_p, ctypes.POINTER(P)]),
        "kvrecall_session_resume_ex": (I, [ctypes.c_char_p, ctypes.POINTER(ResumeInfo), ctypes.POINTER(P)]),
        "kvrecall_session_get_config": (I, [P, ctypes.POINTER(Config)]),
        "kvrecall_session_append": (I, [P, U32, F, F, SZ]),
        "kvrecall_session_append_f16": (I, [P, U32, U16, U16, SZ]),
        "kvrecall_session_prefill_queries": (I, [P, U32, F, SZ]),
        "kvrecall_build_params_default": (None, [ctypes.POINTER(BuildParams)]),
        "kvrecall_session_build_indexes_ex": (I, [P, ctypes.POINTER(BuildParams)]),
        "kvrecall_session_attend_ex": (I, [P, U32, F, F, SZ, F, SZ]),
        "kvrecall_session_length": (I, [P, U32, ctypes.POINTER(SZ)]),
        "kvrecall_session_head_length": (I, [P, U32, U32, ctypes.POINTER(SZ), ctypes.POINTER(SZ)]),
        "kvrecall_session_report": (I, [P, ctypes.c_char_p, SZ, ctypes.POINTER(SZ)]),
        "kvrecall_session_truncate": (I, [P, SZ]),
        "kvrecall_session_checkpoint": (I, [P]),
        "kvrecall_session_close": (None, [P]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


_state = {}


def library():
    """The loaded library (loaded on first use, so `import kvrecall` works without it)."""
    if "lib" not in _state:
        _state["lib"], _state["path"] = _load()
    return _state["lib"]


def library_path():
    library()
    return _state["path"]
