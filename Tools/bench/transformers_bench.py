"""Gemma 3 270M in transformers (loaded from the GGUF file of Tools/fetch_model.sh) with KVRecallCache
and the "kvrecall" attention function, against transformers' own cache and attention, on the same token
ids. Each check prints one JSON line; Tools/bench/transformers.sh runs them all.

    greedy   greedy generation from a prompt of --prompt tokens (BOS included): KVRecall's --method
             against transformers' sdpa and eager: equal tokens?
    ppl      teacher-forced perplexity of --tokens tokens after a --prefill prefill (one decode step per
             token, as `kvrecall eval --text`), transformers' own (sdpa) and each method; decode ms/token
    speed    decode ms/token after a --prefill prefill, the methods' steps interleaved (one each in turn)
    passkey  Landmark Attention's passkey prompt (the template and construction of `kvrecall eval
             --passkey`; keys and depths from numpy's generator seeded with seed + context), greedy
             8-token answers, transformers' own and each method
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from transformers import DynamicCache

from kvrecall.transformers import KVRecallCache, load_gguf

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(os.path.dirname(HERE))
DEFAULT_GGUF = os.path.join(os.environ.get("KVRECALL_MODELS", os.path.expanduser("~/.cache/kvrecall/models")),
                            "gemma-3-270m-q4_k_m.gguf")
OWN = "transformers"  # transformers' own attention (sdpa) and DynamicCache


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def make_cache(model, method, args):
    if method == OWN or method in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa" if method == OWN else method)
        return DynamicCache(config=model.config)
    model.set_attn_implementation("kvrecall")
    options = {} if args.budget_mass is None else {"budget_mass": args.budget_mass or None}
    return KVRecallCache(model.config, method=method, **options)


def text_ids(tokenizer, path):
    with open(path, encoding="utf-8") as f:
        return tokenizer(f.read(), return_tensors="pt").input_ids  # BOS + text


def step(model, token, cache):
    return model(token, cache=cache, use_cache=True).logits[0, -1]


@torch.no_grad()
def greedy(model, tokenizer, args):
    ids = text_ids(tokenizer, args.text)[:, :args.prompt]
    results = {}
    for method in args.methods:
        cache = make_cache(model, method, args)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                             cache=cache)
        results[method] = (out[0, ids.shape[1]:].tolist(), time.perf_counter() - start)
        log(f"greedy {method}: {time.perf_counter() - start:.1f} s {tokenizer.decode(results[method][0])!r}")
        if isinstance(cache, KVRecallCache):
            cache.close()
    reference = results[args.methods[0]][0]
    for method, (tokens, seconds) in results.items():
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
        print(json.dumps({"check": "greedy", "method": method, "prompt_tokens": ids.shape[1], "new_tokens": len(tokens),
                          "same_as": args.methods[0], "equal": tokens == reference, "first_difference": same,
                          "seconds": round(seconds, 2), "text": tokenizer.decode(tokens)}), flush=True)


@torch.no_grad()
def perplexity(model, tokenizer, args):
    ids = text_ids(tokenizer, args.text)
    if ids.shape[1] < args.prefill + args.tokens:
        sys.exit(f"{args.text} has {ids.shape[1]} tokens; --prefill + --tokens needs {args.prefill + args.tokens}")
    rows = []
    for method in args.methods:
        cache = make_cache(model, method, args)
        start = time.perf_counter()
        logits = model(ids[:, :args.prefill], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        prefill_s = time.perf_counter() - start
        nll, correct, times, build_s = 0.0, 0, [], None
        for t in range(args.tokens):
            target = int(ids[0, args.prefill + t])
            lp = torch.log_softmax(logits.double(), dim=-1)
            nll -= float(lp[target])
            correct += int(int(torch.argmax(logits)) == target)
            if t + 1 == args.tokens:
                break
            start = time.perf_counter()
            logits = step(model, ids[:, args.prefill + t:args.prefill + t + 1], cache)
            elapsed = time.perf_counter() - start
            if t == 0 and isinstance(cache, KVRecallCache):
                build_s = cache.build_seconds
                elapsed -= build_s  # the first step also builds the indexes
            times.append(elapsed)
        row = {"check": "ppl", "method": method, "prefill_tokens": args.prefill, "scored_tokens": args.tokens,
               "perplexity": math.exp(nll / args.tokens), "top1_accuracy": correct / args.tokens,
               "prefill_s": round(prefill_s, 2), "index_build_s": None if build_s is None else round(build_s, 2),
               "decode_ms_per_token": round(1000 * statistics.mean(times), 2),
               "decode_ms_per_token_median": round(1000 * statistics.median(times), 2)}
        if isinstance(cache, KVRecallCache):
            row["session_attention_ms_per_token"] = round(1000 * cache.attention_seconds / len(times), 2)
            row["heads"] = cache.report()
            cache.close()
        rows.append(row)
        log(f"ppl {method}: {row['perplexity']:.4f}, prefill {prefill_s:.1f} s, {row['decode_ms_per_token']} ms/token")
    reference = rows[0]["perplexity"]
    for row in rows:
        row["vs_" + rows[0]["method"]] = f"{100 * (row['perplexity'] / reference - 1):+.4f}%"
        print(json.dumps(row), flush=True)


@torch.no_grad()
def speed(model, tokenizer, args):
    """Decode ms/token after a --prefill prefill, each method with its own cache; the decode steps of
    the methods are interleaved (one step each in turn), so a loaded machine slows them alike."""
    ids = text_ids(tokenizer, args.text)[:, :args.prefill + args.tokens]
    states = []
    for method in args.methods:
        cache = make_cache(model, method, args)
        start = time.perf_counter()
        model(ids[:, :args.prefill], cache=cache, use_cache=True, logits_to_keep=1)
        log(f"speed {method}: prefill {time.perf_counter() - start:.1f} s")
        states.append({"method": method, "cache": cache, "times": [], "prefill_s": time.perf_counter() - start})
    for t in range(args.tokens):
        token = ids[:, args.prefill + t:args.prefill + t + 1]
        for state in states:
            cache = state["cache"]
            model.set_attn_implementation("kvrecall" if isinstance(cache, KVRecallCache) else
                                          ("sdpa" if state["method"] == OWN else state["method"]))
            before = cache.attention_seconds if isinstance(cache, KVRecallCache) else 0.0
            start = time.perf_counter()
            step(model, token, cache)
            elapsed = time.perf_counter() - start
            if t == 0:  # KVRecall's first step builds the indexes; for every method it is not timed
                if isinstance(cache, KVRecallCache):
                    state["build_s"] = cache.build_seconds
                continue
            state["times"].append(elapsed)
            state.setdefault("session", []).append((cache.attention_seconds if isinstance(cache, KVRecallCache) else 0.0) - before)
    for state in states:
        times = state["times"]
        row = {"check": "speed", "method": state["method"], "context": args.prefill, "steps": len(times),
               "prefill_s": round(state["prefill_s"], 1), "index_build_s": round(state["build_s"], 2) if "build_s" in state else None,
               "decode_ms_per_token": round(1000 * statistics.mean(times), 2),
               "decode_ms_per_token_median": round(1000 * statistics.median(times), 2)}
        if isinstance(state["cache"], KVRecallCache):
            row["session_ms_per_token_median"] = round(1000 * statistics.median(state["session"]), 2)
            state["cache"].close()
        print(json.dumps(row), flush=True)


# Landmark Attention's passkey prompt, as Sources/KVRecallDecoder/Evaluation/Passkey.swift builds it.
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(key, repeats, before):
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return "\n".join([TASK, " ".join([FILLER] * before), needle, " ".join([FILLER] * (repeats - before)), QUESTION])


def passkey_trial(tokenizer, context, rng):
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    key = int(rng.integers(10000, 100000))
    depth = float(rng.random())
    fixed = len(encode(passkey_prompt(key, 0, 0))) + 1
    per_filler = max(1, len(encode(FILLER + " " + FILLER)) - len(encode(FILLER)))
    if context <= fixed + per_filler:
        sys.exit(f"a passkey context of {context} tokens is too short")
    repeats = (context - fixed) // per_filler
    ids = []
    while repeats > 0:
        before = int(math.floor(repeats * depth))
        ids = [tokenizer.bos_token_id] + encode(passkey_prompt(key, repeats, before))
        if len(ids) <= context:
            break
        repeats -= max(1, (len(ids) - context) // per_filler)
    return key, depth, torch.tensor([ids])


def first_number(text):
    digits = ""
    for ch in text:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return digits


@torch.no_grad()
def passkey(model, tokenizer, args):
    for context in args.contexts:
        rng = np.random.default_rng(args.seed + context)
        correct = {m: 0 for m in args.methods}
        answers = {m: [] for m in args.methods}
        for trial in range(args.trials):
            key, depth, ids = passkey_trial(tokenizer, context, rng)
            for method in args.methods:
                cache = make_cache(model, method, args)
                out = model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache)
                answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                ok = first_number(answer) == str(key)
                correct[method] += ok
                answers[method].append(answer)
                log(f"passkey {context} trial {trial + 1}/{args.trials} ({ids.shape[1]} tokens, depth {depth:.2f}, "
                    f"key {key}) {method}: {'correct' if ok else 'wrong'} {answer!r}")
                if isinstance(cache, KVRecallCache):
                    cache.close()
        for method in args.methods:
            print(json.dumps({"check": "passkey", "method": method, "context": context, "trials": args.trials,
                              "correct": correct[method], "answers": answers[method]}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["greedy", "ppl", "passkey", "speed"])
    parser.add_argument("--gguf", default=DEFAULT_GGUF)
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated: {OWN} (sdpa + DynamicCache), eager, or KVRecall session methods; "
                             "the first is the reference")
    parser.add_argument("--text", default=os.path.join(REPOSITORY, "Data", "text", "short.txt"))
    parser.add_argument("--prompt", type=int, default=1024, help="greedy: prompt tokens (BOS included)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget-mass", type=float, default=None, help="the session's budget_mass (0: fixed k)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args()
    defaults = {"greedy": f"exact,{OWN},eager", "ppl": f"{OWN},exact", "passkey": f"{OWN},auto",
                "speed": f"{OWN},auto,exact"}
    args.methods = (args.methods or defaults[args.check]).split(",")
    args.contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    start = time.perf_counter()
    model, tokenizer = load_gguf(args.gguf)
    log(f"model loaded in {time.perf_counter() - start:.1f} s (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    {"greedy": greedy, "ppl": perplexity, "passkey": passkey, "speed": speed}[args.check](model, tokenizer, args)


if __name__ == "__main__":
    main()
