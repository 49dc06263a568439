"""The GPU pack cannot rot between the sessions that have a GPU: its smoke run (the same
code at toy sizes, on the CPU) and the projection from its output run in every test run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_and_projection(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    sections = {r["section"] for r in rows}
    assert {"tests", "copy", "verify", "drafter", "drafter_pass", "target", "ar"} <= sections
    tests = next(r for r in rows if r["section"] == "tests")
    assert tests["returncode"] == 0 and "passed" in tests["summary"], tests
    assert all(r["requests_differ"] == 0 for r in rows if r["section"] == "verify")
    assert {r["path"] for r in rows if r["section"] == "drafter"} == {"greedy", "sampled"}
    assert sorted(p.name for p in out.iterdir()) == ["env.json", "results.jsonl", "summary.md",
                                                     "unit_tests.log"]
    assert "## MDLM drafter" in (out / "summary.md").read_text()

    # A per-position acceptance profile in spec_bench.py's JSON layout.
    acceptance = tmp_path / "acceptance.json"
    acceptance.write_text(json.dumps({"commit": "test", "command": "test", "profiles": [
        {"method": "specdiff", "gamma": 4, "steps": 2, "temperature": 0, "batch": 1,
         "per_position": [0.8, 0.6, 0.4, 0.2]},
        {"method": "draft_model", "gamma": 4, "temperature": 0, "batch": 1,
         "per_position": [0.9, 0.7, 0.5, 0.3]}]}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "project_speedup.py"),
                           "--parts", str(out / "results.jsonl"), "--acceptance", str(acceptance)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (out / "projection.md").read_text()
    assert "| measured | specdiff |" in report and "| measured | draft_model |" in report
    # E = 1 + 0.8 + 0.6 + 0.4 + 0.2 for the specdiff rows at gamma 4
    assert "| 3.00 |" in report
