"""Which form of the SIP layer's hot modules runs: compiled (mypyc, see setup.py) or Python.

The compiled modules are used only when the build's manifest (``_compiled.json``: a hash of each
source it compiled) matches the sources as they are now. An edited module after an in-place
build, a missing manifest (the compile failed part-way) or ``SIPIS_PURE_PYTHON=1`` make all of
them load from their ``.py`` files: the compiled modules call into each other's native classes,
so they are used all together or not at all.

This module runs when ``sipis.sip`` is imported, before any of the modules it decides about.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PACKAGE = "sipis.sip"
HERE = Path(__file__).parent
MANIFEST = HERE / "_compiled.json"


@dataclass(frozen=True)
class Implementation:
    compiled: bool
    detail: str  # why, in words an operator can act on
    #: a compiled build is there but unusable (e.g. its sources changed since): worth a warning
    degraded: bool = False

    def describe(self) -> str:
        return f"SIP layer: {'compiled' if self.compiled else 'Python'} ({self.detail})"


def _extensions(directory: Path) -> list[str]:
    """Names of the modules in ``directory`` that have a compiled extension."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(path.name.split(".")[0] for path in directory.iterdir() if path.name.endswith(suffixes))


def _source_hash(source: Path) -> str | None:
    try:
        return hashlib.sha256(source.read_bytes()).hexdigest()
    except OSError:
        return None


def _recorded(manifest: Path) -> dict[str, str]:
    """The manifest's module → source hash (empty: no usable manifest)."""
    try:
        modules = json.loads(manifest.read_text()).get("modules")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(modules, dict):
        return {}
    return {str(name): str(digest) for name, digest in modules.items()}


def choose(environ: Mapping[str, str] = os.environ,
           directory: Path = HERE) -> tuple[Implementation, list[str]]:
    """The implementation to use, and the compiled modules to load from source instead."""
    built = _extensions(directory)
    if environ.get("SIPIS_PURE_PYTHON"):
        return Implementation(False, "SIPIS_PURE_PYTHON is set"), built
    recorded = _recorded(directory / MANIFEST.name)
    if not recorded:
        if not built:
            return Implementation(False, "not compiled"), built
        return Implementation(False, "compiled modules without a build manifest", True), built
    for name, digest in sorted(recorded.items()):
        if name not in built:
            return Implementation(False, f"{name} was not compiled", True), built
        if _source_hash(directory / f"{name}.py") != digest:
            return Implementation(False, f"{name}.py changed since it was compiled; rebuild with "
                                         f"scripts/compile", True), built
    return Implementation(True, f"mypyc: {', '.join(sorted(recorded))}"), []


class _FromSource(importlib.abc.MetaPathFinder):
    """Loads the named modules of this package from their .py files, not their extensions."""

    def __init__(self, names: Sequence[str], directory: Path = HERE) -> None:
        self.names = {f"{PACKAGE}.{name}": directory / f"{name}.py" for name in names}

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        source = self.names.get(fullname)
        if source is None or not source.exists():
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def install() -> Implementation:
    implementation, from_source = choose()
    if from_source:
        sys.meta_path.insert(0, _FromSource(from_source))
    return implementation
