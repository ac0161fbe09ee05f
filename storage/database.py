"""One aiosqlite connection, its pragmas, its migrations and its transactions.

The connection runs in autocommit mode and every write goes through :meth:`Database.transaction`,
which issues ``BEGIN IMMEDIATE``/``COMMIT`` itself: Python's implicit transaction handling would
commit behind our back (``executescript``) and cannot span the awaits of a batched flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeAlias

import aiosqlite

DEFAULT_BUSY_TIMEOUT = 5.0
_SQLITE_FULL = 13  # primary result code of "database or disk is full"
#: Less free space than this on the database's filesystem turns an I/O error into "disk full":
#: SQLite reports a failed WAL or shared-memory write on a full disk as "disk I/O error".
_NEARLY_FULL = 1 << 20


def is_disk_full(exc: BaseException, path: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``exc`` means the disk under the database (at ``path``) is full."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if (isinstance(code, int) and code & 0xFF == _SQLITE_FULL) or "disk is full" in str(exc):
        return True
    if path is None or os.fspath(path) == ":memory:" or "I/O error" not in str(exc):
        return False
    try:
        return shutil.disk_usage(Path(path).parent).free < _NEARLY_FULL
    except OSError:
        return False


class _WithoutParameters(logging.Filter):
    """aiosqlite logs every call at DEBUG as ``executing functools.partial(<method>, sql, params)``,
    and the parameters hold push tokens and selectors: keep only the method's name."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_call_name(arg) for arg in record.args)
        return True


def _call_name(arg: object) -> object:
    if isinstance(arg, functools.partial):
        arg = arg.func
    if callable(arg) and not isinstance(arg, BaseException):
        return f"{getattr(arg, '__qualname__', type(arg).__name__)}(…)"
    return arg


logging.getLogger("aiosqlite").addFilter(_WithoutParameters())


