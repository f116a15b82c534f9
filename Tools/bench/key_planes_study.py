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
    mass of some head, and the share of groups refined (key bytes read: 0.5 + 0.5 x share of today's);
  - then the whole step (4-bit value codes for the groups that weigh, group means for the others), its
    error and the bytes it reads against exact's f16 keys and values (their inverse: a bytes-only cap on
    the speed-up), with today's scan and with the planes.

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


def weights(s_exact, s_approx, c):
    """The positions attended exactly (sinks, window, each head's top c by s_approx) and every position's
    weight: exact scores there, s_approx elsewhere, relative to each head's maximum."""
    n = s_exact.shape[1]
    exact = set(range(SINKS)) | set(range(n - WINDOW, n))
    for h in range(s_exact.shape[0]):
        exact |= set(np.argpartition(-s_approx[h], c)[:c].tolist())
    exact = np.array(sorted(exact))
    mixed = s_approx.copy()
    mixed[:, exact] = s_exact[:, exact]
    return exact, np.exp(mixed - mixed.max(1, keepdims=True))


def attend(s_exact, s_approx, v, c):
    """Output of the exact part plus the tail by s_approx (values exact)."""
    _, w = weights(s_exact, s_approx, c)
    return (w @ v) / w.sum(1, keepdims=True)


def value_codes(v):
    """Values through their 4-bit codes (per group and channel: min and step) and each group's mean."""
    n, d = v.shape
    vg = v.reshape(n // G, G, d)
    lo, hi = vg.min(1, keepdims=True), vg.max(1, keepdims=True)
    step = (hi - lo) / 15
    step[step == 0] = 1
    return (lo + step * np.clip(np.rint((vg - lo) / step), 0, 15)).reshape(n, d), vg.mean(1)


def step_output(s_exact, s_approx, v, v4, means, c, detail):
    """The whole quantized step: sinks, window and each head's top c by s_approx attended exactly; the tail
    weighted by s_approx, through value codes in the groups whose tail mass is >= detail x the mean group's
    for some head, through the group's mean value in the others. Returns the output and the detailed share."""
    heads, n = s_exact.shape
    ng = n // G
    exact, w = weights(s_exact, s_approx, c)
    tail = w.copy()
    tail[:, exact] = 0
    mass = tail.reshape(heads, ng, G).sum(2)
    detailed = (mass >= detail * mass.mean(1, keepdims=True)).any(0)
    out = w[:, exact] @ v[exact]
    rows = np.repeat(detailed, G)
    out += tail[:, rows] @ v4[rows]
    out += mass[:, ~detailed] @ means[~detailed]
    return out / w.sum(1, keepdims=True), detailed.mean()


def step_bytes(d, refined, detailed):
    """Bytes read per position against exact's f16 keys and values (4d): key codes (4-bit, or the high plane
    plus the low plane of the refined groups) with their f16 mins and steps per group of 64, value codes of
    the detailed groups with theirs, and every other group's f16 mean."""
    keys = d / 16 + (d / 2 if refined is None else d / 4 + refined * d / 4)
    values = detailed * (d / 2 + d / 16) + (1 - detailed) * d / 32
    return (keys + values) / (4 * d)


def step_study(k, v, q, c, groups):
    """Error and bytes of the whole step, 4-bit scan or planes, at a few value details."""
    n = k.shape[0] // G * G
    k, v = k[:n], v[:n]
    d, ng, scale = k.shape[1], n // G, 1 / np.sqrt(k.shape[1])
    mean, lo, step, code = codes(k)
    k4 = keys_from(mean, lo, step, code)
    k2 = keys_from(mean, lo, step, 4 * np.floor(code / 4) + 1.5)
    v4, means = value_codes(v)
    picks = np.linspace(0, q.shape[0] // HEADS - 1, groups).astype(int)
    rows = {}
    for gi in picks:
        qg = q[gi * HEADS:(gi + 1) * HEADS]
        s = qg @ k.T * scale
        w = np.exp(s - s.max(1, keepdims=True))
        exact = (w @ v) / w.sum(1, keepdims=True)
        s4, s2 = qg @ k4.T * scale, qg @ k2.T * scale
        coarse = np.exp(s2 - s2.max(1, keepdims=True)).reshape(HEADS, ng, G).sum(2)
        variants = [("4-bit scan", None, s4)]
        for x in (1, 2):
            heavy = (coarse >= x * coarse.mean(1, keepdims=True)).any(0)
            sa = s2.reshape(HEADS, ng, G).copy()
            sa[:, heavy] = s4.reshape(HEADS, ng, G)[:, heavy]
            variants.append((f"planes, refine {x}", heavy.mean(), sa.reshape(HEADS, n)))
        for name, refined, sa in variants:
            for detail in (0.5, 2, 8):
                o, share = step_output(s, sa, v, v4, means, c, detail)
                e = np.median(np.linalg.norm(o - exact, axis=1) / np.linalg.norm(exact, axis=1))
                rows.setdefault((name, detail), []).append((e, step_bytes(d, refined, share)))
    print(f"  the whole step (value codes for groups with tail mass >= detail x mean, means for the others):")
    for (name, detail), r in rows.items():
        e, b = np.median([x[0] for x in r]), np.median([x[1] for x in r])
        print(f"  {name:>18}, detail {detail:>3}: median output error {e:.4f}, bytes {b:.3f} of exact's (cap {1 / b:.1f}x)")


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
            errors[name].append(error(attend(s, sa, v, c), exact))
        mass = np.exp(s2 - s2.max(1, keepdims=True)).reshape(HEADS, ng, G).sum(2)
        for x in details:
            heavy = (mass >= x * mass.mean(1, keepdims=True)).any(0)
            shares[x].append(heavy.mean())
            sa = s2.reshape(HEADS, ng, G).copy()
            sa[:, heavy] = s4.reshape(HEADS, ng, G)[:, heavy]
            errors[f"refine {x}"].append(error(attend(s, sa.reshape(HEADS, n), v, c), exact))
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
    step_study(k, v, q, c, 10)


if __name__ == "__main__":
    main()
