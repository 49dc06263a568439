"""vllm-specdiff: speculative diffusion decoding (SpecDiff) for vLLM.

A masked diffusion language model (MDLM) drafts gamma tokens per request in T
parallel denoising steps; vLLM's target forward pass verifies them with
speculative sampling, so the output is exactly the target's.
"""

__version__ = "0.1.0"

SUPPORTED_VLLM_VERSION = "0.32.0"
