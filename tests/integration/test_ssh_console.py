"""The console over SSH, with the real OpenSSH client in a pty.

The core runs in the test's loop with ``[ssh] listen`` and two operators (alice: operator, bob:
viewer) whose keys ``ssh-keygen`` made; the host key the core generated is pinned in a known_hosts
file, so the client checks it. What the operator sees is the client's pty output fed through a
terminal emulator (pyte). Pushes go to a mediator-shaped HTTPS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import shutil
import signal
import ssl
import struct
import subprocess
import termios
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pyte
import pytest

from contract.documents import AuditEntry
from contract.events import Alarm
from contract.kinds import AlarmKind
from lab.kamailio import free_port
from lab.push_servers import MediatorServer
from sipis.config import parse_config
from sipis.core import Core
from sipis.operations import Operator
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client (apt: openssh-client)"),
]

ENROL = "ssh-test-enrol-token"
COLUMNS, ROWS = 120, 32


def keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


class SshTerminal:
    """``ssh`` on a pty of its own; the screen is what a terminal would show."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self.proc: subprocess.Popen[bytes] | None = None
        self._master = -1

    def start(self) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.proc = subprocess.Popen(self.args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     env={**os.environ, "TERM": "xterm-256color"})
        os.close(slave)
        self._master = master
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: the client side of the pty is gone
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._master)
            return
        self.raw += data
        self.stream.feed(data)

    def text(self) -> str:
        return "\n".join(self.screen.display)

    async def wait_for(self, *needles: str, timeout: float = 30.0) -> None:
        await self.wait_until(lambda: all(n in self.text() for n in needles), f"{needles} on screen", timeout)

    async def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        try:
            await wait_for(predicate, timeout, what)
        except AssertionError as exc:  # show the operator's screen with the failure
            raise AssertionError(f"{exc}; the screen:\n{self.text()}") from None

    def resize(self, columns: int, rows: int) -> None:
        """What a terminal window does: new size on the pty, SIGWINCH to the program on it."""
        assert self.proc is not None
        self.screen.resize(rows, columns)
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.proc.send_signal(signal.SIGWINCH)

    async def type(self, keys: str | bytes, pause: float = 0.05) -> None:
        data = keys.encode() if isinstance(keys, str) else keys
        for byte in data:  # one key at a time, like a person (Esc must not merge with the next key)
            os.write(self._master, bytes([byte]))
            await asyncio.sleep(pause)

    async def exit_status(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        status = self.proc.poll()
        assert status is not None, f"ssh still running:\n{self.text()}"
        return status

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self._master >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._master)
            os.close(self._master)
            self._master = -1


@dataclass
class Site:
    core: Core
    mediator: MediatorServer
    port: int
    keys: Path
    known_hosts: Path
    selectors: dict[str, str]
    terminals: list[SshTerminal]

    def ssh_args(self, key: str, *extra: str, command: tuple[str, ...] = ()) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(self.keys / key),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "LogLevel=ERROR",
                "-F", "/dev/null", *extra, "noc@127.0.0.1", *command]

    def terminal(self, key: str, *extra: str) -> SshTerminal:
        term = SshTerminal(self.ssh_args(key, *extra))
        term.start()
        self.terminals.append(term)
        return term

    def audit(self) -> list[dict[str, Any]]:
        assert self.core.operator_context is not None
        entries = [e.payload for e in self.core.operator_context.ring.audit if isinstance(e.payload, AuditEntry)]
        return [{"operator": a.operator, "action": a.action, "target": a.target, "outcome": a.outcome}
                for a in entries]


