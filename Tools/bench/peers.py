#!/usr/bin/env python3
"""Run KVRecall's peers (faiss-cpu, hnswlib, usearch) on the same .npy files, and plot results.

Measure:
  peers.py --keys K.npy --queries Q.npy [--key-queries KQ.npy] --k 10,100 --out results.json
           [--peers faiss-flat,faiss-hnsw,faiss-ivf,faiss-lsh,hnswlib,usearch] [--threads 1] [--quick]

Plot (ann-benchmarks style: recall on x, queries per second on a log y axis, one line per method):
  peers.py --plot results.json [more.json ...] --png out.png [--k 10] [--query-set decode] [--y qps|scanned]

The JSON written is a list of records (schema in Tools/bench/README.md), the same schema that
`kvrecall bench --json` emits, so both can be merged into one plot.
"""
import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np

ALL_PEERS = ["faiss-flat", "faiss-hnsw", "faiss-ivf", "faiss-lsh", "hnswlib", "usearch",
             "faiss-hnsw-c", "faiss-ivf-c", "hnswlib-c", "usearch-c", "faiss-ivfsq8", "faiss-ivfsq8-r"]
DEFAULT_PEERS = ["faiss-flat", "faiss-hnsw", "faiss-ivf", "faiss-lsh", "hnswlib", "usearch",
                 "hnswlib-c", "faiss-ivf-c"]
SWEEP_KEYS = {"ef", "efSearch", "ef_search", "nprobe", "k_factor", "expansion_search", "budget", "beam",
              "scan_fraction", "probe"}


# ----------------------------------------------------------------------------------------------
# helpers

def log(*a):
    print(*a, file=sys.stderr, flush=True)


