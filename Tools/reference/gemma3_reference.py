#!/usr/bin/env python3
"""Independent float32 numpy reference of Gemma 3 270M, read from a GGUF file.

The Swift decoder (GGUF reader, tokenizer, forward pass) is checked against these numbers. Only the
GGUF parsing and the dequantisation come from a library (ggml's `gguf` package: GGUFReader and
gguf.quants.dequantize); the tokenizer and the forward pass are written here, in numpy, float32.

Subcommands (run with the tools' venv, Tools/python_env.sh):
  tokenize --text FILE [--out ids.npy]               BOS + token ids (int32 .npy); prints the count
  ppl      --text FILE [--ids ids.npy] [--tokens N] [--score-from P] [--json]
                                                     exact causal attention over ids[0..<N]
  greedy   --prompt TEXT [--max-tokens N]            greedy continuation of BOS + tokens(TEXT)
  logits   --ids ids.npy --out logits.npy [--all-positions]
                                                     final-position logits [V] (or [N, V])
Common: --model PATH (default $KVRECALL_GEMMA_GGUF or ~/.cache/kvrecall/models/gemma-3-270m-q4_k_m.gguf).

Conventions (see Tools/reference/README.md):
  * ids always include BOS (id 2) at position 0.
  * ppl over "all positions": logits at position p = 0..N-2 predict ids[p+1] (N-1 predictions).
  * ppl over the scored range with --score-from P: logits at positions p = P..N-2 predict ids[p+1],
    i.e. the targets ids[t] for t = P+1..N-1 (N-1-P predictions). --score-from 0 equals "all".
  * perplexity = exp(mean NLL), NLL in nats; top-1 = fraction of predictions whose argmax logit is
    the target.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
import time

import numpy as np

DEFAULT_MODEL = os.environ.get(
    "KVRECALL_GEMMA_GGUF",
    os.path.expanduser("~/.cache/kvrecall/models/gemma-3-270m-q4_k_m.gguf"),
)

# Token types of tokenizer.ggml.token_type (llama.cpp / SentencePiece numbering).
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# GGUF loading
# ----------------------------------------------------------------------------------------------

def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class Weights:
    """All tensors of the file, dequantised to float32 numpy arrays of shape [out, in] (ggml dims reversed)."""

    def __init__(self, path: str, tensors: bool = True):
        import gguf  # ggml's package; only for parsing and dequantisation

        t0 = time.time()
        r = gguf.GGUFReader(path)
        self.path = path
        arch = _field(r, "general.architecture")
        if arch != "gemma3":
            raise SystemExit(f"{path}: general.architecture is {arch!r}, expected 'gemma3'")
        p = "gemma3."
        self.n_layer = int(_field(r, p + "block_count"))
        self.d_model = int(_field(r, p + "embedding_length"))
        self.d_ffn = int(_field(r, p + "feed_forward_length"))
        self.n_head = int(_field(r, p + "attention.head_count"))
        self.n_kv_head = int(_field(r, p + "attention.head_count_kv"))
        self.head_dim = int(_field(r, p + "attention.key_length"))
        self.v_head_dim = int(_field(r, p + "attention.value_length"))
        self.eps = float(np.float32(_field(r, p + "attention.layer_norm_rms_epsilon")))
        self.rope_base_global = float(_field(r, p + "rope.freq_base"))
        self.sliding_window = int(_field(r, p + "attention.sliding_window"))
        self.context_length = int(_field(r, p + "context_length"))
        # Not in the file (Gemma 3 conventions; see README): every 6th layer is global, the others
        # use a sliding window and RoPE base 10000; attention scale is 1/sqrt(query_pre_attn_scalar=256).
        self.rope_base_local = 10000.0
        self.is_global = [(i + 1) % 6 == 0 for i in range(self.n_layer)]
        self.attn_scale = 1.0 / math.sqrt(256.0)

        self.t = {}
        self.types = {}
        for ti in (r.tensors if tensors else []):
            a = gguf.quants.dequantize(ti.data, ti.tensor_type)
            a = np.ascontiguousarray(a, dtype=np.float32)
            want = tuple(int(x) for x in reversed(ti.shape))
            if a.shape != want:
                a = a.reshape(want)
            self.t[ti.name] = a
            self.types[ti.name] = ti.tensor_type.name

        # Tokenizer vocabulary.
        tok = r.fields["tokenizer.ggml.tokens"]
        self.vocab = [bytes(tok.parts[i]).decode("utf-8") for i in tok.data]
        self.scores = np.asarray(_field(r, "tokenizer.ggml.scores"), dtype=np.float32)
        self.token_types = np.asarray(_field(r, "tokenizer.ggml.token_type"), dtype=np.int32)
        self.bos_id = int(_field(r, "tokenizer.ggml.bos_token_id", 2))
        self.eos_id = int(_field(r, "tokenizer.ggml.eos_token_id", 1))
        self.add_space_prefix = bool(_field(r, "tokenizer.ggml.add_space_prefix", False))
        model = _field(r, "tokenizer.ggml.model")
        if model != "llama":
            raise SystemExit(f"tokenizer.ggml.model is {model!r}, expected 'llama' (SentencePiece)")
        self.load_seconds = time.time() - t0
        log(f"loaded {path}: {len(self.t)} tensors, {self.n_layer} layers, vocab {len(self.vocab)} "
            f"in {self.load_seconds:.1f}s")

    def __getitem__(self, name):
        return self.t[name]

    @property
    def embed(self):
        return self.t["token_embd.weight"]  # [V, d_model]; also the (tied) output matrix


# ----------------------------------------------------------------------------------------------
# Tokenizer: llama.cpp's SentencePiece (SPM) algorithm over the GGUF vocabulary
# ----------------------------------------------------------------------------------------------

class Tokenizer:
    """llama.cpp's `llm_tokenizer_spm` with the user-defined-token partition of `tokenizer_st_partition`.

    1. The raw text is split around user-defined tokens (type 4: runs of "\\n", of spaces, of tabs,
       a few HTML tags), longest token first, each occurrence left to right; those pieces become their
       token directly. Control tokens (<bos>, ...) are not parsed from text.
    2. In every other fragment spaces become "▁" (no space prefix: add_space_prefix is false), the
       fragment is split into UTF-8 characters, and the adjacent pair whose concatenation is a vocab
       entry with the highest score is merged repeatedly (ties: leftmost first).
    3. A final symbol that is a vocab entry is emitted; otherwise its bytes as <0xNN> tokens.
    """

    def __init__(self, w: Weights):
        self.vocab = w.vocab
        self.scores = w.scores
        self.types = w.token_types
        self.bos_id = w.bos_id
        self.add_space_prefix = w.add_space_prefix
        self.id_of = {}
        for i, s in enumerate(self.vocab):
            self.id_of.setdefault(s, i)
        self.byte_id = {}
        for i in np.nonzero(self.types == TT_BYTE)[0]:
            s = self.vocab[i]
            self.byte_id[int(s[3:5], 16)] = int(i)
        ud = [(self.vocab[i], int(i)) for i in np.nonzero(self.types == TT_USER_DEFINED)[0]]
        # llama.cpp sorts its special-token cache by text length, longest first (stable for ties).
        self.user_defined = sorted(ud, key=lambda x: -len(x[0]))

    # -- step 1 --
    def _partition(self, text):
        frags = [text]  # str = raw text, int = token id
        for s, tid in self.user_defined:
            if s not in text:
                continue
            out = []
            for f in frags:
                if isinstance(f, int) or s not in f:
                    out.append(f)
                    continue
                pos = 0
                while True:
                    j = f.find(s, pos)
                    if j < 0:
                        break
                    if j > pos:
                        out.append(f[pos:j])
                    out.append(tid)
                    pos = j + len(s)
                if pos < len(f):
                    out.append(f[pos:])
            frags = out
        return frags

    # -- step 2 and 3 --
    def _spm(self, text, out):
        syms = list(text)  # Python str iterates over code points = UTF-8 characters
        n = len(syms)
        if n == 0:
            return
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        heap = []
        id_of = self.id_of
        scores = self.scores

        def add(left, right):
            if left < 0 or right < 0:
                return
            s = syms[left] + syms[right]
            tid = id_of.get(s)
            if tid is None:
                return
            # max score first, then leftmost; size guards against stale entries
            heapq.heappush(heap, (-float(scores[tid]), left, right, len(s)))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not alive[left] or not alive[right] or len(syms[left]) + len(syms[right]) != size:
                continue
            if nxt[left] != right:
                continue
            syms[left] = syms[left] + syms[right]
            alive[right] = False
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        i = 0
        while i >= 0:
            s = syms[i]
            tid = id_of.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for b in s.encode("utf-8"):
                    out.append(self.byte_id[b])
            i = nxt[i]

    def encode(self, text: str, bos: bool = True):
        out = [self.bos_id] if bos else []
        prev_special = True
        for f in self._partition(text):
            if isinstance(f, int):
                out.append(f)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                f = " " + f
            self._spm(f.replace(" ", SPACE), out)
            prev_special = False
        return out

    def piece(self, tid: int) -> bytes:
        t = int(self.types[tid])
        s = self.vocab[tid]
        if t == TT_BYTE:
            return bytes([int(s[3:5], 16)])
        if t == TT_CONTROL:
            return b""
        return s.replace(SPACE, " ").encode("utf-8")

    def decode(self, ids) -> str:
        return b"".join(self.piece(int(i)) for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# Forward pass (float32)
# ----------------------------------------------------------------------------------------------

def rms_norm(x, w, eps):
    # Gemma's "+1" is already folded into the GGUF norm weights.
    ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (np.float32(1.0) / np.sqrt(ms + np.float32(eps)))) * w


def gelu_tanh(x):
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def rope_tables(positions, dim, base):
    """cos/sin [N, dim/2] for rotate-half RoPE. Angles are computed in float64 and rounded to float32."""
    half = dim // 2
    inv_freq = base ** (-(2.0 * np.arange(half, dtype=np.float64)) / dim)
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x, cos, sin):
    """x [N, H, D]; pairs dimension i with i + D/2 (rotate-half, no interleaving)."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    c = cos[:, None, :]
    s = sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class Gemma3:
    def __init__(self, w: Weights, row_chunk=1024, q_chunk=256):
        self.w = w
        self.row_chunk = row_chunk
        self.q_chunk = q_chunk

    def _rows(self, n):
        for s in range(0, n, self.row_chunk):
            yield s, min(n, s + self.row_chunk)

    def attention(self, q, k, v, window):
        """Exact causal attention. q [N, H, D] (scaled, normed, roped), k [N, D], v [N, Dv] (one KV head).
        window=None: global; window=W: a query at p sees keys p-W+1..p."""
        n, h, d = q.shape
        dv = v.shape[1]
        out = np.empty((n, h, dv), dtype=np.float32)
        for s in range(0, n, self.q_chunk):
            e = min(n, s + self.q_chunk)
            lo = 0 if window is None else max(0, s - window + 1)
            kk = k[lo:e]
            c, L = e - s, e - lo
            sc = (q[s:e].reshape(c * h, d) @ kk.T).reshape(c, h, L)
            qpos = np.arange(s, e)[:, None]
            kpos = np.arange(lo, e)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            sc = np.where(mask[:, None, :], sc, np.float32(-np.inf))
            sc -= sc.max(axis=-1, keepdims=True)
            np.exp(sc, out=sc)
            sc /= sc.sum(axis=-1, keepdims=True, dtype=np.float32)
            out[s:e] = (sc.reshape(c * h, L) @ v[lo:e]).reshape(c, h, dv)
        return out

    def hidden(self, ids):
        """Final hidden states after output_norm, [N, d_model], for ids[0..N) at positions 0..N-1."""
        w = self.w
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        H, D, Dv = w.n_head, w.head_dim, w.v_head_dim
        x = w.embed[ids] * np.float32(math.sqrt(w.d_model))
        pos = np.arange(n)
        ropes = {
            False: rope_tables(pos, D, w.rope_base_local),
            True: rope_tables(pos, D, w.rope_base_global),
        }
        scale = np.float32(w.attn_scale)
        for li in range(w.n_layer):
            b = f"blk.{li}."
            glob = w.is_global[li]
            cos, sin = ropes[glob]
            q = np.empty((n, H, D), np.float32)
            k = np.empty((n, 1, D), np.float32)
            v = np.empty((n, Dv), np.float32)
            for s, e in self._rows(n):
                hN = rms_norm(x[s:e], w[b + "attn_norm.weight"], w.eps)
                qq = (hN @ w[b + "attn_q.weight"].T).reshape(e - s, H, D)
                kk = (hN @ w[b + "attn_k.weight"].T).reshape(e - s, 1, D)
                v[s:e] = hN @ w[b + "attn_v.weight"].T
                qq = rms_norm(qq, w[b + "attn_q_norm.weight"], w.eps)
                kk = rms_norm(kk, w[b + "attn_k_norm.weight"], w.eps)
                q[s:e] = apply_rope(qq, cos[s:e], sin[s:e]) * scale
                k[s:e] = apply_rope(kk, cos[s:e], sin[s:e])
            a = self.attention(q, k[:, 0, :], v, None if glob else w.sliding_window)
            a = a.reshape(n, H * Dv)
            del q, k, v
            for s, e in self._rows(n):
                o = a[s:e] @ w[b + "attn_output.weight"].T
                x[s:e] += rms_norm(o, w[b + "post_attention_norm.weight"], w.eps)
                hN = rms_norm(x[s:e], w[b + "ffn_norm.weight"], w.eps)
                g = hN @ w[b + "ffn_gate.weight"].T
                u = hN @ w[b + "ffn_up.weight"].T
                f = (gelu_tanh(g) * u) @ w[b + "ffn_down.weight"].T
                x[s:e] += rms_norm(f, w[b + "post_ffw_norm.weight"], w.eps)
        return rms_norm(x, w["output_norm.weight"], w.eps)

    def logits(self, h):
        """h [M, d_model] -> logits [M, V] (tied output matrix, no soft-capping)."""
        return h @ self.w.embed.T


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def load_ids(args, tok):
    if getattr(args, "ids", None):
        ids = np.load(args.ids).astype(np.int64).reshape(-1)
    else:
        ids = np.asarray(tok.encode(read_text(args.text)), dtype=np.int64)
    return ids


