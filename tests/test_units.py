"""Fast unit tests (no engine): settings, schedules, adaptive gamma, verifier glue."""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch

from vllm_specdiff.adaptive import AdaptiveDraftLength, StepOutcome, bucket_of
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
    ({"drafter_cache": "always"}, "drafter_cache", "approximate"),
    ({"cache_refresh_steps": 0}, "cache_refresh_steps", ">= 1"),
    ({"prompt_lookup_min": -1}, "prompt_lookup_min", ">= 0"),
    ({"prompt_lookup_min": 4, "prompt_lookup_max": 3}, "prompt_lookup_max", "[max(1, prompt_lookup_min=4), 64]"),
    ({"prompt_lookup_max": 0}, "prompt_lookup_max", "[max(1, prompt_lookup_min="),
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

class ScriptedEngine:
    """A fake clock for the controller: a step at batch b and draft length k costs
    ``base + per_request * b * (1 + k) + draft * b * k`` seconds, plus ``fixed`` for any
    drafted step (the drafter's per-pass cost and vLLM's spec bookkeeping), and each request
    accepts its draft positions with the scripted conditional probabilities (drawn
    from a seeded RNG, so every run is the same)."""

    def __init__(self, acceptance, base=3e-3, per_request=1e-4, draft=2e-4, fixed=0.0, seed=0,
                 jitter=0.0, drift=0.0):
        import random

        self.acceptance, self.base, self.per_request, self.draft = acceptance, base, per_request, draft
        self.fixed = fixed
        self.rng = random.Random(seed)
        # Measured step times (not cost()) vary by a log-normal factor: ``jitter`` from
        # step to step, ``drift`` from one stretch of 20 steps to the next (a shared
        # machine's speed changes over seconds, so arms measured at different times
        # disagree by more than their steps do).
        self.jitter, self.drift, self.speed, self.steps = jitter, drift, 1.0, 0

    def cost(self, batch, k):
        return (self.base + self.per_request * batch * (1 + k) + self.draft * batch * k
                + (self.fixed if k else 0.0))

    def expected_goodput(self, batch, k):
        tokens, prefix = 1.0, 1.0
        for i in range(k):
            prefix *= self.acceptance[i]
            tokens += prefix
        return batch * tokens / self.cost(batch, k)

    def best(self, batch, lens):
        return max(lens, key=lambda k: self.expected_goodput(batch, k))

    def step(self, a: AdaptiveDraftLength, batch: int) -> int:
        k = a.next_draft_len(batch)
        accepted = []
        for _ in range(batch):
            n = 0
            while n < k and self.rng.random() < self.acceptance[n]:
                n += 1
            accepted.append(n)
        if self.steps % 20 == 0 and self.drift:
            self.speed = math.exp(self.rng.gauss(0, self.drift))
        self.steps += 1
        seconds = self.cost(batch, k) * self.speed * math.exp(self.rng.gauss(0, self.jitter))
        a.observe(StepOutcome(batch, k, tokens=batch + sum(accepted), seconds=seconds,
                              accepted=tuple(accepted)))
        return k


GOOD_DRAFTER = [0.9, 0.85, 0.8, 0.75, 0.3, 0.2, 0.1, 0.1]


def test_candidates_are_off_powers_of_two_and_gamma():
    assert AdaptiveDraftLength(8).draft_lens == [0, 1, 2, 4, 8]
    assert AdaptiveDraftLength(6).draft_lens == [0, 1, 2, 4, 6]


def test_adaptive_converges_within_a_few_steps_of_a_128_token_run():
    engine = ScriptedEngine(GOOD_DRAFTER)
    a = AdaptiveDraftLength(8)
    best = engine.best(1, a.draft_lens)
    assert best == 4  # the scripted costs make the cliff after position 4 matter
    choices = [engine.step(a, 1) for _ in range(40)]  # ~128 tokens at ~3.3 tokens a step
    # Plain decoding, then the longest draft until 8 drafted rows have shown their
    # acceptance (at batch 1, 8 steps): two arms measured, the rest predicted.
    assert choices[:11] == [0, 0, 0] + [8] * 8
    assert choices[11] == best  # predicted, not searched for
    assert choices.count(best) >= 0.8 * len(choices[11:])


def test_adaptive_follows_a_load_change_and_remembers_each_load():
    engine = ScriptedEngine(GOOD_DRAFTER, draft=3e-3)  # drafting costly at batch 64
    a = AdaptiveDraftLength(8)
    at_1 = [engine.step(a, 1) for _ in range(30)]
    assert at_1[-10:].count(engine.best(1, a.draft_lens)) >= 8
    assert engine.best(64, a.draft_lens) == 0
    at_64 = [engine.step(a, 64) for _ in range(30)]
    assert all(k == 0 for k in at_64[4:])  # plain decoding, one step of gamma, then off
    back = [engine.step(a, 1) for _ in range(10)]
    assert back[0] == engine.best(1, a.draft_lens)  # the batch-1 bucket is remembered


def test_adaptive_never_picks_an_arm_measured_below_plain_decoding():
    engine = ScriptedEngine([0.6, 0.3, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0], draft=5e-4)
    a = AdaptiveDraftLength(8, probe_every=4)
    for _ in range(200):
        batch = 8
        k = a.next_draft_len(batch)
        arms = a.buckets[bucket_of(batch)].arms
        measured = {n for n, arm in arms.items() if arm.samples >= a.warm_samples}
        if k and {0, k} <= measured:
            assert a.goodput(batch, k) >= a.goodput(batch, 0), (k, arms)
        accepted = tuple(1 if engine.rng.random() < 0.6 and k else 0 for _ in range(batch))
        a.observe(StepOutcome(batch, k, batch + sum(accepted), engine.cost(batch, k), accepted))


