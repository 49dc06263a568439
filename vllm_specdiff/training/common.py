"""What every ``specdiff-train`` subcommand shares: device and seeding, AdamW with a
cosine schedule and warmup, periodic checkpoints, ``--resume``, step and time limits,
and a tqdm progress bar.

A checkpoint (``<out>/checkpoint/state.pt``) holds the model, the optimizer, the
step, the planned number of steps, and every random state the loop draws from (the
data sampler's generator and torch's global RNG), so a resumed run continues
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
# With a time budget and no step count, the speed is measured over these steps.
SIZING_FROM, SIZING_TO = 5, 15


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def cosine_lr(step: int, total: int, warmup: int, lr: float, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "norm" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def checkpoint_path(out: str | os.PathLike) -> Path:
    return Path(out) / CHECKPOINT_DIR / CHECKPOINT_FILE


def save_checkpoint(out, model, optimizer, step, total_steps, data_gen, extra=None) -> None:
    path = checkpoint_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "total_steps": total_steps,
        "data_gen": data_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "extra": extra or {},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def load_checkpoint(out, model, optimizer, data_gen) -> dict:
    state = torch.load(checkpoint_path(out), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    data_gen.set_state(state["data_gen"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def add_common_args(p) -> None:
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps (default 1000, or as many as --time-budget-minutes allows)")
    p.add_argument("--time-budget-minutes", type=float, default=None,
                   help="stop after this much training time; with no --max-steps the cosine "
                        "schedule is sized from the speed of the first steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep <out>/checkpoint after a finished run (default: delete it)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--bf16-autocast", action="store_true",
                   help="forward passes under bfloat16 autocast (weights, optimizer and "
                        "the saved model's precision are unchanged); for GPUs")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse_hidden())


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def autocast(args, model: torch.nn.Module):
    """bfloat16 autocast on the model's device with ``--bf16-autocast``, else nothing."""
    if not getattr(args, "bf16_autocast", False):
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_loop(
    args,
    model: torch.nn.Module,
    loss_fn: Callable[[int, torch.Generator], tuple[torch.Tensor, dict]],
    data_gen: torch.Generator,
    desc: str,
    default_steps: int = 1000,
    after_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Run AdamW steps of ``loss_fn(step, data_gen)``; returns a summary dict.
    ``after_step(step, total)``, if given, runs after each optimizer step (evaluation).

    ``--stop-after-steps`` (hidden, for tests) simulates an interruption: the run
    checkpoints and stops after that many steps as if it had been killed.
    """
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    step, total = 0, args.max_steps
    elapsed_before = 0.0
    if args.resume and checkpoint_path(args.out).exists():
        state = load_checkpoint(args.out, model, optimizer, data_gen)
        step, total = state["step"], state["total_steps"]
        elapsed_before = state["extra"].get("elapsed", 0.0)
        print(f"[{desc}] resumed from {checkpoint_path(args.out)} at step {step}/{total}")
    elif args.resume:
        print(f"[{desc}] --resume: no checkpoint in {args.out}, starting fresh")
    budget = None if args.time_budget_minutes is None else args.time_budget_minutes * 60
    sizing = total is None and budget is not None
    if total is None:
        total = default_steps
    model.train()
    start = time.time()
    bar = tqdm(total=total, initial=step, desc=desc, disable=args.no_progress,
               dynamic_ncols=True, mininterval=2.0)
    last = {}
    steps_this_run = 0
    while step < total:
        lr = cosine_lr(step, total, args.warmup_steps, args.lr, args.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        with autocast(args, model):
            loss, info = loss_fn(step, data_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        steps_this_run += 1
        last = {"loss": float(loss.detach()), **info}
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}",
                        **{k: f"{v:.3f}" for k, v in info.items()})
        if after_step is not None:
            after_step(step, total)
            model.train()
        elapsed = elapsed_before + time.time() - start
        if sizing and steps_this_run == SIZING_FROM:
            sizing_start = time.time()
        if sizing and steps_this_run == SIZING_TO and step < total:
            # Size the cosine schedule to the time budget from the measured speed, after
            # the first steps (on a GPU they include kernel selection and warm-up).
            per_step = (time.time() - sizing_start) / (SIZING_TO - SIZING_FROM)
            total = max(step + 1, int((budget - (time.time() - start)) / per_step * 0.97) + step)
            bar.total = total
            bar.refresh()
            print(f"[{desc}] {per_step:.2f} s/step -> planning {total} steps")
        stop_budget = budget is not None and elapsed >= budget
        interrupted = args.stop_after_steps is not None and steps_this_run >= args.stop_after_steps
        if step % args.checkpoint_every == 0 or interrupted or (stop_budget and step < total):
            save_checkpoint(args.out, model, optimizer, step, total, data_gen,
                            extra={"elapsed": elapsed})
        if interrupted:
            bar.close()
            return {"step": step, "total_steps": total, "interrupted": True,
                    "elapsed_s": elapsed, **last}
        if stop_budget:
            print(f"[{desc}] time budget reached at step {step}/{total}")
            break
    bar.close()
    model.eval()
    return {"step": step, "total_steps": total, "interrupted": False,
            "elapsed_s": elapsed_before + time.time() - start, **last}


def finish_checkpoint(args) -> None:
    """Delete the checkpoint folder after a completed run unless asked to keep it."""
    if getattr(args, "keep_checkpoint", False):
        return
    path = checkpoint_path(args.out)
    if path.exists():
        path.unlink()
        try:
            path.parent.rmdir()
        except OSError:
            pass
