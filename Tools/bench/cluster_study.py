#!/usr/bin/env python3
"""Would the quantized method's tail groups work better as clusters of similar keys? (issue 21)

The quantized step gives every position outside sinks (4), window (64) and its best 128 to the tail, in
groups of 64 CONSECUTIVE positions: a light group contributes its tail weight total times its mean
value, a detailed one (the heaviest, about half at the default) the weighted sum of its positions'
values, a value pass that is ~35% of the step. Values are not correlated by position (means of 8
instead of 64 positions barely help), so this measures, with exact vectors (no 4-bit codes, so the
figures are what the partition does on its own), what a partition by key similarity would give:

  part 1, light groups: sinks + window + the exact top-128 (by true score) attended exactly, and every
  other position in the tail with its exact weight, all in one softmax; the heaviest f of the groups (by
  tail weight total) detailed (exact weights and values), the others light, their tail weight total
  times the mean value of their tail members ('tail') or of all members ('all', the precomputed mean a
  store can hold); f = 0, 0.1, 0.25, 0.5, and 'rule', the current rule (a group is detailed when some
  query head of the step gives it at least 0.5 x its mean tail mass per group); 'pos%' is the share of
  the n positions detailed (clusters are not equally large, and the value pass costs per position);

  part 2, cluster estimates instead of the scan: each cluster's mass (sinks and window excluded, as
  they are always exact) is estimated without its positions: 'cent' count x exp(s q.c), 'diag'
  count x exp(s q.c + s^2/2 q^T diag(Cov) q) (Cov per channel), 'r8' with Cov as its top 8
  eigenvectors per cluster plus the rest's diagonal per channel, 'full' with the full covariance
  (q^T Cov q is the variance of the cluster's scores, taken from them here), 'exact' the true mass
  (what the partition allows at best); the clusters are ranked by it and scanned (exact scores)
  until the scanned positions reach a share of n; the best 128 scanned positions are attended with
  sinks and window, the other scanned positions contribute exact weights with exact values ('det')
  or their cluster's weight total times its stored mean value ('light'), and every unscanned cluster
  its estimated mass times its stored mean value. Printed per share: error det / light, the share
  scanned, 'r' the share of the exact top-128 found, 'm' the median ratio of the unscanned clusters'
  estimated to true mass.

  error   ||o - o_exact|| / ||o_exact|| per query head, median over the query heads.

Partitions (k = n / 64 clusters by default; Lloyd's k-means from random distinct rows, float32,
chunked distances, an empty cluster reseeded with the row farthest from its centroid):
  pos     groups of 64 consecutive positions (the current scheme);
  key     k-means on the keys (L2);
  qkey    k-means on the keys in the metric of the prefill queries' second moment (M k with
          M^T M = E[q q^T]: squared distance = the mean squared score difference over those queries);
  val     k-means on the values (what the light groups' means would need);
  qkey+val  k-means on [M k, v], each part scaled to unit total variance.
Conventions as lowrank_study.py: all n keys visible to every decode query, the first --groups x 4 rows
of layerNN_queries.npy, softmax scale 1/16.

Usage: cluster_study.py --dir Tools/bench/out/gemma32k --layers 05,11,17 [--groups 16] [--scale 0.0625]
       [--clusters 512] [--iters 20] [--seed 0] [--shares 0.1,0.25,0.5]
(the folder `Tools/bench/capture32k.sh` writes: layerNN_{keys,values,queries,prefill_queries}.npy).
Only numpy; set OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 to keep it on one core.
"""
import time

import numpy as np

import capture_study

SINKS, WINDOW, BEST, SIZE = 4, 64, 128, 64
RANK = 8  # part 2: per-cluster covariance rank of the 'rN' estimator
FRACTIONS = (0.0, 0.1, 0.25, 0.5)
HEADS, DETAIL = 4, 0.5  # query heads per step (GQA group); the current rule's tail detail
ESTIMATORS = ("cent", "diag", f"r{RANK}", "full", "exact")


def assign(x, xx, centroids, chunk=4096):
    cc = (centroids * centroids).sum(1)
    labels = np.empty(len(x), np.int64)
    dist = np.empty(len(x), np.float32)
    for a in range(0, len(x), chunk):
        d2 = xx[a:a + chunk, None] - 2 * (x[a:a + chunk] @ centroids.T) + cc[None, :]
        labels[a:a + chunk] = d2.argmin(1)
        dist[a:a + chunk] = d2[np.arange(len(d2)), labels[a:a + chunk]]
    return labels, dist


