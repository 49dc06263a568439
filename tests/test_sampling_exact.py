"""At temperature 1, specdiff's output distribution is exactly the target's.

End to end through vLLM with the embedded trained pair: N samples of the first
generated tokens of one prompt. Token 1 comes from the prefill; token 2 is the
first token drafts can touch (an accepted draft at position 0, or the residual
draw after a rejection); token 3 is draft position 1 when position 0 was
accepted (drawn in the same left-to-right group as position 0, so it tests that
the diffusion q is the right conditional). The empirical joint distributions of
(t1, t2) and of (t1, t2, t3) are tested against the target's exact
p(t1) p(t2 | t1) p(t3 | t1, t2), computed with transformers, by chi-square
goodness-of-fit tests.

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

    spec = {"method": "specdiff", "model": str(DRAFTER), "num_speculative_tokens": 4,
            "diffusion_steps": 2, "schedule": "left_to_right", "adaptive": False,
            "warmup_tokens": 0}  # every draft from the MDLM, whose q is under test
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


REPETITIVE_PROMPT = "The cat sat on the mat. The dog sat on the mat. The cat sat on the"


def test_ngram_warmup_drafts_are_exact_too():
    """Warm-up tokens drafted by vLLM's n-gram proposer (no q) are verified as
    point masses; the output distribution stays the target's."""
    from vllm import LLM

    from vllm_specdiff.metrics import from_metrics

    spec = {"method": "specdiff", "model": str(DRAFTER), "num_speculative_tokens": 4,
            "adaptive": False, "warmup_tokens": 8, "warmup_method": "ngram"}
    engine = LLM(model=str(TARGET), speculative_config=spec,
                 **engine_kwargs(max_num_seqs=256, enable_prefix_caching=True))
    try:
        samples = sample(engine, prompt=REPETITIVE_PROMPT)
        stats = from_metrics(engine.get_metrics())
    finally:
        close_engine(engine)
    (pvalue, dof), _ = pvalues(samples, REPETITIVE_PROMPT)
    print(f"n-gram warm-up: chi-square p={pvalue:.3g} dof={dof}; {stats.summary()}")
    assert stats.accepted_tokens > 0.02 * NUM_SAMPLES, "n-gram drafts must be accepted at times"
    assert dof >= 5 and pvalue > ALPHA
