"""Every change vllm-specdiff makes to vLLM 0.32.0, in one place.

Each patch wraps one vLLM function and keeps the original in ``ORIGINALS``; all
of them are no-ops unless the speculative method is ``specdiff``.

Engine arguments (front-end process):
1. ``EngineArgs.add_cli_args``: adds ``--speculative-model`` / ``--speculative-method``
   (flags vLLM dropped; users still type them).
2. ``EngineArgs.from_cli_args``: folds those flags into ``speculative_config``.
3. ``EngineArgs.create_speculative_config``: validates the specdiff settings, finds
   and checks the drafter (errors here fail engine start with one message), stores
   the settings in ``additional_config["specdiff"]`` and hands vLLM a
   ``custom_class`` config that names our proposer (vLLM's ``method`` is a closed
   Literal; custom_class is its supported extension point).

Model runner (worker process):
4. ``GPUModelRunner.__init__``: swaps in ``SpecDiffRejectionSampler`` (our verifier).
5. ``GPUModelRunner.propose_draft_token_ids``: calls our proposer with the batch's
   temperatures and seeds, and keeps its q for the verifier (vLLM discards draft
   probabilities of custom proposers). The CPU runner inherits both.

vLLM CPU platform (every process):
6. ``vllm.triton_utils.dispatcher._rebind_kernels``: vLLM's scan of every module
   for Triton kernels crashes once numba/llvmlite is imported (``llvmlite``'s
   library wrapper answers ``__dict__`` with a function wrapper), which happens
   as soon as an n-gram proposer (our warm-up drafting, or vLLM's ngram method)
   has run in the process; the next CPU engine then fails to start. The copy
   below only skips such objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import types
from typing import Any, Callable

from vllm_specdiff.config import METHOD, SpecDiffConfig, SpecDiffConfigError
from vllm_specdiff.loader import read_config, resolve_drafter
from vllm_specdiff.proposer import ADDITIONAL_CONFIG_KEY, SpecDiffProposer

logger = logging.getLogger("vllm.specdiff")

PROPOSER_CLASS_PATH = "vllm_specdiff.proposer.SpecDiffProposer"
ORIGINALS: dict[str, Callable] = {}


def _keep(owner: Any, name: str) -> Callable:
    key = f"{getattr(owner, '__qualname__', owner.__name__)}.{name}"
    ORIGINALS.setdefault(key, owner.__dict__[name])
    return ORIGINALS[key]


# -- 1-3: engine arguments ------------------------------------------------------

def _add_cli_args(original):
    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        group = parser.add_argument_group("SpecDiff (vllm-specdiff plugin)")
        group.add_argument(
            "--speculative-model", dest="speculative_model", default=None,
            help="Draft model for speculative decoding; with --speculative-method "
                 "specdiff an MDLM folder, a cached HF repo id, or 'mdlm'.")
        group.add_argument(
            "--speculative-method", dest="speculative_method", default=None,
            help="Speculative decoding method, e.g. 'specdiff'. Further specdiff "
                 "settings go in --speculative-config.")
        return parser
    return add_cli_args


def _from_cli_args(original):
    @functools.wraps(original)
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original.__func__(cls, args)
        flags = {"model": getattr(args, "speculative_model", None),
                 "method": getattr(args, "speculative_method", None)}
        flags = {k: v for k, v in flags.items() if v is not None}
        if flags:
            spec = dict(engine_args.speculative_config or {})
            for key, value in flags.items():
                if key in spec and spec[key] != value:
                    raise ValueError(
                        f"--speculative-{key}={value!r} conflicts with "
                        f"--speculative-config {key}={spec[key]!r}")
                spec[key] = value
            engine_args.speculative_config = spec
        return engine_args
    return classmethod(from_cli_args)


def check_drafter(cfg: SpecDiffConfig, target_model_config) -> None:
    """Engine-start checks that need the drafter's config.json and the target."""
    drafter = read_config(cfg.drafter_path)
    target_vocab = target_model_config.get_vocab_size()
    if drafter.vocab_size != target_vocab + 1:
        raise SpecDiffConfigError(
            f"speculative model {cfg.drafter_path}: drafter vocab_size={drafter.vocab_size} "
            f"does not fit target vocab_size={target_vocab}; an MDLM drafter must have the "
            f"target's vocabulary plus one mask token ({target_vocab + 1})")
    limit = drafter.model_length - cfg.gamma
    if cfg.context_window > limit:
        raise SpecDiffConfigError(
            f"speculative_config.context_window={cfg.context_window} is invalid for method "
            f"'specdiff': W + num_speculative_tokens must fit the drafter's model_length "
            f"{drafter.model_length}, so W must be in [1, {limit}]")


