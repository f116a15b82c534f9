#!/usr/bin/env python3
"""Structure statistics of attention data sets (synthetic families, captures), side by side.

Reads one or more folders with keys.npy and queries.npy (Tools/make_synthetic.py output) or a
`kvrecall capture` folder plus a layer (`DIR:5` reads layer05_keys.npy and layer05_queries.npy) and
prints, per set, what tells the synthetic families apart:

  top-100 mass     median / p10 over decode queries of the exact softmax mass of the top-100 keys
                   (scale 1/sqrt(d); a capture's queries are per query head)
  k-means R2       fraction of the (centred) key variance explained by 64 k-means clusters (Lloyd,
                   10 iterations, on a sample of 16384 keys), and in brackets the same for a Gaussian
                   with the keys' mean and covariance (the null: no clusters, same anisotropy)
  k-means excess   the difference: > 0 = clustered beyond a Gaussian (topics)
  blocks-64 R2     fraction explained by the means of contiguous blocks of 64 positions: how much
                   neighbouring positions share (what per-block codes exploit)
  blocks-1024 R2   the same for blocks of 1024 positions: slow drift
  top-100 blocks   distinct blocks of 512 positions holding a query's top-100 (median): needles spread
  massive ch.      largest / median channel RMS of the raw keys
  cos q.k          mean cosine of a decode query and a key (random pairs); cos k.k of two keys
  cos mean q,k     cosine of the mean query and the mean key
  nn q/key         distance of a query to its nearest key over that of a held-out key (a key not in
                   the sample) to its nearest key: > 1 = queries out of the key distribution

Usage:
  python Tools/bench/family_stats.py Tools/bench/out/synth128k_f1 Tools/bench/out/synth128k_f2 \\
      Tools/bench/out/gemma32k:5 [--queries 200] [--json out.json]
Only numpy. Deterministic (seed 0 for the samples).
"""
import argparse
import json
import os
import sys

import numpy as np


def load(spec):
    if ":" in spec and not os.path.exists(spec):
        folder, layer = spec.rsplit(":", 1)
        pre = os.path.join(folder, f"layer{int(layer):02d}_")
        K = np.load(pre + "keys.npy").astype(np.float32)
        Q = np.load(pre + "queries.npy").astype(np.float32)
        return K, Q
    K = np.load(os.path.join(spec, "keys.npy")).astype(np.float32)
    Q = np.load(os.path.join(spec, "queries.npy")).astype(np.float32)
    return K, Q


def kmeans_r2(X, k, iters, rng):
    C = X[rng.choice(len(X), size=k, replace=False)].copy()
    xx = (X * X).sum(1)
    for _ in range(iters):
        dist = xx[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :]
        a = dist.argmin(1)
        for c in range(k):
            m = a == c
            if m.any():
                C[c] = X[m].mean(0)
    dist = xx[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :]
    a = dist.argmin(1)
    within = ((X - C[a]) ** 2).sum()
    total = ((X - X.mean(0)) ** 2).sum()
    return float(1 - within / total)


