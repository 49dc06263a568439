"""Where a decode step's time goes: plain decoding, ``ngram`` and ``specdiff``, measured
inside vLLM's real code paths.

    python benchmarks/step_profile.py            # batch 1, 8, 32 (about 10 minutes on 2 CPU cores)
    python benchmarks/step_profile.py --quick    # batch 1 and 8, fewer tokens
    python benchmarks/step_profile.py --pair small --batches 1 32   # models/small-*
    python benchmarks/step_profile.py --pair small --batches 32 --workload floor --only none "length 0"

Every timer is a ``time.perf_counter`` wrapper around a method vLLM or this plugin
really runs (the engine is in-process, so the model runner is reachable): the engine
step and its parts (scheduler, input preparation, target forward, sampling or
verification, drafting, output processing), and inside drafting the proposer's own
parts (row triage and generators, the drafter's forward passes, q assembly, n-gram
warm-up). Nothing is re-implemented. A step's record is kept only for pure decode
steps (no prompt tokens scheduled), and each cell is the median over those steps of
the second of two identical generations (the first warms up).

Per cell: ``b`` prompts (held-out TinyStories openings) submitted together to an
engine with ``max_num_seqs = b``, 128 new tokens each, greedy unless ``--temperature``.
``--workload floor`` runs floor.py's cells instead: 3b Spec-Bench and TinyStories
prompts (up to 256 tokens) into an engine with ``max_num_seqs = b``, so requests are
admitted while others decode; the other steps (those that schedule prompt tokens, or
run fewer than b requests) get their own table, each part's total over the run.
"Other" is the step's time outside every timed part (Python glue between them).
``--pair small``: the small pair's target with ``ngram``, ``specdiff`` at gamma 4 and 8
(T 1, fixed), its defaults and its defaults with drafting switched off (the floor), and
vLLM's ``draft_model`` with the small AR drafter.
Results: benchmarks/results/step_profile[_<pair>][_quick][_t<T>][_floor][_<label>].{md,json}.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from vllm_specdiff.runtime import (HELD_OUT_TEXT, close_engine,  # noqa: E402
                                   cpu_engine_defaults, prepare_process)

RESULTS = ROOT / "benchmarks" / "results"

# (label, "module:Class.method"): what each timer wraps. Top-level parts of a step are
# disjoint; indented ones (``parent``) are inside their parent.
R = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
TIMERS = [
    ("step", "vllm.v1.engine.core:EngineCore.step", None),
    ("schedule", "vllm.v1.core.sched.scheduler:Scheduler.schedule", "step"),
    ("execute_model", f"{R}.execute_model", "step"),
    ("update states", f"{R}._update_states", "execute_model"),
    ("prepare inputs", f"{R}._prepare_inputs", "execute_model"),
    ("spec-decode metadata", f"{R}._calc_spec_decode_metadata", "prepare inputs"),
    ("target forward", f"{R}._model_forward", "execute_model"),
    ("sample_tokens", f"{R}.sample_tokens", "step"),
    ("sample / verify", f"{R}._sample", "sample_tokens"),
    ("specdiff verification", "vllm_specdiff.verification:SpecDiffRejectionSampler._verify",
     "sample / verify"),
    ("update after execute", f"{R}._update_states_after_model_execute", "sample_tokens"),
    ("bookkeeping", f"{R}._bookkeeping_sync", "sample_tokens"),
    ("drafting", f"{R}.propose_draft_token_ids", "sample_tokens"),
    ("ngram proposer", "vllm.v1.spec_decode.ngram_proposer:NgramProposer.propose", "drafting"),
    ("specdiff proposer", "vllm_specdiff.proposer:SpecDiffProposer.draft", "drafting"),
    ("drafter", "vllm_specdiff.drafter:DiffusionDrafter.draft", "specdiff proposer"),
    ("drafter forward passes", "vllm_specdiff.model:DITBackbone.forward", "drafter"),
    ("q rows", "vllm_specdiff.proposer:draft_q", "specdiff proposer"),
    ("generators", "vllm_specdiff.proposer:SpecDiffProposer._generators", "specdiff proposer"),
    ("draft ids to CPU", f"{R}._copy_draft_token_ids_to_cpu", "sample_tokens"),
    ("update_from_output", "vllm.v1.core.sched.scheduler:Scheduler.update_from_output", "step"),
    ("post_step (draft hand-over)", "vllm.v1.engine.core:EngineCore.post_step", None),
]
PARENT = {label: parent for label, _, parent in TIMERS}
MEANS = ("step", "target forward", "drafting")  # also reported as means: they add up over a run


def depth(label: str) -> int:
    return 0 if PARENT.get(label) is None else 1 + depth(PARENT[label])


class StepTimers:
    """perf_counter totals per timer for the current engine step; a finished step's
    totals go to ``steps`` with the number of tokens it scheduled."""

    def __init__(self):
        self.current: dict[str, float] = collections.defaultdict(float)
        self.steps: list[dict] = []
        self.threads: dict[str, int] = {}

    def install(self) -> None:
        import importlib

        from vllm_specdiff.patches import RUNNER_PATCHES

        # specdiff's runner patch replaces propose_draft_token_ids when its proposer is
        # built; applied first, the timer wraps the patched method that really runs.
        RUNNER_PATCHES.ensure_applied()

        for label, target, _ in TIMERS:
            module, attr = target.split(":")
            owner = importlib.import_module(module)  # a module-level function ...
            if "." in attr:  # ... or a class's method
                cls_name, attr = attr.split(".")
                owner = getattr(owner, cls_name)
            if not hasattr(owner, attr):  # an older commit of the plugin (--label before)
                print(f"step_profile: {target} does not exist here; its row stays 0")
                continue
            setattr(owner, attr, self._timed(label, getattr(owner, attr)))

    def _timed(self, label, fn):
        timers = self

        def timed(*args, **kwargs):
            if label == "step":
                timers.current = collections.defaultdict(float)
            if label == "drafter forward passes":
                import torch

                timers.threads["drafter torch threads"] = torch.get_num_threads()
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                timers.current[label] += time.perf_counter() - start
            if label == "schedule":
                timers.current["_decode_only"] = float(_pure_decode(out))
                timers.current["_requests"] = float(len(out.num_scheduled_tokens))
                timers.current["_tokens"] = float(out.total_num_scheduled_tokens)
            if label == "step":
                timers.steps.append(timers.current)  # post_step still adds to it
            return out

        timed.__wrapped__ = fn
        return timed


def _pure_decode(out) -> bool:
    spec = out.scheduled_spec_decode_tokens
    return bool(out.num_scheduled_tokens) and not out.scheduled_new_reqs and all(
        n == 1 + len(spec.get(r, ())) for r, n in out.num_scheduled_tokens.items())


FLOOR = "specdiff, draft length 0"
WORKLOADS = {
    "stories": "b held-out TinyStories openings (32 tokens) submitted together, one engine "
               "with max_num_seqs = the largest b",
    "floor": "floor.py's cell: 3b Spec-Bench and TinyStories prompts (up to 256 tokens) "
             "submitted together, max_num_seqs = b",
}


def defaults(d, config: dict) -> dict[str, dict]:
    """specdiff's defaults and its floor: the same engine, drafting switched off."""
    return {f"specdiff default (g{d.gamma} T{d.diffusion_steps})": config, FLOOR: config}


