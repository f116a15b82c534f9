"""Build time per head against context length, every index kind, with peers in the same run.

For each context length N (the first N keys and prefill queries of the data set), each round times
`kvrecall bench ann --index KIND` (the build only: ingest and search are not counted) for every
stored index kind with the default build parameters (two build threads; HNSW also with one), then
hnswlib (M 16, efConstruction 200, one thread) and faiss IndexIVFFlat (nlist 4 sqrt N, train + add,
two threads) on the same keys. Rounds alternate kvrecall and the peers; the summary is the median
per (method, N), with HNSW's one-thread build as a ratio of hnswlib's and IVF's as a ratio of faiss's.

Usage: python Tools/bench/build_times.py --kvrecall .build/release/kvrecall [--data Tools/bench/out/synth_p128k]
           [--contexts 8192,32768,131072] [--rounds 3] [--out Tools/bench/out/build_times.json]
           [--png docs/build_time_context.png]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

KINDS = [("hnsw", 1), ("hnsw", 2), ("ivf", 2), ("tree", 2), ("lsh", 2), ("retrieval", 2), ("landmark", 2)]
SWEEP = {"hnsw": 16, "ivf": 8, "tree": 16, "lsh": 2, "retrieval": 50, "landmark": 4}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def slices(data, contexts, folder):
    keys = np.load(os.path.join(data, "keys.npy"), mmap_mode="r")
    prefill = np.load(os.path.join(data, "prefill_queries.npy"), mmap_mode="r")
    queries = np.load(os.path.join(data, "queries.npy"), mmap_mode="r")
    out = {}
    for n in contexts:
        d = os.path.join(folder, str(n))
        os.makedirs(d, exist_ok=True)
        paths = {name: os.path.join(d, name + ".npy") for name in ("keys", "prefill", "queries")}
        np.save(paths["keys"], np.ascontiguousarray(keys[:n], dtype=np.float32))
        np.save(paths["prefill"], np.ascontiguousarray(prefill[:min(n, len(prefill))], dtype=np.float32))
        np.save(paths["queries"], np.ascontiguousarray(queries[:20], dtype=np.float32))
        out[n] = paths
    return out


def kvrecall_build(binary, paths, kind, threads):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [binary, "bench", "ann", "--keys", paths["keys"], "--queries", paths["queries"], "--limit", "20", "-k", "10",
           "--index", kind, "--sweep", str(SWEEP[kind]), "--threads", str(threads), "--json", out]
    if kind == "retrieval":
        cmd += ["--prefill", paths["prefill"]]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        text = f.read().strip()
    os.unlink(out)
    rec = json.loads(text.splitlines()[0]) if not text.startswith("[") else json.loads(text)[0]
    return rec["build_s"]


def hnswlib_build(keys):
    import hnswlib
    p = hnswlib.Index(space="ip", dim=keys.shape[1])
    p.init_index(max_elements=len(keys), M=16, ef_construction=200, random_seed=1)
    p.set_num_threads(1)
    t = time.perf_counter()
    p.add_items(keys, np.arange(len(keys)), num_threads=1)
    return time.perf_counter() - t


def faiss_ivf_build(keys):
    import faiss
    faiss.omp_set_num_threads(2)
    nlist = max(1, min(len(keys), round(4 * len(keys) ** 0.5)))
    t = time.perf_counter()
    q = faiss.IndexFlatIP(keys.shape[1])
    index = faiss.IndexIVFFlat(q, keys.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(keys)
    index.add(keys)
    return time.perf_counter() - t


def summarize(records):
    groups = {}
    for r in records:
        groups.setdefault((r["method"], r["threads"], r["n"]), []).append(r["build_s"])
    med = {k: statistics.median(v) for k, v in groups.items()}
    methods = sorted({(m, t) for (m, t, _) in med}, key=lambda x: (x[0], x[1]))
    ns = sorted({n for (_, _, n) in med})
    lines = ["| method | threads | " + " | ".join(f"{n // 1024}K" for n in ns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in ns) + " |"]
    for m, t in methods:
        cells = [f"{med[(m, t, n)]:.2f}" if (m, t, n) in med else "-" for n in ns]
        lines.append(f"| {m} | {t} | " + " | ".join(cells) + " |")
    for (ours, peer, t_ours, t_peer) in [("hnsw", "hnswlib", 1, 1), ("ivf", "faiss-ivfflat", 2, 2)]:
        ratios = []
        for n in ns:
            a, b = med.get((ours, t_ours, n)), med.get((peer, t_peer, n))
            ratios.append(f"{a / b:.2f}x" if a and b else "-")
        lines.append(f"| {ours} / {peer} | | " + " | ".join(ratios) + " |")
    return "\n".join(lines), med


def plot(med, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (m, t) in sorted({(m, t) for (m, t, _) in med}):
        ns = sorted(n for (mm, tt, n) in med if mm == m and tt == t)
        ax.plot(ns, [med[(m, t, n)] for n in ns], marker="o", linestyle="--" if m in ("hnswlib", "faiss-ivfflat") else "-",
                label=f"{m} ({t} thread{'s' if t > 1 else ''})")
    ax.axhline(5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (keys per head)")
    ax.set_ylabel("build time per head (s, median)")
    ax.set_title("Index build time per head (d 128)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kvrecall", required=True)
    p.add_argument("--data", default="Tools/bench/out/synth_p128k")
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kinds", default=None, help="comma list of kind:threads (default: every kind)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--out", default="Tools/bench/out/build_times.json")
    p.add_argument("--png", default=None)
    args = p.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    kinds = KINDS if not args.kinds else [(k.split(":")[0], int(k.split(":")[1])) for k in args.kinds.split(",")]
    paths = slices(args.data, contexts, os.path.join(os.path.dirname(args.out) or ".", "build_slices"))
    records = []
    for r in range(args.rounds):
        for n in contexts:
            for kind, threads in kinds:
                s = kvrecall_build(args.kvrecall, paths[n], kind, threads)
                log(f"round {r} n {n} {kind} threads {threads}: {s:.2f} s")
                records.append({"method": kind, "threads": threads, "n": n, "round": r, "build_s": s})
            if not args.no_peers:
                keys = np.load(paths[n]["keys"])
                for name, fn, threads in [("hnswlib", hnswlib_build, 1), ("faiss-ivfflat", faiss_ivf_build, 2)]:
                    s = fn(keys)
                    log(f"round {r} n {n} {name} threads {threads}: {s:.2f} s")
                    records.append({"method": name, "threads": threads, "n": n, "round": r, "build_s": s})
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
    table, med = summarize(records)
    print(table)
    if args.png:
        plot(med, args.png)


if __name__ == "__main__":
    main()