async def start_site(tmp_path: Path, max_sessions: int = 4) -> AsyncIterator[Site]:
    keys = tmp_path / "keys"
    keys.mkdir()
    alice, bob = keygen(keys / "alice", "alice@noc"), keygen(keys / "bob", "bob@noc")
    keygen(keys / "mallory", "mallory@elsewhere")
    mediator = MediatorServer(tmp_path / "mediator")
    await mediator.start()
    config = parse_config({
        "state_dir": str(tmp_path / "state"),
        "sip": {"listen": [f"udp:127.0.0.1:{free_port()}"]},
        "api": {"listen": "127.0.0.1:0", "enroll_tokens": [ENROL]},
        "push": {"mediator": {"type": "acrobits", "url": mediator.send_url, "ca_file": str(mediator.ca_file),
                              "timeout": 2}},
        "ssh": {"listen": "127.0.0.1:0", "max_sessions": max_sessions, "operators": [
            {"name": "alice", "role": "operator", "public_key": alice},
            {"name": "bob", "role": "viewer", "public_key": bob}]},
    }, tmp_path)
    core = Core(config)
    listening = await core.start()
    assert listening.ssh is not None
    port = listening.ssh[1]
    host_key = asyncssh.read_private_key(config.ssh.host_key)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}\n")
    assert listening.api_url is not None
    trust = ssl.create_default_context(cafile=str(tmp_path / "state" / "api-tls.crt"))
    selectors: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=listening.api_url, verify=trust, timeout=10) as api:
        for user in ("carol", "dave"):
            answer = await api.post("/v1/instances", headers={"Authorization": f"Bearer {ENROL}"}, json={
                "account": {"aor": f"sip:{user}@example.net", "username": user, "password": "pw",
                            "registrar": "sip:127.0.0.1:9;transport=tcp"},
                "push": {"provider": "mediator", "app_id": "com.example.phone", "token": f"tok-{user}"}})
            assert answer.status_code == 201, answer.text
            selectors[user] = answer.json()["selector"]
    site = Site(core, mediator, port, keys, known_hosts, selectors, [])
    try:
        yield site
    finally:
        for term in site.terminals:
            term.close()
        await core.stop()
        await mediator.stop()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async for value in start_site(tmp_path):
        yield value


@pytest.fixture
async def one_seat(tmp_path: Path) -> AsyncIterator[Site]:
    async for value in start_site(tmp_path, max_sessions=1):
        yield value


async def test_operator_sees_dashboard_filters_and_sends_a_test_push(site: Site) -> None:
    term = site.terminal("alice")
    await term.wait_for("alice", "OPERATOR", "carol@example.net", "dave@example.net", "Test push")
    await term.type("/")
    await term.type("dave")
    await term.wait_for("1 of 2")
    assert "carol@example.net" not in term.text()
    await term.type("\r")  # leave the filter box; the cursor is on dave's row
    await term.type("n")
    await term.wait_for("Test push?")
    await term.type("y")
    await term.wait_for("push accepted")
    pushes = [r.json for r in site.mediator.requests]
    assert [p["Selector"] for p in pushes] == [site.selectors["dave"]]
    assert {"operator": "alice", "action": "test_push", "target": site.selectors["dave"],
            "outcome": "accepted"} in site.audit()
    await term.type("q")
    await term.wait_for("Quit?")
    await term.type("y")
    assert await term.exit_status() == 0
    assert "\x1b[?1049l" in term.raw.decode(errors="replace")  # the alternate screen was left
    actions = [(row["operator"], row["action"], row["outcome"]) for row in site.audit()]
    assert ("alice", "ssh_login", "ok") in actions and ("alice", "ssh_logout", "ok") in actions
    assert site.core.ssh is not None and site.core.ssh.stats.active == 0
    assert len(site.core.operator_sessions) == 0  # the session token died with the session


async def test_views_logs_and_toasts_in_a_real_terminal(site: Site) -> None:
    term = site.terminal("alice")
    await term.wait_for("carol@example.net", "dave@example.net")
    # 1-5 open the named view itself; esc goes back one step
    await term.type("\r")
    await term.wait_for("Ladder", "Timeline")
    await term.type("2")
    await term.wait_for("Held calls")
    await term.type("1")
    await term.wait_for("Instances  2 of 2")
    assert "Timeline" not in term.text()
    await term.type("2")
    await term.wait_for("Held calls")
    await term.type("\x1b")
    await term.wait_for("Instances  2 of 2")

    # the push log: newest first; at the top it follows new rows, scrolled away it stays put
    assert site.core.operations is not None
    alice = Operator("alice", "operator")
    await term.type("3")
    await term.wait_for("Push log (0, newest first)")
    await site.core.operations.test_push(site.selectors["carol"], alice)
    await term.wait_for("Push log (1, newest first)")
    await site.core.operations.test_push(site.selectors["dave"], alice)
    await term.wait_for("Push log (2, newest first)")

    def first_rows() -> list[str]:
        lines = term.text().splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("Time"))
        return lines[header + 1: header + 3]

    assert "dave" in first_rows()[0] and "carol" in first_rows()[1]
    await term.type("j")  # the cursor on carol's push: scrolled away from the newest
    await site.core.operations.test_push(site.selectors["dave"], alice)
    await term.wait_for("Push log (3, newest first) · 1 new ↑ (home)")
    await term.type("\x1b[H")  # home
    await term.wait_until(lambda: "new ↑" not in term.text(), "the count gone at home")

    # toasts: one line per cause, repeats counted
    for _ in range(3):
        site.core.bus.publish(site.selectors["carol"], Alarm(AlarmKind.PUSH_REJECTED, code=410, reason="Unregistered"))
    await term.wait_for("Push rejected", "×3")
    assert sum("Push rejected" in line for line in term.text().splitlines()) == 1


