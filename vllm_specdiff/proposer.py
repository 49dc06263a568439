"""The vLLM proposer of the ``specdiff`` method.

vLLM's model runner calls the proposer after each step with the tokens just sampled.
``draft`` turns that into a ``Proposal``: the draft tokens of every running request
(one batched diffusion call) and the distribution q each was drawn from, which the
runner patch in ``patches.py`` hands to the verifier (vLLM drops q for custom
proposers). A step has three parts: triage the rows (``plan_rows``), draft them
(vLLM's n-gram proposer for a request's first tokens and for rows whose recent tokens
recur in their context, the MDLM for the rest), and name the rows that are verified
against q (``draft_q``; the others are point masses).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from vllm_specdiff.adaptive import AdaptiveDraftLength, StepOutcome
from vllm_specdiff.config import ADDITIONAL_CONFIG_KEY, SpecDiffConfig
from vllm_specdiff.drafter import CachedCanvasArgs, ContextBatch, DiffusionDrafter, Draft
from vllm_specdiff.drafter_cache import DrafterCache, make_drafter_cache
from vllm_specdiff.loader import drafter_dtypes, load_mdlm

logger = logging.getLogger("vllm.specdiff")

NGRAM_SIZES = (1, 4)  # prompt-lookup n-gram sizes (min, max) for warm-up drafts


@dataclass
class DraftQ:
    """The q a step's drafts were drawn from, as the drafter left it (no copy, no
    one-hot rows): ``probs[row_of[i], j]`` is the distribution runner row i's draft j
    was drawn from. Rows not in ``row_of`` (greedy, n-gram, non-exact schedules) are
    verified as point masses."""

    probs: torch.Tensor  # [R, longest draft, V_drafter] float32, last stride 1
    row_of: dict[int, int]  # runner row -> row of probs


@dataclass
class Proposal:
    """One step's drafts, aligned with the runner's rows."""

    token_ids: list[list[int]]  # row -> draft tokens ([] = no draft for that row)
    q: DraftQ | None = None  # None: every row is verified greedily or as a point mass


class LastStep(NamedTuple):
    """What the next call needs to measure the step this call drafted for."""

    draft_len: int
    batch: int
    started: float  # perf_counter at drafting
    after_decode: bool = True  # drafted after a pure decode step (not after a prefill)
    full_drafts: frozenset = frozenset()  # requests the MDLM drafted draft_len tokens for
    copied: frozenset = frozenset()  # requests whose draft prompt lookup copied
    ngram: frozenset = frozenset()  # warm-up requests that drafted with the n-gram proposer
    mdlm_rows: int = 0  # rows the MDLM drafted


@dataclass
class RowPlan:
    """Which runner rows draft with what this step."""

    mdlm: list[int]  # drafted by the diffusion drafter
    ngram: list[int]  # warm-up rows, drafted by vLLM's n-gram proposer

    @property
    def batch(self) -> int:
        return len(self.mdlm) + len(self.ngram)


def plan_rows(sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
              num_prompt_tokens: np.ndarray | None, max_model_len: int,
              warmup_tokens: int) -> RowPlan:
    """Rows with no sampled token (vLLM's "skip") or at the length limit draft nothing;
    rows that generated fewer than ``warmup_tokens`` tokens are warm-up rows (only
    known with ``num_prompt_tokens``)."""
    plan = RowPlan([], [])
    for i, sampled in enumerate(sampled_token_ids):
        n = int(num_tokens_no_spec[i])
        if not sampled or n >= max_model_len:
            continue
        if num_prompt_tokens is not None and n - int(num_prompt_tokens[i]) < warmup_tokens:
            plan.ngram.append(i)
        else:
            plan.mdlm.append(i)
    return plan


class SpecDiffProposer:
    """Drafts with an MDLM for vLLM's V1 model runner (``method="specdiff"``)."""

    def __init__(self, vllm_config) -> None:
        from vllm_specdiff.patches import RUNNER_PATCHES

        # vLLM builds the proposer inside the model runner's __init__, before its
        # rejection sampler: patching here reaches this runner, and only specdiff runs.
        RUNNER_PATCHES.ensure_applied()
        self.config: SpecDiffConfig = vllm_config.additional_config[ADDITIONAL_CONFIG_KEY]
        self.vllm_config = vllm_config
        self.target_dtype = vllm_config.model_config.dtype
        self.max_model_len = vllm_config.model_config.max_model_len
        self.drafter: DiffusionDrafter | None = None
        self.cache: DrafterCache | None = None  # per-request context cache, if on
        self.exact_cache = False
        self.adaptive = AdaptiveDraftLength(self.config.gamma, enabled=self.config.adaptive)
        self.ngram = None  # warm-up drafts
        self.lookup = None  # prompt lookup beside the MDLM
        self.lookup_alone = None  # prompt lookup for rows that would otherwise not draft
        # Rows drafted by each source ('warmup', 'lookup', 'mdlm') since the start.
        self.rows_drafted: collections.Counter = collections.Counter()
        self.tp_group = None  # vLLM's tensor-parallel group when it has more than one rank
        self._draft_generators: dict[str, torch.Generator] = {}
        self._last_step: LastStep | None = None

    # vLLM calls this inside the model runner's load_model.
    def load_model(self, target_model=None) -> None:
        from vllm.platforms import current_platform

        device = torch.device(current_platform.device_type)
        dtype, matmul_dtype = drafter_dtypes(self.config.drafter_dtype, self.target_dtype, device)
        model = load_mdlm(self.config.drafter_path, device=device, dtype=dtype)
        gamma = self.config.gamma
        window = self.config.drafter_window(model.config, self.max_model_len)
        self.drafter = DiffusionDrafter(
            model,
            steps=self.config.diffusion_steps,
            schedule=self.config.schedule,
            context_window=window,
            draft_temperature=self.config.draft_temperature,
            max_positions=self.max_model_len + gamma + 1,
            matmul_dtype=matmul_dtype,
        )
        if self.config.uses_drafter_cache(model.config):
            self.adaptive.catch_up = True
            self.exact_cache = model.config.attention == "block_causal"
            self.cache = make_drafter_cache(
                model.config, self.vllm_config.scheduler_config.max_num_seqs, window, dtype,
                device)
        if self.config.warmup_tokens and self.config.warmup_method == "ngram":
            self.ngram = make_ngram_proposer(self.vllm_config, self.config.gamma, NGRAM_SIZES)
        if self.config.prompt_lookup_min:
            self.lookup = make_ngram_proposer(
                self.vllm_config, self.config.gamma,
                (self.config.prompt_lookup_min, self.config.prompt_lookup_max))
            self.lookup_alone = self.lookup if self.config.prompt_lookup_min == 1 else \
                make_ngram_proposer(self.vllm_config, self.config.gamma,
                                    (1, self.config.prompt_lookup_max))
        if self.vllm_config.parallel_config.tensor_parallel_size > 1:
            from vllm.distributed import get_tp_group

            self.tp_group = get_tp_group()
        logger.info(
            "specdiff: drafter %s (%.1fM params, %s%s, %s) gamma=%d T=%d schedule=%s W=%d "
            "cache=%s adaptive=%s prompt lookup=%s", self.config.drafter_path,
            model.num_parameters() / 1e6, dtype,
            "" if self.drafter.matmul_dtype == dtype
            else f" with {self.drafter.matmul_dtype} matmul weights",
            model.config.attention, gamma,
            self.config.diffusion_steps, self.config.schedule, window,
            "off" if self.cache is None else "exact" if self.exact_cache else
            f"approximate (refresh every {self.config.cache_refresh_steps} steps)",
            self.config.adaptive,
            f"n-grams of {self.config.prompt_lookup_min}-{self.config.prompt_lookup_max}"
            if self.lookup is not None else "off",
        )

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None) -> list[list[int]]:
        """vLLM's custom-proposer interface (drafts only: greedy, verified as point
        masses). The runner patch calls ``draft`` instead, with the sampling state."""
        return self.draft(sampled_token_ids, num_tokens_no_spec, token_ids_cpu).token_ids

    def draft(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
              token_ids_cpu: np.ndarray, input_batch=None, pure_decode: bool = False) -> Proposal:
        """Draft for each row of the batch; row i's context is
        ``token_ids_cpu[i, :num_tokens_no_spec[i]]``.

        ``input_batch`` (vLLM's InputBatch) gives each request's temperature, seed and
        prompt length; without it every row drafts greedily and warm-up is off.
        ``pure_decode`` (no prompt tokens in the step just run) lets the step that
        just finished be measured for adaptive draft lengths.
        """
        assert self.drafter is not None, "load_model() was not called"
        now = time.perf_counter()
        use_cache = self.cache is not None and input_batch is not None
        if use_cache:
            self.cache.release_all_but(input_batch.req_ids)
        last = self._last_step
        if last is not None and pure_decode:
            self._observe(last, sampled_token_ids, input_batch, now)
        warmup = (self.config.warmup_tokens if input_batch is not None
                  and self.config.warmup_method != "specdiff" else 0)
        plan = plan_rows(sampled_token_ids, num_tokens_no_spec,
                         None if input_batch is None else input_batch.num_prompt_tokens,
                         self.max_model_len, warmup)
        draft_len, copy_all, reprobing = self._agreed_plan(plan.batch)
        self._last_step = LastStep(draft_len, plan.batch, now, after_decode=pure_decode)
        token_ids: list[list[int]] = [[] for _ in sampled_token_ids]
        generators = self._generators(input_batch)
        if not (draft_len or copy_all or generators):
            return Proposal(token_ids)  # no row drafts (the rest would find that out row by row)
        # Seeded requests always draft the full gamma: their random streams are then
        # consumed the same way whatever the load, so their output is reproducible.
        lengths = {i: self.config.gamma if generators.get(i) is not None else draft_len
                   for i in plan.mdlm + plan.ngram}
        if plan.ngram and self.ngram is not None:
            # Warm-up drafts are copies too: while anything drafts, they draft the full gamma.
            warmup_lengths = (dict.fromkeys(plan.ngram, self.config.gamma)
                              if copy_all or draft_len else lengths)
            self._draft_ngram(self.ngram, plan.ngram, warmup_lengths, sampled_token_ids,
                              num_tokens_no_spec, token_ids_cpu, token_ids)
            drafted = [i for i in plan.ngram if token_ids[i]]
            self.rows_drafted["warmup"] += len(drafted)
            if input_batch is not None:
                self._last_step = self._last_step._replace(ngram=frozenset(
                    input_batch.req_ids[i] for i in drafted))
        mdlm_rows = plan.mdlm
        # A re-probe measures the MDLM: its rows do not copy (seeded rows still may,
        # so that what they draft never depends on the controller).
        lookup_rows = [i for i in mdlm_rows if (copy_all or lengths[i] > 0)
                       and not (reprobing and generators.get(i) is None)]
        if lookup_rows and self.lookup is not None:
            # Copying costs microseconds, so a row that can copy drafts the full gamma
            # whatever length the controller chose for the MDLM. While the controller
            # keeps the MDLM off, rows copy only where copying itself was measured to
            # pay (``copying_pays``): under load, or for sampled requests, which accept
            # a copied token only with probability p, verifying copies may not. Seeded
            # rows always draft, so whether one copies never depends on the load.
            # A row the MDLM would draft copies only after a match of at least
            # prompt_lookup_min tokens (the MDLM guesses better than a shorter one);
            # a row that would not draft at all copies after any match, down to one
            # token: its alternative is a step for a single token.
            for lookup, rows in ((self.lookup, [i for i in lookup_rows if lengths[i]]),
                                 (self.lookup_alone, [i for i in lookup_rows if not lengths[i]])):
                if rows:
                    self._draft_ngram(lookup, rows, dict.fromkeys(rows, self.config.gamma),
                                      sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                                      token_ids)
            copied = [i for i in lookup_rows if token_ids[i]]
            if copied:
                self.rows_drafted["lookup"] += len(copied)
                mdlm_rows = [i for i in mdlm_rows if not token_ids[i]]
                if input_batch is not None:
                    self._last_step = self._last_step._replace(
                        copied=frozenset(input_batch.req_ids[i] for i in copied))
        mdlm_rows = [i for i in mdlm_rows if lengths[i] > 0]
        self.rows_drafted["mdlm"] += len(mdlm_rows)
        if not mdlm_rows:
            return Proposal(token_ids)
        self._last_step = self._last_step._replace(mdlm_rows=len(mdlm_rows))
        rows = np.array(mdlm_rows)
        temps = np.zeros(len(rows)) if input_batch is None else input_batch.temperature_cpu[rows]
        contexts = ContextBatch(token_ids_cpu, rows, np.asarray(num_tokens_no_spec)[rows])
        cached = None
        if use_cache:
            slots = self.cache.slots_for([input_batch.req_ids[i] for i in mdlm_rows])
            cached = CachedCanvasArgs(self.cache, slots, self.exact_cache,
                                      None if self.exact_cache else self.config.cache_refresh_steps)
        draft = self.drafter.draft(contexts, max(lengths[i] for i in mdlm_rows), temps,
                                   [generators.get(i) for i in mdlm_rows] if generators else None,
                                   cached)
        for row, toks in zip(mdlm_rows, draft.tokens.tolist()):
            # Never draft past the model's length limit.
            room = self.max_model_len - int(num_tokens_no_spec[row]) - 1
            token_ids[row] = toks[: max(0, min(lengths[row], room))]
        if input_batch is not None and draft_len:
            self._last_step = self._last_step._replace(full_drafts=frozenset(
                input_batch.req_ids[row] for row in mdlm_rows if len(token_ids[row]) == draft_len))
        return Proposal(token_ids, draft_q(draft, mdlm_rows, token_ids))

    def release(self, req_ids) -> None:
        """Requests that finished or were preempted give their cache slots back."""
        if self.cache is not None:
            self.cache.release(req_ids)

    # -- helpers ---------------------------------------------------------------

    def _observe(self, last: LastStep, sampled_token_ids, input_batch, now: float) -> None:
        """Tell the controller what the step drafted in ``last`` made, into the arm of
        what really ran. It weighs the MDLM's drafts against plain decoding, so:

        - a step in which the MDLM drafted some row measures its draft length, each row
          drafted by an n-gram (prompt lookup or warm-up) counting as the one token
          plain decoding would have made; acceptance is learned from the rows the MDLM
          drafted at the chosen length only (not rows cut short by the length limit);
        - a step in which rows copied and the MDLM drafted none goes to
          ``observe_copied``;
        - a step in which no row drafted at all is plain decoding, whatever length was
          chosen (e.g. no row found a match);
        - a step drafted by the warm-up n-grams alone is no arm's and is not measured.

        The MDLM's arms once also took warm-up steps: cheap, so they pulled its median
        cost down while its tokens were predicted from the MDLM's acceptance, and on the
        tiny pair the controller kept a drafter that lost to plain decoding. Nor is the
        step after a prefill measured: its clock also holds the prefill's output
        processing (3-6x a decode step on the tiny pair), which made plain decoding, the
        arm measured first in each request, look slower than it is."""
        if not last.after_decode:
            return
        seconds = now - last.started
        if not last.mdlm_rows:
            tokens = sum(len(s) for s in sampled_token_ids)
            if last.copied:
                self.adaptive.observe_copied(StepOutcome(last.batch, last.draft_len, tokens, seconds))
            elif not last.ngram:
                self.adaptive.observe(StepOutcome(last.batch, 0, tokens, seconds))
            return
        req_ids = input_batch.req_ids if input_batch is not None else ()
        accepted = tuple(len(s) - 1 for rid, s in zip(req_ids, sampled_token_ids)
                         if s and rid in last.full_drafts)
        tokens = sum(1 if rid in last.copied or rid in last.ngram else len(s)
                     for rid, s in zip(req_ids, sampled_token_ids) if s)
        self.adaptive.observe(StepOutcome(last.batch, last.draft_len, tokens, seconds, accepted))

    def _agreed_plan(self, batch: int) -> tuple[int, bool, bool]:
        """The MDLM's draft length, whether every row may copy (even while that length
        is 0), and whether the step re-measures the MDLM (then no row copies). Every
        tensor-parallel rank runs this proposer on the same inputs; everything else it
        does is deterministic or seeded alike, but the controller follows a clock. Rank
        0's choice is broadcast, so all ranks draft the same tokens and q."""
        def choose() -> tuple[int, bool, bool]:
            draft_len = self.adaptive.next_draft_len(batch)
            # Asked only with the MDLM off: while it drafts, rows copy anyway, and a
            # re-try of copying fired then (``copying_pays`` starts one when it is due)
            # would be spent on a step that cannot measure it.
            copy_all = (self.lookup is not None and draft_len == 0
                        and self.adaptive.copying_pays(batch))
            return draft_len, copy_all, self.adaptive.reprobing

        if self.tp_group is None or not self.adaptive.enabled:
            return choose()
        mine = choose() if self.tp_group.rank_in_group == 0 else None
        return self.tp_group.broadcast_object(mine, src=0)

    def _generators(self, input_batch) -> dict[int, torch.Generator]:
        """Row -> drafter generator of each seeded request (its own stream, derived from
        the request's seed, so the request's vLLM generator is left as vLLM expects)."""
        if input_batch is None or not input_batch.generators:
            return {}
        req_ids = input_batch.req_ids
        live = set(req_ids)
        for stale in [r for r in self._draft_generators if r not in live]:
            del self._draft_generators[stale]
        out = {}
        for i, g in input_batch.generators.items():
            rid = req_ids[i]
            if rid not in self._draft_generators:
                dg = torch.Generator(device=g.device)
                dg.manual_seed((g.initial_seed() * 0x9E3779B97F4A7C15 + 1) % (2**63))
                self._draft_generators[rid] = dg
            out[i] = self._draft_generators[rid]
        return out

    @staticmethod
    def _draft_ngram(ngram, rows, lengths, sampled, num_tokens_no_spec, token_ids_cpu,
                     token_ids) -> None:
        """Prompt-lookup drafts for ``rows`` (each at most its length; a row with no
        match keeps an empty draft)."""
        longest = max(lengths[i] for i in rows)
        if longest == 0:
            return
        wanted = {i for i in rows if lengths[i]}
        only = [s if i in wanted else [] for i, s in enumerate(sampled)]
        proposals = ngram.propose(longest, only, num_tokens_no_spec, token_ids_cpu)
        for i in rows:
            token_ids[i] = list(proposals[i])[: lengths[i]]


