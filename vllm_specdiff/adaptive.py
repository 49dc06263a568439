"""Gamma that adapts to load and acceptance, and stops drafting when it cannot pay.

Whether drafting k tokens pays depends on the acceptance of this drafter on this
traffic, on the batch size (verification is nearly free at batch 1 and costs real
compute at batch 32) and on the machine. Rather than model all of that, each
candidate k (``arms``: 0 = no drafting, 1, 2, 4, ..., gamma) is measured where it
runs: goodput = tokens produced per second of the whole step cycle (drafting,
target pass, verification, scheduling), an exponential average per batch-size
bucket. A new bucket measures each arm briefly, starting next to the best arm of
the nearest measured bucket; then each step uses the best arm of its bucket and now
and then another arm is re-measured, so the choice follows the traffic. Prompt
(prefill) steps are not measured: their cost says nothing about k.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("vllm.specdiff")


def arms_for(gamma: int) -> list[int]:
    arms, k = {0, gamma}, 1
    while k < gamma:
        arms.add(k)
        k *= 2
    return sorted(arms)


def bucket_of(batch: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, ... share a bucket."""
    return max(0, (batch - 1).bit_length())


class AdaptiveGamma:
    def __init__(self, gamma: int, enabled: bool = True, ema: float = 0.2,
                 warm_samples: int = 2, probe_every: int = 24, log_interval_s: float = 10.0):
        self.gamma = gamma
        self.enabled = enabled
        self.arms = arms_for(gamma)
        self.ema = ema
        self.warm_samples = warm_samples
        self.probe_every = probe_every
        self.log_interval_s = log_interval_s
        # bucket -> arm -> [ema goodput (tokens/s), samples]
        self.goodput: dict[int, dict[int, list[float]]] = {}
        self.acceptance = 0.0  # per-token acceptance rate, for the logs
        self._steps = 0
        self._last_choice: dict[int, int] = {}
        self._last_log = 0.0

    # -- observations ------------------------------------------------------------

    def observe(self, num_accepted: int, num_rejections: int) -> None:
        """Accepted draft tokens and requests that hit a rejection in one verification
        (accepted / (accepted + rejections) estimates the per-token rate)."""
        tests = num_accepted + num_rejections
        if tests > 0:
            self.acceptance = 0.9 * self.acceptance + 0.1 * (num_accepted / tests)

    def observe_step(self, batch: int, arm: int, tokens: int, seconds: float) -> None:
        """A decode step cycle that verified drafts of length `arm`."""
        if seconds <= 0 or arm not in self.arms:
            return
        stats = self.goodput.setdefault(bucket_of(batch), {}).setdefault(arm, [0.0, 0])
        rate = tokens / seconds
        if stats[1] and rate < stats[0] / 20:  # an idle gap, not a step: ignore
            return
        stats[0] = rate if stats[1] == 0 else (1 - self.ema) * stats[0] + self.ema * rate
        stats[1] += 1

    # -- decision ------------------------------------------------------------------

    def next_gamma(self, batch: int) -> int:
        if not self.enabled or batch == 0:
            return self.gamma
        self._steps += 1
        bucket = bucket_of(batch)
        stats = self.goodput.get(bucket, {})
        measured = [a for a in self.arms if stats.get(a, (0.0, 0))[1] >= self.warm_samples]
        untried = [a for a in self.arms if a not in measured]
        probe = self._steps % self.probe_every == 0
        if untried:
            # Measure every arm of a new bucket briefly, nearest to the best arm of
            # the nearest measured bucket first (largest first when nothing is known).
            anchor = self._nearest_best(bucket)
            choice = min(untried, key=lambda a: (abs(self.arms.index(a) - self.arms.index(anchor)), -a))
        else:
            ranked = sorted(measured, key=lambda a: stats[a][0], reverse=True)
            choice = ranked[0]
            if probe:  # re-measure the other arms in turn
                others = ranked[1:]
                choice = others[(self._steps // self.probe_every) % len(others)]
        self._log(bucket, choice, batch, stats)
        return choice

    def _nearest_best(self, bucket: int) -> int:
        """Best measured arm of the nearest bucket that has measurements (else gamma)."""
        for b in sorted(self.goodput, key=lambda b: abs(b - bucket)):
            stats = {a: s for a, s in self.goodput[b].items() if s[1] >= self.warm_samples}
            if stats:
                return max(stats, key=lambda a: stats[a][0])
        return self.gamma

    def _log(self, bucket: int, choice: int, batch: int, stats) -> None:
        now = time.monotonic()
        if choice != self._last_choice.get(bucket) and now - self._last_log > self.log_interval_s:
            rates = ", ".join(f"k={a}: {s[0]:.0f}" for a, s in sorted(stats.items()))
            logger.info("specdiff adaptive: batch %d -> gamma %d%s (acceptance %.2f; "
                        "measured tokens/s %s)", batch, choice,
                        " (drafting off)" if choice == 0 else "", self.acceptance, rates)
            self._last_log = now
        self._last_choice[bucket] = choice
