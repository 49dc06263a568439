"""At temperature 1, specdiff's output distribution is exactly the target's.

End to end through vLLM with the embedded trained pair: N samples of the first
two generated tokens of one prompt. Token 1 comes from the prefill; token 2 is
the first token drafts can touch (an accepted draft, or the residual draw after
a rejection). The empirical joint distribution of (token 1, token 2) is tested
against the target's exact p(t1) p(t2 | t1), computed with transformers, by a
chi-square goodness-of-fit test.

Threshold: the test fails when the chi-square p-value is below ALPHA = 1e-3 (a
correct sampler fails once in a thousand runs). The negative control hands the
verifier a wrong q (the draft distribution at another temperature than the one
the drafts were drawn from) and must be rejected at p < 1e-6.
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import DRAFTER, TARGET, close_engine, engine_kwargs

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, there was a little"
NUM_SAMPLES = 6000
ALPHA = 1e-3
MIN_EXPECTED = 5.0


def exact_joint(prompt: str, first_tokens) -> dict[tuple[int, int], float]:
    """p(t1) * p(t2 | t1) for every t1 in first_tokens and every t2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TARGET))
    model = AutoModelForCausalLM.from_pretrained(str(TARGET), dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        p1 = torch.softmax(model(ids).logits[0, -1].double(), -1)
        firsts = sorted(first_tokens)
        batch = torch.cat([ids.repeat(len(firsts), 1), torch.tensor(firsts)[:, None]], dim=1)
        p2 = torch.softmax(model(batch).logits[:, -1].double(), -1)
    joint = {}
    for row, t1 in enumerate(firsts):
        for t2 in torch.nonzero(p2[row] > 1e-12).flatten().tolist():
            joint[(t1, t2)] = float(p1[t1] * p2[row, t2])
    return joint


def chi_square_pvalue(counts: collections.Counter, probs: dict, n: int) -> tuple[float, int]:
    """Cells with expected count >= MIN_EXPECTED stand alone; the rest (and all
    mass of t1 values never observed) is pooled into one 'other' cell."""
    stat, cells = 0.0, 0
    other_obs, other_exp = n, n * 1.0
    for cell, p in probs.items():
        expected = n * p
        if expected >= MIN_EXPECTED:
            observed = counts.get(cell, 0)
            stat += (observed - expected) ** 2 / expected
            other_obs -= observed
            other_exp -= expected
            cells += 1
    if other_exp >= MIN_EXPECTED:
        stat += (other_obs - other_exp) ** 2 / other_exp
        cells += 1
    dof = cells - 1
    pvalue = float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                           torch.tensor(stat / 2.0, dtype=torch.float64)))
    return pvalue, dof


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM

    spec = {"method": "specdiff", "model": str(DRAFTER), "num_speculative_tokens": 4,
            "diffusion_steps": 2, "schedule": "left_to_right", "adaptive": False}
    engine = LLM(model=str(TARGET), speculative_config=spec,
                 **engine_kwargs(max_num_seqs=256, enable_prefix_caching=True))
    yield engine
    close_engine(engine)


def sample_pairs(llm, n=NUM_SAMPLES) -> collections.Counter:
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True)
    outs = llm.generate([PROMPT] * n, params, use_tqdm=False)
    return collections.Counter(tuple(o.outputs[0].token_ids[:2]) for o in outs)


def test_second_token_distribution_is_exactly_the_targets(llm):
    from vllm_specdiff.metrics import from_metrics

    before = from_metrics(llm.get_metrics())
    counts = sample_pairs(llm)
    stats = from_metrics(llm.get_metrics()) - before
    probs = exact_joint(PROMPT, {t1 for t1, _ in counts})
    pvalue, dof = chi_square_pvalue(counts, probs, NUM_SAMPLES)
    print(f"chi-square p={pvalue:.3g} dof={dof}; {stats.summary()}")
    assert dof >= 10, "too few cells: the test would not be sensitive"
    assert stats.accepted_tokens > 0.1 * NUM_SAMPLES, "drafts must be accepted often for the test to mean something"
    assert pvalue > ALPHA


def test_wrong_draft_probabilities_are_detected(llm, monkeypatch):
    """Negative control: q reported at temperature 0.5 while drafts are drawn at 1."""
    from vllm_specdiff.drafter import DiffusionDrafter

    original = DiffusionDrafter.draft

    def draft_with_wrong_q(self, *args, **kwargs):
        draft = original(self, *args, **kwargs)
        draft.probs = torch.softmax(torch.log(draft.probs.clamp_min(1e-30)) / 0.5, dim=-1)
        return draft

    monkeypatch.setattr(DiffusionDrafter, "draft", draft_with_wrong_q)
    counts = sample_pairs(llm)
    probs = exact_joint(PROMPT, {t1 for t1, _ in counts})
    pvalue, dof = chi_square_pvalue(counts, probs, NUM_SAMPLES)
    print(f"wrong q: chi-square p={pvalue:.3g} dof={dof}")
    assert pvalue < 1e-6
