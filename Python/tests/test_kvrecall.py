"""The kvrecall package against numpy references, its input checks, resume, truncate and threads."""
import ctypes
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import kvrecall
from kvrecall import _lib

H, G, D = 2, 3, 32
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def softmax_attention(q, keys, values, scale, soft_cap=None):
    """numpy reference: q [H, G, d], keys/values [H, N, d] -> outputs [H, G, d], lse [H, G]."""
    s = np.einsum("hgd,hnd->hgn", q.astype(np.float64), keys.astype(np.float64)) * scale
    if soft_cap is not None:
        s = soft_cap * np.tanh(s / soft_cap)
    m = s.max(axis=-1, keepdims=True)
    w = np.exp(s - m)
    total = w.sum(axis=-1, keepdims=True)
    out = np.einsum("hgn,hnd->hgd", w / total, values.astype(np.float64))
    return out, (m + np.log(total))[..., 0]


def data(tokens, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((H, tokens, D)).astype(dtype), rng.standard_normal((H, tokens, D)).astype(dtype))


def queries(seed=1):
    return np.random.default_rng(seed).standard_normal((H, G, D)).astype(np.float32)


def test_version():
    assert kvrecall.__version__ == "0.2.0"
    assert kvrecall.library_version() == kvrecall.__version__


def test_methods_are_the_librarys_table():
    lib = kvrecall._lib.library()
    names = []
    while (name := lib.kvrecall_method_name(len(names))) is not None:
        names.append(name.decode())
    assert tuple(names) == kvrecall.METHODS
    assert lib.kvrecall_method_name(-1) is None


def test_soft_cap_equals_numpy_capped_softmax():
    keys, values = data(400)
    with kvrecall.Session(1, H, G, D, method="exact", dtype="f32", scale=0.5, soft_cap=1.5) as s:
        s.append(0, keys, values)
        q = queries() * 3
        out, lse = s.attend(0, q, return_lse=True)
        ref, ref_lse = softmax_attention(q, keys, values, 0.5, soft_cap=1.5)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(lse, ref_lse, atol=1e-4, rtol=0)
        assert s.soft_cap == 1.5
    with pytest.raises(ValueError, match="soft_cap"):
        kvrecall.Session(1, H, G, D, soft_cap=-1.0)


def test_budget_mass_default_none_and_bad_values():
    with kvrecall.Session(1, H, G, D) as s:
        assert abs(s.budget_mass - 0.9) < 1e-6
    with kvrecall.Session(1, H, G, D, budget_mass=None) as s:
        assert s.budget_mass is None
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="budget_mass"):
            kvrecall.Session(1, H, G, D, budget_mass=bad)
    with pytest.raises(TypeError, match="budget_mass"):
        kvrecall.Session(1, H, G, D, budget_mass="high")


def test_refresh_fraction_default_none_and_bad_values():
    with kvrecall.Session(1, H, G, D) as s:
        assert s.refresh_fraction == 0.5
    with kvrecall.Session(1, H, G, D, refresh_fraction=None) as s:
        assert s.refresh_fraction is None
    with kvrecall.Session(1, H, G, D, refresh_fraction=0.25) as s:
        assert s.refresh_fraction == 0.25
    for bad in (0.0, -0.5, float("inf"), float("nan"), 1e20):
        with pytest.raises(ValueError, match="refresh_fraction"):
            kvrecall.Session(1, H, G, D, refresh_fraction=bad)


def test_target_error_default_kept_and_bad_values():
    with kvrecall.Session(1, H, G, D, method="auto") as s:
        assert s.target_error == 0.02
    with kvrecall.Session(1, H, G, D, method="auto", target_error=0.05) as s:
        assert s.target_error == 0.05
    for bad in (0.0, -0.5, float("inf"), float("nan"), None):
        with pytest.raises(ValueError, match="target_error"):
            kvrecall.Session(1, H, G, D, target_error=bad)
    with pytest.raises(TypeError, match="target_error"):
        kvrecall.Session(1, H, G, D, target_error="low")