def test_one_slow_step_does_not_decide_the_draft_length():
    """A garbage-collection pause or a one-time warm-up makes one step many times
    slower: the arm's cost is the median of its recent steps, so the choice holds."""
    engine = ScriptedEngine(GOOD_DRAFTER, draft=3e-3)
    a = AdaptiveDraftLength(8)
    for _ in range(20):
        engine.step(a, 64)
    assert a.next_draft_len(64) == 0
    a.observe(StepOutcome(64, 0, 64, 1.5 * engine.cost(64, 0) * 10))  # one 15x slower plain step
    assert [engine.step(a, 64) for _ in range(10)].count(0) >= 9


def test_plain_decoding_is_re_measured_so_a_stale_cost_cannot_stick():
    engine = ScriptedEngine(GOOD_DRAFTER, draft=3e-3)
    a = AdaptiveDraftLength(8, probe_every=4)
    for _ in range(3):  # plain decoding measured while the machine was busy: 5x too slow
        a.observe(StepOutcome(64, 0, 64, 5 * engine.cost(64, 0)))
    choices = [engine.step(a, 64) for _ in range(60)]
    assert choices[-20:].count(0) >= 18  # re-measured at its real cost, then chosen


def test_steps_without_known_per_request_acceptance_teach_no_acceptance():
    a = AdaptiveDraftLength(8)
    a.observe(StepOutcome(8, 8, 8, 0.01, accepted=()))  # e.g. every row was an n-gram warm-up row
    assert a.position_evidence == [0] * 8


def test_drafting_continues_until_the_drafters_acceptance_has_been_seen():
    """A request's first tokens are n-gram warm-up drafts, which teach nothing about the
    MDLM: the controller keeps the longest draft until MDLM rows report acceptance
    (it once stopped drafting for good at batch 1 this way)."""
    engine = ScriptedEngine(GOOD_DRAFTER)
    a = AdaptiveDraftLength(8)
    for _ in range(12):  # warm-up steps: drafts of length k, no MDLM acceptance known
        k = a.next_draft_len(1)
        a.observe(StepOutcome(1, k, 1, engine.cost(1, k), accepted=()))
    assert a.next_draft_len(1) == 8
    choices = [engine.step(a, 1) for _ in range(20)]
    assert choices[-10:].count(engine.best(1, a.draft_lens)) >= 8


def test_a_length_predicted_to_pay_is_dropped_after_one_measured_step():
    """Under load a drafted step costs several plain ones mostly through a fixed part
    (the drafter's pass, vLLM's spec bookkeeping), so lengths interpolated between plain
    decoding and gamma look cheaper than they are: each is tried for one step at most."""
    engine = ScriptedEngine(GOOD_DRAFTER, per_request=2e-4, draft=1e-4, fixed=0.03)
    a = AdaptiveDraftLength(8)
    assert engine.best(32, a.draft_lens) == 0
    choices = [engine.step(a, 32) for _ in range(60)]
    assert choices[:4] == [0, 0, 0, 8]
    drafted = [k for k in choices[4:] if k]
    assert len(drafted) == len(set(drafted)) <= 3, choices
    assert all(k == 0 for k in choices[-30:])


def test_a_length_that_only_ties_plain_decoding_is_not_run():
    """Drafting has costs a step's clock does not see (requests finishing at different
    steps, prefills spread out): a length must beat plain decoding by min_gain."""
    engine = ScriptedEngine(GOOD_DRAFTER, per_request=1e-4, draft=1e-4, fixed=3e-3)
    a = AdaptiveDraftLength(8)
    best = engine.best(8, a.draft_lens)
    gain = engine.expected_goodput(8, best) / engine.expected_goodput(8, 0)
    assert best > 0 and 1.0 < gain < a.min_gain, gain
    choices = [engine.step(a, 8) for _ in range(60)]
    assert choices[-40:] == [0] * 40, choices


def test_an_arms_own_tokens_cap_what_the_acceptance_model_predicts():
    """The acceptance model sees only the rows the MDLM drafted at full length; when a
    length's steps deliver fewer tokens per request than it predicts (other rows in
    the batch), the delivered tokens decide once they cover enough rows."""
    a = AdaptiveDraftLength(8)
    cost = {0: 0.010, 1: 0.016, 2: 0.018, 4: 0.024, 8: 0.032}
    for _ in range(60):
        k = a.next_draft_len(8)
        if k:  # two rows draft and accept everything; the six others get one token each
            a.observe(StepOutcome(8, k, tokens=8 + 2 * k, seconds=cost[k], accepted=(k, k)))
        else:
            a.observe(StepOutcome(8, 0, tokens=8, seconds=cost[0]))
    assert a.expected_tokens(4) > 4  # the model alone would draft: 8 * 4 / 0.024 > 1.1 * 8 / 0.01
    assert a.next_draft_len(8) == 0


