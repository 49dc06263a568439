"""The benchmarks' round protocol: no method may always run in the same place in a round.

On this VM a run's speed depended on its place in the round (floor.py's small pair at
batch 32, greedy, 5 rounds at 19716cb: first ~553, second ~527, third ~505 tokens/s on
average over the three engines), so a fixed A B C order charged the last-listed methods
for it.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from spec_bench import run_rounds  # noqa: E402


class RecordingEngines:
    """Stands in for spec_bench.Engines: records the order in which methods run."""

    def __init__(self):
        self.order: list[str] = []

    def run(self, method, prompts, max_tokens, temperature, arrive_after=None):
        self.order.append(method)
        return {"tokens": 1, "seconds": 1.0, "mean_running": 1.0}


def test_rounds_rotate_so_every_method_takes_every_place_equally():
    engines, methods = RecordingEngines(), ["A", "B", "C"]
    method_objects = [type("M", (), {"name": m})() for m in methods]
    runs = run_rounds(engines, method_objects, [], 8, 0.0, 6, lambda _: None, "cell")
    timed = [m.name for m in engines.order[len(methods):]]  # after the warm-up round
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == methods for r in rounds)
    places = collections.Counter((m, r.index(m)) for r in rounds for m in r)
    assert set(places.values()) == {2}  # each method twice in each of the 3 places
    assert {name: len(v) for name, v in runs.items()} == dict.fromkeys(methods, 6)
