"""``specdiff-train``: train the models of a SpecDiff pair.

Subcommands:
  tokenizer   byte-level BPE on a corpus (Hugging Face format)
  target      small GPT-2 causal LM on a corpus
  drafter     MDLM drafter distilled from any HF causal-LM target
  ar-drafter  GPT-2 drafter of the same size on the same distillation data (baseline)
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    from vllm_specdiff.training import distill, target

    p = argparse.ArgumentParser(prog="specdiff-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--model-max-length", type=int, default=512)

    target.add_args(sub.add_parser("target", help="train a small GPT-2 target"))
    distill.add_drafter_args(sub.add_parser("drafter", help="distill an MDLM drafter"))
    distill.add_ar_args(sub.add_parser("ar-drafter", help="distill an AR GPT-2 drafter"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tokenizer":
        from vllm_specdiff.training.tokenizer import train_tokenizer

        tok = train_tokenizer(args.corpus, args.out, args.vocab_size, args.model_max_length)
        print(f"tokenizer: {len(tok)} tokens -> {args.out}")
        return 0
    if args.command == "target":
        from vllm_specdiff.training import target

        summary = target.run(args)
    elif args.command == "drafter":
        from vllm_specdiff.training import distill

        summary = distill.run_drafter(args)
    else:
        from vllm_specdiff.training import distill

        summary = distill.run_ar(args)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