def cmd_tokenize(args, w, tok):
    ids = np.asarray(tok.encode(read_text(args.text)), dtype=np.int32)
    print(len(ids))
    if args.out:
        np.save(args.out, ids)
        log(f"wrote {args.out}: {len(ids)} ids (BOS + {len(ids) - 1} tokens)")
    if args.show:
        print(" ".join(str(int(i)) for i in ids[: args.show]))


def _stats(nll, correct):
    if len(nll) == 0:
        return {"count": 0, "mean_nll": None, "perplexity": None, "top1": None}
    m = float(np.mean(nll))
    return {
        "count": int(len(nll)),
        "mean_nll": m,
        "perplexity": float(math.exp(m)),
        "top1": float(np.mean(correct)),
    }


def cmd_ppl(args, w, tok):
    ids = load_ids(args, tok)
    n = len(ids) if args.tokens is None else args.tokens
    if n > len(ids):
        raise SystemExit(f"--tokens {n} > {len(ids)} ids available")
    if n < 2:
        raise SystemExit("need at least 2 tokens")
    ids = ids[:n]
    if ids[0] != w.bos_id:
        log(f"warning: ids[0] = {ids[0]} is not BOS ({w.bos_id})")
    t0 = time.time()
    model = Gemma3(w)
    h = model.hidden(ids)
    t1 = time.time()
    nll = np.empty(n - 1, np.float64)
    correct = np.empty(n - 1, bool)
    lc = args.logit_chunk
    for s in range(0, n - 1, lc):
        e = min(n - 1, s + lc)
        lg = model.logits(h[s:e])  # [c, V] float32: logits at positions s..e-1 predict ids[s+1..e]
        tgt = ids[s + 1:e + 1]
        mx = lg.max(axis=1, keepdims=True)
        lse = mx[:, 0].astype(np.float64) + np.log(np.sum(np.exp(lg - mx), axis=1, dtype=np.float64))
        nll[s:e] = lse - lg[np.arange(e - s), tgt].astype(np.float64)
        correct[s:e] = lg.argmax(axis=1) == tgt
    t2 = time.time()
    P = args.score_from
    res = {
        "model": os.path.basename(w.path),
        "source": args.ids if args.ids else args.text,
        "n_tokens": int(n),
        "bos": bool(ids[0] == w.bos_id),
        "attention": "exact (global layers: all previous; local layers: last %d incl. self)" % w.sliding_window,
        "all": dict(_stats(nll, correct), predicted_positions=[1, int(n - 1)]),
        "score_from": int(P),
        "scored": dict(_stats(nll[P:], correct[P:]), predicted_positions=[int(P + 1), int(n - 1)],
                       logit_positions=[int(P), int(n - 2)]),
        "seconds": {"load": round(w.load_seconds, 2), "forward": round(t1 - t0, 2), "logits": round(t2 - t1, 2)},
    }
    if args.nll_out:
        np.save(args.nll_out, nll.astype(np.float32))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k in ("all", "scored"):
            r = res[k]
            if r["count"]:
                print(f"{k:6s}: predicted ids[{r['predicted_positions'][0]}..{r['predicted_positions'][1]}] "
                      f"count={r['count']} ppl={r['perplexity']:.4f} mean_nll={r['mean_nll']:.5f} "
                      f"top1={r['top1']:.4f}")
        print(f"seconds: {res['seconds']}")


