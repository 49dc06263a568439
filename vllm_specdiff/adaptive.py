"""The draft length of each step, chosen from measured step costs and acceptance.

Whether drafting ``draft_len`` tokens pays depends on the acceptance of this drafter on
this traffic, on the batch size (verification is nearly free at batch 1 and costs real
compute at batch 32) and on the machine. The controller keeps two small models, both
learned from the steps it sees:

- **cost**: the wall time of a step cycle (drafting, target pass, verification,
  scheduling) at each measured draft length, per batch-size bucket; between measured
  lengths it is interpolated linearly (a step's extra cost grows with the tokens the
  drafter writes and the target scores);
- **acceptance**: the probability that draft position i is accepted given that
  position i - 1 was (from each request's accepted count; a position seen on few rows
  leans on the one before it; the evidence ages with every step), shared by all
  buckets, so the expected tokens of a step at draft length k are 1 + a_1 + a_1 a_2 + ...

The goodput of draft length k is batch * tokens(k) / cost(k). A new bucket measures
two arms first: 0 (plain decoding, which costs nothing extra to measure; its cost is
the median of a few steps, since every other arm is judged against it) and gamma
(which shows the acceptance at every position and the most expensive step), and keeps
gamma until the drafter's acceptance has been seen on a few rows. Every other length is
then predicted, and each step runs the best one whose goodput beats plain decoding's
by ``min_gain`` (10%): drafting costs what a step's clock does not see (requests that
finish at different steps leave partly filled batches and spread the next prefills
over more steps), so a draft length that merely ties plain decoding step for step
loses over a run. A drafted arm's first measured step replaces its prediction, so a
length predicted to pay that does not is dropped after one step. Every
``probe_every`` steps plain decoding or another length that pays is re-measured (or
gamma, once its cost has aged: ``_gamma_due``), so the costs stay current.

While drafting is off, the most promising draft length (or gamma, when its cost is
the older measurement: every length between is interpolated from it) is re-measured
over steps that draft ``MIN_EVIDENCE`` rows (one more with ``catch_up``, not
measured: see ``_reprobe``; it stops after ``EARLY_ROWS`` rows that show it clearly
losing: ``_probe_lost``) after ``reprobe_after`` steps, and the wait doubles (up to
``reprobe_max``) each time drafting stays off, and is never shorter than what makes a
re-probe's measured loss (its catch-up step, and the drafted steps of the last one)
``PROBE_SHARE`` of the steps between (``_reprobe_price``): a cost measured under other
traffic cannot keep drafting off for good, and under a load where drafting never pays
the probes cost about one step in a hundred. (Under load a drafted step costs several
plain ones, so every exploratory step shows in a 128-token run.)

One input, one output: ``observe(StepOutcome)`` after each decode step, and
``next_draft_len(batch)`` before drafting the next one. Prompt lookup (requests that
copy their draft from their context, which costs no drafter pass) has its own pair:
``observe_copied`` for a step in which requests copied and the MDLM drafted none, and
``copying_pays``: whether requests copy while the MDLM is off. Copying is measured
like a draft length: a few steps first, then it goes on while it beats plain decoding
by ``min_gain``; unseen or losing, one step tries it after a wait that grows with
what such a step costs and doubles while copying keeps losing.

Plain decoding's cost is what every arm is judged against, so it is kept current:
steps that re-measure it never copy (``measuring_plain``), copying re-measures it after
each try and while it is on, and a step that shows the machine faster than an arm's
samples say drops or re-measures it (``sped_up``).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

logger = logging.getLogger("vllm.specdiff")


class StepOutcome(NamedTuple):
    """One decode step cycle (prompt steps are not measured: their cost says nothing
    about the draft length). A NamedTuple: one is built on every step, in ~1/4 of a
    frozen dataclass's time."""

    batch: int  # requests that took part
    draft_len: int  # the draft length chosen for the step
    tokens: int  # tokens the step produced (accepted drafts + one per request)
    seconds: float  # wall time from this step's drafting to the next one's
    accepted: tuple[int, ...] = ()  # accepted drafts of each request (when known)


