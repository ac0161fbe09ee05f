"""PostgreSQL: a connection pool, its migrations and its transactions (asyncpg).

The same contract as :class:`storage.database.Database`: every write goes through
:meth:`PgDatabase.transaction`, which a task enters again to join its own outer transaction (so a
batch of the writer is one COMMIT); tasks spawned inside do not inherit it. A transaction returns
only after PostgreSQL's COMMIT has returned, so "acknowledged" still means durable.

Errors are rethrown as :class:`PgError`, which keeps the SQLSTATE and the server's message but
never its DETAIL (PostgreSQL echoes the offending values there: tokens, selectors).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import asyncpg

from storage.database import SchemaTooNewError
from storage.pg_url import check_url, redact_url

log = logging.getLogger(__name__)


class _PoolRetriesQuiet(logging.Filter):
    """asyncpg's pool logs every failed attempt to restore its connection floor at WARNING with a
    full traceback, several a second while PostgreSQL is down. The core already says so once per
    episode (the ``storage-failing`` alarm and its WARNING line): keep these at DEBUG, one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.exc_info:
            error = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()}: {type(error).__name__}: {error}", None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            # the logger let it through as a WARNING: pass it on only where DEBUG is wanted
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("asyncpg.pool").addFilter(_PoolRetriesQuiet())

#: Advisory lock keys (two int4s: ours, then what for). Migrations hold MIGRATION for their transaction.
LOCK_CLASS = 0x5153  # "SQ"
#: Statements that lock many instances rows take them in this order, and the writer's batches are
#: written in it (Python's str order is the "C" collation's), so a node's writer and its lease
#: rounds never deadlock on the rows they share.
INSTANCE_LOCK_ORDER = 'ORDER BY selector COLLATE "C" FOR UPDATE'
MIGRATION_LOCK = 1
DEFAULT_CONNECT_TIMEOUT = 10.0

#: SQLSTATE classes after which the same write may succeed later: connection exception,
#: transaction rollback (serialization failure, deadlock), insufficient resources (disk full, out
#: of connections), operator intervention (shutdown, cannot connect now), system error (I/O).
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
_DISK_FULL = "53100"


class StorageUnreachable(ConnectionError):
    """PostgreSQL stayed unreachable for as long as start-up was willing to wait."""


class PgError(Exception):
    """A PostgreSQL error without its DETAIL: the SQLSTATE and the server's one-line message."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{message} (SQLSTATE {sqlstate})")
        self.sqlstate = sqlstate


def sqlstate_of(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_transient(exc: BaseException) -> bool:
    """Whether a failed statement may succeed later: the server was unreachable, restarting or
    busy, or the transaction lost a race; not a bad value or a bug."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError | ConnectionError):
        return True  # refused, reset, connection closed under us, pool or connect timeout
    state = sqlstate_of(exc)
    return state is not None and state[:2] in _TRANSIENT_CLASSES


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return sqlstate_of(exc) == _DISK_FULL


def _without_detail(exc: BaseException) -> BaseException:
    if isinstance(exc, asyncpg.PostgresError):
        error = PgError(exc.sqlstate, str(exc.args[0]) if exc.args else type(exc).__name__)
        return error
    return exc