def _create_speculative_config(original):
    @functools.wraps(original)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        spec = self.speculative_config
        if isinstance(spec, dict) and spec.get("method") == METHOD:
            settings = {k.replace("-", "_"): v for k, v in spec.items()}
            cfg = SpecDiffConfig.from_user(settings)
            cfg = dataclasses.replace(
                cfg, drafter_path=resolve_drafter(cfg.model, target_model_config.model))
            check_drafter(cfg, target_model_config)
            self.additional_config = {**(self.additional_config or {}),
                                      ADDITIONAL_CONFIG_KEY: cfg.to_json()}
            self.speculative_config = {
                "method": "custom_class",
                "model": PROPOSER_CLASS_PATH,
                "num_speculative_tokens": cfg.gamma,
            }
            logger.info("specdiff: settings %s", cfg.to_json())
        return original(self, target_model_config, target_parallel_config)
    return create_speculative_config


# -- 4-5: model runner ----------------------------------------------------------

def _runner_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, SpecDiffProposer):
            from vllm_specdiff.verification import SpecDiffRejectionSampler

            self.rejection_sampler = SpecDiffRejectionSampler(
                self.sampler, self.speculative_config, self.device, proposer=drafter)
    return __init__


def _is_pure_decode(scheduler_output) -> bool:
    """No prompt tokens in the step: every request ran 1 token plus its drafts."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    return not scheduler_output.scheduled_new_reqs and all(
        n == 1 + len(spec.get(req_id, ()))
        for req_id, n in scheduler_output.num_scheduled_tokens.items())


def _propose_draft_token_ids(original):
    @functools.wraps(original)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        if not isinstance(drafter, SpecDiffProposer):
            return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        self._draft_probs = None
        self._draft_prob_req_ids = None
        drafts = drafter.propose(
            sampled_token_ids,
            self.input_batch.num_tokens_no_spec,
            self.input_batch.token_ids_cpu,
            input_batch=self.input_batch,
            pure_decode=_is_pure_decode(scheduler_output),
        )
        probs = drafter.take_last_draft_probs()
        if probs is not None:
            self._draft_probs = probs
            self._draft_prob_req_ids = self.input_batch.req_ids.copy()
        return drafts
    return propose_draft_token_ids


# -- 6: vLLM CPU kernel-override scan -----------------------------------------------

def _rebind_kernels_tolerant(overrides) -> None:
    """vLLM 0.32's ``_rebind_kernels`` with one guard: an attribute whose
    ``__dict__`` is not a mapping (llvmlite's lazy library wrapper) is skipped."""
    originals = {original: wrapper for original, wrapper in overrides}

    def lookup(value):
        for original in originals:
            if value is original:
                return originals[original]
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


_applied = False


def apply_patches() -> None:
    """Install every patch once per process (vLLM loads plugins in each process)."""
    global _applied
    if _applied:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    EngineArgs.add_cli_args = staticmethod(_add_cli_args(_keep(EngineArgs, "add_cli_args").__func__))
    EngineArgs.from_cli_args = _from_cli_args(_keep(EngineArgs, "from_cli_args"))
    EngineArgs.create_speculative_config = _create_speculative_config(
        _keep(EngineArgs, "create_speculative_config"))
    GPUModelRunner.__init__ = _runner_init(_keep(GPUModelRunner, "__init__"))
    from vllm.triton_utils import dispatcher

    _keep(dispatcher, "_rebind_kernels")
    dispatcher._rebind_kernels = _rebind_kernels_tolerant
    GPUModelRunner.propose_draft_token_ids = _propose_draft_token_ids(
        _keep(GPUModelRunner, "propose_draft_token_ids"))
    _applied = True


def describe() -> str:
    return json.dumps(sorted(ORIGINALS))
