"""The stores of :mod:`storage.repositories` on PostgreSQL, with the same behaviour.

Rows are converted by the SQLite module's helpers (one mapping between records and columns).
Batches are one pipelined ``executemany`` per run, or one statement over an array (``= ANY``).

Events: every node numbers its own (the bus counts from ``last_seq() + 1`` at start), so the table
is keyed by (node, seq) and this node's log reads and prunes its own events only; ``recent_all``
merges every node's, by time.
"""

from __future__ import annotations

from collections.abc import Sequence

from contract.documents import AuditEntry, PushRecord
from contract.events import Event
from storage.cluster import PgLeaseStore, PgNodeStore, PgSignals, PgSingleton
from storage.postgres import INSTANCE_LOCK_ORDER, PgDatabase
from storage.records import InstanceRecord
from storage.repositories import (
    _AUDIT_COLUMNS,
    _INSTANCE_COLUMNS,
    _PUSH_COLUMNS,
    Stores,
    _audit_from_row,
    _audit_row,
    _check_limit,
    _event_from_row,
    _event_row,
    _instance_from_row,
    _instance_row,
    _push_from_row,
    _push_row,
)


def pg_stores(db: PgDatabase, node: str) -> Stores:
    """Every store on ``db``, for the node called ``node``. Call ``stores.signals.start()`` to listen."""
    return Stores(
        instances=PgInstanceStore(db),
        events=PgEventLog(db, node),
        audit=PgAuditLog(db),
        pushes=PgPushStore(db),
        leases=PgLeaseStore(db),
        nodes=PgNodeStore(db),
        signals=PgSignals(db),
        singletons=PgSingleton(db),
    )


def _placeholders(count: int) -> str:
    return ", ".join(f"${i}" for i in range(1, count + 1))


def _upsert_sql(table: str, columns: Sequence[str], key: str) -> str:
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({_placeholders(len(columns))}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates}")


# -- instances -----------------------------------------------------------------------------------

_INSTANCE_SELECT = f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances"
# Only the record's columns: owner, lease_until and epoch belong to the lease store.
_INSTANCE_UPSERT = _upsert_sql("instances", _INSTANCE_COLUMNS, "selector")


class PgInstanceStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def upsert(self, record: InstanceRecord) -> None:
        await self.upsert_many([record])

    async def upsert_many(self, records: Sequence[InstanceRecord]) -> None:
        async with self._db.transaction():
            await self._db.executemany(_INSTANCE_UPSERT, [_instance_row(r) for r in sorted(
                records, key=lambda r: r.selector)])  # in INSTANCE_LOCK_ORDER

    async def get(self, selector: str) -> InstanceRecord | None:
        rows = await self._db.fetch(f"{_INSTANCE_SELECT} WHERE selector = $1", selector)
        return _instance_from_row(rows[0]) if rows else None

    async def get_by_token_hash(self, token_hash: str) -> InstanceRecord | None:
        rows = await self._db.fetch(f"{_INSTANCE_SELECT} WHERE token_hash = $1 LIMIT 1", token_hash)
        return _instance_from_row(rows[0]) if rows else None

    async def delete(self, selector: str) -> bool:
        async with self._db.transaction():
            rows = await self._db.fetch("DELETE FROM instances WHERE selector = $1 RETURNING selector", selector)
        return bool(rows)

    async def delete_many(self, selectors: Sequence[str]) -> None:
        if selectors:
            async with self._db.transaction():
                await self._db.execute("DELETE FROM instances WHERE selector IN (SELECT selector FROM instances"
                                       f" WHERE selector = ANY($1::text[]) {INSTANCE_LOCK_ORDER})", list(selectors))

    async def load_all(self) -> list[InstanceRecord]:
        rows = await self._db.fetch(f"{_INSTANCE_SELECT} ORDER BY selector COLLATE \"C\"")
        return [_instance_from_row(row) for row in rows]

    async def count_by_state(self) -> dict[str, int]:
        rows = await self._db.fetch("SELECT state, COUNT(*) FROM instances GROUP BY state")
        return {str(state): int(count) for state, count in rows}

    async def count_by_state_and_status(self) -> dict[tuple[str, str], int]:
        rows = await self._db.fetch("SELECT state, reg_status, COUNT(*) FROM instances GROUP BY state, reg_status")
        return {(str(state), str(status)): int(count) for state, status, count in rows}


# -- events --------------------------------------------------------------------------------------

_EVENT_SELECT = "SELECT seq, at, kind, selector, data FROM events"


