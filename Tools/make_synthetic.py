#!/usr/bin/env python3
"""Deterministic generator of LLM-like attention data (keys, values, queries) for KVRecall.

Writes float32 .npy files into an output directory:

  keys.npy             (N, d)   the KV cache keys, in sequence order
  values.npy           (N, d)   the matching values
  prefill_queries.npy  (P, d)   queries from the prefill phase (same distribution as decode queries);
                                a query-aware index (RetrievalAttention / RoarGraph) is built from these
  queries.npy          (Q, d)   decode queries: OUT of the key distribution; what every index is judged on
  key_queries.npy      (H, d)   held-out keys (removed from keys.npy) used as IN-distribution queries
  meta.json                     parameters, the recipe, and measured statistics (self-check)

and, with --f16, float16 copies `*_f16.npy` of keys/values/queries.

Only numpy is needed. `--check-hnsw` additionally measures hnswlib recall@10 if hnswlib is importable.

Recipe (why it is hard for key-only ANN, see DESIGN.md sections 1 and 7 and Tools/bench/README.md):

* A low-rank latent is shared by keys and queries. Key i belongs to a "topic" (the sequence is cut into
  segments of geometric length, mean --segment tokens, each segment draws one of --topics topics, so topics
  recur along the sequence). Its key is

      k_i = R a_i + S b_i + drift(i) + m_k

  R (d x r) and S (d x (d-r)) are complementary orthonormal bases of a random rotation. The latent a_i =
  A_t + within-topic noise (std --rel-within, large) lives in the r-dim subspace that queries read; b_i =
  B_t + noise lives in the (d-r)-dim rest and makes the topics well separated clusters in key space.
  drift(i) is a smooth positional drift (a few slow sinusoids along random directions). m_k is a large
  common offset that sits in a few high-magnitude channels (--outlier-channels, total norm --key-offset,
  with per-token magnitude jitter), as in real LLM keys.
* A query is q = R G w + m_q: w is drawn like a key latent (topic of a random position, plus noise) but
  mapped by a DIFFERENT linear map G (r x r), and m_q is a large common offset orthogonal to m_k.
  So q.k ranks keys through (G w).a_i (query specific) plus m_q.(S b_i) (a topic-level prior shared by all
  queries, which is what lets clustering indexes work), while in L2 and in key-key inner product the
  queries are nowhere near the key cloud.
* Key-only graphs fail: the key-key inner products that build an HNSW graph (IP metric) are dominated by
  the huge common offset m_k, so the graph links every key to the same few hub keys along m_k and the
  query-relevant keys are not graph neighbours of each other; greedy/beam search stalls. Clustering
  indexes (IVF, spherical k-means on key directions) still find the relevant topics by centroid score.
  CAVEAT: subtracting the key mean (which leaves every query's IP ranking unchanged) removes the hubs and
  HNSW then works (recall@10 ~0.96 at ef 1024). For data that stays hard for every key-only index, even
  centred, use --outlier-jitter 0.3 --query-reads-outliers 0 (IVF then fails too). See Tools/bench/README.md.
* Each query is rescaled so the std over keys of its scaled logits q.k/sqrt(d) equals --sharpness.
  Sharp (default 7.0): exact top-100 holds ~98% of the softmax mass. Soft (e.g. 2.0): diffuse heads.
  Named presets: --sharpness sharp (7.0), medium (4.0), soft (2.0).

Second recipe, --family drift (no topic clusters; unlike the above on purpose; see generate_drift and
Tools/bench/README.md "The second family"): keys are iid anisotropic content plus a mean that drifts
with the position (an Ornstein-Uhlenbeck walk) plus massive channels in low-frequency RoPE pairs (a
slowly turning mean, a sink at position 0), all rotated by RoPE; a query looks for the content of a
few earlier positions (some recent) through a partly rotated basis, plus its own offset; default
sharpness 3.0 with a per-query jitter of 0.25, so heads range from sharp to diffuse.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

SHARPNESS_PRESETS = {"sharp": 7.0, "medium": 4.0, "soft": 2.0}
FAMILIES = ("topics", "drift")
# Options that only one family reads (left out of the other family's meta.json).
FAMILY_ONLY = {
    "topics": ("rank", "topics", "segment", "rel_between", "rel_within", "irr_between", "irr_within",
               "key_offset", "outlier_jitter", "irr_scale_sigma", "query_reads_outliers"),
    "drift": ("drift_tokens", "drift_dims", "spectrum_decay", "massive_scale", "massive_jitter", "rope_base",
              "query_rotation", "targets", "recent_targets", "recent_span", "query_noise", "query_reads_massive",
              "sink"),
}
# Options whose default depends on the family (argparse default None, filled in parse_args).
FAMILY_DEFAULTS = {
    "topics": {"drift": 1.0, "query_offset": 20.0, "sharpness": "sharp", "sharpness_jitter": 0.0},
    "drift": {"drift": 0.4, "query_offset": 1.0, "sharpness": 3.0, "sharpness_jitter": 0.25},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created); keep it out of the repo "
                   "or in a git-ignored folder such as Tools/bench/out/")
    p.add_argument("--n", type=int, default=131072, help="number of keys (default 131072)")
    p.add_argument("--d", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--queries", type=int, default=1000, help="decode queries (default 1000)")
    p.add_argument("--prefill", type=int, default=4096, help="prefill queries (default 4096)")
    p.add_argument("--key-queries", type=int, default=1000, help="held-out keys used as queries (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=FAMILIES, default="topics",
                   help="data family: 'topics' (default; topic clusters along the sequence, the recipe above) "
                        "or 'drift' (no clusters: positional drift, RoPE, massive channels, partly rotated "
                        "queries; see the second recipe above)")
    p.add_argument("--sharpness", default=None,
                   help="std of the scaled logits q.k/sqrt(d) per query, or a preset: "
                        + ", ".join(f"{k}={v}" for k, v in SHARPNESS_PRESETS.items()) + " (default sharp; with --family drift 3.0)")
    p.add_argument("--sharpness-jitter", type=float, default=None,
                   help="log-normal sigma of a per-query sharpness factor (default 0: all queries equal; "
                        "with --family drift 0.25)")
    p.add_argument("--rank", type=int, default=16, help="rank r of the shared latent (default 16)")
    p.add_argument("--topics", type=int, default=512, help="number of topics / key clusters (default 512)")
    p.add_argument("--segment", type=float, default=128.0, help="mean segment length in tokens (default 128)")
    p.add_argument("--rel-between", type=float, default=1.0, help="std of topic means in the latent (1.0)")
    p.add_argument("--rel-within", type=float, default=4.0,
                   help="std of the latent within a topic (4.0); larger spreads a query's top keys over "
                        "more clusters and makes IVF scan more")
    p.add_argument("--irr-between", type=float, default=3.0, help="std of topic means in the other dims (3.0)")
    p.add_argument("--irr-within", type=float, default=1.0, help="std within a topic in the other dims (1.0)")
    p.add_argument("--outlier-channels", type=int, default=4,
                   help="high-magnitude key channels (default 4; with --family drift: the massive channels)")
    p.add_argument("--key-offset", type=float, default=200.0,
                   help="norm of the common key offset carried by the outlier channels (default 200, "
                        "in units where the rest of a key has norm ~40); larger makes key-only HNSW worse")
    p.add_argument("--outlier-jitter", type=float, default=0.05,
                   help="relative per-token jitter of the outlier channel magnitudes (default 0.05)")
    p.add_argument("--query-offset", type=float, default=None,
                   help="norm of the common query offset, orthogonal to the key offset (default 20); with "
                        "--family drift: its norm relative to a key's content norm sqrt(d) (default 1.0)")
    p.add_argument("--irr-scale-sigma", type=float, default=0.0,
                   help="log-normal sigma of a per-key scale on the non-latent part (default 0)")
    p.add_argument("--query-reads-outliers", type=float, default=1.0,
                   help="factor on the query components in the outlier channels (default 1; 0 = queries "
                        "ignore the outlier channels)")
    p.add_argument("--drift", type=float, default=None,
                   help="positional drift amplitude (default 1.0); with --family drift: RMS norm of the "
                        "drifting key mean relative to the content norm sqrt(d) (default 0.4)")
    g2 = p.add_argument_group("family drift (only with --family drift)")
    g2.add_argument("--drift-tokens", type=float, default=4096.0,
                    help="correlation length in tokens of the drifting key and value means (an "
                         "Ornstein-Uhlenbeck walk in --drift-dims directions; default 4096)")
    g2.add_argument("--drift-dims", type=int, default=8, help="directions the key mean walks in (default 8)")
    g2.add_argument("--spectrum-decay", type=float, default=1.0,
                    help="content variance of principal direction j ~ (1 + j/8)^-decay (default 1.0)")
    g2.add_argument("--massive-scale", type=float, default=12.0,
                    help="magnitude of each massive channel before RoPE, in units of the content RMS per "
                         "channel (default 12)")
    g2.add_argument("--massive-jitter", type=float, default=0.05,
                    help="relative per-token jitter of the massive channels (default 0.05)")
    g2.add_argument("--rope-base", type=float, default=500000.0,
                    help="RoPE base (rotate-half pairs i, i+d/2); keys rotate by their position, queries by "
                         "theirs; the massive channels sit in low-frequency pairs (default 500000)")
    g2.add_argument("--query-rotation", type=float, default=50.0,
                    help="angle in degrees of the partial rotation between the key basis and the basis "
                         "queries read it in (every principal angle equal; 0 = same basis, 90 = a query's "
                         "own target is orthogonal; default 50)")
    g2.add_argument("--targets", type=int, default=4,
                    help="earlier positions whose content a query looks for (default 4)")
    g2.add_argument("--recent-targets", type=float, default=0.25,
                    help="probability that a target is one of the last --recent-span positions (default 0.25)")
    g2.add_argument("--recent-span", type=int, default=1024, help="see --recent-targets (default 1024)")
    g2.add_argument("--query-noise", type=float, default=1.0,
                    help="std of the query's own content noise relative to its target signal (default 1.0)")
    g2.add_argument("--query-reads-massive", type=float, default=0.15,
                    help="norm of a query's component on the massive channels relative to its content "
                         "norm (default 0.15: a soft recency/sink preference)")
    g2.add_argument("--sink", type=float, default=4.0,
                    help="factor on the massive channels of position 0 (an attention sink; default 4)")
    p.add_argument("--f16", action="store_true", help="also write float16 copies (*_f16.npy)")
    p.add_argument("--stats-queries", type=int, default=200,
                   help="decode queries used for the measured statistics (default 200)")
    p.add_argument("--check-ivf", action="store_true",
                   help="also run a numpy spherical k-means IVF (nlist ~ 4 sqrt(N)) and report recall@100 "
                        "against the fraction of keys scanned (a few seconds at 131072 x 128)")
    p.add_argument("--check-hnsw", action="store_true",
                   help="also build an hnswlib index (IP, M=16, efC=200) and report recall@10 at ef 1024 "
                        "for decode queries and held-out keys (needs hnswlib; ~20 s at 131072 x 128)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    fam_defaults = FAMILY_DEFAULTS[a.family]
    for k, v in fam_defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if isinstance(a.sharpness, str) and a.sharpness in SHARPNESS_PRESETS:
        a.sharpness = SHARPNESS_PRESETS[a.sharpness]
    else:
        try:
            a.sharpness = float(a.sharpness)
        except ValueError:
            p.error(f"--sharpness: a number or one of {', '.join(SHARPNESS_PRESETS)}")
    if a.rank >= a.d:
        p.error("--rank must be smaller than --d")
    if a.outlier_channels >= a.d:
        p.error("--outlier-channels must be smaller than --d")
    if a.family == "drift":
        if a.d % 2:
            p.error("--family drift needs an even --d (RoPE pairs)")
        if a.outlier_channels > a.d // 8:
            p.error("--family drift: --outlier-channels must be at most d/8 (they sit in the low-frequency RoPE pairs)")
        if a.targets < 1 or a.drift_dims < 1 or a.drift_dims > a.d or a.drift_tokens <= 0:
            p.error("--targets, --drift-dims must be positive (drift-dims <= d), --drift-tokens > 0")
    return a


def _outputs(a, rng, K, V, keep, hold, Qp, Qd):
    """The set's arrays: kept keys and values, held-out keys, and the prefill and decode queries
    scaled so that each query's std of q.k/sqrt(d) over a fixed key sample is the target sharpness."""
    Kf = np.ascontiguousarray(K[keep])
    d = Kf.shape[1]
    samp = Kf[np.linspace(0, len(Kf) - 1, num=min(len(Kf), 8192)).astype(np.int64)].astype(np.float64)

    def calibrate(Q):
        if len(Q) == 0:
            return Q.astype(np.float32)
        sd = (Q @ samp.T).std(axis=1) / np.sqrt(d)
        target = np.full(len(Q), a.sharpness)
        if a.sharpness_jitter > 0:
            target = target * np.exp(a.sharpness_jitter * rng.standard_normal(len(Q)))
        return (Q * (target / sd)[:, None]).astype(np.float32)

    return {
        "keys": Kf,
        "values": np.ascontiguousarray(V[keep]),
        "prefill_queries": calibrate(Qp),
        "queries": calibrate(Qd),
        "key_queries": np.ascontiguousarray(K[hold]),
    }