def methods(quick: bool, pair: str) -> dict[str, dict | None]:
    """Settings pinned as spec_bench.py pins them (every default written out)."""
    from spec_bench import MDLM_ONLY, PAIRS, draft_model, ngram, on_pair, specdiff

    from vllm_specdiff.config import SpecDiffConfig

    d = SpecDiffConfig()
    default = specdiff(d.num_speculative_tokens, d.diffusion_steps)
    if pair != "tiny":
        # fixed: adaptive off, every draft from the MDLM
        fixed = [specdiff(4, 1, adaptive=False, **MDLM_ONLY),
                 specdiff(8, 1, adaptive=False, **MDLM_ONLY), draft_model(8)]
        return {"none": None, "ngram g4": ngram(4).speculative_config,
                **{m.name.replace(" adaptive=False prompt_lookup_min=0", " fixed"):
                   on_pair(m, PAIRS[pair]).speculative_config for m in fixed},
                **defaults(d, on_pair(default, PAIRS[pair]).speculative_config)}
    out = {"none": None, "ngram g4": ngram(4).speculative_config,
           "ngram g8": ngram(8).speculative_config, **defaults(d, default.speculative_config)}
    if not quick:
        out["specdiff g8 T1 fixed"] = specdiff(8, 1, adaptive=False, **MDLM_ONLY).speculative_config
    return out


