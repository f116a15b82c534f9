#!/usr/bin/env python3
"""Optional cross-checks of gemma3_reference.py against third-party implementations.

Not part of the tools' venv: run it with a scratch venv that has the extra packages (see README.md).

  crosscheck.py transformers --ids ids.npy [--n 32]
      Builds transformers' Gemma3ForCausalLM (float32, eager attention) from the same dequantised
      GGUF tensors (norm weights minus 1, since HF's Gemma RMSNorm multiplies by 1 + w) and compares
      its logits at every position with the reference's. Needs torch + transformers + gguf + numpy.

  crosscheck.py llamacpp --text FILE [--n 2048]
      Tokenizes FILE with llama.cpp (llama-cpp-python; BOS, special=False) and with the reference and
      compares the ids; then runs llama.cpp over the first N ids and reports its perplexity and top-1
      next to the reference's. Needs llama-cpp-python + gguf + numpy.
"""

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemma3_reference as ref  # noqa: E402


def ref_all_logits(w, ids):
    m = ref.Gemma3(w)
    return m.logits(m.hidden(ids))


def nll_top1(lg, ids):
    lg = lg.astype(np.float64)
    mx = lg.max(1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(1))
    tgt = np.asarray(ids[1:])
    nll = lse[:-1] - lg[np.arange(len(ids) - 1), tgt]
    return nll, lg[:-1].argmax(1) == tgt


def build_hf(w):
    """transformers' Gemma3ForCausalLM (float32, eager) holding the dequantised GGUF tensors."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=w.embed.shape[0], hidden_size=w.d_model, intermediate_size=w.d_ffn,
        num_hidden_layers=w.n_layer, num_attention_heads=w.n_head, num_key_value_heads=w.n_kv_head,
        head_dim=w.head_dim, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=w.context_length,
        rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=w.sliding_window,
        layer_types=["full_attention" if g else "sliding_attention" for g in w.is_global],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": w.rope_base_global},
                         "sliding_attention": {"rope_type": "default", "rope_theta": w.rope_base_local}},
        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
        attention_bias=False, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    model = Gemma3ForCausalLM(cfg).eval().float()
    T = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    sd = {"model.embed_tokens.weight": T(w.embed), "model.norm.weight": T(w["output_norm.weight"] - 1.0)}
    names = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    norms = {
        "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    }
    for i in range(w.n_layer):
        for g, h in names.items():
            sd[f"model.layers.{i}.{h}.weight"] = T(w[f"blk.{i}.{g}.weight"])
        for g, h in norms.items():
            sd[f"model.layers.{i}.{h}.weight"] = T(w[f"blk.{i}.{g}.weight"] - 1.0)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing} unexpected {unexpected}")
    model.tie_weights()
    return model


def cmd_transformers(args):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    w = ref.Weights(args.model)
    ids = np.load(args.ids).astype(np.int64).reshape(-1)[: args.n]
    model = build_hf(w)
    t0 = time.time()
    with torch.no_grad():
        hf = model(torch.from_numpy(ids)[None, :]).logits[0].float().numpy()
    t1 = time.time()
    rl = ref_all_logits(w, ids)
    d = np.abs(hf - rl)
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}: n={len(ids)}")
    print(f"  max |logit diff| over all {len(ids)} positions x {rl.shape[1]} = {d.max():.3e} "
          f"(mean {d.mean():.3e}; logits span {rl.min():.2f}..{rl.max():.2f}); HF {t1 - t0:.1f}s")
    print(f"  argmax agreement {np.mean(hf.argmax(1) == rl.argmax(1)):.4f}")
    if len(ids) > 1:
        a, _ = nll_top1(hf, ids)
        b, _ = nll_top1(rl, ids)
        print(f"  mean NLL: transformers {a.mean():.6f}  reference {b.mean():.6f}")


def cmd_llamacpp(args):
    from llama_cpp import Llama

    w = ref.Weights(args.model)
    tok = ref.Tokenizer(w)
    text = open(args.text, "rb").read()
    m = Llama(model_path=args.model, n_ctx=max(512, args.n), logits_all=True, verbose=False,
              n_threads=os.cpu_count() or 1, n_batch=512, n_ubatch=512)
    ll = m.tokenize(text, add_bos=True, special=False)
    ours = tok.encode(text.decode("utf-8"))
    same = ll == ours
    print(f"tokenization: llama.cpp {len(ll)} ids, reference {len(ours)} ids, identical: {same}")
    if not same:
        for i, (a, b) in enumerate(zip(ll, ours)):
            if a != b:
                print(f"  first difference at {i}: llama.cpp {ll[i:i + 8]} reference {ours[i:i + 8]}")
                break
    ids = ours[: args.n]
    m.reset()
    m.eval(ids)
    lg = np.array(m.scores[: len(ids)], dtype=np.float32)
    rl = ref_all_logits(w, np.asarray(ids))
    a, ca = nll_top1(lg, ids)
    b, cb = nll_top1(rl, ids)
    d = np.abs(lg - rl)
    print(f"first {len(ids)} ids: llama.cpp ppl {math.exp(a.mean()):.4f} top1 {ca.mean():.4f} | "
          f"reference ppl {math.exp(b.mean()):.4f} top1 {cb.mean():.4f}")
    print(f"  |logit diff| max {d.max():.3f} mean {d.mean():.4f} (llama.cpp quantises activations); "
          f"argmax agreement {np.mean(lg.argmax(1) == rl.argmax(1)):.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=ref.DEFAULT_MODEL)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("transformers")
    p.add_argument("--ids", required=True)
    p.add_argument("--n", type=int, default=32)
    p = sub.add_parser("llamacpp")
    p.add_argument("--text", required=True)
    p.add_argument("--n", type=int, default=2048)
    args = ap.parse_args()
    {"transformers": cmd_transformers, "llamacpp": cmd_llamacpp}[args.cmd](args)


if __name__ == "__main__":
    main()
