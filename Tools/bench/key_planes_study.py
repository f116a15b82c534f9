"""Could the quantized scan read half its key codes? (docs/BENCHMARKS.md, eleventh session)

The 4-bit key codes (per group of 64 positions and channel: min and step over the keys less their mean)
split in two 2-bit planes, the high bits and the low bits, hold the same bytes. A scan of the high plane
alone scores every position with half the key bytes; the low plane then refines the groups that weigh
(by the coarse scores' mass over all positions: the value pass's detail rule counts only the tail, so this
refines a little more than that rule would), where a refined score is the 4-bit score exactly. On exact values (only the scores' effect is measured), for query groups of 4 heads:
the tail is every position but sinks (4), window (64) and the union of each head's top `C` by the
approximate score, which are attended exactly. Prints the median relative output error against exact
attention of
  - the 4-bit scan (today's scores), a 3-bit scan (the top three bits) and the 2-bit high plane alone;
  - the high plane with the low plane read for groups whose coarse mass is >= detail x the mean group
    mass of some head, and the share of groups refined (key bytes read: 0.5 + 0.5 x share of today's).

    python3 Tools/bench/key_planes_study.py synthetic DIR [C]    (DIR/keys.npy, values.npy, queries.npy)
    python3 Tools/bench/key_planes_study.py capture DIR LAYER [C] (DIR/layerLL_{keys,values,queries}.npy)
"""
import sys

import numpy as np

G, SINKS, WINDOW, HEADS = 64, 4, 64, 4


def codes(k):
    """4-bit codes per group and channel of the keys less their mean, and the dequantising arrays."""
    n, d = k.shape
    mean = k.mean(0)
    kc = (k - mean).reshape(n // G, G, d)
    lo, hi = kc.min(1, keepdims=True), kc.max(1, keepdims=True)
    step = (hi - lo) / 15
    step[step == 0] = 1
    code = np.clip(np.rint((kc - lo) / step), 0, 15)
    return mean, lo, step, code


def keys_from(mean, lo, step, levels):
    return (lo + step * levels).reshape(-1, mean.shape[0]) + mean


def attend(qh, s_exact, s_approx, v, n, c):
    """Output of the exact part (sinks, window, each head's top c by s_approx) plus the tail by s_approx."""
    exact = set(range(SINKS)) | set(range(n - WINDOW, n))
    for h in range(qh):
        exact |= set(np.argpartition(-s_approx[h], c)[:c].tolist())
    exact = np.array(sorted(exact))
    mixed = s_approx.copy()
    mixed[:, exact] = s_exact[:, exact]
    w = np.exp(mixed - mixed.max(1, keepdims=True))
    return (w @ v) / w.sum(1, keepdims=True)


def study(k, v, q, c=128, groups=10):
    n, d = k.shape
    n = n // G * G
    k, v = k[:n], v[:n]
    ng, scale = n // G, 1 / np.sqrt(d)
    mean, lo, step, code = codes(k)
    k4 = keys_from(mean, lo, step, code)
    k3 = keys_from(mean, lo, step, 2 * np.floor(code / 2) + 0.5)
    k2 = keys_from(mean, lo, step, 4 * np.floor(code / 4) + 1.5)
    picks = np.linspace(0, q.shape[0] // HEADS - 1, groups).astype(int)
    details = [0.5, 1, 2, 4]
    errors = {name: [] for name in ["4-bit", "3-bit", "2-bit"] + [f"refine {x}" for x in details]}
    shares = {x: [] for x in details}

    def error(o, exact):
        return np.median(np.linalg.norm(o - exact, axis=1) / np.linalg.norm(exact, axis=1))

    for gi in picks:
        qg = q[gi * HEADS:(gi + 1) * HEADS]
        s = qg @ k.T * scale
        w = np.exp(s - s.max(1, keepdims=True))
        exact = (w @ v) / w.sum(1, keepdims=True)
        s4, s3, s2 = (qg @ kk.T * scale for kk in (k4, k3, k2))
        for name, sa in (("4-bit", s4), ("3-bit", s3), ("2-bit", s2)):
            errors[name].append(error(attend(HEADS, s, sa, v, n, c), exact))
        mass = np.exp(s2 - s2.max(1, keepdims=True)).reshape(HEADS, ng, G).sum(2)
        for x in details:
            heavy = (mass >= x * mass.mean(1, keepdims=True)).any(0)
            shares[x].append(heavy.mean())
            sa = s2.reshape(HEADS, ng, G).copy()
            sa[:, heavy] = s4.reshape(HEADS, ng, G)[:, heavy]
            errors[f"refine {x}"].append(error(attend(HEADS, s, sa.reshape(HEADS, n), v, n, c), exact))
    for name, e in errors.items():
        line = f"  {name:>10}: median output error {np.median(e):.4f}"
        if name.startswith("refine"):
            share = np.mean(shares[float(name.split()[1])])
            line += f", groups refined {share:.2f}, key code bytes {0.5 + 0.5 * share:.2f} of the 4-bit scan's"
        print(line)


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("synthetic", "capture"):
        sys.exit(__doc__)
    if sys.argv[1] == "synthetic":
        base, c = sys.argv[2] + "/", int(sys.argv[3]) if len(sys.argv) > 3 else 128
        names = [base + f for f in ("keys.npy", "values.npy", "queries.npy")]
    else:
        if len(sys.argv) < 4:
            sys.exit(__doc__)
        base, c = f"{sys.argv[2]}/layer{sys.argv[3]}_", int(sys.argv[4]) if len(sys.argv) > 4 else 128
        names = [base + f for f in ("keys.npy", "values.npy", "queries.npy")]
    k, v, q = (np.load(f).astype(np.float32) for f in names)
    print(f"{sys.argv[2]} {sys.argv[3] if sys.argv[1] == 'capture' else ''}: {k.shape[0]} keys x {k.shape[1]}, "
          f"{HEADS} heads per group, top {c} exact")
    study(k, v, q, c)


if __name__ == "__main__":
    main()
