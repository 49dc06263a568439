"""Fast unit tests (no engine): settings, schedules, drafter, loader, adaptive gamma."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_specdiff.adaptive import AdaptiveGamma
from vllm_specdiff.config import SpecDiffConfig, SpecDiffConfigError
from vllm_specdiff.drafter import DiffusionDrafter
from vllm_specdiff.loader import (DrafterNotFoundError, load_mdlm, read_config,
                                  resolve_drafter, save_mdlm)
from vllm_specdiff.model import MDLM, MDLMConfig
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
        reveal = reveal_mask(schedule, step, T, masked, torch.rand(B, gamma))
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


# -- model, loader, drafter ------------------------------------------------------

def small_mdlm(vocab=101, seed=0) -> MDLM:
    torch.manual_seed(seed)
    m = MDLM(MDLMConfig(vocab_size=vocab, model_length=128, hidden_dim=32, cond_dim=16,
                        n_blocks=2, n_heads=2, dropout=0.0))
    for p in m.parameters():  # leave adaLN-Zero's identity start, so outputs vary
        p.data.add_(0.05 * torch.randn_like(p))
    return m.eval()


MDLM_OWT_NAMES = [
    "backbone.vocab_embed.embedding", "backbone.sigma_map.mlp.0.weight",
    "backbone.sigma_map.mlp.0.bias", "backbone.sigma_map.mlp.2.weight",
    "backbone.sigma_map.mlp.2.bias", "backbone.rotary_emb.inv_freq",
    "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn_qkv.weight",
    "backbone.blocks.0.attn_out.weight", "backbone.blocks.0.norm2.weight",
    "backbone.blocks.0.mlp.0.weight", "backbone.blocks.0.mlp.0.bias",
    "backbone.blocks.0.mlp.2.weight", "backbone.blocks.0.mlp.2.bias",
    "backbone.blocks.0.adaLN_modulation.weight", "backbone.blocks.0.adaLN_modulation.bias",
    "backbone.output_layer.norm_final.weight", "backbone.output_layer.linear.weight",
    "backbone.output_layer.linear.bias", "backbone.output_layer.adaLN_modulation.weight",
    "backbone.output_layer.adaLN_modulation.bias",
]


def test_mdlm_owt_layout_round_trip(tmp_path):
    from safetensors import safe_open

    m = small_mdlm()
    save_mdlm(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ["vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks",
                "n_heads", "dropout", "time_conditioning"]:
        assert key in cfg
    assert cfg["model_type"] == "mdlm"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert set(MDLM_OWT_NAMES) <= names
    assert (tmp_path / "model.safetensors").exists()
    loaded = load_mdlm(tmp_path)
    ids = torch.randint(0, 100, (2, 17))
    torch.testing.assert_close(loaded(ids), m(ids))
    assert read_config(tmp_path).mask_token_id == 100


def test_drafts_do_not_depend_on_batch_neighbours():
    """Padding is masked: a row drafts the same alone and beside longer rows."""
    drafter = DiffusionDrafter(small_mdlm(), steps=2, schedule="left_to_right", context_window=32)
    contexts = [[5, 6, 7], list(range(1, 40)), [9]]
    temps = [0.0, 1.0, 0.5]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    together = drafter.draft(contexts, gamma=6, temperatures=temps, generators=gens())
    for i, ctx in enumerate(contexts):
        alone = drafter.draft([ctx], gamma=6, temperatures=[temps[i]], generators=[gens()[i]])
        if alone.probs is None:  # greedy alone: compare with a greedy twin below
            alone = drafter.draft([ctx, ctx], gamma=6, temperatures=[0.0, 1.0])
        assert alone.tokens[0].tolist() == together.tokens[i].tolist()
        torch.testing.assert_close(alone.probs[0], together.probs[i], atol=1e-5, rtol=1e-4)


def test_context_longer_than_window_is_cut_not_an_error():
    drafter = DiffusionDrafter(small_mdlm(), steps=2, schedule="left_to_right", context_window=8)
    long_ctx = list(range(1, 100)) * 3
    a = drafter.draft([long_ctx], gamma=4)
    b = drafter.draft([long_ctx[-8:]], gamma=4)
    assert a.tokens.tolist() == b.tokens.tolist()


def test_all_greedy_batch_skips_q():
    drafter = DiffusionDrafter(small_mdlm(), steps=2, schedule="confidence", context_window=16)
    d = drafter.draft([[1, 2, 3], [4, 5]], gamma=5)
    assert d.probs is None and d.drafted_greedily.all()
    mixed = drafter.draft([[1, 2, 3], [4, 5]], gamma=5, temperatures=[0.0, 0.0001])
    assert mixed.tokens[0].tolist() == d.tokens[0].tolist()


def test_draft_probs_are_distributions_over_target_vocab_and_match_tokens():
    drafter = DiffusionDrafter(small_mdlm(), steps=3, schedule="left_to_right", context_window=16)
    d = drafter.draft([[1, 2, 3], [4, 5]], gamma=5, temperatures=[0.0, 1.0])
    assert d.probs.shape == (2, 5, 100)  # mask column dropped
    torch.testing.assert_close(d.probs.sum(-1), torch.ones(2, 5))
    assert (d.tokens < 100).all()
    # greedy row drafts the argmax of the q it reports
    assert d.tokens[0].tolist() == d.probs[0].argmax(-1).tolist()
    assert d.drafted_greedily.tolist() == [True, False]
    assert d.forward_passes == 3


def test_seeded_drafts_are_reproducible():
    drafter = DiffusionDrafter(small_mdlm(), steps=2, schedule="left_to_right", context_window=16)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        runs.append(drafter.draft([[1, 2, 3]], gamma=6, temperatures=[1.0], generators=[g]).tokens)
    assert torch.equal(runs[0], runs[1])


def test_left_to_right_sampling_draws_from_reported_q():
    """Each sampled token's frequency matches the q reported for it (T = gamma = 1)."""
    drafter = DiffusionDrafter(small_mdlm(vocab=9), steps=1, schedule="left_to_right",
                               context_window=8)
    ctx = [[1, 2, 3]] * 4000
    d = drafter.draft(ctx, gamma=1, temperatures=[1.0] * 4000)
    q = d.probs[0, 0]
    freq = torch.bincount(d.tokens[:, 0], minlength=8).float() / 4000
    assert (freq - q).abs().max() < 0.04


def test_resolve_drafter_errors_are_clear(tmp_path):
    with pytest.raises(DrafterNotFoundError, match="no such folder"):
        resolve_drafter(str(tmp_path / "missing"), target=str(tmp_path))
    with pytest.raises(DrafterNotFoundError, match="no MDLM drafter found for target"):
        resolve_drafter("mdlm", target=str(tmp_path))
    save_mdlm(small_mdlm(), tmp_path / "d")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "specdiff.json").write_text('{"drafter": "../d"}')
    assert resolve_drafter("mdlm", target=str(tmp_path / "t")) == str((tmp_path / "d").resolve())


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
