"""What the adaptive draft length costs or gains, measured inside one engine.

    python benchmarks/controller_cost.py            # b = 1 2 4 8 16 32 64, greedy and temperature 1
    python benchmarks/controller_cost.py --quick    # b = 1 8 32, greedy

floor.py compares engines in different processes, whose speeds drift apart by 10% or
more on a shared 2-core machine. Here one specdiff engine (this commit's defaults) runs
the same workload in interleaved rounds with three draft-length policies, swapped
between rounds on the live controller:

- ``adaptive``: the controller as shipped (its state carries over between its rounds,
  as in a server that has been running);
- ``off``: draft length 0 every step (vLLM's speculative mode with nothing to verify,
  which costs what plain decoding costs: see floor.md);
- ``gamma``: the full draft length every step.

Workload (floor.py's): ``max_num_seqs = b``, 3b prompts at once (Spec-Bench and held-out
TinyStories, round-robin, last 256 prompt tokens), 128 new tokens each; one untimed
round of each policy, then ``--repeats`` rounds of each. Cells: median [min-max] of the
per-repeat ratios to ``off`` in the same repeat, and how often ``adaptive`` drafted.
Results: benchmarks/results/controller_cost[_quick].{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from floor import DEFAULT, add_workload_args, workload_args, workload_prompts  # noqa: E402
from spec_bench import KV_CACHE_BYTES, MAX_MODEL_LEN, RESULTS, environment  # noqa: E402

from vllm_specdiff.runtime import (EMBEDDED_TARGET, close_engine,  # noqa: E402
                                   cpu_engine_defaults, prepare_process)

POLICIES = ["adaptive", "off", "gamma"]
SPEC = DEFAULT.speculative_config  # floor.py's "specdiff defaults"


def run_cell(batch: int, temperatures: list[float], prompts, args, log) -> list[dict]:
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_specdiff.adaptive import AdaptiveDraftLength

    policy = ["adaptive"]
    chosen: collections.Counter = collections.Counter()
    shipped = AdaptiveDraftLength.next_draft_len

    def next_draft_len(self, b):
        k = {"off": 0, "gamma": self.gamma}.get(policy[0])
        if k is None:
            k = shipped(self, b)
            chosen[k] += 1
        return k

    AdaptiveDraftLength.next_draft_len = next_draft_len
    llm = LLM(model=str(EMBEDDED_TARGET), speculative_config=SPEC, max_num_seqs=batch,
              max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=KV_CACHE_BYTES,
              **{k: v for k, v in cpu_engine_defaults().items() if k != "gpu_memory_utilization"})
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts[: 3 * batch]]
    cells = []
    try:
        for temperature in temperatures:
            params = SamplingParams(temperature=temperature, max_tokens=args.max_tokens,
                                    ignore_eos=True)
            rates = collections.defaultdict(list)
            drafted = []
            for repeat in range(args.repeats + 1):
                for name in POLICIES:
                    policy[0] = name
                    chosen.clear()
                    start = time.perf_counter()
                    outs = llm.generate(inputs, params, use_tqdm=False)
                    seconds = time.perf_counter() - start
                    rate = sum(len(o.outputs[0].token_ids) for o in outs) / seconds
                    if repeat:
                        rates[name].append(rate)
                        if name == "adaptive":
                            drafted.append(sum(n for k, n in chosen.items() if k) / sum(chosen.values()))
                    log(f"b={batch} t={temperature:g} {'warm-up' if not repeat else f'rep {repeat}'} "
                        f"{name}: {rate:.0f} tok/s")
            cells.append({
                "batch": batch, "temperature": temperature,
                "tokens_per_s": dict(rates),
                "ratio_to_off": {n: [r / o for r, o in zip(rates[n], rates["off"])] for n in POLICIES},
                "adaptive_drafted_steps": drafted})
    finally:
        AdaptiveDraftLength.next_draft_len = shipped
        close_engine(llm)
    return cells


def cell(values: list[float]) -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    return f"{'~' if lo < 1.0 < hi else ''}{med:.2f}x [{lo:.2f}-{hi:.2f}]"


def report(cells, env, args, minutes) -> str:
    lines = ["# The adaptive draft length against fixed policies, inside one engine", "",
             f"Command: `{env['command']}`  ", f"Commit: {env['commit']}  ",
             f"Date: {env['date']}; wall time {minutes:.0f} min  ",
             f"Machine: {env['cpu']}, {env['cores']} cores; vLLM {env['vllm']} (CPU), {env['dtype']}  ",
             f"Engine: `{json.dumps(SPEC, sort_keys=True)}`; workload: max_num_seqs b, 3b prompts at once, {args.max_tokens} new tokens each; "
             f"one warm-up round per policy, then {args.repeats} interleaved repeats.", "",
             "Cells: median [min-max] of per-repeat tokens/s ratios to `off` (draft length 0 "
             "every step, i.e. plain decoding's cost) in the same repeat; `~` marks a range "
             "that straddles 1.0. `drafted` is the share of steps the adaptive policy drafted.", ""]
    for temperature in sorted({c["temperature"] for c in cells}):
        row = [c for c in cells if c["temperature"] == temperature]
        lines += [f"## {'Greedy' if temperature == 0 else f'Temperature {temperature:g}'}", "",
                  "| policy | " + " | ".join(f"b={c['batch']}" for c in row) + " |",
                  "|---|" + "---|" * len(row),
                  "| off (tokens/s) | " + " | ".join(
                      f"{statistics.median(c['tokens_per_s']['off']):.0f}" for c in row) + " |"]
        for name in ("adaptive", "gamma"):
            lines.append(f"| {name} | " + " | ".join(cell(c["ratio_to_off"][name]) for c in row) + " |")
        lines.append("| adaptive: drafted | " + " | ".join(
            f"{100 * statistics.median(c['adaptive_drafted_steps']):.0f}%" for c in row) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    args = workload_args(ap.parse_args())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    prepare_process(quiet=True)
    env = environment("controller_cost.py", sys.argv[1:])
    prompts = workload_prompts()
    started = time.time()

    def log(message):
        print(f"[{(time.time() - started) / 60:5.1f} min] {message}", flush=True)

    cells = []
    for batch in args.batches:
        cells += run_cell(batch, args.temperatures, prompts, args, log)
    stem = ("controller_cost_quick" if args.quick else "controller_cost") + (
        f"_{args.label}" if args.label else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    env.update(batches=args.batches, temperatures=args.temperatures, repeats=args.repeats,
               max_tokens=args.max_tokens)
    (RESULTS / f"{stem}.json").write_text(json.dumps({**env, "cells": cells}, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(report(cells, env, args, (time.time() - started) / 60))
    log(f"wrote {RESULTS / stem}.md")


if __name__ == "__main__":
    main()
