"""The NOC console over SSH: an asyncssh server inside the core, one console process per session.

Authentication is by public key only, against the ``[[ssh.operators]]`` entries; the key names the
operator (the SSH user name is only logged, so ``ssh noc@host`` works for everyone). Each session
with a terminal gets its own ``sipis-console console`` child on a pty, talking to the operator API
over the unix socket with a session token minted for that operator and role — so roles are enforced
by the core exactly as for any other client, and the token dies with the session.

Why a child process and not an in-process Textual app: building and painting an app is synchronous
CPU work that would stall SIP signalling (37–97 ms per login measured, see
``reference/tui.md`` §1); a child costs the loop a vfork/exec. The child is its own session leader
and takes the pty as controlling terminal, so a dropped connection hangs it up; we also terminate it
explicitly when the channel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import sys
import termios
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.utils import CryptographyDeprecationWarning

from sipis.config import SshConfig, SshOperator
from sipis.operations import Operator
from sipis.operator_api import OperatorSessions

with warnings.catch_warnings():
    # asyncssh still imports cryptography's DSA support; each start printed five multi-line
    # deprecation warnings about a key type we never offer (key-only auth with modern keys)
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    import asyncssh

log = logging.getLogger(__name__)

NO_TERMINAL = "The SIPIS console needs a terminal: connect with ssh -t (and no command).\r\n"
#: after the console exits, give the pty reader a moment to pass the last frames (alt-screen exit)
DRAIN_DELAY = 0.1
#: a console that ignores SIGTERM this long after its operator vanished is killed
TERMINATE_GRACE = 3.0

Audit = Callable[[Operator, str, str | None, str], None]


def console_command(socket_path: Path, export_dir: Path | None = None) -> list[str]:
    """The child's command line: this interpreter running our console against the operator socket."""
    export = ["--export-dir", str(export_dir)] if export_dir is not None else []
    return [sys.executable, "-m", "sipis_console", "console", "--socket", str(socket_path), *export, "--session-tty"]


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """Read the host key, or generate an Ed25519 one (mode 0600) when the file does not exist."""
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.export_private_key())
        log.info("generated SSH host key %s (%s)", path, key.get_fingerprint())
        return key
    try:
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise OSError(f"cannot read the SSH host key {path}: {exc}") from exc


