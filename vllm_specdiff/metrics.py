"""Speculative-decoding acceptance figures from vLLM's own counters.

vLLM counts drafts, draft tokens, accepted tokens and accepted tokens per draft
position (``vllm:spec_decode_*``, also on a server's ``/metrics``). From them:
mean accepted length tau = 1 + accepted / drafts (tokens per target pass, bonus
included) and per-position acceptance = accepted at position j / drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PREFIX = "vllm:spec_decode_"


@dataclass
class SpecDecodeStats:
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / self.drafts if self.drafts else 0.0 for a in self.accepted_per_position]

    def __sub__(self, other: "SpecDecodeStats") -> "SpecDecodeStats":
        n = max(len(self.accepted_per_position), len(other.accepted_per_position))
        pad = lambda v: list(v) + [0] * (n - len(v))  # noqa: E731
        return SpecDecodeStats(
            self.drafts - other.drafts,
            self.draft_tokens - other.draft_tokens,
            self.accepted_tokens - other.accepted_tokens,
            [a - b for a, b in zip(pad(self.accepted_per_position),
                                   pad(other.accepted_per_position))],
        )

    def summary(self) -> str:
        per_pos = " ".join(f"{a:.2f}" for a in self.per_position_acceptance)
        return (f"mean accepted length {self.mean_accepted_length:.2f} tokens/step, "
                f"acceptance rate {self.acceptance_rate:.2f}, per position [{per_pos}]")


def from_metrics(metrics) -> SpecDecodeStats:
    """From ``LLM.get_metrics()`` (needs ``disable_log_stats=False``)."""
    stats = SpecDecodeStats()
    for m in metrics:
        if not m.name.startswith(PREFIX):
            continue
        key = m.name[len(PREFIX):]
        if key == "num_drafts":
            stats.drafts += int(m.value)
        elif key == "num_draft_tokens":
            stats.draft_tokens += int(m.value)
        elif key == "num_accepted_tokens":
            stats.accepted_tokens += int(m.value)
        elif key == "num_accepted_tokens_per_pos":
            values = list(m.values)
            cur = stats.accepted_per_position
            cur.extend([0] * (len(values) - len(cur)))
            for j, v in enumerate(values):
                cur[j] += int(v)
    return stats
