#!/usr/bin/env python3
"""Summarise repeated side-by-side runs (Tools/bench/ivf.sh): per (library, method, params) point the
median QPS over rounds, then each line's QPS and keys scanned at a target recall (interpolated between
the two sweep points around it, log-linear in QPS) and its ratio to a baseline method's.

  ivf_summary.py --recall 0.9 --baseline IndexIVFFlat [--merged median.json] run1.json run2.json ...
"""
import argparse
import json
import math
import statistics
from collections import defaultdict

SWEEP = {"nprobe", "ef", "beam", "efSearch"}


def records(path):
    with open(path) as f:
        data = json.load(f)
    return data["results"] if isinstance(data, dict) else data


def line_of(r):
    params = {k: v for k, v in r["params"].items() if k not in SWEEP}
    return (r["library"], r["method"], json.dumps(params, sort_keys=True))


def sweep_of(r):
    return next((r["params"][k] for k in SWEEP if k in r["params"]), 0)


def at_recall(points, target):
    """(qps, scanned) at `target` recall from points sorted by sweep value; None if never reached."""
    for a, b in zip(points, points[1:]):
        if a["recall"] < target <= b["recall"]:
            t = (target - a["recall"]) / (b["recall"] - a["recall"])
            qps = math.exp(math.log(a["qps"]) + t * (math.log(b["qps"]) - math.log(a["qps"])))
            sa, sb = a.get("keys_scanned_fraction"), b.get("keys_scanned_fraction")
            return qps, (None if sa is None or sb is None else sa + t * (sb - sa))
    if points and points[0]["recall"] >= target:
        return points[0]["qps"], points[0].get("keys_scanned_fraction")
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--recall", type=float, default=0.9)
    p.add_argument("--baseline", default="IndexIVFFlat")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--merged", help="write the median records here (for peers.py --plot)")
    a = p.parse_args()
    groups = defaultdict(list)
    for path in a.files:
        for r in records(path):
            if r.get("k") != a.k or r.get("query_set", "decode") != "decode" or r.get("mode", "single") != "single":
                continue
            groups[(line_of(r), sweep_of(r))].append(r)
    merged = []
    for (line, sweep), rs in groups.items():
        m = dict(rs[0])
        m["qps"] = statistics.median(r["qps"] for r in rs)
        m["median_us"] = statistics.median(r["median_us"] for r in rs)
        m["recall"] = statistics.median(r["recall"] for r in rs)
        m["rounds"] = len(rs)
        m["qps_all"] = [round(r["qps"], 1) for r in rs]
        m.pop("run", None)
        merged.append(m)
    lines = defaultdict(list)
    for m in merged:
        lines[line_of(m)].append(m)
    summary = {}
    for line, pts in lines.items():
        pts.sort(key=sweep_of)
        summary[line] = at_recall(pts, a.recall)
    base = [v for l, v in summary.items() if l[1] == a.baseline and v]
    base_qps = base[0][0] if base else None
    print(f"median over rounds; QPS and keys scanned at recall@{a.k} = {a.recall} (interpolated)")
    print(f"{'library':9s} {'method':22s} {'params':44s} {'qps':>8s} {'scanned':>8s} {'vs ' + a.baseline:>18s}")
    for line, v in sorted(summary.items(), key=lambda kv: -(kv[1][0] if kv[1] else 0)):
        if v is None:
            print(f"{line[0]:9s} {line[1]:22s} {line[2]:44s} {'never':>8s}")
            continue
        ratio = f"{v[0] / base_qps:.2f}x" if base_qps else "-"
        sc = "-" if v[1] is None else f"{100 * v[1]:.1f}%"
        print(f"{line[0]:9s} {line[1]:22s} {line[2]:44s} {v[0]:8.0f} {sc:>8s} {ratio:>18s}")
    print()
    print("per point (median qps [per round]):")
    for line, pts in sorted(lines.items()):
        for m in pts:
            print(f"  {line[0]:9s} {line[1]:18s} {sweep_of(m):5d}  recall {m['recall']:.3f}  scanned "
                  f"{(m.get('keys_scanned_fraction') or 0) * 100:5.1f}%  qps {m['qps']:8.0f} {m['qps_all']}")
    if a.merged:
        with open(a.merged, "w") as f:
            json.dump(merged, f, indent=1)


if __name__ == "__main__":
    main()
