"""The layers at run time (pyproject's import-linter contracts check the source): what a process
started through the ``sipis-console`` dispatcher has loaded when it ends.

The console child runs exactly the SSH server's command (:func:`sipis.ssh_server.console_command`)
under a small wrapper that lets Textual build and mount the real app headless (there is no pty
here) and writes ``sys.modules`` to a file at exit. Behind the operator socket is no core, only a
stand-in that answers every request with an operator's identity: the console starts and is closed
after its first frame.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
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


class _Whoami(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"name": "alice", "role": "viewer"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        request, _ = super().get_request()
        return request, ("local", 0)  # http.server wants a (host, port) for its log lines


def test_the_console_child_never_loads_the_core_the_storage_or_the_lab(tmp_path: Path) -> None:
    path = tmp_path / "stand-in.sock"
    with _UnixHttpServer(str(path), _Whoami) as stand_in:
        threading.Thread(target=stand_in.serve_forever, daemon=True).start()
        try:
            modules = loaded_modules(tmp_path, console_command(path), headless=True)
        finally:
            stand_in.shutdown()
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