def stats(K, Q, nq, seed=0):
    rng = np.random.default_rng(seed)
    n, d = K.shape
    Qs = Q[np.linspace(0, len(Q) - 1, num=min(nq, len(Q))).astype(np.int64)]
    s = (Qs @ K.T).astype(np.float64) / np.sqrt(d)
    top = np.argpartition(-s, 99, axis=1)[:, :100]
    z = s - s.max(1, keepdims=True)
    e = np.exp(z)
    mass = np.take_along_axis(e, top, 1).sum(1) / e.sum(1)
    nblk = np.array([len(np.unique(t // 512)) for t in top])

    mu = K.mean(0)
    Kc = K - mu
    samp = rng.choice(n, size=min(16384, n), replace=False)
    km = kmeans_r2(Kc[samp], 64, 10, rng)
    # null model: a Gaussian with the keys' mean and covariance (clusters beyond it are topics)
    cov = np.cov(Kc[samp].T.astype(np.float64)) + 1e-6 * np.eye(d)
    G = (rng.standard_normal((len(samp), d)) @ np.linalg.cholesky(cov).T).astype(np.float32)
    km_null = kmeans_r2(G, 64, 10, rng)

    def blocks_r2(B):
        bl = np.arange(n) // B
        nb = bl[-1] + 1
        bm = np.zeros((nb, d))
        np.add.at(bm, bl, Kc)
        bm /= np.bincount(bl, minlength=nb)[:, None]
        return float(1 - ((Kc - bm[bl]) ** 2).sum() / (Kc ** 2).sum())
    b64, b1024 = blocks_r2(64), blocks_r2(1024)

    rms = np.sqrt((K.astype(np.float64) ** 2).mean(0))
    i = rng.integers(0, n, size=4000)
    j = rng.integers(0, n, size=4000)
    qi = rng.integers(0, len(Q), size=4000)
    un = lambda X: X / np.linalg.norm(X, axis=1, keepdims=True)
    cos_qk = float((un(Q[qi]) * un(K[i])).sum(1).mean())
    cos_kk = float((un(K[i]) * un(K[j])).sum(1).mean())
    mq = Q.mean(0)
    cos_m = float(mq @ mu / (np.linalg.norm(mq) * np.linalg.norm(mu)))
    # nearest-key distance: 50 queries and 50 keys held out of a 16384-key reference sample
    ref = K[samp[:-50]]
    hk = K[samp[-50:]]
    def nn(X):
        return np.sqrt(np.maximum(0, (X * X).sum(1)[:, None] - 2 * X @ ref.T + (ref * ref).sum(1)[None, :]).min(1))
    nnr = float(nn(Qs[:50]).mean() / nn(hk).mean())
    return {
        "n": int(n), "d": int(d), "queries": int(len(Qs)),
        "top100_mass_median": float(np.median(mass)), "top100_mass_p10": float(np.percentile(mass, 10)),
        "kmeans64_r2": km, "kmeans64_r2_gaussian_null": km_null, "kmeans64_excess": km - km_null,
        "blocks64_r2": b64, "blocks1024_r2": b1024,
        "top100_blocks512_median": float(np.median(nblk)), "blocks512_total": int((n + 511) // 512),
        "massive_channel_ratio": float(rms.max() / np.median(rms)),
        "cos_qk": cos_qk, "cos_kk": cos_kk, "cos_mean_q_mean_k": cos_m, "nn_query_over_key": nnr,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sets", nargs="+", help="folders (synthetic) or capture:LAYER")
    p.add_argument("--queries", type=int, default=200, help="decode queries used (evenly spaced; default 200)")
    p.add_argument("--json", help="also write the figures as JSON")
    a = p.parse_args()
    rows = {}
    for spec in a.sets:
        K, Q = load(spec)
        rows[spec] = stats(K, Q, a.queries)
        print(f"{spec}: done", file=sys.stderr, flush=True)
    cols = [("top-100 mass med", "top100_mass_median", "{:.3f}"), ("p10", "top100_mass_p10", "{:.3f}"),
            ("k-means R2 (Gaussian null)", None, None), ("k-means excess", "kmeans64_excess", "{:+.3f}"),
            ("blocks-64 R2", "blocks64_r2", "{:.3f}"), ("blocks-1024 R2", "blocks1024_r2", "{:.3f}"),
            ("top-100 in blocks of 512", "top100_blocks512_median", "{:.0f}"),
            ("massive ch.", "massive_channel_ratio", "{:.1f}"), ("cos q.k", "cos_qk", "{:+.3f}"),
            ("cos k.k", "cos_kk", "{:+.3f}"), ("cos mean q,k", "cos_mean_q_mean_k", "{:+.3f}"),
            ("nn q/key", "nn_query_over_key", "{:.2f}")]
    print("| set | N | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for spec, r in rows.items():
        cells = [f"{r['kmeans64_r2']:.3f} ({r['kmeans64_r2_gaussian_null']:.3f})" if k is None else f.format(r[k])
                 for _, k, f in cols]
        print(f"| {spec} | {r['n']} | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
