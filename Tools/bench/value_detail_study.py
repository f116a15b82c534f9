"""How the quantized tail's values could be read more cheaply (docs/BENCHMARKS.md, tenth session).

On a capture's exact keys and values (no codes, so only the choice of what is read is measured), for
16 query groups per layer: the tail is every position but sinks (4), window (64) and the union of each
query head's top 128; a group of 64 positions is read through its values or through its mean value.
Prints, per layer, the median relative output error of the tail's approximation and the share of value
bytes read (4-bit codes: 1.5 KB of steps and means plus 8 KB of codes per group; a mean 0.5 KB) for
  - groups chosen by mass (any head's mass >= detail x its mean group mass: the quantized method's rule),
  - the same share of groups chosen by the error their mean would make (an oracle),
  - blocks of 8 positions chosen by mass (unread positions through the group's mean less the read ones),
  - means over 32, 16 or 8 positions instead of 64 (their bytes are not counted: "value bytes nan").

    python3 Tools/bench/value_detail_study.py [capture dir: Tools/bench/out/gemma32k] [layers: 05 11 17]
"""
import sys

import numpy as np

G, B, C, SINKS, WINDOW = 64, 8, 128, 4, 64
HEADER = 1024 + 512  # f16 value mins and steps (d 256) and the mean


def tail_weights(q, k, n):
    s = q @ k.T / np.sqrt(k.shape[1])
    w = np.exp(s - s.max(1, keepdims=True))
    exact = set(range(SINKS)) | set(range(n - WINDOW, n))
    for h in range(q.shape[0]):
        exact |= set(np.argsort(-s[h])[:C].tolist())
    tail = w.copy()
    tail[:, np.array(sorted(exact))] = 0
    return w, tail


def study(capture, layer, groups=16):
    k = np.load(f"{capture}/layer{layer}_keys.npy").astype(np.float32)
    v = np.load(f"{capture}/layer{layer}_values.npy").astype(np.float32)
    queries = np.load(f"{capture}/layer{layer}_queries.npy").astype(np.float32)
    n, d = v.shape
    ng = n // G
    vg = v.reshape(ng, G, d)
    vbar = vg.mean(1)
    full_bytes = ng * (HEADER + 8192)
    rows = {}
    for qi in range(0, queries.shape[0] // 4, max(1, queries.shape[0] // 4 // groups)):
        q = queries[qi * 4:qi * 4 + 4]
        w, tail = tail_weights(q, k, n)
        z = w.sum(1)
        norm = np.linalg.norm((w @ v) / z[:, None], axis=1)
        wg = tail.reshape(4, ng, G)
        mass = wg.sum(2)
        exact_tail = np.einsum("hgi,gid->hgd", wg, vg)
        mean_error = np.einsum("hgi,gid->hgd", wg, vg - vbar[:, None, :])

        def error(approx):
            return float(np.median(np.linalg.norm((approx - exact_tail).sum(1) / z[:, None], axis=1) / norm))

        by_mass = (mass / mass.mean(1, keepdims=True)).max(0)
        oracle = np.linalg.norm(mean_error, axis=2)
        oracle = (oracle / oracle.mean(1, keepdims=True)).max(0)
        for detail in (0.5, 1.0, 2.0):
            chosen = by_mass >= detail
            approx = np.where(chosen[None, :, None], exact_tail, mass[:, :, None] * vbar[None])
            share = (chosen.sum() * (HEADER + 8192) + (~chosen).sum() * 512) / full_bytes
            rows.setdefault(f"groups by mass, detail {detail}", []).append((error(approx), share))
            best = np.zeros(ng, bool)
            best[np.argsort(-oracle)[:chosen.sum()]] = True
            approx = np.where(best[None, :, None], exact_tail, mass[:, :, None] * vbar[None])
            rows.setdefault(f"groups by oracle, same count as detail {detail}", []).append((error(approx), share))
        block_mass = tail.reshape(4, ng, G // B, B).sum(3)
        by_block = (block_mass / block_mass.reshape(4, -1).mean(1)[:, None, None]).max(0)
        for detail in (0.5, 1.0, 2.0):
            read = np.repeat(by_block >= detail, B, axis=1).astype(np.float32)
            count = read.sum(1)
            unread_mean = np.where((G - count)[:, None] > 0,
                                   (G * vbar - np.einsum("gi,gid->gd", read, vg)) / np.maximum(G - count, 1)[:, None], 0)
            read_mass = np.einsum("hgi,gi->hg", wg, read)
            approx = np.einsum("hgi,gi,gid->hgd", wg, read, vg) + (mass - read_mass)[:, :, None] * unread_mean[None]
            touched = (count > 0).sum()
            share = (touched * HEADER + count.sum() / B * 1024 + (ng - touched) * 512) / full_bytes
            rows.setdefault(f"blocks by mass, detail {detail}", []).append((error(approx), share))
        for sub in (32, 16, 8):
            vs = v.reshape(n // sub, sub, d)
            sub_error = np.einsum("hsi,sid->hsd", tail.reshape(4, n // sub, sub), vs - vs.mean(1)[:, None, :])
            chosen = by_mass >= 0.5
            err = sub_error.reshape(4, ng, G // sub, d).sum(2)[:, ~chosen, :].sum(1) / z[:, None]
            rows.setdefault(f"groups by mass, detail 0.5, means over {sub}", []).append(
                (float(np.median(np.linalg.norm(err, axis=1) / norm)), float("nan")))
    print(f"layer {layer}")
    for name, values in rows.items():
        a = np.array(values)
        print(f"  {name:48s} error {np.median(a[:, 0]):.4f}  value bytes {np.mean(a[:, 1]):.2f}")


if __name__ == "__main__":
    capture = sys.argv[1] if len(sys.argv) > 1 else "Tools/bench/out/gemma32k"
    for layer in sys.argv[2:] or ["05", "11", "17"]:
        study(capture, layer)
