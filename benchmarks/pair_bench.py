"""A target/drafter pair on held-out TinyStories through vLLM: tau, per-position
acceptance and speed of each method at fixed settings, greedy and temperature 1.

    python benchmarks/pair_bench.py --pair small            # batch 1 and 32
    python benchmarks/pair_bench.py --pair small --quick    # batch 1, greedy
    python benchmarks/pair_bench.py --pair small --batches 1 --drafters runs/a runs/b \
        --ar-drafters runs/c runs/d
    python benchmarks/pair_bench.py --pair small --batches 1 --temperatures 1 \
        --gamma-steps 4:1 4:4 --draft-temperatures 0.7
    python benchmarks/pair_bench.py --pair small --batches 32 --only "g4 T1 adaptive" "T1$" ngram

Where spec_bench.py mixes Spec-Bench categories and lets specdiff's adaptive draft
length choose, this measures each drafter as trained: specdiff at fixed gamma and T
(``adaptive: false``, every draft from the MDLM: ``prompt_lookup_min: 0``; with the
drafter's own context window (``auto``), with a 16-token window, and with the drafter
in bfloat16), specdiff's defaults (adaptive; also with prompt lookup off and with
copying after any match), vLLM's ``draft_model`` with the pair's AR drafter at each
gamma (argmax drafts, and at gamma 4 and 8 drafts sampled from its q with q verified),
and ``ngram`` g4 and g8. Prompts: the first ``--prompt-tokens`` tokens of held-out
TinyStories stories (the v1 valid slice, never trained on); ``--max-tokens`` up to the
target's context (engines are built for the longest prompt plus it). Protocol
(spec_bench.py's): engines in their own processes, an untimed warm-up round, then
``--repeats`` interleaved rounds; cells are median [min-max]; speedups are per-round
ratios to plain decoding. tau = 1 + accepted / drafts from vLLM's counters.
``--gamma-steps`` and ``--draft-temperatures`` sweep specdiff's settings with the
pair's drafter instead: fixed gamma:T pairs (T = gamma drafts one token per pass, each
conditioned on the ones before), at each request's temperature and at fixed draft
temperatures (sampled requests then draft from softmax(logits / that value) and are
verified against that q, so any value is exact). ``--drafters`` compares MDLM
drafters of the pair's target instead (an ablation): specdiff at gamma 4 and 8, T 1,
fixed, with each folder's drafter (and gamma 8 with the whole context);
``--ar-drafters`` the same for AR drafters (``draft_model`` g4, g8, and g4
probabilistic). Every specdiff row also shows the draft lengths specdiff chose.
Results: benchmarks/results/pair_bench_<pair>[_quick|_drafters|_gamma_steps|
_draft_temperatures][_<label>].{md,json} (a sweep's name lists what it swept).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from spec_bench import (MDLM_ONLY, NONE, PAIRS, RESULTS, draft_len_cell,  # noqa: E402
                        draft_model, environment, fmt, ngram, on_pair, run_grid, specdiff,
                        speedup_cell, tau_cell)

from vllm_specdiff.runtime import HELD_OUT_TEXT, prepare_process  # noqa: E402


def methods(quick: bool):
    fixed = dict(adaptive=False, **MDLM_ONLY)
    if quick:
        return [NONE, specdiff(8, 1, **fixed), specdiff(8, 1), draft_model(4), ngram(4)]
    return [NONE, specdiff(4, 1, **fixed), specdiff(8, 1, **fixed), specdiff(8, 2, **fixed),
            specdiff(16, 2, **fixed), specdiff(8, 1, context_window=16, **fixed),
            specdiff(8, 1, drafter_dtype="bfloat16", **fixed),
            specdiff(8, 1, drafter_dtype="float32", **fixed),
            specdiff(8, 1), specdiff(8, 1, **MDLM_ONLY), specdiff(8, 1, prompt_lookup_min=1),
            draft_model(2), draft_model(4), draft_model(8),
            draft_model(4, probabilistic=True), draft_model(8, probabilistic=True), ngram(4),
            ngram(8)]


def drafter_methods(folders: list[Path], ar_folders: list[Path]):
    """Beside plain decoding: specdiff g4/g8 T1 fixed with each MDLM drafter folder, and
    g8 with the whole context; draft_model g4/g8 with each AR drafter folder (argmax
    drafts) and g4 with drafts sampled from its q."""
    def with_drafter(m, folder):
        return replace(m, name=f"{m.name} [{folder.name}]", speculative_config={
            **m.speculative_config, "model": str(folder.resolve())})

    out = [NONE]
    for folder in folders:
        out += [with_drafter(m, folder) for m in (
            specdiff(4, 1, adaptive=False, **MDLM_ONLY), specdiff(8, 1, adaptive=False, **MDLM_ONLY),
            specdiff(8, 1, adaptive=False, context_window=None, **MDLM_ONLY))]
    for folder in ar_folders:
        out += [with_drafter(m, folder) for m in (
            draft_model(4), draft_model(8), draft_model(4, probabilistic=True))]
    return out


def sweep_methods(gamma_steps: list[tuple[int, int]], draft_temperatures: list[float | None]):
    """Beside plain decoding: specdiff fixed at each (gamma, T) with the pair's drafter,
    at each draft temperature (None: each request's own)."""
    return [NONE] + [specdiff(g, t, adaptive=False, draft_temperature=dt, **MDLM_ONLY)
                     for dt in draft_temperatures for g, t in gamma_steps]


def gamma_steps_arg(text: str) -> tuple[int, int]:
    """'G:T' -> (gamma, T), 1 <= T <= gamma (specdiff's ranges)."""
    try:
        gamma, steps = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GAMMA:T, e.g. 4:4") from None
    if not 1 <= steps <= gamma <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= T <= gamma <= 64")
    return gamma, steps


def report(cells, env, args, minutes) -> str:
    lines = [f"# The {args.pair} pair on held-out TinyStories, through vLLM", "",
             f"Command: `{env['command']}`  ", f"Commit: {env['commit']}  ",
             f"Date: {env['date']}; wall time {minutes:.0f} min  ",
             f"Machine: {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}; "
             f"vLLM {env['vllm']} (CPU), {env['dtype']}  ",
             f"Workload: held-out TinyStories openings of {args.prompt_tokens} tokens; cell b = "
             f"max_num_seqs b, max(8, 3b) prompts submitted at once; {args.max_tokens} new tokens "
             f"each (ignore_eos); one warm-up round, then {args.repeats} interleaved repeats.", "",
             "Cells: tokens/s median [min-max]; speedup = median of per-round ratios to plain "
             "decoding (`~`: the range straddles 1.0); tau = 1 + accepted / drafts (vLLM's "
             "counters); per-position acceptance from vLLM's counters; drafter share = time "
             "in the proposer / run time; draft lengths = the share of proposer calls at each "
             "draft length specdiff chose (adaptive rows vary).", ""]
    for temperature in sorted({c["temperature"] for c in cells}):
        for batch in sorted({c["batch"] for c in cells}):
            lines += [f"## {'Greedy' if temperature == 0 else f'Temperature {temperature:g}'}, batch {batch}", "",
                      "| method | tok/s | speedup | tau | per-position acceptance | drafter share | "
                      "draft lengths | greedy = plain |",
                      "|---|---|---|---:|---|---:|---|---|"]
            for c in cells:
                if c["temperature"] != temperature or c["batch"] != batch:
                    continue
                same = ("-" if c["same_as_plain"] is None or c["family"] == "none"
                        else "yes" if c["same_as_plain"] else "NO")
                lines.append(f"| {c['method']} | {fmt(c['tokens_per_s'])} | {speedup_cell(c)} | "
                             f"{tau_cell(c)} | {' '.join(f'{a:.2f}' for a in c['per_position']) or '-'} | "
                             f"{100 * c['drafter_share']:.0f}% | {draft_len_cell(c)} | {same} |")
            lines.append("")
    lines += ["## Settings of every method", ""]
    for name, config in dict.fromkeys((c["method"], json.dumps(c["config"], sort_keys=True))
                                      for c in cells):
        lines.append(f"- `{name}`: `{config}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), default="small")
    ap.add_argument("--quick", action="store_true", help="batch 1, greedy, five methods")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--temperatures", type=float, nargs="+", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-engines", type=int, default=6)
    ap.add_argument("--drafters", type=Path, nargs="+", default=[], metavar="FOLDER",
                    help="compare these MDLM drafters of the pair's target (an ablation)")
    ap.add_argument("--ar-drafters", type=Path, nargs="+", default=[], metavar="FOLDER",
                    help="and these AR drafters (vLLM's draft_model)")
    ap.add_argument("--gamma-steps", type=gamma_steps_arg, nargs="+", default=None,
                    metavar="G:T", help="a sweep instead: specdiff fixed at these gamma:T "
                    "with the pair's drafter (default with --draft-temperatures: 4:1 8:1)")
    ap.add_argument("--draft-temperatures", type=float, nargs="+", default=None, metavar="T",
                    help="a sweep instead: at each request's own temperature and at these "
                         "fixed draft temperatures (specdiff's draft_temperature)")
    ap.add_argument("--only", nargs="+", default=None, metavar="REGEX",
                    help="keep the methods whose name one of these matches (re.search), "
                         "and plain decoding, every ratio's reference")
    ap.add_argument("--label", default=None, help="added to the result file's name")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be at least 3 (a median and a range need three)")
    args.batches = args.batches or ([1] if args.quick else [1, 32])
    args.temperatures = args.temperatures or ([0.0] if args.quick else [0.0, 1.0])
    args.prompts = max(8, 3 * max(args.batches))  # a cell b runs the first max(8, 3b)
    pair = PAIRS[args.pair]
    if pair.missing():
        ap.error(f"--pair {args.pair}: missing {pair.missing()}")
    absent = [str(f) for f in args.drafters + args.ar_drafters
              if not (f / "config.json").is_file()]
    if absent:
        ap.error(f"--drafters / --ar-drafters: no drafter (config.json) in {absent}")
    ablation = bool(args.drafters or args.ar_drafters)
    swept = [name for name in ("gamma_steps", "draft_temperatures")
             if getattr(args, name) is not None]
    if swept and ablation:
        ap.error("--gamma-steps / --draft-temperatures: not with --drafters / --ar-drafters "
                 "(one comparison a run)")
    if any(not 0 <= t <= 10 for t in args.draft_temperatures or []):
        ap.error("--draft-temperatures: each in [0, 10] (specdiff's draft_temperature range)")
    prepare_process(quiet=True)
    from transformers import AutoTokenizer

    from vllm_specdiff.training.data import held_out_prompts

    tok = AutoTokenizer.from_pretrained(str(pair.target))
    stories = held_out_prompts(tok, HELD_OUT_TEXT, n=args.prompts, prompt_tokens=args.prompt_tokens)
    env = environment("pair_bench.py", sys.argv[1:])
    started = time.time()
    log = lambda msg: print(f"[{(time.time() - started) / 60:5.1f} min] {msg}", flush=True)  # noqa: E731
    if ablation:
        grid = [replace(m, target=str(pair.target))
                for m in drafter_methods(args.drafters, args.ar_drafters)]
    elif swept:
        grid = [on_pair(m, pair) for m in sweep_methods(
            args.gamma_steps or [(4, 1), (8, 1)], [None, *(args.draft_temperatures or [])])]
    else:
        grid = [on_pair(m, pair) for m in methods(args.quick)]
    if args.only:
        grid = [m for m in grid if m.family == "none" or any(re.search(r, m.name) for r in args.only)]
    cells = run_grid(grid, [("tinystories", s) for s in stories], args.batches, args.temperatures,
                     args.repeats, args.max_tokens, log, args.max_engines, min_prompts=8)
    stem = f"pair_bench_{args.pair}" + ("_drafters" if ablation else
                                        "".join(f"_{name}" for name in swept) if swept else
                                        "_quick" if args.quick else "") + (
        f"_{args.label}" if args.label else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {**env, "settings": vars(args), "cells": cells}, indent=1, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(report(cells, env, args, (time.time() - started) / 60))
    log(f"wrote {RESULTS / stem}.md")


if __name__ == "__main__":
    main()
