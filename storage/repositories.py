"""Store interfaces (``Protocol``s) and their SQLite implementations.

The rest of the system depends on the protocols only, so a PostgreSQL backend can slot in later.
Every write joins the caller's transaction if one is open (see :meth:`Database.transaction`), which
is how :class:`storage.writer.BatchedWriter` puts a whole batch into one commit.

Ordering convention for ``recent``: the newest ``limit`` rows, returned oldest first.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from storage.database import Database
from storage.records import AuditRecord, EventRecord, InstanceRecord, PushRecord


class InstanceStore(Protocol):
    async def upsert(self, record: InstanceRecord) -> None: ...

    async def upsert_many(self, records: Sequence[InstanceRecord]) -> None: ...

    async def get(self, selector: str) -> InstanceRecord | None: ...

    async def get_by_token_hash(self, token_hash: str) -> InstanceRecord | None: ...

    async def delete(self, selector: str) -> bool: ...

    async def delete_many(self, selectors: Sequence[str]) -> None: ...

    async def load_all(self) -> list[InstanceRecord]: ...

    async def count_by_state(self) -> dict[str, int]: ...


class EventLog(Protocol):
    async def append(self, record: EventRecord) -> None: ...

    async def append_many(self, records: Sequence[EventRecord]) -> None: ...

    async def recent(
        self, limit: int, selector: str | None = None, since_seq: int | None = None
    ) -> list[EventRecord]: ...

    async def last_seq(self) -> int: ...

    async def prune(self, keep: int) -> int: ...


class AuditLog(Protocol):
    async def append(self, record: AuditRecord) -> None: ...

    async def append_many(self, records: Sequence[AuditRecord]) -> None: ...

    async def recent(self, limit: int, operator: str | None = None) -> list[AuditRecord]: ...


class PushStore(Protocol):
    async def upsert(self, record: PushRecord) -> None: ...

    async def upsert_many(self, records: Sequence[PushRecord]) -> None: ...

    async def get(self, push_id: str) -> PushRecord | None: ...

    async def recent(self, limit: int, selector: str | None = None) -> list[PushRecord]: ...

    async def for_call(self, call_id: str) -> list[PushRecord]: ...


@dataclass(frozen=True, slots=True)
class Stores:
    """The set of stores one backend provides."""

    instances: InstanceStore
    events: EventLog
    audit: AuditLog
    pushes: PushStore


def sqlite_stores(db: Database) -> Stores:
    return Stores(
        instances=SqliteInstanceStore(db),
        events=SqliteEventLog(db),
        audit=SqliteAuditLog(db),
        pushes=SqlitePushStore(db),
    )


# -- helpers -------------------------------------------------------------------------------------


def _dump(value: dict[str, Any]) -> str:
    # default=str: an odd value in event data is stored as text rather than failing the batch.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _load(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("JSON column does not hold an object")
    return value


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError("limit must not be negative")


def _upsert_sql(table: str, columns: Sequence[str], key: str) -> str:
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


# -- instances -----------------------------------------------------------------------------------

# Column names are the record's field names, so the two cannot drift apart silently.
_INSTANCE_COLUMNS = tuple(f.name for f in fields(InstanceRecord))
_INSTANCE_SELECT = f"SELECT {', '.join(_INSTANCE_COLUMNS)} FROM instances"
_INSTANCE_UPSERT = _upsert_sql("instances", _INSTANCE_COLUMNS, "selector")
_INSTANCE_BOOLS = ("push_unreachable", "disabled")


def _instance_row(record: InstanceRecord) -> tuple[object, ...]:
    # Not dataclasses.astuple: that deep-copies, and a flat record only needs its values in order.
    return tuple(getattr(record, name) for name in _INSTANCE_COLUMNS)


def _instance_from_row(row: sqlite3.Row) -> InstanceRecord:
    values = dict(zip(_INSTANCE_COLUMNS, row, strict=True))
    for name in _INSTANCE_BOOLS:
        values[name] = bool(values[name])
    return InstanceRecord(**values)


class SqliteInstanceStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def upsert(self, record: InstanceRecord) -> None:
        await self.upsert_many([record])

    async def upsert_many(self, records: Sequence[InstanceRecord]) -> None:
        async with self._db.transaction():
            await self._db.executemany(_INSTANCE_UPSERT, [_instance_row(r) for r in records])

    async def get(self, selector: str) -> InstanceRecord | None:
        rows = await self._db.fetchall(f"{_INSTANCE_SELECT} WHERE selector = ?", (selector,))
        return _instance_from_row(rows[0]) if rows else None

    async def get_by_token_hash(self, token_hash: str) -> InstanceRecord | None:
        rows = await self._db.fetchall(f"{_INSTANCE_SELECT} WHERE token_hash = ? LIMIT 1", (token_hash,))
        return _instance_from_row(rows[0]) if rows else None

    async def delete(self, selector: str) -> bool:
        async with self._db.transaction():
            rows = await self._db.fetchall(
                "DELETE FROM instances WHERE selector = ? RETURNING selector", (selector,)
            )
        return bool(rows)

    async def delete_many(self, selectors: Sequence[str]) -> None:
        async with self._db.transaction():
            await self._db.executemany("DELETE FROM instances WHERE selector = ?", [(s,) for s in selectors])

    async def load_all(self) -> list[InstanceRecord]:
        rows = await self._db.fetchall(f"{_INSTANCE_SELECT} ORDER BY selector")
        return [_instance_from_row(row) for row in rows]

    async def count_by_state(self) -> dict[str, int]:
        rows = await self._db.fetchall("SELECT state, COUNT(*) FROM instances GROUP BY state")
        return {str(state): int(count) for state, count in rows}


# -- events --------------------------------------------------------------------------------------

_EVENT_SELECT = "SELECT seq, at, kind, selector, data FROM events"


def _event_from_row(row: sqlite3.Row) -> EventRecord:
    seq, at, kind, selector, data = row
    return EventRecord(seq=seq, at=at, kind=kind, selector=selector, data=_load(data))


class SqliteEventLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def append(self, record: EventRecord) -> None:
        await self.append_many([record])

    async def append_many(self, records: Sequence[EventRecord]) -> None:
        # Append-only: a seq that is already stored keeps its first value (a retried batch is harmless).
        async with self._db.transaction():
            await self._db.executemany(
                "INSERT INTO events (seq, at, kind, selector, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (seq) DO NOTHING",
                [(r.seq, r.at, r.kind, r.selector, _dump(r.data)) for r in records],
            )

    async def recent(
        self, limit: int, selector: str | None = None, since_seq: int | None = None
    ) -> list[EventRecord]:
        """Events oldest first. Without ``since_seq``: the newest ``limit``. With it: the first
        ``limit`` after ``since_seq``, so a client pages forward with ``since_seq=last.seq``
        and never skips any."""
        _check_limit(limit)
        where: list[str] = []
        params: list[object] = []
        if selector is not None:
            where.append("selector = ?")
            params.append(selector)
        if since_seq is not None:
            where.append("seq > ?")
            params.append(since_seq)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        order = "ASC" if since_seq is not None else "DESC"
        sql = f"{_EVENT_SELECT}{clause} ORDER BY seq {order} LIMIT ?"
        rows = await self._db.fetchall(sql, (*params, limit))
        events = [_event_from_row(row) for row in rows]
        if since_seq is None:
            events.reverse()
        return events

    async def last_seq(self) -> int:
        rows = await self._db.fetchall("SELECT COALESCE(MAX(seq), 0) FROM events")
        return int(rows[0][0])

    async def prune(self, keep: int) -> int:
        """Delete all but the newest ``keep`` events; returns how many went."""
        if keep < 0:
            raise ValueError("keep must not be negative")
        async with self._db.transaction():
            if keep == 0:
                rows = await self._db.fetchall("DELETE FROM events RETURNING seq")
            else:
                # Below the keep-th newest seq; NULL (fewer than keep rows) matches nothing.
                rows = await self._db.fetchall(
                    "DELETE FROM events WHERE seq < "
                    "(SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?) RETURNING seq",
                    (keep - 1,),
                )
        return len(rows)


# -- audit ---------------------------------------------------------------------------------------

_AUDIT_COLUMNS = tuple(f.name for f in fields(AuditRecord))
_AUDIT_SELECT = f"SELECT {', '.join(_AUDIT_COLUMNS)} FROM audit"


def _audit_from_row(row: sqlite3.Row) -> AuditRecord:
    id_, at, operator, role, action, target, detail, outcome = row
    return AuditRecord(
        id=id_,
        at=at,
        operator=operator,
        role=role,
        action=action,
        target=target,
        detail=_load(detail),
        outcome=outcome,
    )


class SqliteAuditLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def append(self, record: AuditRecord) -> None:
        await self.append_many([record])

    async def append_many(self, records: Sequence[AuditRecord]) -> None:
        # The audit trail is immutable: a replayed id keeps what was written first.
        async with self._db.transaction():
            await self._db.executemany(
                f"INSERT INTO audit ({', '.join(_AUDIT_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                [
                    (r.id, r.at, r.operator, r.role, r.action, r.target, _dump(r.detail), r.outcome)
                    for r in records
                ],
            )

    async def recent(self, limit: int, operator: str | None = None) -> list[AuditRecord]:
        _check_limit(limit)
        clause, params = (" WHERE operator = ?", [operator]) if operator is not None else ("", [])
        rows = await self._db.fetchall(
            f"{_AUDIT_SELECT}{clause} ORDER BY at DESC, pos DESC LIMIT ?", (*params, limit)
        )
        return [_audit_from_row(row) for row in reversed(rows)]


# -- pushes --------------------------------------------------------------------------------------

_PUSH_COLUMNS = tuple(f.name for f in fields(PushRecord))
_PUSH_SELECT = f"SELECT {', '.join(_PUSH_COLUMNS)} FROM pushes"
_PUSH_UPSERT = _upsert_sql("pushes", _PUSH_COLUMNS, "push_id")
_PUSH_JSON = ("request_summary", "stages")


def _push_row(record: PushRecord) -> tuple[object, ...]:
    values = (getattr(record, name) for name in _PUSH_COLUMNS)
    return tuple(_dump(v) if n in _PUSH_JSON else v for n, v in zip(_PUSH_COLUMNS, values, strict=True))


def _push_from_row(row: sqlite3.Row) -> PushRecord:
    values: dict[str, Any] = dict(zip(_PUSH_COLUMNS, row, strict=True))
    for name in _PUSH_JSON:
        values[name] = _load(values[name])
    return PushRecord(**values)


class SqlitePushStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def upsert(self, record: PushRecord) -> None:
        await self.upsert_many([record])

    async def upsert_many(self, records: Sequence[PushRecord]) -> None:
        # ON CONFLICT DO UPDATE keeps the row's pos, so a push stays where it was first recorded.
        async with self._db.transaction():
            await self._db.executemany(_PUSH_UPSERT, [_push_row(r) for r in records])

    async def get(self, push_id: str) -> PushRecord | None:
        rows = await self._db.fetchall(f"{_PUSH_SELECT} WHERE push_id = ?", (push_id,))
        return _push_from_row(rows[0]) if rows else None

    async def recent(self, limit: int, selector: str | None = None) -> list[PushRecord]:
        _check_limit(limit)
        clause, params = (" WHERE selector = ?", [selector]) if selector is not None else ("", [])
        rows = await self._db.fetchall(f"{_PUSH_SELECT}{clause} ORDER BY pos DESC LIMIT ?", (*params, limit))
        return [_push_from_row(row) for row in reversed(rows)]

    async def for_call(self, call_id: str) -> list[PushRecord]:
        rows = await self._db.fetchall(f"{_PUSH_SELECT} WHERE call_id = ? ORDER BY pos", (call_id,))
        return [_push_from_row(row) for row in rows]
