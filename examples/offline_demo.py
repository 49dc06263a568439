"""`make demo`: offline batch generation on the embedded pair, with and without specdiff.

Greedy generation of held-out TinyStories prompts by models/small-target alone (37 M
parameters), then with specdiff drafting by models/small-mdlm (``"model": "mdlm"``
resolves to it through the target's ``specdiff.json``); ``--tiny`` runs the tiny pair
(models/tiny-target with models/tiny-mdlm) instead. Prints a few generations, the
acceptance figures from vLLM's counters, and output tokens/s of both runs measured
here, in this process.
"""

from __future__ import annotations

import argparse

from vllm_specdiff.runtime import (EMBEDDED_TARGET, HELD_OUT_TEXT, SMALL_TARGET, prepare_process,
                                   timed_generation)


def run(target, prompts, params, max_num_seqs, speculative_config=None):
    outputs, tps, stats = timed_generation(prompts, params, max_num_seqs, speculative_config,
                                           target)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    return tokens, [o.outputs[0].text for o in outputs], tps, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=1)
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1,
                        help="diffusion_steps T (1, the plugin's default, is the fastest on the small pair)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny pair (4.3 M target) instead of the small one")
    args = parser.parse_args()
    target = EMBEDDED_TARGET if args.tiny else SMALL_TARGET

    prepare_process()
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_specdiff.training.data import held_out_prompts

    tok = AutoTokenizer.from_pretrained(str(target))
    prompts = held_out_prompts(tok, HELD_OUT_TEXT, n=args.prompts, prompt_tokens=24)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    spec = {"method": "specdiff", "model": "mdlm", "num_speculative_tokens": args.gamma,
            "diffusion_steps": args.steps}

    print(f"\n== {target.name} alone: {len(prompts)} prompts x {args.max_tokens} tokens, "
          f"max_num_seqs={args.max_num_seqs}")
    base_tokens, _, base_tps, _ = run(target, prompts, params, args.max_num_seqs)
    print(f"== specdiff {spec}")
    spec_tokens, texts, spec_tps, stats = run(target, prompts, params, args.max_num_seqs, spec)

    print("\n-- generations (specdiff) --")
    for prompt, text in list(zip(prompts, texts))[:3]:
        print(f"[{tok.decode(prompt)}] {text[:300]!r}\n")
    same = sum(a == b for a, b in zip(base_tokens, spec_tokens))
    print(f"identical to the target alone: {same}/{len(prompts)} generations")
    print(f"mean accepted length: {stats.mean_accepted_length:.2f} tokens per target pass")
    print("per-position acceptance: "
          + " ".join(f"{a:.2f}" for a in stats.per_position_acceptance))
    print(f"tokens/s  target alone: {base_tps:8.1f}")
    print(f"tokens/s  specdiff:     {spec_tps:8.1f}   ({spec_tps / base_tps:.2f}x)")


if __name__ == "__main__":
    main()
