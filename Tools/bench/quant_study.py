#!/usr/bin/env python3
"""Code format study for a quantized KV tier (issue 21, part 2): which low-bit codes of keys and values.

For every data set (a synthetic family folder, or one layer of a `kvrecall capture` folder) and every
candidate code of the keys and of the values, it measures:

  recall   recall@100 of each query head's exact top-100 when a scan of the KEY CODES picks its best
           C candidates (C = 100 .. 6400), which are then re-scored exactly (so recall = the share of
           the exact top-100 among the C candidates);
  error    output error ||o - o_exact|| / ||o_exact|| of the THREE-PART METHOD:
             sinks (first 4 positions) + window (last 64 visible positions): exact scores, exact values;
             the best M other positions by code score: re-scored exactly, exact values;
             every other visible position: score from its key code, value from its value code;
           all merged in one softmax (what a log-sum-exp merge of the parts computes), against
             'drop'    the same without the tail (the other positions dropped),
             'oracle'  sinks + window + the EXACT top-M, tail dropped,
             'oracle+tail'  sinks + window + the exact top-M, code tail,
           for M = 0 (codes only) .. 2048;
  bytes    bytes per position of codes + their scales, against the f16 keys and values (4 d bytes).

Exact attention is computed from the vectors as the store holds them (f16: synthetic sets are
rounded to f16 first), softmax scale 1/sqrt(d) (Gemma 3: 1/16 = the capture manifest's 'scale'; no
logit soft-capping in Gemma 3), in float64.  Capture sets are causal: the decode query at position p
sees keys 0..p (window = p-63..p); synthetic decode queries see all N keys.

Key codes (b = 2, 4, 8 bits; asymmetric min/max codes unless 'sym'; scale and min stored as f16):
  ch           per channel over the whole head (subtracting the key mean first changes nothing here:
               the per-channel min absorbs it)
  ch-frozen    per channel, scales from the first half of the positions only, later positions clamped
               (what a store gets if it fixes the scales at the first build and appends afterwards)
  gG           per channel within blocks of G positions (KIVI's key grouping), G = 32, 64, 128
  rot-ch, rot-g64   key mean subtracted, a randomized Hadamard rotation (signs, then H / sqrt(d)),
               then per channel / per block of 64 (queries are rotated the same way at decode)
  tok32, tok32-m    per token, blocks of 32 channels (llama.cpp q4_1-like), raw / after mean subtraction
  sym-ch, sym-ch-m  symmetric per channel (absmax, no min), raw / after mean subtraction
  gG-q8        per block codes as gG, scored as an integer kernel would: the query times the block's
               steps rounded to int8 (one scale per query and block), integer dot with the codes
Value codes: tok (per token, all d channels), tok32 (per token, blocks of 32 channels: KIVI), ch (per
channel over the head), g64 (per channel within blocks of 64 positions); meanG (no code: the tail
takes the f16 mean value of its block of G positions, 2d/G bytes per position).

Usage (paths are arguments; the output JSON holds every per-query figure's median/p90):
  python Tools/bench/quant_study.py --set gemma32k-L5=Tools/bench/out/gemma32k:5 \\
      --set f2-128k=Tools/bench/out/synth128k_f2 --out Tools/bench/out/quant_study.json --markdown
  python Tools/bench/quant_study.py --report Tools/bench/out/quant_study.json   # tables only
Only numpy.  Deterministic (the rotation's signs come from --seed).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

SINKS, WINDOW = 4, 64
C_LIST = (100, 200, 400, 800, 1600, 3200, 6400)
M_LIST = (0, 32, 64, 128, 256, 512, 1024, 2048)


# ---------------------------------------------------------------------------------------------
# data

class DataSet:
    """keys/values [N, d] float32 (f16-exact), query rows [R, d], for each row its visible length
    (causal) and its query head (for GQA captures)."""

    def __init__(self, name, spec, max_rows, max_positions):
        self.name = name
        if ":" in spec and not os.path.isdir(spec):
            folder, layer = spec.rsplit(":", 1)
            pre = os.path.join(folder, f"layer{int(layer):02d}_")
            K = np.load(pre + "keys.npy")
            V = np.load(pre + "values.npy")
            Q = np.load(pre + "queries.npy")
            man = {}
            mp = os.path.join(folder, "manifest.json")
            if os.path.exists(mp):
                with open(mp) as f:
                    man = json.load(f)
            g = int(man.get("query_heads_per_kv", 4))
            self.scale = float(man.get("scale", 1 / np.sqrt(K.shape[1])))
            n = K.shape[0]
            D = Q.shape[0] // g
            # evenly spaced decode positions (all of them if D <= max_positions)
            pick = np.unique(np.linspace(0, D - 1, num=min(D, max_positions)).round().astype(int))
            rows = (pick[:, None] * g + np.arange(g)[None, :]).ravel()
            self.Q = Q[rows].astype(np.float32)
            self.visible = np.repeat(n - D + pick + 1, g)      # query at position p sees 0..p
            self.head = np.tile(np.arange(g), len(pick))
            self.kind = "capture"
            self.source_dtype = str(K.dtype)
        else:
            K = np.load(os.path.join(spec, "keys.npy"))
            V = np.load(os.path.join(spec, "values.npy"))
            Q = np.load(os.path.join(spec, "queries.npy"))
            pick = np.unique(np.linspace(0, len(Q) - 1, num=min(len(Q), max_rows)).round().astype(int))
            self.Q = Q[pick].astype(np.float32)
            self.scale = 1 / np.sqrt(K.shape[1])
            self.visible = np.full(len(self.Q), K.shape[0])
            self.head = np.zeros(len(self.Q), dtype=int)
            self.kind = "synthetic"
            self.source_dtype = str(K.dtype)
        # What the store holds: f16 vectors.
        self.K = K.astype(np.float16).astype(np.float32)
        self.V = V.astype(np.float16).astype(np.float32)
        self.n, self.d = self.K.shape
        self.causal = bool((self.visible < self.n).any())


# ---------------------------------------------------------------------------------------------
# codes: each returns the dequantized array (float32, original basis) and bytes per position

def f16(x):
    return np.asarray(x, dtype=np.float16).astype(np.float32)


def asym_codes(X, bits, axis_groups):
    """Asymmetric min/max codes. axis_groups(X) -> (mn, mx) broadcastable to X, per group."""
    levels = (1 << bits) - 1
    mn, mx = axis_groups
    mn = f16(mn)
    scale = f16(np.maximum(mx - mn, 1e-30) / levels)
    scale = np.where(scale == 0, np.float32(6e-8), scale)
    q = np.clip(np.rint((X - mn) / scale), 0, levels)
    return (mn + q * scale).astype(np.float32)


def q_channel(X, bits, frozen=None):
    rows = X if frozen is None else X[: max(1, int(len(X) * frozen))]
    return asym_codes(X, bits, (rows.min(0, keepdims=True), rows.max(0, keepdims=True)))


def q_posgroups(X, bits, G):
    n, d = X.shape
    out = np.empty_like(X)
    for s in range(0, n, G):
        B = X[s:s + G]
        out[s:s + G] = asym_codes(B, bits, (B.min(0, keepdims=True), B.max(0, keepdims=True)))
    return out


def q_token(X, bits, G):
    n, d = X.shape
    Xr = X.reshape(n, d // G, G)
    out = asym_codes(Xr, bits, (Xr.min(2, keepdims=True), Xr.max(2, keepdims=True)))
    return out.reshape(n, d)


def q_sym_channel(X, bits):
    lim = (1 << (bits - 1)) - 1
    amax = np.abs(X).max(0, keepdims=True)
    scale = f16(np.maximum(amax, 1e-30) / lim)
    scale = np.where(scale == 0, np.float32(6e-8), scale)
    return (np.clip(np.rint(X / scale), -lim, lim) * scale).astype(np.float32)


def scores_q8(Q, X, bits, G, scale):
    """Logits of per-block (G positions, per channel) asymmetric codes scored the way an integer
    kernel would: per block, q' = q * step (the block's per-channel steps) is rounded to int8 with
    one f32 scale per query and block, dotted with the unsigned codes in integers, plus q . min."""
    levels = (1 << bits) - 1
    n, d = X.shape
    out = np.empty((len(Q), n))
    Q64 = Q.astype(np.float64)
    for s in range(0, n, G):
        B = X[s:s + G]
        mn = f16(B.min(0, keepdims=True))
        st = f16(np.maximum(B.max(0, keepdims=True) - mn, 1e-30) / levels)
        st = np.where(st == 0, np.float32(6e-8), st)
        codes = np.clip(np.rint((B - mn) / st), 0, levels)                 # [g, d]
        qs = Q64 * st.astype(np.float64)                                    # [R, d]
        sq = np.maximum(np.abs(qs).max(1, keepdims=True), 1e-30) / 127.0
        q8 = np.rint(qs / sq)
        out[:, s:s + G] = (q8 @ codes.T) * sq + Q64 @ mn.astype(np.float64).T
    return out * scale


def hadamard(d, seed):
    if d & (d - 1):
        Qm, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
        return Qm.astype(np.float32)
    H = np.ones((1, 1))
    while H.shape[0] < d:
        H = np.block([[H, H], [H, -H]])
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=d)
    return ((H * signs[None, :]) / np.sqrt(d)).astype(np.float32)   # x -> x @ R.T = H (signs * x)


def key_code(name, X, bits, seed):
    """Dequantized keys and extra bytes per position (scales/mins/mean), d = X.shape[1]."""
    n, d = X.shape
    mu = X.mean(0, keepdims=True)
    if name == "ch":
        return q_channel(X, bits), 4 * d / n
    if name == "ch-frozen":
        return q_channel(X, bits, frozen=0.5), 4 * d / n
    if name.startswith("g"):
        G = int(name[1:])
        return q_posgroups(X, bits, G), 4 * d / G
    if name.startswith("rot-"):
        R = hadamard(d, seed)
        Y = (X - mu) @ R.T
        inner = name[4:]
        Yq = q_channel(Y, bits) if inner == "ch" else q_posgroups(Y, bits, int(inner[1:]))
        extra = 4 * d / n if inner == "ch" else 4 * d / int(inner[1:])
        return (Yq @ R + mu).astype(np.float32), extra + 4 * d / n
    if name == "tok32":
        return q_token(X, bits, 32), 4 * d / 32
    if name == "tok32-m":
        return q_token(X - mu, bits, 32) + mu, 4 * d / 32 + 4 * d / n
    if name == "sym-ch":
        return q_sym_channel(X, bits), 2 * d / n
    if name == "sym-ch-m":
        return q_sym_channel(X - mu, bits) + mu, 2 * d / n + 4 * d / n
    raise ValueError(name)


def value_code(name, X, bits):
    n, d = X.shape
    if name == "tok":
        return q_token(X, bits, d), 4.0
    if name == "tok32":
        return q_token(X, bits, 32), 4 * d / 32
    if name == "ch":
        return q_channel(X, bits), 4 * d / n
    if name.startswith("g"):
        G = int(name[1:])
        return q_posgroups(X, bits, G), 4 * d / G
    raise ValueError(name)


def value_blockmean(X, G):
    """No per-position value code: the tail takes each position's block mean (f16, G positions)."""
    n, d = X.shape
    out = np.empty_like(X)
    for s in range(0, n, G):
        out[s:s + G] = f16(X[s:s + G].mean(0, keepdims=True))
    return out, 2 * d / G


