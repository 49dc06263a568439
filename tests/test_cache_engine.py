"""The drafter cache inside vLLM: exact output with long prompts and preemption, the
target's distribution when sampling, and no slot left behind by finished or aborted
requests. Drafter: the embedded block-causal MDLM (exact cache)."""

from __future__ import annotations

import pytest
from conftest import (BLOCK_CAUSAL_DRAFTER, PROMPTS, TARGET, close_engine, engine_kwargs,
                      greedy_token_ids)
from exactness import ALPHA, NUM_SAMPLES, pvalues

pytestmark = pytest.mark.slow

MAX_TOKENS = 48
SPEC = {"method": "specdiff", "model": str(BLOCK_CAUSAL_DRAFTER), "num_speculative_tokens": 8,
        "context_window": None,  # the whole context, in the cache
        "prompt_lookup_min": 0}  # every draft from the MDLM, through the cache
# Prompts of 200+ tokens (the whole context is in the cache) beside short ones.
LONG_PROMPTS = [" ".join((PROMPTS * 2)[i:i + 22]) for i in range(0, 8, 2)]
ALL_PROMPTS = [p for pair in zip(LONG_PROMPTS, PROMPTS[:4]) for p in pair] + PROMPTS[4:8]
# Room for one long request and a few short ones: as they grow, vLLM must preempt.
SMALL_KV_CACHE = 4 << 20
SHORT_MODEL_LEN = 320  # the longest prompt + MAX_TOKENS + gamma fits


def greedy(llm):
    return greedy_token_ids(llm, ALL_PROMPTS, MAX_TOKENS)


def proposer(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.drafter


def counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


@pytest.fixture(scope="module")
def reference():
    from vllm import LLM

    llm = LLM(model=str(TARGET), **engine_kwargs(max_num_seqs=16))
    try:
        yield greedy(llm)
    finally:
        close_engine(llm)


def test_long_prompts_and_preemption_keep_greedy_output_exact(reference, monkeypatch):
    from vllm import LLM

    from vllm_specdiff.metrics import from_metrics

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TARGET))
    assert min(len(tokenizer(p).input_ids) for p in LONG_PROMPTS) > 200
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "")  # it would override kv_cache_memory_bytes
    llm = LLM(model=str(TARGET), speculative_config=SPEC,
              **engine_kwargs(max_num_seqs=4, kv_cache_memory_bytes=SMALL_KV_CACHE,
                              max_model_len=SHORT_MODEL_LEN))
    try:
        outputs = greedy(llm)
        stats = from_metrics(llm.get_metrics())
        preemptions = counter(llm, "vllm:num_preemptions")
        cache = proposer(llm).cache
        assert cache is not None and proposer(llm).exact_cache
    finally:
        close_engine(llm)
    for prompt, ref, out in zip(ALL_PROMPTS, reference, outputs):
        assert out == ref, f"differs for prompt {prompt[:40]!r}"
    assert preemptions > 0, "the small KV cache must force preemption for this test to mean something"
    assert stats.accepted_tokens > 0
    print(f"preemptions {preemptions:.0f}; {stats.summary()}")


@pytest.fixture(scope="module")
def sampler():
    from vllm import LLM

    spec = {**SPEC, "num_speculative_tokens": 2, "diffusion_steps": 2, "adaptive": False,
            "warmup_tokens": 0}
    llm = LLM(model=str(TARGET), speculative_config=spec,
              **engine_kwargs(max_num_seqs=256, enable_prefix_caching=True))
    yield llm
    close_engine(llm)


def test_sampling_through_the_cache_is_exact_with_a_long_prompt(sampler):
    from vllm import SamplingParams

    from vllm_specdiff.metrics import from_metrics

    prompt = LONG_PROMPTS[0]
    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
    before = from_metrics(sampler.get_metrics())
    outs = sampler.generate([prompt] * NUM_SAMPLES, params, use_tqdm=False)
    stats = from_metrics(sampler.get_metrics()) - before
    samples = [tuple(o.outputs[0].token_ids[:3]) for o in outs]
    results = pvalues(samples, prompt=prompt)
    print(f"long prompt: chi-square {results}; {stats.summary()}")
    assert stats.accepted_tokens > 0.1 * NUM_SAMPLES
    assert stats.accepted_per_position[1] > 0.02 * NUM_SAMPLES
    for pvalue, dof in results:
        assert dof >= 10 and pvalue > ALPHA


def test_finished_and_aborted_requests_give_their_slots_back(sampler):
    """200 requests, every fifth aborted mid-generation: once the engine is idle,
    no slot is in use."""
    from vllm import SamplingParams

    engine = sampler.llm_engine
    cache = proposer(sampler).cache
    for i in range(200):
        params = SamplingParams(temperature=0.0 if i % 2 else 1.0, max_tokens=8 + i % 24,
                                ignore_eos=True)
        engine.add_request(f"leak-{i}", ALL_PROMPTS[i % len(ALL_PROMPTS)], params)
    for _ in range(6):
        engine.step()
    assert cache.slots_in_use > 0
    engine.abort_request([f"leak-{i}" for i in range(0, 200, 5)])
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # the step that tells the workers which requests finished
    assert cache.slots_in_use == 0
    assert sorted(cache._free) == list(range(cache.k.shape[1]))
