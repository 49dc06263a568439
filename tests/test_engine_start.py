"""Engine start: the plugin is found by vLLM on its own, accepts every way users
configure specdiff, and rejects bad settings with one clear message."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import DRAFTER, TARGET, close_engine, engine_kwargs

from vllm_specdiff.loader import save_mdlm
from vllm_specdiff.model import MDLM, MDLMConfig

pytestmark = pytest.mark.slow


def start(speculative_config, target=TARGET, **kw):
    from vllm import LLM

    return LLM(model=str(target), speculative_config=speculative_config,
               **engine_kwargs(max_num_seqs=4, **kw))


def spec(**settings):
    return {"method": "specdiff", "model": str(DRAFTER), "num_speculative_tokens": 8, **settings}


@pytest.mark.parametrize("settings,message", [
    (spec(num_speculative_tokens=0), "num_speculative_tokens=0 is invalid for method 'specdiff': gamma must be an integer in [1, 64]"),
    (spec(num_speculative_tokens=65), "num_speculative_tokens=65 is invalid for method 'specdiff': gamma must be an integer in [1, 64]"),
    (spec(diffusion_steps=0), "diffusion_steps=0 is invalid for method 'specdiff': T must be an integer in [1, num_speculative_tokens=8]"),
    (spec(diffusion_steps=9), "diffusion_steps=9 is invalid for method 'specdiff': T must be an integer in [1, num_speculative_tokens=8]"),
    (spec(schedule="zigzag"), "schedule='zigzag' is invalid for method 'specdiff': must be one of"),
    (spec(steps=2), "unknown setting(s) ['steps'] for method 'specdiff'"),
    (spec(context_window=100000), "context_window=100000 is invalid for method 'specdiff'"),
    (spec(model="/nonexistent/drafter"), "speculative model '/nonexistent/drafter': no such folder"),
    (spec(drafter_cache="exact"), "drafter_cache='exact' is invalid for drafter"),
])
def test_bad_setting_fails_engine_start_with_one_clear_message(settings, message):
    with pytest.raises(ValueError) as err:
        start(settings)
    assert message in str(err.value)


def test_vocab_mismatch_names_both_sizes(tmp_path):
    from vllm_specdiff.loader import read_config

    target_vocab = read_config(DRAFTER).vocab_size - 1
    wrong = MDLM(MDLMConfig(vocab_size=target_vocab + 7, model_length=128, hidden_dim=32,
                            cond_dim=16, n_blocks=1, n_heads=2))
    save_mdlm(wrong, tmp_path / "wrong")
    with pytest.raises(ValueError) as err:
        start(spec(model=str(tmp_path / "wrong")))
    msg = str(err.value)
    assert f"drafter vocab_size={target_vocab + 7}" in msg
    assert f"target vocab_size={target_vocab}" in msg


def test_random_drafter_in_mdlm_owt_layout_drafts_for_gpt2_target(random_gpt2_pair):
    """vocab 50258 = GPT-2 + mask: loads, drafts, and greedy output stays the target's."""
    from vllm import LLM, SamplingParams

    from vllm_specdiff.metrics import from_metrics

    target, drafter = random_gpt2_pair
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = ["Hello world, this is a test of", "The quick brown fox"]
    llm = LLM(model=str(target), **engine_kwargs(max_num_seqs=4, max_model_len=256))
    try:
        ref = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        close_engine(llm)
    llm = start({"method": "specdiff", "model": str(drafter), "num_speculative_tokens": 4,
                 "diffusion_steps": 2, "adaptive": False, "warmup_tokens": 0,
                 "prompt_lookup_min": 0},  # every draft from the MDLM: full length each
                target=target, max_model_len=256)
    try:
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = from_metrics(llm.get_metrics())
    finally:
        close_engine(llm)
    assert out == ref
    assert stats.drafts > 0 and stats.draft_tokens == 4 * stats.drafts


def run_fresh_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd="/",
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_plugin_found_through_entry_point_in_fresh_process():
    """A process that never imports vllm_specdiff gets specdiff from vLLM's plugin
    loading alone, and both the flags and the offline API work."""
    code = f"""
        import sys
        from vllm import LLM, SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
        args = parser.parse_args(["--model", "{TARGET}", "--speculative-model", "{DRAFTER}",
                                  "--speculative-method", "specdiff"])
        engine_args = AsyncEngineArgs.from_cli_args(args)
        assert (engine_args.spec_method, engine_args.spec_model) == ("specdiff", "{DRAFTER}"), engine_args

        llm = LLM(model="{TARGET}", speculative_config={{"method": "specdiff", "model": "{DRAFTER}",
                  "num_speculative_tokens": 4}}, dtype="float32", enforce_eager=True,
                  max_model_len=256, max_num_seqs=2, gpu_memory_utilization=0.3)
        out = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=8))
        assert len(out[0].outputs[0].token_ids) == 8
        print("loaded-by-entry-point", "vllm_specdiff" in sys.modules)
    """
    proc = run_fresh_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded-by-entry-point True" in proc.stdout
