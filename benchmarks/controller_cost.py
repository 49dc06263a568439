"""What the adaptive draft length costs or gains, measured inside one engine.

    python benchmarks/controller_cost.py            # b = 1 2 4 8 16 32 64, greedy and temperature 1
    python benchmarks/controller_cost.py --quick    # b = 1 8 32, greedy
    python benchmarks/controller_cost.py --pair small --batches 1 --load-change

floor.py compares engines in different processes, whose speeds drift apart by 10% or
more on a shared 2-core machine. Here one specdiff engine (this commit's defaults) runs
the same workload in interleaved rounds with three draft-length policies, swapped
between rounds on the live controller:

- ``adaptive``: the controller as shipped (its state carries over between its rounds,
  as in a server that has been running);
- ``off``: draft length 0 every step and no copied drafts (vLLM's speculative mode with
  nothing to verify, which costs what plain decoding costs: see floor.md);
- ``gamma``: the full draft length every step.

Where ``adaptive`` loses to ``off``, the table says where: every step the controller
measures is put under its kind (plain: nothing drafted; mdlm: the MDLM drafted; copied:
only prompt lookup drafted) and batch bucket, and a kind's ``excess`` is its time minus
what its tokens would have cost at the plain steps' tokens/s of the same bucket and
round, as a share of the round's measured time (negative: the kind gained). Steps the
controller does not see (the step after a prefill, warm-up-only steps) are not in it; a
re-probe's catch-up step, which it sees but does not measure, is. The controller also
sees the steps of the ``off`` and ``gamma`` rounds (one engine, one controller), so it
knows a little more than a server that always ran it would.

Workload (floor.py's): ``max_num_seqs = b``, 3b prompts at once (Spec-Bench and held-out
TinyStories, round-robin, last 256 prompt tokens), 128 new tokens each; one untimed
round of each policy, then ``--repeats`` rounds of each, the policies' order rotated
each round (from stop 34). Cells: median [min-max] of the
per-repeat ratios to ``off`` in the same repeat, and how often ``adaptive`` drafted.
With ``--load-change``, floor.py's load change too (max_num_seqs 64: one request, then
63 more after its first 32 tokens; greedy).
Results: benchmarks/results/controller_cost[_small][_quick][_label].{md,json}.
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

from floor import (DEFAULT, LOAD_CHANGE, add_workload_args, workload_args,  # noqa: E402
                   workload_prompts)
from spec_bench import (KV_CACHE_BYTES, MAX_MODEL_LEN, PAIRS, RESULTS, Method,  # noqa: E402
                        environment, generate_with_arrivals, on_pair, round_order)

from vllm_specdiff.runtime import close_engine, cpu_engine_defaults, prepare_process  # noqa: E402

POLICIES = ["adaptive", "off", "gamma"]


def run_cell(method: Method, batch: int, temperatures: list[float], prompts, args, log,
             arrive_after: int | None = None) -> list[dict]:
    """``arrive_after``: floor.py's load change (the first request alone for that many
    tokens, then the others), else all of ``prompts[:3 * batch]`` at once."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_specdiff.adaptive import AdaptiveDraftLength, bucket_of

    policy = ["adaptive"]
    chosen: collections.Counter = collections.Counter()
    # (kind, bucket, draft length) -> [steps, seconds, tokens] of the adaptive policy's
    # measured steps
    spent: dict = collections.defaultdict(lambda: [0, 0.0, 0])
    shipped = AdaptiveDraftLength.next_draft_len
    shipped_copying = AdaptiveDraftLength.copying_pays
    shipped_observe = AdaptiveDraftLength.observe
    shipped_observe_copied = AdaptiveDraftLength.observe_copied

    def next_draft_len(self, b):
        k = {"off": 0, "gamma": self.gamma}.get(policy[0])
        if k is None:
            k = shipped(self, b)
            chosen[k] += 1
        return k

    def copying_pays(self, b):
        return policy[0] == "adaptive" and shipped_copying(self, b)

    def account(kind, step):
        if policy[0] == "adaptive" and step.seconds > 0 and step.batch > 0:
            entry = spent[kind, bucket_of(step.batch), step.draft_len]
            entry[0] += 1
            entry[1] += step.seconds
            entry[2] += step.tokens

    def observe(self, step):
        account("mdlm" if step.draft_len else "plain", step)
        shipped_observe(self, step)

    def observe_copied(self, step):
        account("copied", step)
        shipped_observe_copied(self, step)

    AdaptiveDraftLength.next_draft_len = next_draft_len
    AdaptiveDraftLength.copying_pays = copying_pays
    AdaptiveDraftLength.observe = observe
    AdaptiveDraftLength.observe_copied = observe_copied
    llm = LLM(model=method.target, speculative_config=method.speculative_config, max_num_seqs=batch,
              max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=KV_CACHE_BYTES,
              **{k: v for k, v in cpu_engine_defaults().items() if k != "gpu_memory_utilization"})
    inputs = [TokensPrompt(prompt_token_ids=p)
              for p in prompts[: batch if arrive_after is not None else 3 * batch]]
    # Requests the scheduler preempts (KV cache full: a drafted step needs a slot per
    # draft token) are prefilled again, in steps the controller does not measure.
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    preempt, preempted = scheduler._preempt_request, [0]

    def counted_preempt(*a, **kw):
        preempted[0] += 1
        return preempt(*a, **kw)

    scheduler._preempt_request = counted_preempt
    cells = []
    try:
        for temperature in temperatures:
            params = SamplingParams(temperature=temperature, max_tokens=args.max_tokens,
                                    ignore_eos=True)
            rates, preemptions = collections.defaultdict(list), collections.defaultdict(list)
            drafted, excess = [], []
            for repeat in range(args.repeats + 1):
                for name in round_order(POLICIES, repeat):
                    policy[0] = name
                    chosen.clear()
                    spent.clear()
                    preempted[0] = 0
                    start = time.perf_counter()
                    if arrive_after is None:
                        outs = llm.generate(inputs, params, use_tqdm=False)
                    else:
                        outs = generate_with_arrivals(llm, inputs, params, arrive_after)
                    seconds = time.perf_counter() - start
                    rate = sum(len(o.outputs[0].token_ids) for o in outs) / seconds
                    if repeat:
                        rates[name].append(rate)
                        preemptions[name].append(preempted[0])
                        if name == "adaptive":
                            drafted.append(sum(n for k, n in chosen.items() if k) / sum(chosen.values()))
                            excess.append(excess_by_kind(spent))
                    log(f"{'load change ' if arrive_after is not None else ''}"
                        f"b={batch} t={temperature:g} {'warm-up' if not repeat else f'rep {repeat}'} "
                        f"{name}: {rate:.0f} tok/s")
            cells.append({
                "batch": batch, "temperature": temperature, "load_change": arrive_after is not None,
                "tokens_per_s": dict(rates),
                "ratio_to_off": {n: [r / o for r, o in zip(rates[n], rates["off"])] for n in POLICIES},
                "preemptions": dict(preemptions),
                "adaptive_drafted_steps": drafted,
                "adaptive_excess": excess})
    finally:
        AdaptiveDraftLength.next_draft_len = shipped
        AdaptiveDraftLength.copying_pays = shipped_copying
        AdaptiveDraftLength.observe = shipped_observe
        AdaptiveDraftLength.observe_copied = shipped_observe_copied
        close_engine(llm)
    return cells