def test_while_drafting_is_off_one_step_is_re_measured_with_doubling_waits():
    engine = ScriptedEngine(GOOD_DRAFTER, draft=3e-4)  # a drafted step: 3.7x-22x a plain one
    a = AdaptiveDraftLength(8, reprobe_after=64, reprobe_max=512)
    assert engine.best(64, a.draft_lens) == 0
    choices = [engine.step(a, 64) for _ in range(2000)]
    drafted = [i for i, k in enumerate(choices) if k]
    probes = [i for i in drafted if i > 10]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert probes[0] == 3 + 1 + 64, drafted  # plain decoding, gamma, then 64 steps off
    # After that first re-probe (of 1 token: the best prediction) the wait is its price:
    # a 1-token step costs 3.7 plain ones for ~1.9 tokens, ~1.8 plain steps lost, which
    # is 1% of ~180 steps; then the doubling waits are longer.
    assert 170 <= gaps[0] <= 190 and gaps[1:] == [256, 512, 512], gaps
    probing = sum(engine.cost(64, choices[i]) - engine.cost(64, 0) for i in probes)
    assert probing < 0.01 * len(choices) * engine.cost(64, 0)  # under 1% of the run


def test_a_re_probe_that_loses_much_waits_until_it_costs_one_step_in_a_hundred():
    """At batch 1 a re-probe runs MIN_EVIDENCE (8) drafted steps; where each loses a
    plain step or more (the tiny pair at temperature 1), the doubling waits alone let
    the probes cost ~2% of a run. After the first re-probe confirms the loss, each
    re-probe waits until what it loses (from its own last measurement) is at most 1%
    of the steps since the one before; never longer than reprobe_max. (A drafter that
    loses little keeps the doubling waits: previous test.)"""
    acceptance = [0.3, 0.3]  # a drafted step: 1.7-2.4 plain ones for 1.3-1.4 tokens

    def run(reprobe_max):
        engine = ScriptedEngine(acceptance, draft=2e-3)
        a = AdaptiveDraftLength(2, reprobe_after=64, reprobe_max=reprobe_max)
        choices = [engine.step(a, 1) for _ in range(12000)]
        starts = [i for i, k in enumerate(choices) if k and not choices[i - 1] and i > 20]
        return engine, choices, starts

    engine, choices, starts = run(reprobe_max=4096)
    assert starts[0] == 3 + 8 + 64, starts  # plain decoding, gamma on 8 rows, 64 steps off
    assert starts[1] - starts[0] > 128  # doubling alone: 128, 256, 512, ...
    for before, start in zip(starts, starts[1:]):
        end = choices.index(0, start)
        lost = sum(engine.cost(1, k) / engine.cost(1, 0) - 1 - sum(
            math.prod(acceptance[:j + 1]) for j in range(k)) for k in choices[start:end])
        assert 0 < lost < 0.011 * (start - before), (start - before, lost)
    _, _, starts = run(reprobe_max=512)
    assert max(b - a for a, b in zip(starts, starts[1:])) <= 512, starts


def test_a_re_probe_that_clearly_loses_stops_after_early_rows():
    """The tiny pair at temperature 1, batch 1: a drafted step costs ~3 plain ones for
    ~1.4 tokens. A re-probe stops once EARLY_ROWS (4) of its MIN_EVIDENCE (8) rows
    show that; once the drafter pays again, a re-probe runs all of its steps and
    drafting goes on."""
    from vllm_specdiff.adaptive import EARLY_ROWS, MIN_EVIDENCE

    engine = ScriptedEngine([0.3] * 8, base=2.2e-3, per_request=0.0, draft=1e-4, fixed=4.1e-3)
    a = AdaptiveDraftLength(8, reprobe_after=64, reprobe_max=1024)
    choices = [engine.step(a, 1) for _ in range(6000)]

    def runs(choices):  # (start, length) of each stretch of drafted steps
        out, start = [], None
        for i, k in enumerate(choices + [0]):
            if k and start is None:
                start = i
            elif not k and start is not None:
                out.append((start, i - start))
                start = None
        return out

    probes = runs(choices)
    assert probes[0] == (3, MIN_EVIDENCE)  # gamma until 8 rows show the acceptance
    assert len(probes) >= 6 and all(n == EARLY_ROWS for _, n in probes[1:]), probes
    engine.acceptance = [0.95] * 8  # the traffic changed: drafting pays ~2x
    assert engine.expected_goodput(1, 8) > 1.5 * engine.expected_goodput(1, 0)
    choices = [engine.step(a, 1) for _ in range(1100)]
    start, n = runs(choices)[0]
    assert n > MIN_EVIDENCE and sum(k > 0 for k in choices[-100:]) >= 90, (start, n)