def cmd_greedy(args, w, tok):
    model = Gemma3(w)
    ids = tok.encode(args.prompt)
    prompt_len = len(ids)
    for _ in range(args.max_tokens):
        h = model.hidden(ids)
        lg = model.logits(h[-1:])[0]
        nt = int(lg.argmax())
        ids.append(nt)
        if nt == w.eos_id:
            break
    gen = ids[prompt_len:]
    print("prompt ids:", " ".join(map(str, ids[:prompt_len])))
    print("generated ids:", " ".join(map(str, gen)))
    print("text:", repr(tok.decode(ids[1:prompt_len]) + tok.decode(gen)))
    print("continuation:", repr(tok.decode(gen)))


def cmd_logits(args, w, tok):
    ids = np.load(args.ids).astype(np.int64).reshape(-1)
    model = Gemma3(w)
    h = model.hidden(ids)
    if args.all_positions:
        out = model.logits(h).astype(np.float32)
    else:
        out = model.logits(h[-1:])[0].astype(np.float32)
    np.save(args.out, out)
    last = out if out.ndim == 1 else out[-1]
    top = np.argsort(-last)[: args.top]
    log(f"wrote {args.out}: shape {out.shape}")
    print(f"final-position top-{args.top} (n_ids={len(ids)}):")
    for t in top:
        print(f"  {int(t):7d} {last[t]:10.4f} {tok.decode([int(t)])!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("tokenize", help="BOS + token ids of a UTF-8 text file")
    p.add_argument("--text", required=True)
    p.add_argument("--out")
    p.add_argument("--show", type=int, default=0, help="also print the first SHOW ids")

    p = sub.add_parser("ppl", help="perplexity / top-1 with exact attention")
    p.add_argument("--text", help="UTF-8 text; ids = BOS + its tokens")
    p.add_argument("--ids", help="int .npy of ids (BOS included); takes precedence over --text")
    p.add_argument("--tokens", type=int, default=None, help="use ids[0..<N] (default: all)")
    p.add_argument("--score-from", type=int, default=0,
                   help="scored range: logits at positions P..N-2 predicting ids[P+1..N-1]")
    p.add_argument("--json", action="store_true")
    p.add_argument("--nll-out", help="write the per-prediction NLL (float32 [N-1]) to this .npy")
    p.add_argument("--logit-chunk", type=int, default=256)

    p = sub.add_parser("greedy", help="greedy continuation")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=16)

    p = sub.add_parser("logits", help="final-position logits of an id sequence")
    p.add_argument("--ids", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--all-positions", action="store_true", help="write logits at every position [N, V]")
    p.add_argument("--top", type=int, default=5)

    args = ap.parse_args(argv)
    if args.cmd == "ppl":
        if not (args.text or args.ids):
            ap.error("ppl needs --text or --ids")
        if args.score_from < 0 or (args.tokens is not None and args.score_from > args.tokens - 2):
            ap.error("--score-from must be in 0..N-2")
    w = Weights(args.model, tensors=args.cmd != "tokenize")
    tok = Tokenizer(w)
    {"tokenize": cmd_tokenize, "ppl": cmd_ppl, "greedy": cmd_greedy, "logits": cmd_logits}[args.cmd](args, w, tok)


if __name__ == "__main__":
    main()