def load(path):
    a = np.load(path)
    if a.ndim != 2:
        raise SystemExit(f"{path}: expected a 2-D array, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def recall_at(found, truth, k):
    """Mean |found[:k] & truth[:k]| / k over queries (found may contain -1 padding)."""
    tot = 0.0
    for f, t in zip(found, truth):
        tot += len(set(f[:k].tolist()) & set(t[:k].tolist())) / k
    return tot / len(found)


REPEAT = 1  # --repeat: each query's latency is the best of this many timed calls


def time_loop(search_one, Q, k, warmup=5):
    """Single-query search, one query at a time (each query's best of REPEAT passes over all queries).
    Returns (ids[nq,k], latencies_s[nq], extra list)."""
    nq = len(Q)
    ids = np.full((nq, k), -1, dtype=np.int64)
    lat = np.empty(nq)
    extra = []
    for i in range(min(warmup, nq)):
        search_one(Q[i:i + 1], k)
    pc = time.perf_counter
    lat[:] = float("inf")
    # REPEAT passes over all queries (as kvrecall bench ann does), each query's best pass kept: a
    # query is never timed right after itself, so its lists are not warm from its own last call.
    for rep in range(REPEAT):
        for i in range(nq):
            q = Q[i:i + 1]
            t = pc()
            r = search_one(q, k)
            lat[i] = min(lat[i], pc() - t)
            if rep > 0:
                continue
            I = r[0] if isinstance(r, tuple) else r
            I = np.asarray(I).reshape(-1)[:k]
            ids[i, :len(I)] = I
            if isinstance(r, tuple) and len(r) > 1:
                extra.append(r[1])
    return ids, lat, extra


def faiss_bytes(index):
    import faiss
    try:
        return int(faiss.serialize_index(index).nbytes)
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# peers: each yields (method, params, build_s, index_bytes, search_one(q,k)->ids|(ids,ndis), scanned_fn)

class Ctx:
    def __init__(self, K, threads, quick, nlists, seed):
        self.K = K
        self.N, self.d = K.shape
        self.threads = threads
        self.quick = quick
        self.nlists = nlists
        self.seed = seed
        self._Kc = None
        self.mean = K.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.nprobe_list = None
        self.ef_list = None

    @property
    def Kc(self):
        if self._Kc is None:
            self._Kc = np.ascontiguousarray(self.K - self.mean)
        return self._Kc

    def keys(self, center):
        return self.Kc if center else self.K

    @property
    def Ms(self):
        return [16] if self.quick else [16, 32]

    @property
    def efs(self):
        if self.ef_list:
            return self.ef_list
        return [16, 64, 256, 1024] if self.quick else [16, 32, 64, 128, 256, 512, 1024]

    def nprobes(self, nlist):
        if self.nprobe_list:
            return [p for p in self.nprobe_list if p <= nlist]
        base = [1, 4, 16, 64, 128, 256] if self.quick else [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512]
        return [p for p in base if p <= nlist]


def peer_faiss_flat(ctx, k_list):
    import faiss
    t = time.perf_counter()
    ix = faiss.IndexFlatIP(ctx.d)
    ix.add(ctx.K)
    build = time.perf_counter() - t
    yield dict(method="IndexFlatIP", params={}, build_s=build, index_bytes=faiss_bytes(ix),
               search=lambda q, k: ix.search(q, k)[1], scanned=lambda Q, k: 1.0,
               batch=lambda Q, k: ix.search(Q, k)[1])


def peer_faiss_hnsw(ctx, k_list, center=False):
    import faiss
    K = ctx.keys(center)
    for M in ctx.Ms:
        t = time.perf_counter()
        ix = faiss.IndexHNSWFlat(ctx.d, M, faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efConstruction = 200
        ix.add(K)
        build = time.perf_counter() - t
        nbytes = faiss_bytes(ix)
        log(f"  faiss IndexHNSWFlat M={M} center={center}: built in {build:.1f} s")
        for ef in ctx.efs:
            def search(q, k, ix=ix, ef=ef):
                ix.hnsw.efSearch = max(ef, k)
                return ix.search(q, k)[1]

            def scanned(Q, k, ix=ix, ef=ef):
                ix.hnsw.efSearch = max(ef, k)
                faiss.cvar.hnsw_stats.reset()
                ix.search(Q, k)
                return faiss.cvar.hnsw_stats.ndis / (len(Q) * ctx.N)

            def batch(Q, k, ix=ix, ef=ef):
                ix.hnsw.efSearch = max(ef, k)
                return ix.search(Q, k)[1]

            yield dict(method="IndexHNSWFlat", params={"M": M, "efConstruction": 200, "ef": ef, "center": center},
                       build_s=build, index_bytes=nbytes, search=search, scanned=scanned, min_k_ef=ef,
                       batch=batch)


def peer_faiss_ivf(ctx, k_list, center=False):
    import faiss
    K = ctx.keys(center)
    for nlist in ctx.nlists:
        t = time.perf_counter()
        quant = faiss.IndexFlatIP(ctx.d)
        ix = faiss.IndexIVFFlat(quant, ctx.d, nlist, faiss.METRIC_INNER_PRODUCT)
        ix.cp.seed = ctx.seed
        ix.train(K)
        ix.add(K)
        build = time.perf_counter() - t
        nbytes = faiss_bytes(ix)
        sizes = np.array([ix.invlists.list_size(i) for i in range(nlist)], dtype=np.int64)
        log(f"  faiss IndexIVFFlat nlist={nlist} center={center}: built in {build:.1f} s "
            f"(spherical k-means={bool(ix.cp.spherical)}, niter={ix.cp.niter}, list sizes "
            f"min {sizes.min()} median {int(np.median(sizes))} max {sizes.max()})")
        for nprobe in ctx.nprobes(nlist):
            def search(q, k, ix=ix, nprobe=nprobe):
                ix.nprobe = nprobe
                return ix.search(q, k)[1]

            def scanned(Q, k, quant=quant, nprobe=nprobe, sizes=sizes):
                _, lists = quant.search(Q, nprobe)
                return float(sizes[lists].sum(axis=1).mean() / ctx.N)

            yield dict(method="IndexIVFFlat", params={"nlist": nlist, "nprobe": nprobe, "center": center,
                                                      "spherical_kmeans": bool(ix.cp.spherical)},
                       build_s=build, index_bytes=nbytes, search=search, scanned=scanned, batch=search)


def peer_faiss_lsh(ctx, k_list):
    """SimHash (faiss IndexLSH, random rotation, no trained thresholds) on mean-centred keys, then an exact
    re-rank of k*k_factor candidates by inner product (numpy). faiss's own IndexRefine would sort by the
    base index's L2 convention, so the re-rank is done here; its time is inside the measured latency."""
    import faiss
    Kc = ctx.Kc
    nbits_list = [512] if ctx.quick else [256, 1024]
    kf_list = [1, 10, 100] if ctx.quick else [1, 4, 10, 40, 100]
    for nbits in nbits_list:
        t = time.perf_counter()
        ix = faiss.IndexLSH(ctx.d, nbits, True, False)
        ix.train(Kc)
        ix.add(Kc)
        build = time.perf_counter() - t
        nbytes = faiss_bytes(ix)
        log(f"  faiss IndexLSH nbits={nbits}: built in {build:.1f} s")
        for kf in kf_list:
            def search(q, k, ix=ix, kf=kf):
                kk = min(ctx.N, k * kf)
                _, cand = ix.search(q, kk)
                cand = cand[0]
                cand = cand[cand >= 0]
                s = Kc[cand] @ q[0]
                if len(cand) > k:
                    top = np.argpartition(-s, k - 1)[:k]
                    top = top[np.argsort(-s[top])]
                else:
                    top = np.argsort(-s)
                return cand[top]

            yield dict(method="IndexLSH+rerank", params={"nbits": nbits, "k_factor": kf, "center": True},
                       build_s=build, index_bytes=nbytes, search=search,
                       scanned=lambda Q, k, kf=kf: min(1.0, k * kf / ctx.N),
                       extra={"codes_scanned_fraction": 1.0})


def peer_hnswlib(ctx, k_list, center=False):
    import hnswlib
    K = ctx.keys(center)
    for M in ctx.Ms:
        t = time.perf_counter()
        p = hnswlib.Index(space="ip", dim=ctx.d)
        p.init_index(max_elements=ctx.N, ef_construction=200, M=M, random_seed=ctx.seed)
        p.set_num_threads(ctx.threads)
        p.add_items(K, np.arange(ctx.N))
        build = time.perf_counter() - t
        try:
            nbytes = int(p.index_file_size())
        except Exception:
            nbytes = None
        log(f"  hnswlib M={M} center={center}: built in {build:.1f} s")
        for ef in ctx.efs:
            def search(q, k, p=p, ef=ef):
                p.set_ef(max(ef, k))
                return p.knn_query(q, k=k, num_threads=1)[0]

            def batch(Q, k, p=p, ef=ef):
                p.set_ef(max(ef, k))
                return p.knn_query(Q, k=k, num_threads=ctx.threads)[0]

            yield dict(method="HNSW", params={"M": M, "ef_construction": 200, "ef": ef, "center": center},
                       build_s=build, index_bytes=nbytes, search=search, scanned=None, min_k_ef=ef, batch=batch)


def peer_usearch(ctx, k_list, center=False):
    from usearch.index import Index
    K = ctx.keys(center)
    for M in ctx.Ms:
        t = time.perf_counter()
        u = Index(ndim=ctx.d, metric="ip", dtype="f32", connectivity=M, expansion_add=200, expansion_search=64)
        u.add(np.arange(ctx.N), K, threads=ctx.threads)
        build = time.perf_counter() - t
        try:
            nbytes = int(u.serialized_length)
        except Exception:
            nbytes = None
        log(f"  usearch connectivity={M} center={center}: built in {build:.1f} s")
        for ef in ctx.efs:
            def search(q, k, u=u, ef=ef):
                u.expansion_search = max(ef, k)
                m = u.search(q[0], k, threads=1)
                return np.asarray(m.keys), int(m.computed_distances)

            def batch(Q, k, u=u, ef=ef):
                u.expansion_search = max(ef, k)
                return np.asarray(u.search(Q, k, threads=ctx.threads).keys)

            yield dict(method="HNSW", params={"connectivity": M, "expansion_add": 200, "expansion_search": ef,
                                              "center": center},
                       build_s=build, index_bytes=nbytes, search=search, scanned="extra", min_k_ef=ef, batch=batch)


def peer_faiss_ivfsq8(ctx, k_list, refine=0):
    """faiss IndexIVFScalarQuantizer (QT_8bit: per-dimension ranges, residual codes), optionally wrapped
    in IndexRefineFlat that re-ranks refine x k candidates exactly (what kvrecall's IVF does)."""
    import faiss
    K = ctx.keys(False)
    for nlist in ctx.nlists:
        t = time.perf_counter()
        quant = faiss.IndexFlatIP(ctx.d)
        ivf = faiss.IndexIVFScalarQuantizer(quant, ctx.d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT, True)
        ivf.cp.seed = ctx.seed
        ix = ivf
        if refine:
            ix = faiss.IndexRefineFlat(ivf)
            ix.k_factor = refine
        ix.train(K)
        ix.add(K)
        build = time.perf_counter() - t
        nbytes = faiss_bytes(ix)
        sizes = np.array([ivf.invlists.list_size(i) for i in range(nlist)], dtype=np.int64)
        method = "IndexIVFSQ8" + ("+refine" if refine else "")
        log(f"  faiss {method} nlist={nlist}: built in {build:.1f} s")
        for nprobe in ctx.nprobes(nlist):
            def search(q, k, ix=ix, ivf=ivf, nprobe=nprobe):
                ivf.nprobe = nprobe
                return ix.search(q, k)[1]

            def scanned(Q, k, quant=quant, nprobe=nprobe, sizes=sizes):
                _, lists = quant.search(Q, nprobe)
                return float(sizes[lists].sum(axis=1).mean() / ctx.N)

            params = {"nlist": nlist, "nprobe": nprobe, "center": False}
            if refine:
                params["k_factor_refine"] = refine
            yield dict(method=method, params=params, build_s=build, index_bytes=nbytes, search=search,
                       scanned=scanned, batch=search)


PEER_FUNCS = {
    "faiss-flat": ("faiss", peer_faiss_flat, {}),
    "faiss-hnsw": ("faiss", peer_faiss_hnsw, {}),
    "faiss-hnsw-c": ("faiss", peer_faiss_hnsw, {"center": True}),
    "faiss-ivf": ("faiss", peer_faiss_ivf, {}),
    "faiss-ivf-c": ("faiss", peer_faiss_ivf, {"center": True}),
    "faiss-ivfsq8": ("faiss", peer_faiss_ivfsq8, {}),
    "faiss-ivfsq8-r": ("faiss", peer_faiss_ivfsq8, {"refine": 2}),
    "faiss-lsh": ("faiss", peer_faiss_lsh, {}),
    "hnswlib": ("hnswlib", peer_hnswlib, {}),
    "hnswlib-c": ("hnswlib", peer_hnswlib, {"center": True}),
    "usearch": ("usearch", peer_usearch, {}),
    "usearch-c": ("usearch", peer_usearch, {"center": True}),
}


def versions():
    from importlib import metadata
    v = {"python": platform.python_version()}
    for dist in ("numpy", "faiss-cpu", "hnswlib", "usearch"):
        try:
            v[dist] = metadata.version(dist)
        except Exception:
            pass
    return v


def set_threads(n):
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def run(args):
    K = load(args.keys)
    N, d = K.shape
    qsets = {}
    nmax = args.max_queries or (200 if args.quick else None)
    Q = load(args.queries)
    qsets[args.query_set_name] = Q[:nmax] if nmax else Q
    if args.key_queries:
        KQ = load(args.key_queries)
        qsets["heldout_keys"] = KQ[:nmax] if nmax else KQ
    for name, QQ in qsets.items():
        if QQ.shape[1] != d:
            raise SystemExit(f"query set {name}: dimension {QQ.shape[1]} != keys {d}")
    ks = sorted({int(x) for x in str(args.k).split(",")})
    kmax = max(ks)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers else list(DEFAULT_PEERS)
    for p in peers:
        if p not in PEER_FUNCS:
            raise SystemExit(f"unknown peer {p!r}; known: {', '.join(ALL_PEERS)}")
    nlists = [int(x) for x in args.nlist.split(",")] if args.nlist else [int(round(4 * math.sqrt(N)))]
    ob = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")}
    if ob:
        log(f"note: {ob} set (numpy BLAS may be slower; faiss uses its own BLAS; only the ground truth and the "
            f"LSH re-rank use numpy)")

    import faiss
    # Ground truth: exact top-kmax by faiss IndexFlatIP, all cores (not timed).
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    flat = faiss.IndexFlatIP(d)
    flat.add(K)
    truth = {name: flat.search(QQ, kmax)[1] for name, QQ in qsets.items()}
    del flat
    set_threads(args.threads)
    log(f"keys {N} x {d}; query sets " + ", ".join(f"{n}={len(q)}" for n, q in qsets.items())
        + f"; k={ks}; threads={args.threads}; peers={','.join(peers)}")

    ctx = Ctx(K, args.threads, args.quick, nlists, args.seed)
    if args.nprobe:
        ctx.nprobe_list = [int(x) for x in args.nprobe.split(",")]
    if args.ef:
        ctx.ef_list = [int(x) for x in args.ef.split(",")]
    results = []
    ds = os.path.basename(os.path.dirname(os.path.abspath(args.keys)))
    started = time.time()

    def flush():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    for peer in peers:
        lib, fn, kw = PEER_FUNCS[peer]
        try:
            __import__(lib)
        except ImportError:
            log(f"{peer}: {lib} not importable, skipped")
            continue
        log(f"{peer}:")
        for setting in fn(ctx, ks, **kw):
            for k in ks:
                if setting.get("min_k_ef") is not None and setting["min_k_ef"] < k:
                    continue  # ef below k behaves as ef = k: measured at the ef >= k settings
                for qname, QQ in qsets.items():
                    ids, lat, extra = time_loop(setting["search"], QQ, k)
                    rec = recall_at(ids, truth[qname], k)
                    sc = setting.get("scanned")
                    if sc == "extra":
                        scanned = float(np.mean(extra)) / N if extra else None
                    elif callable(sc):
                        scanned = float(sc(QQ, k))
                    else:
                        scanned = None
                    r = {
                        "library": lib,
                        "method": setting["method"],
                        "params": setting["params"],
                        "k": k,
                        "query_set": qname,
                        "recall": round(rec, 5),
                        "qps": round(len(QQ) / float(lat.sum()), 2),
                        "median_us": round(float(np.median(lat)) * 1e6, 2),
                        "build_s": round(setting["build_s"], 3),
                        "keys_scanned_fraction": None if scanned is None else round(scanned, 6),
                        "index_bytes": setting["index_bytes"],
                        "p90_us": round(float(np.percentile(lat, 90)) * 1e6, 2),
                        "n": N, "d": d, "n_queries": len(QQ), "threads": args.threads, "mode": "single",
                        "dataset": ds, "peer": peer,
                    }
                    r.update(setting.get("extra", {}))
                    results.append(r)
                    if args.batch and setting.get("batch") is not None:
                        setting["batch"](QQ[:min(8, len(QQ))], k)  # warm-up
                        t = time.perf_counter()
                        bids = np.asarray(setting["batch"](QQ, k))
                        wall = time.perf_counter() - t
                        rb = dict(r)
                        rb.update({"mode": "batch", "recall": round(recall_at(bids, truth[qname], k), 5),
                                   "qps": round(len(QQ) / wall, 2), "median_us": None, "p90_us": None})
                        results.append(rb)
                    ps = ",".join(f"{a}={b}" for a, b in setting["params"].items() if a != "center")
                    log(f"    {qname:13s} k={k:<3d} {ps:42s} recall {rec:.3f}  median {r['median_us']:9.1f} us"
                        f"  qps {r['qps']:9.1f}  scanned "
                        + ("-" if scanned is None else f"{scanned:.4f}")
                        + (f"  batch qps {rb['qps']:.1f}" if args.batch and setting.get("batch") is not None else ""))
            flush()
    if results:
        results[0]["run"] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                             "seconds": round(time.time() - started, 1), "machine": platform.machine(),
                             "cpus": os.cpu_count(), "keys": os.path.abspath(args.keys),
                             "versions": versions()}
    flush()
    if args.out:
        log(f"wrote {len(results)} records to {args.out}")
    else:
        json.dump(results, sys.stdout, indent=1)
    return 0


# ----------------------------------------------------------------------------------------------
# plotting

def read_records(path):
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict):
        data = data.get("results", [])
    return data