async def test_viewer_sees_no_actions_and_the_core_refuses_them(site: Site) -> None:
    minted: list[str] = []
    sessions = site.core.operator_sessions
    original_mint = sessions.mint

    def spy_mint(name: str, role: str) -> str:
        token = original_mint(name, role)
        minted.append(token)
        return token

    sessions.mint = spy_mint  # type: ignore[method-assign]
    term = site.terminal("bob")
    await term.wait_for("bob", "VIEWER", "carol@example.net")
    assert "Test push" not in term.text() and "Take over" not in term.text()
    await term.type("n")  # the binding is not there for a viewer
    await asyncio.sleep(0.5)
    assert "Test push?" not in term.text()
    assert site.mediator.requests == []
    # The console's own session token, used directly: the core refuses and audits, whatever the UI.
    assert len(minted) == 1
    transport = httpx.AsyncHTTPTransport(uds=str(site.core.config.operator.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://operator") as client:
        answer = await client.post(f"/v1/instances/{site.selectors['carol']}/actions/test-push",
                                   headers={"Authorization": f"Bearer {minted[0]}"})
    assert answer.status_code == 403, answer.text
    assert site.mediator.requests == []
    assert {"operator": "bob", "action": "test_push", "target": site.selectors["carol"],
            "outcome": "refused"} in site.audit()


async def test_resize_and_ctrl_c_leave_the_console_running(site: Site) -> None:
    term = site.terminal("alice")
    await term.wait_for("alice", "carol@example.net")
    assert term.proc is not None
    term.resize(80, 24)  # the operator's window shrinks: the console redraws for 80×24
    await term.wait_until(lambda: "^p palette" in term.screen.display[23] and "alice" in term.screen.display[0],
                          "the footer on row 24 of 24")
    await term.type(b"\x03")  # Ctrl+C: a key for the console, not a signal to anyone
    await term.wait_for("Ctrl+C does nothing")
    assert term.proc.poll() is None
    assert site.core.ssh is not None and site.core.ssh.stats.active == 1


async def test_without_a_terminal_ssh_gets_one_line(site: Site) -> None:
    for command in ((), ("ls", "/")):
        args = site.ssh_args("alice", "-T", command=command)
        proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                    stdin=subprocess.DEVNULL)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 1, err.decode()
        assert out.decode().strip() == "The SIPIS console needs a terminal: connect with ssh -t (and no command)."
    assert site.core.ssh is not None and site.core.ssh.stats.opened == 0


async def test_unknown_keys_are_refused(site: Site) -> None:
    proc = await asyncio.create_subprocess_exec(*site.ssh_args("mallory", "-T"), stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 255
    assert "Permission denied (publickey)" in err.decode()
    assert site.core.ssh is not None and site.core.ssh.stats.auth_failed >= 1
    # and no password prompt is ever offered
    proc = await asyncio.create_subprocess_exec(
        *site.ssh_args("mallory", "-T", "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 255 and "Permission denied (publickey)" in err.decode()


async def test_a_dropped_connection_ends_the_console_process(site: Site) -> None:
    term = site.terminal("alice")
    await term.wait_for("carol@example.net")
    ssh = site.core.ssh
    assert ssh is not None and len(ssh._children) == 1
    child = next(iter(ssh._children))
    assert term.proc is not None
    term.proc.send_signal(signal.SIGKILL)  # the operator's laptop vanishes mid-session
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while (child.returncode is None or ssh.stats.active) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert child.returncode is not None
    assert ssh.stats.active == 0 and len(site.core.operator_sessions) == 0
    assert ("alice", "ssh_logout", "dropped") in [(r["operator"], r["action"], r["outcome"]) for r in site.audit()]


async def test_sessions_are_capped(one_seat: Site) -> None:
    first = one_seat.terminal("alice")
    await first.wait_for("carol@example.net")
    second = one_seat.terminal("bob")
    await second.wait_for("The SIPIS console is full")
    assert await second.exit_status() == 1
    assert first.proc is not None and first.proc.poll() is None
    assert one_seat.core.ssh is not None and one_seat.core.ssh.stats.refused_full == 1