def draft_q(draft: Draft, mdlm_rows: list[int], token_ids: list[list[int]]) -> DraftQ | None:
    """The rows verified against q: sampled requests whose q is the left-to-right
    conditional (``Draft.has_q``) and that kept a draft. Point masses need nothing:
    exact, just accepting with p(x) instead of min(1, p(x)/q(x))."""
    if draft.probs is None:
        return None
    has_q = draft.has_q.tolist()
    row_of = {row: i for i, row in enumerate(mdlm_rows) if has_q[i] and token_ids[row]}
    return DraftQ(draft.probs, row_of) if row_of else None


def make_ngram_proposer(vllm_config, gamma: int, sizes: tuple[int, int]):
    """vLLM's prompt-lookup proposer matching n-grams of ``sizes`` (min, max) tokens,
    built from its own config type (an ngram SpeculativeConfig) on a shallow copy of
    the engine's config."""
    import copy

    from vllm.config import SpeculativeConfig
    from vllm.v1.spec_decode.ngram_proposer import NgramProposer

    spec = vllm_config.speculative_config
    ngram = SpeculativeConfig(
        method="ngram", num_speculative_tokens=gamma,
        prompt_lookup_min=sizes[0], prompt_lookup_max=sizes[1],
        target_model_config=spec.target_model_config,
        target_parallel_config=spec.target_parallel_config)
    config = copy.copy(vllm_config)
    config.speculative_config = ngram
    proposer = NgramProposer(config)
    # vLLM's constructor means to compile its numba matcher with a call on 1024 empty
    # rows, but rows with no sampled token are skipped before numba is reached, so the
    # compile (1.3 s on a 2-core EPYC) fell in the first step that drafted with it: a
    # stall in serving. One row with a token compiles it here, at engine start, for the
    # argument types the runner passes (int32 arrays; compiled once per process).
    proposer.propose(gamma, [[0]], np.ones(1, dtype=np.int32),
                     np.zeros((1, vllm_config.model_config.max_model_len), dtype=np.int32))
    return proposer
