"""Warm-up: does the diffusion drafter need help on the first tokens of a request?

SpecDiff drafts a request's first few tokens with standard speculation because a
diffusion drafter is weak on very short contexts. This measures it for our
drafter, through vLLM at batch 1, on held-out TinyStories prompts cut to a few
tokens: specdiff throughout, versus the first N tokens drafted by vLLM's n-gram
proposer or not drafted at all. Greedy; outputs must match plain decoding.

    python benchmarks/warmup.py [--prompts 16 --prompt-tokens 4 --max-tokens 48]

Writes benchmarks/results/warmup.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_specdiff.runtime import (EMBEDDED_DRAFTER, EMBEDDED_TARGET, HELD_OUT_TEXT,  # noqa: E402
                                   prepare_process, timed_generation)


def run(prompts, params, spec):
    outputs, tps, stats = timed_generation(prompts, params, 1, spec)
    return [list(o.outputs[0].token_ids) for o in outputs], tps, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--gamma", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    prepare_process(quiet=True)
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_specdiff.training.data import held_out_prompts

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TARGET))
    prompts = held_out_prompts(tok, HELD_OUT_TEXT, n=args.prompts,
                               prompt_tokens=args.prompt_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    base = {"method": "specdiff", "model": str(EMBEDDED_DRAFTER), "adaptive": False,
            "num_speculative_tokens": args.gamma, "diffusion_steps": args.steps}
    configs = [("no speculation", None), ("specdiff from the first token", base)]
    for method in ("ngram", "none"):
        configs.append((f"first {args.warmup_tokens} tokens: {method}",
                        {**base, "warmup_tokens": args.warmup_tokens, "warmup_method": method}))
    started, rows, base_tps, reference = time.time(), [], None, None
    for name, spec in configs:
        tokens, tps, stats = run(prompts, params, spec)
        if base_tps is None:
            base_tps, reference = tps, tokens
        tau = f"{stats.mean_accepted_length:.2f}" if stats.drafts else "-"
        rows.append(f"| {name} | {tps:.0f} | {tps / base_tps:.2f}x | {tau} | "
                    f"{'yes' if tokens == reference else 'NO'} |")
        print(rows[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / "warmup.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([
        "# Warm-up drafting for the first tokens of a request", "",
        f"Command: `python benchmarks/warmup.py {' '.join(sys.argv[1:])}`  ",
        f"{args.prompts} held-out TinyStories prompts cut to {args.prompt_tokens} tokens, "
        f"{args.max_tokens} greedy tokens each, batch 1, gamma={args.gamma}, T={args.steps}, "
        f"adaptive off; {(time.time() - started) / 60:.1f} min.", "",
        "| drafting | tokens/s | vs no speculation | mean accepted length | output = plain |",
        "|---|---|---|---|---|", *rows, ""]))
    print("wrote", out)


if __name__ == "__main__":
    main()
