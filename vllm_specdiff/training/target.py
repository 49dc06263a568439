"""``specdiff-train target``: a small GPT-2 causal LM (transformers GPT2LMHeadModel,
which vLLM loads natively) trained on a text corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from vllm_specdiff.training import common
from vllm_specdiff.training.data import random_windows, read_stories, token_stream


def gpt2_config(vocab_size, n_layer, n_embd, n_head, n_positions, eos_id, dropout=0.0):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=True,
    )


MAX_SHARD_SIZE = "40MB"
# The held-out perplexity every target reports: the first TEST_TOKENS tokens of --valid.
# --eval-every chooses weights on the tokens after them, never on these.
TEST_TOKENS = 100_000
# Non-overlapping blocks of this many tokens (or n_positions), whatever --block-size is.
TEST_BLOCK = 256


def save_causal_lm(model, tokenizer, out, dtype: str, extra_card: dict | None = None) -> None:
    from transformers import GenerationConfig

    from vllm_specdiff.training.tokenizer import save_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model.to(getattr(torch, dtype)) if dtype != "float32" else model
    to_save.config.dtype = dtype
    # Shards keep every file well under the 64 MB a repository file may hold
    # (transformers and vLLM both read the index it writes beside them).
    to_save.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    GenerationConfig(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.eos_token_id).save_pretrained(out)
    save_tokenizer(tokenizer, str(out))
    if extra_card:
        (out / "training_summary.json").write_text(json.dumps(extra_card, indent=2) + "\n")
    model.float()


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, block: int, device, max_tokens: int = 100_000,
               batch: int = 8) -> float:
    """exp(mean NLL) over non-overlapping blocks of the stream (first max_tokens)."""
    model.eval()
    stream = stream[: max_tokens + 1]
    n = (len(stream) - 1) // block
    xs = stream[: n * block].view(n, block)
    ys = stream[1 : n * block + 1].view(n, block)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x, y = xs[i : i + batch].to(device), ys[i : i + batch].to(device)
        logits = model(input_ids=x).logits.float()
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return math.exp(total / count)


@torch.no_grad()
def grow_from(model, source) -> None:
    """Copy ``source``'s weights into ``model``, a GPT-2 of the same width and vocabulary
    with at least as many layers and positions, so that ``model`` computes what
    ``source`` computes.

    Extra layers: new layer i copies source layer i * n_src // n_new (so every source
    layer appears, in order) and a repeated copy has its two output projections zeroed:
    a residual block whose output is zero is the identity, so the grown model's
    function is the source's, and training starts from the source's perplexity
    instead of from a perturbed network. Extra positions repeat the source's
    position table (row j takes source row j mod n_src), a start that training at the
    longer block size then corrects.
    """
    src_cfg, cfg = source.config, model.config
    for name in ("n_embd", "n_head", "vocab_size"):
        if getattr(src_cfg, name) != getattr(cfg, name):
            raise SystemExit(f"--init-from: {name} is {getattr(src_cfg, name)} there and "
                             f"{getattr(cfg, name)} here; only n_layer and n_positions may grow")
    if cfg.n_layer < src_cfg.n_layer or cfg.n_positions < src_cfg.n_positions:
        raise SystemExit(f"--init-from: the new model ({cfg.n_layer} layers, "
                         f"{cfg.n_positions} positions) must be at least as deep and long as "
                         f"the source ({src_cfg.n_layer}, {src_cfg.n_positions})")
    model.transformer.wte.weight.copy_(source.transformer.wte.weight)
    model.transformer.ln_f.load_state_dict(source.transformer.ln_f.state_dict())
    src_pos = source.transformer.wpe.weight
    rows = torch.arange(cfg.n_positions) % src_cfg.n_positions
    model.transformer.wpe.weight.copy_(src_pos[rows])
    seen = set()
    for i, block in enumerate(model.transformer.h):
        j = i * src_cfg.n_layer // cfg.n_layer
        block.load_state_dict(source.transformer.h[j].state_dict())
        if j in seen:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        seen.add(j)


def add_args(p) -> None:
    common.add_common_args(p)
    p.add_argument("--corpus", required=True, nargs="+",
                   help="training text file(s) (stories split on <|endoftext|>), concatenated")
    p.add_argument("--valid", default=None, help="held-out text for perplexity")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: train a byte-level BPE on the first --corpus)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE size when training one")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-positions", type=int, default=512)
    p.add_argument("--block-size", type=int, default=256, help="training sequence length")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=None,
                   help="every this many steps, perplexity on the development tokens of "
                        f"--valid (those after its first {TEST_TOKENS:,}, the reported "
                        "held-out slice); the weights with the lowest are kept and saved "
                        "(early stopping; held in memory, so --resume starts the search anew)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--init-from", default=None,
                   help="start from this GPT-2 folder's weights instead of a random init; "
                        "a deeper or longer model is grown from it without changing its "
                        "outputs (see grow_from)")
    p.set_defaults(batch_size=16)


def run(args) -> dict:
    from transformers import GPT2LMHeadModel

    from vllm_specdiff.training.tokenizer import load_tokenizer, train_tokenizer

    if args.eval_every is not None and args.eval_every < 1:
        raise SystemExit(f"--eval-every must be at least 1 (steps), got {args.eval_every}")
    common.set_threads(args.threads)
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        tok = train_tokenizer(args.corpus[0], str(Path(args.out) / "tokenizer_tmp"),
                              vocab_size=args.vocab_size, model_max_length=args.n_positions)
    tok.model_max_length = args.n_positions
    stream = token_stream(tok, [s for path in args.corpus for s in read_stories(path)])
    print(f"[target] corpus {' + '.join(args.corpus)}: {len(stream)} tokens, vocab {len(tok)}")
    cfg = gpt2_config(len(tok), args.n_layer, args.n_embd, args.n_head, args.n_positions,
                      tok.eos_token_id, args.dropout)
    model = GPT2LMHeadModel(cfg)
    if args.init_from and not (args.resume and common.checkpoint_path(args.out).exists()):
        grow_from(model, GPT2LMHeadModel.from_pretrained(args.init_from, dtype=torch.float32))
        print(f"[target] initialised from {args.init_from}")
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[target] GPT-2 {args.n_layer}x{args.n_embd}: {n_params / 1e6:.2f} M parameters")
    gen = torch.Generator().manual_seed(args.seed)
    vstream = token_stream(tok, read_stories(args.valid)) if args.valid else None
    test_block = min(TEST_BLOCK, args.n_positions)
    best = {"dev_ppl": math.inf, "step": 0, "state": None, "curve": []}

    def keep_best(step, total):
        if step % args.eval_every and step != total:
            return
        ppl = perplexity(model, vstream[TEST_TOKENS:], test_block, device, batch=64)
        best["curve"].append([step, round(ppl, 3)])
        print(f"[target] step {step}: development perplexity {ppl:.3f}")
        if ppl < best["dev_ppl"]:
            best.update(dev_ppl=ppl, step=step,
                        state={k: v.detach().to("cpu", copy=True)
                               for k, v in model.state_dict().items()})

    if args.eval_every and (vstream is None or len(vstream) <= TEST_TOKENS + TEST_BLOCK):
        raise SystemExit(f"--eval-every needs a --valid text longer than {TEST_TOKENS:,} "
                         f"+ {TEST_BLOCK} tokens (development tokens follow the held-out ones)")

    def loss_fn(step, g):
        w = random_windows(stream, args.batch_size, args.block_size + 1, g).to(device)
        out = model(input_ids=w[:, :-1], labels=None)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        return loss, {}

    summary = common.train_loop(args, model, loss_fn, gen, "target",
                                after_step=keep_best if args.eval_every else None)
    if summary["interrupted"]:
        return summary
    summary["parameters"] = n_params
    if args.eval_every and (not best["curve"] or best["curve"][-1][0] != summary["step"]):
        keep_best(summary["step"], summary["step"])  # stopped by the time budget
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        summary.update(dev_ppl=best["dev_ppl"], kept_step=best["step"], dev_curve=best["curve"])
        print(f"[target] kept the weights of step {best['step']} "
              f"(development perplexity {best['dev_ppl']:.3f})")
    if vstream is not None:
        summary["valid_ppl"] = perplexity(model, vstream, test_block, device,
                                          max_tokens=TEST_TOKENS)
        summary["valid_tokens"] = min(len(vstream) - 1, TEST_TOKENS)
        print(f"[target] held-out perplexity {summary['valid_ppl']:.3f}")
    summary["train_ppl_last"] = math.exp(summary["loss"])
    save_causal_lm(model, tok, args.out, args.save_dtype, extra_card=summary)
    tmp = Path(args.out) / "tokenizer_tmp"
    if tmp.exists():
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    common.finish_checkpoint(args)
    return summary