def pareto(points):
    """points: (recall, y) with larger-is-better y; keep the upper-right frontier, ordered by recall."""
    pts = sorted(points, key=lambda p: (-p[0], -p[1]))
    front, best = [], -math.inf
    for r, y in pts:
        if y > best:
            front.append((r, y))
            best = y
    return sorted(front)


def plot(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = []
    for p in args.plot:
        recs.extend(read_records(p))
    if args.k is not None:
        recs = [r for r in recs if int(r.get("k", -1)) == int(str(args.k).split(",")[0])]
    if args.mode != "all":
        recs = [r for r in recs if r.get("mode", "single") == args.mode]
    qsets = [args.query_set] if args.query_set else sorted({r.get("query_set", "?") for r in recs})
    if not recs:
        raise SystemExit("no records to plot (check --k / --query-set)")
    ycol = {"qps": "qps", "scanned": "keys_scanned_fraction"}[args.y]
    fig, axes = plt.subplots(1, len(qsets), figsize=(6.5 * len(qsets) + 4.5, 6.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, qs in zip(axes[0], qsets):
        groups = {}
        for r in recs:
            if r.get("query_set") != qs or r.get(ycol) is None or r.get("recall") is None:
                continue
            fixed = {a: b for a, b in (r.get("params") or {}).items() if a not in SWEEP_KEYS}
            fixed_s = ",".join(f"{a}={b}" for a, b in sorted(fixed.items())
                               if not (a == "center" and b is False) and a != "spherical_kmeans")
            label = f"{r['library']} {r['method']}" + (f" ({fixed_s})" if fixed_s else "")
            if args.mode == "all" and r.get("mode", "single") != "single":
                label += f" [{r['mode']}]"
            groups.setdefault((label, r.get("k")), []).append((float(r["recall"]), float(r[ycol])))
        markers = "os^vD<>phX*P"
        for i, ((label, k), pts) in enumerate(sorted(groups.items())):
            if ycol == "keys_scanned_fraction":
                neg = pareto([(r, -y) for r, y in pts])
                front = [(r, -y) for r, y in neg]
            else:
                front = pareto(pts)
            xs, ys = zip(*front)
            lab = label + (f" k={k}" if args.k is None else "")
            ax.plot(xs, ys, marker=markers[i % len(markers)], ms=4, lw=1.3, label=lab,
                    color=colors[i % len(colors)], ls="-" if len(xs) > 1 else "none")
        ax.set_yscale("log")
        ax.set_xlabel(f"recall@{args.k}" if args.k is not None else "recall@k")
        ax.set_ylabel("queries per second (1 query at a time, log)" if ycol == "qps"
                      else "fraction of keys scanned (log)")
        ax.set_xlim(0, 1.01)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"query set: {qs}")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    for ax in axes[0][:-1]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0 - 4.3 / fig.get_figwidth(), 0.5))
    title = args.title or ("recall vs QPS" if ycol == "qps" else "recall vs keys scanned")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1.0 - 4.4 / fig.get_figwidth(), 1))
    fig.savefig(args.png, dpi=args.dpi)
    log(f"wrote {args.png}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", help="keys .npy (N x d, float32)")
    p.add_argument("--queries", help="decode (out-of-distribution) queries .npy")
    p.add_argument("--query-set-name", default="decode", help="name recorded for --queries (default decode)")
    p.add_argument("--key-queries", help="held-out keys .npy used as in-distribution queries "
                                         "(recorded as query_set heldout_keys)")
    p.add_argument("--k", default=None, help="k, or a comma list (default 10,100 when measuring; "
                                             "in --plot mode: only records with this k)")
    p.add_argument("--out", help="results JSON (a list of records)")
    p.add_argument("--peers", help="comma list of: " + ", ".join(ALL_PEERS)
                                   + f" (default {','.join(DEFAULT_PEERS)}; -c = keys centred by their mean)")
    p.add_argument("--threads", type=int, default=1, help="threads for every library (default 1)")
    p.add_argument("--batch", action="store_true",
                   help="also time one batched call over all queries with --threads threads (records with "
                        "mode 'batch': qps = n_queries / wall time, median_us null)")
    p.add_argument("--quick", action="store_true", help="200 queries, M=16 only, shorter sweeps")
    p.add_argument("--max-queries", type=int, default=None, help="use only the first N queries of each set")
    p.add_argument("--nlist", default=None, help="IVF list counts, comma list (default round(4 sqrt(N)))")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1,
                   help="time each query this many times and keep the best (kvrecall bench ann keeps the best of 3)")
    p.add_argument("--nprobe", default=None, help="IVF nprobe values, comma list (default: the built-in sweep)")
    p.add_argument("--ef", default=None, help="HNSW ef values, comma list (default: the built-in sweep)")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="plot mode: result files to merge")
    p.add_argument("--png", default="peers.png")
    p.add_argument("--query-set", default=None, help="plot only this query set (default: one panel each)")
    p.add_argument("--y", choices=["qps", "scanned"], default="qps",
                   help="plot QPS (default) or fraction of keys scanned against recall")
    p.add_argument("--mode", choices=["single", "batch", "all"], default="single",
                   help="plot records of this mode (default single; records without a mode count as single)")
    p.add_argument("--title", default=None)
    p.add_argument("--dpi", type=int, default=110)
    args = p.parse_args(argv)
    if args.plot:
        return plot(args)
    if not args.keys or not args.queries:
        p.error("--keys and --queries are required (or use --plot)")
    if args.k is None:
        args.k = "10,100"
    global REPEAT
    REPEAT = max(1, args.repeat)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
