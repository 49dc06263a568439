"""Fast unit tests (no engine): settings, schedules, adaptive gamma, verifier glue."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_specdiff.adaptive import AdaptiveGamma
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


def test_settings_round_trip_through_json():
    cfg = SpecDiffConfig.from_user({"method": "specdiff", "model": "x", "num_speculative_tokens": 12,
                                    "diffusion_steps": 3, "schedule": "random"})
    assert SpecDiffConfig.from_json(cfg.to_json()) == cfg
    assert cfg.gamma == 12


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

def run_steps(a: AdaptiveGamma, batch: int, tokens_per_second: dict, steps: int) -> list[int]:
    """Drive the controller with a fixed goodput per arm; return its choices."""
    choices = []
    for _ in range(steps):
        k = a.next_gamma(batch)
        choices.append(k)
        a.observe_step(batch, k, tokens=int(tokens_per_second[k]), seconds=1.0)
    return choices


def test_arms_cover_off_powers_of_two_and_gamma():
    assert AdaptiveGamma(8).arms == [0, 1, 2, 4, 8]
    assert AdaptiveGamma(6).arms == [0, 1, 2, 4, 6]


def test_adaptive_gamma_settles_on_the_fastest_arm_per_batch_bucket():
    a = AdaptiveGamma(8, probe_every=4)
    fast_at_1 = {0: 400, 1: 500, 2: 600, 4: 700, 8: 900}
    fast_at_32 = {0: 700, 1: 760, 2: 720, 4: 600, 8: 450}
    assert run_steps(a, 1, fast_at_1, 40)[-12:].count(8) >= 9
    # a new bucket starts from its neighbour's best arm, then finds its own
    at_32 = run_steps(a, 32, fast_at_32, 80)
    assert at_32[:2] == [8, 8] and at_32[-12:].count(1) >= 9
    assert a.next_gamma(1) in (8, 0, 1, 2, 4)
    assert max(a.goodput[0], key=lambda k: a.goodput[0][k][0]) == 8  # kept per bucket


def test_adaptive_gamma_stops_drafting_when_it_cannot_pay_and_probes_later():
    a = AdaptiveGamma(8, probe_every=10)
    slow_drafts = {0: 1000, 1: 800, 2: 700, 4: 500, 8: 300}
    choices = run_steps(a, 32, slow_drafts, 60)
    tail = choices[20:]
    assert tail.count(0) >= 0.8 * len(tail)
    assert any(k != 0 for k in tail)  # still re-measures the alternatives


def test_adaptive_gamma_follows_a_change_in_traffic():
    a = AdaptiveGamma(8, probe_every=4)
    run_steps(a, 1, {0: 400, 1: 500, 2: 600, 4: 700, 8: 900}, 40)
    after = run_steps(a, 1, {0: 900, 1: 500, 2: 400, 4: 300, 8: 200}, 80)
    assert after[-8:].count(0) >= 6


def test_idle_gaps_are_not_measured_as_steps():
    a = AdaptiveGamma(8)
    a.observe_step(1, 8, tokens=4, seconds=0.01)
    a.observe_step(1, 8, tokens=4, seconds=30.0)  # the engine sat idle in between
    assert a.goodput[0][8][0] == 400.0


def test_adaptive_gamma_disabled_is_fixed():
    a = AdaptiveGamma(8, enabled=False)
    assert a.next_gamma(batch=64) == 8


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
