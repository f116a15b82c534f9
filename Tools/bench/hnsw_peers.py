#!/usr/bin/env python3
"""KVRecall's HNSW against hnswlib on in-distribution queries, interleaved, same machine, one thread.

For each round and data set: every given kvrecall binary runs `bench ann --index hnsw` (k 10, M 16,
efConstruction 200, one build and search thread, held-out keys as the queries), then hnswlib runs
through peers.py on the same files (M 16, ef_construction 200). Each side's figure is its best
queries per second at recall@10 >= the target over the ef sweep; the ratio is taken within the
round, and the medians over rounds are printed.

  Tools/bench/hnsw_peers.py --ours after=.build/release/kvrecall [--ours before=/tmp/old] \\
      --data Tools/bench/out/synth --data Tools/bench/out/synth_s1 --rounds 3

Needs the venv of Tools/bench (peers.py with hnswlib, faiss for the ground truth).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PY = os.path.join(HERE, ".venv", "bin", "python")


def best(records, target):
    """(qps, ef, recall) of the fastest record at recall >= target, or None."""
    ok = [r for r in records if r["recall"] >= target]
    if not ok:
        return None
    r = max(ok, key=lambda r: r["qps"])
    return r["qps"], r["params"].get("ef"), r["recall"]


def run_ours(binary, data, args):
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        out = f.name
    os.unlink(out)
    cmd = ["nice", binary, "bench", "ann", "--keys", f"{data}/keys.npy", "--queries", f"{data}/key_queries.npy",
           "--limit", str(args.limit), "-k", "10", "--index", "hnsw", "--M", "16", "--ef-construction", "200",
           "--threads", "1", "--sweep", args.sweep, "--repeat", str(args.repeat), "--json", out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        records = json.load(f)
    os.unlink(out)
    return records


def run_hnswlib(data, args):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = ["nice", PY, os.path.join(HERE, "peers.py"), "--keys", f"{data}/keys.npy", "--queries",
           f"{data}/key_queries.npy", "--query-set-name", "heldout_keys", "--k", "10", "--threads", "1", "--quick",
           "--max-queries", str(args.limit), "--repeat", str(args.repeat), "--ef", args.sweep, "--peers", "hnswlib",
           "--out", out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        records = json.load(f)
    os.unlink(out)
    return [r for r in records if r.get("params", {}).get("M") == 16]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", action="append", required=True, help="LABEL=BINARY (repeat for several)")
    p.add_argument("--data", action="append", required=True, help="folder with keys.npy, key_queries.npy")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=1000, help="queries (default 1000)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes, each query's best kept (default 3)")
    p.add_argument("--sweep", default="10,16,24,32,48,64,96,128", help="ef values (both sides)")
    p.add_argument("--target", type=float, default=0.9, help="recall@10 target (default 0.9)")
    p.add_argument("--json", help="write every round's figures here")
    args = p.parse_args()
    ours = [tuple(o.split("=", 1)) for o in args.ours]
    rows = []
    for rnd in range(1, args.rounds + 1):
        for data in args.data:
            name = os.path.basename(os.path.normpath(data))
            figures = {label: best(run_ours(binary, data, args), args.target) for label, binary in ours}
            figures["hnswlib"] = best(run_hnswlib(data, args), args.target)
            for label, fig in figures.items():
                rows.append({"round": rnd, "data": name, "side": label,
                             "qps": fig and fig[0], "ef": fig and fig[1], "recall": fig and fig[2]})
                text = "none reaches the target" if fig is None else f"{fig[0]:9.0f} qps at ef {fig[1]} (recall {fig[2]:.3f})"
                print(f"round {rnd} {name:10s} {label:10s} {text}", flush=True)
    print(f"\nmedians over {args.rounds} rounds, best queries/s at recall@10 >= {args.target} (ratio: within each round)")
    for data in args.data:
        name = os.path.basename(os.path.normpath(data))
        peer = {r["round"]: r["qps"] for r in rows if r["data"] == name and r["side"] == "hnswlib"}
        for label, _ in ours + [("hnswlib", None)]:
            mine = {r["round"]: r["qps"] for r in rows if r["data"] == name and r["side"] == label}
            qps = [q for q in mine.values() if q]
            ratios = [mine[k] / peer[k] for k in mine if mine[k] and peer.get(k)]
            line = f"  {name:10s} {label:10s} {statistics.median(qps) if qps else float('nan'):9.0f} qps"
            if label != "hnswlib" and ratios:
                line += f"  {statistics.median(ratios):.2f}x hnswlib (rounds: " + ", ".join(f"{x:.2f}" for x in ratios) + ")"
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
