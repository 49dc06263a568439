"""The benchmarks' round protocol: no method may always run in the same place in a round.

On this VM a run's speed depended on its place in the round (floor.py's small pair at
batch 32, greedy, 5 rounds at 19716cb: first ~553, second ~527, third ~505 tokens/s on
average over the three engines), so a fixed A B C order charged the last-listed methods
for it. Engines built alike also differ (three plain-decoding engines read 0.97-1.05x of
each other over 12 rounds, the fast one changing from build to build), so a cell can pool
the rounds of several builds.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import spec_bench  # noqa: E402
from spec_bench import pooled_runs, run_rounds  # noqa: E402


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
    order = [m.name for m in engines.order]
    follows = collections.Counter(zip(order[len(methods):], order[len(methods) + 1:]))
    pairs = [(a, b) for a in methods for b in methods if a != b]
    # every method runs right after every other one, about equally often
    assert set(follows) == set(pairs) and max(follows.values()) - min(follows.values()) <= 1
    assert {name: len(v) for name, v in runs.items()} == dict.fromkeys(methods, 6)


def test_pooled_runs_start_each_build_in_another_order_and_pool_the_rounds(monkeypatch):
    started, closed = [], []

    class FakeEngines:
        def __init__(self, methods, max_num_seqs):
            started.append([m.name for m in methods])

        def close(self):
            closed.append(True)

    monkeypatch.setattr(spec_bench, "Engines", FakeEngines)
    methods = [type("M", (), {"name": m})() for m in "ABC"]

    def run(engines, build):
        return {0.0: {m.name: [{"build": build}] for m in methods}}

    pooled = pooled_runs(methods, 4, 3, run)
    assert started == [["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"]]
    assert len(closed) == 3
    assert {name: [r["build"] for r in rs] for name, rs in pooled[0.0].items()} == \
        dict.fromkeys("ABC", [0, 1, 2])
