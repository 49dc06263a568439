"""Gamma that adapts to load and acceptance, and stops drafting when it cannot pay.

With a per-token acceptance rate a (observed, exponentially averaged), drafting k
tokens yields on average E(k) = (1 - a^(k+1)) / (1 - a) tokens per target pass.
A target step over n scheduled tokens takes t(n) = base + per_token * n (fitted
online from measured steps); the drafter takes d seconds per proposal (measured).
For a batch of b requests, relative to plain decoding:

    speedup(k) = E(k) * t(b) / (t(b * (k + 1)) + d)

Each step drafts the k in 0..gamma with the best predicted speedup; k = 0 means no
drafting at all. While switched off, a probe step drafts now and then, so the
estimates stay fresh and drafting resumes when it pays again.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("vllm.specdiff")


class LinearCostFit:
    """Exponentially weighted least squares of seconds = base + per_token * tokens."""

    def __init__(self, decay: float = 0.98):
        self.decay = decay
        self.sw = self.sn = self.st = self.snn = self.snt = 0.0

    def add(self, tokens: float, seconds: float) -> None:
        d = self.decay
        self.sw = d * self.sw + 1.0
        self.sn = d * self.sn + tokens
        self.st = d * self.st + seconds
        self.snn = d * self.snn + tokens * tokens
        self.snt = d * self.snt + tokens * seconds

    @property
    def fitted(self) -> bool:
        return self.sw >= 3.0

    def coefficients(self) -> tuple[float, float]:
        if self.sw == 0:
            return 0.0, 0.0
        mean_n, mean_t = self.sn / self.sw, self.st / self.sw
        var_n = self.snn / self.sw - mean_n * mean_n
        per_token = 0.0
        if var_n > 1e-9 * max(1.0, mean_n * mean_n):
            per_token = max(0.0, (self.snt / self.sw - mean_n * mean_t) / var_n)
        base = max(mean_t - per_token * mean_n, 1e-6)
        return base, per_token

    def predict(self, tokens: float) -> float:
        base, per_token = self.coefficients()
        return base + per_token * tokens


class AdaptiveGamma:
    def __init__(self, gamma: int, enabled: bool = True, prior_acceptance: float = 0.7,
                 ema: float = 0.1, probe_every: int = 32, log_interval_s: float = 10.0):
        self.gamma = gamma
        self.enabled = enabled
        self.acceptance = prior_acceptance
        self.ema = ema
        self.target_cost = LinearCostFit()
        self.draft_seconds = 0.0
        self.probe_every = probe_every
        self.log_interval_s = log_interval_s
        self._steps_off = 0
        self._last_choice: int | None = None
        self._last_log = 0.0

    # -- observations ------------------------------------------------------------

    def observe(self, num_accepted: int, num_rejections: int) -> None:
        """One verification: accepted draft tokens, and requests that hit a rejection.
        Each accepted token and each rejection is one accept test, so accepted /
        (accepted + rejections) estimates the per-token rate without counting the
        untested tokens after a rejection."""
        tests = num_accepted + num_rejections
        if tests > 0:
            rate = min(num_accepted / tests, 0.999)
            self.acceptance = (1 - self.ema) * self.acceptance + self.ema * rate

    def observe_target_step(self, num_tokens: int, seconds: float) -> None:
        self.target_cost.add(num_tokens, seconds)

    def observe_draft(self, seconds: float) -> None:
        self.draft_seconds = (seconds if self.draft_seconds == 0.0
                              else (1 - self.ema) * self.draft_seconds + self.ema * seconds)

    # -- decision ------------------------------------------------------------------

    def expected_tokens(self, k: int) -> float:
        a = self.acceptance
        return (1 - a ** (k + 1)) / (1 - a)

    def predicted_speedup(self, k: int, batch: int) -> float:
        if k == 0:
            return 1.0
        if not self.target_cost.fitted:
            return self.expected_tokens(k)  # optimistic until there is data
        plain = self.target_cost.predict(batch)
        spec = self.target_cost.predict(batch * (k + 1)) + self.draft_seconds
        return self.expected_tokens(k) * plain / spec

    def next_gamma(self, batch: int) -> int:
        if not self.enabled or batch == 0:
            return self.gamma
        best = max(range(self.gamma + 1), key=lambda k: self.predicted_speedup(k, batch))
        if best == 0:
            self._steps_off += 1
            if self._steps_off % self.probe_every == 0:
                best = max(1, self.gamma // 2)  # probe: keep the estimates fresh
        else:
            self._steps_off = 0
        self._log(best, batch)
        return best

    def _log(self, choice: int, batch: int) -> None:
        # At most one line per interval: decisions can change every step.
        now = time.monotonic()
        if choice != self._last_choice and now - self._last_log > self.log_interval_s:
            base, per_token = self.target_cost.coefficients()
            logger.info(
                "specdiff adaptive: gamma %s -> %d at batch %d (acceptance %.2f, target step "
                "%.2f ms + %.3f ms/token, drafter %.2f ms, predicted speedup %.2fx)%s",
                self._last_choice, choice, batch, self.acceptance, base * 1e3, per_token * 1e3,
                self.draft_seconds * 1e3, self.predicted_speedup(choice, batch),
                " - drafting off" if choice == 0 else "")
            self._last_choice = choice
            self._last_log = now