async def open_when_reachable(url: str, wait: float, *, retry_every: float = 5.0) -> PgDatabase:
    """:meth:`PgDatabase.open`, retried every ``retry_every`` seconds (one WARNING line each) while
    the server is unreachable or starting, for at most ``wait`` seconds; then
    :class:`StorageUnreachable`. Errors that waiting cannot fix (authentication, no such
    database, a newer schema) are raised at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            return await PgDatabase.open(url, connect_timeout=max(1.0, min(DEFAULT_CONNECT_TIMEOUT, wait)))
        except Exception as exc:
            if not is_transient(exc):
                raise
            left = deadline - loop.time()
            reason = f"{type(exc).__name__}: {exc}"[:200]
            if left <= 0:
                raise StorageUnreachable(
                    f"PostgreSQL at {redact_url(url)} still unreachable after {wait:g} s ({reason}); giving up"
                ) from None
            log.warning("PostgreSQL at %s is not reachable (%s); retrying for up to %.0f s more",
                        redact_url(url), reason, left)
            await asyncio.sleep(min(retry_every, left))


Connection: TypeAlias = "asyncpg.Connection[Any]"
Record: TypeAlias = asyncpg.Record
# A migration is SQL text (run as one multi-statement script) or an async function. Append only.
PgMigration: TypeAlias = "str | Callable[[asyncpg.Connection[Any]], Awaitable[None]]"


class PgDatabase:
    """A pool of connections to one database. Open with :meth:`open`."""

    def __init__(self, pool: asyncpg.Pool[Any], url: str) -> None:
        self._pool = pool
        self._url = url
        self._tx: dict[asyncio.Task[Any], Connection] = {}
        self._dedicated: set[Connection] = set()
        self.commits = 0
        self.rollbacks = 0

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        migrations: Sequence[PgMigration] | None = None,
        min_size: int = 2,
        max_size: int = 10,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> PgDatabase:
        """Connect to ``url`` (no password in it: libpq's PGPASSWORD/passfile supply one) and bring
        the schema up to date; :data:`PG_MIGRATIONS` by default."""
        check_url(url)
        try:
            pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, timeout=connect_timeout,
                                             command_timeout=60)
        except asyncpg.PostgresError as exc:
            raise _without_detail(exc) from None
        db = cls(pool, url)
        try:
            await db.migrate(PG_MIGRATIONS if migrations is None else migrations)
        except BaseException:
            await db.close()
            raise
        return db

    @property
    def url(self) -> str:
        """The URL, safe to log."""
        return redact_url(self._url)

    async def close(self) -> None:
        for conn in list(self._dedicated):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
        self._dedicated.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pool.close(), 5)
        self._pool.terminate()

    async def connect_dedicated(self) -> Connection:
        """A connection outside the pool (LISTEN, session advisory locks), closed by :meth:`close`."""
        try:
            conn: Connection = await asyncpg.connect(self._url, timeout=DEFAULT_CONNECT_TIMEOUT)
        except asyncpg.PostgresError as exc:
            raise _without_detail(exc) from None
        self._dedicated.add(conn)
        conn.add_termination_listener(lambda c: self._dedicated.discard(c))
        return conn

    # -- statements: inside the task's transaction if it has one, else on any pooled connection ---

    def _conn(self) -> Connection | None:
        task = asyncio.current_task()
        return self._tx.get(task) if task is not None else None

    async def fetch(self, sql: str, *args: object) -> list[Record]:
        try:
            conn = self._conn()
            if conn is not None:
                return list(await conn.fetch(sql, *args))
            return list(await self._pool.fetch(sql, *args))
        except asyncpg.PostgresError as exc:
            raise _without_detail(exc) from None

    async def execute(self, sql: str, *args: object) -> str:
        try:
            conn = self._conn()
            if conn is not None:
                return str(await conn.execute(sql, *args))
            return str(await self._pool.execute(sql, *args))
        except asyncpg.PostgresError as exc:
            raise _without_detail(exc) from None

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """One statement for many rows (asyncpg pipelines them: one round trip per batch)."""
        if not rows:
            return
        try:
            conn = self._conn()
            if conn is not None:
                await conn.executemany(sql, rows)
            else:
                await self._pool.executemany(sql, rows)
        except asyncpg.PostgresError as exc:
            raise _without_detail(exc) from None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """A transaction on one pooled connection, joined (not nested) by the task that holds it."""
        task = asyncio.current_task()
        if task is not None and task in self._tx:
            yield
            return
        try:
            async with self._pool.acquire() as conn:
                if task is not None:
                    self._tx[task] = conn
                try:
                    tx = conn.transaction()
                    await tx.start()
                    try:
                        yield
                    except BaseException:
                        self.rollbacks += 1
                        with contextlib.suppress(Exception):
                            await tx.rollback()
                        raise
                    await tx.commit()  # returns once PostgreSQL has made it durable
                    self.commits += 1
                finally:
                    if task is not None:
                        self._tx.pop(task, None)
        except asyncpg.PostgresError as exc:
            raise _without_detail(exc) from None

    def is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    def is_disk_full(self, exc: BaseException) -> bool:
        return is_disk_full(exc)

    # -- migrations -----------------------------------------------------------------------------

    async def schema_version(self) -> int:
        rows = await self.fetch("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        return int(rows[0][0])

    async def migrate(self, migrations: Sequence[PgMigration]) -> int:
        """Apply what this database has not seen, each migration in its own transaction under an
        advisory lock, so nodes starting at once migrate it exactly once. Returns the version."""
        target = len(migrations)
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_CLASS, MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    " version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
                )
                current = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
                if current > target:
                    raise SchemaTooNewError(
                        f"database {self.url} has schema version {current}; this release knows up to {target}"
                    )
                if current == target:
                    return current
                migration = migrations[current]
                if isinstance(migration, str):
                    await conn.execute(migration)
                else:
                    await migration(conn)
                await conn.execute("INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                                   current + 1, time.time())
                log.info("database %s migrated to schema version %d", self.url, current + 1)


_V1_SCHEMA = """
CREATE TABLE instances (
    selector            TEXT PRIMARY KEY,
    aor                 TEXT NOT NULL,
    username            TEXT NOT NULL,
    auth_username       TEXT,
    password_blob       BYTEA,
    registrar           TEXT,
    display_name        TEXT,
    instance_id         TEXT NOT NULL,
    reg_id              INTEGER NOT NULL,
    push_provider       TEXT NOT NULL,
    push_app_id         TEXT NOT NULL,
    push_token          TEXT NOT NULL,
    push_voip_token     TEXT,
    token_hash          TEXT NOT NULL,
    state               TEXT NOT NULL,
    reg_status          TEXT NOT NULL,
    last_code           INTEGER,
    last_reason         TEXT,
    expires_at          DOUBLE PRECISION,
    failure_count       INTEGER NOT NULL,
    app_contact         TEXT,
    app_last_seen       DOUBLE PRECISION NOT NULL,
    created_at          DOUBLE PRECISION NOT NULL,
    updated_at          DOUBLE PRECISION NOT NULL,
    unregistered_since  DOUBLE PRECISION,
    push_unreachable    BOOLEAN NOT NULL,
    disabled            BOOLEAN NOT NULL
);
CREATE INDEX instances_token_hash ON instances (token_hash);
CREATE INDEX instances_state ON instances (state);

-- Every node numbers its own events: (node, seq) is unique, seq alone is not.
CREATE TABLE events (
    node      TEXT NOT NULL,
    seq       BIGINT NOT NULL,
    at        DOUBLE PRECISION NOT NULL,
    kind      TEXT NOT NULL,
    selector  TEXT,
    data      TEXT NOT NULL,
    PRIMARY KEY (node, seq)
);
CREATE INDEX events_selector ON events (selector, node, seq);
CREATE INDEX events_at ON events (at);

CREATE TABLE audit (
    pos       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id        TEXT NOT NULL UNIQUE,
    at        DOUBLE PRECISION NOT NULL,
    operator  TEXT NOT NULL,
    role      TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT,
    detail    TEXT NOT NULL,
    outcome   TEXT NOT NULL
);
CREATE INDEX audit_at ON audit (at);
CREATE INDEX audit_operator_at ON audit (operator, at);

CREATE TABLE pushes (
    pos              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    push_id          TEXT NOT NULL UNIQUE,
    selector         TEXT NOT NULL,
    call_id          TEXT,
    provider         TEXT NOT NULL,
    kind             TEXT NOT NULL,
    request_summary  TEXT NOT NULL,
    outcome          TEXT NOT NULL,
    provider_code    INTEGER,
    attempt          INTEGER NOT NULL,
    replay_of        TEXT,
    stages           TEXT NOT NULL,
    latency_ms       DOUBLE PRECISION,
    error            TEXT
);
CREATE INDEX pushes_selector ON pushes (selector, pos);
CREATE INDEX pushes_call_id ON pushes (call_id, pos);
"""

# v2, the cluster: who acts for each instance (written only by the lease store) and the nodes.
_V2_LEASES = """
ALTER TABLE instances ADD COLUMN owner TEXT;
ALTER TABLE instances ADD COLUMN lease_until DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
CREATE INDEX instances_owner ON instances (owner);
CREATE INDEX instances_lease_until ON instances (lease_until);

CREATE TABLE nodes (
    name        TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    last_seen   DOUBLE PRECISION NOT NULL,
    started_at  DOUBLE PRECISION NOT NULL
);
"""

PG_MIGRATIONS: list[PgMigration] = [
    _V1_SCHEMA,
    _V2_LEASES,
]