@pytest.mark.parametrize("scale", [None, 0.3])
def test_exact_equals_numpy_softmax(scale):
    keys, values = data(500)
    with kvrecall.Session(2, H, G, D, method="exact", dtype="f32", scale=scale) as s:
        c = np.ascontiguousarray
        s.append(1, c(keys[:, :300]), c(values[:, :300]))
        s.append(1, c(keys[:, 300:]), c(values[:, 300:]))
        q = queries()
        out, lse = s.attend(1, q, return_lse=True)
        ref, ref_lse = softmax_attention(q, keys, values, scale or 1 / np.sqrt(D))
        assert out.shape == (H, G, D) and out.dtype == np.float32 and lse.shape == (H, G)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(lse, ref_lse, atol=1e-4, rtol=0)
        assert s.length(1) == 500 and s.length(0) == 0


def test_float16_input_equals_float32_of_the_same_values():
    keys, values = data(200, dtype=np.float16)
    with kvrecall.Session(1, H, G, D, method="exact", dtype="f32") as a, \
            kvrecall.Session(1, H, G, D, method="exact", dtype="f32") as b:
        a.append(0, keys, values)
        b.append(0, keys.astype(np.float32), values.astype(np.float32))
        q = queries()
        assert np.array_equal(a.attend(0, q), b.attend(0, q))
        assert np.array_equal(a.attend(0, q.astype(np.float16)), b.attend(0, q.astype(np.float16).astype(np.float32)))


@pytest.mark.parametrize("method", kvrecall.METHODS)
def test_every_method_runs(method):
    keys, values = data(600, seed=2)
    with kvrecall.Session(1, H, G, D, method=method, dtype="f16", k=64, window=32) as s:
        s.append(0, keys, values)
        s.prefill_queries(0, data(300, seed=3)[0])
        calls = []
        s.build_indexes(progress=lambda done, total: calls.append((done, total)))
        # Methods with a per-head index report each head; the others may have nothing to build.
        assert calls == [(1, H), (2, H)] or (method in ("exact", "hip", "streaming", "quantized", "auto") and calls == [])
        s.append(0, *data(1, seed=4))
        out = s.attend(0, queries())
        assert out.shape == (H, G, D) and np.isfinite(out).all()


def test_report_says_what_each_head_runs():
    keys, values = data(600, seed=2)
    with kvrecall.Session(1, H, G, D, method="auto", dtype="f32", k=64, window=32) as s:
        s.append(0, keys, values)
        s.prefill_queries(0, data(600, seed=3)[0])
        before = s.report()
        assert before == [f"layer 0 head {h}: auto" for h in range(H)]
        s.build_indexes()
        after = s.report()
        assert len(after) == H and all(line.startswith(f"layer 0 head {h}: ") for h, line in enumerate(after))
        # auto named a policy per head, with its reason and the figures behind it.
        assert all(any(p in line for p in ("exact (", "streaming (", "quantized (", "retrieval (", "estimation (")) for line in after)
        assert all("mass on sinks+window" in line for line in after)
        assert all("candidates: exact: error 0.0000" in line for line in after)  # every measured candidate


def test_progress_false_aborts_and_exceptions_propagate():
    keys, values = data(400)
    with kvrecall.Session(2, H, G, D, method="hnsw", dtype="f32") as s:
        for layer in range(2):
            s.append(layer, keys, values)
        with pytest.raises(kvrecall.AbortedError):
            s.build_indexes(progress=lambda done, total: done < 2)

        def boom(done, total):
            raise KeyError("from the callback")
        with pytest.raises(KeyError):
            s.build_indexes(progress=boom)
        s.build_indexes()
        assert s.head_length(1, 1) == (400, 400 - 64)


class NoCalls:
    """Stands in for the C library: any call is a test failure."""

    def __getattr__(self, name):
        if name == "kvrecall_last_error":
            return lambda: b""
        raise AssertionError(f"{name} was called: the input should have been refused before C")


BAD_APPENDS = [
    ("keys", [[1.0]], TypeError),                                        # not an ndarray
    ("keys", np.zeros((H, 4, D), dtype=np.float64), TypeError),          # float64
    ("keys", np.zeros((4, D), dtype=np.float32), ValueError),            # 2-D
    ("keys", np.zeros((H + 1, 4, D), dtype=np.float32), ValueError),     # heads
    ("keys", np.zeros((H, 4, D * 2), dtype=np.float32), ValueError),     # head_dim (the issue's [2, 3, 32] into d=64)
    ("keys", np.zeros((H, 0, D), dtype=np.float32), ValueError),         # no token
    ("keys", np.zeros((H, D, 4), dtype=np.float32).transpose(0, 2, 1), ValueError),  # not C-contiguous
    ("keys", np.full((H, 4, D), np.nan, dtype=np.float32), ValueError),  # NaN
    ("values", np.zeros((H, 5, D), dtype=np.float32), ValueError),       # values shape differs
    ("values", np.zeros((H, 4, D), dtype=np.float16), TypeError),        # dtypes differ
]


