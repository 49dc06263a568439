"""Fused speculative-decoding verification (rejection sampling) in one Triton kernel.

The problem
-----------
A batch of ``B`` requests; request ``i`` comes with ``n_i >= 0`` draft tokens
``x_0 .. x_{n_i-1}`` and the target model's (already temperature-scaled and
top-k/top-p masked) logits for its ``n_i`` draft positions plus one bonus
position.  Rows are request-major: request ``i`` owns logits rows
``cu[i] + i .. cu[i+1] + i`` (inclusive) and draft slots ``cu[i] .. cu[i+1]``.

For request ``i``, walking ``j = 0 .. n_i - 1`` with ``p_j = softmax(row j)``:

* greedy:  accept ``x_j`` while ``x_j == argmax p_j`` (first index of the max).
  At the first mismatch emit ``argmax p_j`` and stop.
* sampled: accept ``x_j`` iff ``u_j * q_j(x_j) < p_j(x_j)`` (strict).  At the
  first rejection emit one token from the residual ``r = max(0, p_j - q_j)``:
  the smallest ``v`` with ``cumsum(r)[v] > U_i * sum(r)`` (inverse CDF with the
  request's single uniform ``U_i``; if ``sum(r) == 0``, which only happens by
  rounding, ``r = p_j``).  ``q_j = one-hot(x_j)`` when no draft probabilities are
  given, or for a request marked as a point mass in the sparse layout (greedy,
  n-gram style and non-exact drafts), i.e. ``r = p_j`` with ``x_j``'s entry zeroed.
* all drafts accepted: emit the bonus token -- ``bonus_token_ids[i]`` if given,
  else drawn from the bonus row ``p_{n_i}`` (greedy: argmax; sampled: inverse CDF
  with ``U_i``).

Output: ``output_token_ids`` int32 ``[B, max_spec_len + 1]`` (accepted drafts,
then the one extra token, then ``-1`` placeholders) and ``num_accepted`` int32
``[B]`` (bonus not counted).  This is the Leviathan et al. (2023) / Chen et al.
(2023) speculative sampling rule, so every emitted token is distributed
exactly as the target would have sampled it.

Why fuse
--------
vLLM 0.32 (``vllm/v1/sample/rejection_sampler.py``) runs several full passes over
*every* row: gather the target rows, argmax, a full softmax (read + write), an
exponential noise tensor, and a "recovered token" kernel for *every* draft
position (reading p, q and the noise) -- although a request stops at its first
rejection and needs the residual at exactly one position.

The fused kernel (grid = B programs, one per request) reads whole vocabulary
rows only where the walk needs them:

* per reached draft position, ONE pass over the logits row: an online
  max / sum-of-exp (softmax normaliser, blocked over ``BLOCK_V`` chunks) for
  sampled requests, or a blocked first-index argmax for greedy ones; then single
  element reads of ``logit(x_j)`` and ``q_j(x_j)``;
* only at the rejected (or sampled-bonus) position, a pass for the residual
  normaliser ``sum(r)`` and a blocked inverse-CDF scan (``tl.cumsum`` inside a
  block plus a running total) that stops at the block holding the sampled token.

Positions after a rejection are never touched.  See :func:`bytes_moved` for the
resulting traffic of both paths.

Numerics shared by the kernel and the PyTorch reference
-------------------------------------------------------
* ``p(v) = exp(l_v - m) / s`` in float32 with ``m = max(l)``,
  ``s = sum(exp(l - m))``.
* The accept test is evaluated in float64: ``u * q`` of two float32-or-float64
  numbers, so for float32 ``u`` it is exact and both sides decide identically
  whenever they compute the same ``p(x)``.
* Inverse CDF in float32: ``T = float32(U) * sum(r)``; token = the smallest
  ``v`` with ``cumsum(r)[v] > T`` **and** ``r[v] > 0`` (the second condition
  changes nothing in exact arithmetic but guarantees that a rounding artefact
  can never emit a token of probability 0, e.g. a top-k-masked one); if no such
  ``v`` exists (``T`` rounded above the final cumsum) the last ``v`` with
  ``r[v] > 0``.
* Summation order (blocked/tree in the kernel, sequential in PyTorch) and
  ``exp`` implementations differ in the last ulp, so kernel and reference can
  disagree only when a uniform lands within ~1e-6 (relative) of an accept or
  CDF boundary.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

PLACEHOLDER_TOKEN_ID = -1
# Block size over the vocabulary on a GPU.  Under TRITON_INTERPRET=1 every
# block iteration costs Python overhead, so bigger blocks are faster there.
DEFAULT_BLOCK_V_GPU = 2048
DEFAULT_NUM_WARPS_GPU = 8
DEFAULT_BLOCK_V_INTERPRET = 8192
# Draft rows x vocabulary up to which the PyTorch reference tests every draft at once
# (1 MiB of float32 rows): 64 rows of a 4096-token vocabulary, 5 of GPT-2's. Past it,
# the walk, which leaves the rows past a rejection unread: the softmax sums of unread
# rows then cost more than the walk's calls per position (on the CPU here, all 128 rows
# of 32 requests x 4 drafts: 2.7 ms, the walk 1.5 ms with every first draft rejected).
ALL_ROWS_MAX_ELEMENTS = 1 << 18


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------


@triton.jit
def _row_softmax_stats(row_ptr, V, BLOCK_V: tl.constexpr):
    """One pass over a logits row: online max ``m`` and ``s = sum(exp(l - m))``."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # An all -inf prefix keeps m_new = -inf; shift by 0 so exp gives 0, not nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m = m_new
    return m, s


