"""The draft length of each step, chosen from measured goodput.

Whether drafting ``draft_len`` tokens pays depends on the acceptance of this drafter on
this traffic, on the batch size (verification is nearly free at batch 1 and costs real
compute at batch 32) and on the machine. Rather than model all of that, each candidate
draft length (0 = no drafting, 1, 2, 4, ..., gamma) is measured where it runs:
goodput = tokens produced per second of the whole step cycle (drafting, target pass,
verification, scheduling), an exponential average per batch-size bucket. A new bucket
measures each candidate briefly, starting next to the best one of the nearest measured
bucket; then each step uses its bucket's best and now and then re-measures another, so
the choice follows the traffic.

One input, one output: ``observe(StepOutcome)`` after each decode step, and
``next_draft_len(batch)`` before drafting the next one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

logger = logging.getLogger("vllm.specdiff")


@dataclass(frozen=True)
class StepOutcome:
    """One decode step cycle (prompt steps are not measured: their cost says nothing
    about the draft length)."""

    batch: int  # requests that took part
    draft_len: int  # the draft length chosen for the step
    tokens: int  # tokens the step produced (accepted drafts + one per request)
    seconds: float  # wall time from this step's drafting to the next one's


def candidate_draft_lens(gamma: int) -> list[int]:
    lens, n = {0, gamma}, 1
    while n < gamma:
        lens.add(n)
        n *= 2
    return sorted(lens)


def bucket_of(batch: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, ... share a bucket."""
    return max(0, (batch - 1).bit_length())


class AdaptiveDraftLength:
    def __init__(self, gamma: int, enabled: bool = True, ema: float = 0.2,
                 warm_samples: int = 2, probe_every: int = 24, log_interval_s: float = 10.0):
        self.gamma = gamma
        self.enabled = enabled
        self.draft_lens = candidate_draft_lens(gamma)
        self.ema = ema
        self.warm_samples = warm_samples
        self.probe_every = probe_every
        self.log_interval_s = log_interval_s
        # bucket -> draft_len -> [ema goodput (tokens/s), samples]
        self.goodput: dict[int, dict[int, list[float]]] = {}
        self.acceptance = 0.0  # accepted / drafted tokens (ema), for the logs
        self._steps = 0
        self._last_choice: dict[int, int] = {}
        self._last_log = 0.0

    def observe(self, step: StepOutcome) -> None:
        if step.seconds <= 0 or step.draft_len not in self.draft_lens or step.batch <= 0:
            return
        if step.draft_len > 0:
            accepted = (step.tokens - step.batch) / (step.batch * step.draft_len)
            self.acceptance = 0.9 * self.acceptance + 0.1 * min(1.0, max(0.0, accepted))
        stats = self.goodput.setdefault(bucket_of(step.batch), {}).setdefault(step.draft_len, [0.0, 0])
        rate = step.tokens / step.seconds
        if stats[1] and rate < stats[0] / 20:  # an idle gap, not a step: ignore
            return
        stats[0] = rate if stats[1] == 0 else (1 - self.ema) * stats[0] + self.ema * rate
        stats[1] += 1

    def next_draft_len(self, batch: int) -> int:
        if not self.enabled or batch == 0:
            return self.gamma
        self._steps += 1
        bucket = bucket_of(batch)
        stats = self.goodput.get(bucket, {})
        measured = [n for n in self.draft_lens if stats.get(n, (0.0, 0))[1] >= self.warm_samples]
        untried = [n for n in self.draft_lens if n not in measured]
        if untried:
            # Measure every candidate of a new bucket briefly, nearest to the best one
            # of the nearest measured bucket first (longest first when nothing is known).
            anchor = self.draft_lens.index(self._nearest_best(bucket))
            choice = min(untried, key=lambda n: (abs(self.draft_lens.index(n) - anchor), -n))
        else:
            ranked = sorted(measured, key=lambda n: stats[n][0], reverse=True)
            choice = ranked[0]
            if self._steps % self.probe_every == 0:  # re-measure the others in turn
                others = ranked[1:]
                choice = others[(self._steps // self.probe_every) % len(others)]
        self._log(bucket, choice, batch, stats)
        return choice

    def _nearest_best(self, bucket: int) -> int:
        """Best measured draft length of the nearest bucket with measurements (else gamma)."""
        for b in sorted(self.goodput, key=lambda b: abs(b - bucket)):
            stats = {n: s for n, s in self.goodput[b].items() if s[1] >= self.warm_samples}
            if stats:
                return max(stats, key=lambda n: stats[n][0])
        return self.gamma

    def _log(self, bucket: int, choice: int, batch: int, stats) -> None:
        now = time.monotonic()
        if choice != self._last_choice.get(bucket) and now - self._last_log > self.log_interval_s:
            rates = ", ".join(f"{n}: {s[0]:.0f}" for n, s in sorted(stats.items()))
            logger.info("specdiff adaptive: batch %d -> draft length %d%s (acceptance %.2f; "
                        "measured tokens/s by draft length %s)", batch, choice,
                        " (drafting off)" if choice == 0 else "", self.acceptance, rates)
            self._last_log = now
        self._last_choice[bucket] = choice