def kmeans(x, k, iters, seed):
    """Lloyd's k-means, float32; returns labels 0..k'-1 (empty clusters dropped at the end)."""
    x = np.ascontiguousarray(x, np.float32)
    rng = np.random.default_rng(seed)
    xx = (x * x).sum(1)
    centroids = x[rng.choice(len(x), k, replace=False)].copy()
    for it in range(iters + 1):
        labels, dist = assign(x, xx, centroids)
        if it == iters:
            break
        counts = np.bincount(labels, minlength=k)
        order = np.argsort(labels, kind="stable")
        full = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts[full])[:-1]])
        centroids[full] = np.add.reduceat(x[order], starts, axis=0) / counts[full, None]
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # reseed with the rows farthest from their centroids
            centroids[empty] = x[np.argsort(-dist, kind="stable")[:len(empty)]]
    return np.unique(labels, return_inverse=True)[1]


class Partition:
    """Groups of positions (labels), sorted views and the statistics a store could precompute."""

    def __init__(self, name, labels, keys, values, static):
        self.name, self.labels = name, labels
        self.g = labels.max() + 1
        self.order = np.argsort(labels, kind="stable")
        self.count = np.bincount(labels, minlength=self.g)
        self.starts = np.concatenate([[0], np.cumsum(self.count)[:-1]])
        self.vs = values[self.order]
        self.vsum = np.add.reduceat(self.vs, self.starts, axis=0)
        self.vmean = self.vsum / self.count[:, None]
        # Part 2: over the members outside sinks and window.
        free = ~static
        self.free = free
        self.nfree = np.bincount(labels[free], minlength=self.g).astype(np.float64)
        safe = np.maximum(self.nfree, 1)[:, None]
        ksum = np.zeros((self.g, keys.shape[1]))
        k2sum = np.zeros_like(ksum)
        vsum = np.zeros_like(ksum)
        np.add.at(ksum, labels[free], keys[free])
        np.add.at(k2sum, labels[free], keys[free] ** 2)
        np.add.at(vsum, labels[free], values[free])
        self.centroid = ksum / safe
        self.diagvar = np.maximum(k2sum / safe - self.centroid ** 2, 0)
        self.fmean = vsum / safe
        self.logcount = np.where(self.nfree > 0, np.log(np.maximum(self.nfree, 1)), -np.inf)
        # Covariance summary: its top RANK eigenvectors plus the rest's diagonal (per channel).
        self.lr_vecs = np.zeros((self.g, RANK, keys.shape[1]))
        self.lr_vals = np.zeros((self.g, RANK))
        self.lr_rest = np.zeros((self.g, keys.shape[1]))
        fl = labels[free]
        fo = np.argsort(fl, kind="stable")
        fstarts = np.concatenate([[0], np.cumsum(self.nfree.astype(np.int64))])
        fkeys = keys[free][fo]
        for c in range(self.g):
            x = fkeys[fstarts[c]:fstarts[c + 1]] - self.centroid[c]
            if len(x) < 2:
                continue
            val, vec = np.linalg.eigh(x.T @ x / len(x))
            self.lr_vals[c], self.lr_vecs[c] = val[::-1][:RANK], vec[:, ::-1][:, :RANK].T
            top = (self.lr_vecs[c] ** 2 * self.lr_vals[c][:, None]).sum(0)
            self.lr_rest[c] = np.maximum(np.diag(x.T @ x) / len(x) - top, 0)

    def sizes(self):
        c = self.count
        return f"{self.g} groups, sizes min {c.min()} median {int(np.median(c))} max {c.max()}, " \
               f"positions in groups > 256: {c[c > 256].sum() / c.sum():.2f}"


def group_mass(p, w, attended):
    return np.add.reduceat(np.where(attended, 0.0, w)[p.order], p.starts)


