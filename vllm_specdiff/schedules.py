"""Denoising schedules: which masked draft positions are revealed at each step.

All gamma draft positions start masked; T steps reveal them. A schedule answers,
per step, "reveal which of the still-masked positions?" given the drafter's
confidence at that step.

- ``left_to_right``: contiguous groups in order (sizes as equal as possible, the
  first groups larger). Tokens of one group are drawn independently given
  everything to their left, so the per-position q is the true conditional and
  speculative sampling with it is exact at any temperature.
- ``random``: MDLM's ancestral sampler with the log-linear schedule: each masked
  position is revealed with probability (t - s) / t when time goes t -> s.
- ``confidence``: the same group sizes as ``left_to_right``, but the positions
  with the highest drafter confidence go first (MaskGIT-style).

``random`` and ``confidence`` reveal later positions before earlier ones, so a
draft token can depend on a token to its right; their q is then not the
conditional the verifier needs. Sampled requests drafted with them are verified
as point masses (always exact, lower acceptance); greedy requests are unaffected.
"""

from __future__ import annotations

import torch

SCHEDULES = ("left_to_right", "random", "confidence")
# Schedules whose per-position q is the exact left-to-right conditional.
EXACT_SCHEDULES = ("left_to_right",)


def group_sizes(gamma: int, steps: int) -> list[int]:
    """Split gamma positions into `steps` groups, sizes differing by at most one."""
    base, extra = divmod(gamma, steps)
    return [base + (1 if k < extra else 0) for k in range(steps)]


def is_exact(schedule: str, steps: int) -> bool:
    """True when the drafter's q may be used for sampled requests."""
    return schedule in EXACT_SCHEDULES or steps == 1


def reveal_mask(
    schedule: str,
    step: int,
    steps: int,
    masked: torch.Tensor,
    confidence: torch.Tensor | None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions to reveal at `step` (0-based) of `steps`.

    masked:     bool [B, gamma], True where the position is still masked.
    confidence: float [B, gamma], the drafter's (log-)probability of its proposal;
                only read by ``confidence`` (may be None otherwise).
    uniforms:   float [B, gamma] in [0, 1), only read by ``random``; the caller
                draws them (from each request's generator when it is seeded).
    Returns bool [B, gamma], a subset of `masked`; at the last step all of it.
    """
    if step == steps - 1:
        return masked.clone()
    gamma = masked.shape[1]
    if schedule == "left_to_right":
        sizes = group_sizes(gamma, steps)
        start = sum(sizes[:step])
        reveal = torch.zeros_like(masked)
        reveal[:, start : start + sizes[step]] = True
        return reveal & masked
    if schedule == "random":
        t, s = 1.0 - step / steps, 1.0 - (step + 1) / steps
        return masked & (uniforms < (t - s) / t)
    if schedule == "confidence":
        count = group_sizes(gamma, steps)[step]
        scores = confidence.masked_fill(~masked, float("-inf"))
        top = scores.topk(count, dim=1).indices
        reveal = torch.zeros_like(masked).scatter_(1, top, True)
        return reveal & masked
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