def generate(a):
    """Returns dict of float32 arrays and a dict of generation facts. Deterministic in a.seed."""
    rng = np.random.default_rng(a.seed)
    d, r, C = a.d, a.rank, a.topics
    ntot = a.n + a.key_queries  # held-out keys are drawn from the same sequence

    # Random rotation split into the query-read latent subspace R and the rest S.
    U, _ = np.linalg.qr(rng.standard_normal((d, d)))
    R, S = U[:, :r], U[:, r:]

    # Topics along the sequence: segments of geometric length, each draws a topic.
    p_end = 1.0 / max(a.segment, 1.0)
    lens = rng.geometric(p_end, size=int(ntot * p_end * 2) + 16)
    while lens.sum() < ntot:  # extremely unlikely; keeps determinism either way
        lens = np.concatenate([lens, rng.geometric(p_end, size=len(lens))])
    ends = np.cumsum(lens)
    nseg = int(np.searchsorted(ends, ntot - 1, side="right")) + 1
    seg_topic = rng.integers(0, C, size=nseg)
    pos = np.arange(ntot)
    topic = seg_topic[np.searchsorted(ends, pos, side="right")]

    A = rng.standard_normal((C, r)) * a.rel_between          # topic means in the latent
    B = rng.standard_normal((C, d - r)) * a.irr_between      # topic means in the other dims
    lat = (A[topic] + rng.standard_normal((ntot, r)) * a.rel_within).astype(np.float32)
    oth = rng.standard_normal((ntot, d - r)) * a.irr_within
    if a.irr_scale_sigma > 0:
        oth *= np.exp(a.irr_scale_sigma * rng.standard_normal((ntot, 1)))
    oth = (B[topic] + oth).astype(np.float32)
    K = lat @ R.T.astype(np.float32) + oth @ S.T.astype(np.float32)

    # Smooth positional drift: a few slow sinusoids along random directions.
    nd = 4
    ddirs = rng.standard_normal((nd, d))
    ddirs /= np.linalg.norm(ddirs, axis=1, keepdims=True)
    periods = rng.uniform(ntot / 8.0, ntot * 2.0, size=nd)
    phases = rng.uniform(0, 2 * np.pi, size=nd)
    wave = np.sin(2 * np.pi * pos[:, None] / periods[None, :] + phases[None, :]).astype(np.float32)
    K += (a.drift * np.sqrt(d)) * (wave @ ddirs.astype(np.float32))

    # Large common key offset carried by a few high-magnitude channels, with per-token jitter.
    ch = np.sort(rng.choice(d, size=a.outlier_channels, replace=False))
    signs = rng.choice([-1.0, 1.0], size=a.outlier_channels)
    per_ch = a.key_offset / np.sqrt(max(a.outlier_channels, 1))
    mk = np.zeros(d)
    mk[ch] = signs * per_ch
    if a.outlier_channels:
        jit = 1.0 + a.outlier_jitter * rng.standard_normal((ntot, a.outlier_channels))
        K[:, ch] += (signs * per_ch)[None, :].astype(np.float32) * jit.astype(np.float32)

    # Values: topic-dependent mean plus noise (so attention outputs differ between topics).
    Vt = rng.standard_normal((C, d)).astype(np.float32)
    V = Vt[topic] + rng.standard_normal((ntot, d)).astype(np.float32)

    # Held-out keys (in-distribution queries).
    perm = rng.permutation(ntot)
    hold = np.sort(perm[: a.key_queries])
    keep = np.sort(perm[a.key_queries:])

    # Queries: a DIFFERENT linear map G of a latent drawn like a key's, plus a common offset orthogonal
    # to the key offset.
    G = rng.standard_normal((r, r)) / np.sqrt(r)
    mq = rng.standard_normal(d)
    mk_unit = mk / (np.linalg.norm(mk) or 1.0)
    mq -= (mq @ mk_unit) * mk_unit
    mq *= a.query_offset / np.linalg.norm(mq)

    def make_queries(nq):
        src = rng.integers(0, ntot, size=nq)  # topic of a random position of the sequence
        w = A[topic[src]] + rng.standard_normal((nq, r)) * a.rel_within
        q = (w @ G.T) @ R.T + mq[None, :]
        q[:, ch] *= a.query_reads_outliers
        return q

    Qp = make_queries(a.prefill)
    Qd = make_queries(a.queries)

    out = _outputs(a, rng, K, V, keep, hold, Qp, Qd)
    facts = {
        "outlier_channels": ch.tolist(),
        "segments": int(nseg),
        "heldout_positions_first10": hold[:10].tolist(),
        "key_positions": "keys.npy row i is sequence position keep[i]; held-out positions removed",
    }
    return out, facts


