"""Spec-Bench on the embedded models: specdiff against vLLM's own speculators, one run.

Methods: no speculation; vLLM ``draft_model`` with the equal-size AR drafter
(models/tiny-ar-drafter); vLLM ``ngram``; specdiff over a grid of gamma x T. Each
method gets one engine (in this process); each (batch, temperature) cell then
generates the same prompts. Batch b means the prompts are submitted b at a time
to an engine with max_num_seqs = b (b = 1 is Spec-Bench's protocol).

Reported per category and overall: output tokens/s, speedup over no speculation
(same batch and temperature, measured in this run), mean accepted length tau
(tokens per target pass, bonus included), per-position acceptance, and the
drafter's share of generation time. Greedy cells also check that every method's
output equals plain decoding token for token.

    python benchmarks/spec_bench.py            # default grid (<= 30 min on 2 CPU cores)
    python benchmarks/spec_bench.py --quick    # <= 5 min
    python benchmarks/spec_bench.py --prompts-per-category 80   # all 480 prompts

The embedded models are TinyStories models: Spec-Bench prompts are far out of
their domain, and prompts are cut to their last --prompt-tokens tokens to fit the
target's 512-token context. A seventh category, ``tinystories``, holds the same
number of held-out TinyStories openings: the domain the models were trained on.
Results: benchmarks/results/spec_bench.md and PNGs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_specdiff.runtime import (EMBEDDED_AR_DRAFTER, EMBEDDED_DRAFTER,  # noqa: E402
                                   EMBEDDED_TARGET, HELD_OUT_TEXT, close_engine,
                                   cpu_engine_defaults, prepare_process)

SPEC_BENCH = ROOT / "data" / "spec_bench" / "question.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
CATEGORIES = {"writing": "mt_bench", "roleplay": "mt_bench", "reasoning": "mt_bench",
              "math": "mt_bench", "coding": "mt_bench", "extraction": "mt_bench",
              "stem": "mt_bench", "humanities": "mt_bench", "translation": "translation",
              "summarization": "summarization", "qa": "qa",
              "math_reasoning": "math_reasoning", "rag": "rag"}


@dataclass
class Method:
    name: str
    speculative_config: dict | None

    @property
    def is_specdiff(self) -> bool:
        return bool(self.speculative_config) and self.speculative_config["method"] == "specdiff"


@dataclass
class Cell:
    method: str
    batch: int
    temperature: float
    tokens: dict = field(default_factory=lambda: collections.Counter())
    seconds: dict = field(default_factory=lambda: collections.Counter())
    drafter_seconds: float = 0.0
    stats: object = None
    outputs: list = field(default_factory=list)

    def tps(self, category=None) -> float:
        if category is None:
            return sum(self.tokens.values()) / max(1e-9, sum(self.seconds.values()))
        return self.tokens[category] / max(1e-9, self.seconds[category])


def load_prompts(tokenizer, per_category: int, prompt_tokens: int):
    """(category, token ids) pairs; multi-turn rows use their first turn."""
    rows = [json.loads(line) for line in SPEC_BENCH.read_text().splitlines()]
    picked, counts = [], collections.Counter()
    for row in rows:
        cat = CATEGORIES[row["category"]]
        if counts[cat] >= per_category:
            continue
        ids = tokenizer(row["turns"][0], add_special_tokens=False)["input_ids"][-prompt_tokens:]
        picked.append((cat, ids))
        counts[cat] += 1
    from vllm_specdiff.training.data import held_out_prompts

    picked += [("tinystories", ids) for ids in
               held_out_prompts(tokenizer, HELD_OUT_TEXT, n=per_category, prompt_tokens=32)]
    return picked


def methods_for(args) -> list[Method]:
    out = [Method("none", None),
           Method(f"draft_model g{args.ar_gamma}",
                  {"method": "draft_model", "model": str(EMBEDDED_AR_DRAFTER),
                   "num_speculative_tokens": args.ar_gamma}),
           Method(f"ngram g{args.ngram_gamma}",
                  {"method": "ngram", "num_speculative_tokens": args.ngram_gamma,
                   "prompt_lookup_min": 1, "prompt_lookup_max": 4})]
    for gamma in args.gammas:
        for steps in args.steps:
            if steps <= gamma:
                out.append(Method(f"specdiff g{gamma} T{steps}",
                                  {"method": "specdiff", "model": str(EMBEDDED_DRAFTER),
                                   "num_speculative_tokens": gamma, "diffusion_steps": steps,
                                   "adaptive": not args.no_adaptive}))
    return out


def model_runner(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def time_drafter(llm) -> list[float]:
    """Wrap the engine's drafter so its time can be reported (in-process engine)."""
    spent = [0.0]
    drafter = getattr(model_runner(llm), "drafter", None)
    if drafter is None:
        return spent
    original = drafter.propose

    def timed(*a, **kw):
        start = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - start

    drafter.propose = timed
    return spent


