#!/usr/bin/env python3
"""Deterministic generator of LLM-like attention data (keys, values, queries) for KVRecall.

Writes float32 .npy files into an output directory:

  keys.npy             (N, d)   the KV cache keys, in sequence order
  values.npy           (N, d)   the matching values
  prefill_queries.npy  (P, d)   queries from the prefill phase (same distribution as decode queries);
                                a query-aware index (RetrievalAttention / RoarGraph) is built from these
  queries.npy          (Q, d)   decode queries: OUT of the key distribution; what every index is judged on
  key_queries.npy      (H, d)   held-out keys (removed from keys.npy) used as IN-distribution queries
  meta.json                     parameters, the recipe, and measured statistics (self-check)

and, with --f16, float16 copies `*_f16.npy` of keys/values/queries.

Only numpy is needed. `--check-hnsw` additionally measures hnswlib recall@10 if hnswlib is importable.

Recipe (why it is hard for key-only ANN, see DESIGN.md sections 1 and 7 and Tools/bench/README.md):

* A low-rank latent is shared by keys and queries. Key i belongs to a "topic" (the sequence is cut into
  segments of geometric length, mean --segment tokens, each segment draws one of --topics topics, so topics
  recur along the sequence). Its key is

      k_i = R a_i + S b_i + drift(i) + m_k

  R (d x r) and S (d x (d-r)) are complementary orthonormal bases of a random rotation. The latent a_i =
  A_t + within-topic noise (std --rel-within, large) lives in the r-dim subspace that queries read; b_i =
  B_t + noise lives in the (d-r)-dim rest and makes the topics well separated clusters in key space.
  drift(i) is a smooth positional drift (a few slow sinusoids along random directions). m_k is a large
  common offset that sits in a few high-magnitude channels (--outlier-channels, total norm --key-offset,
  with per-token magnitude jitter), as in real LLM keys.
* A query is q = R G w + m_q: w is drawn like a key latent (topic of a random position, plus noise) but
  mapped by a DIFFERENT linear map G (r x r), and m_q is a large common offset orthogonal to m_k.
  So q.k ranks keys through (G w).a_i (query specific) plus m_q.(S b_i) (a topic-level prior shared by all
  queries, which is what lets clustering indexes work), while in L2 and in key-key inner product the
  queries are nowhere near the key cloud.
* Key-only graphs fail: the key-key inner products that build an HNSW graph (IP metric) are dominated by
  the huge common offset m_k, so the graph links every key to the same few hub keys along m_k and the
  query-relevant keys are not graph neighbours of each other; greedy/beam search stalls. Clustering
  indexes (IVF, spherical k-means on key directions) still find the relevant topics by centroid score.
  CAVEAT: subtracting the key mean (which leaves every query's IP ranking unchanged) removes the hubs and
  HNSW then works (recall@10 ~0.96 at ef 1024). For data that stays hard for every key-only index, even
  centred, use --outlier-jitter 0.3 --query-reads-outliers 0 (IVF then fails too). See Tools/bench/README.md.
* Each query is rescaled so the std over keys of its scaled logits q.k/sqrt(d) equals --sharpness.
  Sharp (default 7.0): exact top-100 holds ~98% of the softmax mass. Soft (e.g. 2.0): diffuse heads.
  Named presets: --sharpness sharp (7.0), medium (4.0), soft (2.0).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

SHARPNESS_PRESETS = {"sharp": 7.0, "medium": 4.0, "soft": 2.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created); keep it out of the repo "
                   "or in a git-ignored folder such as Tools/bench/out/")
    p.add_argument("--n", type=int, default=131072, help="number of keys (default 131072)")
    p.add_argument("--d", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--queries", type=int, default=1000, help="decode queries (default 1000)")
    p.add_argument("--prefill", type=int, default=4096, help="prefill queries (default 4096)")
    p.add_argument("--key-queries", type=int, default=1000, help="held-out keys used as queries (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sharpness", default="sharp",
                   help="std of the scaled logits q.k/sqrt(d) per query, or a preset: "
                        + ", ".join(f"{k}={v}" for k, v in SHARPNESS_PRESETS.items()) + " (default sharp)")
    p.add_argument("--sharpness-jitter", type=float, default=0.0,
                   help="log-normal sigma of a per-query sharpness factor (default 0: all queries equal)")
    p.add_argument("--rank", type=int, default=16, help="rank r of the shared latent (default 16)")
    p.add_argument("--topics", type=int, default=512, help="number of topics / key clusters (default 512)")
    p.add_argument("--segment", type=float, default=128.0, help="mean segment length in tokens (default 128)")
    p.add_argument("--rel-between", type=float, default=1.0, help="std of topic means in the latent (1.0)")
    p.add_argument("--rel-within", type=float, default=4.0,
                   help="std of the latent within a topic (4.0); larger spreads a query's top keys over "
                        "more clusters and makes IVF scan more")
    p.add_argument("--irr-between", type=float, default=3.0, help="std of topic means in the other dims (3.0)")
    p.add_argument("--irr-within", type=float, default=1.0, help="std within a topic in the other dims (1.0)")
    p.add_argument("--outlier-channels", type=int, default=4, help="high-magnitude key channels (default 4)")
    p.add_argument("--key-offset", type=float, default=200.0,
                   help="norm of the common key offset carried by the outlier channels (default 200, "
                        "in units where the rest of a key has norm ~40); larger makes key-only HNSW worse")
    p.add_argument("--outlier-jitter", type=float, default=0.05,
                   help="relative per-token jitter of the outlier channel magnitudes (default 0.05)")
    p.add_argument("--query-offset", type=float, default=20.0,
                   help="norm of the common query offset, orthogonal to the key offset (default 20)")
    p.add_argument("--irr-scale-sigma", type=float, default=0.0,
                   help="log-normal sigma of a per-key scale on the non-latent part (default 0)")
    p.add_argument("--query-reads-outliers", type=float, default=1.0,
                   help="factor on the query components in the outlier channels (default 1; 0 = queries "
                        "ignore the outlier channels)")
    p.add_argument("--drift", type=float, default=1.0, help="positional drift amplitude (default 1.0)")
    p.add_argument("--f16", action="store_true", help="also write float16 copies (*_f16.npy)")
    p.add_argument("--stats-queries", type=int, default=200,
                   help="decode queries used for the measured statistics (default 200)")
    p.add_argument("--check-ivf", action="store_true",
                   help="also run a numpy spherical k-means IVF (nlist ~ 4 sqrt(N)) and report recall@100 "
                        "against the fraction of keys scanned (a few seconds at 131072 x 128)")
    p.add_argument("--check-hnsw", action="store_true",
                   help="also build an hnswlib index (IP, M=16, efC=200) and report recall@10 at ef 1024 "
                        "for decode queries and held-out keys (needs hnswlib; ~20 s at 131072 x 128)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if isinstance(a.sharpness, str) and a.sharpness in SHARPNESS_PRESETS:
        a.sharpness = SHARPNESS_PRESETS[a.sharpness]
    else:
        try:
            a.sharpness = float(a.sharpness)
        except ValueError:
            p.error(f"--sharpness: a number or one of {', '.join(SHARPNESS_PRESETS)}")
    if a.rank >= a.d:
        p.error("--rank must be smaller than --d")
    if a.outlier_channels >= a.d:
        p.error("--outlier-channels must be smaller than --d")
    return a


def generate(a):
    """Returns dict of float32 arrays and a dict of generation facts. Deterministic in a.seed."""
    rng = np.random.default_rng(a.seed)
    d, r, C = a.d, a.rank, a.topics
    ntot = a.n + a.key_queries  # held-out keys are drawn from the same sequence

    # Random rotation split into the query-read latent subspace R and the rest S.
    U, _ = np.linalg.qr(rng.standard_normal((d, d)))
    R, S = U[:, :r], U[:, r:]

    # Topics along the sequence: segments of geometric length, each draws a topic.
    p_end = 1.0 / max(a.segment, 1.0)
    lens = rng.geometric(p_end, size=int(ntot * p_end * 2) + 16)
    while lens.sum() < ntot:  # extremely unlikely; keeps determinism either way
        lens = np.concatenate([lens, rng.geometric(p_end, size=len(lens))])
    ends = np.cumsum(lens)
    nseg = int(np.searchsorted(ends, ntot - 1, side="right")) + 1
    seg_topic = rng.integers(0, C, size=nseg)
    pos = np.arange(ntot)
    topic = seg_topic[np.searchsorted(ends, pos, side="right")]

    A = rng.standard_normal((C, r)) * a.rel_between          # topic means in the latent
    B = rng.standard_normal((C, d - r)) * a.irr_between      # topic means in the other dims
    lat = (A[topic] + rng.standard_normal((ntot, r)) * a.rel_within).astype(np.float32)
    oth = rng.standard_normal((ntot, d - r)) * a.irr_within
    if a.irr_scale_sigma > 0:
        oth *= np.exp(a.irr_scale_sigma * rng.standard_normal((ntot, 1)))
    oth = (B[topic] + oth).astype(np.float32)
    K = lat @ R.T.astype(np.float32) + oth @ S.T.astype(np.float32)

    # Smooth positional drift: a few slow sinusoids along random directions.
    nd = 4
    ddirs = rng.standard_normal((nd, d))
    ddirs /= np.linalg.norm(ddirs, axis=1, keepdims=True)
    periods = rng.uniform(ntot / 8.0, ntot * 2.0, size=nd)
    phases = rng.uniform(0, 2 * np.pi, size=nd)
    wave = np.sin(2 * np.pi * pos[:, None] / periods[None, :] + phases[None, :]).astype(np.float32)
    K += (a.drift * np.sqrt(d)) * (wave @ ddirs.astype(np.float32))

    # Large common key offset carried by a few high-magnitude channels, with per-token jitter.
    ch = np.sort(rng.choice(d, size=a.outlier_channels, replace=False))
    signs = rng.choice([-1.0, 1.0], size=a.outlier_channels)
    per_ch = a.key_offset / np.sqrt(max(a.outlier_channels, 1))
    mk = np.zeros(d)
    mk[ch] = signs * per_ch
    if a.outlier_channels:
        jit = 1.0 + a.outlier_jitter * rng.standard_normal((ntot, a.outlier_channels))
        K[:, ch] += (signs * per_ch)[None, :].astype(np.float32) * jit.astype(np.float32)

    # Values: topic-dependent mean plus noise (so attention outputs differ between topics).
    Vt = rng.standard_normal((C, d)).astype(np.float32)
    V = Vt[topic] + rng.standard_normal((ntot, d)).astype(np.float32)

    # Held-out keys (in-distribution queries).
    perm = rng.permutation(ntot)
    hold = np.sort(perm[: a.key_queries])
    keep = np.sort(perm[a.key_queries:])

    # Queries: a DIFFERENT linear map G of a latent drawn like a key's, plus a common offset orthogonal
    # to the key offset.
    G = rng.standard_normal((r, r)) / np.sqrt(r)
    mq = rng.standard_normal(d)
    mk_unit = mk / (np.linalg.norm(mk) or 1.0)
    mq -= (mq @ mk_unit) * mk_unit
    mq *= a.query_offset / np.linalg.norm(mq)

    def make_queries(nq):
        src = rng.integers(0, ntot, size=nq)  # topic of a random position of the sequence
        w = A[topic[src]] + rng.standard_normal((nq, r)) * a.rel_within
        q = (w @ G.T) @ R.T + mq[None, :]
        q[:, ch] *= a.query_reads_outliers
        return q

    Qp = make_queries(a.prefill)
    Qd = make_queries(a.queries)

    Kf = np.ascontiguousarray(K[keep])
    # Calibrate sharpness: per-query std of q.k/sqrt(d) over a fixed key sample.
    samp = Kf[np.linspace(0, len(Kf) - 1, num=min(len(Kf), 8192)).astype(np.int64)].astype(np.float64)

    def calibrate(Q):
        if len(Q) == 0:
            return Q.astype(np.float32)
        sd = (Q @ samp.T).std(axis=1) / np.sqrt(d)
        target = np.full(len(Q), a.sharpness)
        if a.sharpness_jitter > 0:
            target = target * np.exp(a.sharpness_jitter * rng.standard_normal(len(Q)))
        return (Q * (target / sd)[:, None]).astype(np.float32)

    out = {
        "keys": Kf,
        "values": np.ascontiguousarray(V[keep]),
        "prefill_queries": calibrate(Qp),
        "queries": calibrate(Qd),
        "key_queries": np.ascontiguousarray(K[hold]),
    }
    facts = {
        "outlier_channels": ch.tolist(),
        "segments": int(nseg),
        "heldout_positions_first10": hold[:10].tolist(),
        "key_positions": "keys.npy row i is sequence position keep[i]; held-out positions removed",
    }
    return out, facts


def topk_rows(Q, K, k, block=256, with_mass=True):
    """Exact top-k indices (sorted by score, descending) and the softmax mass they hold, numpy only."""
    d = K.shape[1]
    idx = np.empty((len(Q), k), dtype=np.int64)
    mass = np.empty(len(Q))
    mass10 = np.empty(len(Q))
    for s in range(0, len(Q), block):
        sc = Q[s:s + block] @ K.T
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(sc, part, axis=1)
        order = np.argsort(-ps, axis=1)
        idx[s:s + block] = np.take_along_axis(part, order, axis=1)
        if not with_mass:
            continue
        z = sc.astype(np.float64) / np.sqrt(d)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        tot = e.sum(axis=1)
        top = np.take_along_axis(e, idx[s:s + block], axis=1)
        mass[s:s + block] = top.sum(axis=1) / tot
        mass10[s:s + block] = top[:, :10].sum(axis=1) / tot
    return idx, mass, mass10


def recall(found, truth, k):
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def spherical_kmeans(X, nlist, iters, rng):
    """Minimal spherical k-means (as faiss IVF with the IP metric trains: unit centroids, max-IP assign)."""
    C = X[rng.choice(len(X), size=nlist, replace=False)].astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    for _ in range(iters):
        asg = np.argmax(X @ C.T, axis=1)
        S = np.zeros_like(C)
        np.add.at(S, asg, X)
        nz = np.linalg.norm(S, axis=1)
        empty = nz == 0
        S[empty] = X[rng.choice(len(X), size=int(empty.sum()), replace=False)]
        C = S / np.linalg.norm(S, axis=1, keepdims=True)
    asg = np.argmax(X @ C.T, axis=1)
    return C, asg


def ivf_check(K, Q, truth100, seed):
    rng = np.random.default_rng(seed + 1)
    nlist = int(round(4 * np.sqrt(len(K))))
    C, asg = spherical_kmeans(K, nlist, iters=10, rng=rng)
    sizes = np.bincount(asg, minlength=nlist)
    lists = [np.flatnonzero(asg == c) for c in range(nlist)]
    rows = []
    for frac_probe in (1 / 128, 1 / 32, 1 / 16, 1 / 8, 1 / 4):
        nprobe = max(1, int(round(nlist * frac_probe)))
        cs = Q @ C.T
        probe = np.argpartition(-cs, nprobe - 1, axis=1)[:, :nprobe]
        rec, scanned = [], []
        for qi in range(len(Q)):
            cand = np.concatenate([lists[c] for c in probe[qi]])
            scanned.append(len(cand) / len(K))
            s = K[cand] @ Q[qi]
            top = cand[np.argsort(-s)[:100]]
            rec.append(len(set(top.tolist()) & set(truth100[qi].tolist())) / 100)
        rows.append({"nprobe": nprobe, "scanned_fraction": float(np.mean(scanned)),
                     "recall_at_100": float(np.mean(rec))})
    return {"nlist": nlist, "kmeans": "spherical, 10 iterations, numpy", "curve": rows}


def hnsw_check(K, Qs, threads=2):
    import hnswlib  # optional
    p = hnswlib.Index(space="ip", dim=K.shape[1])
    p.init_index(max_elements=len(K), ef_construction=200, M=16, random_seed=1)
    p.set_num_threads(threads)
    p.add_items(K)
    out = {"library": "hnswlib", "M": 16, "ef_construction": 200}
    for ef in (128, 1024):
        p.set_ef(ef)
        for name, (Q, truth) in Qs.items():
            I, _ = p.knn_query(Q, k=10)
            out[f"{name}_recall_at_10_ef{ef}"] = recall(I, truth, 10)
    return out


def main(argv=None):
    a = parse_args(argv)
    log = (lambda *x: None) if a.quiet else (lambda *x: print(*x, file=sys.stderr, flush=True))
    t0 = time.time()
    arrays, facts = generate(a)
    t_gen = time.time() - t0
    os.makedirs(a.out, exist_ok=True)
    for name, arr in arrays.items():
        np.save(os.path.join(a.out, f"{name}.npy"), arr.astype(np.float32, copy=False))
        if a.f16 and name in ("keys", "values", "queries", "prefill_queries", "key_queries"):
            np.save(os.path.join(a.out, f"{name}_f16.npy"), arr.astype(np.float16))
    t_write = time.time() - t0 - t_gen
    log(f"generated {a.n} x {a.d} in {t_gen:.2f} s (written in {t_write:.2f} s) -> {a.out}")

    # ---- self-check statistics -------------------------------------------------------------
    K, Q, KQ, QP = arrays["keys"], arrays["queries"], arrays["key_queries"], arrays["prefill_queries"]
    k100 = min(100, len(K))
    ns = min(a.stats_queries, len(Q))
    Qs = Q[:ns]
    truth, mass, mass10 = topk_rows(Qs, K, k100)
    mk, mq = K.mean(axis=0), Q.mean(axis=0)
    key_spread = float(np.sqrt(((K - mk) ** 2).sum(axis=1).mean()))
    cos = float(mq @ mk / (np.linalg.norm(mq) * np.linalg.norm(mk) + 1e-30))
    stats = {
        "generate_seconds": round(t_gen, 3),
        "stats_queries": int(ns),
        "top100_mass_mean": float(mass.mean()),
        "top100_mass_median": float(np.median(mass)),
        "top100_mass_p10": float(np.percentile(mass, 10)),
        "top10_mass_mean": float(mass10.mean()),
        "key_norm_mean": float(np.linalg.norm(K, axis=1).mean()),
        "query_norm_mean": float(np.linalg.norm(Q, axis=1).mean()),
        "key_spread_rms": key_spread,
        "query_to_key_mean_distance_over_key_spread": float(np.linalg.norm(mq - mk) / key_spread),
        "cos_query_mean_key_mean": cos,
    }
    # Mean distance of a query to its nearest key vs a held-out key to its nearest key (OOD-ness).
    nn_q = np.sqrt(np.maximum(0, ((Qs[:50, None, :] - K[None, :4096]) ** 2).sum(-1).min(1)))
    nn_k = np.sqrt(np.maximum(0, ((KQ[:50, None, :] - K[None, :4096]) ** 2).sum(-1).min(1)))
    stats["nn_distance_query_over_heldout_key"] = float(nn_q.mean() / (nn_k.mean() + 1e-30))
    # Overlap of decode top-100 with the union of prefill top-100 (what a query-aware index can learn).
    if len(QP):
        ptruth, _, _ = topk_rows(QP, K, k100, with_mass=False)
        seen = np.zeros(len(K), dtype=bool)
        seen[ptruth.ravel()] = True
        stats["decode_top100_covered_by_prefill_top100"] = float(seen[truth].mean())
        stats["prefill_top100_distinct_keys_fraction"] = float(seen.mean())
    # Key-space spread of a query's own top-10 (are they key-space neighbours of each other?).
    t10 = K[truth[:, :10]]
    within = np.sqrt(((t10[:, :, None, :] - t10[:, None, :, :]) ** 2).sum(-1)).mean()
    rnd = K[np.random.default_rng(a.seed + 7).integers(0, len(K), size=(ns, 10))]
    between = np.sqrt(((rnd[:, :, None, :] - rnd[:, None, :, :]) ** 2).sum(-1)).mean()
    stats["top10_pairwise_distance_over_random_pairs"] = float(within / between)
    log(f"exact top-100 softmax mass (scale 1/sqrt(d)): mean {stats['top100_mass_mean']:.3f} "
        f"median {stats['top100_mass_median']:.3f} p10 {stats['top100_mass_p10']:.3f}; "
        f"top-10 mass mean {stats['top10_mass_mean']:.3f}")
    log(f"OOD: cos(mean q, mean k) {cos:+.3f}; |mean q - mean k| = "
        f"{stats['query_to_key_mean_distance_over_key_spread']:.2f} x key spread; nearest-key distance "
        f"query/held-out key = {stats['nn_distance_query_over_heldout_key']:.2f}")
    if "decode_top100_covered_by_prefill_top100" in stats:
        log(f"decode top-100 keys found among the prefill queries' top-100: "
            f"{stats['decode_top100_covered_by_prefill_top100']:.3f}")
    if a.check_ivf:
        t = time.time()
        stats["ivf_check"] = ivf_check(K, Qs, truth, a.seed)
        log(f"IVF check (numpy spherical k-means, nlist {stats['ivf_check']['nlist']}, {time.time() - t:.1f} s): "
            + ", ".join(f"scan {r['scanned_fraction']:.3f} -> R@100 {r['recall_at_100']:.3f}"
                        for r in stats["ivf_check"]["curve"]))
    if a.check_hnsw:
        try:
            t = time.time()
            ktruth, _, _ = topk_rows(KQ[:ns], K, 10, with_mass=False)
            stats["hnsw_check"] = hnsw_check(K, {"decode": (Qs, truth), "heldout_keys": (KQ[:ns], ktruth)})
            log(f"hnswlib check ({time.time() - t:.1f} s): " + ", ".join(
                f"{k} {v:.3f}" for k, v in stats["hnsw_check"].items() if k.endswith(("ef128", "ef1024"))))
        except ImportError:
            log("hnswlib not importable: skipped --check-hnsw")

    meta = {
        "generator": "Tools/make_synthetic.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "params": {k: v for k, v in vars(a).items() if k not in ("out", "quiet")},
        "numpy_version": np.__version__,
        "files": {name: {"shape": list(arr.shape), "dtype": "float32"} for name, arr in arrays.items()},
        "facts": facts,
        "stats": stats,
    }
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    log(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
