"""Which unmasking schedule to use: acceptance of each, greedy and at temperature 1.

At temperature > 0 only ``left_to_right`` (or T = 1) gives a q that speculative
sampling may use; ``random`` and ``confidence`` drafts of sampled requests are
verified as point masses (accept with p(x)). This measures, through vLLM on the
embedded pair, the mean accepted length of every schedule x T, so the default can
be chosen by numbers.

    python benchmarks/schedules.py [--prompts 16 --max-tokens 64 --gamma 8]

Writes benchmarks/results/schedules.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.spec_bench import MDLM_ONLY, environment, specdiff  # noqa: E402
from vllm_specdiff.runtime import (EMBEDDED_TARGET, HELD_OUT_TEXT,  # noqa: E402
                                   close_engine, cpu_engine_defaults,
                                   prepare_process)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, default=8)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()
    prepare_process(quiet=True)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_specdiff.metrics import from_metrics
    from vllm_specdiff.training.data import held_out_prompts

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TARGET))
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in
               held_out_prompts(tok, HELD_OUT_TEXT, n=args.prompts, prompt_tokens=24)]
    started = time.time()
    rows = []
    for schedule in ["left_to_right", "random", "confidence"]:
        for steps in args.steps:
            if steps == 1 and schedule != "left_to_right":
                continue  # T = 1 is the same draft for every schedule
            # Every setting pinned; no warm-up drafting and no prompt lookup, so
            # every token is drafted by the schedule under test.
            spec = specdiff(args.gamma, steps, schedule=schedule, adaptive=False,
                            warmup_tokens=0, **MDLM_ONLY).speculative_config
            llm = LLM(model=str(EMBEDDED_TARGET), speculative_config=spec, max_num_seqs=16,
                      max_model_len=512, **cpu_engine_defaults())
            try:
                taus = []
                for temperature in (0.0, 1.0):
                    before = from_metrics(llm.get_metrics())
                    llm.generate(prompts, SamplingParams(temperature=temperature, seed=None,
                                                         max_tokens=args.max_tokens),
                                 use_tqdm=False)
                    taus.append((from_metrics(llm.get_metrics()) - before).mean_accepted_length)
            finally:
                close_engine(llm)
            verified = "q" if schedule == "left_to_right" or steps == 1 else "point mass"
            rows.append(f"| {schedule} | {steps} | {taus[0]:.2f} | {taus[1]:.2f} | {verified} |")
            print(rows[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / "schedules.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment("schedules.py", sys.argv[1:])
    out.write_text("\n".join([
        "# Unmasking schedules: mean accepted length through vLLM", "",
        f"Command: `{env['command']}`  ", f"Commit: {env['commit']}, {env['date']}  ",
        f"Embedded pair, gamma={args.gamma}, {args.prompts} held-out TinyStories prompts, "
        f"{args.max_tokens} new tokens, batch 16, adaptive off, warm-up off, other settings "
        f"the defaults (W={spec['context_window']}, drafter dtype {spec['drafter_dtype']}); "
        f"{(time.time() - started) / 60:.1f} min.", "",
        "| schedule | T | tau greedy | tau temperature 1 | sampled requests verified with |",
        "|---|---|---|---|---|", *rows, ""]))
    print("wrote", out)


if __name__ == "__main__":
    main()