def light_groups(p, w, attended, mass, rule, values, base_num, base_den, exact):
    """Part 1 for one query head: errors per (mean kind, fraction) and detailed position shares;
    'rule' is the detailed set of the current rule (a group some head of the step gives half its
    mean tail mass per group or more)."""
    ts = np.where(attended, 0.0, w)[p.order]
    wsum = np.add.reduceat(ts[:, None] * p.vs, p.starts, axis=0)
    att = np.flatnonzero(attended)
    tsum = p.vsum.copy()
    np.subtract.at(tsum, p.labels[att], values[att])
    tcount = p.count - np.bincount(p.labels[att], minlength=p.g)
    tmean = tsum / np.maximum(tcount, 1)[:, None]
    rank = np.argsort(-mass, kind="stable")
    den = base_den + mass.sum()
    out = {}
    for f in FRACTIONS + ("rule",):
        if f == "rule":
            det, light = np.flatnonzero(rule), np.flatnonzero(~rule)
        else:
            nd = int(round(f * p.g))
            det, light = rank[:nd], rank[nd:]
        detailed = base_num + wsum[det].sum(0)
        for kind, mean in (("tail", tmean), ("all", p.vmean)):
            o = (detailed + mass[light] @ mean[light]) / den
            out[(kind, f)] = np.linalg.norm(o - exact) / np.linalg.norm(exact)
        out[("pos", f)] = p.count[det].sum() / len(w)
    return out


def estimates(p, q, s, w, top, static, best, values, shares, scale, exact):
    """Part 2 for one query head: per (estimator, share) errors (det, light), scanned share, recall, mass ratio."""
    lab = p.labels
    free = p.free
    mu = p.centroid @ q * scale
    sf = np.where(free, s, 0.0)
    m1 = np.bincount(lab, sf, minlength=p.g) / np.maximum(p.nfree, 1)
    m2 = np.bincount(lab, sf * sf, minlength=p.g) / np.maximum(p.nfree, 1)
    truemass = np.bincount(lab, np.where(free, w, 0.0), minlength=p.g)
    proj = p.lr_vecs @ q
    lowrank = (p.lr_vals * proj ** 2).sum(1) + p.lr_rest @ (q * q)
    logs = {
        "cent": p.logcount + mu - top,
        "diag": p.logcount + mu + 0.5 * scale * scale * (p.diagvar @ (q * q)) - top,
        f"r{RANK}": p.logcount + mu + 0.5 * scale * scale * lowrank - top,
        "full": p.logcount + mu + 0.5 * np.maximum(m2 - m1 * m1, 0) - top,
        "exact": np.log(np.maximum(truemass, 1e-300)),
    }
    out = {}
    nfree_total = p.nfree.sum()
    cum_order = {}
    for est, le in logs.items():
        le = np.where(p.nfree > 0, le, -np.inf)
        rank = np.argsort(-le, kind="stable")
        cum = np.cumsum(p.nfree[rank])
        for share in shares:
            m = min(int(np.searchsorted(cum, share * nfree_total)) + 1, p.g)
            sel = np.zeros(p.g, bool)
            sel[rank[:m]] = True
            scanned = sel[lab] & free
            cand = np.where(scanned, s, -np.inf)
            k = min(BEST, int(scanned.sum()))
            picked = np.argpartition(-cand, k - 1)[:k] if k else np.zeros(0, np.int64)
            attended = static.copy()
            attended[picked] = True
            rem = scanned & ~attended
            num = w[attended] @ values[attended]
            den = w[attended].sum() + w[rem].sum()
            est_mass = np.exp(le[~sel])
            unscanned = est_mass @ p.fmean[~sel]
            den += est_mass.sum()
            det = num + w[rem] @ values[rem] + unscanned
            remmass = np.bincount(lab[rem], w[rem], minlength=p.g)
            light = num + remmass @ p.fmean + unscanned
            true_un = truemass[~sel].sum()
            out[est, share] = (
                np.linalg.norm(det / den - exact) / np.linalg.norm(exact),
                np.linalg.norm(light / den - exact) / np.linalg.norm(exact),
                scanned.sum() / len(s),
                len(best & set(picked.tolist())) / BEST,
                est_mass.sum() / true_un if true_un > 0 else 1.0,
            )
    return out


