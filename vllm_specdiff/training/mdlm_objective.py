"""MDLM's masked-diffusion objective in the drafting setting.

Each training example looks exactly like one row of ``DiffusionDrafter._canvas``:
a clean prefix of the last ``w`` tokens before a span (``w`` = the full window W
or a random length in 1..W), then the span's gamma positions, right-aligned in a
canvas of width W_batch + gamma. Left padding is filled with the mask token and
hidden from attention; rotary positions start at 0 at the first prefix token.

The span is partly masked, by one of two patterns:

- left-to-right (share ``ltr_fraction``): the first k span tokens are revealed, the
  rest masked, k ~ U{0..gamma-1}; this is what the default ``left_to_right``
  schedule shows the model at its step k / group size. Loss: mean CE over masked.
- MDLM random masking: t ~ U(0, 1), each span position masked with probability t
  (at least one), loss sum CE / (t * gamma): MDLM's 1/t-weighted ELBO.

SUBS: the mask token's logit is -inf, so it is never predicted. Loss only on masked
positions. An optional KL term pulls the drafter towards the target's next-token
distribution at the masked positions (precomputed top-k, see ``teacher.py``; every
batch names the teacher row of each span token in ``pred_index``).

Acceptance-aware term (SpecDiff-2's streak distillation), optional: on the
left-to-right rows, the expected accepted streak of the masked tail, sum over j of
prod over i <= j of a_i, where a_i is q_i(x*_i) (greedy: the chance the drafter puts
on the target's token) or, with ``streak="sampled"``, sum_x min(p_i(x), q_i(x)) (the
acceptance probability of speculative sampling, p the target's distribution). The
loss subtracts ``streak_weight`` x streak / gamma, so longer expected streaks lower it.
The likelihood terms stay: the streak alone gives no gradient to later positions once
an early one is hopeless.

Every span at once (``SpanTilingBatcher``, block-causal drafters only): BD3-LM's
vectorised training. A row is a whole sequence, clean, followed by a noisy copy of its
continuation cut into spans of gamma; a clean column attends causally to the clean
columns, a span column to the clean columns before its span and to its own span. Each
span thus sees exactly what the drafter sees when drafting it after that context, and
one forward pass trains every span of the sequence instead of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_specdiff.training.teacher import (TeacherTopK, acceptance_with_teacher,
                                            kl_to_teacher, prediction_offsets)

T_MIN = 0.02  # keeps 1/t bounded


@dataclass
class DraftingBatch:
    canvas: torch.Tensor  # [B, W+g] noisy canvas (mask in padding and masked span slots)
    clean: torch.Tensor  # [B, W+g] the same with the clean span (padding still mask id)
    positions: torch.Tensor  # [B, W+g]
    key_mask: torch.Tensor | None  # [B, W+g] True = real token; None when no padding
    targets: torch.Tensor  # [B, g] clean span tokens
    masked: torch.Tensor  # [B, g] bool
    weights: torch.Tensor  # [B, g] per-position loss weight (0 where not masked)
    gamma: int
    ltr: torch.Tensor  # [B] bool: the span is masked left-to-right (a masked suffix)
    # SpanTilingBatcher only: bool [1, 1, L, L] (True = may attend) over the canvas
    # [clean sequence, noisy spans]; targets, masked, weights and ltr then hold every
    # span of a row, [B, n * gamma] and [B, n].
    attn_mask: torch.Tensor | None = None
    # the teacher row (``teacher.prediction_offsets``) of each target token, like targets
    pred_index: torch.Tensor | None = None


def span_masks(lead: tuple[int, ...], g: int, ltr_fraction: float, gen: torch.Generator):
    """Masks of spans of g with leading shape ``lead``: -> ltr [*lead] (masked
    left-to-right), masked [*lead, g], weights [*lead, g] (mean CE over a left-to-right
    span's masked tail; 1 / (t g) under MDLM random masking at rate t)."""
    ltr = torch.rand(lead, generator=gen) < ltr_fraction
    k = torch.randint(0, g, lead, generator=gen)
    masked_ltr = torch.arange(g) >= k[..., None]
    t = torch.rand(lead, generator=gen) * (1 - T_MIN) + T_MIN
    masked_rand = torch.rand(*lead, g, generator=gen) < t[..., None]
    # at least one masked position per random span
    force = torch.randint(0, g, lead, generator=gen)
    masked_rand.scatter_(-1, force[..., None], True)
    masked = torch.where(ltr[..., None], masked_ltr, masked_rand)
    w_ltr = masked_ltr.float() / masked_ltr.sum(-1, keepdim=True).float()
    w_rand = masked_rand.float() / (t[..., None] * g)
    return ltr, masked, torch.where(ltr[..., None], w_ltr, w_rand)


class DraftingBatcher:
    """Samples drafting-setting examples from distillation sequences."""

    def __init__(self, sequences, gen_start, mask_id, window, gammas, ltr_fraction=0.75,
                 full_window_fraction=0.5):
        self.seqs = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
        self.offsets = prediction_offsets(self.seqs)
        self.gen_start = list(gen_start)
        self.mask_id = mask_id
        self.window = window
        self.gammas = list(gammas)
        self.ltr_fraction = ltr_fraction
        self.full_window_fraction = full_window_fraction

    def sample(self, batch_size: int, gen: torch.Generator, device="cpu") -> DraftingBatch:
        g = self.gammas[int(torch.randint(len(self.gammas), (1,), generator=gen))]
        rows = []
        for _ in range(batch_size):
            while True:
                i = int(torch.randint(len(self.seqs), (1,), generator=gen))
                seq = self.seqs[i]
                lo = max(1, self.gen_start[i])  # span inside the target's continuation
                hi = len(seq) - g
                if hi >= lo:
                    break
            s = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            max_w = min(self.window, s)
            if float(torch.rand(1, generator=gen)) < self.full_window_fraction:
                w = max_w
            else:
                w = int(torch.randint(1, max_w + 1, (1,), generator=gen))
            rows.append((seq[s - w : s], seq[s : s + g], int(self.offsets[i]) + s - 1))
        width_prefix = max(len(p) for p, _, _ in rows)
        width = width_prefix + g
        B = batch_size
        clean = torch.full((B, width), self.mask_id, dtype=torch.long)
        pad = torch.tensor([width_prefix - len(p) for p, _, _ in rows])
        pred_index = torch.tensor([o for _, _, o in rows])[:, None] + torch.arange(g)
        for r, (p, span, _) in enumerate(rows):
            clean[r, pad[r] : width_prefix] = p
            clean[r, width_prefix:] = span
        targets = clean[:, width_prefix:].clone()
        ltr, masked, weights = span_masks((B,), g, self.ltr_fraction, gen)

        canvas = clean.clone()
        canvas[:, width_prefix:] = torch.where(masked, self.mask_id, targets)
        all_cols = torch.arange(width)
        positions = (all_cols[None, :] - pad[:, None]).clamp_(min=0)
        key_mask = (all_cols[None, :] >= pad[:, None]) if bool((pad > 0).any()) else None
        to = lambda x: None if x is None else x.to(device)  # noqa: E731
        return DraftingBatch(to(canvas), to(clean), to(positions), to(key_mask), to(targets),
                             to(masked), to(weights), g, to(ltr), pred_index=pred_index)


class SpanTilingBatcher(DraftingBatcher):
    """Every span of a sequence at once (see the module docstring): rows of
    [clean sequence, noisy spans] with the attention mask that keeps each span to its
    own context. Spans tile the target's continuation from a random offset; each is
    masked left-to-right or at random as in ``DraftingBatcher``. Every span sees its
    whole prefix (up to the window), so ``full_window_fraction`` does not apply."""

    def sample(self, batch_size: int, gen: torch.Generator, device="cpu") -> DraftingBatch:
        g = self.gammas[int(torch.randint(len(self.gammas), (1,), generator=gen))]
        picks = torch.randint(len(self.seqs), (batch_size,), generator=gen).tolist()
        # one length per batch (the shortest row, at most the window): every row ends
        # at its sequence's end, so all of the continuation is in it
        L = min(self.window, *(len(self.seqs[i]) for i in picks))
        starts = [len(self.seqs[i]) - L for i in picks]
        first = max(1, *(self.gen_start[i] - a for i, a in zip(picks, starts)))
        first += int(torch.randint(g, (1,), generator=gen))  # vary where spans fall
        n = (L - first) // g
        if n < 1:
            raise ValueError(f"sequences of {L} tokens leave no span of {g} after "
                             f"position {first}: generate longer continuations")
        clean = torch.stack([self.seqs[i][a:] for i, a in zip(picks, starts)])
        B, span_len = batch_size, n * g
        targets = clean[:, first : first + span_len]

        ltr, masked, weights = span_masks((B, n), g, self.ltr_fraction, gen)
        masked, weights = masked.reshape(B, span_len), weights.reshape(B, span_len)
        noisy = torch.where(masked, self.mask_id, targets)

        canvas = torch.cat([clean, noisy], 1)
        span_pos = torch.arange(first, first + span_len)
        positions = torch.cat([torch.arange(L), span_pos]).expand(B, -1)
        span_start = first + (span_pos - first) // g * g  # each span column's span start
        ctx = torch.arange(L)
        mask = torch.zeros(L + span_len, L + span_len, dtype=torch.bool)
        mask[:L, :L] = ctx[None, :] <= ctx[:, None]
        mask[L:, :L] = ctx[None, :] < span_start[:, None]
        mask[L:, L:] = span_start[None, :] == span_start[:, None]
        to = lambda x: x.to(device)  # noqa: E731
        first_row = torch.tensor([int(self.offsets[i]) + a + first - 1
                                  for i, a in zip(picks, starts)])
        return DraftingBatch(to(canvas), to(canvas), to(positions.contiguous()), None,
                             to(targets), to(masked), to(weights), g, to(ltr),
                             attn_mask=to(mask[None, None]),
                             pred_index=first_row[:, None] + torch.arange(span_len))


def subs_logits(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: the mask token is never predicted."""
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    return logits


STREAKS = ("none", "greedy", "sampled")


def expected_streak(accept: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """accept [B, g] per-position acceptance probabilities, masked [B, g] (a suffix of
    each row, left-to-right) -> [B] expected accepted streak over the masked tail."""
    a = torch.where(masked, accept, torch.ones_like(accept))  # revealed: already given
    return (a.cumprod(-1) * masked).sum(-1)


def mdlm_drafting_loss(model, batch: DraftingBatch, teacher: TeacherTopK | None = None,
                       kl_weight: float = 0.0, streak: str = "none", streak_weight: float = 0.0):
    mask_id = model.config.mask_token_id
    if batch.attn_mask is None:
        logits = model(batch.canvas, positions=batch.positions, key_padding_mask=batch.key_mask,
                       num_last=batch.gamma, block_len=batch.gamma)
    else:  # every span at once: one row per span from here on
        sigma = torch.zeros(batch.canvas.shape[0], device=batch.canvas.device)
        logits = model.backbone(batch.canvas, sigma, batch.positions, batch.attn_mask,
                                batch.targets.shape[1])
        g = batch.gamma
        logits = logits.reshape(-1, g, logits.shape[-1])
        batch = DraftingBatch(batch.canvas, batch.clean, batch.positions, None,
                              batch.targets.reshape(-1, g), batch.masked.reshape(-1, g),
                              batch.weights.reshape(-1, g), g, batch.ltr.reshape(-1),
                              pred_index=batch.pred_index.reshape(-1, g))
    logits = subs_logits(logits, mask_id)
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(batch.masked, nll, torch.zeros_like(nll))
    B = batch.targets.shape[0]
    loss = (nll * batch.weights).sum() / B
    with torch.no_grad():
        acc = ((logits.argmax(-1) == batch.targets) & batch.masked).sum() / batch.masked.sum()
        # accuracy of the first masked position in each row (what greedy LTR drafting hinges on)
        first = batch.masked.float().argmax(1)
        rows = torch.arange(B, device=first.device)
        acc_first = (logits.argmax(-1)[rows, first] == batch.targets[rows, first]).float().mean()
    info = {"acc": float(acc), "acc_first": float(acc_first)}
    t_ids = t_probs = None
    if teacher is not None and (kl_weight > 0 or streak == "sampled"):
        t_ids, t_probs = teacher.gather(batch.pred_index, logp.device)
    if t_ids is not None and kl_weight > 0:
        kl = kl_to_teacher(logp, t_ids, t_probs)
        kl = (kl * batch.masked).sum() / batch.masked.sum().clamp(min=1)
        loss = loss + kl_weight * kl
        info["kl"] = float(kl.detach())
    if streak != "none" and streak_weight > 0:
        if streak == "sampled":
            if t_ids is None:
                raise ValueError("streak='sampled' needs the target as teacher")
            accept = acceptance_with_teacher(logp, t_ids, t_probs)
        else:
            accept = (-nll).exp()
        s = expected_streak(accept, batch.masked)[batch.ltr]
        if s.numel():
            loss = loss - streak_weight * s.mean() / batch.gamma
            info["streak"] = float(s.detach().mean())
    return loss, info