def set_window_size(fd: int, columns: int, rows: int, pixel_width: int = 0, pixel_height: int = 0) -> None:
    """The pty's size before the console starts, so its first frame already fits."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, pixel_width, pixel_height))


def _key_data(key: asyncssh.SSHKey) -> bytes:
    return bytes(key.public_data)


@dataclass
class SessionStats:
    """What the status view and the tests look at."""

    active: int = 0
    opened: int = 0
    refused_full: int = 0
    refused_no_pty: int = 0
    auth_failed: int = 0
    spawn_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=100))  # the latest


class _Connection(asyncssh.SSHServer):
    """One SSH connection: key-only auth against the configured operators."""

    def __init__(self, server: ConsoleSshServer) -> None:
        self._server = server
        self._conn: asyncssh.SSHServerConnection | None = None
        self._candidate: Operator | None = None
        self._where = "?"
        self.operator: Operator | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self._where = f"{peer[0]}:{peer[1]}" if peer else "?"

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # asyncssh calls this for the key offer and again for the signed request; only a good
        # signature completes the authentication, so remembering the last match is enough.
        self._candidate = self._server.operator_for(key)
        if self._candidate is None:
            self._server.stats.auth_failed += 1
            log.warning("SSH: refused key %s for user %r from %s", key.get_fingerprint(), username, self._where)
        return self._candidate is not None

    def auth_completed(self) -> None:
        self.operator = self._candidate
        if self._conn is not None:
            self._conn.set_extra_info(sipis_operator=self.operator)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.info("SSH connection from %s lost: %s", self._where, exc)


class ConsoleSshServer:
    """Serves the console to the configured operators; start() binds, stop() ends every session."""

    def __init__(self, config: SshConfig, sessions: OperatorSessions, socket_path: Path, *,
                 audit: Audit | None = None, command: Sequence[str] | None = None) -> None:
        self.config = config
        self.sessions = sessions
        self.socket_path = socket_path
        self.audit = audit
        self.command = list(command) if command is not None else console_command(socket_path)
        self.stats = SessionStats()
        self._operators: dict[bytes, SshOperator] = {}
        for entry in config.operators:
            key = asyncssh.import_public_key(entry.public_key)
            self._operators[_key_data(key)] = entry
        self._server: asyncssh.SSHAcceptor | None = None
        self._children: set[asyncio.subprocess.Process] = set()
        self.port: int | None = None

    def operator_for(self, key: asyncssh.SSHKey) -> Operator | None:
        entry = self._operators.get(_key_data(key))
        return Operator(entry.name, entry.role) if entry is not None else None

    async def start(self) -> tuple[str, int]:
        listen = self.config.listen
        assert listen is not None, "SSH is off: [ssh] listen is not set"
        host_key = load_or_create_host_key(self.config.host_key)
        self._server = await asyncssh.create_server(
            lambda: _Connection(self), listen.host, listen.port,
            server_host_keys=[host_key],
            process_factory=self._session,
            line_editor=False,  # keystrokes go to the console raw
            encoding=None,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=True,
        )
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else listen.port
        log.info("SSH console on %s:%s (host key %s)", listen.host, self.port, host_key.get_fingerprint())
        return listen.host, self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for child in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
        for child in list(self._children):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.wait(), TERMINATE_GRACE)

    # ------------------------------------------------------------------ sessions

    async def _session(self, process: asyncssh.SSHServerProcess[Any]) -> None:
        operator: Operator | None = process.get_extra_info("sipis_operator")
        peer = process.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        if operator is None:  # cannot happen with key-only auth; refuse rather than guess
            process.exit(1)
            return
        if process.get_terminal_type() is None or process.command:
            self.stats.refused_no_pty += 1
            process.stdout.write(NO_TERMINAL.encode())
            process.exit(1)
            return
        if self.stats.active >= self.config.max_sessions:
            self.stats.refused_full += 1
            log.warning("SSH: %s refused: %d console sessions open (max_sessions)", operator.name,
                        self.stats.active)
            process.stdout.write(f"The SIPIS console is full ({self.stats.active} sessions open); "
                                 "try again later.\r\n".encode())
            process.exit(1)
            return
        self.stats.active += 1
        self.stats.opened += 1
        token = self.sessions.mint(operator.name, operator.role)
        self._audit(operator, "ssh_login", where, "ok")
        status, outcome = 1, "error"
        try:
            status, outcome = await self._run_console(process, token)
        except Exception:
            log.exception("SSH console session of %s failed", operator.name)
            with contextlib.suppress(Exception):
                process.stdout.write(b"\r\nThe console could not start; the core log says why.\r\n")
        finally:
            self.sessions.revoke(token)
            self.stats.active -= 1
            self._audit(operator, "ssh_logout", where, outcome)
        with contextlib.suppress(Exception):
            process.exit(status)
        # asyncssh closes the redirected pty through cleanup steps that only wait_closed() runs;
        # skipped, they are left unawaited (a RuntimeWarning) and the pty pipes close late
        with contextlib.suppress(Exception):
            await asyncio.wait_for(process.wait_closed(), TERMINATE_GRACE)

    async def _run_console(self, process: asyncssh.SSHServerProcess[Any], token: str) -> tuple[int, str]:
        """Run one console; (exit status, audit outcome: ok | dropped | exit N)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        master, slave = os.openpty()
        try:
            width, height, pixel_width, pixel_height = process.get_terminal_size()
            set_window_size(slave, width or 80, height or 24, pixel_width, pixel_height)
            child = await asyncio.create_subprocess_exec(
                *self.command, stdin=slave, stdout=slave, stderr=slave,
                env=self._child_env(process, token),
                start_new_session=True,  # its own session (and, from inside, our pty as its tty)
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._children.add(child)
        self.stats.spawn_seconds.append(loop.time() - started)
        try:
            process.set_redirect_pid(child.pid)  # window changes → SIGWINCH to the console
            to_child = os.fdopen(master, "wb", buffering=0)
            from_child = os.fdopen(os.dup(master), "rb", buffering=0)
            await process.redirect(stdin=to_child, stdout=from_child)
            exited = asyncio.ensure_future(child.wait())
            closed = asyncio.ensure_future(process.wait_closed())
            dropped = False
            try:
                await asyncio.wait({exited, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                if child.returncode is None:  # the operator went away: hang the console up
                    dropped = True
                    with contextlib.suppress(ProcessLookupError):
                        child.terminate()
                    try:
                        await asyncio.wait_for(asyncio.shield(exited), TERMINATE_GRACE)
                    except TimeoutError:
                        with contextlib.suppress(ProcessLookupError):
                            child.kill()
                await exited
            await asyncio.sleep(DRAIN_DELAY)
            status = child.returncode or 0
            if dropped:
                return status, "dropped"
            return status, "ok" if status == 0 else f"exit {status}"
        finally:
            self._children.discard(child)

    def _child_env(self, process: asyncssh.SSHServerProcess[Any], token: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "TERM": process.get_terminal_type() or "xterm-256color",
            "LANG": "C.UTF-8",
            "SIPIS_OPERATOR_TOKEN": token,
            "SIPIS_OPERATOR_SOCKET": str(self.socket_path),
        }
        colorterm = process.env.get("COLORTERM")  # sent only if the client has SendEnv COLORTERM
        if isinstance(colorterm, bytes):
            colorterm = colorterm.decode(errors="replace")
        if isinstance(colorterm, str) and colorterm.isprintable() and len(colorterm) < 32:
            env["COLORTERM"] = colorterm
        for name in ("HOME", "PYTHONPATH", "VIRTUAL_ENV"):
            if name in os.environ:
                env[name] = os.environ[name]
        return env

    def _audit(self, operator: Operator, action: str, where: str, outcome: str) -> None:
        log.info("SSH: %s (%s) %s from %s: %s", operator.name, operator.role, action, where, outcome)
        if self.audit is not None:
            self.audit(operator, action, where, outcome)