class PgEventLog:
    def __init__(self, db: PgDatabase, node: str) -> None:
        self._db = db
        self.node = node

    async def append(self, event: Event) -> None:
        await self.append_many([event])

    async def append_many(self, events: Sequence[Event]) -> None:
        async with self._db.transaction():
            await self._db.executemany(
                "INSERT INTO events (node, seq, at, kind, selector, data) VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (node, seq) DO NOTHING",
                [(self.node, *_event_row(e)) for e in events],
            )

    async def recent(
        self, limit: int, selector: str | None = None, since_seq: int | None = None
    ) -> list[Event]:
        """This node's events, oldest first, paged as in :class:`SqliteEventLog.recent`."""
        _check_limit(limit)
        where = ["node = $1"]
        params: list[object] = [self.node]
        if selector is not None:
            params.append(selector)
            where.append(f"selector = ${len(params)}")
        if since_seq is not None:
            params.append(since_seq)
            where.append(f"seq > ${len(params)}")
        order = "ASC" if since_seq is not None else "DESC"
        params.append(limit)
        sql = f"{_EVENT_SELECT} WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ${len(params)}"
        events = [_event_from_row(row) for row in await self._db.fetch(sql, *params)]
        if since_seq is None:
            events.reverse()
        return events

    async def recent_all(self, limit: int, selector: str | None = None) -> list[tuple[str, Event]]:
        """The newest ``limit`` events of every node, oldest first, each with its node's name."""
        _check_limit(limit)
        clause, params = (" WHERE selector = $2", [selector]) if selector is not None else ("", [])
        rows = await self._db.fetch(
            f"SELECT node, seq, at, kind, selector, data FROM events{clause} ORDER BY at DESC, node, seq DESC "
            "LIMIT $1", limit, *params)
        return [(row[0], _event_from_row(row[1:])) for row in reversed(rows)]

    async def last_seq(self) -> int:
        rows = await self._db.fetch("SELECT COALESCE(MAX(seq), 0) FROM events WHERE node = $1", self.node)
        return int(rows[0][0])

    async def prune(self, keep: int) -> int:
        """Delete all but this node's newest ``keep`` events; returns how many went."""
        if keep < 0:
            raise ValueError("keep must not be negative")
        async with self._db.transaction():
            rows = await self._db.fetch(
                "DELETE FROM events WHERE node = $1 AND seq <= COALESCE("
                "(SELECT seq FROM events WHERE node = $1 ORDER BY seq DESC LIMIT 1 OFFSET $2), -1) "
                "RETURNING seq", self.node, keep)
        return len(rows)


# -- audit ---------------------------------------------------------------------------------------

_AUDIT_SELECT = f"SELECT {', '.join(_AUDIT_COLUMNS)} FROM audit"


class PgAuditLog:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def append(self, entry: AuditEntry) -> None:
        await self.append_many([entry])

    async def append_many(self, entries: Sequence[AuditEntry]) -> None:
        async with self._db.transaction():
            await self._db.executemany(
                f"INSERT INTO audit ({', '.join(_AUDIT_COLUMNS)}) VALUES ({_placeholders(len(_AUDIT_COLUMNS))}) "
                "ON CONFLICT (id) DO NOTHING",
                [_audit_row(e) for e in entries],
            )

    async def recent(self, limit: int, operator: str | None = None) -> list[AuditEntry]:
        _check_limit(limit)
        clause, params = (" WHERE operator = $2", [operator]) if operator is not None else ("", [])
        rows = await self._db.fetch(f"{_AUDIT_SELECT}{clause} ORDER BY at DESC, pos DESC LIMIT $1", limit, *params)
        return [_audit_from_row(row) for row in reversed(rows)]


# -- pushes --------------------------------------------------------------------------------------

_PUSH_SELECT = f"SELECT {', '.join(_PUSH_COLUMNS)} FROM pushes"
_PUSH_UPSERT = _upsert_sql("pushes", _PUSH_COLUMNS, "push_id")


class PgPushStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def upsert(self, record: PushRecord) -> None:
        await self.upsert_many([record])

    async def upsert_many(self, records: Sequence[PushRecord]) -> None:
        async with self._db.transaction():
            await self._db.executemany(_PUSH_UPSERT, [_push_row(r) for r in records])

    async def get(self, push_id: str) -> PushRecord | None:
        rows = await self._db.fetch(f"{_PUSH_SELECT} WHERE push_id = $1", push_id)
        return _push_from_row(rows[0]) if rows else None

    async def recent(self, limit: int, selector: str | None = None) -> list[PushRecord]:
        _check_limit(limit)
        clause, params = (" WHERE selector = $2", [selector]) if selector is not None else ("", [])
        rows = await self._db.fetch(f"{_PUSH_SELECT}{clause} ORDER BY pos DESC LIMIT $1", limit, *params)
        return [_push_from_row(row) for row in reversed(rows)]

    async def for_call(self, call_id: str) -> list[PushRecord]:
        rows = await self._db.fetch(f"{_PUSH_SELECT} WHERE call_id = $1 ORDER BY pos", call_id)
        return [_push_from_row(row) for row in rows]