def candidate_draft_lens(gamma: int) -> list[int]:
    lens, n = {0, gamma}, 1
    while n < gamma:
        lens.add(n)
        n *= 2
    return sorted(lens)


def bucket_of(batch: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, ... share a bucket."""
    return max(0, (batch - 1).bit_length())


RECENT = 9  # step costs an arm remembers; their median is its cost
ACCEPTANCE_DECAY = 0.95  # per step: the acceptance model follows the last ~20 steps ...
ROW_DECAY = 1 - 1 / 64  # ... and, while drafting, at least the last ~64 drafted rows
MIN_EVIDENCE = 8  # drafted rows seen at position 0 before acceptance is predicted from
EARLY_ROWS = 4  # drafted rows after which a re-probe that clearly loses stops ...
LOSING = 0.75  # ... clearly: predicted at under this share of plain decoding's goodput
PRIOR_ROWS = 4  # pseudo-rows pulling a deep position's acceptance towards the one before
PROBE_SHARE = 0.01  # of the steps between re-measurements, at most what one costs (gamma, re-probes)
MEASURED_ROWS = 32  # rows an arm's recent steps must cover before their tokens cap its prediction


def reprobe_steps(batch: int) -> int:
    """Measured steps of a re-probe at this batch size: enough to draft
    ``MIN_EVIDENCE`` rows."""
    return -(-MIN_EVIDENCE // batch)


@dataclass
class Arm:
    """The recent step costs of one draft length in one bucket. A median, not a mean:
    a garbage-collection pause or a one-time warm-up (a new shape) makes single steps
    several times slower, and one such step must not decide the draft length for long.
    The controller reads them every step, so they are computed when a step is recorded."""

    costs: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    tokens: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # per step
    rows: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # requests per step
    samples: int = 0
    last_step: int = 0  # the bucket's step count at the latest sample
    stale: bool = False  # re-probed: its next sample replaces the older ones
    seconds: float = 0.0  # median of the recent step costs
    rate: float = 0.0  # measured tokens/s of the recent steps
    tokens_per_row: float = 0.0
    rows_seen: int = 0  # requests the recent steps covered

    def record(self, step: "StepOutcome") -> None:
        """Add one step's cost and tokens (after dropping the older ones if re-probed),
        unless it is an idle gap rather than a step."""
        if self.samples and step.seconds > 20 * self.seconds:
            return
        if self.stale:
            self.costs.clear()
            self.tokens.clear()
            self.rows.clear()
            self.stale = False
        self.costs.append(step.seconds)
        self.tokens.append(step.tokens)
        self.rows.append(step.batch)
        self.samples += 1
        self.seconds = statistics.median(self.costs)
        tokens, self.rows_seen = sum(self.tokens), sum(self.rows)
        self.rate = tokens / sum(self.costs)
        self.tokens_per_row = tokens / self.rows_seen


def sped_up(arm: Arm, step: StepOutcome) -> bool:
    """Whether ``step`` ran in under half ``arm``'s median cost: the machine is faster
    than when the arm's samples were measured (something else held the CPU then; an
    arm's steps do about the same work each time). Every arm is judged against plain
    decoding's cost, so a plain cost measured in such a slow spell made drafting and
    copying look paying (floor.py, tiny pair, batch 8, temperature 1: ~0.5x plain
    decoding in every round after one), and drafted lengths measured in it looked so
    costly that they went unmeasured for thousands of steps. After a plain step, the
    bucket's costs are measured afresh (``observe``); after a drafted or copied step,
    the next step re-measures plain decoding (``plain_due``).
    Only against a median of at least 3 current samples: a re-probed arm's first step
    is often slow for its own reasons (new shapes, a drafter cache's catch-up)."""
    return not arm.stale and len(arm.costs) >= 3 and step.seconds < arm.seconds / 2


@dataclass
class Bucket:
    arms: dict[int, Arm] = field(default_factory=dict)
    copied: Arm = field(default_factory=Arm)  # steps in which only prompt lookup drafted
    steps: int = 0
    reprobe_at: int | None = None  # step at which drafting-off re-measures a draft length
    reprobe_wait: int = 0
    reprobed: bool = False  # a re-probe ran since drafting last paid in this bucket
    copy_at: int | None = None  # step at which copying, unseen or losing, is tried again
    copy_wait: int = 0
    copy_since: int = 0  # step of the latest try: plain decoding is re-measured after it
    catching_up: int | None = None  # a re-probed draft length whose first step is not measured
    catch_up_seconds: float = 0.0  # what that first step cost, the latest time
    probing: int = 0  # the draft length a re-probe measures ...
    probe_steps: int = 0  # ... for this many more steps
    gamma_wait: int = 0  # steps gamma's cost may age while shorter lengths run (0: reprobe_after)
    plain_due: bool = False  # a drafted or copied step ran at under half its arm's cost: see sped_up
    off_until: int = 0  # drafting is off and nothing is due before this step: see _reprobe


class AdaptiveDraftLength:
    def __init__(self, gamma: int, enabled: bool = True,
                 warm_samples: int = 3, probe_every: int = 16, reprobe_after: int = 64,
                 reprobe_max: int = 1024, min_gain: float = 1.1, log_interval_s: float = 10.0,
                 catch_up: bool = False):
        self.gamma = gamma
        # The drafter keeps state between steps (its cache) that drafting-off lets go
        # stale: a re-probe then runs two steps and measures the second (``_reprobe``).
        self.catch_up = catch_up
        self.enabled = enabled
        self.draft_lens = candidate_draft_lens(gamma)
        self.warm_samples = warm_samples
        self.probe_every = probe_every
        self.reprobe_after = reprobe_after
        self.reprobe_max = reprobe_max
        self.min_gain = min_gain
        self.log_interval_s = log_interval_s
        self.buckets: dict[int, Bucket] = {}
        # P(position i accepted | position i-1 accepted), i = 1..gamma, with the number
        # of requests that reached each position (0: no evidence yet).
        self.position_acceptance = [0.0] * gamma
        self.position_evidence = [0] * gamma  # rows seen at each position, ever
        self._reached = [0.0] * gamma
        self._passed = [0.0] * gamma
        self._unapplied_age = 1.0  # aging owed to _reached and _passed (applied when read)
        self._expected = [1.0] * (gamma + 1)  # expected_tokens of each draft length
        self.acceptance = 0.0  # accepted / drafted tokens (ema), for the logs
        self._last_choice: dict[int, int] = {}
        # Whether the latest next_draft_len re-measures a draft length while drafting is
        # off: the drafter then drafts every request, none copies (a copied row would
        # leave the re-probe without a measurement of the drafter, and drafting off).
        self.reprobing = False
        # Whether the step being planned re-measures plain decoding (a probe chosen by
        # next_draft_len, or copying_pays's check of its reference): nothing drafts, not
        # even copies, or the step would measure something else.
        self.measuring_plain = False
        self._last_log = 0.0

    def _bucket(self, batch: int) -> Bucket:
        key = bucket_of(batch)
        bucket = self.buckets.get(key)  # not setdefault: it would build a Bucket every step
        if bucket is None:
            bucket = self.buckets[key] = Bucket()
        return bucket

    # -- input ---------------------------------------------------------------------

    def observe(self, step: StepOutcome) -> None:
        if step.seconds <= 0 or step.draft_len not in self.draft_lens or step.batch <= 0:
            return
        if step.draft_len > 0:
            accepted = (step.tokens - step.batch) / (step.batch * step.draft_len)
            self.acceptance = 0.9 * self.acceptance + 0.1 * min(1.0, max(0.0, accepted))
            self._learn_acceptance(step.draft_len, step.accepted)
        else:
            self._age_acceptance()
        bucket = self._bucket(step.batch)
        if bucket.catching_up == step.draft_len:
            # See _reprobe: next_draft_len runs this length once more. What this step
            # cost is the price of the next re-probe's catch-up (_reprobe_price).
            bucket.catch_up_seconds = step.seconds
            return
        arm = bucket.arms.get(step.draft_len)  # not setdefault: an Arm (3 deques) every step
        if arm is None:
            arm = bucket.arms[step.draft_len] = Arm()
        if sped_up(arm, step):
            bucket.off_until = 0
            if step.draft_len == 0:
                # Every cost of this bucket was measured on a slower machine: plain
                # decoding's older samples are dropped, the drafted lengths forgotten
                # (gamma is measured again in one step, the others predicted from it).
                arm.stale = True
                for n in [n for n in bucket.arms if n]:
                    del bucket.arms[n]
            else:
                bucket.plain_due = True
        arm.last_step = bucket.steps
        arm.record(step)

    def observe_copied(self, step: StepOutcome) -> None:
        """A step in which requests copied their drafts and the MDLM drafted none (the
        others decoded plainly): it says nothing about the MDLM's draft lengths, only
        whether copying pays."""
        if step.seconds <= 0 or step.batch <= 0:
            return
        self._age_acceptance()
        bucket = self._bucket(step.batch)
        if sped_up(bucket.copied, step):
            bucket.plain_due = True
        bucket.copied.last_step = bucket.steps
        bucket.copied.record(step)

    def _age_acceptance(self) -> None:
        """A step in which the MDLM drafted nothing: what the requests write changes
        meanwhile, so the evidence ages with the steps, and a re-probe after a while off
        weighs what it sees now (the content that switched drafting off may be long
        gone). Copying steps age it too: on the small pair a run that copied while the
        MDLM was off otherwise never turned the MDLM back on (0.98x, against 1.66x
        without prompt lookup, pair_bench_small_lookup at fabb67b)."""
        # Owed rather than applied: only _learn_acceptance reads the counts, and a run
        # with drafting off would otherwise rescale them every step for nothing.
        self._unapplied_age *= ACCEPTANCE_DECAY

    def _learn_acceptance(self, draft_len: int, accepted: tuple[int, ...]) -> None:
        """Decayed counts of requests that reached and passed each position. The first
        position's estimate is (passed + 1/2) / (reached + 1); a later position's is
        (passed + m a) / (reached + m), ``m = PRIOR_ROWS`` pseudo-rows at the estimate
        a of the position before it. Deep positions are reached by few rows (only those
        whose every earlier token passed), and two failures there would otherwise read
        as an acceptance near 0. With the small pair's acceptance and noisy step costs
        the controller then ran gamma 4 instead of the better 8 on a quarter of its
        steps (tests/test_units.py), and gamma 4 never drafts deep enough to learn
        otherwise."""
        # At batch 1 twenty steps are twenty rows, each accepting a few tokens or none:
        # on the small pair the tokens predicted for a gamma-4 step read 2.0 at the end
        # of one run and 3.5 at the end of another, and drafting, worth 1.3x there, went
        # off for a third of some runs. Hence the memory of at least ~64 rows.
        #
        # Positions this step did not reach age too and lean on the ones before them:
        # otherwise a short draft length, which never reaches them, keeps their last
        # (perhaps unlucky) estimates for good and never looks deeper again (a small-
        # pair run drafted 1 token on half of its steps, pair_bench_small_lookup).
        if not accepted:
            return
        decay = max(ACCEPTANCE_DECAY, ROW_DECAY ** len(accepted)) * self._unapplied_age
        self._unapplied_age = 1.0
        for i in range(self.gamma):
            reached = sum(a >= i for a in accepted) if i < draft_len else 0
            self._reached[i] = decay * self._reached[i] + reached
            self._passed[i] = decay * self._passed[i] + sum(a > i for a in accepted)
            prior, rows = (0.5, 1.0) if i == 0 else (self.position_acceptance[i - 1], PRIOR_ROWS)
            self.position_acceptance[i] = ((self._passed[i] + rows * prior)
                                           / (self._reached[i] + rows))
            self.position_evidence[i] += reached
        self._expected = self._expected_by_length()

    # -- model ---------------------------------------------------------------------

    def expected_tokens(self, draft_len: int) -> float:
        """Tokens per request of a step at this draft length: 1 + sum of the products of
        the per-position acceptance (positions never observed: the last observed one)."""
        return self._expected[draft_len]

    def _expected_by_length(self) -> list[float]:
        """``expected_tokens`` of draft lengths 0 .. gamma, in one pass."""
        totals, prefix, last = [1.0], 1.0, 0.0
        for i in range(self.gamma):
            if self.position_evidence[i]:
                last = self.position_acceptance[i]
            prefix *= last
            totals.append(totals[-1] + prefix)
        return totals

    def _measured(self, arms: dict[int, Arm]) -> list[int]:
        """Draft lengths whose cost is known: plain decoding after ``warm_samples``
        steps (every other arm is judged against it), a drafted length after one."""
        return sorted(n for n, a in arms.items()
                      if a.samples >= (self.warm_samples if n == 0 else 1))

    def _cost(self, arms: dict[int, Arm], known: list[int], draft_len: int) -> float | None:
        """Measured cost, else linear between (or beyond) the nearest measured lengths
        (``known``: ``_measured(arms)``)."""
        if draft_len in known:
            return arms[draft_len].seconds
        if len(known) < 2:
            return None
        lo = max((n for n in known if n < draft_len), default=known[0])
        hi = min((n for n in known if n > draft_len), default=known[-1])
        if lo == hi:
            lo, hi = (known[-2], known[-1]) if lo == known[-1] else (known[0], known[1])
        slope = (arms[hi].seconds - arms[lo].seconds) / (hi - lo)
        return max(1e-9, arms[lo].seconds + slope * (draft_len - lo))

    def goodput(self, batch: int, draft_len: int) -> float | None:
        """Predicted tokens/s of this draft length in this batch's bucket: the expected
        tokens of the acceptance model over the step cost (measured, or interpolated);
        None while the bucket lacks the measurements to predict it. Once the length's
        own recent steps cover ``MEASURED_ROWS`` requests, the tokens per request they
        delivered cap the prediction: the acceptance model is shared by every bucket
        and length, and a step's tokens include rows it does not model (n-gram warm-up
        rows, rows cut short by the length limit). A few rows at small batches are too
        noisy to rank by, so below that only the model counts."""
        arms = self._bucket(batch).arms
        return self._goodput(arms, self._measured(arms), batch, draft_len)

    def _rates(self, arms: dict[int, Arm], known: list[int], batch: int) -> dict[int, float]:
        """``_goodput`` of every candidate length, in one pass (it runs on every step;
        ``known`` holds 0 and gamma, so every length lies between two measured ones)."""
        rates, lo = {}, 0
        for n in self.draft_lens:
            arm = arms.get(n)
            if n in known:
                cost, lo = arm.seconds, n
            else:
                hi = next(m for m in known if m > n)
                low = arms[lo].seconds
                cost = max(1e-9, low + (arms[hi].seconds - low) * (n - lo) / (hi - lo))
            rates[n] = batch * self._tokens(arm, n) / cost
        return rates

    def _goodput(self, arms: dict[int, Arm], known: list[int], batch: int,
                 draft_len: int) -> float | None:
        cost = self._cost(arms, known, draft_len)
        if cost is None:
            return None
        return batch * self._tokens(arms.get(draft_len), draft_len) / cost

    def _tokens(self, arm: Arm | None, draft_len: int) -> float:
        """Tokens per request of a step at this length: the acceptance model's, capped
        by what the length's own recent steps delivered once they cover
        ``MEASURED_ROWS`` requests (``goodput`` says why)."""
        tokens = self._expected[draft_len]
        if draft_len and arm is not None and arm.rows_seen >= MEASURED_ROWS:
            tokens = min(tokens, arm.tokens_per_row)
        return tokens

    # -- output --------------------------------------------------------------------

    def next_draft_len(self, batch: int) -> int:
        self.reprobing = self.measuring_plain = False
        if not self.enabled or batch == 0:
            return self.gamma
        bucket = self._bucket(batch)
        bucket.steps += 1
        if bucket.steps < bucket.off_until and not bucket.plain_due:
            return 0
        known = self._measured(bucket.arms)
        if bucket.probe_steps and self._probe_lost(bucket, batch, known):
            bucket.probe_steps = 0  # the rest of the re-probe would only confirm it
        if bucket.catching_up is not None:
            choice, bucket.catching_up = bucket.catching_up, None  # the measured step
            self.reprobing = True
        elif bucket.probe_steps:
            bucket.probe_steps -= 1
            choice = bucket.probing
            self.reprobing = True
        elif bucket.plain_due and 0 in known:
            bucket.plain_due = False
            choice, self.measuring_plain = 0, True
        elif 0 not in known:
            choice = 0  # plain decoding: the reference, measured at no extra cost
        elif self.gamma not in known or self.position_evidence[0] < MIN_EVIDENCE:
            # The longest draft: its cost, and the acceptance at every position. Until
            # the drafter's acceptance has been seen at all (a request's first tokens
            # are drafted by the n-gram warm-up), nothing can be predicted.
            choice = self.gamma
        else:
            rates = self._rates(bucket.arms, known, batch)
            bar = self.min_gain * rates[0]
            paying = [n for n in self.draft_lens if n and rates[n] >= bar]
            if not paying:
                best = max((n for n in self.draft_lens if n), key=rates.get)
                if best != self.gamma and self._gamma_due(bucket, older_than=best):
                    best = self.gamma
                choice = self._reprobe(bucket, best, batch)
                self.reprobing = choice > 0
            else:
                choice = max(paying, key=rates.get)
                bucket.reprobe_at, bucket.reprobed = None, False
                if choice == self.gamma:
                    bucket.gamma_wait = 0
                if bucket.steps % self.probe_every == 0:
                    # Re-measure another arm that pays, or plain decoding (costs drift),
                    # or gamma when its cost has aged (``_gamma_due``).
                    others = [n for n in [0] + paying if n != choice]
                    if self.gamma not in paying and self._gamma_due(bucket):
                        others.append(self.gamma)
                    choice = others[(bucket.steps // self.probe_every) % len(others)]
                    self.measuring_plain = choice == 0
                    if choice == self.gamma and self.gamma not in paying:
                        bucket.gamma_wait = min(2 * (bucket.gamma_wait or self.reprobe_after),
                                                self.reprobe_max)
                        bucket.arms[self.gamma].stale = True
        self._log(bucket_of(batch), choice, batch)
        return choice

    def _gamma_due(self, bucket: Bucket, older_than: int | None = None) -> bool:
        """Whether gamma, not among the lengths that pay, has gone unmeasured long
        enough that a probe step re-measures it. Every length between 0 and gamma is
        interpolated from gamma's cost, so a gamma measured slow once (an engine's first
        steps pay one-time costs: new shapes) makes a shorter length the best
        prediction, and gamma, neither chosen nor re-probed, would keep that cost for
        good (small-pair engines then drafted 1 token or none on every step). The wait
        starts at ``reprobe_after`` steps and doubles (up to ``reprobe_max``) while gamma
        stays out, and is never shorter than ``1 / PROBE_SHARE`` times a gamma step's
        extra cost in plain steps: under load a gamma step costs many plain ones.
        ``older_than``: a re-probe measures gamma instead of that length only when
        gamma's measurement is the older one (so the two alternate)."""
        arm, plain = bucket.arms.get(self.gamma), bucket.arms.get(0)
        if arm is None or plain is None:
            return False
        other = bucket.arms.get(older_than) if older_than is not None else None
        if other is not None and other.last_step <= arm.last_step:
            return False
        wait = max(bucket.gamma_wait or self.reprobe_after,
                   (arm.seconds / plain.seconds - 1) / PROBE_SHARE)
        return bucket.steps - arm.last_step >= wait

    def copying_pays(self, batch: int) -> bool:
        """Whether requests copy their drafts from their context while the MDLM is off
        in this batch's bucket. Once plain decoding is measured: after copying has been
        seen (a step in which requests copied and the MDLM drafted none), yes for
        ``warm_samples`` steps, then while those beat plain decoding by ``min_gain``.
        Otherwise one step tries it after a wait (a re-measurement that replaces the
        older ones: what the requests write, so how much they can copy, changes): where
        copying was never seen, ``reprobe_after`` steps (under load a step in which
        every request copies can verify gamma + 1 tokens per request: not tried often
        blind); where it lost, ``probe_every`` steps times its cost in plain steps, so
        that a losing re-measurement costs ~1/``probe_every`` of the steps between them.
        The wait doubles (up to ``reprobe_max``) while copying keeps losing.

        Never on a step that re-measures plain decoding (``measuring_plain``). Copying is
        judged against plain decoding's cost, which only plain steps measure, so once a
        try has shown that copying pays, one such step follows before it goes on (plain
        decoding measured after copying, on the same machine), and one in every
        ``reprobe_after`` steps while it is on. Without them a plain cost measured while
        something else held the CPU kept copying (or an MDLM length, whose plain probes
        copied instead) on for good (``sped_up``)."""
        bucket = self.buckets.get(bucket_of(batch))
        plain = None if bucket is None else bucket.arms.get(0)
        if plain is None or plain.samples < self.warm_samples or self.measuring_plain:
            return False
        copied = bucket.copied
        if copied.samples and (copied.samples < self.warm_samples
                               or copied.rate >= self.min_gain * plain.rate):
            bucket.copy_at = None
            if copied.samples >= self.warm_samples and (
                    plain.last_step <= bucket.copy_since
                    or bucket.steps - plain.last_step >= self.reprobe_after):
                self.measuring_plain = True  # this step re-measures plain decoding
                return False
            return True
        if bucket.copy_at is None:
            bucket.copy_wait = (round(self.probe_every * max(1.0, copied.seconds / plain.seconds))
                                if copied.samples else self.reprobe_after)
            bucket.copy_at = bucket.steps + bucket.copy_wait
            return False
        if bucket.steps < bucket.copy_at:
            return False
        bucket.copy_wait = min(2 * bucket.copy_wait, self.reprobe_max)
        bucket.copy_at = bucket.steps + bucket.copy_wait
        bucket.copy_since = bucket.steps
        copied.stale = True
        return True

    def _reprobe(self, bucket: Bucket, candidate: int, batch: int) -> int:
        """Drafting is off in this bucket: 0, or once per (doubling) wait the draft
        length predicted best, measured afresh over steps that draft ``MIN_EVIDENCE``
        rows (at batch 1 a single row's luck otherwise decided the next doubled wait: a
        re-probe of a good drafter whose first token was rejected kept drafting off for
        another 128-1024 steps); with ``catch_up`` one step more, first, which is not
        measured. That step also pays for what drafting missed while it was off (the
        drafter cache re-encodes every token generated since: on the small pair at batch
        1, 13-14 ms against 9-10 for a drafted step), and measured alone it kept drafting
        off for good in runs where drafting paid 1.3x. Only with
        ``catch_up`` (a drafter with a cache): otherwise the first step is like any
        other, and is measured.

        Once a re-probe has confirmed that drafting loses, drafting stays off until the
        next one is due without the goodput of every length being predicted again on
        each step (~16 us of a 2.2 ms step on the tiny pair, in the engine), but for one
        step in ``probe_every`` (``off_until``): meanwhile only plain decoding's cost
        changes (drafted lengths and acceptance are measured by drafting), so a length
        that comes to pay is found within ``probe_every`` steps. Not before that
        re-probe: a length predicted near the bar goes on and off with plain decoding's
        measured cost from step to step (the tiny pair at batch 1, greedy), and holding
        it off for ``probe_every`` steps at each turn changed how long it ran."""
        if bucket.reprobe_at is None:
            bucket.reprobe_wait = self.reprobe_after
            bucket.reprobe_at = due = bucket.steps + bucket.reprobe_wait
        else:
            due = max(bucket.reprobe_at, bucket.reprobe_at - bucket.reprobe_wait
                      + self._reprobe_price(bucket, candidate, batch))
        if bucket.steps < due:
            if bucket.reprobed:
                bucket.off_until = min(due, bucket.steps + self.probe_every)
            return 0
        bucket.reprobe_wait = min(2 * bucket.reprobe_wait, self.reprobe_max)
        bucket.reprobe_at, bucket.reprobed = bucket.steps + bucket.reprobe_wait, True
        if candidate in bucket.arms:
            bucket.arms[candidate].stale = True
        if self.catch_up:
            bucket.catching_up = candidate
        bucket.probing, bucket.probe_steps = candidate, reprobe_steps(batch) - 1
        return candidate

    def _probe_lost(self, bucket: Bucket, batch: int, known: list[int]) -> bool:
        """Whether the re-probe under way may stop early: its steps have drafted
        ``EARLY_ROWS`` rows, and with what they showed (their cost, their acceptance)
        its length is predicted at under ``LOSING`` times plain decoding's goodput. At
        batch 1 a re-probe runs ``MIN_EVIDENCE`` steps, each of which costs several plain
        ones where drafting loses (the tiny pair at temperature 1: ~3 plain steps for
        ~1.4 tokens, ~45% of plain decoding's goodput), and the last four only confirmed
        what the first four showed. Only a clear loss stops it: a length near the bar
        is measured on every row, so that luck on four rows does not decide the next
        (doubled) wait; nor does stopping pass over shorter lengths, which are
        predicted from the acceptance these rows showed, like after a whole re-probe."""
        arm = bucket.arms.get(bucket.probing)
        if arm is None or arm.stale or arm.rows_seen < EARLY_ROWS:
            return False
        plain = self._goodput(bucket.arms, known, batch, 0)
        probed = self._goodput(bucket.arms, known, batch, bucket.probing)
        return plain is not None and probed is not None and probed < LOSING * plain

    def _reprobe_price(self, bucket: Bucket, candidate: int, batch: int) -> int:
        """Steps off that a re-probe of ``candidate`` must wait so that what it loses
        is at most ``PROBE_SHARE`` of them (at most ``reprobe_max``). What it loses, in
        plain steps: its catch-up step beyond a plain one (``catch_up``: the drafter
        cache re-encodes what it missed while drafting was off; the latest one
        measured in this bucket), and, after a re-probe that kept drafting off, each
        measured probe step's time beyond what its tokens would cost plain, from the
        candidate's own measurement once it covers ``EARLY_ROWS`` rows (times the steps
        of a whole re-probe, even where they stop early: waits no shorter than before).
        The first wait after drafting goes off leaves that second part out, so that one
        measurement of the drafter (perhaps on unlucky rows) is confirmed before it
        can hold drafting off for long; the catch-up is the machine's cost.

        Both were measured (benchmarks/controller_cost.py): on the small pair under
        load (63 requests at once) a re-probe's catch-up re-encodes every request's
        context, and its two steps cost ~3 s, 40 plain ones: re-probes after the
        doubling waits cost 19-21% of the 128-token runs they fell in
        (controller_cost_small_load_change); on the tiny pair at temperature 1 a
        batch-1 probe step costs 1.5-2.5 plain ones for ~1.4 tokens, ~2% of a run."""
        plain = bucket.arms.get(0)
        if plain is None or not plain.seconds:
            return 0
        loss = 0.0
        if self.catch_up and bucket.catch_up_seconds:
            loss += bucket.catch_up_seconds / plain.seconds - 1
        arm = bucket.arms.get(candidate)
        if bucket.reprobed and arm is not None and arm.rows_seen >= EARLY_ROWS:
            per_step = arm.seconds / plain.seconds - arm.tokens_per_row / plain.tokens_per_row
            loss += max(0.0, per_step) * reprobe_steps(batch)
        return min(round(max(0.0, loss) / PROBE_SHARE), self.reprobe_max)

    def _log(self, bucket: int, choice: int, batch: int) -> None:
        now = time.monotonic()
        if choice != self._last_choice.get(bucket) and now - self._last_log > self.log_interval_s:
            arms = self.buckets[bucket].arms
            rates = ", ".join(f"{n}: {a.rate:.0f}" for n, a in sorted(arms.items()))
            logger.info("specdiff adaptive: batch %d -> draft length %d%s (acceptance %.2f; "
                        "measured tokens/s by draft length %s)", batch, choice,
                        " (drafting off)" if choice == 0 else "", self.acceptance, rates)
            self._last_log = now
        self._last_choice[bucket] = choice
