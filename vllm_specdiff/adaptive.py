"""Gamma that adapts to load and acceptance, and stops drafting when it cannot pay.

With per-token acceptance rate a (observed, exponentially averaged), drafting k
tokens yields on average E(k) = (1 - a^(k+1)) / (1 - a) tokens per target pass.
A step costs the target pass over (k + 1) tokens per request plus the drafter's
passes. Relative to plain decoding (1 token per request per step, cost 1):

    speedup(k) = E(k) / (1 + verify_cost * batch * k + draft_cost)

``verify_cost`` is the extra target cost of one more token per request (grows
with the batch once the target is compute bound); ``draft_cost`` the drafter's
share. We pick the k in 0..gamma with the best predicted speedup; k = 0 means
"do not draft this step". Both costs are learned from measured step times by the
runner patch (``observe_timing``); the defaults are conservative.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.specdiff")


class AdaptiveGamma:
    def __init__(self, gamma: int, enabled: bool = True, max_num_seqs: int = 256,
                 prior_acceptance: float = 0.7, ema: float = 0.1):
        self.gamma = gamma
        self.enabled = enabled
        self.max_num_seqs = max_num_seqs
        self.acceptance = prior_acceptance
        self.ema = ema
        # Cost per extra verified token per request, and drafter cost, both as a
        # fraction of one plain decode step; refined by observe_timing().
        self.verify_cost_per_token = 0.01
        self.draft_cost = 0.3
        self._last_choice: int | None = None
        self._probe_every = 50  # re-test drafting now and then after switching off
        self._steps_off = 0

    def observe(self, num_accepted: int, num_rejections: int) -> None:
        """One verification step: accepted draft tokens and requests that hit a
        rejection. Each accepted token and each rejection is one accept test, so
        accepted / (accepted + rejections) estimates the per-token rate without
        the bias of counting untested tokens after a rejection."""
        tests = num_accepted + num_rejections
        if tests <= 0:
            return
        rate = min(num_accepted / tests, 0.999)
        self.acceptance = (1 - self.ema) * self.acceptance + self.ema * rate

    def observe_timing(self, verify_cost_per_token: float, draft_cost: float) -> None:
        self.verify_cost_per_token = max(0.0, verify_cost_per_token)
        self.draft_cost = max(0.0, draft_cost)

    def expected_tokens(self, k: int) -> float:
        a = self.acceptance
        return (1 - a ** (k + 1)) / (1 - a)

    def predicted_speedup(self, k: int, batch: int) -> float:
        if k == 0:
            return 1.0
        cost = 1.0 + self.verify_cost_per_token * batch * k + self.draft_cost
        return self.expected_tokens(k) / cost

    def next_gamma(self, batch: int) -> int:
        if not self.enabled or batch == 0:
            return self.gamma
        best = max(range(self.gamma + 1), key=lambda k: self.predicted_speedup(k, batch))
        if best == 0:
            # Keep measuring now and then so drafting can resume when it pays again.
            self._steps_off += 1
            if self._steps_off % self._probe_every == 0:
                best = max(1, self.gamma // 2)
        else:
            self._steps_off = 0
        if best != self._last_choice:
            logger.info("specdiff: adaptive gamma %s -> %d (batch %d, acceptance %.2f)",
                        self._last_choice, best, batch, self.acceptance)
            self._last_choice = best
        return best

