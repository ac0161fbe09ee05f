"""``scripts/_setup.sh``'s one install stamp: an install with the test extras serves ``scripts/demo``
too, and a changed ``pyproject.toml`` or ``setup.py`` makes any install stale."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "scripts" / "_setup.sh"


def installed_for(folder: Path, extras: str) -> bool:
    done = subprocess.run(["bash", "-c", f'source "{SETUP}" && installed_for "$1"', "-", extras], cwd=folder,
                          capture_output=True, text=True, timeout=30)
    return done.returncode == 0


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "setup.py"):
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (1_000_000, 1_000_000))
    (tmp_path / ".venv").mkdir()
    return tmp_path


def test_nothing_installed(checkout: Path) -> None:
    assert not installed_for(checkout, "") and not installed_for(checkout, "test")


def test_the_test_install_serves_the_demo(checkout: Path) -> None:
    (checkout / ".venv" / ".installed").write_text("test\n")
    assert installed_for(checkout, "test") and installed_for(checkout, "")


def test_a_plain_install_does_not_serve_the_tests(checkout: Path) -> None:
    (checkout / ".venv" / ".installed").write_text("base\n")
    assert installed_for(checkout, "") and not installed_for(checkout, "test")


@pytest.mark.parametrize("changed", ["pyproject.toml", "setup.py"])
def test_a_changed_build_file_makes_the_install_stale(checkout: Path, changed: str) -> None:
    (checkout / ".venv" / ".installed").write_text("test\n")
    os.utime(checkout / ".venv" / ".installed", (2_000_000, 2_000_000))
    os.utime(checkout / changed, (3_000_000, 3_000_000))
    assert not installed_for(checkout, "") and not installed_for(checkout, "test")
