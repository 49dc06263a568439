"""A drafting step: what the drafter's linears multiply, and how.

    python benchmarks/drafter_linears.py [--batches 1 8] [--rounds 6]

Three builds of each embedded drafter, in this one process from the same checkpoint:

- ``F.linear``: every block over every canvas column, weights packed anew by
  ``F.linear`` on every call (the plugin before stop 38);
- ``prepacked``: the same, the folded linears' weights reordered once into oneDNN's
  blocked layout (``model.prepacked``, what ``freeze_conditioning`` does on a CPU);
- ``scored only``: prepacked, and the last block runs its attention and MLP for the
  scored draft columns only (the other columns feed nothing but their keys and
  values; ``DDiTBlock.forward_folded``'s ``rows``): what the plugin does now.

They are timed in interleaved rounds the way the proposer runs them in a decode step
with the default settings (``context_window`` and ``drafter_cache`` 'auto': the drafter
cache for block-causal drafters): each step drafts gamma tokens per request, then every
context grows by ``--accepted`` + 1 tokens; a 16 MiB buffer is written between steps,
as the target's forward would evict the drafter's weights.

Cells: median ms per drafting step (median of ``--steps`` steps per round, median
[min-max] over rounds) and the median of per-round ratios: prepacked / F.linear, and
scored only / prepacked. Result: benchmarks/results/drafter_linears{_LABEL}.{md,json}.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.drafter_context import time_steps  # noqa: E402
from benchmarks.spec_bench import environment  # noqa: E402
from vllm_specdiff import model as mdlm_model  # noqa: E402
from vllm_specdiff.config import SpecDiffConfig  # noqa: E402
from vllm_specdiff.drafter import DiffusionDrafter  # noqa: E402
from vllm_specdiff.drafter_cache import DrafterCache  # noqa: E402
from vllm_specdiff.loader import drafter_dtypes, load_mdlm  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DRAFTERS = ("tiny-mdlm", "tiny-mdlm-block-causal", "small-mdlm")
ARMS = ("F.linear", "prepacked", "scored only")
RATIOS = (("prepacked", "F.linear"), ("scored only", "prepacked"))
DEFAULTS = SpecDiffConfig()
MAX_MODEL_LEN = 4096  # the engine's limit the proposer would see: above every context here


def build(name: str, arm: str, batch: int,
          gamma: int) -> tuple[DiffusionDrafter, DrafterCache | None]:
    """The drafter (and its cache) as the proposer builds it with default settings."""
    defaults = DEFAULTS._replace(num_speculative_tokens=gamma)
    cpu = torch.device("cpu")
    dtype, matmul_dtype = drafter_dtypes(defaults.drafter_dtype, torch.float32, cpu)
    prepacked = mdlm_model.prepacked
    if arm == "F.linear":
        mdlm_model.prepacked = lambda weight: weight
    try:
        model = load_mdlm(ROOT / "models" / name, device=cpu, dtype=dtype)
        if arm != "scored only":
            for block in model.backbone.blocks:
                block.forward_folded = functools.partial(every_column, block.forward_folded)
        window = defaults.drafter_window(model.config, MAX_MODEL_LEN)
        drafter = DiffusionDrafter(model, defaults.diffusion_steps, defaults.schedule,
                                   context_window=window,
                                   max_positions=MAX_MODEL_LEN + gamma + 1,
                                   matmul_dtype=matmul_dtype)
    finally:
        mdlm_model.prepacked = prepacked
    cache = (DrafterCache(model.config, batch, window, dtype)
             if defaults.uses_drafter_cache(model.config) else None)
    return drafter, cache


def every_column(forward_folded, *args, rows=None):
    """A block's folded forward over every column, then the ``rows`` asked for."""
    out, kv = forward_folded(*args)
    return (out if rows is None else out[:, rows]), kv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafters", nargs="+", default=list(DRAFTERS), choices=DRAFTERS)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--gamma", type=int, default=8)
    p.add_argument("--accepted", type=int, default=3, help="draft tokens accepted per step")
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not torch.backends.mkldnn.is_available():
        p.error("this torch has no oneDNN (mkldnn): nothing is prepacked")
    evict = torch.zeros(4 * 2**20)  # 16 MiB
    cells = []
    for name in args.drafters:
        for batch in args.batches:
            arms = {arm: build(name, arm, batch, args.gamma) for arm in ARMS}
            ms = {arm: [] for arm in ARMS}
            with torch.inference_mode():
                for r in range(args.rounds):
                    for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
                        drafter, cache = arms[arm]
                        ms[arm].append(time_steps(drafter, batch, args.prompt_tokens, args.gamma,
                                                  args.accepted, args.steps, cache, seed=r,
                                                  evict=evict) * 1e3)
            drafter, cache = arms["scored only"]
            cells.append({"drafter": name, "window": drafter.context_window,
                          "cache": cache is not None, "batch": batch, **ms,
                          "ratios": {f"{a} / {b}": statistics.median(
                              [x / y for x, y in zip(ms[a], ms[b])]) for a, b in RATIOS}})
            print(f"{name} batch {batch}: " + ", ".join(
                f"{arm} {statistics.median(ms[arm]):.2f} ms" for arm in ARMS) + ", " + ", ".join(
                f"{k} {v:.2f}" for k, v in cells[-1]["ratios"].items()), flush=True)
    env = environment("drafter_linears.py", sys.argv[1:] if argv is None else argv)
    env["settings"] = vars(args)
    out = RESULTS / ("drafter_linears" + (f"_{args.label}" if args.label else ""))
    out.with_suffix(".json").write_text(json.dumps({"env": env, "cells": cells}, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(cells, env, args))
    print(f"wrote {out}.md")
    return 0


def cell(ms: list[float]) -> str:
    return f"{statistics.median(ms):.2f} [{min(ms):.2f}-{max(ms):.2f}]"


def report(cells, env, args) -> str:
    lines = [
        "# A drafting step: linears through F.linear, prepacked for oneDNN, and the last "
        "block over the scored columns only",
        "",
        f"Command: `{env['command']}`  ",
        f"Commit: {env['commit']}  ",
        f"Date: {env['date']}  ",
        f"Machine: {env['cpu']}, {env['cores']} cores, torch threads {args.threads}",
        "",
        f"One process, the three builds of each drafter from the same checkpoint (dtype "
        f"and matmul dtype as `drafter_dtype: auto` picks for a float32 target here), "
        f"T = {DEFAULTS.diffusion_steps}, gamma "
        f"{args.gamma}, prompts of {args.prompt_tokens} tokens growing by "
        f"{args.accepted} + 1 a step, a 16 MiB buffer written between steps. Cells: "
        f"median ms per drafting step ({args.steps} steps a round), median [min-max] of "
        f"{args.rounds} interleaved rounds; ratio: median of per-round ratios.",
        "",
        "Builds: `F.linear` and `prepacked` run every block over every canvas column; "
        "`scored only` (prepacked too) runs the last block's attention and MLP for the "
        "scored draft columns only, as the plugin does.",
        "",
        "| drafter | context | batch | " + " | ".join(f"{a} ms" for a in ARMS) + " | "
        + " | ".join(f"{a} / {b}" for a, b in RATIOS) + " |",
        "|---|---|---:|" + "---:|" * (len(ARMS) + len(RATIOS)),
    ]
    for c in cells:
        how = (f"drafter cache, last {c['window']} tokens" if c["cache"]
               else f"last {c['window']} tokens, re-encoded every pass")
        lines.append(f"| {c['drafter']} | {how} | {c['batch']} | "
                     + " | ".join(cell(c[a]) for a in ARMS) + " | "
                     + " | ".join(f"{v:.2f}x" for v in c["ratios"].values()) + " |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