KEY_SCHEMES = ("ch", "ch-frozen", "g32", "g64", "g128", "rot-ch", "rot-g64", "tok32", "tok32-m", "sym-ch", "sym-ch-m")
VALUE_SCHEMES = ("tok", "tok32", "ch", "g64")


# ---------------------------------------------------------------------------------------------
# measurements

class Scorer:
    """Exact logits, the visible mask, static set and exact top-100 / top-M for one data set."""

    def __init__(self, ds):
        self.ds = ds
        n = ds.n
        R = len(ds.Q)
        self.Z = (ds.Q @ ds.K.T).astype(np.float64) * ds.scale            # [R, N]
        pos = np.arange(n)
        self.valid = pos[None, :] < ds.visible[:, None]
        self.static = self.valid & ((pos[None, :] < SINKS) | (pos[None, :] >= ds.visible[:, None] - WINDOW))
        # the same as index lists: sinks, then the window (positions already among the sinks masked off)
        win = ds.visible[:, None] - WINDOW + np.arange(WINDOW)[None, :]
        self.static_idx = np.concatenate([np.broadcast_to(np.arange(SINKS), (R, SINKS)), np.maximum(win, 0)], axis=1)
        self.static_ok = np.concatenate([np.broadcast_to(np.arange(SINKS) < ds.visible[:, None], (R, SINKS)),
                                         win >= SINKS], axis=1)
        Zm = np.where(self.valid, self.Z, -np.inf)
        self.m = Zm.max(1)
        E = np.exp(Zm - self.m[:, None])
        self.P = E / E.sum(1, keepdims=True)
        self.o = self.P @ ds.V.astype(np.float64)                            # exact outputs [R, d]
        self.onorm = np.linalg.norm(self.o, axis=1)
        self.top100 = np.argpartition(-Zm, 99, axis=1)[:, :100]
        self.mass100 = np.take_along_axis(self.P, self.top100, 1).sum(1)
        # exact top-Mmax outside the static set (for the oracle)
        Zo = np.where(self.valid & ~self.static, self.Z, -np.inf)
        self.oracle_rank, self.oracle_ok = ranked(Zo, max(M_LIST), with_ok=True)
        self.R = R


