"""The choice between the compiled SIP modules and their Python sources (sipis/sip/_implementation).

The other SIP tests run whichever form is installed (scripts/test compiles it); the last test here
runs the parser, digest, framing and transaction tests once more as plain Python, the form a
machine without a compiler gets.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

from sipis.sip._implementation import MANIFEST, _FromSource, choose

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def build(directory: Path, sources: dict[str, str], compiled: list[str], manifest: bool = True) -> None:
    """A package folder as an in-place build leaves it (the extensions are empty stand-ins)."""
    for name, text in sources.items():
        (directory / f"{name}.py").write_text(text)
    for name in compiled:
        (directory / f"{name}{SUFFIX}").write_bytes(b"")
    if manifest:
        hashes = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sources.items()}
        (directory / MANIFEST.name).write_text(json.dumps({"compiler": "mypyc", "modules": hashes}))


def test_a_fresh_build_is_used(tmp_path: Path) -> None:
    build(tmp_path, {"message": "A = 1\n", "digest": "B = 2\n"}, ["message", "digest"])
    implementation, from_source = choose({}, tmp_path)
    assert implementation.compiled and not implementation.degraded
    assert "digest, message" in implementation.describe() and from_source == []


def test_an_edited_source_sends_every_module_back_to_python(tmp_path: Path) -> None:
    build(tmp_path, {"message": "A = 1\n", "digest": "B = 2\n"}, ["message", "digest"])
    (tmp_path / "digest.py").write_text("B = 3\n")
    implementation, from_source = choose({}, tmp_path)
    assert not implementation.compiled and implementation.degraded
    assert "digest.py changed" in implementation.detail and "scripts/compile" in implementation.detail
    assert from_source == ["digest", "message"]  # all or nothing: they share native classes


def test_no_build_is_plain_python_without_a_warning(tmp_path: Path) -> None:
    build(tmp_path, {"message": "A = 1\n"}, [], manifest=False)
    implementation, from_source = choose({}, tmp_path)
    assert (implementation.compiled, implementation.degraded, implementation.detail) == (False, False, "not compiled")
    assert from_source == []


def test_extensions_without_a_manifest_or_a_missing_one_are_not_trusted(tmp_path: Path) -> None:
    build(tmp_path, {"message": "A = 1\n"}, ["message"], manifest=False)
    implementation, _ = choose({}, tmp_path)
    assert not implementation.compiled and implementation.degraded
    (tmp_path / MANIFEST.name).write_text("{not json")
    assert choose({}, tmp_path)[0].degraded
    build(tmp_path, {"message": "A = 1\n", "digest": "B = 2\n"}, ["message"])  # digest failed
    implementation, _ = choose({}, tmp_path)
    assert implementation.degraded and implementation.detail == "digest was not compiled"


def test_the_environment_can_ask_for_python(tmp_path: Path) -> None:
    build(tmp_path, {"message": "A = 1\n"}, ["message"])
    implementation, from_source = choose({"SIPIS_PURE_PYTHON": "1"}, tmp_path)
    assert not implementation.compiled and not implementation.degraded
    assert from_source == ["message"]


def test_the_finder_loads_the_source_file(tmp_path: Path) -> None:
    build(tmp_path, {"message": "A = 1\n"}, ["message"])
    spec = _FromSource(["message"], tmp_path).find_spec("sipis.sip.message", None)
    assert spec is not None and spec.origin == str(tmp_path / "message.py")
    assert isinstance(spec.loader, importlib.machinery.SourceFileLoader)
    assert _FromSource(["message"], tmp_path).find_spec("sipis.sip.digest", None) is None


def test_the_python_form_passes_the_sip_unit_tests() -> None:
    env = {**os.environ, "SIPIS_PURE_PYTHON": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", "import sipis.sip.message as m, sipis.sip as s; "
                               "print(m.__file__, s.IMPLEMENTATION.compiled)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert probe.stdout.split() == [str(ROOT / "sipis" / "sip" / "message.py"), "False"]
    tests = [f"tests/sip/test_{name}.py" for name in ("message", "digest", "framing", "transaction", "register")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


def test_the_module_says_which_form_runs() -> None:
    """``python -m sipis.sip``, which the scripts ask before deciding to recompile."""
    run = subprocess.run([sys.executable, "-m", "sipis.sip"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "SIPIS_PURE_PYTHON": "1"}, timeout=60)
    assert (run.returncode, run.stdout) == (0, "SIP layer: Python (SIPIS_PURE_PYTHON is set)\n")
