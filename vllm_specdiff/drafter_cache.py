"""The drafter's per-request context cache: keys and values of every running request's
context tokens, so a drafting step encodes only the tokens accepted since that
request's last step instead of re-encoding a context window.

One preallocated store for the whole engine, [n_blocks, slots, H, capacity, head_dim]
for keys and the same for values, with one slot per request vLLM can run at once
(``max_num_seqs``); ``capacity`` is the most context tokens a slot keeps (the context
window W, at most the drafter's ``model_length`` minus gamma). Slot bookkeeping is
host-side numpy, so using the cache needs no device synchronisation:

- a request gets a slot on its first drafting step (``slots_for``) and gives it back
  when it finishes, is aborted or preempted (``release``), or leaves the batch
  (``release_all_but``); a returning request rebuilds its context from scratch;
- a slot is a ring of ``capacity`` columns: the request's token ``starts[s] + i`` (the
  i-th written since the slot was reset) lives in column ``i % capacity``, so a long
  context overwrites its oldest columns in place and a step costs the same whatever
  the context's length (attention does not care about column order: every key
  carries its rotary position). Only verified context tokens are ever written (the
  draft block never is), so nothing needs rolling back after a rejection;
- a pass sees the cached tokens among its context's last ``window`` (= capacity,
  unless a test asks for a larger store): a context longer than that keeps its last
  ``window`` tokens.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from vllm_specdiff.model import MDLMConfig

logger = logging.getLogger("vllm.specdiff")


class DrafterCacheError(ValueError):
    """The cache does not fit, or has no free slot."""


class DrafterCache:
    def __init__(self, config: MDLMConfig, slots: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", window: int | None = None):
        shape = self.shape(config, slots, capacity)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.window = capacity if window is None else window
        if not 0 < self.window <= capacity:
            raise ValueError(f"drafter cache: window {self.window} must be in "
                             f"[1, capacity={capacity}]")
        self.written = np.zeros(slots, dtype=np.int64)  # tokens written since the reset
        self.starts = np.zeros(slots, dtype=np.int64)  # context index of the first of them
        self.steps_since_encode = np.zeros(slots, dtype=np.int64)  # approximate caches refresh
        self._slot_of: dict[str, int] = {}
        self._free = list(range(slots - 1, -1, -1))

    @staticmethod
    def shape(config: MDLMConfig, slots: int, capacity: int) -> tuple[int, ...]:
        """Of the key store and of the value store."""
        return (config.n_blocks, slots, config.n_heads, capacity,
                config.hidden_dim // config.n_heads)

    @classmethod
    def nbytes_for(cls, config: MDLMConfig, slots: int, capacity: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * math.prod(cls.shape(config, slots, capacity)) * elem

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def ends(self) -> np.ndarray:
        """Per slot: the context index of the next token to encode."""
        return self.starts + self.written

    @property
    def lengths(self) -> np.ndarray:
        """Per slot: columns holding a token."""
        return np.minimum(self.written, self.capacity)

    @property
    def slots_in_use(self) -> int:
        return len(self._slot_of)

    def slots_for(self, req_ids: list[str]) -> np.ndarray:
        """The slot of each request, a fresh empty one for a request not seen yet."""
        out = np.empty(len(req_ids), dtype=np.int64)
        for i, rid in enumerate(req_ids):
            slot = self._slot_of.get(rid)
            if slot is None:
                if not self._free:
                    raise DrafterCacheError(
                        f"drafter cache: all {self.k.shape[1]} slots are in use (one per "
                        "request of max_num_seqs); a finished request was not released")
                slot = self._free.pop()
                self._slot_of[rid] = slot
                self.reset(slot, 0)
            out[i] = slot
        return out

    def reset(self, slots, starts) -> None:
        """Empty slots; the next token each encodes is its request's token ``starts``."""
        self.written[slots] = 0
        self.starts[slots] = starts
        self.steps_since_encode[slots] = 0

    def make_room(self, slots: np.ndarray, n: np.ndarray, refresh_steps: int | None) -> None:
        """Before a step whose contexts have ``n`` tokens: reset the slots that cannot
        continue (a context that no longer extends the cached tokens, one whose new
        tokens alone fill the window, an approximate cache due for its refresh); a
        reset slot starts again at its context's last ``window`` tokens."""
        ends = self.ends[slots]
        stale = (ends > n) | (ends <= n - self.window)
        if refresh_steps is not None:
            stale |= self.steps_since_encode[slots] >= refresh_steps
        self.reset(slots[stale], np.maximum(0, n[stale] - self.window))
        self.steps_since_encode[slots] += 1

    def columns(self, slots: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The columns of the tokens ``offsets`` (>= 0) past each slot's end."""
        return (self.written[slots] + offsets) % self.capacity

    def visible(self, slots: np.ndarray, n: np.ndarray, width: int) -> np.ndarray:
        """bool [len(slots), width]: which of each slot's first ``width`` columns a
        pass over a context of ``n`` tokens attends to (a token among its last
        ``window``)."""
        held = self.lengths[slots][:, None]
        oldest = self.written[slots][:, None] - held  # offset of the oldest token held
        cols = np.arange(width)[None, :]
        index = self.starts[slots][:, None] + oldest + (cols - oldest) % self.capacity
        return (cols < held) & (index >= (n - self.window)[:, None])

    def advance(self, slots: np.ndarray, new: np.ndarray) -> None:
        """``new`` tokens were written past each slot's end."""
        self.written[slots] += new

    def release(self, req_ids) -> None:
        for rid in req_ids:
            slot = self._slot_of.pop(rid, None)
            if slot is not None:
                self._free.append(slot)

    def release_all_but(self, live_req_ids) -> None:
        """Free the slots of requests no longer in the batch (finished, aborted,
        preempted or unscheduled: a request that comes back rebuilds its cache)."""
        live = set(live_req_ids)
        self.release([rid for rid in self._slot_of if rid not in live])


def available_memory(device: torch.device) -> int:
    """Bytes the cache may take: free accelerator memory, or available host memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def make_drafter_cache(config: MDLMConfig, slots: int, capacity: int, dtype: torch.dtype,
                       device: torch.device) -> DrafterCache:
    """Preallocate the cache, refusing one that would not fit (with the settings that
    size it), and log its size."""
    need = DrafterCache.nbytes_for(config, slots, capacity, dtype)
    have = available_memory(device)
    if need > 0.9 * have:
        raise DrafterCacheError(
            f"drafter cache needs {need / 2**30:.2f} GiB ({slots} slots = max_num_seqs, x "
            f"{capacity} context tokens, {config.n_blocks} blocks x {config.hidden_dim} "
            f"keys and values, {dtype}) but only {have / 2**30:.2f} GiB is available on "
            f"{device}: lower max_num_seqs or speculative_config.context_window, or set "
            "speculative_config.drafter_cache='off'")
    cache = DrafterCache(config, slots, capacity, dtype, device)
    logger.info("specdiff: drafter cache %.1f MiB (%d slots x %d context tokens, %s, %s)",
                cache.nbytes / 2**20, slots, capacity, dtype, device)
    return cache
