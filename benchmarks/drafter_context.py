"""Drafter time per step against context length: re-encoding a window vs the cache.

    python benchmarks/drafter_context.py [--drafter models/tiny-mdlm-block-causal]

The drafter alone (no engine), the way the proposer runs it in a decode step: every
request's context grows by ``--accepted`` + 1 tokens a step and the drafter drafts
gamma tokens in T passes. Three ways to see a context of L tokens:

- ``window``: no cache, every pass re-encodes the last W = L context tokens plus the
  draft block (what ``drafter_cache: off`` does): cost grows with L;
- ``cache``: the drafter cache (exact for a block-causal drafter): a step encodes the
  new tokens and the block, later passes only the block: flat in L but for attention;
- ``cache, last W``: the drafter cache holding only ``--window`` W tokens, as when a
  context outgrows the drafter's window (W = model_length - gamma at most): each step
  overwrites a slot's oldest columns, and must cost what a context that fits does.

Cells: median ms per drafting step over ``--steps`` steps after warm-up, [min-max] of
``--repeats`` medians. Result: benchmarks/results/drafter_context.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.spec_bench import environment  # noqa: E402
from vllm_specdiff.drafter import CachedCanvasArgs, DiffusionDrafter  # noqa: E402
from vllm_specdiff.drafter_cache import DrafterCache  # noqa: E402
from vllm_specdiff.loader import load_mdlm  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def time_steps(drafter: DiffusionDrafter, batch: int, context_len: int, gamma: int,
               accepted: int, steps: int, cache: DrafterCache | None, seed: int,
               evict: torch.Tensor | None = None) -> float:
    """Median seconds of one drafting step; contexts start at ``context_len`` tokens and
    grow by ``accepted`` + 1 a step (the window path sees the last ``context_len``).
    ``evict``: a buffer written before each step (as a target's forward would evict
    the drafter's weights from the caches)."""
    rng = np.random.default_rng(seed)
    vocab = drafter.mask_id
    contexts = [list(rng.integers(0, vocab, size=context_len)) for _ in range(batch)]
    req_ids = [f"r{seed}-{i}" for i in range(batch)]
    times = []
    for step in range(steps + 2):  # the first step encodes whole prompts: untimed
        cached = None
        if cache is not None:
            cached = CachedCanvasArgs(cache, cache.slots_for(req_ids),
                                      drafter.model.config.attention == "block_causal", None)
        if evict is not None:
            evict.add_(1.0)
        start = time.perf_counter()
        draft = drafter.draft(contexts, gamma, None, None, cached=cached)
        elapsed = time.perf_counter() - start
        if step >= 2:
            times.append(elapsed)
        for c, toks in zip(contexts, draft.tokens[:, :accepted].tolist()):
            c.extend([*toks, int(rng.integers(0, vocab))])
    if cache is not None:
        cache.release(req_ids)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", default=str(ROOT / "models" / "tiny-mdlm-block-causal"))
    p.add_argument("--contexts", type=int, nargs="+", default=[16, 128, 512])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--gamma", type=int, default=8)
    p.add_argument("--diffusion-steps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--accepted", type=int, default=3, help="draft tokens accepted per step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=64,
                   help="the 'cache, last W' column's cache size (below the longest context)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "drafter_context"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_mdlm(args.drafter)
    longest = max(args.contexts)
    growth = (args.steps + 2) * (args.accepted + 1)
    if longest + growth + args.gamma > model.config.model_length:
        p.error(f"--contexts up to {longest} + {growth} tokens of growth + gamma {args.gamma} "
                f"exceed the drafter's model_length {model.config.model_length}")
    cells = []
    dtype = next(model.parameters()).dtype
    for T in args.diffusion_steps:
        for batch in args.batches:
            caches = {"window": None,
                      "cache": DrafterCache(model.config, batch, longest + growth, dtype),
                      "ring": DrafterCache(model.config, batch, args.window, dtype)}
            for L in args.contexts:
                row = {"T": T, "batch": batch, "context": L}
                for how, cache in caches.items():
                    drafter = DiffusionDrafter(model, T, "left_to_right", context_window=L,
                                               max_positions=longest + growth + args.gamma)
                    with torch.inference_mode():
                        runs = [time_steps(drafter, batch, L, args.gamma, args.accepted,
                                           args.steps, cache, seed=r) * 1e3
                                for r in range(args.repeats)]
                    row[how] = runs
                cells.append(row)
                print(f"T={T} batch={batch} context={L}: " + ", ".join(
                    f"{how} {statistics.median(row[how]):.2f} ms" for how in caches), flush=True)
    env = environment("drafter_context.py", sys.argv[1:] if argv is None else argv)
    env["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    env["drafter_config"] = model.config.to_dict()
    Path(args.out + ".json").write_text(json.dumps({"env": env, "cells": cells}, indent=2) + "\n")
    Path(args.out + ".md").write_text(report(cells, env, args))
    print(f"wrote {args.out}.md")
    return 0


def cell(ms: list[float]) -> str:
    return f"{statistics.median(ms):.2f} [{min(ms):.2f}-{max(ms):.2f}]"


def report(cells, env, args) -> str:
    cfg = env["drafter_config"]
    lines = [
        "# Drafter time per step against context length",
        "",
        f"Drafter `{args.drafter}` ({cfg['n_blocks']} x {cfg['hidden_dim']}, "
        f"attention {cfg['attention']}), gamma {args.gamma}, {args.accepted} draft tokens "
        f"accepted + 1 target token added to each context per step (so contexts grow "
        f"from L to L + {(args.steps + 2) * (args.accepted + 1)} over the run; the window "
        f"path sees the last L), {args.threads} torch "
        f"threads. Milliseconds per drafting step: median of {args.steps} steps, median "
        f"[min-max] of {args.repeats} repeats. `window`: every pass re-encodes the last L "
        "tokens (drafter_cache off); `cache`: the drafter cache; `cache, last W`: a "
        f"drafter cache of W = {args.window} tokens, which every context here outgrows "
        "(the last W tokens are kept).",
        "",
        f"| T | batch | context L | window ms | cache ms | window / cache | "
        f"cache, last {args.window} ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        ratio = statistics.median(c["window"]) / statistics.median(c["cache"])
        lines.append(f"| {c['T']} | {c['batch']} | {c['context']} | {cell(c['window'])} | "
                     f"{cell(c['cache'])} | {ratio:.2f}x | {cell(c['ring'])} |")
    lines += ["", f"Commit {env['commit']}, {env['date']}, {env['cpu']}.",
              f"Command: `{env['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
