"""Greedy identity in bfloat16: how often specdiff's output differs from plain decoding, and why.

    python benchmarks/bf16_identity.py [--prompts 200 --max-tokens 64 --batches 1 16]

For each dtype (float32, bfloat16) and batch size (max_num_seqs; all prompts submitted
at once), plain decoding and specdiff (defaults) generate greedily from the same
held-out TinyStories and Spec-Bench prompts through vLLM. For every output that differs,
the first differing position is located and the target's float32 top-2 logit gap there
is computed with transformers on the common prefix (the prompt plus the shared tokens):
a small gap means the two runs disagree at a near-tie, where verifying gamma + 1 tokens
in one pass and decoding them one at a time round differently. The same positions are
also recomputed in bfloat16 both ways (one pass over the prefix vs. token by token with
a KV cache) to show the size of that rounding difference. Writes
benchmarks/results/bf16_identity.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.spec_bench import RESULTS, environment, load_prompts, specdiff  # noqa: E402
from vllm_specdiff.runtime import (EMBEDDED_TARGET, close_engine, cpu_engine_defaults,  # noqa: E402
                                   prepare_process)


def generate(prompts, dtype: str, max_num_seqs: int, max_tokens: int, spec) -> list[list[int]]:
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=str(EMBEDDED_TARGET), speculative_config=spec, max_num_seqs=max_num_seqs,
              max_model_len=512, **{**cpu_engine_defaults(), "dtype": dtype})
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                            use_tqdm=False)
    finally:
        close_engine(llm)
    return [list(o.outputs[0].token_ids) for o in outs]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def top2_gap(model, context: list[int]) -> tuple[float, int, int]:
    """Float32 gap between the target's two best logits after `context`, and the two tokens."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1].float()
    top = logits.topk(2)
    return float(top.values[0] - top.values[1]), int(top.indices[0]), int(top.indices[1])


def schedule_difference(model_bf16, context: list[int]) -> float:
    """Largest |logit difference| at the last position of `context` between one bf16 pass
    over the whole context and bf16 decoding of it one token at a time (a KV cache)."""
    import torch

    ids = torch.tensor([context])
    with torch.no_grad():
        whole = model_bf16(ids).logits[0, -1].float()
        out = model_bf16(ids[:, :1], use_cache=True)
        for t in range(1, len(context)):
            out = model_bf16(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        stepwise = out.logits[0, -1].float()
    return float((whole - stepwise).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    args = ap.parse_args()
    prepare_process(quiet=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    env = environment("bf16_identity.py", sys.argv[1:])
    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_TARGET))
    prompts = [ids for _, ids in load_prompts(tokenizer, args.prompt_tokens)][: args.prompts]
    spec = specdiff(8, 2).speculative_config
    fp32 = AutoModelForCausalLM.from_pretrained(str(EMBEDDED_TARGET), dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(str(EMBEDDED_TARGET), dtype=torch.bfloat16).eval()
    rows, differences = [], []
    for dtype in ("float32", "bfloat16"):
        for batch in args.batches:
            plain = generate(prompts, dtype, batch, args.max_tokens, None)
            spec_out = generate(prompts, dtype, batch, args.max_tokens, spec)
            diffs = []
            for i, (a, b) in enumerate(zip(plain, spec_out)):
                j = first_difference(a, b)
                if j is None:
                    continue
                context = prompts[i] + a[:j]
                gap, best, second = top2_gap(fp32, context)
                diffs.append({"dtype": dtype, "batch": batch, "prompt": i, "position": j,
                              "plain_token": a[j], "specdiff_token": b[j], "fp32_gap": gap,
                              "fp32_top2": [best, second],
                              "bf16_schedule_difference": schedule_difference(bf16, context)})
            rows.append({"dtype": dtype, "batch": batch, "prompts": len(prompts),
                         "differ": len(diffs)})
            differences += diffs
            print(f"{dtype} b={batch}: {len(diffs)}/{len(prompts)} outputs differ "
                  + " ".join(f"(pos {d['position']}, gap {d['fp32_gap']:.4f})" for d in diffs), flush=True)
    largest = max((d["fp32_gap"] for d in differences), default=None)
    lines = ["# Greedy identity of specdiff and plain decoding, float32 vs bfloat16", "",
             f"Command: `{env['command']}`  ", f"Commit: {env['commit']}, {env['date']}  ",
             f"Machine: {env['cpu']}, {env['cores']} cores; vLLM {env['vllm']} (CPU); "
             f"{(time.time() - started) / 60:.0f} min  ",
             f"Workload: {len(prompts)} prompts (Spec-Bench and held-out TinyStories, last "
             f"{args.prompt_tokens} tokens), {args.max_tokens} greedy tokens each, all submitted at "
             f"once with max_num_seqs = batch; specdiff with its pinned defaults (gamma 8, T 2).", "",
             "| dtype | batch | outputs that differ |", "|---|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['batch']} | {r['differ']} / {r['prompts']} |" for r in rows]
    lines += ["", "## Every first difference", "",
              "| dtype | batch | prompt | position | plain | specdiff | float32 top-2 gap | "
              "bf16 one-pass vs stepwise max logit difference |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {d['dtype']} | {d['batch']} | {d['prompt']} | {d['position']} | {d['plain_token']} | "
              f"{d['specdiff_token']} | {d['fp32_gap']:.4f} | {d['bf16_schedule_difference']:.4f} |"
              for d in differences]
    lines += ["", f"Largest float32 top-2 gap at a first difference: "
              f"{'none' if largest is None else f'{largest:.4f}'}.", ""]
    (RESULTS / "bf16_identity.md").write_text("\n".join(lines))
    (RESULTS / "bf16_identity.json").write_text(json.dumps(
        {**env, "settings": vars(args), "rows": rows, "differences": differences}, indent=1) + "\n")
    print("wrote", RESULTS / "bf16_identity.md")


if __name__ == "__main__":
    main()