def ranked(S, k, with_ok=False):
    """Indices of the k largest entries of each row, in descending order (and which are finite)."""
    k = min(k, S.shape[1])
    part = np.argpartition(-S, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(S, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1)
    if with_ok:
        return idx, np.isfinite(np.take_along_axis(vals, order, 1))
    return idx


def recall_curve(sc, Zt):
    """recall@100 of the exact top-100 among the best C by code score, for each C; per row."""
    Zt = np.where(sc.valid, Zt, -np.inf)
    cmax = min(max(C_LIST), sc.ds.n)
    rk = ranked(Zt, cmax)
    # position of each exact top-100 member in the code ranking (cmax if beyond)
    out = {}
    inrank = np.full((sc.R, sc.ds.n), cmax, dtype=np.int32)
    rows = np.arange(sc.R)[:, None]
    inrank[rows, rk] = np.arange(rk.shape[1])[None, :]
    ranks_of_truth = inrank[rows, sc.top100]
    for C in C_LIST:
        if C <= sc.ds.n:
            out[C] = (ranks_of_truth < C).mean(1)
    # the smallest C that holds the whole top-100 / 99 of it (capped at cmax)
    srt = np.sort(ranks_of_truth, axis=1)
    out["c_for_100"] = srt[:, 99] + 1
    out["c_for_99"] = srt[:, 98] + 1
    out["c_for_95"] = srt[:, 94] + 1
    return out


def three_part(sc, Zt, Vt, tail_scores="codes", tail_values="codes", chunk=16):
    """Output errors per row for every M in M_LIST: (method, drop, oracle, oracle+tail).

    Zt: code logits [R, N]; Vt: dequantized values [N, d]. tail_scores/tail_values 'exact' replace
    the tail's code scores/values by the exact ones (to split the error between key and value codes).
    """
    ds = sc.ds
    V = ds.V.astype(np.float64)
    Vt = (V if tail_values == "exact" else Vt.astype(np.float64))
    V32, Vt32 = V.astype(np.float32), Vt.astype(np.float32)
    Zt = sc.Z if tail_scores == "exact" else Zt
    mmax = max(M_LIST)
    cand, cand_ok = ranked(np.where(sc.valid & ~sc.static, Zt, -np.inf), mmax, with_ok=True)
    res = {k: np.empty((sc.R, len(M_LIST))) for k in ("method", "drop", "oracle", "oracle_tail")}
    for s in range(0, sc.R, chunk):
        r = slice(s, min(s + chunk, sc.R))
        Z, Zc, valid, static = sc.Z[r], Zt[r], sc.valid[r], sc.static[r]
        m = np.maximum(np.where(valid, Z, -np.inf).max(1), np.where(valid, Zc, -np.inf).max(1))[:, None]
        Ee = np.where(valid, np.exp(np.minimum(Z - m, 0)), 0.0)       # exact weights
        Et = np.where(valid, np.exp(np.minimum(Zc - m, 0)), 0.0)      # code weights
        # tail everywhere from codes, then swap in exact for the selected positions
        A_all = (Et.astype(np.float32) @ Vt32).astype(np.float64)
        B_all = Et.sum(1)
        si, sok = sc.static_idx[r], sc.static_ok[r]
        rows = np.arange(si.shape[0])[:, None]
        es = np.where(sok, Ee[rows, si], 0.0)
        ts = np.where(sok, Et[rows, si], 0.0)
        A_stat_ex = np.einsum("cs,csd->cd", es, V[si])
        B_stat_ex = es.sum(1)
        A_stat_code = np.einsum("cs,csd->cd", ts, Vt[si])
        B_stat_code = ts.sum(1)
        o = sc.o[r]
        on = sc.onorm[r]
        for sel_name, rank_all, ok_all in (("method", cand, cand_ok), ("oracle", sc.oracle_rank, sc.oracle_ok)):
            rank, ok = rank_all[r], ok_all[r]
            rows = np.arange(rank.shape[0])[:, None]
            ee = np.where(ok, Ee[rows, rank], 0.0)                        # [c, mmax]
            et = np.where(ok, Et[rows, rank], 0.0)
            # segment sums between consecutive M (one batched matmul each), then prefix sums over M
            mm = rank.shape[1]
            bounds = [min(M, mm) for M in M_LIST]
            segs = np.zeros((len(M_LIST), mm))
            prev = 0
            for j, M in enumerate(bounds):
                segs[j, prev:M] = 1.0
                prev = max(prev, M)
            segs32 = segs.astype(np.float32)[None]
            exAs = np.cumsum(((ee.astype(np.float32)[:, None, :] * segs32) @ V32[rank]).astype(np.float64), axis=1)
            coAs = np.cumsum(((et.astype(np.float32)[:, None, :] * segs32) @ Vt32[rank]).astype(np.float64), axis=1)
            exBs = np.cumsum(ee @ segs.T, axis=1)                                      # [c, nM]
            coBs = np.cumsum(et @ segs.T, axis=1)
            for j, M in enumerate(M_LIST):
                exA, exB, coA, coB = exAs[:, j], exBs[:, j], coAs[:, j], coBs[:, j]
                # with the code tail: all codes - (static + selected) codes + (static + selected) exact
                A = A_all - A_stat_code - coA + A_stat_ex + exA
                B = B_all - B_stat_code - coB + B_stat_ex + exB
                err_tail = np.linalg.norm(A / B[:, None] - o, axis=1) / on
                Ad = A_stat_ex + exA
                Bd = B_stat_ex + exB
                err_drop = np.linalg.norm(Ad / Bd[:, None] - o, axis=1) / on
                if sel_name == "method":
                    res["method"][r, j] = err_tail
                    res["drop"][r, j] = err_drop
                else:
                    res["oracle_tail"][r, j] = err_tail
                    res["oracle"][r, j] = err_drop
    return res


def med(x):
    return float(np.median(x))


def summarize_rows(x, heads):
    """median and p90 over all rows, and the median per query head."""
    out = {"median": med(x), "p10": float(np.percentile(x, 10)), "p90": float(np.percentile(x, 90))}
    hs = np.unique(heads)
    if len(hs) > 1:
        out["per_head_median"] = [med(x[heads == h]) for h in hs]
    return out


def study(ds, args, log):
    t0 = time.time()
    sc = Scorer(ds)
    d = ds.d
    f16_bytes = 4 * d
    log(f"{ds.name}: N {ds.n}, d {d}, {sc.R} query rows, scale {ds.scale:.4f}, causal {ds.causal}; "
        f"exact top-100 mass median {med(sc.mass100):.3f} ({time.time() - t0:.1f} s)")
    out = {"name": ds.name, "n": ds.n, "d": d, "rows": sc.R, "kind": ds.kind, "causal": ds.causal,
           "scale": ds.scale, "source_dtype": ds.source_dtype,
           "top100_mass": summarize_rows(sc.mass100, ds.head), "f16_kv_bytes_per_position": f16_bytes,
           "keys": {}, "values": {}, "grid": {}, "split": {}}

    # exact-score M sweep without codes (oracle, dropped tail), for reference
    key_cache = {}
    for bits in args.key_bits:
        for scheme in args.key_schemes:
            name = f"K{bits}-{scheme}"
            t = time.time()
            q8 = scheme.endswith("-q8")
            Kt, extra = key_code(scheme[:-3] if q8 else scheme, ds.K, bits, args.seed)
            Zt = (scores_q8(ds.Q, ds.K, bits, int(scheme[1:-3]), ds.scale) if q8
                  else (ds.Q @ Kt.T).astype(np.float64) * ds.scale)
            rc = recall_curve(sc, Zt)
            rel = np.linalg.norm(Kt - ds.K) / np.linalg.norm(ds.K - ds.K.mean(0))
            entry = {"bits": bits, "scheme": scheme, "bytes_per_position": bits * d / 8 + extra,
                     "key_rel_error": float(rel),
                     "logit_rmse": float(np.sqrt(np.mean(np.where(sc.valid, Zt - sc.Z, 0) ** 2) /
                                                 sc.valid.mean())),
                     "recall": {str(C): summarize_rows(v, ds.head) for C, v in rc.items()
                                if not isinstance(C, str)},
                     "c_for_100": summarize_rows(rc["c_for_100"], ds.head),
                     "c_for_99": summarize_rows(rc["c_for_99"], ds.head),
                     "c_for_95": summarize_rows(rc["c_for_95"], ds.head),
                     "recall_min_over_rows": {str(C): float(v.min()) for C, v in rc.items() if not isinstance(C, str)}}
            out["keys"][name] = entry
            if bits in args.error_key_bits and scheme in args.error_key_schemes:
                key_cache[name] = (Kt, Zt if q8 else None)
            log(f"  {name:14s} {entry['bytes_per_position']:6.1f} B/pos  recall@C=400 "
                f"{entry['recall']['400']['median']:.3f}  C for 99/100: {entry['c_for_99']['median']:.0f}  "
                f"({time.time() - t:.1f} s)")

    # value codes: bytes and reconstruction error
    val_cache = {}
    vlist = [(b, sch) for b in args.value_bits for sch in args.value_schemes if not sch.startswith("mean")]
    vlist += [(0, sch) for sch in args.value_schemes if sch.startswith("mean")]
    for bits, scheme in vlist:
            name = f"V{bits}-{scheme}" if bits else f"V-{scheme}"
            Vt, extra = value_code(scheme, ds.V, bits) if bits else value_blockmean(ds.V, int(scheme[4:]))
            val_cache[name] = (Vt, extra)
            out["values"][name] = {"bits": bits, "scheme": scheme, "bytes_per_position": bits * d / 8 + extra,
                                   "value_rel_error": float(np.linalg.norm(Vt - ds.V) / np.linalg.norm(ds.V))}

    def run(kname, vname, **kw):
        t = time.time()
        Kt, Zq = key_cache[kname]
        Zt = Zq if Zq is not None else (ds.Q @ Kt.T).astype(np.float64) * ds.scale
        Vt, vextra = val_cache[vname]
        res = three_part(sc, Zt, Vt, **kw)
        entry = {"bytes_per_position": out["keys"][kname]["bytes_per_position"] +
                 out["values"][vname]["bytes_per_position"]}
        entry["bytes_ratio_to_f16_kv"] = entry["bytes_per_position"] / f16_bytes
        for what, arr in res.items():
            entry[what] = {str(M): summarize_rows(arr[:, j], ds.head) for j, M in enumerate(M_LIST)}
        log(f"  {kname}+{vname} {kw or ''}: err M=256 method {entry['method']['256']['median']:.4f} "
            f"drop {entry['drop']['256']['median']:.4f} oracle {entry['oracle']['256']['median']:.4f} "
            f"({time.time() - t:.1f} s)")
        return entry

    base_v = args.base_value
    base_k = args.base_key
    for kname in key_cache:
        out["grid"][f"{kname}+{base_v}"] = run(kname, base_v)
    for vname in val_cache:
        key = f"{base_k}+{vname}"
        if key not in out["grid"]:
            out["grid"][key] = run(base_k, vname)
    for extra_pair in args.pairs:
        kname, vname = extra_pair.split("+")
        if vname not in val_cache and not vname.startswith("V-"):
            b, sch = vname[1:].split("-", 1)
            val_cache[vname] = value_code(sch, ds.V, int(b))
            out["values"][vname] = {"bits": int(b), "scheme": sch,
                                    "bytes_per_position": int(b) * d / 8 + val_cache[vname][1],
                                    "value_rel_error": float(np.linalg.norm(val_cache[vname][0] - ds.V) / np.linalg.norm(ds.V))}
        if extra_pair not in out["grid"] and kname in key_cache and vname in val_cache:
            out["grid"][extra_pair] = run(kname, vname)
    # GQA: the exact rows a group fetches = the union of its query heads' top-M (capture sets)
    if len(np.unique(ds.head)) > 1:
        Kt, Zq = key_cache[base_k]
        Zt = Zq if Zq is not None else (ds.Q @ Kt.T).astype(np.float64) * ds.scale
        Zt = np.where(sc.valid & ~sc.static, Zt, -np.inf)
        g = len(np.unique(ds.head))
        cand = ranked(Zt, max(M_LIST))
        union = {}
        for M in M_LIST[1:]:
            sizes = [len(np.unique(cand[i:i + g, :M])) for i in range(0, sc.R, g)]
            union[str(M)] = {"median": med(sizes), "ratio_to_M": med(sizes) / M}
        out["gqa_union"] = union
        log("  GQA union of the heads' top-M / M: " + ", ".join(f"M={m}: {v['ratio_to_M']:.2f}" for m, v in union.items()))
    # where does the error come from: exact tail scores (value codes only) / exact tail values (key codes only)
    out["split"]["exact_tail_scores"] = run(base_k, base_v, tail_scores="exact")
    out["split"]["exact_tail_values"] = run(base_k, base_v, tail_values="exact")
    out["seconds"] = time.time() - t0
    return out


# ---------------------------------------------------------------------------------------------
# report

def report(results, m_sweep=("K4-g64+V4-tok",), file=sys.stdout):
    """Markdown tables: data sets, key codes (recall, C), output error by key code and by value code,
    error against M (whole set and per query head), where the error comes from, GQA union."""
    p = lambda *x: print(*x, file=file)
    names = [r["name"] for r in results]
    head = lambda first: p(f"| {first} | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))

    def cell(r, path, fmt):
        x = r
        for k in path:
            if not isinstance(x, dict) or k not in x:
                return "-"
            x = x[k]
        return fmt.format(x)

    def bytes_cell(path):
        """bytes per position at the largest N of each d (d 256 / d 128)"""
        out = []
        for d in sorted({r["d"] for r in results}, reverse=True):
            rs = [r for r in results if r["d"] == d and path[1] in r[path[0]]]
            if rs:
                r = max(rs, key=lambda r: r["n"])
                out.append(f"{r[path[0]][path[1]]['bytes_per_position']:.0f}")
        return " / ".join(out)

    p("### Data sets\n")
    p("| set | N | d | query rows | causal | exact top-100 mass: median / p10 | f16 K+V bytes/position |")
    p("|---|---|---|---|---|---|---|")
    for r in results:
        tm = r["top100_mass"]
        p(f"| {r['name']} | {r['n']} | {r['d']} | {r['rows']} | {'yes' if r['causal'] else 'no'} | "
          f"{tm['median']:.3f} / {tm.get('p10', float('nan')):.3f} | {r['f16_kv_bytes_per_position']} |")

    allkeys = list(dict.fromkeys(k for r in results for k in r["keys"]))
    p("\n### Key codes: candidates C that hold 99 of the exact top-100 (median / p90 over query rows, capped at 6401)\n")
    p("Bytes per position: codes + their scales (d 256 / d 128).\n")
    p("| key code | bytes/pos | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for k in allkeys:
        p(f"| {k} | {bytes_cell(('keys', k))} | " + " | ".join(
            f"{r['keys'][k]['c_for_99']['median']:.0f} / {r['keys'][k]['c_for_99']['p90']:.0f}" if k in r["keys"] else "-"
            for r in results) + " |")
    for C in ("200", "400"):
        p(f"\n### Key codes: recall@100 with C = {C} candidates re-scored exactly (median over query rows)\n")
        head("key code")
        for k in allkeys:
            p(f"| {k} | " + " | ".join(cell(r, ("keys", k, "recall", C, "median"), "{:.3f}") for r in results) + " |")

    grid = list(dict.fromkeys(g for r in results for g in r["grid"]))
    for M in ("128", "256", "512"):
        p(f"\n### Output error of the three-part method at M = {M} (median / p90 over query rows)\n")
        p("| keys + values | bytes/pos | x f16 K+V | " + " | ".join(names) + " |\n|---|---|---|" + "---|" * len(names))
        for g in grid:
            r0 = next(r for r in results if g in r["grid"])
            p(f"| {g} | {bytes_cell(('grid', g))} | {r0['grid'][g]['bytes_ratio_to_f16_kv']:.3f} | " + " | ".join(
                f"{r['grid'][g]['method'][M]['median']:.4f} / {r['grid'][g]['method'][M]['p90']:.3f}" if g in r["grid"] else "-"
                for r in results) + " |")

    for pair in m_sweep:
        p(f"\n### {pair}: output error against M (median over query rows)\n")
        p("Per set: the three-part method (code tail) / the same with the tail dropped / the exact top-M "
          "with the tail dropped (oracle) / the exact top-M with the code tail.\n")
        p("| set | " + " | ".join(f"M={m}" for m in M_LIST) + " |\n|---|" + "---|" * len(M_LIST))
        for r in results:
            if pair not in r["grid"]:
                continue
            g = r["grid"][pair]
            p(f"| {r['name']} | " + " | ".join(
                f"{g['method'][str(m)]['median']:.4f} / {g['drop'][str(m)]['median']:.3f} / "
                f"{g['oracle'][str(m)]['median']:.3f} / {g['oracle_tail'][str(m)]['median']:.4f}" for m in M_LIST) + " |")
        p(f"\n{pair}, three-part method: median / p90 over query rows\n")
        p("| set | " + " | ".join(f"M={m}" for m in M_LIST) + " |\n|---|" + "---|" * len(M_LIST))
        for r in results:
            if pair in r["grid"]:
                g = r["grid"][pair]["method"]
                p(f"| {r['name']} | " + " | ".join(f"{g[str(m)]['median']:.4f} / {g[str(m)]['p90']:.4f}" for m in M_LIST) + " |")
        p(f"\n{pair}, three-part method, per query head (median over decode positions; capture sets):\n")
        p("| set, head | " + " | ".join(f"M={m}" for m in M_LIST) + " |\n|---|" + "---|" * len(M_LIST))
        for r in results:
            if pair not in r["grid"] or "per_head_median" not in r["grid"][pair]["method"]["0"]:
                continue
            g = r["grid"][pair]["method"]
            for h in range(len(g["0"]["per_head_median"])):
                mass = r["top100_mass"]["per_head_median"][h]
                p(f"| {r['name']} h{h} (top-100 mass {mass:.2f}) | " + " | ".join(
                    f"{g[str(m)]['per_head_median'][h]:.4f}" for m in M_LIST) + " |")

    p("\n### Where the error comes from (base pair, three-part method, median): code tail / exact tail scores (value codes only) / exact tail values (key codes only)\n")
    p("| set | " + " | ".join(f"M={m}" for m in M_LIST) + " |\n|---|" + "---|" * len(M_LIST))
    for r in results:
        if "exact_tail_scores" not in r.get("split", {}):
            continue
        base = next((g for g in r["grid"] if g.startswith("K4-g64+V4-tok")), None)
        es, ev = r["split"]["exact_tail_scores"]["method"], r["split"]["exact_tail_values"]["method"]
        p(f"| {r['name']} | " + " | ".join(
            (f"{r['grid'][base]['method'][str(m)]['median']:.4f}" if base else "-") +
            f" / {es[str(m)]['median']:.4f} / {ev[str(m)]['median']:.4f}" for m in M_LIST) + " |")

    if any("gqa_union" in r for r in results):
        p("\n### GQA: distinct positions in the union of a group's 4 query heads' top-M (median), as a multiple of M\n")
        ms = [m for m in M_LIST[1:]]
        p("| set | " + " | ".join(f"M={m}" for m in ms) + " |\n|---|" + "---|" * len(ms))
        for r in results:
            if "gqa_union" in r:
                p(f"| {r['name']} | " + " | ".join(f"{r['gqa_union'][str(m)]['ratio_to_M']:.2f}" for m in ms) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=SPEC",
                    help="a data set: NAME=FOLDER (synthetic) or NAME=CAPTURE_FOLDER:LAYER; repeatable")
    ap.add_argument("--out", help="results JSON (appends/replaces the sets by name if it exists)")
    ap.add_argument("--report", nargs="*", help="print the markdown tables of these results JSON files and exit")
    ap.add_argument("--max-rows", type=int, default=256, help="synthetic: decode queries used (evenly spaced; 256)")
    ap.add_argument("--max-positions", type=int, default=128,
                    help="capture: decode positions used (evenly spaced; x 4 query heads; default 128)")
    ap.add_argument("--key-bits", default="2,4,8")
    ap.add_argument("--key-schemes", default=",".join(KEY_SCHEMES))
    ap.add_argument("--value-bits", default="2,4,8")
    ap.add_argument("--value-schemes", default=",".join(VALUE_SCHEMES))
    ap.add_argument("--error-key-bits", default="4",
                    help="key code widths whose output error is measured (with --base-value; default 4)")
    ap.add_argument("--error-key-schemes", default="ch,ch-frozen,g32,g64,g128,rot-ch,rot-g64,tok32-m")
    ap.add_argument("--base-key", default="K4-g64", help="key code paired with every value code")
    ap.add_argument("--base-value", default="V4-tok", help="value code paired with every key code")
    ap.add_argument("--pairs", default="", help="more KEY+VALUE pairs, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refresh-mass", action="store_true",
                    help="only recompute the exact top-100 mass summaries of the sets already in --out")
    ap.add_argument("--markdown", action="store_true", help="print the tables at the end")
    ap.add_argument("--m-sweep", default="K4-g64+V4-tok", help="pairs whose error-vs-M tables are printed (comma-separated)")
    ap.add_argument("--only", help="with --report: these sets, in this order (comma-separated names)")
    a = ap.parse_args()
    if a.report is not None:
        res = []
        for f in a.report:
            with open(f) as fh:
                res += json.load(fh)["sets"]
        if a.only:
            keep = a.only.split(",")
            res = [r for r in res if r["name"] in keep]
            res.sort(key=lambda r: keep.index(r["name"]))
        report(res, m_sweep=a.m_sweep.split(","))
        return
    a.key_bits = [int(x) for x in a.key_bits.split(",")]
    a.value_bits = [int(x) for x in a.value_bits.split(",")]
    a.error_key_bits = [int(x) for x in a.error_key_bits.split(",")]
    a.key_schemes = a.key_schemes.split(",")
    a.value_schemes = a.value_schemes.split(",")
    a.error_key_schemes = a.error_key_schemes.split(",")
    a.pairs = [x for x in a.pairs.split(",") if x]
    extra_k = {p.split("+")[0] for p in a.pairs} | {a.base_key}
    for kname in extra_k:  # make sure paired key codes are kept
        b, s = kname[1:].split("-", 1)
        if int(b) not in a.error_key_bits:
            a.error_key_bits.append(int(b))
        if s not in a.error_key_schemes:
            a.error_key_schemes.append(s)
    log = lambda *x: print(*x, file=sys.stderr, flush=True)
    if a.refresh_mass:
        # recompute only the exact top-100 mass summaries of the sets in --out (same rows as the study)
        with open(a.out) as f:
            doc = json.load(f)
        for r in doc["sets"]:
            ds = DataSet(r["name"], r["spec"], a.max_rows, a.max_positions)
            assert len(ds.Q) == r["rows"], (r["name"], len(ds.Q), r["rows"])
            r["top100_mass"] = summarize_rows(Scorer(ds).mass100, ds.head)
            log(f"{r['name']}: top-100 mass {r['top100_mass']['median']:.3f} / p10 {r['top100_mass']['p10']:.3f}")
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
        return
    results = []
    if a.out and os.path.exists(a.out):
        with open(a.out) as f:
            results = json.load(f)["sets"]
    for spec in a.set:
        name, path = spec.split("=", 1)
        ds = DataSet(name, path, a.max_rows, a.max_positions)
        r = study(ds, a, log)
        r["spec"] = path
        results = [x for x in results if x["name"] != name] + [r]
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"argv": sys.argv[1:], "numpy": np.__version__, "sets": results}, f, indent=1)
    if a.markdown:
        report(results, m_sweep=a.m_sweep.split(","))


if __name__ == "__main__":
    main()
