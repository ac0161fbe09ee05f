"""Store interfaces (``Protocol``s) and their SQLite implementations.

The rest of the system depends on the protocols only; storage/pg_repositories.py is the PostgreSQL backend.
Every write joins the caller's transaction if one is open (see :meth:`Database.transaction`), which
is how :class:`storage.writer.BatchedWriter` puts a whole batch into one commit.

Events, audit entries and pushes go in and come out as the contract's types; converting to and
from columns happens here and nowhere else.

Ordering convention for ``recent``: the newest ``limit`` rows, returned oldest first.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from contract.codec import decode_payload, payload_data
from contract.documents import AuditEntry, PushRecord
from contract.events import Event, UnknownPayload
from storage.cluster import (
    LeaseStore,
    LocalSignals,
    LocalSingleton,
    NodeStore,
    Signals,
    Singleton,
    SqliteLeaseStore,
    SqliteNodeStore,
)
from storage.database import Database
from storage.records import InstanceRecord


class InstanceStore(Protocol):
    async def upsert(self, record: InstanceRecord) -> None: ...

    async def upsert_many(self, records: Sequence[InstanceRecord]) -> None: ...

    async def get(self, selector: str) -> InstanceRecord | None: ...

    async def get_by_token_hash(self, token_hash: str) -> InstanceRecord | None: ...

    async def delete(self, selector: str) -> bool: ...

    async def delete_many(self, selectors: Sequence[str]) -> None: ...

    async def load_all(self) -> list[InstanceRecord]: ...

    async def count_by_state(self) -> dict[str, int]: ...

    async def count_by_state_and_status(self) -> dict[tuple[str, str], int]:
        """Instances per (state, registration status): one query."""
        ...


class EventLog(Protocol):
    async def append(self, event: Event) -> None: ...

    async def append_many(self, events: Sequence[Event]) -> None: ...

    async def recent(
        self, limit: int, selector: str | None = None, since_seq: int | None = None
    ) -> list[Event]: ...

    async def last_seq(self) -> int: ...

    async def prune(self, keep: int) -> int: ...


class AuditLog(Protocol):
    async def append(self, entry: AuditEntry) -> None: ...

    async def append_many(self, entries: Sequence[AuditEntry]) -> None: ...

    async def recent(self, limit: int, operator: str | None = None) -> list[AuditEntry]: ...


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
    leases: LeaseStore
    nodes: NodeStore
    signals: Signals
    singletons: Singleton


def sqlite_stores(db: Database) -> Stores:
    return Stores(
        instances=SqliteInstanceStore(db),
        events=SqliteEventLog(db),
        audit=SqliteAuditLog(db),
        pushes=SqlitePushStore(db),
        leases=SqliteLeaseStore(db),
        nodes=SqliteNodeStore(db),
        signals=LocalSignals(),
        singletons=LocalSingleton(),
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

    async def count_by_state_and_status(self) -> dict[tuple[str, str], int]:
        rows = await self._db.fetchall("SELECT state, reg_status, COUNT(*) FROM instances GROUP BY state, reg_status")
        return {(str(state), str(status)): int(count) for state, status, count in rows}


# -- events --------------------------------------------------------------------------------------

_EVENT_SELECT = "SELECT seq, at, kind, selector, data FROM events"


def _event_row(event: Event) -> tuple[object, ...]:
    return (event.seq, event.at, str(event.kind), event.selector, _dump(payload_data(event.payload)))


def _event_from_row(row: sqlite3.Row) -> Event:
    seq, at, kind, selector, text = row
    data = _load(text)
    try:
        # The codec ignores keys it does not know and fills in missing ones, so rows written by
        # another version load as they are.
        payload = decode_payload(kind, data, selector)
    except (TypeError, ValueError):
        # A value of the wrong type (a row from a much older version): keep the row, raw.
        payload = UnknownPayload(kind, data)
    return Event(seq=seq, at=at, selector=selector, payload=payload)


class SqliteEventLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def append(self, event: Event) -> None:
        await self.append_many([event])

    async def append_many(self, events: Sequence[Event]) -> None:
        # Append-only: a seq that is already stored keeps its first value (a retried batch is harmless).
        async with self._db.transaction():
            await self._db.executemany(
                "INSERT INTO events (seq, at, kind, selector, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (seq) DO NOTHING",
                [_event_row(e) for e in events],
            )

    async def recent(
        self, limit: int, selector: str | None = None, since_seq: int | None = None
    ) -> list[Event]:
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

_AUDIT_COLUMNS = ("id", "at", "operator", "role", "action", "target", "detail", "outcome")
_AUDIT_SELECT = f"SELECT {', '.join(_AUDIT_COLUMNS)} FROM audit"


def _audit_row(entry: AuditEntry) -> tuple[object, ...]:
    return (entry.id, entry.at, entry.operator, entry.role, entry.action, entry.target, _dump(entry.detail),
            entry.outcome)


def _audit_from_row(row: sqlite3.Row) -> AuditEntry:
    id_, at, operator, role, action, target, detail, outcome = row
    return AuditEntry(
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

    async def append(self, entry: AuditEntry) -> None:
        await self.append_many([entry])

    async def append_many(self, entries: Sequence[AuditEntry]) -> None:
        # The audit trail is immutable: a replayed id keeps what was written first.
        async with self._db.transaction():
            await self._db.executemany(
                f"INSERT INTO audit ({', '.join(_AUDIT_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                [_audit_row(e) for e in entries],
            )

    async def recent(self, limit: int, operator: str | None = None) -> list[AuditEntry]:
        _check_limit(limit)
        clause, params = (" WHERE operator = ?", [operator]) if operator is not None else ("", [])
        rows = await self._db.fetchall(
            f"{_AUDIT_SELECT}{clause} ORDER BY at DESC, pos DESC LIMIT ?", (*params, limit)
        )
        return [_audit_from_row(row) for row in reversed(rows)]


# -- pushes --------------------------------------------------------------------------------------

# The row has one text column for the provider's reason or our own error: ``error``. A record
# read back has its reason there and ``provider_reason`` None.
_PUSH_COLUMNS = ("push_id", "selector", "call_id", "provider", "kind", "request_summary", "outcome",
                 "provider_code", "attempt", "replay_of", "stages", "latency_ms", "error")
_PUSH_SELECT = f"SELECT {', '.join(_PUSH_COLUMNS)} FROM pushes"
_PUSH_UPSERT = _upsert_sql("pushes", _PUSH_COLUMNS, "push_id")


def _push_row(r: PushRecord) -> tuple[object, ...]:
    return (r.push_id, r.selector, r.call_id, r.provider, r.kind, _dump(r.request_summary), r.outcome,
            r.provider_code, r.attempt, r.replay_of, _dump(r.stages), r.latency_ms, r.error or r.provider_reason)


def _push_from_row(row: sqlite3.Row) -> PushRecord:
    (push_id, selector, call_id, provider, kind, request_summary, outcome, provider_code, attempt, replay_of,
     stages, latency_ms, error) = row
    return PushRecord(push_id=push_id, selector=selector, kind=kind, provider=provider, call_id=call_id,
                      attempt=attempt, outcome=outcome, provider_code=provider_code, latency_ms=latency_ms,
                      error=error, replay_of=replay_of, stages=_load(stages), request_summary=_load(request_summary))


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