def _ou_walk(rng, n, dims, tau):
    """Ornstein-Uhlenbeck walk, n steps x dims, unit stationary std, correlation exp(-|dt|/tau)."""
    rho = float(np.exp(-1.0 / tau))
    eps = rng.standard_normal((n, dims)) * np.sqrt(1.0 - rho * rho)
    x = np.empty((n, dims))
    prev = rng.standard_normal(dims)
    # The recursion in blocks: x[t] = rho^(t-s) x[s] + sum rho^(t-u) eps[u]; a python loop over
    # blocks of 1024 with a vectorised in-block solve keeps it fast and exact.
    blk = 1024
    powers = rho ** np.arange(blk + 1)
    tt = np.arange(blk)
    wfull = np.tril(powers[np.abs(tt[:, None] - tt[None, :])])  # wfull[t, u] = rho^(t-u), u <= t
    for s in range(0, n, blk):
        e = eps[s:s + blk]
        m = len(e)
        x[s:s + m] = wfull[:m, :m] @ e + powers[1:m + 1, None] * prev[None, :]
        prev = x[s + m - 1]
    return x


def rope(X, positions, base):
    """Rotate-half RoPE (dimension i pairs with i + d/2, angle pos * base^(-2i/d)), float64 angles."""
    d = X.shape[1]
    h = d // 2
    inv = base ** (-2.0 * np.arange(h) / d)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = X[:, :h], X[:, h:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=1)


