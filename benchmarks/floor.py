"""Never slower than plain decoding: specdiff with every default setting against plain
decoding at every concurrency from 1 to 64, and through a load change.

    python benchmarks/floor.py            # b = 1 2 4 8 16 32 64, greedy and temperature 1 (~40 min)
    python benchmarks/floor.py --quick    # b = 1 8 32, greedy
    python benchmarks/floor.py --pair small --batches 1 32 --repeats 9 --no-load-change

Protocol (spec_bench.py's): a cell b runs engines with ``max_num_seqs = b`` and submits 3b
prompts at once (Spec-Bench and held-out TinyStories, round-robin), 128 new tokens each;
one untimed warm-up round, then ``--repeats`` interleaved rounds (``round_order``); cells
show the median and [min-max] of the per-repeat ratios to plain decoding in the same
round. ``--builds N`` starts the engines N times and pools the rounds (engines built
alike differ by a few percent); ``--control`` adds a second plain-decoding engine, whose
ratio to the first is the same computation measured twice: the cells' resolution.

Methods: plain decoding; specdiff with this commit's defaults; and the floor, specdiff's
engine with drafting switched off (draft length 0 every step), which measures what
vLLM's speculative mode itself costs.

Load change: engines with ``max_num_seqs = 64``; one request starts alone and, once it
has 32 tokens, 63 more arrive at once; the time until all 64 have their 128 tokens.

``--pair`` picks the target and drafter (default: the tiny pair).

Results: benchmarks/results/floor[_small][_quick][_<label>].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from spec_bench import (NONE, PAIRS, RESULTS, environment, fmt, load_prompts,  # noqa: E402
                        machine_line, median_range, on_pair, pooled_runs, run_rounds,
                        specdiff, speedup_cell, summarise)

from vllm_specdiff.config import SpecDiffConfig  # noqa: E402
from vllm_specdiff.runtime import EMBEDDED_TARGET, prepare_process  # noqa: E402

DEFAULTS = SpecDiffConfig()
DEFAULT = replace(specdiff(DEFAULTS.num_speculative_tokens, DEFAULTS.diffusion_steps),
                  name=f"specdiff defaults (g{DEFAULTS.gamma} T{DEFAULTS.diffusion_steps})")
DRAFTING_OFF = replace(DEFAULT, name="specdiff, drafting off", family="specdiff-off")
METHODS = [NONE, DEFAULT, DRAFTING_OFF]
# A second plain-decoding engine (--control): its ratio to plain decoding is the same
# computation measured twice, the resolution of the cells beside it.
CONTROL = replace(NONE, name="none, second engine", family="none-control")
GOAL = 0.95
LOAD_CHANGE = dict(batch=64, first_tokens=32)
BATCHES, QUICK_BATCHES = [1, 2, 4, 8, 16, 32, 64], [1, 8, 32]
PROMPT_TOKENS = 256


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--temperatures", type=float, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--label", default=None,
                    help="added to the result file's name, e.g. 't1' for a run of some cells only")


def workload_args(args: argparse.Namespace) -> argparse.Namespace:
    """Unset batches and temperatures: every cell, or the quick ones."""
    args.batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    args.temperatures = args.temperatures or ([0.0] if args.quick else [0.0, 1.0])
    return args


def workload_prompts() -> list[list[int]]:
    """Spec-Bench and held-out TinyStories prompts, round-robin, last 256 tokens each
    (a cell b submits the first 3b)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_TARGET))
    return [ids for _, ids in load_prompts(tokenizer, PROMPT_TOKENS)]


def engine_starts(args) -> str:
    return ("engines started once" if args.builds == 1 else
            f"engines started {args.builds} times (each time in another order)")


