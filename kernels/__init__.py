"""Triton kernels of vllm-specdiff (installed as ``vllm_specdiff.kernels``)."""