def generate_drift(a):
    """Family 'drift': no topic clusters. Returns dict of float32 arrays and a dict of facts.

    Per position i (0-based, pre-RoPE, content RMS 1 per channel):
        k_i = RoPE_i( c_i + w(i) + m_i )
    c_i   iid anisotropic Gaussian content (random principal basis U, variances (1 + j/8)^-decay),
          scaled per token by a log-normal factor (sigma 0.07): no clusters, no topics;
    w(i)  a drifting mean: an Ornstein-Uhlenbeck walk (correlation length --drift-tokens) in
          --drift-dims random directions, RMS norm --drift * sqrt(d);
    m_i   massive channels: --outlier-channels channels in low-frequency RoPE pairs with magnitude
          --massive-scale (5 % jitter); RoPE turns them slowly with the position (a rotating mean);
          position 0 carries --sink times more (an attention sink).
    A query at position p for target positions j_1..j_T:
        q = RoPE_p( Rq (sum_t c_{j_t} / sqrt(T) + noise) + m_q + r * m )
    Rq    a partial rotation (every principal angle --query-rotation degrees) of the key basis;
    m_q   the query's own offset (random direction, norm --query-offset * sqrt(d));
    r m   a small component on the massive channels (--query-reads-massive): a soft preference
          for the sink and, through the slow RoPE turn, for nearby positions.
    Values: iid anisotropic content + their own drifting mean (half the keys' drift), per-token scale.
    Decode queries sit at positions ntot..ntot+Q-1 (right after the keys), targets uniform over the
    sequence; prefill queries at uniform positions p with targets uniform in [0, p]; each target is
    instead one of the --recent-span positions before the query with probability --recent-targets.
    Each query is rescaled to --sharpness like family 'topics'.
    """
    rng = np.random.default_rng([a.seed, 20241])  # a stream of its own: never equal to family topics
    d = a.d
    h = d // 2
    ntot = a.n + a.key_queries
    pos = np.arange(ntot)

    U, _ = np.linalg.qr(rng.standard_normal((d, d)))
    var = (1.0 + np.arange(d) / 8.0) ** (-a.spectrum_decay)
    var *= d / var.sum()                                     # E|c|^2 = d: RMS 1 per channel
    L = (U * np.sqrt(var)[None, :]).astype(np.float32)       # c = L g
    C = rng.standard_normal((ntot, d), dtype=np.float32) @ L.T
    C *= np.exp(0.07 * rng.standard_normal((ntot, 1))).astype(np.float32)

    # Drifting mean: OU walk in drift_dims random directions.
    Bw, _ = np.linalg.qr(rng.standard_normal((d, a.drift_dims)))
    walk = _ou_walk(rng, ntot, a.drift_dims, a.drift_tokens)
    W = (walk @ Bw.T) * (a.drift * np.sqrt(d) / np.sqrt(a.drift_dims))

    # Massive channels: spread over the lowest-frequency quarter of the RoPE pairs (d 128, base 5e5:
    # turn periods from ~118K tokens to ~2.5M: nearly constant over 32K, one turns once over 128K).
    nm = a.outlier_channels
    pairs = np.arange(h - h // 4, h)
    if nm:
        pick = np.unique(np.linspace(0, len(pairs) - 1, num=nm).round().astype(int))
        mpairs = pairs[pick]
        while len(mpairs) < nm:  # (only if nm exceeds the distinct picks)
            mpairs = np.unique(np.concatenate([mpairs, rng.choice(pairs, nm - len(mpairs))]))
        member = rng.integers(0, 2, size=nm)                 # first or second member of the pair
        ch = np.sort(mpairs + member * h)
    else:
        ch = np.zeros(0, dtype=np.int64)
    signs = rng.choice([-1.0, 1.0], size=nm)
    mvec = np.zeros(d)
    mvec[ch] = signs * a.massive_scale
    M = np.zeros((ntot, d), dtype=np.float32)
    if nm:
        jit = 1.0 + a.massive_jitter * rng.standard_normal((ntot, nm))
        M[:, ch] = (mvec[ch][None, :] * jit).astype(np.float32)
        M[0, ch] *= a.sink

    K = rope((C + W + M).astype(np.float64), pos, a.rope_base).astype(np.float32)

    # Values: own content, own drift (half the keys' amplitude), per-token scale.
    Uv, _ = np.linalg.qr(rng.standard_normal((d, d)))
    varv = (1.0 + np.arange(d) / 16.0) ** (-0.5)
    varv *= d / varv.sum()
    Lv = (Uv * np.sqrt(varv)[None, :]).astype(np.float32)
    Bv, _ = np.linalg.qr(rng.standard_normal((d, a.drift_dims)))
    wv = _ou_walk(rng, ntot, a.drift_dims, a.drift_tokens) @ Bv.T * (0.5 * a.drift * np.sqrt(d) / np.sqrt(a.drift_dims))
    V = (rng.standard_normal((ntot, d), dtype=np.float32) @ Lv.T + wv.astype(np.float32))
    V *= np.exp(0.1 * rng.standard_normal((ntot, 1))).astype(np.float32)

    perm = rng.permutation(ntot)
    hold = np.sort(perm[: a.key_queries])
    keep = np.sort(perm[a.key_queries:])

    # Partial rotation: random pairing of dimensions (in a random basis), each pair turned by alpha.
    P, _ = np.linalg.qr(rng.standard_normal((d, d)))
    al = np.deg2rad(a.query_rotation)
    G = np.eye(d)
    for i in range(0, d - 1, 2):
        G[i, i] = G[i + 1, i + 1] = np.cos(al)
        G[i, i + 1], G[i + 1, i] = -np.sin(al), np.sin(al)
    Rq = P @ G @ P.T
    mq = rng.standard_normal(d)
    mq *= a.query_offset * np.sqrt(d) / np.linalg.norm(mq)
    mhat = mvec / (np.linalg.norm(mvec) or 1.0)

    def make_queries(qpos, tmax):
        nq = len(qpos)
        tmax = np.asarray(tmax)[:, None]
        tg = (rng.random((nq, a.targets)) * (tmax + 1)).astype(np.int64)
        # some targets are recent: uniform over the last --recent-span positions before the query
        recent = rng.random((nq, a.targets)) < a.recent_targets
        back = (rng.random((nq, a.targets)) * a.recent_span).astype(np.int64)
        tg = np.where(recent, np.maximum(tmax - back, 0), tg)
        sig = C[tg].sum(axis=1).astype(np.float64) / np.sqrt(a.targets)
        noise = (rng.standard_normal((nq, d)) @ L.T.astype(np.float64)) * a.query_noise
        content = (sig + noise) @ Rq.T
        cn = np.linalg.norm(content, axis=1, keepdims=True)
        q = content + mq[None, :] + a.query_reads_massive * cn * mhat[None, :]
        return rope(q, qpos, a.rope_base), tg

    pp = rng.integers(1, ntot, size=a.prefill)
    Qp, _ = make_queries(pp, pp)
    dpos = ntot + np.arange(a.queries)
    Qd, dtg = make_queries(dpos, np.full(a.queries, ntot - 1))

    out = _outputs(a, rng, K, V, keep, hold, Qp, Qd)
    facts = {
        "family": "drift",
        "massive_channels": ch.tolist(),
        "massive_rope_periods_tokens": [float(2 * np.pi / a.rope_base ** (-2.0 * (c % h) / d)) for c in ch],
        "decode_query_positions": [int(dpos[0]), int(dpos[-1])] if len(dpos) else [],
        "decode_targets_first3": dtg[:3].tolist(),
        "heldout_positions_first10": hold[:10].tolist(),
        "key_positions": "keys.npy row i is sequence position keep[i]; held-out positions removed",
    }
    return out, facts


def topk_rows(Q, K, k, block=256, with_mass=True):
    """Exact top-k indices (sorted by score, descending) and the softmax mass they hold, numpy only."""
    d = K.shape[1]
    idx = np.empty((len(Q), k), dtype=np.int64)
    mass = np.empty(len(Q))
    mass10 = np.empty(len(Q))
    for s in range(0, len(Q), block):
        sc = Q[s:s + block] @ K.T
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(sc, part, axis=1)
        order = np.argsort(-ps, axis=1)
        idx[s:s + block] = np.take_along_axis(part, order, axis=1)
        if not with_mass:
            continue
        z = sc.astype(np.float64) / np.sqrt(d)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        tot = e.sum(axis=1)
        top = np.take_along_axis(e, idx[s:s + block], axis=1)
        mass[s:s + block] = top.sum(axis=1) / tot
        mass10[s:s + block] = top[:, :10].sum(axis=1) / tot
    return idx, mass, mass10


def recall(found, truth, k):
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def spherical_kmeans(X, nlist, iters, rng):
    """Minimal spherical k-means (as faiss IVF with the IP metric trains: unit centroids, max-IP assign)."""
    C = X[rng.choice(len(X), size=nlist, replace=False)].astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    for _ in range(iters):
        asg = np.argmax(X @ C.T, axis=1)
        S = np.zeros_like(C)
        np.add.at(S, asg, X)
        nz = np.linalg.norm(S, axis=1)
        empty = nz == 0
        S[empty] = X[rng.choice(len(X), size=int(empty.sum()), replace=False)]
        C = S / np.linalg.norm(S, axis=1, keepdims=True)
    asg = np.argmax(X @ C.T, axis=1)
    return C, asg


def ivf_check(K, Q, truth100, seed):
    rng = np.random.default_rng(seed + 1)
    nlist = int(round(4 * np.sqrt(len(K))))
    C, asg = spherical_kmeans(K, nlist, iters=10, rng=rng)
    sizes = np.bincount(asg, minlength=nlist)
    lists = [np.flatnonzero(asg == c) for c in range(nlist)]
    rows = []
    for frac_probe in (1 / 128, 1 / 32, 1 / 16, 1 / 8, 1 / 4):
        nprobe = max(1, int(round(nlist * frac_probe)))
        cs = Q @ C.T
        probe = np.argpartition(-cs, nprobe - 1, axis=1)[:, :nprobe]
        rec, scanned = [], []
        for qi in range(len(Q)):
            cand = np.concatenate([lists[c] for c in probe[qi]])
            scanned.append(len(cand) / len(K))
            s = K[cand] @ Q[qi]
            top = cand[np.argsort(-s)[:100]]
            rec.append(len(set(top.tolist()) & set(truth100[qi].tolist())) / 100)
        rows.append({"nprobe": nprobe, "scanned_fraction": float(np.mean(scanned)),
                     "recall_at_100": float(np.mean(rec))})
    return {"nlist": nlist, "kmeans": "spherical, 10 iterations, numpy", "curve": rows}


def hnsw_check(K, Qs, threads=2):
    import hnswlib  # optional
    p = hnswlib.Index(space="ip", dim=K.shape[1])
    p.init_index(max_elements=len(K), ef_construction=200, M=16, random_seed=1)
    p.set_num_threads(threads)
    p.add_items(K)
    out = {"library": "hnswlib", "M": 16, "ef_construction": 200}
    for ef in (128, 1024):
        p.set_ef(ef)
        for name, (Q, truth) in Qs.items():
            I, _ = p.knn_query(Q, k=10)
            out[f"{name}_recall_at_10_ef{ef}"] = recall(I, truth, 10)
    return out


def main(argv=None):
    a = parse_args(argv)
    log = (lambda *x: None) if a.quiet else (lambda *x: print(*x, file=sys.stderr, flush=True))
    t0 = time.time()
    arrays, facts = (generate_drift if a.family == "drift" else generate)(a)
    t_gen = time.time() - t0
    os.makedirs(a.out, exist_ok=True)
    for name, arr in arrays.items():
        np.save(os.path.join(a.out, f"{name}.npy"), arr.astype(np.float32, copy=False))
        if a.f16 and name in ("keys", "values", "queries", "prefill_queries", "key_queries"):
            np.save(os.path.join(a.out, f"{name}_f16.npy"), arr.astype(np.float16))
    t_write = time.time() - t0 - t_gen
    log(f"generated {a.n} x {a.d} in {t_gen:.2f} s (written in {t_write:.2f} s) -> {a.out}")

    # ---- self-check statistics -------------------------------------------------------------
    K, Q, KQ, QP = arrays["keys"], arrays["queries"], arrays["key_queries"], arrays["prefill_queries"]
    k100 = min(100, len(K))
    ns = min(a.stats_queries, len(Q))
    Qs = Q[:ns]
    truth, mass, mass10 = topk_rows(Qs, K, k100)
    mk, mq = K.mean(axis=0), Q.mean(axis=0)
    key_spread = float(np.sqrt(((K - mk) ** 2).sum(axis=1).mean()))
    cos = float(mq @ mk / (np.linalg.norm(mq) * np.linalg.norm(mk) + 1e-30))
    stats = {
        "generate_seconds": round(t_gen, 3),
        "stats_queries": int(ns),
        "top100_mass_mean": float(mass.mean()),
        "top100_mass_median": float(np.median(mass)),
        "top100_mass_p10": float(np.percentile(mass, 10)),
        "top10_mass_mean": float(mass10.mean()),
        "key_norm_mean": float(np.linalg.norm(K, axis=1).mean()),
        "query_norm_mean": float(np.linalg.norm(Q, axis=1).mean()),
        "key_spread_rms": key_spread,
        "query_to_key_mean_distance_over_key_spread": float(np.linalg.norm(mq - mk) / key_spread),
        "cos_query_mean_key_mean": cos,
    }
    # Mean distance of a query to its nearest key vs a held-out key to its nearest key (OOD-ness).
    nn_q = np.sqrt(np.maximum(0, ((Qs[:50, None, :] - K[None, :4096]) ** 2).sum(-1).min(1)))
    nn_k = np.sqrt(np.maximum(0, ((KQ[:50, None, :] - K[None, :4096]) ** 2).sum(-1).min(1)))
    stats["nn_distance_query_over_heldout_key"] = float(nn_q.mean() / (nn_k.mean() + 1e-30))
    # Overlap of decode top-100 with the union of prefill top-100 (what a query-aware index can learn).
    if len(QP):
        ptruth, _, _ = topk_rows(QP, K, k100, with_mass=False)
        seen = np.zeros(len(K), dtype=bool)
        seen[ptruth.ravel()] = True
        stats["decode_top100_covered_by_prefill_top100"] = float(seen[truth].mean())
        stats["prefill_top100_distinct_keys_fraction"] = float(seen.mean())
    # Key-space spread of a query's own top-10 (are they key-space neighbours of each other?).
    t10 = K[truth[:, :10]]
    within = np.sqrt(((t10[:, :, None, :] - t10[:, None, :, :]) ** 2).sum(-1)).mean()
    rnd = K[np.random.default_rng(a.seed + 7).integers(0, len(K), size=(ns, 10))]
    between = np.sqrt(((rnd[:, :, None, :] - rnd[:, None, :, :]) ** 2).sum(-1)).mean()
    stats["top10_pairwise_distance_over_random_pairs"] = float(within / between)
    log(f"exact top-100 softmax mass (scale 1/sqrt(d)): mean {stats['top100_mass_mean']:.3f} "
        f"median {stats['top100_mass_median']:.3f} p10 {stats['top100_mass_p10']:.3f}; "
        f"top-10 mass mean {stats['top10_mass_mean']:.3f}")
    log(f"OOD: cos(mean q, mean k) {cos:+.3f}; |mean q - mean k| = "
        f"{stats['query_to_key_mean_distance_over_key_spread']:.2f} x key spread; nearest-key distance "
        f"query/held-out key = {stats['nn_distance_query_over_heldout_key']:.2f}")
    if "decode_top100_covered_by_prefill_top100" in stats:
        log(f"decode top-100 keys found among the prefill queries' top-100: "
            f"{stats['decode_top100_covered_by_prefill_top100']:.3f}")
    if a.check_ivf:
        t = time.time()
        stats["ivf_check"] = ivf_check(K, Qs, truth, a.seed)
        log(f"IVF check (numpy spherical k-means, nlist {stats['ivf_check']['nlist']}, {time.time() - t:.1f} s): "
            + ", ".join(f"scan {r['scanned_fraction']:.3f} -> R@100 {r['recall_at_100']:.3f}"
                        for r in stats["ivf_check"]["curve"]))
    if a.check_hnsw:
        try:
            t = time.time()
            ktruth, _, _ = topk_rows(KQ[:ns], K, 10, with_mass=False)
            stats["hnsw_check"] = hnsw_check(K, {"decode": (Qs, truth), "heldout_keys": (KQ[:ns], ktruth)})
            log(f"hnswlib check ({time.time() - t:.1f} s): " + ", ".join(
                f"{k} {v:.3f}" for k, v in stats["hnsw_check"].items() if k.endswith(("ef128", "ef1024"))))
        except ImportError:
            log("hnswlib not importable: skipped --check-hnsw")

    meta = {
        "generator": "Tools/make_synthetic.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "params": {k: v for k, v in vars(a).items()
                   if k not in ("out", "quiet") and k not in FAMILY_ONLY[[f for f in FAMILIES if f != a.family][0]]},
        "numpy_version": np.__version__,
        "files": {name: {"shape": list(arr.shape), "dtype": "float32"} for name, arr in arrays.items()},
        "facts": facts,
        "stats": stats,
    }
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    log(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
