"""At temperature 1, specdiff's output distribution is exactly the target's.

End to end through vLLM with the embedded trained pair: N samples of the first
generated tokens of one prompt. Token 1 comes from the prefill; token 2 is the
first token drafts can touch (an accepted draft at position 0, or the residual
draw after a rejection); token 3 is draft position 1 when position 0 was
accepted (drawn in the same left-to-right group as position 0, so it tests that
the diffusion q is the right conditional). The empirical joint distributions of
(t1, t2) and of (t1, t2, t3) are tested against the target's exact
p(t1) p(t2 | t1) p(t3 | t1, t2), computed with transformers, by chi-square
goodness-of-fit tests. The engine drafts gamma = 2 tokens in T = 2 denoising steps, so
draft position 1 (token 3) comes from the second denoising group: its q is the
conditional given the revealed first token.

One batch also mixes greedy, seeded and sampled requests at different temperatures
and top-p; each group is tested on its own (a per-request setting applied to the
wrong rows fails it, shown by a negative control).

Threshold: the test fails when the chi-square p-value is below ALPHA = 1e-3 (a
correct sampler fails once in a thousand runs). The negative control hands the
verifier a wrong q (the draft distribution sharpened to temperature 0.3 while
the drafts are drawn at 1) and must be rejected with a margin: p < ALPHA / 100.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DRAFTER, TARGET, close_engine, engine_kwargs
from exactness import ALPHA, NUM_SAMPLES, PROMPT, pvalues

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def llm():
    from vllm import LLM

    spec = {"method": "specdiff", "model": str(DRAFTER), "num_speculative_tokens": 2,
            "diffusion_steps": 2, "schedule": "left_to_right", "adaptive": False,
            "warmup_tokens": 0, "prompt_lookup_min": 0}  # every draft from the MDLM, whose q is under test
    engine = LLM(model=str(TARGET), speculative_config=spec,
                 **engine_kwargs(max_num_seqs=256, enable_prefix_caching=True))
    yield engine
    close_engine(engine)


def sample(llm, n=NUM_SAMPLES, prompt=PROMPT) -> list[tuple[int, ...]]:
    """First three generated tokens of n samples. max_tokens=4 leaves room for two
    drafts after token 1, so draft positions 0 and 1 are both verified."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    return [tuple(o.outputs[0].token_ids[:3]) for o in outs]


def test_token_distribution_is_exactly_the_targets(llm):
    from vllm_specdiff.metrics import from_metrics

    before = from_metrics(llm.get_metrics())
    samples = sample(llm)
    stats = from_metrics(llm.get_metrics()) - before
    results = pvalues(samples)
    print(f"chi-square (t1,t2) p={results[0][0]:.3g} dof={results[0][1]}; "
          f"(t1,t2,t3) p={results[1][0]:.3g} dof={results[1][1]}; {stats.summary()}")
    assert stats.accepted_tokens > 0.1 * NUM_SAMPLES, "drafts must be accepted often for the test to mean something"
    assert stats.accepted_per_position[1] > 0.05 * NUM_SAMPLES, "draft position 1 must be exercised"
    for pvalue, dof in results:
        assert dof >= 10, "too few cells: the test would not be sensitive"
        assert pvalue > ALPHA


def test_wrong_draft_probabilities_are_detected(llm, monkeypatch):
    """Negative control: q reported at temperature 0.3 while drafts are drawn at 1."""
    from vllm_specdiff.drafter import DiffusionDrafter

    original = DiffusionDrafter.draft

    def draft_with_wrong_q(self, *args, **kwargs):
        draft = original(self, *args, **kwargs)
        draft.probs = torch.softmax(torch.log(draft.probs.clamp_min(1e-30)) / 0.3, dim=-1)
        return draft

    monkeypatch.setattr(DiffusionDrafter, "draft", draft_with_wrong_q)
    (pvalue, dof), _ = pvalues(sample(llm))
    print(f"wrong q: (t1,t2) chi-square p={pvalue:.3g} dof={dof}")
    assert pvalue < ALPHA / 100


# (name, temperature, top_p, seeded, requests, tested prefixes): one batch, interleaved.
# Flatter distributions spread (t1, t2, t3) over too many cells for their sample count.
GROUPS = [("t0.7 top-p 0.9", 0.7, 0.9, False, 3000, (2, 3)), ("t1.3", 1.3, 1.0, False, 3000, (2,)),
          ("t1 seeded", 1.0, 1.0, True, 1500, (2,)), ("greedy", 0.0, 1.0, False, 200, ())]


