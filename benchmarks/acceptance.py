"""Greedy acceptance (mean accepted length tau) of the MDLM and AR drafters, without vLLM.

For each held-out prompt the target's greedy continuation is the reference. Greedy
speculative decoding is rolled out exactly: at each step the drafter proposes gamma
tokens from the current context (prompt + the reference so far); the step accepts
the leading draft tokens equal to the reference plus the target's own next token,
so tau = 1 + number of leading matches, and the context advances by tau tokens.
tau is averaged over all steps of all prompts (steps start while fewer than
--new-tokens reference tokens are accepted; the reference is gamma tokens longer so
every proposal is compared in full).

- MDLM: ``DiffusionDrafter`` (the code the plugin runs) at temperature 0, T steps,
  the given schedule, context window W (default: the drafter's config, else 64).
- AR drafter: gamma greedy steps with a KV cache (gamma forward passes per proposal).

    python benchmarks/acceptance.py --target models/tiny-target --mdlm models/tiny-mdlm \
        --ar models/tiny-ar-drafter --prompts 32 --new-tokens 64 \
        --out benchmarks/results/acceptance.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_specdiff.drafter import DiffusionDrafter  # noqa: E402
from vllm_specdiff.loader import load_mdlm, read_config  # noqa: E402
from vllm_specdiff.training.data import held_out_prompts  # noqa: E402
from vllm_specdiff.training.distill import generate_transformers, load_target  # noqa: E402


def leading_matches(draft: list[int], ref: list[int]) -> int:
    n = 0
    for a, b in zip(draft, ref):
        if a != b:
            break
        n += 1
    return n


def mdlm_tau(drafter: DiffusionDrafter, prompts, refs, gamma: int, new_tokens: int):
    """Batched greedy rollout over all prompts; returns (tau, passes per proposal)."""
    pos = [0] * len(prompts)
    accepted_total, steps_total, passes_total, proposals = 0, 0, 0, 0
    while True:
        active = [i for i in range(len(prompts)) if pos[i] < new_tokens]
        if not active:
            break
        contexts = [prompts[i] + refs[i][: pos[i]] for i in active]
        draft = drafter.draft(contexts, gamma, temperatures=[0.0] * len(active))
        toks = draft.tokens.tolist()
        passes_total += draft.forward_passes
        proposals += 1
        for row, i in enumerate(active):
            n = leading_matches(toks[row], refs[i][pos[i] : pos[i] + gamma])
            accepted_total += n + 1
            steps_total += 1
            pos[i] += n + 1
    return accepted_total / steps_total, passes_total / proposals, steps_total


@torch.no_grad()
def ar_tau(model, prompts, refs, gamma: int, new_tokens: int, device):
    """Per-prompt greedy rollout of an AR drafter with a KV cache (cropped on rejection)."""
    from transformers import DynamicCache

    accepted_total, steps_total, passes = 0, 0, 0
    for prompt, ref in zip(prompts, refs):
        cache, cached = DynamicCache(), []  # cached: tokens whose K/V are in the cache
        pos = 0
        while pos < new_tokens:
            ctx = prompt + ref[:pos]
            keep = min(leading_matches(cached, ctx), len(ctx) - 1)
            drop = cache.get_seq_length() - keep
            if drop > 0:
                cache.crop(-drop)
            cached = ctx[:keep]
            feed = ctx[keep:]
            draft = []
            for _ in range(gamma):
                x = torch.tensor([feed], dtype=torch.long, device=device)
                out = model(input_ids=x, past_key_values=cache, use_cache=True)
                passes += 1
                cached = cached + feed
                nxt = int(out.logits[0, -1].argmax())
                draft.append(nxt)
                feed = [nxt]
            n = leading_matches(draft, ref[pos : pos + gamma])
            accepted_total += n + 1
            steps_total += 1
            pos += n + 1
    return accepted_total / steps_total, passes / steps_total, steps_total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="models/tiny-target")
    p.add_argument("--mdlm", default="models/tiny-mdlm")
    p.add_argument("--ar", default="models/tiny-ar-drafter", help="'' to skip the AR drafter")
    p.add_argument("--valid", default="data/tinystories/tinystories_v1_valid_head.txt")
    p.add_argument("--prompts", type=int, default=24, help="number of held-out prompts")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--steps", default="1,2,4,8", help="MDLM denoising steps T")
    p.add_argument("--gammas", default="4,8,16")
    p.add_argument("--schedule", default="left_to_right")
    p.add_argument("--context-window", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/acceptance.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    t0 = time.time()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.target)
    prompts = held_out_prompts(tok, args.valid, args.prompts, args.prompt_tokens)
    gammas = [int(g) for g in args.gammas.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    target = load_target(args.target, device)
    refs = generate_transformers(target, prompts, args.new_tokens + max(gammas),
                                 [0.0] * len(prompts), 0, 64, device, progress=False)
    del target

    results = {"mdlm": {}, "ar": {}}
    if args.mdlm:
        mdlm = load_mdlm(args.mdlm, device, torch.float32)
        raw = json.loads((Path(args.mdlm) / "config.json").read_text())
        W = args.context_window or raw.get("context_window", 64)
        read_config(args.mdlm)
        for T in steps:
            drafter = DiffusionDrafter(mdlm, T, args.schedule, W)
            for g in gammas:
                tau, passes, n = mdlm_tau(drafter, prompts, refs, g, args.new_tokens)
                results["mdlm"][f"{T},{g}"] = {"tau": tau, "passes": passes, "steps": n}
                print(f"MDLM T={T} gamma={g}: tau {tau:.3f} ({passes:.1f} passes/proposal)",
                      flush=True)
    if args.ar:
        ar = load_target(args.ar, device)
        for g in gammas:
            tau, passes, n = ar_tau(ar, prompts, refs, g, args.new_tokens, device)
            results["ar"][str(g)] = {"tau": tau, "passes": passes, "steps": n}
            print(f"AR gamma={g}: tau {tau:.3f} ({passes:.1f} passes/proposal)", flush=True)
    elapsed = time.time() - t0

    from benchmarks.spec_bench import environment

    env = environment("acceptance.py", argv if argv is not None else sys.argv[1:])
    lines = [
        "# Greedy acceptance (tau) of the drafters",
        "",
        f"Command: `{env['command']}`  ",
        f"Commit: {env['commit']}",
        "",
        f"- target `{args.target}`, MDLM `{args.mdlm}`, AR drafter `{args.ar}`",
        f"- {len(prompts)} held-out prompts (first {args.prompt_tokens} tokens of stories in "
        f"`{args.valid}`), {args.new_tokens} greedy target tokens each",
        f"- MDLM schedule `{args.schedule}`, context window W = "
        f"{W if args.mdlm else '-'}, temperature 0 (`DiffusionDrafter`)",
        "- tau = 1 + leading draft tokens equal to the target's greedy tokens, averaged over "
        "all speculative steps of all prompts; cell: tau (drafter forward passes per proposal)",
        f"- {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} CPU, "
        f"{args.threads} torch threads, {elapsed:.0f} s",
        "",
    ]
    if results["mdlm"]:
        lines += ["## MDLM drafter", "", "| T \\ gamma | " + " | ".join(str(g) for g in gammas) + " |",
                  "|---|" + "---:|" * len(gammas)]
        for T in steps:
            cells = [f"{results['mdlm'][f'{T},{g}']['tau']:.2f} ({results['mdlm'][f'{T},{g}']['passes']:.0f})"
                     for g in gammas]
            lines.append(f"| T={T} | " + " | ".join(cells) + " |")
        lines.append("")
    if results["ar"]:
        lines += ["## AR drafter (greedy, KV cache)", "",
                  "| gamma | " + " | ".join(str(g) for g in gammas) + " |",
                  "|---|" + "---:|" * len(gammas),
                  "| tau (passes) | " + " | ".join(
                      f"{results['ar'][str(g)]['tau']:.2f} ({results['ar'][str(g)]['passes']:.0f})"
                      for g in gammas) + " |", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "results": results, "seconds": elapsed}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
