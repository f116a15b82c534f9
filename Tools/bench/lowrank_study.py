#!/usr/bin/env python3
"""Could the quantized method scan fewer key channels? A low-rank key scan on real heads (issue 21).

The quantized step's key scan costs one multiply-add per channel, position and query head; scanning r of
d channels in a rotated basis (Loki's idea) would cut it by d / r. This measures what that costs in
fidelity before any code is written, with exact vectors (no 4-bit codes), so the figures are what a
low-rank scan loses on its own:

  for each decode query head, approximate scores from the keys' projection on r basis vectors (plus
  the key mean's exact contribution) pick the best 128 positions beyond sinks (4) and window (64);
  those are attended exactly, and every other position contributes with its approximate weight and
  its exact value (the quantized method's tail), all in one softmax; against exact attention:

  recall  share of the exact top-128 among the 128 picked;
  error   ||o - o_exact|| / ||o_exact||, median over the query heads.

Bases: 'pca', the keys' principal components; 'qpca', the components of the keys' covariance in the
metric of the prefill queries' second moment (what matters for q . k when queries are anisotropic).

With --per-query the channels are chosen for each query instead (SparQ's idea, in the codes' blocks of 8
channels so that a scan could skip whole blocks): the r channels of the blocks with the largest sum of
|q_c| sigma_c (sigma_c the keys' spread in channel c; 'q' ranks by |q_c| alone), the dropped channels
contributing through the key mean.

With --bounds it measures the other way to scan less, skipping whole groups of 64 positions by a
Quest-style bound (each channel's min and max over the group, which the codes store): the share of
groups whose bounded mass, summed from the smallest, stays below 1e-3 / 1e-4 of the head's total.

Usage: lowrank_study.py --dir Tools/bench/out/gemma32k --layers 05,11,17 [--groups 16] [--scale 0.0625]
       [--ranks 32,64,128] [--bounds | --per-query]
(the folder `Tools/bench/capture32k.sh` writes: layerNN_{keys,values,queries,prefill_queries}.npy).
"""

import numpy as np

import capture_study


def static_positions(n):
    """Sinks (4) and window (64) as a mask: attended exactly whatever the scan says."""
    fixed = np.zeros(n, bool)
    fixed[:4] = True
    fixed[-64:] = True
    return fixed


def decode_queries(keys, values, queries, groups, scale, fixed):
    """Per decode query head: the query, its exact scores, their maximum, weights, exact output and top-128."""
    for row in range(min(groups * 4, len(queries))):
        q = queries[row]
        s = keys @ q * scale
        top = s.max()
        w = np.exp(s - top)
        yield q, s, top, w, w @ values / w.sum(), set(np.argsort(-np.where(fixed, -np.inf, s))[:128])


def scored(approx, s, top, w, exact, best, fixed, values):
    """Recall@128 and output error of attending the best 128 by `approx` (beyond sinks and window) exactly and
    every other position with its approximate weight and exact value, in one softmax (s: the exact scores,
    top their maximum, w their weights exp(s - top), exact the exact output, best the exact top-128)."""
    picked = np.argsort(-np.where(fixed, -np.inf, approx))[:128]
    attended = fixed.copy()
    attended[picked] = True
    tail = np.exp(approx - top)
    tail[attended] = 0
    out = (np.where(attended, w, 0) @ values + tail @ values) / (np.where(attended, w, 0).sum() + tail.sum())
    return len(best & set(picked)) / 128, np.linalg.norm(out - exact) / np.linalg.norm(exact)