def sample_mixed(llm) -> dict[str, list[tuple[int, ...]]]:
    from vllm import SamplingParams

    params, names = [], []
    longest = max(g[4] for g in GROUPS)
    for i in range(longest):
        for name, temperature, top_p, seeded, n, _ in GROUPS:
            if i < n:
                params.append(SamplingParams(temperature=temperature, top_p=top_p, max_tokens=4,
                                             ignore_eos=True, seed=1000 + i if seeded else None))
                names.append(name)
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    by_group = {g[0]: [] for g in GROUPS}
    for name, o in zip(names, outs):
        by_group[name].append(tuple(o.outputs[0].token_ids[:3]))
    return by_group


def greedy_continuation(k: int) -> tuple[int, ...]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TARGET))
    model = AutoModelForCausalLM.from_pretrained(str(TARGET), dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=k, do_sample=False)
    return tuple(out[0, ids.shape[1]:].tolist())


def group_pvalues(by_group) -> dict[str, list[tuple[float, int]]]:
    out = {}
    for name, temperature, top_p, _, _, depths in GROUPS:
        if temperature > 0:
            out[name] = pvalues(by_group[name], temperature=temperature, top_p=top_p, depths=depths)
    return out


def test_mixed_batch_each_group_follows_its_own_settings(llm):
    by_group = sample_mixed(llm)
    assert set(by_group["greedy"]) == {greedy_continuation(3)}
    for name, results in group_pvalues(by_group).items():
        print(f"{name}: " + "; ".join(f"p={p:.3g} dof={d}" for p, d in results))
        for pvalue, dof in results:
            assert dof >= 5, f"{name}: too few cells"
            assert pvalue > ALPHA, name


def test_mixed_batch_negative_control_one_temperature_for_all_rows(llm, monkeypatch):
    """The verifier's per-request temperature expansion replaced by the first
    request's temperature for every row: the 1.3 group is then verified at 0.7 and
    its chi-square test must fail."""
    from dataclasses import replace

    from vllm.v1.sample import rejection_sampler

    original = rejection_sampler.apply_sampling_constraints

    def one_temperature(logits, cu_num_draft_tokens, sampling_metadata):
        t = sampling_metadata.temperature
        if t is not None and t.numel():
            sampling_metadata = replace(sampling_metadata, temperature=t[:1].expand_as(t).clone())
        return original(logits, cu_num_draft_tokens, sampling_metadata)

    monkeypatch.setattr(rejection_sampler, "apply_sampling_constraints", one_temperature)
    results = group_pvalues(sample_mixed(llm))
    print("one temperature for all rows: " + "; ".join(
        f"{name} p={r[0][0]:.3g}" for name, r in results.items()))
    assert min(p for r in results.values() for p, _ in r) < ALPHA / 100


REPETITIVE_PROMPT = "The cat sat on the mat. The dog sat on the mat. The cat sat on the"


POINT_MASS_SOURCES = {
    # a request's first tokens drafted by vLLM's n-gram proposer
    "warmup": {"warmup_tokens": 8, "warmup_method": "ngram"},
    # rows whose last 2+ tokens recur in their context copy from it; the others draft
    # with the MDLM (q) in the same batch
    "lookup": {"warmup_tokens": 0, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
}


@pytest.mark.parametrize("source", sorted(POINT_MASS_SOURCES))
def test_ngram_drafts_are_exact_too(source):
    """Drafts copied by vLLM's n-gram proposer (no q) are verified as point masses;
    the output distribution stays the target's."""
    from vllm import LLM

    from vllm_specdiff.metrics import from_metrics

    spec = {"method": "specdiff", "model": str(DRAFTER), "num_speculative_tokens": 4,
            "adaptive": False, "prompt_lookup_min": 0, **POINT_MASS_SOURCES[source]}
    engine = LLM(model=str(TARGET), speculative_config=spec,
                 **engine_kwargs(max_num_seqs=256, enable_prefix_caching=True))
    try:
        samples = sample(engine, prompt=REPETITIVE_PROMPT)
        stats = from_metrics(engine.get_metrics())
        rows = engine.llm_engine.model_executor.driver_worker.worker.model_runner.drafter.rows_drafted
    finally:
        close_engine(engine)
    (pvalue, dof), _ = pvalues(samples, REPETITIVE_PROMPT)
    print(f"n-gram {source}: chi-square p={pvalue:.3g} dof={dof}; {stats.summary()}; rows {dict(rows)}")
    assert stats.accepted_tokens > 0.02 * NUM_SAMPLES, "n-gram drafts must be accepted at times"
    assert rows[source] > 0.02 * NUM_SAMPLES
    if source == "lookup":
        assert rows["mdlm"] > 0.02 * NUM_SAMPLES, "the batch must mix copied and MDLM rows"
    assert dof >= 5 and pvalue > ALPHA
