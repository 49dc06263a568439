"""Batched diffusion drafting: draft_len tokens (at most gamma) for every request in
T denoising steps.

The canvas of request i is [last W context tokens, MASK x draft_len], right-aligned so
every request's draft positions share the same columns; shorter contexts are
left-padded and the padding is hidden from attention (``WindowCanvas``), or, with
the drafter cache, [the context tokens new since the request's last step, MASK x
draft_len] against the cached keys and values of the rest (``CachedCanvas``). Each
step is one forward pass of the whole batch; the schedule (``schedules.py``) says
which masked positions are revealed, each drawn from the drafter's distribution q at
that step. The result is the draft tokens and, per position, the q they were drawn
from, over the target's vocabulary (the mask token's column dropped: SUBS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from vllm_specdiff.drafter_cache import DrafterCache
from vllm_specdiff.model import MDLM, Past, block_causal_mask
from vllm_specdiff.schedules import group_sizes, is_exact, reveal_mask

GREEDY = 0.0


@dataclass
class Draft:
    tokens: torch.Tensor  # [B, draft_len] int64
    # [B, draft_len, V_target] float32 q of every row, a view of the drafter's own
    # output buffer (last stride 1, rows possibly padded): read only where has_q.
    probs: torch.Tensor | None
    has_q: torch.Tensor  # [B] bool: q is the distribution the row's tokens were drawn from
    exact: bool  # q is the left-to-right conditional (usable at temperature > 0)
    drafted_greedily: torch.Tensor  # [B] bool: argmax drafts, so q is a point mass
    forward_passes: int


class ContextBatch(NamedTuple):
    """The contexts of a batch without a Python list per request: row i's context is
    ``tokens[rows[i], :lengths[i]]`` (vLLM's ``token_ids_cpu`` is such an array)."""

    tokens: np.ndarray  # [*, columns] int
    rows: np.ndarray  # [B] int
    lengths: np.ndarray  # [B] int

    @classmethod
    def of(cls, contexts: "ContextBatch | Sequence[Sequence[int]]") -> "ContextBatch":
        if isinstance(contexts, ContextBatch):
            return contexts
        lengths = np.array([len(c) for c in contexts], dtype=np.int64)
        tokens = np.zeros((len(contexts), max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
        for i, c in enumerate(contexts):
            tokens[i, : len(c)] = np.asarray(c, dtype=np.int64)
        return cls(tokens, np.arange(len(contexts)), lengths)


class CachedCanvasArgs(NamedTuple):
    """How a draft call uses the drafter cache (see ``CachedCanvas``)."""

    cache: DrafterCache
    slots: np.ndarray  # [B] each row's slot
    causal_context: bool  # block-causal drafter: the cache is exact
    refresh_steps: int | None  # approximate caches: re-encode a slot this often


SAMPLING_CHUNK = 16  # rows whose CDF is built at once: bounds the sampling's scratch memory


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs [..., V] using uniforms [...] in [0, 1)."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (uniforms * cdf[..., -1]).unsqueeze(-1), right=True)
    return idx.squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def softmax_(x: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """softmax(x / temps) over the last dimension, in place (x [B, L, V], temps [B])."""
    x.div_(temps[:, None, None])
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


def left_padded(contexts: ContextBatch, rows: np.ndarray, first: np.ndarray,
                counts: np.ndarray, fill: int):
    """Tokens ``first[i] .. first[i] + counts[i] - 1`` of the contexts of ``rows``,
    right-aligned in one [len(rows), max(counts)] array with one gather (no loop over
    requests), ``fill`` in the left padding. Returns the tokens, each column's index
    in its context (0 in the padding), which columns are real, and each row's padding."""
    width = int(counts.max(initial=0))
    pad = width - counts
    cols = np.arange(width)
    real = cols[None, :] >= pad[:, None]
    src = np.where(real, first[:, None] + cols[None, :] - pad[:, None], 0)
    ids = np.where(real, contexts.tokens[contexts.rows[rows][:, None], src], fill)
    return ids.astype(np.int64, copy=False), src, real, pad


class WindowCanvas:
    """[last W context tokens, MASK x draft_len] per row, right-aligned so every row's
    draft positions share the same columns (shorter contexts left-padded, the padding
    hidden from attention), built with one gather and re-encoded by every pass."""

    def __init__(self, drafter: "DiffusionDrafter", contexts: ContextBatch, draft_len: int):
        self.model, self.draft_len = drafter.model, draft_len
        lengths = np.minimum(contexts.lengths, drafter.context_window)
        ctx, _, _, pad = left_padded(contexts, np.arange(len(lengths)),
                                     contexts.lengths - lengths, lengths, drafter.mask_id)
        width = ctx.shape[1] + draft_len
        ids = torch.full((len(lengths), width), drafter.mask_id, dtype=torch.long)
        ids[:, : width - draft_len] = torch.from_numpy(ctx)
        all_cols, pad = torch.arange(width), torch.from_numpy(pad)
        positions = (all_cols[None, :] - pad[:, None]).clamp_(min=0)
        # Attention masks cost time in SDPA; only build one when padding exists.
        key_mask = (all_cols[None, :] >= pad[:, None]) if bool((pad > 0).any()) else None
        device = drafter.device
        self.ids, self.positions = ids.to(device), positions.to(device)
        self.key_mask = None if key_mask is None else key_mask.to(device)

    def logits(self, num_last: int, num_scored: int | None = None) -> torch.Tensor:
        return self.model(self.ids, positions=self.positions, key_padding_mask=self.key_mask,
                          num_last=num_last, block_len=self.draft_len, num_scored=num_scored)

    def reveal(self, reveal: torch.Tensor, proposal: torch.Tensor) -> None:
        block = self.ids[:, -self.draft_len:]
        self.ids[:, -self.draft_len:] = torch.where(reveal, proposal, block)


class CachedCanvas:
    """The same drafting canvas over a ``DrafterCache``: the first pass encodes the
    context tokens each row gained since its last step (written to the cache) together
    with the draft block; later passes run the draft block alone against the cache.

    ``causal_context`` (block-causal drafters) makes the cache exact. A bidirectional
    drafter's context would also attend to the draft block; cached, it does not (the
    approximation Fast-dLLM makes), and its slots are re-encoded whole every
    ``refresh_steps`` steps. Either way q is exactly the distribution the drafts were
    drawn from, so verification stays exact; only acceptance can change.
    """

    def __init__(self, drafter: "DiffusionDrafter", cache: DrafterCache, slots: np.ndarray,
                 contexts: ContextBatch, draft_len: int, causal_context: bool,
                 refresh_steps: int | None):
        self.drafter, self.cache, self.causal_context = drafter, cache, causal_context
        self.slots, self.contexts, self.n = slots, contexts, contexts.lengths
        device = drafter.device
        cache.make_room(slots, self.n, refresh_steps)
        self.block = torch.full((len(slots), draft_len), drafter.mask_id, dtype=torch.long,
                                device=device)
        self.block_positions = torch.as_tensor(
            self.n[:, None] + np.arange(draft_len)[None, :], device=device)
        new = self._new_tokens()
        # A step adds at most draft_len + 1 tokens to a context; a row with more (a
        # request's first step, a refresh) is encoded in a pass of its own first, so
        # that it does not pad every other row of the drafting pass.
        long_rows = np.nonzero(new > draft_len + 1)[0]
        if len(long_rows):
            self._pass(long_rows, new, block=None, num_last=0)
        self.encoded = False

    def _new_tokens(self) -> np.ndarray:
        return self.n - self.cache.ends[self.slots]

    def _pass(self, rows: np.ndarray, new: np.ndarray, block: torch.Tensor | None,
              num_last: int, num_scored: int | None = None) -> torch.Tensor:
        """One forward pass of batch rows ``rows``: their ``new`` context tokens
        (left-padded to the longest) then ``block``, against their cached columns; the
        new tokens' keys and values are written to the cache."""
        d, c = self.drafter, self.cache
        slots = self.slots[rows]
        new = new[rows]
        block_len = 0 if block is None else block.shape[1]
        ids, src, real, pad = left_padded(self.contexts, rows, c.ends[slots], new, d.mask_id)
        device = d.device
        ids = torch.from_numpy(ids).to(device)
        positions = torch.from_numpy(src).to(device)
        real_t = torch.from_numpy(real).to(device)
        if block is not None:
            ids = torch.cat((ids, block), 1)
            positions = torch.cat((positions, self.block_positions[rows]), 1)
            real_t = torch.cat((real_t, real_t.new_ones(len(rows), block_len)), 1)
        past_len = int(c.lengths[slots].max(initial=0))
        mask = block_causal_mask(real_t, block_len, self.causal_context)
        if past_len:
            cached = torch.from_numpy(c.visible(slots, self.n[rows], past_len)).to(device)
            cached = cached[:, None, None, :].expand(-1, 1, mask.shape[2], -1)
            mask = torch.cat((cached, mask), -1)
        w_rows, w_src = np.nonzero(real)
        past = Past(c.k, c.v, torch.as_tensor(slots, device=device), past_len,
                    *(torch.as_tensor(a, device=device) for a in
                      (w_rows, w_src, c.columns(slots[w_rows], w_src - pad[w_rows]))))
        out = d.model.backbone(ids, d.zero_sigma(len(rows)), positions, mask, num_last, past,
                               num_scored=num_scored)
        c.advance(slots, new)
        return out

    def logits(self, num_last: int, num_scored: int | None = None) -> torch.Tensor:
        all_rows = np.arange(len(self.slots))
        if not self.encoded:  # the new context tokens and the block, in one pass
            self.encoded = True
            return self._pass(all_rows, self._new_tokens(), self.block, num_last, num_scored)
        zero = np.zeros(len(self.slots), dtype=np.int64)
        return self._pass(all_rows, zero, self.block, num_last, num_scored)

    def reveal(self, reveal: torch.Tensor, proposal: torch.Tensor) -> None:
        self.block = torch.where(reveal, proposal, self.block)


class DiffusionDrafter:
    """Runs an MDLM as a drafter for a batch of token contexts."""

    def __init__(self, model: MDLM, steps: int, schedule: str, context_window: int,
                 draft_temperature: float | None = None, max_positions: int | None = None,
                 matmul_dtype: torch.dtype | None = None):
        self.model = model
        model.backbone.freeze_conditioning(max_positions, matmul_dtype)
        folded = model.backbone.folded
        # What the linears multiply in: a time-conditioned drafter is not folded, so
        # it keeps its own dtype whatever was asked.
        self.matmul_dtype = (folded.head[0].dtype if folded is not None
                             else model.backbone.output_layer.linear.weight.dtype)
        self.steps = steps
        self.schedule = schedule
        self.context_window = context_window
        self.draft_temperature = draft_temperature
        self.mask_id = model.config.mask_token_id
        self.device = next(model.parameters()).device

    def zero_sigma(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, device=self.device)

    def _uniforms(self, shape, generators):
        u = torch.rand(shape, device=self.device)
        for i, g in enumerate(generators or ()):
            if g is not None:
                u[i] = torch.rand(shape[1:], generator=g, device=g.device).to(self.device)
        return u

    @torch.inference_mode()
    def draft(
        self,
        contexts: ContextBatch | Sequence[Sequence[int]],
        draft_len: int,
        temperatures: Sequence[float] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        cached: "CachedCanvasArgs | None" = None,
    ) -> Draft:
        """Draft `draft_len` tokens after each context.

        temperatures: per request; 0 drafts greedily (argmax). With a fixed
        ``draft_temperature`` that value is used for every sampled request.
        generators: per request, for reproducible seeded drafts (else global RNG).
        cached: draw on a ``DrafterCache`` (the rows' slots) instead of re-encoding
        the last W context tokens.

        Memory and compute: q is computed in place in the model's output buffer. At
        T = 1 that buffer is the q handed to the verifier. At T > 1 a left-to-right
        pass scores only the positions it reveals (the other schedules: the whole
        masked tail) and copies their q into one [B, draft_len, V] tensor. Peak: one
        [B, draft_len, V] float32 tensor, plus one pass's scored columns at T > 1.
        """
        contexts = ContextBatch.of(contexts)
        B = len(contexts.rows)
        steps = min(self.steps, draft_len)
        canvas = (WindowCanvas(self, contexts, draft_len) if cached is None
                  else CachedCanvas(self, cached.cache, cached.slots, contexts, draft_len,
                                    cached.causal_context, cached.refresh_steps))
        temps = (torch.zeros(B) if temperatures is None
                 else torch.from_numpy(np.asarray(temperatures, dtype=np.float32).copy()))
        if self.draft_temperature is not None:
            temps = torch.where(temps > GREEDY, torch.tensor(self.draft_temperature), temps)
        # A draft temperature of 0 on a sampled request draws greedily too (q one-hot).
        greedy_cpu = temps <= GREEDY
        all_greedy = bool(greedy_cpu.all())
        exact = is_exact(self.schedule, steps)
        greedy = greedy_cpu.to(self.device)
        temps = torch.where(temps > GREEDY, temps, torch.ones_like(temps)).to(self.device)
        V = self.mask_id  # target vocabulary: every id below the mask token
        tokens = torch.zeros(B, draft_len, dtype=torch.long, device=self.device)
        masked = torch.ones(B, draft_len, dtype=torch.bool, device=self.device)
        probs = None  # the kept q (exact schedules, sampled rows only)
        passes, scored = 0, None
        # left_to_right reveals known columns at each step: a pass scores those only
        # (the other schedules rank or draw among every masked position).
        groups = group_sizes(draft_len, steps) if self.schedule == "left_to_right" else None
        for step in range(steps):
            if step and not bool(masked.any()):
                break  # the random schedule can reveal every position before the last step
            if scored is None:  # else no token changed since the last pass: reuse it
                # Revealed columns form a prefix: score from the first masked one (the
                # group it starts, for left_to_right; the rest of the tail otherwise).
                first = int(masked.any(0).nonzero()[0]) if step else 0
                count = groups[step] if groups else draft_len - first
                out = canvas.logits(draft_len - first, count)
                passes += 1
                scored = self._score(out, V, temps, greedy, all_greedy, generators, first,
                                     draft_len)
            first, proposal, confidence, q = scored
            n = proposal.shape[1]
            full = lambda t, fill: torch.cat(  # noqa: E731  scored [B, n] -> [B, draft_len]
                [t.new_full((B, first), fill), t, t.new_full((B, draft_len - first - n), fill)],
                1) if n < draft_len else t
            order = self._uniforms((B, draft_len), generators) if self.schedule == "random" else None
            reveal = reveal_mask(self.schedule, step, steps, masked,
                                 None if confidence is None else full(confidence, float("-inf")), order)
            if bool(reveal.any()):
                proposal = full(proposal, 0)
                tokens = torch.where(reveal, proposal, tokens)
                if q is not None and exact:
                    if probs is None and n == draft_len:
                        probs = q  # one pass scored every position: its buffer is q
                    else:  # column by column: no [B, n, V] gather
                        if probs is None:
                            probs = q.new_empty(B, draft_len, q.shape[-1])
                        for col in reveal[:, first : first + n].any(0).nonzero().flatten().tolist():
                            rows = reveal[:, first + col]
                            if bool(rows.all()):
                                probs[:, first + col].copy_(q[:, col])
                            else:
                                probs[rows, first + col] = q[rows, col]
                canvas.reveal(reveal, proposal)
                masked &= ~reveal
                scored = None
        has_q = (~greedy) if probs is not None else torch.zeros_like(greedy)
        return Draft(tokens=tokens, probs=probs, has_q=has_q, exact=exact,
                     drafted_greedily=greedy, forward_passes=passes)

    def _score(self, out, V, temps, greedy, all_greedy, generators, first, draft_len):
        """One pass's proposals over the block columns it scored (``out``'s columns,
        from ``first`` on): argmax for greedy rows, a draw from q = softmax(logits / T)
        for the others (q in place in ``out``), and the confidence the ``confidence``
        schedule ranks by."""
        logits = out[..., :V]
        if out.dtype != torch.float32:
            logits = logits.float()
        argmax = logits.argmax(-1)
        if all_greedy:
            confidence = (logits.max(-1).values - logits.logsumexp(-1)
                          if self.schedule == "confidence" else None)
            return first, argmax, confidence, None
        if out.dtype == torch.float32:
            out[..., V:] = float("-inf")  # the mask token is never drafted (SUBS)
            q = softmax_(out, temps)[..., :V]
        else:
            q = softmax_(logits.contiguous(), temps)
        B, n = q.shape[:2]
        # draft_len uniforms per pass whatever it scores: a seeded request's stream
        # advances by the same amount as when every pass scored the whole tail.
        u = self._uniforms((B, draft_len), generators)[:, first : first + n]
        proposal = torch.empty(B, n, dtype=torch.long, device=q.device)
        for i in range(0, B, SAMPLING_CHUNK):  # the CDF scratch is chunk x n x V
            proposal[i : i + SAMPLING_CHUNK] = sample_inverse_cdf(q[i : i + SAMPLING_CHUNK],
                                                                  u[i : i + SAMPLING_CHUNK])
        proposal = torch.where(greedy[:, None], argmax, proposal)
        confidence = q.gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
        return first, proposal, confidence, q
