"""Batched diffusion drafting: draft_len tokens (at most gamma) for every request in
T denoising steps.

The canvas of request i is [last W context tokens, MASK x draft_len], right-aligned so
every request's draft positions share the same columns; shorter contexts are
left-padded and the padding is hidden from attention. Each step is one forward
pass of the whole batch; the schedule (``schedules.py``) says which masked
positions are revealed, each drawn from the drafter's distribution q at that
step. The result is the draft tokens and, per position, the q they were drawn
from, over the target's vocabulary (the mask token's column dropped: SUBS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_specdiff.model import MDLM
from vllm_specdiff.schedules import is_exact, reveal_mask

GREEDY = 0.0


@dataclass
class Draft:
    tokens: torch.Tensor  # [B, draft_len] int64
    probs: torch.Tensor | None  # [B, draft_len, V_target] float32 q; None if all greedy
    exact: bool  # q is the left-to-right conditional (usable at temperature > 0)
    drafted_greedily: torch.Tensor  # [B] bool: argmax drafts, so q is a point mass
    forward_passes: int


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs [..., V] using uniforms [...] in [0, 1)."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (uniforms * cdf[..., -1]).unsqueeze(-1), right=True)
    return idx.squeeze(-1).clamp_(max=probs.shape[-1] - 1)


class DiffusionDrafter:
    """Runs an MDLM as a drafter for a batch of token contexts."""

    def __init__(self, model: MDLM, steps: int, schedule: str, context_window: int,
                 draft_temperature: float | None = None):
        self.model = model
        model.backbone.freeze_conditioning()
        self.steps = steps
        self.schedule = schedule
        self.context_window = context_window
        self.draft_temperature = draft_temperature
        self.mask_id = model.config.mask_token_id
        self.device = next(model.parameters()).device

    def _canvas(self, contexts: Sequence[Sequence[int]], draft_len: int):
        ctxs = [list(c[-self.context_window:]) for c in contexts]
        lengths = torch.tensor([len(c) for c in ctxs])
        width = int(lengths.max()) + draft_len
        canvas = torch.full((len(ctxs), width), self.mask_id, dtype=torch.long)
        pad = width - draft_len - lengths
        for i, c in enumerate(ctxs):
            canvas[i, pad[i] : width - draft_len] = torch.as_tensor(c, dtype=torch.long)
        cols = torch.arange(width)
        positions = (cols[None, :] - pad[:, None]).clamp_(min=0)
        # Attention masks cost time in SDPA; only build one when padding exists.
        key_mask = (cols[None, :] >= pad[:, None]) if bool((pad > 0).any()) else None
        to = lambda t: None if t is None else t.to(self.device, non_blocking=True)  # noqa: E731
        return to(canvas), to(positions), to(key_mask)

    def _uniforms(self, shape, generators):
        u = torch.rand(shape, device=self.device)
        for i, g in enumerate(generators or ()):
            if g is not None:
                u[i] = torch.rand(shape[1:], generator=g, device=g.device).to(self.device)
        return u

    @torch.inference_mode()
    def draft(
        self,
        contexts: Sequence[Sequence[int]],
        draft_len: int,
        temperatures: Sequence[float] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> Draft:
        """Draft `draft_len` tokens after each context.

        temperatures: per request; 0 drafts greedily (argmax). With a fixed
        ``draft_temperature`` that value is used for every sampled request.
        generators: per request, for reproducible seeded drafts (else global RNG).
        """
        B = len(contexts)
        steps = min(self.steps, draft_len)
        canvas, positions, key_mask = self._canvas(contexts, draft_len)
        temps = torch.tensor([0.0] * B if temperatures is None else [float(t) for t in temperatures],
                             dtype=torch.float32)
        if self.draft_temperature is not None:
            temps = torch.where(temps > GREEDY, torch.tensor(self.draft_temperature), temps)
        # A draft temperature of 0 on a sampled request draws greedily too (q one-hot).
        greedy = temps <= GREEDY
        all_greedy = bool(greedy.all())
        greedy = greedy.to(self.device)
        temps = torch.where(temps > GREEDY, temps, torch.ones_like(temps)).to(self.device)
        V = self.mask_id  # target vocabulary: every id below the mask token
        tokens = torch.zeros(B, draft_len, dtype=torch.long, device=self.device)
        # Greedy verification never reads q: all-greedy batches skip it entirely.
        probs = None if all_greedy else torch.zeros(B, draft_len, V, device=self.device)
        masked = torch.ones(B, draft_len, dtype=torch.bool, device=self.device)
        passes, logits = 0, None
        for step in range(steps):
            if logits is None:  # no token changed since the last pass: reuse it
                out = self.model(canvas, positions=positions, key_padding_mask=key_mask,
                                 num_last=draft_len)
                logits = out[..., :V].float()
                passes += 1
            if all_greedy:
                q = None
                proposal = logits.argmax(-1)
                confidence = (logits.max(-1).values - logits.logsumexp(-1)
                              if self.schedule == "confidence" else None)
            else:
                q = torch.softmax(logits / temps[:, None, None], dim=-1)
                u = self._uniforms((B, draft_len), generators)
                proposal = torch.where(greedy[:, None], logits.argmax(-1),
                                       sample_inverse_cdf(q, u))
                confidence = q.gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
            order = self._uniforms((B, draft_len), generators) if self.schedule == "random" else None
            reveal = reveal_mask(self.schedule, step, steps, masked, confidence, order)
            if bool(reveal.any()):
                tokens = torch.where(reveal, proposal, tokens)
                if q is not None:
                    probs = torch.where(reveal[..., None], q, probs)
                canvas[:, -draft_len:] = torch.where(reveal, proposal, canvas[:, -draft_len:])
                masked &= ~reveal
                logits = None
        return Draft(tokens=tokens, probs=probs, exact=is_exact(self.schedule, steps),
                     drafted_greedily=greedy, forward_passes=passes)
