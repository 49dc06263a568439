"""Warm-up drafting for the first tokens of a request: which drafter, if any.

The MDLM drafter is weak on very short contexts. This measures, through vLLM on the
embedded pair at batch 1, greedy, with prompts cut to a few tokens: no speculation,
specdiff from the first token, and the first N tokens drafted by vLLM's n-gram
proposer or not drafted at all (then specdiff). Engines live in their own processes
and run interleaved, --repeats rounds (the protocol of spec_bench.py).

    python benchmarks/warmup.py [--prompts 16 --prompt-tokens 4 --max-tokens 48 --warmup-tokens 8]

Writes benchmarks/results/warmup.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.spec_bench import (MDLM_ONLY, NONE, RESULTS, Engines, environment, fmt,  # noqa: E402
                                   run_rounds, specdiff, speedup_cell, summarise, tau_cell)
from vllm_specdiff.runtime import EMBEDDED_TARGET, HELD_OUT_TEXT, prepare_process  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--gamma", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    prepare_process(quiet=True)
    from transformers import AutoTokenizer

    from vllm_specdiff.training.data import held_out_prompts

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TARGET))
    prompts = held_out_prompts(tok, HELD_OUT_TEXT, n=args.prompts, prompt_tokens=args.prompt_tokens)
    fixed = dict(adaptive=False, **MDLM_ONLY)
    methods = [NONE, specdiff(args.gamma, args.steps, warmup_tokens=0, **fixed)]
    for method in ("ngram", "none"):
        methods.append(specdiff(args.gamma, args.steps, warmup_tokens=args.warmup_tokens,
                                warmup_method=method, **fixed))
    env = environment("warmup.py", sys.argv[1:])
    started = time.time()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    engines = Engines(methods, 1)
    try:
        runs = run_rounds(engines, methods, prompts, args.max_tokens, 0.0, args.repeats, log, "b=1")
    finally:
        engines.close()
    rows = []
    for c in summarise(methods, runs, 1, 0.0):
        same = "-" if c["method"] == "none" else ("yes" if c["same_as_plain"] else "NO")
        rows.append(f"| {c['method']} | {fmt(c['tokens_per_s'])} | {speedup_cell(c)} | "
                    f"{tau_cell(c)} | {same} |")
    out = RESULTS / "warmup.md"
    out.write_text("\n".join([
        "# Warm-up drafting for the first tokens of a request", "",
        f"Command: `{env['command']}`  ", f"Commit: {env['commit']}  ",
        f"Date: {env['date']}; {env['cpu']}, {env['cores']} cores; "
        f"{(time.time() - started) / 60:.1f} min  ",
        f"{args.prompts} held-out TinyStories prompts cut to {args.prompt_tokens} tokens, all submitted "
        f"at once to engines with max_num_seqs 1; {args.max_tokens} greedy tokens each; "
        f"{args.repeats} interleaved repeats, median [min-max]; `~`: range straddles 1.0.", "",
        "| method (settings below) | tokens/s | vs no speculation | mean accepted length | output = plain |",
        "|---|---|---|---|---|", *rows, "", "Settings:", "",
        *[f"- `{m.name}`: `{m.speculative_config}`" for m in methods], ""]))
    print("wrote", out)


if __name__ == "__main__":
    main()
