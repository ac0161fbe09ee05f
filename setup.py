"""Build step: compile the SIP layer's hot modules with mypyc (the rest is in pyproject.toml).

A registration goes through the parser, the transaction layer, digest and the endpoint several
times; compiled, a registration costs ~30 % less CPU (bench/README.md, register_rate). The modules stay
plain, type-checked Python: the compiled form is a build product, never edited.

Without a C compiler or mypyc the package installs uncompiled (with a warning) and runs the same
code as Python; so does any install with ``SIPIS_PURE_PYTHON=1`` set when it runs.

The build writes ``sipis/sip/_compiled.json`` (source hashes) next to the extensions, and
``sipis.sip._implementation`` uses the compiled modules only while their sources are unchanged
since: an edit is never shadowed by a stale build.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
#: the modules every REGISTER, response and retransmission runs through
COMPILED = ("message", "digest", "transaction", "register", "endpoint", "framing")
PACKAGE_DIR = Path("sipis", "sip")
MANIFEST = "_compiled.json"


def _warn(text: str) -> None:
    print(f"sipis-console build: {text}", file=sys.stderr)


def _extensions() -> list[Extension]:
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not available: the SIP layer stays uncompiled")
        return []
    sources = [str(PACKAGE_DIR / f"{name}.py") for name in COMPILED]
    # opt_level 3 is mypyc's default; debug_level 0 keeps the shared library small
    return list(mypycify(sources, opt_level="3", debug_level="0"))


class BuildCompiled(build_ext):
    """build_ext that settles for pure Python when compiling fails, and records what it built."""

    def run(self) -> None:
        if not self.extensions:
            return
        in_place = self.inplace or getattr(self, "editable_mode", False)
        target = HERE / PACKAGE_DIR if in_place else Path(self.build_lib) / PACKAGE_DIR
        (target / MANIFEST).unlink(missing_ok=True)  # until this build has succeeded
        try:
            super().run()
        except Exception as exc:  # no compiler, missing headers: still a working (slower) package
            _warn(f"compiling the SIP layer failed ({type(exc).__name__}: {exc}); it stays uncompiled")
            return
        target.mkdir(parents=True, exist_ok=True)
        hashes = {name: hashlib.sha256((HERE / PACKAGE_DIR / f"{name}.py").read_bytes()).hexdigest()
                  for name in COMPILED}
        (target / MANIFEST).write_text(json.dumps({"compiler": "mypyc", "modules": hashes}, indent=1) + "\n")


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildCompiled})