def run_method(method, prompts, args, progress) -> list[Cell]:
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_specdiff.metrics import from_metrics

    llm = LLM(model=str(EMBEDDED_TARGET), speculative_config=method.speculative_config,
              max_num_seqs=max(args.batches), max_model_len=512, **cpu_engine_defaults())
    cells = []
    try:
        drafter_time = time_drafter(llm)
        warm = [TokensPrompt(prompt_token_ids=p) for _, p in prompts[:2]]
        llm.generate(warm, SamplingParams(max_tokens=8), use_tqdm=False)
        for batch in args.batches:
            # Continuous batching would refill up to max_num_seqs; b at a time keeps
            # the engine's concurrency at b for every method alike.
            for temperature in args.temperatures:
                cell = Cell(method.name, batch, temperature)
                params = SamplingParams(temperature=temperature, max_tokens=args.max_tokens,
                                        ignore_eos=True, seed=None)
                before, t0 = from_metrics(llm.get_metrics()), drafter_time[0]
                by_cat = collections.defaultdict(list)
                for cat, ids in prompts:
                    by_cat[cat].append(ids)
                for cat, cat_prompts in by_cat.items():
                    for start in range(0, len(cat_prompts), batch):
                        chunk = [TokensPrompt(prompt_token_ids=p)
                                 for p in cat_prompts[start:start + batch]]
                        t = time.perf_counter()
                        outs = llm.generate(chunk, params, use_tqdm=False)
                        cell.seconds[cat] += time.perf_counter() - t
                        cell.tokens[cat] += sum(len(o.outputs[0].token_ids) for o in outs)
                        cell.outputs.extend(list(o.outputs[0].token_ids) for o in outs)
                        progress.update(len(chunk))
                cell.stats = from_metrics(llm.get_metrics()) - before
                cell.drafter_seconds = drafter_time[0] - t0
                cells.append(cell)
                progress.set_postfix_str(f"{method.name} b{batch} t{temperature}: "
                                         f"{cell.tps():.0f} tok/s")
    finally:
        close_engine(llm)
    return cells


def fmt_row(cells):
    return "| " + " | ".join(cells) + " |"