def test_drafting_off_asks_whether_a_length_pays_once_in_probe_every_steps():
    """Once a re-probe has confirmed that drafting loses, only plain decoding's cost
    changes until the next, so the goodput of every length is predicted on one step in
    probe_every (it ran on every step, ~16 us of a 2.2 ms step in the engine). Against
    the same controller asking on every step: the same re-probes, a length that comes
    to pay (plain decoding slows) drafted at most probe_every steps later, and the same
    throughput on average where a length near the bar goes on and off with noisy step
    costs."""
    class AskingEveryStep(AdaptiveDraftLength):
        def next_draft_len(self, batch):
            for bucket in self.buckets.values():
                bucket.off_until = 0
            return super().next_draft_len(batch)

    def run(controller):
        engine = ScriptedEngine([0.3] * 8, base=2.2e-3, per_request=0.0, draft=1e-4, fixed=4.1e-3)
        predicted = []
        rates = controller._rates
        controller._rates = lambda *args: predicted.append(1) or rates(*args)
        before = [engine.step(controller, 1) for _ in range(3000)]
        engine.base = 40e-3  # plain decoding slows ~18x: drafting pays ~1.2x
        after = [engine.step(controller, 1) for _ in range(100)]
        return before, after, len(predicted)

    before, after, predicted = run(AdaptiveDraftLength(8, reprobe_after=64, reprobe_max=1024))
    ref_before, ref_after, ref_predicted = run(AskingEveryStep(8, reprobe_after=64, reprobe_max=1024))
    assert before == ref_before
    assert predicted < ref_predicted / 8, (predicted, ref_predicted)
    first, ref_first = (next(i for i, k in enumerate(c) if k) for c in (after, ref_after))
    assert ref_first <= first <= ref_first + 16, (first, ref_first)
    assert sum(k > 0 for k in after[-50:]) >= 45, after

    def near_the_bar(controller, acceptance, seed):  # gamma 4 at ~1.0-1.2x plain decoding
        engine = ScriptedEngine([acceptance] * 4, base=2.2e-3, per_request=0.0, draft=1e-4,
                                fixed=1.5e-3, jitter=0.1, seed=seed)
        made, observe = [0, 0.0], controller.observe

        def counted(step):
            made[0], made[1] = made[0] + step.tokens, made[1] + step.seconds
            observe(step)

        controller.observe = counted
        choices = [engine.step(controller, 1) for _ in range(4000)]
        return sum(k > 0 for k in choices) / len(choices), made[0] / made[1]

    # Near the bar the two go on and off at different steps (step costs are noisy and
    # each choice changes what is measured next), by chance either way: no loss.
    ratios, shares = [], []
    for acceptance in (0.55, 0.6):
        for seed in range(4):
            (_, rate), (share, ref_rate) = (near_the_bar(c(4, reprobe_after=64), acceptance, seed)
                                            for c in (AdaptiveDraftLength, AskingEveryStep))
            ratios.append(rate / ref_rate)
            shares.append(share)
    assert sum(0.1 < s < 0.9 for s in shares) >= 4, shares  # on and off
    assert 0.98 < sum(ratios) / len(ratios) < 1.02 and min(ratios) > 0.95, ratios