class DiskFullError(OSError):
    """The database cannot be opened or written because its disk is full."""


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer release than this one."""


class Database:
    """Owns one connection. Open with :meth:`open`; never share it across event loops."""

    def __init__(self, conn: aiosqlite.Connection, path: str) -> None:
        self._conn = conn
        self._path = path
        self._tx_lock = asyncio.Lock()
        self._tx_owner: asyncio.Task[object] | None = None
        self.commits = 0  # committed transactions, for the console and for tests
        self.rollbacks = 0

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        migrations: Sequence[Migration] | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> Database:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date.

        ``migrations`` defaults to :data:`MIGRATIONS`; ``":memory:"`` gives a throwaway database.
        """
        location = os.fspath(path)
        try:
            if location != ":memory:":
                _prepare_file(Path(location))
            conn = await aiosqlite.connect(location, isolation_level=None, timeout=busy_timeout)
        except (OSError, sqlite3.Error) as exc:
            if is_disk_full(exc, location):
                raise _disk_full(exc, location) from exc
            raise
        db = cls(conn, location)
        try:
            await db._configure(busy_timeout)
            await db.migrate(MIGRATIONS if migrations is None else migrations)
        except BaseException as exc:
            await conn.close()
            if is_disk_full(exc, location):
                raise _disk_full(exc, location) from exc
            raise
        return db

    @property
    def path(self) -> str:
        return self._path

    @property
    def conn(self) -> aiosqlite.Connection:
        return self._conn

    async def close(self) -> None:
        await self._conn.close()

    async def _configure(self, busy_timeout: float) -> None:
        await self.fetchall(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        await self.fetchall("PRAGMA journal_mode = WAL")  # in-memory databases stay 'memory'
        await self.fetchall("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable except on power loss
        await self.fetchall("PRAGMA foreign_keys = ON")

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        return list(await self._conn.execute_fetchall(sql, params))

    async def execute(self, sql: str, params: Sequence[object] = ()) -> None:
        await self._conn.execute_fetchall(sql, params)

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        if rows:
            await self._conn.executemany(sql, rows)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """A write transaction, serialised with every other one on this connection.

        Entered again by the task that already holds it, it joins the outer transaction (no
        savepoint): an error anywhere rolls back the whole unit, which is what a batch wants.
        Tasks spawned inside a transaction do not inherit it; they wait for it to finish.
        Reads do not take part: on this shared connection they may see a batch still in flight.
        """
        task = asyncio.current_task()
        if task is not None and self._tx_owner is task:
            yield
            return
        async with self._tx_lock:
            self._tx_owner = task
            try:
                if self._conn.in_transaction:
                    # A previous rollback was itself interrupted; never build on its leftovers.
                    await self._conn.rollback()
                await self.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    await self.execute("COMMIT")
                except BaseException:
                    await self._rollback_quietly()
                    raise
                self.commits += 1
            finally:
                self._tx_owner = None

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failed write may succeed later (locked, busy, I/O, disk full, and also schema
        errors, which a restart may fix) rather than fail the same way every time (bad values)."""
        return isinstance(exc, sqlite3.OperationalError)

    def is_disk_full(self, exc: BaseException) -> bool:
        return is_disk_full(exc, self._path)

    async def _rollback_quietly(self) -> None:
        self.rollbacks += 1
        with contextlib.suppress(sqlite3.Error, ValueError):
            if self._conn.in_transaction:
                await self._conn.rollback()

    async def schema_version(self) -> int:
        rows = await self.fetchall("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        return int(rows[0][0])

    async def migrate(self, migrations: Sequence[Migration]) -> int:
        """Apply the migrations this database has not seen yet, each in its own transaction.

        Idempotent; safe when two processes start at once (the version is re-read under the write
        lock). Returns the resulting version.
        """
        await self.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        target = len(migrations)
        current = await self.schema_version()
        if current > target:
            raise SchemaTooNewError(
                f"database {self._path} has schema version {current}; this release knows up to {target}"
            )
        while current < target:
            async with self.transaction():
                current = await self.schema_version()
                if current >= target:
                    break
                await self._apply(migrations[current])
                current += 1
                await self.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (current, time.time())
                )
        return current

    async def _apply(self, migration: Migration) -> None:
        if isinstance(migration, str):
            for statement in split_sql(migration):
                await self.execute(statement)
        else:
            await migration(self)


def _disk_full(exc: BaseException, location: str) -> DiskFullError:
    """A full disk named as such (SQLite itself may only say "disk I/O error")."""
    full = DiskFullError(f"disk full: cannot open the database {location} ({type(exc).__name__}: {exc}); "
                         "free space on its filesystem and start again")
    full.errno = errno.ENOSPC
    return full


def _prepare_file(path: Path) -> None:
    """Create the state folder and an owner-only database file (SQLite copies its mode to -wal/-shm)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def split_sql(script: str) -> list[str]:
    """Split a script into complete statements (trigger bodies included) without running it.

    ``executescript`` would do the splitting, but it commits first, which breaks a migration's
    all-or-nothing transaction.
    """
    statements: list[str] = []
    buffer = ""
    pieces = script.split(";")
    for index, piece in enumerate(pieces):
        buffer += piece
        if index < len(pieces) - 1:
            buffer += ";"
        if sqlite3.complete_statement(buffer):
            if _has_code(buffer):
                statements.append(buffer.strip())
            buffer = ""
    if _has_code(buffer):
        statements.append(buffer.strip())
    return statements


def _has_code(sql: str) -> bool:
    for line in sql.splitlines():
        code = line.split("--", 1)[0].strip().strip(";").strip()
        if code:
            return True
    return False


# A migration is SQL text (split into statements and run in one transaction) or an async function
# for changes SQL alone cannot express. Append only: never edit a migration that has shipped.
Migration: TypeAlias = str | Callable[[Database], Awaitable[None]]

_V1_SCHEMA = """
CREATE TABLE instances (
    selector            TEXT PRIMARY KEY,
    aor                 TEXT NOT NULL,
    username            TEXT NOT NULL,
    auth_username       TEXT,
    password_blob       BLOB,               -- SecretBox blob, NULL once wiped
    registrar           TEXT,
    display_name        TEXT,
    instance_id         TEXT NOT NULL,
    reg_id              INTEGER NOT NULL,
    push_provider       TEXT NOT NULL,
    push_app_id         TEXT NOT NULL,
    push_token          TEXT NOT NULL,
    push_voip_token     TEXT,
    token_hash          TEXT NOT NULL,      -- sha256 of the bearer token, never the token
    state               TEXT NOT NULL,
    reg_status          TEXT NOT NULL,
    last_code           INTEGER,
    last_reason         TEXT,
    expires_at          REAL,
    failure_count       INTEGER NOT NULL,
    app_contact         TEXT,
    app_last_seen       REAL NOT NULL,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    unregistered_since  REAL,
    push_unreachable    INTEGER NOT NULL,
    disabled            INTEGER NOT NULL
);
-- Not UNIQUE: a constraint violation inside a batch would fail every retry of that batch.
CREATE INDEX instances_token_hash ON instances (token_hash);
CREATE INDEX instances_state ON instances (state);

CREATE TABLE events (
    seq       INTEGER PRIMARY KEY,
    at        REAL NOT NULL,
    kind      TEXT NOT NULL,
    selector  TEXT,
    data      TEXT NOT NULL                 -- JSON object
);
CREATE INDEX events_selector_seq ON events (selector, seq);

-- pos keeps insertion order stable (VACUUM may renumber an implicit rowid).
CREATE TABLE audit (
    pos       INTEGER PRIMARY KEY,
    id        TEXT NOT NULL UNIQUE,
    at        REAL NOT NULL,
    operator  TEXT NOT NULL,
    role      TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT,
    detail    TEXT NOT NULL,                -- JSON object
    outcome   TEXT NOT NULL
);
CREATE INDEX audit_at ON audit (at);
CREATE INDEX audit_operator_at ON audit (operator, at);

CREATE TABLE pushes (
    pos              INTEGER PRIMARY KEY,
    push_id          TEXT NOT NULL UNIQUE,
    selector         TEXT NOT NULL,
    call_id          TEXT,
    provider         TEXT NOT NULL,
    kind             TEXT NOT NULL,
    request_summary  TEXT NOT NULL,         -- JSON object, already masked by the caller
    outcome          TEXT NOT NULL,
    provider_code    INTEGER,
    attempt          INTEGER NOT NULL,
    replay_of        TEXT,
    stages           TEXT NOT NULL,         -- JSON object: stage -> wall time
    latency_ms       REAL,
    error            TEXT
);
CREATE INDEX pushes_selector ON pushes (selector, pos);
CREATE INDEX pushes_call_id ON pushes (call_id, pos);
"""

# v2, the cluster: who acts for each instance (written only by the lease store) and the nodes.
_V2_LEASES = """
ALTER TABLE instances ADD COLUMN owner TEXT;
ALTER TABLE instances ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
CREATE INDEX instances_owner ON instances (owner);
CREATE INDEX instances_lease_until ON instances (lease_until);

CREATE TABLE nodes (
    name        TEXT PRIMARY KEY,
    state       TEXT NOT NULL,              -- up | draining
    last_seen   REAL NOT NULL,
    started_at  REAL NOT NULL
);
"""

MIGRATIONS: list[Migration] = [
    _V1_SCHEMA,
    _V2_LEASES,
]
