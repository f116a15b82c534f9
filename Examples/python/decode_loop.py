"""A toy GQA decoder loop on kvrecall: random projections stand in for a model's layers; each
step appends the new token's keys and values, attends its queries through the session, and
compares the output with exact attention computed by numpy.

    python Examples/python/decode_loop.py [--method hnsw] [--steps 32]
"""
import argparse

import numpy as np

import kvrecall


def exact_attention(q, keys, values, scale):
    """q [H, G, d], keys/values [H, N, d] -> [H, G, d] (numpy, float64)."""
    scores = np.einsum("hgd,hnd->hgn", q.astype(np.float64), keys.astype(np.float64)) * scale
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hgn,hnd->hgd", weights, values.astype(np.float64))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="hnsw", choices=kvrecall.METHODS)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=2000)
    args = parser.parse_args()

    layers, kv_heads, group, d = 2, 2, 4, 64
    rng = np.random.default_rng(0)
    # Keys with a few high-magnitude channels, queries out of the keys' distribution (as in real models).
    channel = np.ones(d, dtype=np.float32)
    channel[:4] = 6
    keys = [(rng.standard_normal((kv_heads, args.prompt, d)) * channel).astype(np.float32) for _ in range(layers)]
    values = [rng.standard_normal((kv_heads, args.prompt, d)).astype(np.float32) for _ in range(layers)]
    scale = 1 / np.sqrt(d)
    worst = 0.0
    with kvrecall.Session(layers, kv_heads, group, d, method=args.method, dtype="f32", k=128, window=64) as s:
        for layer in range(layers):
            s.append(layer, keys[layer], values[layer])
            # Prefill queries (one per token and KV head) teach the retrieval graph.
            s.prefill_queries(layer, (keys[layer] * 0.5 + rng.standard_normal(keys[layer].shape)).astype(np.float32))
        s.build_indexes()
        for step in range(args.steps):
            for layer in range(layers):
                k1 = (rng.standard_normal((kv_heads, 1, d)) * channel).astype(np.float32)
                v1 = rng.standard_normal((kv_heads, 1, d)).astype(np.float32)
                s.append(layer, k1, v1)
                keys[layer] = np.concatenate([keys[layer], k1], axis=1)
                values[layer] = np.concatenate([values[layer], v1], axis=1)
                # Sharp queries: each query head aims at an old key of its KV head.
                target = keys[layer][:, rng.integers(0, args.prompt, size=group), :]   # [H, G, d]
                q = (target + rng.standard_normal((kv_heads, group, d)) * 0.2).astype(np.float32)
                out, lse = s.attend(layer, q, return_lse=True)
                ref = exact_attention(q, keys[layer], values[layer], scale)
                error = np.linalg.norm(out - ref) / np.linalg.norm(ref)
                worst = max(worst, error)
        print(f"{args.method}: {args.steps} steps x {layers} layers over {s.length(0)} tokens; "
              f"worst relative output error vs numpy exact attention {worst:.4f}")
    return 0 if worst < 0.1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
