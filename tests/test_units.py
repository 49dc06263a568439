"""Fast unit tests (no engine): settings, schedules, adaptive gamma, verifier glue."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_specdiff.adaptive import AdaptiveDraftLength, StepOutcome
from vllm_specdiff.config import SpecDiffConfig, SpecDiffConfigError
from vllm_specdiff.schedules import group_sizes, is_exact, reveal_mask

# -- settings ------------------------------------------------------------------

BAD_SETTINGS = [
    ({"num_speculative_tokens": 0}, "num_speculative_tokens", "[1, 64]"),
    ({"num_speculative_tokens": 65}, "num_speculative_tokens", "[1, 64]"),
    ({"num_speculative_tokens": 4, "diffusion_steps": 0}, "diffusion_steps", "[1, num_speculative_tokens=4]"),
    ({"num_speculative_tokens": 4, "diffusion_steps": 5}, "diffusion_steps", "[1, num_speculative_tokens=4]"),
    ({"schedule": "spiral"}, "schedule", "left_to_right"),
    ({"context_window": 0}, "context_window", ">= 1"),
    ({"drafter_dtype": "int8"}, "drafter_dtype", "bfloat16"),
    ({"draft_temperature": -1}, "draft_temperature", "[0, 10]"),
    ({"warmup_method": "eagle"}, "warmup_method", "ngram"),
    ({"diffusion_stepz": 2}, "unknown setting", "diffusion_steps"),
]


@pytest.mark.parametrize("settings,name,allowed", BAD_SETTINGS)
def test_bad_setting_names_setting_and_range(settings, name, allowed):
    with pytest.raises(SpecDiffConfigError) as err:
        SpecDiffConfig.from_user({"method": "specdiff", **settings})
    assert name in str(err.value) and allowed in str(err.value)


def test_settings_are_validated_once_and_travel_as_the_object():
    """The validated object goes into vLLM's additional_config as is: vLLM hashes that
    dict with json.dumps and pickles it to the workers."""
    import pickle

    cfg = SpecDiffConfig.from_user({"method": "specdiff", "num_speculative_tokens": 4,
                                    "diffusion_steps": 2, "draft_temperature": None})
    assert cfg.gamma == 4 and cfg.draft_temperature is None
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    json.dumps({"specdiff": cfg}, sort_keys=True)  # vLLM's compute_hash


# -- schedules -------------------------------------------------------------------

def test_group_sizes_cover_gamma():
    assert group_sizes(10, 4) == [3, 3, 2, 2]
    assert sum(group_sizes(7, 7)) == 7


@pytest.mark.parametrize("schedule", ["left_to_right", "random", "confidence"])
def test_every_schedule_reveals_each_position_once(schedule):
    torch.manual_seed(0)
    B, gamma, T = 3, 9, 4
    masked = torch.ones(B, gamma, dtype=torch.bool)
    seen = torch.zeros(B, gamma, dtype=torch.int64)
    for step in range(T):
        reveal = reveal_mask(schedule, step, T, masked, torch.rand(B, gamma), torch.rand(B, gamma))
        assert not (reveal & ~masked).any()
        seen += reveal.long()
        masked &= ~reveal
    assert (seen == 1).all()


def test_left_to_right_reveals_in_order():
    masked = torch.ones(1, 6, dtype=torch.bool)
    order = []
    for step in range(3):
        reveal = reveal_mask("left_to_right", step, 3, masked, torch.rand(1, 6))
        order.append(reveal[0].nonzero().flatten().tolist())
        masked &= ~reveal
    assert order == [[0, 1], [2, 3], [4, 5]]


def test_exactness_flags():
    assert is_exact("left_to_right", 4)
    assert is_exact("random", 1) and is_exact("confidence", 1)
    assert not is_exact("random", 2) and not is_exact("confidence", 3)


# -- adaptive gamma ----------------------------------------------------------------

def run_steps(a: AdaptiveDraftLength, batch: int, tokens_per_second: dict, steps: int) -> list[int]:
    """Drive the controller with a fixed goodput per draft length; return its choices."""
    choices = []
    for _ in range(steps):
        n = a.next_draft_len(batch)
        choices.append(n)
        a.observe(StepOutcome(batch, n, tokens=int(tokens_per_second[n]), seconds=1.0))
    return choices


def test_candidates_are_off_powers_of_two_and_gamma():
    assert AdaptiveDraftLength(8).draft_lens == [0, 1, 2, 4, 8]
    assert AdaptiveDraftLength(6).draft_lens == [0, 1, 2, 4, 6]


def test_adaptive_settles_on_the_fastest_draft_length_per_batch_bucket():
    a = AdaptiveDraftLength(8, probe_every=4)
    fast_at_1 = {0: 400, 1: 500, 2: 600, 4: 700, 8: 900}
    fast_at_32 = {0: 700, 1: 760, 2: 720, 4: 600, 8: 450}
    assert run_steps(a, 1, fast_at_1, 40)[-12:].count(8) >= 9
    # a new bucket starts from its neighbour's best draft length, then finds its own
    at_32 = run_steps(a, 32, fast_at_32, 80)
    assert at_32[:2] == [8, 8] and at_32[-12:].count(1) >= 9
    assert a.next_draft_len(1) in (8, 0, 1, 2, 4)
    assert max(a.goodput[0], key=lambda n: a.goodput[0][n][0]) == 8  # kept per bucket


def test_adaptive_stops_drafting_when_it_cannot_pay_and_probes_later():
    a = AdaptiveDraftLength(8, probe_every=10)
    slow_drafts = {0: 1000, 1: 800, 2: 700, 4: 500, 8: 300}
    choices = run_steps(a, 32, slow_drafts, 60)
    tail = choices[20:]
    assert tail.count(0) >= 0.8 * len(tail)
    assert any(n != 0 for n in tail)  # still re-measures the alternatives


def test_adaptive_follows_a_change_in_traffic():
    a = AdaptiveDraftLength(8, probe_every=4)
    run_steps(a, 1, {0: 400, 1: 500, 2: 600, 4: 700, 8: 900}, 40)
    after = run_steps(a, 1, {0: 900, 1: 500, 2: 400, 4: 300, 8: 200}, 80)
    assert after[-8:].count(0) >= 6


def test_idle_gaps_are_not_measured_as_steps():
    a = AdaptiveDraftLength(8)
    a.observe(StepOutcome(1, 8, tokens=4, seconds=0.01))
    a.observe(StepOutcome(1, 8, tokens=4, seconds=30.0))  # the engine sat idle in between
    assert a.goodput[0][8][0] == 400.0


def test_acceptance_for_the_logs_comes_from_the_step_outcomes():
    a = AdaptiveDraftLength(8)
    for _ in range(100):
        a.observe(StepOutcome(batch=2, draft_len=4, tokens=2 + 4, seconds=0.01))  # half accepted
    assert abs(a.acceptance - 0.5) < 1e-3


def test_adaptive_disabled_is_fixed():
    a = AdaptiveDraftLength(8, enabled=False)
    assert a.next_draft_len(batch=64) == 8


# -- verifier glue -------------------------------------------------------------------

def test_placeholder_drafts_end_the_walk_with_a_target_token():
    """vLLM may pass -1 placeholder drafts; the walk stops there with the target's
    own choice (argmax when greedy), as plain decoding would."""
    from vllm_specdiff.kernels.fused_verify import verify
    from vllm_specdiff.verification import _resample_at_invalid_drafts

    torch.manual_seed(0)
    rows = torch.randn(8, 20)
    rows[0, 5] = 100.0  # request 0 accepts its first draft
    ids = torch.tensor([5, -1, 7, 1, 2, 3])
    cu, greedy = torch.tensor([0, 3, 6]), torch.tensor([True, True])
    invalid = ids < 0
    out, acc = verify(rows, torch.where(invalid, 0, ids), None, cu, greedy,
                      torch.rand(6, dtype=torch.float64), torch.rand(2, dtype=torch.float64), 3,
                      bonus_token_ids=torch.tensor([9, 9]))
    _resample_at_invalid_drafts(out, acc, invalid, rows, cu, greedy,
                                torch.rand(2, dtype=torch.float64))
    assert out[0].tolist() == [5, int(rows[1].argmax()), -1, -1] and int(acc[0]) == 1