def profile(name, spec_config, target, batches, max_tokens, temperature, timers, prompts,
            log, max_num_seqs: int, prompts_per_cell: int = 1) -> list[dict]:
    from vllm import LLM, SamplingParams, TokensPrompt

    from spec_bench import switch_drafting_off

    cells = []
    switch_back = switch_drafting_off() if name == FLOOR else None
    llm = LLM(model=str(target), speculative_config=spec_config,
              max_num_seqs=max_num_seqs, max_model_len=512, **cpu_engine_defaults())
    try:
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)
        for b in batches:
            inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts[:prompts_per_cell * b]]
            for _ in range(2):  # the second run is kept
                timers.steps = []
                start = time.perf_counter()
                outputs = llm.generate(inputs, params, use_tqdm=False)
                seconds = time.perf_counter() - start
            decode, others = [], []  # pure decode steps of all b requests; the rest
            for s in timers.steps:
                (decode if s.get("_decode_only") and s["_requests"] == b else others).append(s)

            def engine_seconds(steps):
                return sum(s.get("step", 0.0) + s.get("post_step (draft hand-over)", 0.0)
                           for s in steps)
            engine_s, other_steps_s = engine_seconds(timers.steps), engine_seconds(others)
            other_parts = {label: sum(s.get(label, 0.0) for s in others) * 1e3
                           for label, _, _ in TIMERS}
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            parts = {label: statistics.median(s.get(label, 0.0) for s in decode) * 1e3
                     for label, _, _ in TIMERS}
            # Per step, then the median: a method whose steps are of two kinds (copied
            # drafts and MDLM drafts) has medians that do not add up, and a difference
            # of medians showed 0.3 ms of "rest" that no step spent.
            for parent in ("step", "execute_model", "sample_tokens"):
                children = [label for label, _, p in TIMERS if p == parent]
                parts[f"rest of {parent}"] = statistics.median(
                    s.get(parent, 0.0) - sum(s.get(c, 0.0) for c in children)
                    for s in decode) * 1e3
            for label in MEANS:
                parts[f"{label}, mean"] = statistics.mean(s.get(label, 0.0) for s in decode) * 1e3
            mean_tokens_per_step = statistics.mean(s["_tokens"] for s in decode) / b
            cells.append({"method": name, "batch": b, "tokens_per_s": tokens / seconds,
                          "decode_steps": len(decode), "scheduled_tokens_per_request":
                          mean_tokens_per_step, "ms": parts, "run_s": seconds,
                          "other_steps_s": other_steps_s, "other_steps": len(others),
                          "other_steps_ms": other_parts,
                          "outside_engine_s": seconds - engine_s, "threads": dict(timers.threads)})
            log(f"{name} b={b}: {tokens / seconds:.0f} tok/s, step {parts['step']:.2f} ms "
                f"(forward {parts['target forward']:.2f}, drafting {parts['drafting']:.2f}, "
                f"sample/verify {parts['sample / verify']:.2f})")
    finally:
        if switch_back is not None:
            switch_back()
        close_engine(llm)
    return cells


