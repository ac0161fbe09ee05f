"""A throwaway PostgreSQL cluster for tests and demos: ``initdb`` + ``pg_ctl`` in a temp folder.

Debian's ``postgresql`` package puts the server binaries in /usr/lib/postgresql/<version>/bin.
``initdb`` refuses to run as root, so when we are root the cluster's folder belongs to the
``postgres`` system user and every server command runs through ``runuser -u postgres --``.
The server listens on loopback only, on a free port, with a private socket folder; trust
authentication for the single role ``sipis``. ``fsync=off``: fast, and only ever for throwaway data.

A started server is stopped at interpreter exit too (``atexit``), so no server outlives its run.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from lab.kamailio import free_port

ROLE = "sipis"
_BIN_ROOT = Path("/usr/lib/postgresql")


class PostgresError(RuntimeError):
    """The throwaway server could not be created, started or stopped."""


def postgres_bin() -> Path | None:
    """The newest installed server's bin folder (None when PostgreSQL is not installed)."""
    candidates = sorted(
        (p for p in _BIN_ROOT.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PostgresServer:
    """One throwaway cluster. ``start()`` once; ``stop()``/``start()`` again restart it on the same
    port (for restart tests); ``close()`` stops it and removes its folder."""

    def __init__(self, root: Path | None = None, *, port: int | None = None) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise PostgresError("PostgreSQL is not installed (Debian package 'postgresql')")
        self.bin = bin_dir
        self._as_root = os.geteuid() == 0
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="sipis-pg-")) if root is None else root
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log_file = self.root / "postgres.log"
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port(self.host, udp=False)
        self.running = False
        self._initialised = False
        self._databases = itertools.count(1)
        atexit.register(self.close)

    @property
    def url(self) -> str:
        """The URL of the ``postgres`` maintenance database (role ``sipis``, no password)."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{ROLE}@{self.host}:{self.port}/{database}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if check and result.returncode != 0:
            raise PostgresError(f"{argv[0]} failed ({result.returncode}): {result.stderr.strip() or result.stdout}")
        return result

    def _init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self._as_root:
            user = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run("initdb", "-A", "trust", "-U", ROLE, "-E", "UTF8", "--no-locale", "-D", str(self.data))
        self._initialised = True

    def start(self) -> None:
        if self.running:
            return
        if not self._initialised:
            self._init()
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses={self.host} -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log_file),
                  "-o", options)
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: clients are disconnected, as in a restart or an outage)."""
        if not self.running:
            return
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))
        self.running = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = self._run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.host,
                           "-p", str(self.port), "-U", ROLE, "-d", database, "-c", sql)
        return result.stdout.strip()

    def create_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its URL."""
        name = f"{prefix}_{next(self._databases)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url_for(name)

    def close(self) -> None:
        """Stop the server and remove its folder. Idempotent; also runs at interpreter exit."""
        with contextlib.suppress(PostgresError, subprocess.TimeoutExpired, OSError):
            if self.running:
                self.stop("immediate")
        self.running = False
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.close)