@triton.jit
def _row_argmax(row_ptr, V, BLOCK_V: tl.constexpr):
    """One pass over a logits row: FIRST index of the maximum (like torch.argmax)."""
    offs = tl.arange(0, BLOCK_V)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        bmax, bidx = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        better = bmax > best  # strict: an equal maximum in a later block loses
        best_idx = tl.where(better, start + bidx, best_idx)
        best = tl.where(better, bmax, best)
    return best_idx


@triton.jit
def _residual_block(logit_row_ptr, q_row_ptr, idx, mask, m_safe, s, x, q_limit, HAS_Q: tl.constexpr):
    """r = max(0, p - q) on one block.  The subtracted q is encoded so that it vanishes
    for the plain-p case: q is read only where idx < q_limit (the q row's width, or 0
    for "no q row"), and a point mass q = one-hot(x) is x >= 0 (x = -1: no point mass)."""
    lg = tl.load(logit_row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
    p = tl.exp(lg - m_safe) / s
    r = p
    if HAS_Q:
        q = tl.load(q_row_ptr + idx, mask=idx < q_limit, other=0.0).to(tl.float32)
        r = tl.maximum(p - q, 0.0)
    return tl.where(idx == x, 0.0, r)


@triton.jit
def _residual_sum(logit_row_ptr, q_row_ptr, V, m_safe, s, x, q_limit, HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    total = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        r = _residual_block(logit_row_ptr, q_row_ptr, idx, idx < V, m_safe, s, x, q_limit, HAS_Q)
        total += tl.sum(r, 0)
    return total


@triton.jit
def _sample_residual(
    logit_row_ptr, q_row_ptr, V, QV, m, s, x, use_q, row_q, u, HAS_Q: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Inverse-CDF draw from r = max(0, p - q) (or from p when use_q is False); q is the
    q row (row_q) or the point mass at x."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    x = tl.where(use_q & (row_q == 0), x, -1)
    q_limit = tl.where(use_q & (row_q != 0), QV, 0)
    # Pass 1: normaliser.  sum(r) == 0 happens only by rounding -> fall back to p.
    total = _residual_sum(logit_row_ptr, q_row_ptr, V, m_safe, s, x, q_limit, HAS_Q, BLOCK_V)
    if total <= 0.0:
        x = tl.full((), -1, tl.int32)
        q_limit = tl.zeros((), tl.int32)
        total = _residual_sum(logit_row_ptr, q_row_ptr, V, m_safe, s, x, q_limit, HAS_Q, BLOCK_V)
    threshold = u * total
    # Pass 2: blocked scan; stops after the block that holds the token.
    offs = tl.arange(0, BLOCK_V)
    running = tl.zeros((), tl.float32)
    token = tl.full((), -1, tl.int32)
    last_pos = tl.full((), -1, tl.int32)
    start = 0
    while (start < V) & (token < 0):
        idx = start + offs
        r = _residual_block(logit_row_ptr, q_row_ptr, idx, idx < V, m_safe, s, x, q_limit, HAS_Q)
        cdf = running + tl.cumsum(r, 0)
        hit = (cdf > threshold) & (r > 0.0)
        first = tl.min(tl.where(hit, idx, V), 0)
        token = tl.where(first < V, first, token)
        last_pos = tl.maximum(last_pos, tl.max(tl.where(r > 0.0, idx, -1), 0))
        running += tl.sum(r, 0)
        start += BLOCK_V
    # threshold rounded above the final cumsum: the last token with mass (0 if none).
    token = tl.where(token < 0, tl.maximum(last_pos, 0), token)
    return token


@triton.jit
def _fused_verify_kernel(
    out_ptr,  # int32 [B, out_stride]  (pre-filled with -1)
    num_accepted_ptr,  # int32 [B]
    logits_ptr,  # fp32 [N + B, V] (BONUS_ROWS) or [N, V]
    draft_ids_ptr,  # int [N]
    draft_probs_ptr,  # fp32 q rows [*, QV], row stride q_row_stride (unused unless HAS_Q)
    q_start_ptr,  # int64 [B]: q row of each request's draft 0; -1 = point mass (HAS_Q)
    cu_ptr,  # int [B + 1]
    is_greedy_ptr,  # bool [B]
    u_accept_ptr,  # fp32/fp64 [N]
    u_sample_ptr,  # fp32/fp64 [B]
    bonus_ids_ptr,  # int [B]                  (unused unless HAS_BONUS)
    V,
    QV,
    q_row_stride,
    out_stride,
    HAS_Q: tl.constexpr,
    HAS_BONUS: tl.constexpr,
    BONUS_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    req = tl.program_id(0)
    start = tl.load(cu_ptr + req).to(tl.int64)
    n = (tl.load(cu_ptr + req + 1).to(tl.int64) - start).to(tl.int32)
    greedy = tl.load(is_greedy_ptr + req)
    out_row = out_ptr + req.to(tl.int64) * out_stride
    # logits row of draft position 0 (int64: rows * V may exceed 2^31)
    first_row = start + req if BONUS_ROWS else start
    if HAS_Q:
        q_first = tl.load(q_start_ptr + req).to(tl.int64)
    else:
        q_first = tl.full((), -1, tl.int64)
    row_q = (q_first >= 0).to(tl.int32)  # this request has q rows; else a point mass

    j = tl.zeros((), tl.int32)  # = number of accepted drafts so far
    rejected = tl.zeros((), tl.int32)
    if greedy:
        while (j < n) & (rejected == 0):
            target = _row_argmax(logits_ptr + (first_row + j) * V, V, BLOCK_V)
            x = tl.load(draft_ids_ptr + start + j).to(tl.int32)
            # On acceptance x == target, on rejection target is the output: store target.
            tl.store(out_row + j, target)
            accepted = (x == target).to(tl.int32)
            j += accepted
            rejected = 1 - accepted
        if rejected == 0:
            if HAS_BONUS:
                tl.store(out_row + n, tl.load(bonus_ids_ptr + req).to(tl.int32))
            else:
                tl.store(out_row + n, _row_argmax(logits_ptr + (first_row + n) * V, V, BLOCK_V))
    else:
        m = tl.zeros((), tl.float32)
        s = tl.zeros((), tl.float32)
        while (j < n) & (rejected == 0):
            row_ptr = logits_ptr + (first_row + j) * V
            m, s = _row_softmax_stats(row_ptr, V, BLOCK_V)
            x = tl.load(draft_ids_ptr + start + j).to(tl.int32)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            p_x = tl.exp(tl.load(row_ptr + x).to(tl.float32) - m_safe) / s
            if HAS_Q:
                q_x = tl.load(draft_probs_ptr + (q_first + j) * q_row_stride + x,
                              mask=(row_q != 0) & (x < QV), other=0.0).to(tl.float64)
                q_x = tl.where(row_q != 0, q_x, 1.0)
            else:
                q_x = tl.full((), 1.0, tl.float64)
            u = tl.load(u_accept_ptr + start + j).to(tl.float64)
            # Stored now, overwritten by the residual token on rejection.
            tl.store(out_row + j, x)
            accepted = (u * q_x < p_x.to(tl.float64)).to(tl.int32)
            j += accepted
            rejected = 1 - accepted
        need_sample = rejected != 0
        if rejected == 0:
            if HAS_BONUS:
                tl.store(out_row + n, tl.load(bonus_ids_ptr + req).to(tl.int32))
            else:
                m, s = _row_softmax_stats(logits_ptr + (first_row + n) * V, V, BLOCK_V)
                need_sample = True
        if need_sample:
            # Rejected at j: residual of row j.  All accepted (j == n): p of the bonus row.
            use_q = rejected != 0
            x = tl.load(draft_ids_ptr + start + j, mask=use_q, other=-1).to(tl.int32)
            u_s = tl.load(u_sample_ptr + req).to(tl.float32)
            token = _sample_residual(
                logits_ptr + (first_row + j) * V,
                draft_probs_ptr + (q_first + j) * q_row_stride,
                V, QV, m, s, x, use_q, row_q, u_s, HAS_Q, BLOCK_V,
            )
            tl.store(out_row + j, token)
    tl.store(num_accepted_ptr + req, j)


def default_block_v(vocab_size: int) -> int:
    """BLOCK_V used by :func:`fused_verify` unless overridden (never above next_pow2(V))."""
    block_v = DEFAULT_BLOCK_V_INTERPRET if _interpreting() else DEFAULT_BLOCK_V_GPU
    return min(block_v, max(16, triton.next_power_of_2(vocab_size)))


def _check_bonus(bonus_rows: bool, bonus_token_ids) -> None:
    if not bonus_rows and bonus_token_ids is None:
        raise ValueError("bonus_rows=False: the logits have no bonus rows, so bonus_token_ids "
                         "must be given")


def _q_layout(draft_probs, q_start, cu_num_draft):
    """q as 2-D rows [*, QV] (unit column stride) and each request's first q row.

    Dense (``q_start`` None): ``draft_probs`` is [N, QV], one row per draft slot, so
    request i starts at row cu[i].  Sparse: ``draft_probs`` is [R, L, QV] (or any
    [*, QV] rows) and ``q_start[i]`` is request i's first row, -1 for a point mass."""
    if draft_probs is None:
        return None, None
    q2d = draft_probs.reshape(-1, draft_probs.shape[-1]) if draft_probs.dim() == 3 else draft_probs
    if q2d.shape[0] and q2d.stride(-1) != 1:
        q2d = q2d.contiguous()
    if q_start is None:
        q_start = cu_num_draft[:-1].to(torch.int64)
    return q2d, q_start.to(torch.int64)


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    # A zero-element CUDA tensor has a null data pointer, which Triton rejects.
    return t if t.numel() > 0 else torch.zeros(1, dtype=t.dtype, device=t.device)


def fused_verify(
    logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    cu_num_draft: torch.Tensor,
    is_greedy: torch.Tensor,
    uniform_accept: torch.Tensor,
    uniform_sample: torch.Tensor,
    max_spec_len: int,
    bonus_token_ids: torch.Tensor | None = None,
    *,
    q_start: torch.Tensor | None = None,
    bonus_rows: bool = True,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: ONE kernel launch for the whole batch (grid = B programs).

    ``max_spec_len`` must be >= every n_i (not checked: that would need a sync).
    ``q_start`` / ``bonus_rows``: the sparse layouts, see :func:`verify`.
    ``block_v`` / ``num_warps`` override the tuning defaults (tests, benchmarks).
    """
    B = is_greedy.numel()
    V = logits.shape[-1]
    device = logits.device
    out = torch.full((B, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
    num_accepted = torch.zeros(B, dtype=torch.int32, device=device)
    if B == 0:
        return out, num_accepted
    if block_v is None:
        block_v = default_block_v(V)
    if num_warps is None:
        num_warps = DEFAULT_NUM_WARPS_GPU if block_v >= 1024 else 4
    logits = logits.contiguous()
    _check_bonus(bonus_rows, bonus_token_ids)
    q2d, q_start = _q_layout(draft_probs, q_start, cu_num_draft)
    has_q = q2d is not None
    has_bonus = bonus_token_ids is not None
    _fused_verify_kernel[(B,)](
        out,
        num_accepted,
        logits,
        _nonempty(draft_token_ids.contiguous()),
        _nonempty(q2d) if has_q else logits,  # dummy, never read
        q_start.contiguous() if has_q else num_accepted,  # dummy, never read
        cu_num_draft.contiguous(),
        is_greedy.contiguous(),
        _nonempty(uniform_accept.contiguous()),
        uniform_sample.contiguous(),
        bonus_token_ids.contiguous() if has_bonus else num_accepted,  # dummy, never read
        V,
        q2d.shape[1] if has_q else V,
        q2d.stride(0) if has_q else V,
        max_spec_len + 1,
        HAS_Q=has_q,
        HAS_BONUS=has_bonus,
        BONUS_ROWS=bonus_rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return out, num_accepted


# --------------------------------------------------------------------------------------
# PyTorch reference (vectorised over the batch; the CPU production path)
# --------------------------------------------------------------------------------------


def _row_stats(rows: torch.Tensor, need_sum: bool):
    """Per row: max m, FIRST argmax, and (if need_sum) s = sum(exp(l - m))."""
    rows = rows.float()
    m = rows.amax(dim=-1)
    s = torch.exp(rows - _safe(m)[:, None]).sum(dim=-1) if need_sum else None
    return m, first_argmax(rows), s


def first_argmax(rows: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum (int64). On the CPU through NumPy: torch's
    max-with-indices took 395 us on [128, 4096] float32 here, NumPy 38 (and amax 20)."""
    if rows.device.type != "cpu":
        return rows.max(dim=-1).indices
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()  # NumPy has no bfloat16 (exact for float16 and bfloat16)
    return torch.from_numpy(rows.detach().numpy().argmax(axis=-1))


def _safe(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _inverse_cdf(r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row: smallest v with cumsum(r)[v] > float32(u) * sum(r) and r[v] > 0;
    else the last v with r[v] > 0; else 0.  r: float32 [R, V]."""
    threshold = u.to(torch.float32) * r.sum(dim=-1)
    hit = (r.cumsum(dim=-1) > threshold[:, None]) & (r > 0)
    token = hit.to(torch.uint8).argmax(dim=-1)  # first True (0 if none)
    missed = ~hit.gather(1, token[:, None]).squeeze(1)
    if bool(missed.any()):  # threshold rounded above the final cumsum (u ~ 1)
        positive = r[missed] > 0
        last = r.shape[-1] - 1 - positive.flip(-1).to(torch.uint8).argmax(dim=-1)
        token[missed] = torch.where(positive.any(dim=-1), last, torch.zeros_like(last))
    return token


def _q_at(q2d: torch.Tensor | None, rows: torch.Tensor, x: torch.Tensor, row_q: torch.Tensor) -> torch.Tensor:
    """q(x) in float64 per request: from its q row, 0 past the row's width; 1 for a
    point mass (or when there is no q at all). A point mass's ``rows`` (its -1 start
    plus the position) may lie past q's rows: they are read clamped, and not used."""
    if q2d is None:
        return torch.ones_like(x, dtype=torch.float64)
    inside = row_q & (x < q2d.shape[1])
    q_x = q2d[rows.clamp(0, q2d.shape[0] - 1), x.clamp(max=q2d.shape[1] - 1)].double()
    return torch.where(inside, q_x, torch.where(row_q, 0.0, 1.0).double())


def _residual_rows(p: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor, use_q: torch.Tensor,
                   point_mass: torch.Tensor | None = None) -> torch.Tensor:
    """r = max(0, p - q) per row where use_q; q = one-hot(x) on the ``point_mass`` rows
    (all rows if q is None); r = p where not use_q or where the residual sums to 0
    (rounding)."""
    if q is None:
        point_mass = torch.ones_like(use_q)
        r = p.clone()
    else:
        if point_mass is None:
            point_mass = torch.zeros_like(use_q)
        r = torch.where((use_q & ~point_mass)[:, None], (p - q).clamp_min(0.0), p)
    rows = torch.nonzero(use_q & point_mass).squeeze(1)
    r[rows, x[rows]] = 0.0
    degenerate = r.sum(dim=-1) <= 0
    if bool(degenerate.any()):
        r[degenerate] = p[degenerate]
    return r


def _batch_indices(cu_num_draft: torch.Tensor, B: int):
    cu = cu_num_draft.to(torch.long)
    n = cu[1:] - cu[:-1]
    req_of_draft = torch.repeat_interleave(torch.arange(B, device=cu.device), n)
    N = int(cu[-1])
    pos_of_draft = torch.arange(N, device=cu.device) - cu[:-1][req_of_draft]
    return cu, n, req_of_draft, pos_of_draft


def _first_rejection(accept: torch.Tensor, n: torch.Tensor, req_of_draft, pos_of_draft) -> torch.Tensor:
    """The accept walk, vectorised: number of accepted drafts = index of the first rejection."""
    num_accepted = n.clone()
    rej = ~accept
    num_accepted.scatter_reduce_(0, req_of_draft[rej], pos_of_draft[rej], reduce="amin")
    return num_accepted


def _assemble(B, max_spec_len, draft_token_ids, req_of_draft, pos_of_draft, num_accepted, final_token, device):
    out = torch.full((B, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
    keep = pos_of_draft < num_accepted[req_of_draft]
    out[req_of_draft[keep], pos_of_draft[keep]] = draft_token_ids[keep].to(torch.int32)
    out[torch.arange(B, device=device), num_accepted] = final_token.to(torch.int32)
    return out, num_accepted.to(torch.int32)


def fused_verify_reference(
    logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    cu_num_draft: torch.Tensor,
    is_greedy: torch.Tensor,
    uniform_accept: torch.Tensor,
    uniform_sample: torch.Tensor,
    max_spec_len: int,
    bonus_token_ids: torch.Tensor | None = None,
    *,
    q_start: torch.Tensor | None = None,
    bonus_rows: bool = True,
    all_rows_max: int = ALL_ROWS_MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, same semantics as :func:`fused_verify`, vectorised over the batch.

    A block of at most ``all_rows_max`` draft-row elements (N x V) tests every draft
    at once. A larger one is walked like the kernel, touching only the rows the walk
    reaches: step j processes, for all requests still running at once, row j (max /
    first argmax, sum of exp, and the single values logit(x_j), q_j(x_j)); a request
    leaves at its first rejection. The residual / bonus distribution is then
    materialised for one final row per request.
    """
    device = logits.device
    B = is_greedy.numel()
    is_greedy = is_greedy.to(torch.bool)
    cu, n, req_of_draft, pos_of_draft = _batch_indices(cu_num_draft, B)
    x = draft_token_ids.to(torch.long)
    _check_bonus(bonus_rows, bonus_token_ids)
    first_row = cu[:-1] + (torch.arange(B, device=device) if bonus_rows else 0)  # row of draft 0
    q2d, q_first = _q_layout(draft_probs, q_start, cu_num_draft)
    if q2d is None:
        q_first = torch.full((B,), -1, dtype=torch.int64, device=device)
    row_q = q_first >= 0
    if bool(is_greedy.all()):
        return _verify_all_greedy(logits, x, draft_token_ids, first_row, n, req_of_draft,
                                  pos_of_draft, bonus_token_ids, max_spec_len)

    def accepted(rows: torch.Tensor, slot: torch.Tensor, req: torch.Tensor,
                 pos: torch.Tensor | int) -> torch.Tensor:
        """Whether draft ``slot`` (of request ``req``, position ``pos``, target row
        ``rows``) passes its test, for any set of drafts."""
        greedy = is_greedy[req]
        m, argmax, s = _row_stats(rows, need_sum=not bool(greedy.all()))
        accept = x[slot] == argmax
        if s is not None:
            logit_x = rows.gather(1, x[slot][:, None]).squeeze(1).float()
            p_x = torch.exp(logit_x - _safe(m)) / s
            q_x = _q_at(q2d, q_first[req] + pos, x[slot], row_q[req])
            accept = torch.where(greedy, accept, uniform_accept[slot].double() * q_x < p_x.double())
        return accept

    N = x.numel()
    if N * logits.shape[1] <= all_rows_max:
        # Every draft tested at once, then each request's first failure: a few calls in
        # all, where the walk below makes a dozen per draft position (on the CPU ~10 us
        # each: 1.4 ms for 8 accepted drafts at batch 1, vocabulary 4096). It reads the
        # rows past a rejection too, so only while they are few.
        rows = logits[first_row[req_of_draft] + pos_of_draft] if bonus_rows else logits[:N]
        accept = accepted(rows, torch.arange(N, device=device), req_of_draft, pos_of_draft)
        num_accepted = _first_rejection(accept, n, req_of_draft, pos_of_draft)
    else:
        # The accept walk: `alive` = requests that accepted drafts 0 .. j-1 and have a
        # draft j; each position reads the rows of those requests only.
        num_accepted = torch.zeros(B, dtype=torch.long, device=device)
        alive = torch.nonzero(n > 0).squeeze(1)
        j = 0
        while alive.numel() > 0:
            accept = accepted(logits[first_row[alive] + j], cu[:-1][alive] + j, alive, j)
            num_accepted[alive] += accept.long()
            j += 1
            alive = alive[accept & (n[alive] > j)]

    # One extra token per request: argmax (greedy), residual (rejected), bonus.
    rejected = num_accepted < n
    final_token = (
        bonus_token_ids.to(device=device, dtype=torch.long).clone()
        if bonus_token_ids is not None
        else torch.zeros(B, dtype=torch.long, device=device)
    )
    reqs = torch.nonzero(rejected | (bonus_token_ids is None)).squeeze(1)
    if reqs.numel() > 0:
        rows = logits[first_row[reqs] + num_accepted[reqs]].float()
        sampled = ~is_greedy[reqs]
        m, argmax, s = _row_stats(rows, need_sum=bool(sampled.any()))
        final_token[reqs] = argmax
        if s is not None:
            reqs, rows, m, s = reqs[sampled], rows[sampled], m[sampled], s[sampled]
            p = torch.exp(rows - _safe(m)[:, None]) / s[:, None]
            use_q = rejected[reqs]
            slot = (cu[:-1][reqs] + num_accepted[reqs]).clamp(max=max(x.numel() - 1, 0))  # rejected draft
            q = None
            has = row_q[reqs] & use_q  # rejected at a draft that has a q row
            if bool(has.any()):
                q = torch.zeros_like(p)  # the q rows of these requests, 0 past QV
                q[has, : q2d.shape[1]] = q2d[q_first[reqs][has] + num_accepted[reqs][has]].float()
            x_rej = x[slot] if x.numel() > 0 else slot
            r = _residual_rows(p, q, x_rej, use_q, point_mass=~row_q[reqs])
            final_token[reqs] = _inverse_cdf(r, uniform_sample[reqs])
    return _assemble(B, max_spec_len, draft_token_ids, req_of_draft, pos_of_draft, num_accepted, final_token, device)


def _verify_all_greedy(logits, x, draft_token_ids, first_row, n, req_of_draft, pos_of_draft,
                       bonus_token_ids, max_spec_len):
    """The reference for a batch of greedy requests only: :func:`verify_greedy_on_host`
    on the rows of the layout (the bonus rows, when there are any, are skipped)."""
    if bonus_token_ids is None:  # the bonus token is the argmax of each bonus row
        bonus_token_ids = first_argmax(logits[first_row + n])
    if logits.shape[0] != len(draft_token_ids):  # bonus rows between the draft rows
        logits = logits[first_row[req_of_draft] + pos_of_draft]
    return verify_greedy_on_host(logits, draft_token_ids, n.tolist(), bonus_token_ids,
                                 max_spec_len)


def verify_greedy_on_host(logits: torch.Tensor, draft_token_ids: torch.Tensor,
                          num_draft_tokens: list[int], bonus_token_ids: torch.Tensor,
                          max_spec_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Verification of a batch of greedy requests in NumPy: the argmax of every draft
    row in one call, each request accepting drafts up to its first mismatch, then the
    target's argmax there or its bonus token. The CPU production path for all-greedy
    batches (on other devices the tensors are copied to the host: the reference).

    Why not torch: on the CPU a torch call costs microseconds of dispatch, and the
    greedy walk is a dozen of them around one argmax, which torch computes several times
    slower than NumPy here (a [256, 4096] float32 argmax: 460 us in torch, 71 in NumPy).
    The torch version of this function took 176 us a step at batch 1 (8 drafts) and
    645 us at batch 32, against 28 and 109 for this one (an ad-hoc micro-benchmark on
    this project's 2-core CPU, vocabulary 4096).

    ``logits``: the N draft rows only, request-major (``num_draft_tokens`` per request).
    A draft id outside the vocabulary (vLLM's -1 placeholder) never equals an argmax, so
    the walk stops there with the target's argmax: what plain decoding would emit."""
    device = logits.device
    B, N = len(num_draft_tokens), int(draft_token_ids.numel())
    n = np.asarray(num_draft_tokens, dtype=np.int64)
    bonus = bonus_token_ids.cpu().numpy().astype(np.int64, copy=False)
    num_accepted = n.copy()
    if N:
        argmax = first_argmax(logits.detach().cpu()).numpy()
        x = draft_token_ids.cpu().numpy().astype(np.int64, copy=False)
        starts = np.zeros(B, dtype=np.int64)
        np.cumsum(n[:-1], out=starts[1:])
        req_of_draft = np.repeat(np.arange(B), n)
        pos_of_draft = np.arange(N) - starts[req_of_draft]
        wrong = x != argmax
        np.minimum.at(num_accepted, req_of_draft[wrong], pos_of_draft[wrong])
        final = np.where(num_accepted < n, argmax[np.minimum(starts + num_accepted, N - 1)], bonus)
    else:
        final = bonus
    out = np.full((B, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=np.int32)
    if N:
        keep = pos_of_draft < num_accepted[req_of_draft]
        out[req_of_draft[keep], pos_of_draft[keep]] = x[keep]
    out[np.arange(B), num_accepted] = final
    return (torch.from_numpy(out).to(device),
            torch.from_numpy(num_accepted.astype(np.int32)).to(device))


# --------------------------------------------------------------------------------------
# Unfused baseline (vLLM 0.32's multi-pass structure), for benchmarking
# --------------------------------------------------------------------------------------


def unfused_verify(
    logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    cu_num_draft: torch.Tensor,
    is_greedy: torch.Tensor,
    uniform_accept: torch.Tensor,
    uniform_sample: torch.Tensor,
    max_spec_len: int,
    bonus_token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The multi-pass algorithm of vLLM 0.32's ``rejection_sample``, same outputs.

    Passes over all N draft rows: gather the target rows, argmax (if any greedy),
    full softmax (if any sampled), a residual + recovered token for EVERY draft
    position, then the accept walk; the bonus rows are handled separately (vLLM
    samples them with its Sampler).  The recovered token uses the same inverse-CDF
    draw as the fused kernel (vLLM uses the Gumbel-max trick) so outputs agree.
    """
    device = logits.device
    B = is_greedy.numel()
    N = draft_token_ids.numel()
    is_greedy = is_greedy.to(torch.bool)
    cu, n, req_of_draft, pos_of_draft = _batch_indices(cu_num_draft, B)
    x = draft_token_ids.to(torch.long)
    target_rows = torch.arange(N, device=device) + req_of_draft
    bonus_rows = cu[1:] + torch.arange(B, device=device)
    any_sampled = bool((~is_greedy).any())
    greedy_d = is_greedy[req_of_draft]

    target_logits = logits[target_rows].float()  # pass: gather
    accept = torch.zeros(N, dtype=torch.bool, device=device)
    recovered = torch.zeros(N, dtype=torch.long, device=device)
    if bool(is_greedy.any()):
        target_argmax = target_logits.argmax(dim=-1)  # pass: argmax
        accept = torch.where(greedy_d, x == target_argmax, accept)
        recovered = torch.where(greedy_d, target_argmax, recovered)
    if any_sampled and N > 0:
        target_probs = target_logits.softmax(dim=-1)  # pass: softmax (read + write)
        r = _residual_rows(target_probs, draft_probs.float() if draft_probs is not None else None, x,
                           torch.ones(N, dtype=torch.bool, device=device))  # pass: residual, all rows
        rec = _inverse_cdf(r, uniform_sample[req_of_draft])  # passes: sum, cumsum, search
        recovered = torch.where(greedy_d, recovered, rec)
        p_x = target_probs[torch.arange(N, device=device), x].double()
        q_x = draft_probs[torch.arange(N, device=device), x].double() if draft_probs is not None else 1.0
        accept = torch.where(greedy_d, accept, uniform_accept.double() * q_x < p_x)

    num_accepted = _first_rejection(accept, n, req_of_draft, pos_of_draft)
    rejected = num_accepted < n
    if bonus_token_ids is not None:
        bonus = bonus_token_ids.to(torch.long)
    else:
        bonus_logits = logits[bonus_rows].float()
        bonus = bonus_logits.argmax(dim=-1)
        if any_sampled:
            bonus_probs = bonus_logits.softmax(dim=-1)
            no_q = torch.zeros(B, dtype=torch.bool, device=device)
            bonus = torch.where(is_greedy, bonus, _inverse_cdf(_residual_rows(bonus_probs, None, bonus, no_q), uniform_sample))
    reject_slot = (cu[:-1] + num_accepted).clamp(max=max(N - 1, 0))
    final_token = torch.where(rejected, recovered[reject_slot] if N > 0 else bonus, bonus)
    return _assemble(B, max_spec_len, draft_token_ids, req_of_draft, pos_of_draft, num_accepted, final_token, device)


# --------------------------------------------------------------------------------------
# Dispatch and traffic model
# --------------------------------------------------------------------------------------


def verify(
    logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    cu_num_draft: torch.Tensor,
    is_greedy: torch.Tensor,
    uniform_accept: torch.Tensor,
    uniform_sample: torch.Tensor,
    max_spec_len: int,
    bonus_token_ids: torch.Tensor | None = None,
    *,
    q_start: torch.Tensor | None = None,
    bonus_rows: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA tensors (or under TRITON_INTERPRET=1 with SPECDIFF_FORCE_TRITON=1), else PyTorch.

    Layouts. ``logits``: request-major [N + B, V] with each request's bonus row after its
    draft rows (``bonus_rows=True``), or only the N draft rows (``bonus_rows=False``,
    which needs ``bonus_token_ids``): the target logits as vLLM hands them over, read
    in place. ``draft_probs``: dense [N, QV], one q row per draft slot, or sparse with
    ``q_start``: rows [*, QV] (e.g. the drafter's [R, L, QV] buffer) where request i's
    draft j reads row ``q_start[i] + j`` and ``q_start[i] = -1`` makes it a point mass
    (greedy, n-gram and non-exact drafts never materialise a one-hot). QV <= V: q is 0
    past its width (a padded target vocabulary). Its last stride must be 1."""
    use_triton = logits.is_cuda or (_interpreting() and os.environ.get("SPECDIFF_FORCE_TRITON", "0") == "1")
    fn = fused_verify if use_triton else fused_verify_reference
    return fn(logits, draft_token_ids, draft_probs, cu_num_draft, is_greedy, uniform_accept,
              uniform_sample, max_spec_len, bonus_token_ids, q_start=q_start, bonus_rows=bonus_rows)


def bytes_moved(
    output_token_ids: torch.Tensor,
    num_accepted: torch.Tensor,
    cu_num_draft: torch.Tensor,
    is_greedy: torch.Tensor,
    vocab_size: int,
    has_draft_probs: bool,
    has_bonus_ids: bool,
    block_v: int = DEFAULT_BLOCK_V_GPU,
    elem_bytes: int = 4,
) -> dict[str, int]:
    """Analytic memory traffic (bytes) of each path for a given outcome, counted in
    vocabulary rows (V * 4 bytes) read or written; per-request scalars are ignored.

    fused (the kernel), per request with n drafts of which a are accepted:
      reached draft rows = min(a + 1, n): one pass each (argmax for greedy; max/sum-exp
      for sampled, + one 32-byte sector for logit(x) [+ one for q(x)]);  greedy drawn
      bonus: one argmax pass;  sampled final draw (rejection, or drawn bonus after its
      max/sum-exp pass): the residual-normaliser pass and the scan up to the end of the
      block holding the emitted token, over the logits row and, at a rejection with
      draft probs, over the q row too.
    reference / unfused (PyTorch): one row read per float32 input and one row write per
      float32 output of every op (boolean temporaries ignored), for the rows each touches
      -- the reference the reached rows + one final row per request, the unfused path
      every draft row (+ the bonus rows when it draws the bonus); see the unit costs below.
    """
    V, eb, sector = vocab_size, elem_bytes, 32
    row = V * eb
    q_rows = 1 if has_draft_probs else 0
    # PyTorch unit costs, in row passes.
    gather, argmax = 2, 1
    stats = gather + 1 + 2 + 2 + 1  # gather, max, sub, exp, sum
    probs = 2 + 2 + 2  # sub, exp, div (reference p from its stats)
    softmax = 2  # fused op (unfused path)
    residual_q = 3 + 2 + 3 + 1  # sub, clamp, where, degenerate-sum check
    residual_pm = 2 + 1  # clone (+ scatter of one element), degenerate-sum check
    draw = 1 + 2 + 2  # sum, cumsum, compare/search

    cu = cu_num_draft.to(torch.long).cpu()
    n = (cu[1:] - cu[:-1]).tolist()
    acc = num_accepted.cpu().tolist()
    greedy = is_greedy.cpu().tolist()
    out = output_token_ids.cpu()
    N, B = int(cu[-1]), len(n)
    any_greedy, any_sampled = any(greedy), not all(greedy)

    fused = reference = 0
    for i, (ni, ai, gi) in enumerate(zip(n, acc, greedy)):
        reached = min(ai + 1, ni)
        final = ai < ni or not has_bonus_ids  # a final row is read (rejection / drawn bonus)
        drawn_bonus = ai == ni and not has_bonus_ids
        if gi:
            fused += (reached + int(drawn_bonus)) * row + reached * sector
            reference += (reached + int(final)) * (gather + argmax) * row
            continue
        fused += reached * (row + sector * (1 + q_rows))
        reference += reached * stats * row
        if final:
            token = int(out[i, ai])
            scanned = min(V, (token // block_v + 1) * block_v) * eb
            with_q = 1 + (q_rows if ai < ni else 0)
            fused += int(drawn_bonus) * row + with_q * (row + scanned)
            residual = residual_q if (ai < ni and has_draft_probs) else residual_pm
            reference += (stats + probs + residual + draw) * row

    residual = residual_q if has_draft_probs else residual_pm
    unfused = N * gather * row + N * argmax * row * int(any_greedy)
    unfused += N * (softmax + residual + draw) * row * int(any_sampled)
    if not has_bonus_ids:
        unfused += B * (gather + argmax * int(any_greedy)) * row
        unfused += B * (softmax + residual_pm + draw) * row * int(any_sampled)
    return {"fused": fused, "reference": reference, "unfused": unfused}


__all__ = [
    "fused_verify",
    "fused_verify_reference",
    "unfused_verify",
    "verify_greedy_on_host",
    "verify",
    "bytes_moved",
    "default_block_v",
    "PLACEHOLDER_TOKEN_ID",
]
