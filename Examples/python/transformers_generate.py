"""Unchanged transformers generation on a KVRecall session: Gemma 3 270M from the GGUF file the Swift
decoder uses (Tools/fetch_model.sh), greedy `model.generate` with `KVRecallCache` and the "kvrecall"
attention function; with --compare, the same with transformers' own cache and sdpa attention.

    python Examples/python/transformers_generate.py --prompt "The capital of France is" --max-new-tokens 24
    python Examples/python/transformers_generate.py --prompt-file Data/text/short.txt --method auto --compare
    python Examples/python/transformers_generate.py --random-llama --compare     # no model file needed

Needs the transformers extra: pip install './Python[transformers]'.
"""
import argparse
import os
import sys
import time

import torch
from transformers import DynamicCache

import kvrecall
from kvrecall.transformers import KVRecallCache, load_gguf

DEFAULT_GGUF = os.path.join(os.environ.get("KVRECALL_MODELS", os.path.expanduser("~/.cache/kvrecall/models")),
                            "gemma-3-270m-q4_k_m.gguf")


def random_llama():
    """A small random Llama (GQA: 8 query heads on 2 KV heads, every layer global) and no tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("kvrecall")
    return model.eval(), None


def generate(model, ids, cache, max_new_tokens):
    start = time.perf_counter()
    # `cache=` is transformers 5.25's name; `past_key_values=` still works there, with a FutureWarning.
    out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         cache=cache)
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=DEFAULT_GGUF, help="GGUF model file (default: Gemma 3 270M in the model cache)")
    parser.add_argument("--random-llama", action="store_true", help="a small random Llama instead (no model file)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--prompt-file", help="read the prompt from this file (its first --prompt-tokens tokens)")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--method", default="auto", choices=kvrecall.METHODS)
    parser.add_argument("--compare", action="store_true", help="also generate with transformers' own cache and sdpa")
    args = parser.parse_args()

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.random_llama:
        model, tokenizer = random_llama()
        ids = torch.randint(2, 256, (1, 300), generator=torch.Generator().manual_seed(1))
    else:
        if not os.path.exists(args.gguf):
            sys.exit(f"no model at {args.gguf}: run Tools/fetch_model.sh (or pass --gguf, or --random-llama)")
        start = time.perf_counter()
        model, tokenizer = load_gguf(args.gguf)  # attn_implementation="kvrecall"
        print(f"loaded {args.gguf} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        if args.prompt_file:
            with open(args.prompt_file, encoding="utf-8") as f:
                ids = tokenizer(f.read(), return_tensors="pt").input_ids[:, :args.prompt_tokens]
        else:
            ids = tokenizer(args.prompt, return_tensors="pt").input_ids

    # The whole change to a transformers program: the attention implementation and the cache.
    cache = KVRecallCache(model.config, method=args.method)
    tokens, seconds = generate(model, ids, cache, args.max_new_tokens)
    text = tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens))
    print(f"kvrecall ({args.method}): {text!r}")
    print(f"  {ids.shape[1]} prompt tokens, {len(tokens)} new in {seconds:.2f} s (index build {cache.build_seconds:.2f} s)",
          file=sys.stderr)
    for line in cache.report():
        print(f"  {line}", file=sys.stderr)
    cache.close()
    if args.compare:
        model.set_attn_implementation("sdpa")
        own, seconds = generate(model, ids, DynamicCache(config=model.config), args.max_new_tokens)
        text = tokenizer.decode(own) if tokenizer else " ".join(map(str, own))
        print(f"transformers (sdpa): {text!r}  ({seconds:.2f} s)")
        print(f"same tokens as transformers' own attention: {'yes' if own == tokens else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