def study(folder, layer, groups, scale, clusters, iters, seed, shares, parts):
    t0 = time.time()
    load = lambda name: capture_study.load(folder, layer, name)
    keys, values, queries, prefill = load("keys"), load("values"), load("queries"), load("prefill_queries")
    n, d = keys.shape
    k = clusters or n // SIZE
    static = np.zeros(n, bool)
    static[:SINKS] = True
    static[-WINDOW:] = True
    metric = np.linalg.cholesky(prefill.astype(np.float64).T @ prefill / len(prefill) + 1e-6 * np.eye(d)).T
    mkeys = (keys.astype(np.float64) @ metric.T).astype(np.float32)
    unit = lambda x: (x - x.mean(0)) / np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean())
    inputs = {
        "key": lambda: keys,
        "qkey": lambda: mkeys,
        "val": lambda: values,
        "qkey+val": lambda: np.concatenate([unit(mkeys), unit(values)], 1),
    }
    keys64, values64 = keys.astype(np.float64), values.astype(np.float64)
    partitions = []
    for name in parts:
        t = time.time()
        labels = np.arange(n) // SIZE if name == "pos" else kmeans(inputs[name](), k, iters, seed)
        partitions.append(Partition(name, labels, keys64, values64, static))
        print(f"layer {layer}  {name:8s} {partitions[-1].sizes()}  ({time.time() - t:.1f} s)", flush=True)
    rows = min(groups * 4, len(queries))
    part1 = {p.name: [] for p in partitions}
    part2 = {p.name: [] for p in partitions}
    for step in range(0, rows, HEADS):
        heads = []
        for row in range(step, min(step + HEADS, rows)):
            q = queries[row].astype(np.float64)
            s = keys64 @ q * scale
            top = s.max()
            w = np.exp(s - top)
            exact = w @ values64 / w.sum()
            best = np.argpartition(-np.where(static, -np.inf, s), BEST - 1)[:BEST]
            attended = static.copy()
            attended[best] = True
            heads.append((q, s, top, w, exact, best, attended))
        for p in partitions:
            masses = [group_mass(p, h[3], h[6]) for h in heads]
            rule = np.zeros(p.g, bool)
            for m in masses:
                rule |= m >= DETAIL * m.sum() / p.g
            for (q, s, top, w, exact, best, attended), mass in zip(heads, masses):
                base_num, base_den = w[attended] @ values64[attended], w[attended].sum()
                part1[p.name].append(light_groups(p, w, attended, mass, rule, values64, base_num, base_den, exact))
                part2[p.name].append(estimates(p, q, s, w, top, static, set(best.tolist()), values64, shares, scale,
                                               exact))
    med = lambda xs: float(np.median(xs))
    print(f"\nlayer {layer}: part 1, light groups (median error over {rows} query heads; "
          f"'pos%' = share of positions detailed)")
    print(f"  {'partition':9s} {'mean':4s} " + " ".join(f"{'f=' + str(f):>16s}" for f in FRACTIONS + ("rule",)))
    for p in partitions:
        for kind in ("tail", "all"):
            cells = [f"{med([r[kind, f] for r in part1[p.name]]):.4f} ({med([r['pos', f] for r in part1[p.name]]):4.0%})"
                     for f in FRACTIONS + ("rule",)]
            print(f"  {p.name:9s} {kind:4s} " + " ".join(f"{c:>16s}" for c in cells))
    print(f"\nlayer {layer}: part 2, cluster estimates instead of the scan "
          f"(median over {rows} query heads: error det / light, scanned share, recall@128, est/true unscanned mass)")
    print(f"  {'partition':9s} {'est':5s} " + " ".join(f"{'target ' + format(sh, '.0%'):>38s}" for sh in shares))
    for p in partitions:
        for est in ESTIMATORS:
            cells = []
            for sh in shares:
                a = np.array([r[est, sh] for r in part2[p.name]])
                m = np.median(a, 0)
                cells.append(f"{m[0]:.4f}/{m[1]:.4f} {m[2]:4.0%} r{m[3]:.2f} m{m[4]:7.3g}")
            print(f"  {p.name:9s} {est:5s} " + " ".join(f"{c:>38s}" for c in cells))
    print(f"layer {layer}: {time.time() - t0:.0f} s\n", flush=True)


def main():
    p = capture_study.parser(__doc__)
    p.add_argument("--clusters", type=int, default=0, help="k-means clusters (default n / 64)")
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations")
    p.add_argument("--seed", type=int, default=0, help="k-means initialisation seed")
    p.add_argument("--shares", default="0.1,0.25,0.5", help="part 2: scanned shares of the positions")
    p.add_argument("--partitions", default="pos,key,qkey,val,qkey+val")
    a = p.parse_args()
    for layer in a.layers.split(","):
        study(a.dir, layer, a.groups, a.scale, a.clusters, a.iters, a.seed,
              [float(x) for x in a.shares.split(",")], a.partitions.split(","))


if __name__ == "__main__":
    main()
