"""The vLLM proposer of the ``specdiff`` method: one small class, one job.

vLLM's model runner calls ``propose`` after each step with the tokens just
sampled; we draft gamma tokens for every running request in one batched
diffusion call and keep, per request, the distribution q each token was drawn
from, which ``take_last_draft_probs`` hands to the verifier (the runner patch in
``patches.py`` wires it, since vLLM drops q for custom proposers).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from vllm_specdiff.adaptive import AdaptiveGamma
from vllm_specdiff.config import SpecDiffConfig
from vllm_specdiff.drafter import DiffusionDrafter
from vllm_specdiff.loader import load_mdlm, torch_dtype

logger = logging.getLogger("vllm.specdiff")

ADDITIONAL_CONFIG_KEY = "specdiff"


class SpecDiffProposer:
    """Drafts with an MDLM for vLLM's V1 model runner (``method="specdiff"``)."""

    def __init__(self, vllm_config) -> None:
        self.config = SpecDiffConfig.from_json(vllm_config.additional_config[ADDITIONAL_CONFIG_KEY])
        self.vllm_config = vllm_config
        self.target_dtype = vllm_config.model_config.dtype
        self.target_vocab = vllm_config.model_config.get_vocab_size()
        self.max_model_len = vllm_config.model_config.max_model_len
        self.drafter: DiffusionDrafter | None = None
        self.adaptive = AdaptiveGamma(self.config.gamma, enabled=self.config.adaptive)
        self._ngram = None
        self._last_probs: torch.Tensor | None = None
        self._draft_generators: dict[str, torch.Generator] = {}
        self._last_step: tuple[int, int, float] | None = None  # (gamma, batch, time)

    # vLLM calls this inside the model runner's load_model.
    def load_model(self, target_model=None) -> None:
        from vllm.platforms import current_platform

        device = torch.device(current_platform.device_type)
        dtype = (self.target_dtype if self.config.drafter_dtype == "auto"
                 else torch_dtype(self.config.drafter_dtype))
        model = load_mdlm(self.config.drafter_path, device=device, dtype=dtype)
        self.drafter = DiffusionDrafter(
            model,
            steps=self.config.diffusion_steps,
            schedule=self.config.schedule,
            context_window=self.config.context_window,
            draft_temperature=self.config.draft_temperature,
        )
        if self.config.warmup_tokens and self.config.warmup_method == "ngram":
            self._ngram = _make_ngram_proposer(self.vllm_config)
        logger.info(
            "specdiff: drafter %s (%.1fM params, %s) gamma=%d T=%d schedule=%s W=%d adaptive=%s",
            self.config.drafter_path, model.num_parameters() / 1e6, dtype, self.config.gamma,
            self.config.diffusion_steps, self.config.schedule, self.config.context_window,
            self.config.adaptive,
        )

    def take_last_draft_probs(self) -> torch.Tensor | None:
        probs, self._last_probs = self._last_probs, None
        return probs

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings=None,
        input_batch=None,
        pure_decode: bool = False,
    ) -> list[list[int]]:
        """Draft tokens for each row of the batch (an empty list skips the row).

        Row i's context is ``token_ids_cpu[i, :num_tokens_no_spec[i]]``. With
        ``input_batch`` (passed by our runner patch) drafts follow each request's
        temperature and seed; without it every row drafts greedily and is verified
        as a point mass, which is exact too. ``pure_decode`` (no prompt tokens in
        the step just run) lets adaptive gamma measure that step.
        """
        now = time.perf_counter()
        if self._last_step is not None and pure_decode:
            gamma_used, batch_used, started = self._last_step
            produced = sum(len(s) for s in sampled_token_ids)
            self.adaptive.observe_step(batch_used, gamma_used, produced, now - started)
        assert self.drafter is not None, "load_model() was not called"
        num_rows = len(sampled_token_ids)
        drafts: list[list[int]] = [[] for _ in range(num_rows)]
        self._last_probs = None
        rows, warmup_rows = [], []
        for i, sampled in enumerate(sampled_token_ids):
            if not sampled:
                continue
            n = int(num_tokens_no_spec[i])
            if n >= self.max_model_len:
                continue
            if (input_batch is not None and self.config.warmup_tokens
                    and self.config.warmup_method != "specdiff"):
                generated = n - int(input_batch.num_prompt_tokens[i])
                if generated < self.config.warmup_tokens:
                    warmup_rows.append(i)
                    continue
            rows.append(i)

        gamma = self.adaptive.next_gamma(len(rows) + len(warmup_rows))
        self._last_step = (gamma, len(rows) + len(warmup_rows), now)
        if warmup_rows and self._ngram is not None:
            # Seeded requests draft the full gamma here too (see below).
            lengths = {i: self.config.gamma if input_batch.generators.get(i) is not None
                       else gamma for i in warmup_rows}
            self._propose_ngram(sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                                drafts, lengths)
        gens = self._generators(rows, input_batch)
        # Seeded requests always draft the full gamma: their random streams are then
        # consumed the same way whatever the load, so their output is reproducible.
        seeded = [g is not None for g in gens] if gens else [False] * len(rows)
        if not rows or (gamma == 0 and not any(seeded)):
            return drafts
        draft_len = self.config.gamma if any(seeded) else gamma

        temps = self._temperatures(rows, input_batch)
        contexts = [token_ids_cpu[i, : int(num_tokens_no_spec[i])] for i in rows]
        draft = self.drafter.draft(contexts, draft_len, temps, gens)

        tokens = draft.tokens.tolist()
        for row, toks, is_seeded in zip(rows, tokens, seeded):
            # Never draft past the model's length limit.
            room = self.max_model_len - int(num_tokens_no_spec[row]) - 1
            k = self.config.gamma if is_seeded else gamma
            drafts[row] = toks[: max(0, min(k, room))]
        self._last_probs = self._probs_for_verifier(draft, rows, temps, num_rows,
                                                    {i: drafts[i] for i in warmup_rows})
        return drafts

    def observe_acceptance(self, num_accepted: int, num_rejections: int) -> None:
        """Fed by the verifier after each verification (adaptive gamma)."""
        self.adaptive.observe(num_accepted, num_rejections)

    # -- helpers ---------------------------------------------------------------

    def _probs_for_verifier(self, draft, rows, temps, num_rows,
                            other_drafts: dict[int, list[int]]) -> torch.Tensor | None:
        """[num_rows, gamma, V] q aligned with the runner's rows (None: all point masses).

        Sampled requests whose q is not the left-to-right conditional (random or
        confidence order with T > 1, or argmax drafts) get a point mass: exact,
        just accepting with p(x) instead of min(1, p(x)/q(x)). So do rows drafted by
        another proposer (n-gram warm-up drafts: ``other_drafts``).
        """
        probs = draft.probs
        if probs is None:  # an all-greedy batch: the verifier compares argmaxes only
            return None
        sampled = torch.tensor([t > 0 for t in temps], device=probs.device)
        point_mass = sampled & (draft.drafted_greedily | (not draft.exact))
        if bool(point_mass.any()):
            one_hot = torch.zeros_like(probs).scatter_(-1, draft.tokens.unsqueeze(-1), 1.0)
            probs = torch.where(point_mass[:, None, None], one_hot, probs)
        if self.target_vocab > probs.shape[-1]:  # padded target vocab: q is 0 there
            probs = torch.nn.functional.pad(probs, (0, self.target_vocab - probs.shape[-1]))
        if len(rows) == num_rows:
            return probs.contiguous()
        # n-gram rows may draft more tokens than the MDLM rows did this step.
        width = max([probs.shape[1], *(len(t) for t in other_drafts.values())])
        full = probs.new_zeros((num_rows, width, probs.shape[2]))
        full[torch.tensor(rows, device=probs.device), : probs.shape[1]] = probs
        for row, tokens in other_drafts.items():
            for j, token in enumerate(tokens):
                full[row, j, token] = 1.0
        return full

    @staticmethod
    def _temperatures(rows, input_batch) -> list[float]:
        if input_batch is None:
            return [0.0] * len(rows)
        return [float(input_batch.temperature_cpu[i]) for i in rows]

    def _generators(self, rows, input_batch) -> list[torch.Generator | None] | None:
        """Per-request drafter generators for seeded requests (own streams, so the
        request's vLLM generator is left exactly as vLLM expects it)."""
        if input_batch is None or not input_batch.generators:
            return None
        req_ids = input_batch.req_ids
        live = set(req_ids)
        for stale in [r for r in self._draft_generators if r not in live]:
            del self._draft_generators[stale]
        gens: list[torch.Generator | None] = []
        for i in rows:
            g = input_batch.generators.get(i)
            if g is None:
                gens.append(None)
                continue
            rid = req_ids[i]
            if rid not in self._draft_generators:
                dg = torch.Generator(device=g.device)
                dg.manual_seed((g.initial_seed() * 0x9E3779B97F4A7C15 + 1) % (2**63))
                self._draft_generators[rid] = dg
            gens.append(self._draft_generators[rid])
        return gens

    def _propose_ngram(self, sampled, num_tokens_no_spec, token_ids_cpu, drafts,
                       lengths: dict[int, int]) -> None:
        """vLLM's n-gram proposer for the rows in ``lengths`` (row -> draft length)."""
        longest = max(lengths.values())
        if longest == 0:
            return
        only = [s if lengths.get(i, 0) else [] for i, s in enumerate(sampled)]
        proposals = self._ngram.propose(longest, only, num_tokens_no_spec, token_ids_cpu)
        for i, k in lengths.items():
            drafts[i] = list(proposals[i])[:k]


def _make_ngram_proposer(vllm_config):
    """vLLM's prompt-lookup proposer for warm-up tokens (n-gram sizes 1..4)."""
    import copy

    from vllm.v1.spec_decode.ngram_proposer import NgramProposer

    cfg = copy.copy(vllm_config)
    spec = copy.copy(vllm_config.speculative_config)
    object.__setattr__(spec, "prompt_lookup_min", 1)
    object.__setattr__(spec, "prompt_lookup_max", 4)
    object.__setattr__(cfg, "speculative_config", spec)
    return NgramProposer(cfg)
