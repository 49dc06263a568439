"""The drafter cache without an engine: a block-causal drafter drafts the same through
its cache as from scratch, slots are accounted for, a long context keeps its last tokens
in a ring that drafts as a store that never wraps, a cache that does not fit is refused,
and a bidirectional drafter's approximate cache refreshes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_specdiff.drafter import (CachedCanvas, CachedCanvasArgs, ContextBatch,
                                   DiffusionDrafter, WindowCanvas)
from vllm_specdiff.drafter_cache import DrafterCache, DrafterCacheError, make_drafter_cache
from vllm_specdiff.model import MDLM, MDLMConfig, block_causal_mask

VOCAB = 60  # target ids 0..59, mask 60


def drafter(attention="block_causal", steps=2, model_length=128, window=1000):
    torch.manual_seed(0)
    cfg = MDLMConfig(vocab_size=VOCAB + 1, model_length=model_length, hidden_dim=32,
                     cond_dim=8, n_blocks=2, n_heads=2, dropout=0.0, attention=attention)
    model = MDLM(cfg).eval()
    with torch.no_grad():  # adaLN-Zero starts as identity: make the blocks do something
        for p in model.parameters():
            p.normal_(0, 0.3)
    return DiffusionDrafter(model, steps=steps, schedule="left_to_right",
                            context_window=window, max_positions=400)


def test_block_causal_mask():
    real = torch.tensor([[False, True, True, True, True]])
    m = block_causal_mask(real, block_len=2)[0, 0]
    assert m[1].tolist() == [False, True, False, False, False]  # context: causal
    assert m[2].tolist() == [False, True, True, False, False]
    assert m[3].tolist() == [False, True, True, True, True]  # block: everything real
    assert m[0].tolist() == [True, False, False, False, False]  # padding: itself only
    bidir = block_causal_mask(real, block_len=2, causal_context=False)[0, 0]
    assert bidir[1].tolist() == [False, True, True, False, False]  # whole context, no block


def test_exact_cache_gives_the_logits_of_a_fresh_encoding():
    """Steps of 1..9 new tokens, a prompt long enough for its own encoding pass, a
    request replaced mid-way: every pass through the cache equals the from-scratch
    block-causal pass over the whole context (first pass and a later pass)."""
    d = drafter()
    cache = DrafterCache(d.model.config, slots=4, capacity=120, dtype=torch.float32)
    rng = np.random.default_rng(0)
    contexts = [list(rng.integers(0, VOCAB, size=n)) for n in (3, 40, 17)]
    req_ids = ["a", "b", "c"]
    for step in range(6):
        batch = ContextBatch.of(contexts)
        cached = CachedCanvas(d, cache, cache.slots_for(req_ids), batch, 8, True, None)
        fresh = WindowCanvas(d, batch, 8)
        with torch.inference_mode():
            torch.testing.assert_close(cached.logits(8), fresh.logits(8), atol=1e-5, rtol=0)
            reveal = torch.zeros(3, 8, dtype=torch.bool)
            reveal[:, :3] = True
            proposal = torch.randint(0, VOCAB, (3, 8))
            cached.reveal(reveal, proposal)
            fresh.reveal(reveal, proposal)
            torch.testing.assert_close(cached.logits(5), fresh.logits(5), atol=1e-5, rtol=0)
        assert cache.lengths[cache.slots_for(req_ids)].tolist() == [len(c) for c in contexts]
        for c in contexts:
            c.extend(rng.integers(0, VOCAB, size=int(rng.integers(1, 10))))
        if step == 2:  # request b finishes, a new one takes its row
            req_ids[1] = "b2"
            cache.release_all_but(req_ids)
            contexts[1] = list(rng.integers(0, VOCAB, size=30))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drafts_and_q_through_the_cache_equal_drafts_without(temperature):
    d = drafter(steps=2)
    cache = DrafterCache(d.model.config, slots=2, capacity=120, dtype=torch.float32)
    rng = np.random.default_rng(1)
    contexts = [list(rng.integers(0, VOCAB, size=n)) for n in (5, 33)]
    temps = [temperature] * 2
    for _ in range(3):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        plain = d.draft(contexts, 6, temps, gens)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        args = CachedCanvasArgs(cache, cache.slots_for(["x", "y"]), True, None)
        through = d.draft(contexts, 6, temps, gens, cached=args)
        assert through.tokens.tolist() == plain.tokens.tolist()
        if temperature:
            torch.testing.assert_close(through.probs, plain.probs, atol=1e-5, rtol=0)
        for c, toks in zip(contexts, plain.tokens.tolist()):
            c.extend(toks[:2] + [7])  # two accepted, one target token


def test_slots_are_given_back_and_exhaustion_is_an_error():
    d = drafter()
    cache = DrafterCache(d.model.config, slots=2, capacity=16, dtype=torch.float32)
    cache.slots_for(["a", "b"])
    assert cache.slots_in_use == 2
    with pytest.raises(DrafterCacheError, match="all 2 slots are in use"):
        cache.slots_for(["c"])
    cache.release(["a"])
    cache.release_all_but(["c"])
    assert cache.slots_in_use == 0
    cache.slots_for(["c"])
    assert cache.slots_in_use == 1


def test_a_context_longer_than_the_cache_keeps_its_last_tokens():
    d = drafter(model_length=64)
    cache = DrafterCache(d.model.config, slots=1, capacity=24, dtype=torch.float32)
    rng = np.random.default_rng(2)
    context = list(rng.integers(0, VOCAB, size=20))
    for _ in range(12):  # grows to 20 + 12 * 5 = 80 tokens, past model_length
        args = CachedCanvasArgs(cache, cache.slots_for(["a"]), True, None)
        draft = d.draft([context], 4, [1.0], None, cached=args)
        assert cache.lengths[0] <= 24
        assert cache.ends[0] == len(context)
        assert torch.isfinite(draft.probs).all()
        context.extend(rng.integers(0, VOCAB, size=5))
    n = len(context) - 5  # the last drafting step's context
    assert cache.visible(np.array([0]), np.array([n]), 24).sum() == 24
    assert cache.starts[0] == 0  # never reset: the ring overwrote its oldest columns


@pytest.mark.parametrize("window", [24, 7])
def test_a_ring_that_wraps_drafts_as_a_store_that_never_does(window):
    """Keys live in column (i mod capacity) of a slot; a long context overwrites its
    oldest columns in place. That must change nothing but where keys are stored:
    logits through a full, wrapping ring equal those through a store large enough
    never to wrap, both attending to the last ``window`` tokens. Steps of 1..9 new
    tokens, so the ring wraps at many offsets."""
    d = drafter(model_length=256)
    ring = DrafterCache(d.model.config, slots=2, capacity=window, dtype=torch.float32)
    store = DrafterCache(d.model.config, slots=2, capacity=200, dtype=torch.float32,
                         window=window)
    rng = np.random.default_rng(3)
    contexts = [list(rng.integers(0, VOCAB, size=n)) for n in (3, 30)]
    most_written = 0
    for _ in range(14):
        batch = ContextBatch.of(contexts)
        canvases = [CachedCanvas(d, c, c.slots_for(["a", "b"]), batch, 6, True, None)
                    for c in (ring, store)]
        with torch.inference_mode():
            torch.testing.assert_close(canvases[0].logits(6), canvases[1].logits(6),
                                       atol=1e-5, rtol=0)
        assert ring.lengths.max() <= window
        most_written = max(most_written, int(ring.written.max()))
        for c in contexts:
            c.extend(rng.integers(0, VOCAB, size=int(rng.integers(1, 10))))
    assert most_written > 2 * window  # the ring wrapped (a step of more than `window`
    # new tokens resets a slot instead, as a 7-token window often does here)
    assert store.written.max() <= store.capacity  # the store never did


def test_approximate_cache_refreshes_its_slots():
    d = drafter(attention="bidirectional")
    cache = DrafterCache(d.model.config, slots=1, capacity=100, dtype=torch.float32)
    context = list(range(10))
    starts = []
    for _ in range(5):
        args = CachedCanvasArgs(cache, cache.slots_for(["a"]), False, 2)
        d.draft([context], 4, [1.0], None, cached=args)
        starts.append(int(cache.steps_since_encode[0]))
        context.extend([1, 2])
    # refresh every 2 steps: the slot is re-encoded whole on steps 3 and 5
    assert starts == [1, 2, 1, 2, 1]


def test_a_cache_that_does_not_fit_is_refused(monkeypatch):
    import vllm_specdiff.drafter_cache as dc

    cfg = drafter().model.config
    monkeypatch.setattr(dc, "available_memory", lambda device: 1 << 20)
    with pytest.raises(DrafterCacheError, match="max_num_seqs"):
        make_drafter_cache(cfg, slots=256, capacity=1000, dtype=torch.float32, device=torch.device("cpu"))
    monkeypatch.setattr(dc, "available_memory", lambda device: 1 << 40)
    cache = make_drafter_cache(cfg, 4, 10, torch.float32, torch.device("cpu"))
    assert cache.nbytes == DrafterCache.nbytes_for(cfg, 4, 10, torch.float32)