def test_a_costly_catch_up_step_makes_re_probes_wait_for_it():
    """The small pair under load (63 new requests): the first step after drafting was
    off re-encodes every request's context in the drafter cache; a re-probe's two
    steps cost ~40 plain ones, and after the doubling waits alone re-probes cost ~20%
    of the 128-token runs they fell in (controller_cost_small_load_change.md). Once a
    catch-up has been measured (here 20 plain steps), a re-probe waits until it is 1%
    of the steps between (capped at reprobe_max)."""
    engine = ScriptedEngine(GOOD_DRAFTER, draft=3e-4)  # drafting never pays at batch 64
    a = AdaptiveDraftLength(8, reprobe_after=64, reprobe_max=1024, catch_up=True)
    choices, previous = [], 0
    for _ in range(5000):
        k = a.next_draft_len(64)
        catch_up = 20 * engine.cost(64, 0) if k and not previous and len(choices) > 10 else 0.0
        a.observe(StepOutcome(64, k, 64 if not k else 64 + 64 * k // 2,
                              engine.cost(64, k) + catch_up, accepted=(k // 2,) * 64 if k else ()))
        choices.append(k)
        previous = k
    starts = [i for i, k in enumerate(choices) if k and not choices[i - 1] and i > 10]
    assert starts[0] == 3 + 1 + 64, starts  # the first wait: reprobe_after
    assert all(b - a >= 1024 for a, b in zip(starts, starts[1:])), starts
    assert a.buckets[bucket_of(64)].catch_up_seconds > 0


def test_a_drafter_with_a_cache_is_re_measured_after_a_catch_up_step():
    """With a drafter cache, the first step after drafting was off also re-encodes what
    the cache missed; measured alone, that one-time cost kept drafting off for good on
    the small pair. A re-probe then runs one step more and does not measure its first:
    here a first step costs 3x the drafter's real cost. The re-probe measures steps
    that draft MIN_EVIDENCE (8) rows: at batch 1, 8 steps."""
    plain, drafted = 0.005, 0.008  # seconds a step; drafted: 1.94 tokens, 1.2x plain's rate

    reprobing = []

    def run(catch_up):
        a = AdaptiveDraftLength(1, reprobe_after=8, catch_up=catch_up)
        choices, since_off = [], True
        reprobing.clear()
        for _ in range(25):
            choice = a.next_draft_len(1)
            choices.append(choice)
            reprobing.append(a.reprobing)  # the proposer then lets no request copy
            if choice and not a.position_evidence[0]:
                a._learn_acceptance(1, (1,) * 8)  # acceptance 0.94: seen on 8 requests
            seconds = (3 * drafted if since_off else drafted) if choice else plain
            since_off = not choice
            a.observe(StepOutcome(1, choice, tokens=2 if choice else 1, seconds=seconds,
                                  accepted=(1,) if choice else ()))
        return choices, a.buckets[0].arms[1].samples

    # plain decoding 3 steps, gamma's first step (3x), off, the re-probe from step 13
    choices, samples = run(catch_up=True)
    assert choices == [0, 0, 0, 1] + [0] * 8 + [1] * 13
    assert [i for i, r in enumerate(reprobing) if r] == list(range(12, 21))  # 1 + 8 steps
    assert samples == 1 + 12  # gamma's first step, then every drafted step but the first
    choices, samples = run(catch_up=False)
    assert [i for i, r in enumerate(reprobing) if r] == list(range(12, 20))
    assert samples == 1 + 13 and choices[-5:] == [1] * 5  # the median of 8 outvotes one


def test_acceptance_evidence_ages_while_nothing_is_drafted():
    """Acceptance learned before drafting went off must not outweigh what a re-probe
    sees after a long while off: the evidence ages with plain steps too."""
    def after_off(plain_steps):
        a = AdaptiveDraftLength(4)
        for _ in range(40):  # content the drafter cannot guess: nothing accepted
            a.observe(StepOutcome(1, 4, tokens=1, seconds=0.01, accepted=(0,)))
        for _ in range(plain_steps):
            a.observe(StepOutcome(1, 0, tokens=1, seconds=0.005))
        for _ in range(2):  # the re-probe: now the drafter's first token passes
            a.observe(StepOutcome(1, 4, tokens=5, seconds=0.01, accepted=(4,)))
        return a.position_acceptance[0]

    assert after_off(0) < 0.2  # drafting on throughout: 2 rows against ~40
    assert after_off(64) > 0.6  # 64 steps off: the re-probe's 2 rows decide

    copying = AdaptiveDraftLength(4)  # the MDLM off, requests copying meanwhile
    for _ in range(40):
        copying.observe(StepOutcome(1, 4, tokens=1, seconds=0.01, accepted=(0,)))
    for _ in range(64):
        copying.observe_copied(StepOutcome(1, 0, tokens=3, seconds=0.006))
    for _ in range(2):
        copying.observe(StepOutcome(1, 4, tokens=5, seconds=0.01, accepted=(4,)))
    assert copying.position_acceptance[0] > 0.6


def test_deep_positions_a_short_draft_never_reaches_lean_on_the_ones_before():
    """An unlucky stretch at gamma 8 (everything after the first token rejected), then
    only 1-token drafts, which pass: the deep positions must recover towards the first
    position's acceptance, or gamma 1 would look best for good."""
    a = AdaptiveDraftLength(8)
    for _ in range(30):
        a.observe(StepOutcome(1, 8, tokens=2, seconds=0.01, accepted=(1,)))
    assert a.expected_tokens(8) < 2.2
    for _ in range(200):
        a.observe(StepOutcome(1, 1, tokens=2, seconds=0.01, accepted=(1,)))
    assert a.position_acceptance[0] > 0.9 and min(a.position_acceptance) > 0.7
    assert a.expected_tokens(8) > 4


def test_drafting_resumes_when_a_re_measured_length_pays_again():
    """A cost measured under other traffic must not keep drafting off for good."""
    engine = ScriptedEngine(GOOD_DRAFTER, draft=3e-3)
    a = AdaptiveDraftLength(8, reprobe_after=32)
    assert [engine.step(a, 64) for _ in range(30)][-20:] == [0] * 20
    engine.draft, engine.per_request = 1e-5, 3e-5  # the traffic changed: drafting pays
    best = engine.best(64, a.draft_lens)
    assert engine.expected_goodput(64, best) > 1.2 * engine.expected_goodput(64, 0)
    choices = [engine.step(a, 64) for _ in range(120)]
    assert sum(k > 0 for k in choices[-40:]) >= 36, choices


# The small pair's conditional acceptance per position at gamma 8, T 1, greedy
# (benchmarks/results/pair_bench_small.md), and its batch-1 step costs in ms: plain 8,
# drafted 11.5 + 0.375 per draft token (13 at gamma 4, 14.5 at gamma 8).
SMALL_PAIR = [0.81, 0.80, 0.72, 0.68, 0.72, 0.78, 0.83, 0.87]


def test_a_deep_position_seen_on_few_rows_leans_on_the_position_before():
    """Rows reach position i only as often as every position before it passes, so the
    deep positions of a long draft are seen on few rows; two failures there must not
    read as an acceptance near zero (in the scripted runs of the next test, that left
    gamma 8 for 4 on a quarter of the steps, and gamma 4 never drafts deep enough to
    correct it)."""
    a = AdaptiveDraftLength(8)
    # 8 rows: all pass positions 1-4; 6 fail position 5, 2 pass it and fail position 6.
    a.observe(StepOutcome(8, 8, 8 + 6 * 4 + 2 * 5, 0.01, accepted=(4,) * 6 + (5,) * 2))
    p4, p5, p6 = a.position_acceptance[3:6]
    assert p4 > 0.9
    assert 0.4 < p5 < 0.6, p5  # 2 of 8 passed, pulled towards position 4's ~1
    assert 0.25 < p6 < p5, p6  # 0 of 2 passed: mostly what position 5 says
    for _ in range(30):  # many rows reach position 6 and fail: the evidence wins
        a.observe(StepOutcome(8, 8, 8 + 8 * 5, 0.01, accepted=(5,) * 8))
    assert a.position_acceptance[5] < 0.05


def test_noisy_step_costs_keep_the_best_length_on_the_small_pairs_acceptance():
    """Step times that vary (5% per step, 12% between stretches of 20 steps) with the
    small pair's acceptance: gamma 8 predicts ~9% more tokens/s than gamma 4, and the
    controller runs it on at least 80% of its predicted steps (70% before deep
    positions leant on the position before them), over 20 seeded runs."""
    def engine(seed):
        return ScriptedEngine(SMALL_PAIR, base=8e-3, per_request=0.0, draft=0.375e-3,
                              fixed=3.5e-3, seed=seed, jitter=0.05, drift=0.12)

    assert engine(0).best(1, [0, 1, 2, 4, 8]) == 8
    gain = engine(0).expected_goodput(1, 8) / engine(0).expected_goodput(1, 4)
    assert 1.05 < gain < 1.12, gain
    choices = []
    for seed in range(20):
        e, a = engine(seed), AdaptiveDraftLength(8)
        choices += [e.step(a, 1) for _ in range(160)][11:]  # after plain decoding, gamma
    assert choices.count(8) >= 0.8 * len(choices), {k: choices.count(k) for k in set(choices)}


def test_acceptance_model_learns_the_per_position_probabilities():
    engine = ScriptedEngine(GOOD_DRAFTER)
    a = AdaptiveDraftLength(8, enabled=True)
    for _ in range(300):
        accepted = []
        for _ in range(16):
            n = 0
            while n < 8 and engine.rng.random() < GOOD_DRAFTER[n]:
                n += 1
            accepted.append(n)
        a.observe(StepOutcome(16, 8, 16 + sum(accepted), 0.01, tuple(accepted)))
    for learned, true in zip(a.position_acceptance[:4], GOOD_DRAFTER[:4]):
        assert abs(learned - true) < 0.08
    truth = ScriptedEngine(GOOD_DRAFTER).expected_goodput(1, 4) * ScriptedEngine(GOOD_DRAFTER).cost(1, 4)
    assert abs(a.expected_tokens(4) - truth) < 0.3


def test_idle_gaps_are_not_measured_as_steps():
    a = AdaptiveDraftLength(8)
    a.observe(StepOutcome(1, 8, tokens=4, seconds=0.01))
    a.observe(StepOutcome(1, 8, tokens=4, seconds=30.0))  # the engine sat idle in between
    assert a.buckets[0].arms[8].rate == 400.0


def test_acceptance_for_the_logs_comes_from_the_step_outcomes():
    a = AdaptiveDraftLength(8)
    for _ in range(100):
        a.observe(StepOutcome(batch=2, draft_len=4, tokens=2 + 4, seconds=0.01))  # half accepted
    assert abs(a.acceptance - 0.5) < 1e-3


def test_copying_goes_on_without_the_mdlm_only_where_measured_to_pay():
    """Prompt lookup while the MDLM is off: measured like a draft length, apart from
    the MDLM's arms. Never seen, it is tried once after reprobe_after steps; seen, it is
    measured for a few steps and goes on where those beat plain decoding by min_gain;
    where they do not, one step re-measures it after a wait of probe_every times its
    cost in plain steps, doubling."""
    a = AdaptiveDraftLength(8, probe_every=4, reprobe_after=6, reprobe_max=32)
    assert not a.copying_pays(1)  # plain decoding, the reference, is measured first
    for _ in range(3):
        a.next_draft_len(1)
        a.observe(StepOutcome(1, 0, tokens=1, seconds=0.002))  # plain: 500 tokens/s
    tries = []
    for _ in range(8):  # never seen: one try after 6 steps
        a.next_draft_len(1)
        tries.append(a.copying_pays(1))
    assert [i for i, t in enumerate(tries) if t] == [6], tries
    a.observe_copied(StepOutcome(1, 8, tokens=4, seconds=0.0025))  # 1,600 tokens/s
    for _ in range(2):
        assert a.copying_pays(1)  # measure it
        a.observe_copied(StepOutcome(1, 8, tokens=4, seconds=0.0025))
    # It pays; but plain decoding, its reference, was measured 8 >= reprobe_after steps
    # ago: this step decodes plainly to re-measure it, then copying goes on.
    assert not a.copying_pays(1) and a.measuring_plain
    a.observe(StepOutcome(1, 0, tokens=1, seconds=0.002))
    on = []
    for _ in range(12):
        a.next_draft_len(1)
        on.append(a.copying_pays(1))
        if on[-1]:
            a.observe_copied(StepOutcome(1, 8, tokens=4, seconds=0.0025))
        else:
            a.observe(StepOutcome(1, 0, tokens=1, seconds=0.002))
    assert [i for i, c in enumerate(on) if not c] == [5, 11]  # one plain step in 6
    assert 8 not in a.buckets[0].arms  # the MDLM's gamma arm learned nothing from it

    poor = AdaptiveDraftLength(8, probe_every=4, reprobe_max=32)
    for _ in range(3):
        poor.next_draft_len(32)
        poor.observe(StepOutcome(32, 0, tokens=32, seconds=0.02))  # 1,600 tokens/s
    poor.observe_copied(StepOutcome(32, 8, tokens=34, seconds=0.04))  # 850 tokens/s
    for _ in range(2):
        assert poor.copying_pays(32)
        poor.observe_copied(StepOutcome(32, 8, tokens=34, seconds=0.04))
    copies = []
    for _ in range(60):
        poor.next_draft_len(32)
        copies.append(poor.copying_pays(32))
        if copies[-1]:  # the re-measurement: still a loss
            poor.observe_copied(StepOutcome(32, 8, tokens=34, seconds=0.04))
    # A copying step costs 2 plain ones: re-measured after 4 x 2 = 8 steps, then 16, 32.
    assert [i for i, c in enumerate(copies) if c] == [8, 24, 56]
    assert not poor.copying_pays(1)  # another bucket: plain decoding not measured there


def run_through_a_slow_spell(spell: range, factor: float, seed: int, after: int = 1500) -> list:
    """Batch 8 where neither the MDLM nor copying pays (temperature-1 acceptance; a
    drafted step costs 3-5 plain ones), the machine ``factor`` times slower during
    ``spell`` (another process holding the CPU); the steps' kinds ("c": copied)."""
    import random

    rng = random.Random(seed)
    a = AdaptiveDraftLength(8)
    acceptance = [0.35, 0.12, 0.04, 0.02, 0.01, 0.0, 0.0, 0.0]
    kinds = []
    for step in range(spell.stop + after):
        k = a.next_draft_len(8)
        copy = k == 0 and a.copying_pays(8)
        length = 8 if copy else k
        slow = factor if step in spell else 1.0
        seconds = ((0.005 if copy or not k else 0.015) + 0.0015 * length) * slow
        accepted = []
        for _ in range(8):
            n = 0
            while n < length and rng.random() < (0.2 if copy else acceptance[n]):
                n += 1
            accepted.append(n)
        outcome = StepOutcome(8, k, 8 + sum(accepted), seconds * rng.uniform(0.9, 1.1),
                              () if copy else tuple(accepted))
        (a.observe_copied if copy else a.observe)(outcome)
        kinds.append("c" if copy else k)
    return kinds[spell.stop:]


def test_a_slow_spell_does_not_leave_drafting_on():
    """Plain decoding's cost measured while the CPU was shared made drafting and copying
    look paying; once they ran, plain decoding was never re-measured (its probes copied
    instead), and some runs drafted at a loss on every step after the spell."""
    for length, seed in [(100, 1), (200, 3), (100, 0), (400, 2), (50, 4)]:
        start = 1500 + 37 * seed
        after = run_through_a_slow_spell(range(start, start + length), 5.0, seed)
        drafted = sum(1 for k in after if k != 0)
        assert drafted < 0.02 * len(after), (length, seed, collections.Counter(map(str, after)))


def test_a_plain_step_faster_than_half_its_median_makes_the_bucket_measure_afresh():
    a = AdaptiveDraftLength(8)
    for n, seconds in [(0, 0.025)] * 9 + [(1, 0.09), (8, 0.2)]:  # a slow spell
        a.next_draft_len(8)
        a.observe(StepOutcome(8, n, 8 + n, seconds, (n,) * 8 if n else ()))
    a.next_draft_len(8)
    a.observe(StepOutcome(8, 0, 8, 0.013))  # 0.52x the median: not under half
    assert sorted(a.buckets[bucket_of(8)].arms) == [0, 1, 8]
    a.next_draft_len(8)
    a.observe(StepOutcome(8, 0, 8, 0.005))  # the machine is back to speed
    arms = a.buckets[bucket_of(8)].arms
    assert sorted(arms) == [0] and arms[0].seconds == 0.005
    assert a.next_draft_len(8) == 8  # gamma measured again first


def test_each_step_is_measured_in_the_arm_of_what_really_ran():
    """The proposer hands the controller each step as what ran: the MDLM's draft
    length only where the MDLM drafted (n-gram rows count one token each), the copied
    arm where rows copied and the MDLM drafted none, plain decoding where nothing
    drafted, and nothing for a step after a prefill or one drafted by the warm-up
    n-grams alone."""
    from types import SimpleNamespace

    from vllm_specdiff.proposer import LastStep, SpecDiffProposer

    class Recorder:
        def __init__(self):
            self.seen = []

        def observe(self, step):
            self.seen.append(("arm", step.draft_len, step.tokens, step.accepted))

        def observe_copied(self, step):
            self.seen.append(("copied", step.draft_len, step.tokens, step.accepted))

    proposer = SpecDiffProposer.__new__(SpecDiffProposer)
    proposer.adaptive = Recorder()
    batch = SimpleNamespace(req_ids=["a", "b", "c"])
    sampled = [[1, 2, 3], [4, 5], [6]]  # 2, 1 and 0 drafts accepted

    def seen(tokens=sampled, **last):
        proposer.adaptive.seen.clear()
        proposer._observe(LastStep(8, 3, 0.0, **last), tokens, batch, now=0.01)
        return proposer.adaptive.seen

    mdlm = dict(mdlm_rows=1, full_drafts=frozenset("a"))
    assert seen(**mdlm, copied=frozenset("b"), ngram=frozenset("c")) == [("arm", 8, 3 + 1 + 1, (2,))]
    assert seen(**mdlm, after_decode=False) == []
    assert seen(copied=frozenset("abc")) == [("copied", 8, 6, ())]
    assert seen([[1], [4], [6]]) == [("arm", 0, 3, ())]  # nothing drafted: plain decoding
    assert seen(copied=frozenset("a")) == [("copied", 8, 6, ())]  # the others plain
    assert seen(ngram=frozenset("a")) == []  # warm-up drafts only: no arm's step


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


def test_greedy_verification_on_the_host_equals_the_torch_path_with_placeholders():
    """The verifier's path for all-greedy batches on the CPU (NumPy, no repair of
    placeholder drafts) against vLLM's multi-pass structure in torch with the repair:
    ties, drafts outside the vocabulary, requests without drafts, bonus tokens."""
    from vllm_specdiff.kernels.fused_verify import unfused_verify, verify_greedy_on_host
    from vllm_specdiff.verification import _resample_at_invalid_drafts

    V = 30
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        ns = torch.randint(0, 5, (4,), generator=g).tolist()
        B, N = len(ns), sum(ns)
        logits = (torch.randn(N + B, V, generator=g) * 0.5).round()  # ties
        cu = torch.tensor([0] + ns).cumsum(0)
        rows = torch.arange(N) + torch.repeat_interleave(torch.arange(B), torch.tensor(ns))
        ids = torch.where(torch.rand(N, generator=g) < 0.7, logits[rows].argmax(-1),
                          torch.randint(0, V, (N,), generator=g))
        ids[torch.rand(N, generator=g) < 0.15] = -1
        ids[torch.rand(N, generator=g) < 0.05] = V  # past the vocabulary
        bonus = torch.randint(0, V, (B,), generator=g)
        invalid = (ids < 0) | (ids >= V)
        greedy, u = torch.ones(B, dtype=torch.bool), torch.rand(B, dtype=torch.float64)
        want, want_acc = unfused_verify(logits, torch.where(invalid, 0, ids), None, cu, greedy,
                                        torch.rand(N, dtype=torch.float64), u, max(ns), bonus)
        _resample_at_invalid_drafts(want, want_acc, invalid, logits[rows], cu, greedy, u)
        got, got_acc = verify_greedy_on_host(logits[rows], ids.to(torch.int32), ns, bonus, max(ns))
        assert got.tolist() == want.tolist(), f"seed {seed}"
        assert got_acc.tolist() == want_acc.tolist(), f"seed {seed}"


def test_null_context_window_means_the_whole_context_not_the_default():
    assert SpecDiffConfig.from_user({"method": "specdiff"}).context_window == "auto"
    assert SpecDiffConfig.from_user({"method": "specdiff", "context_window": None}).context_window is None


def test_drafter_cache_setting_says_which_drafters_are_cached():
    from vllm_specdiff.model import MDLMConfig

    bidirectional, block_causal = MDLMConfig(), MDLMConfig(attention="block_causal")
    cached = {mode: [SpecDiffConfig.from_user({"method": "specdiff", "drafter_cache": mode})
                     .uses_drafter_cache(c) for c in (bidirectional, block_causal)]
              for mode in ("auto", "exact", "approximate", "off")}
    assert cached == {"auto": [False, True], "exact": [False, True],
                      "approximate": [True, True], "off": [False, False]}


def test_auto_context_window_is_the_drafters_own():
    from vllm_specdiff.model import MDLMConfig

    auto = SpecDiffConfig.from_user({"method": "specdiff"})
    assert auto.window_for(MDLMConfig()) == 16  # a config.json that names none
    assert auto.window_for(MDLMConfig(draft_context_window=None)) is None
    assert auto.window_for(MDLMConfig(draft_context_window=48)) == 48
    named = SpecDiffConfig.from_user({"method": "specdiff", "context_window": 32})
    assert named.window_for(MDLMConfig(draft_context_window=None)) == 32
    # The W a drafter runs with leaves room for the draft block and fits the engine.
    whole = MDLMConfig(model_length=256, draft_context_window=None)
    assert auto.drafter_window(whole, max_model_len=1024) == 256 - auto.gamma
    assert auto.drafter_window(whole, max_model_len=100) == 100
    assert named.drafter_window(whole, max_model_len=1024) == 32
    with pytest.raises(SpecDiffConfigError, match="context_window='whole' is invalid"):
        SpecDiffConfig.from_user({"method": "specdiff", "context_window": "whole"})
    # elsewhere null still means the default
    assert SpecDiffConfig.from_user({"method": "specdiff", "schedule": None}).schedule == "left_to_right"


def test_a_long_draft_measured_slow_once_is_measured_again():
    """The small pair at batch 1: a step's cost is mostly fixed (the drafter's pass,
    vLLM's spec bookkeeping), so gamma 8 is the best length by far. If gamma's steps were
    first measured slow (an engine's first steps pay one-time costs: new shapes), the
    lengths between are interpolated from that cost, a short length is the best
    prediction, and gamma, neither chosen nor re-probed, kept its stale cost for the
    rest of the run: small-pair engines drafted 1 token or none on every step
    (pair_bench_small_lookup at 801011d, 1.1x where gamma 8 fixed ran 1.9x)."""
    acceptance = [0.86, 0.8, 0.72, 0.68, 0.7, 0.75, 0.8, 0.85]
    engine = ScriptedEngine(acceptance, base=6e-3, per_request=5e-5, draft=5e-5, fixed=5e-3)
    assert engine.best(1, [0, 1, 2, 4, 8]) == 8
    a = AdaptiveDraftLength(8)
    for _ in range(3):
        a.observe(StepOutcome(1, 0, tokens=1, seconds=engine.cost(1, 0)))
    for _ in range(8):  # gamma's first steps: 3x their real cost, on unlucky rows
        a.observe(StepOutcome(1, 8, tokens=1, seconds=3 * engine.cost(1, 8), accepted=(0,)))
    choices = [engine.step(a, 1) for _ in range(1000)]
    assert choices[-300:].count(8) >= 0.8 * 300, collections.Counter(choices[-300:])