@pytest.mark.parametrize("which,bad,error", BAD_APPENDS)
def test_bad_arrays_raise_before_c_is_called(monkeypatch, which, bad, error):
    s = kvrecall.Session(2, H, G, D, method="exact", dtype="f32")
    try:
        good = np.zeros((H, 4, D), dtype=np.float32)
        monkeypatch.setitem(_lib._state, "lib", NoCalls())
        args = {"keys": good, "values": good, which: bad}
        with pytest.raises(error) as e:
            s.append(0, args["keys"], args["values"])
        assert which in str(e.value) or "keys and values" in str(e.value)
        with pytest.raises(ValueError, match=r"\[2, 3, 32\]"):
            s.attend(0, np.zeros((H, G + 1, D), dtype=np.float32))
        with pytest.raises(ValueError, match="layer 2 does not exist"):
            s.attend(2, queries())
        with pytest.raises(TypeError, match="layer must be an integer"):
            s.length("0")
        with pytest.raises(ValueError, match="NaN"):
            s.prefill_queries(0, np.full((H, 3, D), np.inf, dtype=np.float32))
        with pytest.raises(ValueError, match="tokens must be in"):
            s.truncate(-1)
        with pytest.raises(TypeError, match="progress must be callable"):
            s.build_indexes(progress=3)
    finally:
        monkeypatch.undo()
        s.close()


def test_values_beyond_the_storage_type_are_refused_never_nan():
    """Issue 23: 7e4 passed the finiteness check, was stored in f16 as Inf, and attend answered NaN."""
    keys = np.ones((1, 8, 8), dtype=np.float32)
    keys[0, 3, 5] = 7e4
    values = np.ones_like(keys)
    with kvrecall.Session(1, 1, 2, 8, method="exact") as s:  # f16, the default
        with pytest.raises(ValueError, match=r"Session\.append: keys\[0, 3, 5\] .* 70000\.0, beyond f16's range \(\|x\| <= 65504\)"):
            s.append(0, keys, values)
        with pytest.raises(ValueError, match=r"Session\.append: values\[0, 3, 5\]"):
            s.append(0, values, keys)
        with pytest.raises(ValueError, match=r"Session\.prefill_queries: queries\[0, 3, 5\]"):
            s.prefill_queries(0, keys)
        # The library refuses too, for a caller that goes around these checks.
        f = ctypes.POINTER(ctypes.c_float)
        lib = _lib.library()
        status = lib.kvrecall_session_append(s._h(), 0, keys.ctypes.data_as(f), values.ctypes.data_as(f), 8)
        assert status == kvrecall.ArgumentError.status
        assert "70000" in lib.kvrecall_last_error().decode() and "token 3" in lib.kvrecall_last_error().decode()
        assert s.length(0) == 0
        s.append(0, np.full_like(keys, 65504), values)  # the largest f16 is stored as is
        assert np.isfinite(s.attend(0, np.ones((1, 2, 8), dtype=np.float32))).all()
    with kvrecall.Session(1, 1, 2, 8, method="exact", dtype="bf16") as s:  # bf16 holds 7e4
        s.append(0, keys, values)
        assert np.isfinite(s.attend(0, np.ones((1, 2, 8), dtype=np.float32))).all()
        with pytest.raises(ValueError, match="beyond bf16's range"):
            s.append(0, np.full_like(keys, 3.4e38), values)