def write_report(cells: list[Cell], args, categories, started) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = {(c.batch, c.temperature): c for c in cells if c.method == "none"}
    lines = ["# Spec-Bench on the embedded models", "",
             f"Command: `python benchmarks/spec_bench.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"{platform.processor() or 'unknown CPU'}; vLLM CPU backend, float32.  ",
             f"Prompts: {args.prompts_per_category} per category ({len(categories)} categories), "
             f"last {args.prompt_tokens} tokens of each; {args.max_tokens} new tokens each; "
             f"adaptive gamma {'off' if args.no_adaptive else 'on'}. Wall time "
             f"{(time.time() - started) / 60:.1f} min.", ""]
    for temperature in args.temperatures:
        mode = "greedy" if temperature == 0 else f"temperature {temperature}"
        lines += [f"## Overall, {mode}", "",
                  fmt_row(["method", *[f"b={b} tok/s" for b in args.batches],
                           *[f"b={b} speedup" for b in args.batches], "tau (b=1)",
                           "per-position acceptance (b=1)", "drafter share (b=1)",
                           "greedy output = plain"]),
                  fmt_row(["---"] * (5 + 2 * len(args.batches)))]
        for name in dict.fromkeys(c.method for c in cells):
            row = {c.batch: c for c in cells if c.method == name and c.temperature == temperature}
            if not row:
                continue
            first = row[min(row)]
            per_pos = " ".join(f"{a:.2f}" for a in first.stats.per_position_acceptance) or "-"
            share = sum(first.seconds.values())
            same = "-"
            if temperature == 0 and name != "none":
                same = "yes" if all(
                    row[b].outputs == base[(b, 0.0)].outputs for b in row) else "NO"
            lines.append(fmt_row([
                name, *[f"{row[b].tps():.0f}" for b in args.batches],
                *[f"{row[b].tps() / base[(b, temperature)].tps():.2f}x" for b in args.batches],
                f"{first.stats.mean_accepted_length:.2f}" if first.stats.drafts else "-",
                per_pos, f"{first.drafter_seconds / share:.0%}" if share else "-", same]))
        lines += ["", f"### Speedup over no speculation by category, {mode}, batch 1", "",
                  fmt_row(["method", *categories]), fmt_row(["---"] * (1 + len(categories)))]
        b1 = min(args.batches)
        for name in dict.fromkeys(c.method for c in cells):
            match = [c for c in cells if c.method == name and c.batch == b1
                     and c.temperature == temperature]
            if match:
                ref = base[(b1, temperature)]
                lines.append(fmt_row([name, *[f"{match[0].tps(cat) / ref.tps(cat):.2f}x"
                                              for cat in categories]]))
        lines.append("")
    out = RESULTS / ("spec_bench_quick.md" if args.quick else "spec_bench.md")
    out.write_text("\n".join(lines) + "\n")
    return out


def plot(cells: list[Cell], args) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots (pip install vllm-specdiff[bench])")
        return []
    paths = []
    base = {(c.batch, c.temperature): c for c in cells if c.method == "none"}
    for temperature in args.temperatures:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in dict.fromkeys(c.method for c in cells):
            row = sorted((c for c in cells if c.method == name and c.temperature == temperature),
                         key=lambda c: c.batch)
            ax.plot([c.batch for c in row],
                    [c.tps() / base[(c.batch, temperature)].tps() for c in row],
                    marker="o", label=name)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (max_num_seqs)")
        ax.set_ylabel("speedup over no speculation")
        mode = "greedy" if temperature == 0 else f"temperature {temperature}"
        ax.set_title(f"Spec-Bench, embedded models, {mode}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = RESULTS / f"spec_bench{'_quick' if args.quick else ''}_speedup_t{temperature:g}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid, <= 5 minutes")
    p.add_argument("--prompts-per-category", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--gammas", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--temperatures", type=float, nargs="+", default=None)
    p.add_argument("--ar-gamma", type=int, default=4)
    p.add_argument("--ngram-gamma", type=int, default=4)
    p.add_argument("--no-adaptive", action="store_true")
    args = p.parse_args()
    defaults = (dict(prompts_per_category=2, max_tokens=48, gammas=[8], steps=[2],
                     batches=[1, 32], temperatures=[0.0]) if args.quick else
                dict(prompts_per_category=4, max_tokens=48, gammas=[4, 8, 16], steps=[1, 2, 4],
                     batches=[1, 8, 32], temperatures=[0.0, 1.0]))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    prepare_process(quiet=True)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    started = time.time()
    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TARGET))
    prompts = load_prompts(tok, args.prompts_per_category, args.prompt_tokens)
    categories = list(dict.fromkeys(cat for cat, _ in prompts))
    methods = methods_for(args)
    total = len(methods) * len(args.batches) * len(args.temperatures) * len(prompts)
    cells: list[Cell] = []
    with tqdm(total=total, unit="prompt", desc="spec-bench") as progress:
        for method in methods:
            cells += run_method(method, prompts, args, progress)
    report = write_report(cells, args, categories, started)
    plots = plot(cells, args)
    print(report.read_text())
    print("wrote", report, *plots)


if __name__ == "__main__":
    main()
