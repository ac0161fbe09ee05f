"""The layers at run time (pyproject's import-linter contracts check the source): what a process
started through the ``sipis-console`` dispatcher has loaded when it ends.

The console child runs exactly the SSH server's command (:func:`sipis.ssh_server.console_command`)
under a small wrapper that lets Textual build and mount the real app headless (there is no pty
here) and writes ``sys.modules`` to a file at exit. The operator socket has no core behind it: the
console starts, finds nothing to talk to, and is closed after its first frame.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sipis.ssh_server import console_command

# argv: the module ``python -m`` would run, then its arguments
WRAPPER = r"""
import atexit, json, os, runpy, sys

def _dump():
    with open(os.environ["SIPIS_TEST_MODULES"], "w") as out:
        json.dump(sorted(sys.modules), out)

atexit.register(_dump)
if os.environ.get("SIPIS_TEST_HEADLESS"):
    import asyncio, textual.app

    def _run_headless(self, *args, **kwargs):
        async def first_frame():
            async with self.run_test(headless=True) as pilot:
                await pilot.pause()
        asyncio.run(first_frame())

    textual.app.App.run = _run_headless
module, sys.argv = sys.argv[1], ["sipis-console", *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

ROOT = Path(__file__).resolve().parents[1]


def loaded_modules(tmp_path: Path, command: list[str], *, headless: bool = False) -> set[str]:
    """Run ``command`` (``python -m MODULE ARGS``) under the wrapper; the modules it had loaded."""
    assert command[:2] == [sys.executable, "-m"], command
    record = tmp_path / "modules.json"
    env = {**os.environ, "SIPIS_TEST_MODULES": str(record)}
    if headless:
        env["SIPIS_TEST_HEADLESS"] = "1"
    for name in ("SIPIS_OPERATOR_SOCKET", "SIPIS_OPERATOR_URL"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-c", WRAPPER, *command[2:]], cwd=tmp_path, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert record.exists(), f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return set(json.loads(record.read_text()))


def ours(modules: set[str], *packages: str) -> set[str]:
    return {m for m in modules if m.split(".", 1)[0] in packages}


def test_the_console_child_never_loads_the_core_the_storage_or_the_lab(tmp_path: Path) -> None:
    modules = loaded_modules(tmp_path, console_command(tmp_path / "no-core.sock"), headless=True)
    assert {"sipis_console.cli", "console.cli", "console.app", "console.feed", "widgets.table"} <= modules
    assert "textual.pilot" in modules  # the app really ran
    assert ours(modules, "sipis", "storage", "lab") == set()
    assert not modules & {"sipis.core", "sipis.engine", "sipis.sip"}


def test_help_loads_no_command_and_init_only_the_cores_config(tmp_path: Path) -> None:
    layers = ("sipis", "storage", "console", "widgets", "lab")
    assert ours(loaded_modules(tmp_path, [sys.executable, "-m", "sipis_console", "--help"]), *layers) == set()
    init = loaded_modules(tmp_path, [sys.executable, "-m", "sipis_console", "init", str(tmp_path / "s.toml")])
    assert (tmp_path / "s.toml").exists()
    loaded = ours(init, *layers)
    assert {"sipis", "sipis.cli", "sipis.config"} <= loaded
    assert all(name in ("sipis", "sipis.cli") or name.startswith("sipis.config") for name in loaded), loaded