def report(cells, env) -> str:
    from spec_bench import machine_line

    names = list(dict.fromkeys(c["method"] for c in cells))
    batches = sorted({c["batch"] for c in cells})
    lines = ["# Per-step cost breakdown (pure decode steps, median ms per step)", "",
             f"Command: `{env['command']}`  ", f"Commit: {env['commit']}  ", f"Date: {env['date']}  ",
             machine_line(env) + "  ",
             f"Workload: target {env.get('target', 'tiny-target')}; {WORKLOADS[env.get('workload', 'stories')]}, "
             f"{env['max_tokens']} new tokens each, "
             f"temperature {env['temperature']}; the second of two identical runs.", "",
             "Rows indented under a part are inside it; `rest of X` is X's time outside its timed parts (the median over steps); `X, mean` is the mean over steps (medians of a mix of step kinds do not add up, means do). `tokens/step` is the tokens the target",
             "scores per request per step (1 for plain decoding, 1 + draft length otherwise).", ""]
    for b in batches:
        row = {c["method"]: c for c in cells if c["batch"] == b}
        lines += [f"## batch {b}", "", "| part | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        lines.append("| tokens/s (whole run) | " + " | ".join(
            f"{row[n]['tokens_per_s']:.0f}" if n in row else "-" for n in names) + " |")
        lines.append("| run: s (other steps: n, s; outside engine steps: s) | " + " | ".join(
            f"{row[n]['run_s']:.3f} ({row[n]['other_steps']}, {row[n]['other_steps_s']:.3f}; "
            f"{row[n]['outside_engine_s']:.3f})" if n in row else "-" for n in names) + " |")
        lines.append("| tokens/step | " + " | ".join(
            f"{row[n]['scheduled_tokens_per_request']:.2f}" if n in row else "-" for n in names) + " |")
        rests = ["rest of execute_model", "rest of sample_tokens", "rest of step"]
        for label in [t[0] for t in TIMERS] + rests + [f"{m}, mean" for m in MEANS]:
            level = depth(label) if label in PARENT else 1
            shown = "&nbsp;" * 4 * max(0, level - 1) + label
            lines.append(f"| {shown} | " + " | ".join(
                f"{row[n]['ms'][label]:.2f}" if n in row else "-" for n in names) + " |")
        lines.append("")
        if env.get("workload") != "floor":
            continue
        lines += [f"### batch {b}: the other steps (prompt tokens scheduled, or fewer than {b} "
                  "requests), each part's total over the run in ms", "",
                  "| part | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines.append("| steps | " + " | ".join(
            f"{row[n]['other_steps']}" if n in row else "-" for n in names) + " |")
        for label in [t[0] for t in TIMERS]:
            if not any(row[n]["other_steps_ms"][label] for n in row):
                continue
            shown = "&nbsp;" * 4 * max(0, depth(label) - 1) + label
            lines.append(f"| {shown} | " + " | ".join(
                f"{row[n]['other_steps_ms'][label]:.0f}" if n in row else "-" for n in names) + " |")
        lines.append("")
    threads = {k: v for c in cells for k, v in c["threads"].items()}
    lines += [f"Threads: {json.dumps(threads)} (torch intra-op threads seen by the drafter's "
              "forward inside the vLLM worker).", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the methods whose name contains one of these")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="stories")
    ap.add_argument("--pair", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--label", default=None,
                    help="added to the result file's name, e.g. 'before' when run on an older commit")
    args = ap.parse_args()
    prepare_process(quiet=True)
    from spec_bench import PAIRS, environment
    from transformers import AutoTokenizer

    from vllm_specdiff.training.data import held_out_prompts

    batches = args.batches or ([1, 8] if args.quick else [1, 8, 32])
    max_tokens = args.max_tokens or (64 if args.quick else 128)
    target = PAIRS[args.pair].target
    tok = AutoTokenizer.from_pretrained(str(target))
    if args.workload == "floor":
        from floor import workload_prompts
        prompts = workload_prompts()
    else:
        prompts = held_out_prompts(tok, HELD_OUT_TEXT, n=max(batches), prompt_tokens=32)
    timers = StepTimers()
    timers.install()
    env = environment("step_profile.py", sys.argv[1:])
    env.update(batches=batches, max_tokens=max_tokens, temperature=args.temperature,
               target=target.name, workload=args.workload)
    # stories: one engine serves every batch; floor: an engine per batch, as floor.py runs
    engine_batches = [[b] for b in batches] if args.workload == "floor" else [batches]
    cells = []
    for name, spec in methods(args.quick, args.pair).items():
        if args.only and not any(part in name for part in args.only):
            continue
        for bs in engine_batches:
            cells += profile(name, spec, target, bs, max_tokens, args.temperature, timers,
                             prompts, lambda m: print(m, flush=True), max_num_seqs=max(bs),
                             prompts_per_cell=3 if args.workload == "floor" else 1)
    stem = "step_profile" + ("" if args.pair == "tiny" else f"_{args.pair}") + ("_quick" if args.quick else "") + (
        f"_t{args.temperature:g}" if args.temperature else "") + (
        "_floor" if args.workload == "floor" else "") + (f"_{args.label}" if args.label else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({**env, "cells": cells}, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(report(cells, env))
    print(f"wrote {RESULTS / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