def excess_by_kind(spent: dict) -> dict[str, dict]:
    """Steps and excess time (share of the measured time) of each step kind, each
    kind's tokens priced at the plain steps' tokens/s of their bucket (a bucket without
    plain steps is left out of the excess)."""
    total = sum(seconds for _, seconds, _ in spent.values())
    plain_rate = {bucket: tokens / seconds for (kind, bucket, _), (_, seconds, tokens)
                  in spent.items() if kind == "plain" and seconds > 0}
    out = {}
    for kind in ("plain", "mdlm", "copied"):
        entries = [(b, e) for (k, b, _), e in spent.items() if k == kind]
        out[kind] = {
            "steps": sum(e[0] for _, e in entries),
            "excess": sum(e[1] - e[2] / plain_rate[b] for b, e in entries if b in plain_rate)
            / total if total else 0.0}
    # Every entry, for the JSON: kind, bucket, draft length, steps, seconds, tokens.
    out["entries"] = [[*key, *entry] for key, entry in sorted(spent.items())]
    return out


def cell(values: list[float]) -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    return f"{'~' if lo < 1.0 < hi else ''}{med:.2f}x [{lo:.2f}-{hi:.2f}]"


def report(cells, env, args, minutes, method: Method) -> str:
    lines = ["# The adaptive draft length against fixed policies, inside one engine", "",
             f"Command: `{env['command']}`  ", f"Commit: {env['commit']}  ",
             f"Date: {env['date']}; wall time {minutes:.0f} min  ",
             f"Machine: {env['cpu']}, {env['cores']} cores; vLLM {env['vllm']} (CPU), {env['dtype']}  ",
             f"Pair: {args.pair} (target {Path(method.target).name}); engine: "
             f"`{json.dumps(method.speculative_config, sort_keys=True)}`; workload: max_num_seqs b, "
             f"3b prompts at once, {args.max_tokens} new tokens each; "
             f"one warm-up round per policy, then {args.repeats} interleaved repeats.", "",
             "Cells: median [min-max] of per-repeat tokens/s ratios to `off` (draft length 0 "
             "every step, i.e. plain decoding's cost) in the same repeat; `~` marks a range "
             "that straddles 1.0. `drafted` is the share of steps the adaptive policy drafted; "
             "`steps, excess`: the adaptive policy's measured steps of that kind per round and "
             "their time beyond what their tokens cost at plain decoding's rate, as a share of "
             "the round (medians over repeats).", ""]
    for load_change, temperature in sorted({(c["load_change"], c["temperature"]) for c in cells}):
        row = [c for c in cells if (c["load_change"], c["temperature"]) == (load_change, temperature)]
        title = "Greedy" if temperature == 0 else f"Temperature {temperature:g}"
        if load_change:
            title = (f"Load change, {title.lower()} (max_num_seqs b: 1 request, then b - 1 more "
                     f"after its first {LOAD_CHANGE['first_tokens']} tokens)")
        lines += [f"## {title}", "",
                  "| policy | " + " | ".join(f"b={c['batch']}" for c in row) + " |",
                  "|---|" + "---|" * len(row),
                  "| off (tokens/s) | " + " | ".join(
                      f"{statistics.median(c['tokens_per_s']['off']):.0f}" for c in row) + " |"]
        for name in ("adaptive", "gamma"):
            lines.append(f"| {name} | " + " | ".join(cell(c["ratio_to_off"][name]) for c in row) + " |")
        lines.append("| preempted requests per round | " + " | ".join(
            ", ".join(f"{n} {statistics.median(c['preemptions'][n]):.0f}" for n in POLICIES)
            for c in row) + " |")
        lines.append("| adaptive: drafted | " + " | ".join(
            f"{100 * statistics.median(c['adaptive_drafted_steps']):.0f}%" for c in row) + " |")
        for kind in ("mdlm", "copied"):
            lines.append(f"| adaptive: {kind} steps, excess | " + " | ".join(
                f"{statistics.median(e[kind]['steps'] for e in c['adaptive_excess']):.0f}, "
                f"{100 * statistics.median(e[kind]['excess'] for e in c['adaptive_excess']):+.1f}%"
                for c in row) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="tiny")
    ap.add_argument("--load-change", action="store_true",
                    help=f"also floor.py's load change at b={LOAD_CHANGE['batch']}, greedy")
    args = workload_args(ap.parse_args())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    prepare_process(quiet=True)
    env = environment("controller_cost.py", sys.argv[1:])
    prompts = workload_prompts()
    method = on_pair(DEFAULT, PAIRS[args.pair])  # floor.py's "specdiff defaults"
    started = time.time()

    def log(message):
        print(f"[{(time.time() - started) / 60:5.1f} min] {message}", flush=True)

    cells = []
    for batch in args.batches:
        cells += run_cell(method, batch, args.temperatures, prompts, args, log)
    if args.load_change:
        cells += run_cell(method, LOAD_CHANGE["batch"], [0.0], prompts, args, log,
                          arrive_after=LOAD_CHANGE["first_tokens"])
    stem = ("controller_cost" + ("" if args.pair == "tiny" else f"_{args.pair}")
            + ("_quick" if args.quick else "") + (f"_{args.label}" if args.label else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    env.update(pair=args.pair, batches=args.batches, temperatures=args.temperatures,
               repeats=args.repeats, max_tokens=args.max_tokens,
               load_change=LOAD_CHANGE if args.load_change else None)
    (RESULTS / f"{stem}.json").write_text(json.dumps({**env, "cells": cells}, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(report(cells, env, args, (time.time() - started) / 60, method))
    log(f"wrote {RESULTS / stem}.md")


if __name__ == "__main__":
    main()
