"""Table and plot of the decoder benchmark (Tools/bench/decoder.sh): methods x (perplexity change
against exact, passkey accuracy, decode ms/token), and the speed runs at long contexts.

Usage: python Tools/bench/decoder_plot.py --out Tools/bench/out --png docs/decoder_methods.png
Prints a Markdown table for docs/BENCHMARKS.md on standard output.
"""
import argparse
import json
import os


def load(path):
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    return data if isinstance(data, list) else [data]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="Tools/bench/out")
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    ppl = load(os.path.join(args.out, "decoder_ppl.json")) or []
    passkey = load(os.path.join(args.out, "decoder_passkey.json")) or []
    speed = load(os.path.join(args.out, "decoder_speed.jsonl")) or []

    exact = next((r for r in ppl if r["method"] == "exact"), None)
    contexts = sorted({x["context"] for p in passkey for x in p["results"]})
    header = ["method", "perplexity", "vs exact", "top-1", "build s", "ms/token", "attn ms", "recall", "mass", "scanned"]
    header += [f"passkey {c}" for c in contexts]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    methods = [r["method"] for r in ppl] or [p["method"] for p in passkey]
    rows = []
    for m in methods:
        r = next((x for x in ppl if x["method"] == m), None)
        p = next((x for x in passkey if x["method"] == m), None)
        cells = [m]
        if r:
            change = (r["perplexity"] / exact["perplexity"] - 1) * 100 if exact else float("nan")
            a = r.get("attention", {})
            cells += [f'{r["perplexity"]:.3f}', f"{change:+.2f}%", f'{r["top1_accuracy"]:.3f}',
                      f'{r["index_build_s"]:.2f}', f'{r["decode_ms_per_token"]:.1f}',
                      f'{r.get("global_attention_ms_per_token", float("nan")):.2f}',
                      f'{a.get("recall", float("nan")):.3f}', f'{a.get("attention_mass", float("nan")):.3f}',
                      f'{a.get("keys_scanned_fraction", float("nan")):.4f}']
        else:
            cells += [""] * 9
        for c in contexts:
            x = next((y for y in (p or {"results": []})["results"] if y["context"] == c), None)
            cells.append(f'{x["correct"]}/{x["trials"]}' if x else "")
        rows.append((m, r, p))
        print("| " + " | ".join(cells) + " |")
    if speed:
        print()
        print("| context | method | prefill tokens/s | index build s | build / prefill | decode ms/token | global attention ms/token |")
        print("|---|---|---|---|---|---|---|")
        for s in speed:
            tps = s["prefill_tokens"] / s["prefill_s"]
            print(f'| {s["context"]} | {s["method"]} | {tps:.0f} | {s["index_build_s"]:.2f} | '
                  f'{s["index_build_s"] / s["prefill_s"]:.3f} | {s["decode_ms_per_token"]:.1f} | '
                  f'{s.get("global_attention_ms_per_token", float("nan")):.2f} |')

    if args.png and (ppl or passkey):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        names = [m for m, _, _ in rows]
        if ppl and exact:
            changes = [(r["perplexity"] / exact["perplexity"] - 1) * 100 if r else 0 for _, r, _ in rows]
            axes[0].bar(names, changes, color="tab:blue")
            axes[0].axhline(1, color="gray", linestyle="--", linewidth=1)
            axes[0].set_ylabel("perplexity change vs exact (%)")
            axes[0].set_title(f'prefill {exact["prefill_tokens"]}, {exact["scored_tokens"]} scored tokens')
        if speed:
            for method, color in (("exact", "tab:gray"), ("retrieval", "tab:green")):
                pts = sorted((x["context"], x["global_attention_ms_per_token"]) for x in speed if x["method"] == method)
                axes[2].plot([c for c, _ in pts], [v for _, v in pts], marker="o", color=color, label=method)
            axes[2].set_xscale("log", base=2)
            axes[2].set_xlabel("context (tokens)")
            axes[2].set_ylabel("global-layer attention ms / token")
            axes[2].set_title("the engine's share of a decode step")
            axes[2].legend(fontsize=8)
        width = 0.8 / max(1, len(contexts))
        for i, c in enumerate(contexts):
            acc = []
            for _, _, p in rows:
                x = next((y for y in (p or {"results": []})["results"] if y["context"] == c), None)
                acc.append(x["correct"] / x["trials"] if x else 0)
            axes[1].bar([j + i * width for j in range(len(names))], acc, width=width, label=f"{c} tokens")
        axes[1].set_xticks([j + width * (len(contexts) - 1) / 2 for j in range(len(names))])
        axes[1].set_xticklabels(names)
        axes[1].set_ylim(0, 1.05)
        axes[1].set_ylabel("passkey accuracy")
        axes[1].set_title("passkey retrieval")
        axes[1].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=len(contexts))
        for ax in axes[:2]:
            ax.tick_params(axis="x", rotation=45)
        fig.suptitle("Gemma 3 270M on KVRecall: every method against exact attention")
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