def test_a_session_is_not_created_among_unrelated_files(tmp_path):
    """Issue 23: Session(path=...) on a non-empty directory wrote data.mdb among its files."""
    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(kvrecall.StoreError, match=r"not empty and holds no KVRecall store \('notes.txt'\)"):
        kvrecall.Session(1, H, G, D, path=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    with kvrecall.Session(1, H, G, D, path=str(tmp_path / "new")) as s:  # a new directory is fine
        s.append(0, *data(4))


def test_bad_configuration_raises_before_c():
    with pytest.raises(ValueError, match="method must be one of"):
        kvrecall.Session(1, 1, 1, 8, method="nope")
    with pytest.raises(ValueError, match="dtype must be one of"):
        kvrecall.Session(1, 1, 1, 8, dtype="f64")
    with pytest.raises(ValueError, match="head_dim must be in 1...65536"):
        kvrecall.Session(1, 1, 1, 100000)
    with pytest.raises(TypeError, match="unknown parameter"):
        kvrecall.Session(1, 1, 1, 8, nprobes=3)
    with pytest.raises(ValueError, match="scale must be finite and positive"):
        kvrecall.Session(1, 1, 1, 8, scale=float("nan"))


def test_library_errors_become_exceptions_with_the_message(tmp_path):
    with kvrecall.Session(1, H, G, D, method="exact", dtype="f32") as s:
        with pytest.raises(kvrecall.OrderError, match="append keys and values first"):
            s.attend(0, queries())
        s.append(0, *data(10))
        with pytest.raises(kvrecall.ArgumentError, match="cannot truncate to 11 tokens"):
            s.truncate(11)
    with pytest.raises(kvrecall.HandleError):
        s.length(0)
    with pytest.raises(kvrecall.Error):
        kvrecall.Session.resume(str(tmp_path / "missing"))
    path = str(tmp_path / "busy")
    with kvrecall.Session(1, H, G, D, path=path):
        with pytest.raises(kvrecall.BusyError):
            kvrecall.Session(1, H, G, D, path=path)


def test_resume_after_checkpoint(tmp_path):
    path = str(tmp_path / "store")
    keys, values = data(800, seed=5)
    q = queries(6)
    with kvrecall.Session(2, H, G, D, method="hnsw", dtype="f32", k=50, path=path) as s:
        for layer in range(2):
            s.append(layer, keys, values)
        s.build_indexes()
        s.checkpoint()
        before = s.attend(1, q)
        s.append(0, *data(1, seed=7))  # a step that reached layer 0 only
    with kvrecall.Session.resume(path) as r:
        assert (r.layers, r.kv_heads, r.query_heads_per_kv, r.head_dim, r.method) == (2, H, G, D, "hnsw")
        info = r.resume_info
        assert (info.tokens, info.longest, info.indexes_loaded) == (800, 801, 2 * H)
        assert r.length(0) == r.length(1) == 800
        np.testing.assert_array_equal(r.attend(1, q), before)


def test_truncate_rolls_back(tmp_path):
    keys, values = data(300, seed=8)
    with kvrecall.Session(2, H, G, D, method="exact", dtype="f32") as s:
        for layer in range(2):
            s.append(layer, keys, values)
        s.truncate(120)
        assert [s.length(layer) for layer in range(2)] == [120, 120]
        q = queries(9)
        ref, _ = softmax_attention(q, keys[:, :120], values[:, :120], 1 / np.sqrt(D))
        np.testing.assert_allclose(s.attend(0, q), ref, atol=1e-5, rtol=0)


def test_two_sessions_in_two_threads():
    keys, values = data(2000, seed=10)
    q = queries(11)
    results, errors = {}, []

    def run(name):
        try:
            with kvrecall.Session(1, H, G, D, method="exact", dtype="f32") as s:
                s.append(0, keys, values)
                for _ in range(20):
                    results[name] = s.attend(0, q)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ref, _ = softmax_attention(q, keys, values, 1 / np.sqrt(D))
    for name in ("a", "b"):
        np.testing.assert_allclose(results[name], ref, atol=1e-5, rtol=0)


def test_missing_library_is_a_clear_error(tmp_path):
    code = "import kvrecall\ntry:\n    kvrecall.library_version()\nexcept kvrecall.LibraryNotFound as e:\n    print(e)\n"
    env = dict(os.environ, KVRECALL_LIBRARY=str(tmp_path / "nope.so"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "nope.so (KVRECALL_LIBRARY): missing" in out and "swift build -c release --product KVRecallC" in out


def test_decode_loop_example():
    example = os.path.join(REPOSITORY, "Examples", "python", "decode_loop.py")
    r = subprocess.run([sys.executable, example, "--steps", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "worst relative output error" in r.stdout
