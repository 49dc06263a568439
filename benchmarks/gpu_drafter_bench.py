"""Drafter cost on a GPU: MDLM proposals vs an equal-size AR drafter, plus verification.

For a machine with an NVIDIA GPU, torch and Triton but no vLLM. Times one
proposal of gamma tokens for a batch of requests with a context of W tokens:

- MDLM (mdlm-owt "small" shape: 12 blocks, 768 wide, vocab 50258), bf16, SDPA,
  through ``DiffusionDrafter`` (the plugin's code path: canvas building included),
  T denoising steps, left-to-right schedule;
- AR drafter of the same size (GPT-2 shape, 12 x 768, vocab 50257), bf16, gamma
  greedy decode steps on a KV cache pre-filled with the W context tokens (what a
  draft-model proposer does per step);

then runs the fused verification kernel benchmark (bench_verify.py). Random
weights: only time is measured. Writes benchmarks/results/gpu_drafter_<card>.md.

    python benchmarks/gpu_drafter_bench.py            # ~3 minutes on an H100/H200
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_specdiff.drafter import DiffusionDrafter  # noqa: E402
from vllm_specdiff.model import MDLM, MDLMConfig  # noqa: E402


def timed(fn, iters: int) -> float:
    """Median milliseconds of fn() after warm-up (CUDA events on GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def ar_proposal(model, cache_template, last_tokens, gamma):
    """gamma greedy decode steps from a pre-filled KV cache (copied each call)."""
    import copy

    past = copy.deepcopy(cache_template)
    tok = last_tokens
    for _ in range(gamma):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
    return tok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--gammas", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip-verify", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    mdlm = MDLM(MDLMConfig()).to(device=device, dtype=dtype).eval()
    ar = GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024)
                         ).to(device=device, dtype=dtype).eval()
    n_mdlm = sum(p.numel() for p in mdlm.parameters())
    n_ar = sum(p.numel() for p in ar.parameters())
    lines = [f"# Drafter proposal time on {card}", "",
             f"Command: `python benchmarks/gpu_drafter_bench.py {' '.join(sys.argv[1:])}`  ",
             f"MDLM {n_mdlm / 1e6:.0f}M params, AR drafter {n_ar / 1e6:.0f}M params, {dtype}, "
             f"context W={args.context}; median of {args.iters} runs, ms per proposal.", "",
             "| batch | gamma | AR (gamma steps) | " + " | ".join(f"MDLM T={t}" for t in args.steps)
             + " | best MDLM vs AR |", "|---" * (4 + len(args.steps)) + "|"]
    with torch.inference_mode():
        for batch in args.batches:
            contexts = torch.randint(0, 50257, (batch, args.context)).tolist()
            ctx = torch.tensor(contexts, device=device)
            prefill = ar(input_ids=ctx[:, :-1], use_cache=True).past_key_values
            for gamma in args.gammas:
                ar_ms = timed(lambda: ar_proposal(ar, prefill, ctx[:, -1:], gamma), args.iters)
                cells = []
                for steps in args.steps:
                    if steps > gamma:
                        cells.append("-")
                        continue
                    drafter = DiffusionDrafter(mdlm, steps=steps, schedule="left_to_right",
                                               context_window=args.context)
                    ms = timed(lambda: drafter.draft(contexts, gamma, [0.0] * batch), args.iters)
                    cells.append(ms)
                best = min(c for c in cells if c != "-")
                lines.append(f"| {batch} | {gamma} | {ar_ms:.2f} | "
                             + " | ".join(c if c == "-" else f"{c:.2f}" for c in cells)
                             + f" | {ar_ms / best:.1f}x |")
                print(lines[-1], flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results"
               / f"gpu_drafter_{card.replace(' ', '_')}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("wrote", out)
    if not args.skip_verify:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_verify.py"),
                        "--batch", "64", "--gamma", "16", "--vocab", "50257",
                        "--out", str(out.parent / f"verify_{card.replace(' ', '_')}.md")],
                       check=True)


if __name__ == "__main__":
    main()
