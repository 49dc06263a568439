"""What the drafter's context buys: a 16-token window vs the whole context (drafter
cache), per Spec-Bench category and on held-out TinyStories, against ``ngram``.

    python benchmarks/context_bench.py                # the tiny pair
    python benchmarks/context_bench.py --pair small   # models/small-*

Protocol: spec_bench.py's (engines in their own processes, plain decoding in every
group, one warm-up round then interleaved repeats, median [min-max], each ratio
against the plain run of the same round), at batch 1 (max_num_seqs 1, 3 prompts per
run), greedy, per category. Methods, every setting pinned and printed:

- ``ngram g4``/``g8``: vLLM's prompt lookup (the system to beat on copying tasks);
- the embedded MDLM (bidirectional) with W = 16 and no cache (the shape every earlier
  table measured), with W = 16 through the approximate cache (the default's shape,
  cheaper passes: does the approximation cost acceptance?), with the whole context
  through the approximate cache, and with the whole context re-encoded every pass (no
  cache: what the approximation saves);
- the embedded block-causal MDLM with the whole context through its exact cache, with
  W = 16 through the cache (a 16-token sliding window whose keys were encoded with
  the tokens before them in view), and with W = 16 and no cache (same drafter: what
  the context alone changes).

``--lookup``: the question of prompt lookup beside the MDLM instead (specdiff's
``prompt_lookup_min``): the pair's drafter at its default settings with lookup off
(``prompt_lookup_min=0``, the MDLM drafts every row) and with n-grams of at least 1, 2,
3 and 4 tokens copied from the context, against ``ngram`` g4/g8 (``--ngram-gammas`` and
``--lookup-mins`` pick other draft lengths and settings: e.g. ``--ngram-gammas 4 8 12 16
--lookup-mins 1 2``, the baseline tuned over its draft length).

``--pair small``: the small pair has a block-causal drafter only, so its rows are the
last three (whole context, W = 16 cached, W = 16 uncached) and the default
``context_window: auto`` (the drafter's own window, 256 tokens for
``models/small-mdlm``), with ``models/small-mdlm`` on ``models/small-target``.

Result: benchmarks/results/context_bench[_small][_lookup].{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.spec_bench import (MDLM_ONLY, NONE, PAIRS, Engines, environment, fmt,  # noqa: E402
                                   groups_of, load_prompts, ngram, on_pair, run_rounds,
                                   specdiff, summarise)
from vllm_specdiff.runtime import prepare_process  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MDLM = ROOT / "models" / "tiny-mdlm"
BLOCK_CAUSAL = ROOT / "models" / "tiny-mdlm-block-causal"
WHOLE = None  # context_window null: the whole context
NGRAM_GAMMAS = (4, 8)
LOOKUP_MINS = (0, 1, 2, 3, 4)  # --lookup: specdiff's prompt_lookup_min settings


def methods(gamma: int, pair: str, lookup: bool = False, ngram_gammas=NGRAM_GAMMAS,
            lookup_mins=LOOKUP_MINS) -> list:
    baselines = [NONE] + [ngram(g) for g in ngram_gammas]
    if lookup:
        return [on_pair(m, PAIRS[pair]) for m in baselines + [
            specdiff(gamma, 1, prompt_lookup_min=n) for n in lookup_mins]]
    def mdlm(**settings):  # the context is the question: every draft from the MDLM
        return specdiff(gamma, 1, **settings, **MDLM_ONLY)

    if pair != "tiny":
        return [on_pair(m, PAIRS[pair]) for m in baselines + [
            mdlm(context_window="auto", drafter_cache="exact"),
            mdlm(context_window=WHOLE, drafter_cache="exact"),
            mdlm(context_window=16, drafter_cache="exact"),
            mdlm(context_window=16, drafter_cache="off")]]
    return baselines + [
        mdlm(model=str(MDLM), context_window=16, drafter_cache="off"),
        mdlm(model=str(MDLM), context_window=16, drafter_cache="approximate"),
        mdlm(model=str(MDLM), context_window=WHOLE, drafter_cache="approximate"),
        mdlm(model=str(MDLM), context_window=256 - gamma, drafter_cache="off"),
        mdlm(model=str(BLOCK_CAUSAL), context_window=WHOLE, drafter_cache="exact"),
        mdlm(model=str(BLOCK_CAUSAL), context_window=16, drafter_cache="exact"),
        mdlm(model=str(BLOCK_CAUSAL), context_window=16, drafter_cache="off"),
    ]


def main(argv=None) -> int:
    prepare_process()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--prompts-per-category", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=320)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-engines", type=int, default=5)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="tiny")
    ap.add_argument("--lookup", action="store_true",
                    help="prompt lookup beside the MDLM (off, n >= 1, 2, 3, 4) instead")
    ap.add_argument("--ngram-gammas", type=int, nargs="+", default=list(NGRAM_GAMMAS),
                    help="the ngram baseline's draft lengths")
    ap.add_argument("--lookup-mins", type=int, nargs="+", default=list(LOOKUP_MINS),
                    help="with --lookup: specdiff's prompt_lookup_min settings")
    ap.add_argument("--out", default=None,
                    help="result stem (default benchmarks/results/context_bench[_<pair>][_lookup])")
    args = ap.parse_args(argv)
    args.out = args.out or str(RESULTS / ("context_bench" + ("" if args.pair == "tiny" else
                                                             f"_{args.pair}")
                                          + ("_lookup" if args.lookup else "")))
    if PAIRS[args.pair].missing():
        ap.error(f"--pair {args.pair}: missing {PAIRS[args.pair].missing()}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(PAIRS[args.pair].target))
    by_cat = collections.defaultdict(list)
    for cat, ids in load_prompts(tokenizer, args.prompt_tokens):
        if len(by_cat[cat]) < args.prompts_per_category:
            by_cat[cat].append(ids)
    started = time.time()
    log = lambda msg: print(f"[{(time.time() - started) / 60:5.1f} min] {msg}", flush=True)  # noqa: E731
    all_methods = methods(args.gamma, args.pair, args.lookup, args.ngram_gammas, args.lookup_mins)
    cells = []
    for g, group in enumerate(groups_of(all_methods, args.max_engines)):
        log(f"starting {len(group)} engines: {[m.name for m in group]}")
        engines = Engines(group, 1)
        try:
            for cat, prompts in by_cat.items():
                runs = run_rounds(engines, group, prompts, args.max_tokens, 0.0, args.repeats,
                                  log, cat)
                cells += [{**c, "category": cat} for c in summarise(group, runs, 1, 0.0)
                          if g == 0 or c["family"] != "none"]
        finally:
            engines.close()
    env = environment("context_bench.py", sys.argv[1:] if argv is None else argv)
    env["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    minutes = (time.time() - started) / 60
    Path(args.out + ".json").write_text(json.dumps({"env": env, "cells": cells}, indent=2) + "\n")
    Path(args.out + ".md").write_text(report(cells, env, args, minutes, list(by_cat)))
    log(f"wrote {args.out}.md")
    return 0


def copied_share(cell) -> str:
    """' (c N%)': the share of drafted rows prompt lookup drafted (specdiff with lookup on)."""
    rows = cell.get("rows_drafted") or {}
    if not cell["config"] or not cell["config"].get("prompt_lookup_min") or not sum(rows.values()):
        return ""
    return f" (c {100 * rows.get('lookup', 0) / sum(rows.values()):.0f}%)"


def report(cells, env, args, minutes, categories) -> str:
    names = list(dict.fromkeys(c["method"] for c in cells))
    lines = [
        "# " + ("Prompt lookup beside the MDLM" if args.lookup else
               "The drafter's context: 16-token window vs whole context") + ", per category", "",
        f"Command: `{env['command']}`  ", f"Commit: {env['commit']}  ",
        f"Date: {env['date']}; wall time {minutes:.0f} min  ",
        f"Machine: {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}; "
        f"vLLM {env['vllm']} (CPU)  ",
        f"Workload: {args.pair} pair ({Path(PAIRS[args.pair].target).name}), batch 1 (max_num_seqs 1), greedy, "
        f"{args.prompts_per_category} prompts per category per run (Spec-Bench first turns, "
        f"last {args.prompt_tokens} tokens; held-out TinyStories openings), {args.max_tokens} "
        f"new tokens each; one warm-up round, then {args.repeats} interleaved repeats.", "",
        "Cells: tau (mean tokens per verification step) / speedup over plain decoding, "
        "median of per-repeat ratios [min-max]; specdiff with prompt lookup: (c N%) = the "
        "share of its drafted rows that copied from the context instead of the MDLM.", "",
        "| method | " + " | ".join(categories) + " | all (mean speedup) |",
        "|---|" + "---|" * (len(categories) + 1)]
    for name in names:
        row, speedups = [], []
        for cat in categories:
            c = next((c for c in cells if c["method"] == name and c["category"] == cat), None)
            if c is None:
                row.append("")
                continue
            s = c["speedup"]
            speedups.append(statistics.median(s))
            tau = "-" if c["tau"] is None else f"{c['tau']:.2f}"
            row.append(f"{tau} / {statistics.median(s):.2f}x [{min(s):.2f}-{max(s):.2f}]"
                       + copied_share(c))
        lines.append(f"| {name} | " + " | ".join(row) + f" | {statistics.mean(speedups):.2f}x |")
    lines += ["", "Plain decoding tokens/s per category: " + ", ".join(
        f"{c['category']} {fmt(c['tokens_per_s'])}" for c in cells if c["family"] == "none"), "",
        "Settings of each method:", ""]
    seen = set()
    for c in cells:
        if c["method"] not in seen and c["config"]:
            seen.add(c["method"])
            lines.append(f"- `{c['method']}`: `{json.dumps(c['config'])}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
