"""``sipis-console serve`` and ``console`` as a new operator meets them: real processes, their exit
status and the one line they print; the console against a core that stops and starts again."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from console.app import SipisConsole
from console.client import OperatorClient
from console.feed import OperatorFeed
from tests.console.helpers import record_notes, until

ENROL_TOKEN = "t" * 32


def sipis_console(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipis_console", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def write_config(folder: Path, *, sip: str = "udp:127.0.0.1:0", api: str = "127.0.0.1:0", extra: str = "",
                 name: str = "sipis.toml") -> Path:
    path = folder / name
    path.write_text(f'state_dir = "var"\n[log]\nlevel = "warning"\n[sip]\nlisten = ["{sip}"]\n'
                    f'[api]\nlisten = "{api}"\ntls = false\nenroll_tokens = ["{ENROL_TOKEN}"]\n{extra}')
    return path


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback TCP port something else is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


class CoreProcess:
    """``sipis-console serve`` in ``folder``, started and stopped by the test."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sipis_console", "serve", cwd=self.folder, stderr=asyncio.subprocess.PIPE)
        assert self.proc.stderr is not None
        while b"core running" not in (line := await asyncio.wait_for(self.proc.stderr.readline(), 60)):
            assert line, "the core exited before it was running"

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.proc.wait(), 60)
        self.proc = None
        return status


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[CoreProcess]:
    write_config(tmp_path)
    process = CoreProcess(tmp_path)
    yield process
    if process.proc is not None:
        await process.stop()


def test_version(tmp_path: Path) -> None:
    done = sipis_console("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("sipis-console ") and len(done.stdout.split()) == 2


def test_serve_without_a_config_file_names_the_init_command(tmp_path: Path) -> None:
    done = sipis_console("serve", cwd=tmp_path)
    assert done.returncode == 2
    assert "sipis.toml" in done.stderr and "sipis-console init sipis.toml" in done.stderr
    assert "write_starter_config" not in done.stderr


@pytest.mark.parametrize(("listener", "section"), [
    ("SIP", "sip"), ("app API", "api"), ("SSH", "ssh"), ("operator API", "operator")])
def test_a_bind_error_names_the_listener_and_its_address(tmp_path: Path, taken_port: int, listener: str,
                                                         section: str) -> None:
    address = f"127.0.0.1:{taken_port}"
    if section == "sip":
        write_config(tmp_path, sip=f"tcp:{address}")
    elif section == "api":
        write_config(tmp_path, api=address)
    elif section == "ssh":
        key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
        write_config(tmp_path, extra=f'[ssh]\nlisten = "{address}"\n'
                                     f'[[ssh.operators]]\nname = "alice"\nrole = "viewer"\npublic_key = "{key}"\n')
    else:
        write_config(tmp_path, extra=f'[operator]\ntcp_listen = "{address}"\n'
                                     f'[[operator.tokens]]\nname = "ci"\nrole = "viewer"\ntoken = "{ENROL_TOKEN}"\n')
    done = sipis_console("serve", "--config", "sipis.toml", cwd=tmp_path)
    assert done.returncode == 1
    where = f"tcp:{address}" if section == "sip" else address
    assert f"{listener} cannot listen on {where}: Address already in use" in done.stderr
    assert "[Errno" not in done.stderr


def test_log_level_critical_keeps_the_core_quiet(tmp_path: Path, taken_port: int) -> None:
    write_config(tmp_path, api=f"127.0.0.1:{taken_port}")
    done = sipis_console("serve", "--log-level", "critical", cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "CRITICAL" in lines[0] and "app API cannot listen" in lines[0]


def test_console_without_a_core_exits_with_one_line(tmp_path: Path) -> None:
    done = sipis_console("console", "--socket", str(tmp_path / "nobody.sock"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"sipis-console: no core answers on {tmp_path / 'nobody.sock'} (is `sipis-console serve` running there?)"]
    assert done.stdout == ""


async def test_serve_uses_the_local_config_and_stops_on_sigterm(core: CoreProcess) -> None:
    await core.start()
    assert (core.folder / "var" / "operator.sock").exists()
    assert await core.stop() == 0


async def test_the_console_says_the_core_went_away_and_reconnects_by_itself(core: CoreProcess) -> None:
    await core.start()
    client = OperatorClient(socket_path=core.folder / "var" / "operator.sock", operator_name="alice")
    app = SipisConsole(OperatorFeed(client), tick_interval=0.1, event_pause=0)
    notes = record_notes(app)
    async with app.run_test(size=(120, 30)) as pilot:
        await app.ready.wait()
        assert app.connected and app.model.summary is not None
        started = app.model.summary.started_at
        await core.stop()
        await until(pilot, lambda: not app.connected, timeout=20)
        assert [n.title for n in notes] == ["Core unreachable"]
        assert "retrying by itself" in notes[0].message
        await core.start()
        await until(pilot, lambda: app.connected, timeout=30)
        await until(pilot, lambda: "Core reconnected" in [n.title for n in notes], timeout=5)
        # what it shows is the new core's
        await until(pilot, lambda: app.model.summary is not None and app.model.summary.started_at != started,
                    timeout=10)
    await client.aclose()