def study(folder, layer, groups, scale, ranks):
    load = lambda name: capture_study.load(folder, layer, name)
    keys, values, queries, prefill = load("keys"), load("values"), load("queries"), load("prefill_queries")
    n, d = keys.shape
    mean = keys.mean(0)
    centred = keys - mean
    cov = centred.T @ centred / n
    pca = np.linalg.eigh(cov)[1][:, ::-1]
    # q . k = (M^-T q) . (M k) with Cq = M^T M: principal components of M C M^T in that metric.
    metric = np.linalg.cholesky(prefill.T @ prefill / len(prefill) + 1e-6 * np.eye(d)).T
    qpca = np.linalg.eigh(metric @ cov @ metric.T)[1][:, ::-1]
    to_metric = np.linalg.inv(metric).T
    results = {}
    fixed = static_positions(n)
    for q, s, top, w, exact, best in decode_queries(keys, values, queries, groups, scale, fixed):
        for name in ("pca", "qpca"):
            for r in ranks:
                if name == "pca":
                    basis = pca[:, :r]
                    approx = ((centred @ basis) @ (basis.T @ q) + mean @ q) * scale
                else:
                    basis = qpca[:, :r]
                    approx = (((centred @ metric.T) @ basis) @ (basis.T @ (to_metric @ q)) + mean @ q) * scale
                results.setdefault((name, r), []).append(scored(approx, s, top, w, exact, best, fixed, values))
    for (name, r), rows in sorted(results.items()):
        a = np.array(rows)
        print(f"layer {layer}  {name:4s} r {r:3d} of {d}: recall@128 {np.median(a[:, 0]):.3f}  median error {np.median(a[:, 1]):.4f}")


def per_query(folder, layer, groups, scale, ranks, block=8):
    load = lambda name: capture_study.load(folder, layer, name)
    keys, values, queries = load("keys"), load("values"), load("queries")
    n, d = keys.shape
    assert d % block == 0 and all(r % block == 0 for r in ranks), f"ranks and dimension must be multiples of {block}"
    mean = keys.mean(0)
    sigma = np.sqrt(((keys - mean) ** 2).mean(0))
    fixed = static_positions(n)
    results = {}
    for q, s, top, w, exact, best in decode_queries(keys, values, queries, groups, scale, fixed):
        for name, weight in (("q", np.ones(d)), ("qsigma", sigma)):
            importance = (np.abs(q) * weight).reshape(-1, block).sum(1)
            for r in ranks:
                chosen = np.zeros(d, bool)
                for b in np.argsort(-importance)[: r // block]:
                    chosen[b * block:(b + 1) * block] = True
                approx = (keys[:, chosen] @ q[chosen] + mean[~chosen] @ q[~chosen]) * scale
                results.setdefault((name, r), []).append(scored(approx, s, top, w, exact, best, fixed, values))
    for (name, r), rows in sorted(results.items()):
        a = np.array(rows)
        print(f"layer {layer}  per query, {name:6s} r {r:3d} of {d}: recall@128 {np.median(a[:, 0]):.3f}  "
              f"median error {np.median(a[:, 1]):.4f}  p90 {np.percentile(a[:, 1], 90):.4f}")


def bounds(folder, layer, groups, scale):
    keys = capture_study.load(folder, layer, "keys")
    queries = capture_study.load(folder, layer, "queries")
    n, d = keys.shape
    grouped = keys[: n // 64 * 64].reshape(-1, 64, d)
    low, high = grouped.min(1), grouped.max(1)
    shares = {1e-3: [], 1e-4: []}
    for row in range(min(groups * 4, len(queries))):
        q = queries[row]
        s = keys @ q * scale
        top = s.max()
        total = np.exp(s - top).sum()
        bound = 64 * np.exp(np.minimum(np.maximum(low * q, high * q).sum(1) * scale - top, 0))
        cumulative = np.cumsum(np.sort(bound))
        for eps in shares:
            shares[eps].append(np.searchsorted(cumulative, eps * total) / len(bound))
    print(f"layer {layer}  groups skippable by their bound: "
          + ", ".join(f"{np.median(v):.3f} at {eps:g} of the mass" for eps, v in shares.items()))


def main():
    p = capture_study.parser(__doc__)
    p.add_argument("--ranks", default="32,64,128")
    p.add_argument("--bounds", action="store_true", help="measure group skipping by per-channel bounds instead")
    p.add_argument("--per-query", action="store_true", help="choose the channels per query (blocks of 8) instead")
    a = p.parse_args()
    for layer in a.layers.split(","):
        if a.bounds:
            bounds(a.dir, layer, a.groups, a.scale)
        elif a.per_query:
            per_query(a.dir, layer, a.groups, a.scale, [int(r) for r in a.ranks.split(",")])
        else:
            study(a.dir, layer, a.groups, a.scale, [int(r) for r in a.ranks.split(",")])


if __name__ == "__main__":
    main()