def report(cells, load_cells, env, args, minutes, methods) -> str:
    lines = ["# The floor: specdiff's defaults vs plain decoding, concurrency 1 to 64 "
             f"({args.pair} pair)", "",
             f"Command: `{env['command']}`  ", f"Commit: {env['commit']}  ",
             f"Date: {env['date']}; wall time {minutes:.0f} min  ",
             machine_line(env) + "  ",
             f"Workload: cell b = max_num_seqs b, 3b prompts at once, {args.max_tokens} new tokens "
             f"each; {engine_starts(args)}, each with one warm-up round, then {args.repeats} "
             f"interleaved repeats (rounds pooled). Goal: specdiff >= {GOAL}x plain decoding in "
             "every cell.", "",
             "Cells: median [min-max] of per-repeat ratios to plain decoding in the same round; "
             "`~` marks a range that straddles 1.0.", ""]
    for temperature in sorted({c["temperature"] for c in cells}):
        mode = "greedy" if temperature == 0 else f"temperature {temperature:g}"
        batches = sorted({c["batch"] for c in cells if c["temperature"] == temperature})
        lines += [f"## {mode.capitalize()}", "",
                  "| method | " + " | ".join(f"b={b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for name in dict.fromkeys(c["method"] for c in cells):
            row = {c["batch"]: c for c in cells if c["method"] == name and c["temperature"] == temperature}
            lines.append(f"| {name} | " + " | ".join(
                (f"{fmt(row[b]['tokens_per_s'])} tok/s" if name == "none" else speedup_cell(row[b]))
                if b in row else "-" for b in batches) + " |")
        spec = [c for c in cells if c["method"] == DEFAULT.name and c["temperature"] == temperature]
        worst = min(spec, key=lambda c: median_range(c["speedup"])[0])
        lines += ["", f"Worst specdiff cell: b={worst['batch']}, {speedup_cell(worst)} "
                  f"({'meets' if median_range(worst['speedup'])[0] >= GOAL else 'misses'} the "
                  f"{GOAL}x goal); tau by batch: " + ", ".join(
                      f"b={c['batch']} {c['tau']:.2f}" for c in spec if c["tau"]), ""]
    if load_cells:
        lines += [f"## Load change (max_num_seqs {LOAD_CHANGE['batch']}: 1 request, then "
                  f"{LOAD_CHANGE['batch'] - 1} more after its first {LOAD_CHANGE['first_tokens']} "
                  "tokens)", "", "| method | tokens/s | speedup | tau |", "|---|---|---|---:|"]
        for c in load_cells:
            lines.append(f"| {c['method']} | {fmt(c['tokens_per_s'])} | "
                         f"{'-' if c['method'] == 'none' else speedup_cell(c)} | "
                         f"{'-' if c['tau'] is None else format(c['tau'], '.2f')} |")
        lines.append("")
    lines += ["## Settings", ""] + [f"- `{m.name}`: `{json.dumps(m.speculative_config, sort_keys=True)}`"
                                    for m in methods]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="tiny")
    ap.add_argument("--no-load-change", action="store_true")
    ap.add_argument("--builds", type=int, default=1,
                    help="start the engines this many times (each time in another order) "
                         "and pool the rounds: engines built alike differ by a few percent")
    ap.add_argument("--control", action="store_true",
                    help="add a second plain-decoding engine: the cells' resolution")
    args = workload_args(ap.parse_args())
    if args.builds < 1:
        ap.error(f"--builds={args.builds}: must be an integer >= 1")
    prepare_process(quiet=True)
    env = environment("floor.py", sys.argv[1:])
    prompts = workload_prompts()
    started = time.time()

    def log(message):
        print(f"[{(time.time() - started) / 60:5.1f} min] {message}", flush=True)

    methods = [on_pair(m, PAIRS[args.pair]) for m in METHODS + ([CONTROL] if args.control else [])]
    cells, load_cells = [], []
    for batch in args.batches:
        def cell_rounds(engines, build, batch=batch):
            return {t: run_rounds(engines, methods, prompts[: 3 * batch], args.max_tokens, t,
                                  args.repeats, log, f"b={batch} t={t} build {build + 1}")
                    for t in args.temperatures}
        pooled = pooled_runs(methods, batch, args.builds, cell_rounds)
        for temperature in args.temperatures:
            cells += summarise(methods, pooled[temperature], batch, temperature)
    if not args.no_load_change:
        def load_rounds(engines, build):
            return {"load change": run_rounds(
                engines, methods, prompts[: LOAD_CHANGE["batch"]], args.max_tokens, 0.0,
                args.repeats, log, f"load change build {build + 1}", LOAD_CHANGE["first_tokens"])}
        pooled = pooled_runs(methods, LOAD_CHANGE["batch"], args.builds, load_rounds)
        load_cells = summarise(methods, pooled["load change"], LOAD_CHANGE["batch"], 0.0)
    stem = ("floor" + ("" if args.pair == "tiny" else f"_{args.pair}")
            + ("_quick" if args.quick else "") + (f"_{args.label}" if args.label else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    env.update(pair=args.pair, batches=args.batches, temperatures=args.temperatures,
               repeats=args.repeats, builds=args.builds, control=args.control,
               max_tokens=args.max_tokens, load_change=LOAD_CHANGE)
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {**env, "cells": cells, "load_change_cells": load_cells}, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(report(cells, load_cells, env, args,
                                               (time.time() - started) / 60, methods))
    log(f"wrote {RESULTS / stem}.md")


if __name__ == "__main__":
    main()
