"""Who acts for which instance, which nodes exist, nudges between nodes, one-at-a-time jobs.

Both backends implement every protocol. SQLite is the one-node case: a claim takes every unowned
or expired instance, signals are delivered in-process, a singleton is always held. PostgreSQL is
the cluster: claims skip rows another node is claiming (``FOR UPDATE SKIP LOCKED``), times are the
database's (nodes' clocks may disagree), signals are LISTEN/NOTIFY, singletons advisory locks.

Leases live in their own columns of ``instances`` (owner, lease_until, epoch), written only here:
the instance upsert never touches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from storage.database import Database
from storage.postgres import INSTANCE_LOCK_ORDER, LOCK_CLASS, Connection, PgDatabase, is_transient

log = logging.getLogger(__name__)

CHANNEL = "sipis"
MAX_PAYLOAD = 7000  # bytes; PostgreSQL's NOTIFY limit is 8000 with the envelope
#: Delivered to subscribers after the listening connection was lost and is back: signals sent in
#: between were missed, so re-read what matters.
RECONNECTED = "reconnected"
SINGLETON_CLASS = LOCK_CLASS + 1


@dataclass(frozen=True, slots=True)
class Lease:
    selector: str
    epoch: int  # bumped by every claim; fencing derives CSeq from it


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    state: str  # "up" | "draining" | "gone" (derived: last_seen older than the lease TTL)
    last_seen: float  # wall clock (database time on PostgreSQL)
    instances: int  # leases held
    started_at: float


class LeaseStore(Protocol):
    async def claim(self, node: str, limit: int, ttl: float, *, exclude_draining: bool = True,
                    selectors: Sequence[str] | None = None) -> list[Lease]:
        """Take up to ``limit`` instances with no owner or an expired lease: owner=node,
        lease_until=now+ttl, epoch+1. Disabled instances are claimed too (ownership is about who
        acts). With ``exclude_draining`` a node marked draining takes nothing; ``selectors``: only
        among these (a node claims the instance it just enrolled)."""
        ...

    async def renew(self, node: str, ttl: float) -> list[Lease]:
        """Extend every lease ``node`` still holds; return exactly those."""
        ...

    async def bump(self, node: str, selectors: Sequence[str], ttl: float) -> list[Lease]:
        """epoch+1 (and lease_until=now+ttl) for those of ``selectors`` that ``node`` still owns;
        return them. A node's CSeq space within an epoch is used up, or the node restarted while it
        still held leases (it cannot know the CSeqs its previous life used)."""
        ...

    async def release(self, node: str, selectors: Sequence[str]) -> int:
        """Give these up (owner NULL, lease expired) if ``node`` still owns them; how many."""
        ...

    async def owners(self, selectors: Sequence[str] | None = None) -> dict[str, str | None]: ...

    async def counts(self) -> dict[str | None, int]:
        """owner -> instances (None: unowned)."""
        ...


class NodeStore(Protocol):
    async def heartbeat(self, name: str, state: str) -> None:
        """Upsert the node, last_seen = now (started_at = now on this store's first heartbeat)."""
        ...

    async def nodes(self, gone_after: float | None = None) -> list[NodeRecord]:
        """Every known node with its lease count; state "gone" when ``gone_after`` is given and
        the node was last seen longer ago than that."""
        ...

    async def forget(self, name: str) -> None: ...


SignalCallback = Callable[[str, str], None]


class Signals(Protocol):
    """Cross-node nudges (topic, payload ≤ 7000 bytes), delivered to every subscriber of every
    node, the sender's own included."""

    async def notify(self, topic: str, payload: str) -> None: ...

    def subscribe(self, callback: SignalCallback) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Singleton(Protocol):
    async def try_hold(self, name: str) -> bool:
        """Whether this node holds ``name`` now (taking it if free). Ask again before each run:
        a lock held over a lost connection is gone."""
        ...


def _check_payload(topic: str, payload: str) -> str:
    message = json.dumps([topic, payload], separators=(",", ":"))
    if len(payload.encode()) > MAX_PAYLOAD or len(message.encode()) > 7900:
        raise ValueError(f"signal payload too large ({len(payload.encode())} bytes, at most {MAX_PAYLOAD})")
    return message


def _deliver(callbacks: Sequence[SignalCallback], topic: str, payload: str) -> None:
    for callback in callbacks:
        try:
            callback(topic, payload)
        except Exception:
            log.exception("signal subscriber failed on topic %s", topic)


def _leases(rows: Sequence[Any]) -> list[Lease]:
    return sorted((Lease(str(selector), int(epoch)) for selector, epoch in rows), key=lambda lease: lease.selector)


# -- SQLite: one node ----------------------------------------------------------------------------


class SqliteLeaseStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def claim(self, node: str, limit: int, ttl: float, *, exclude_draining: bool = True,
                    selectors: Sequence[str] | None = None) -> list[Lease]:
        now = self._clock()
        async with self._db.transaction():
            if exclude_draining and await self._db.fetchall(
                "SELECT 1 FROM nodes WHERE name = ? AND state = 'draining'", (node,)
            ):
                return []
            among, chosen = "", tuple[str, ...]()
            if selectors is not None:  # a handful at most (the one just enrolled)
                among, chosen = f" AND selector IN ({', '.join('?' for _ in selectors)})", tuple(selectors)
            rows = await self._db.fetchall(
                "UPDATE instances SET owner = ?, lease_until = ?, epoch = epoch + 1 WHERE selector IN ("
                f" SELECT selector FROM instances WHERE (owner IS NULL OR lease_until < ?){among} LIMIT ?)"
                " RETURNING selector, epoch",
                (node, now + ttl, now, *chosen, limit),
            )
        return _leases(rows)

    async def renew(self, node: str, ttl: float) -> list[Lease]:
        async with self._db.transaction():
            rows = await self._db.fetchall(
                "UPDATE instances SET lease_until = ? WHERE owner = ? RETURNING selector, epoch",
                (self._clock() + ttl, node),
            )
        return _leases(rows)

    async def bump(self, node: str, selectors: Sequence[str], ttl: float) -> list[Lease]:
        rows: list[Any] = []
        async with self._db.transaction():
            for start in range(0, len(selectors), 500):  # SQLite's bound-parameter limit
                chunk = selectors[start : start + 500]
                rows += await self._db.fetchall(
                    "UPDATE instances SET lease_until = ?, epoch = epoch + 1 WHERE owner = ? AND selector IN"
                    f" ({', '.join('?' for _ in chunk)}) RETURNING selector, epoch",
                    (self._clock() + ttl, node, *chunk))
        return _leases(rows)

    async def release(self, node: str, selectors: Sequence[str]) -> int:
        count = 0
        async with self._db.transaction():
            for selector in selectors:
                rows = await self._db.fetchall(
                    "UPDATE instances SET owner = NULL, lease_until = 0 WHERE owner = ? AND selector = ?"
                    " RETURNING selector", (node, selector))
                count += len(rows)
        return count

    async def owners(self, selectors: Sequence[str] | None = None) -> dict[str, str | None]:
        if selectors is None:
            rows = await self._db.fetchall("SELECT selector, owner FROM instances")
        else:
            rows = []
            for start in range(0, len(selectors), 500):  # SQLite's bound-parameter limit
                chunk = selectors[start : start + 500]
                rows += await self._db.fetchall(
                    f"SELECT selector, owner FROM instances WHERE selector IN ({', '.join('?' for _ in chunk)})",
                    chunk)
        return {str(selector): owner for selector, owner in rows}

    async def counts(self) -> dict[str | None, int]:
        rows = await self._db.fetchall("SELECT owner, COUNT(*) FROM instances GROUP BY owner")
        return {owner: int(count) for owner, count in rows}


class SqliteNodeStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self._started: set[str] = set()

    async def heartbeat(self, name: str, state: str) -> None:
        now = self._clock()
        restart = name not in self._started
        async with self._db.transaction():
            await self._db.execute(
                "INSERT INTO nodes (name, state, last_seen, started_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET state = excluded.state, last_seen = excluded.last_seen"
                + (", started_at = excluded.started_at" if restart else ""),
                (name, state, now, now),
            )
        self._started.add(name)

    async def nodes(self, gone_after: float | None = None) -> list[NodeRecord]:
        rows = await self._db.fetchall(
            "SELECT n.name, n.state, n.last_seen, n.started_at,"
            " (SELECT COUNT(*) FROM instances i WHERE i.owner = n.name) FROM nodes n ORDER BY n.name")
        return [_node(row, self._clock(), gone_after) for row in rows]

    async def forget(self, name: str) -> None:
        async with self._db.transaction():
            await self._db.execute("DELETE FROM nodes WHERE name = ?", (name,))
        self._started.discard(name)


def _node(row: Sequence[Any], now: float, gone_after: float | None) -> NodeRecord:
    name, state, last_seen, started_at, instances = row
    if gone_after is not None and now - last_seen > gone_after:
        state = "gone"
    return NodeRecord(name=name, state=state, last_seen=float(last_seen), instances=int(instances),
                      started_at=float(started_at))


class LocalSignals:
    """Signals within this process (one node): delivered on the next turn of the event loop."""

    def __init__(self) -> None:
        self._callbacks: list[SignalCallback] = []

    async def notify(self, topic: str, payload: str) -> None:
        _check_payload(topic, payload)
        asyncio.get_running_loop().call_soon(_deliver, list(self._callbacks), topic, payload)

    def subscribe(self, callback: SignalCallback) -> None:
        self._callbacks.append(callback)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class LocalSingleton:
    """One node: every singleton is this node's."""

    async def try_hold(self, name: str) -> bool:
        return True


# -- PostgreSQL: the cluster ---------------------------------------------------------------------

_NOW = "extract(epoch from now())"


class PgLeaseStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def claim(self, node: str, limit: int, ttl: float, *, exclude_draining: bool = True,
                    selectors: Sequence[str] | None = None) -> list[Lease]:
        if exclude_draining and await self._db.fetch(
            "SELECT 1 FROM nodes WHERE name = $1 AND state = 'draining'", node
        ):
            return []
        async with self._db.transaction():
            rows = await self._db.fetch(
                f"UPDATE instances SET owner = $1, lease_until = {_NOW} + $2, epoch = epoch + 1"
                " WHERE selector IN (SELECT selector FROM instances"
                f"  WHERE (owner IS NULL OR lease_until < {_NOW}) AND ($4::text[] IS NULL OR selector = ANY($4))"
                "  LIMIT $3 FOR UPDATE SKIP LOCKED)"
                " RETURNING selector, epoch",
                node, float(ttl), limit, None if selectors is None else list(selectors))
        return _leases(rows)

    async def renew(self, node: str, ttl: float) -> list[Lease]:
        async with self._db.transaction():
            rows = await self._db.fetch(
                f"UPDATE instances SET lease_until = {_NOW} + $2 WHERE selector IN"
                f" (SELECT selector FROM instances WHERE owner = $1 {INSTANCE_LOCK_ORDER}) RETURNING selector, epoch",
                node, float(ttl))
        return _leases(rows)

    async def bump(self, node: str, selectors: Sequence[str], ttl: float) -> list[Lease]:
        if not selectors:
            return []
        async with self._db.transaction():
            rows = await self._db.fetch(
                f"UPDATE instances SET lease_until = {_NOW} + $3, epoch = epoch + 1 WHERE selector IN"
                " (SELECT selector FROM instances WHERE owner = $1 AND selector = ANY($2::text[])"
                f" {INSTANCE_LOCK_ORDER}) RETURNING selector, epoch",
                node, list(selectors), float(ttl))
        return _leases(rows)

    async def release(self, node: str, selectors: Sequence[str]) -> int:
        if not selectors:
            return 0
        async with self._db.transaction():
            rows = await self._db.fetch(
                "UPDATE instances SET owner = NULL, lease_until = 0 WHERE selector IN (SELECT selector FROM instances"
                f" WHERE owner = $1 AND selector = ANY($2::text[]) {INSTANCE_LOCK_ORDER}) RETURNING selector",
                node, list(selectors))
        return len(rows)

    async def owners(self, selectors: Sequence[str] | None = None) -> dict[str, str | None]:
        if selectors is None:
            rows = await self._db.fetch("SELECT selector, owner FROM instances")
        else:
            rows = await self._db.fetch(
                "SELECT selector, owner FROM instances WHERE selector = ANY($1::text[])", list(selectors))
        return {str(selector): owner for selector, owner in rows}

    async def counts(self) -> dict[str | None, int]:
        rows = await self._db.fetch("SELECT owner, COUNT(*) FROM instances GROUP BY owner")
        return {owner: int(count) for owner, count in rows}


class PgNodeStore:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._started: set[str] = set()

    async def heartbeat(self, name: str, state: str) -> None:
        restart = name not in self._started
        async with self._db.transaction():
            await self._db.execute(
                f"INSERT INTO nodes (name, state, last_seen, started_at) VALUES ($1, $2, {_NOW}, {_NOW}) "
                "ON CONFLICT (name) DO UPDATE SET state = excluded.state, last_seen = excluded.last_seen"
                + (", started_at = excluded.started_at" if restart else ""),
                name, state)
        self._started.add(name)

    async def nodes(self, gone_after: float | None = None) -> list[NodeRecord]:
        rows = await self._db.fetch(
            f"SELECT n.name, n.state, n.last_seen, n.started_at, COUNT(i.selector), {_NOW} FROM nodes n"
            " LEFT JOIN instances i ON i.owner = n.name GROUP BY n.name ORDER BY n.name")
        return [_node(tuple(row)[:5], float(row[5]), gone_after) for row in rows]

    async def forget(self, name: str) -> None:
        async with self._db.transaction():
            await self._db.execute("DELETE FROM nodes WHERE name = $1", name)
        self._started.discard(name)


class PgSignals:
    """LISTEN on a dedicated connection that comes back by itself after the server restarts.

    The connection is checked every ``check_interval`` seconds (a server that vanished without
    closing it is noticed too); while it is down, reconnects back off from 0.2 s to ``retry_max``.
    After a reconnect subscribers get :data:`RECONNECTED`: signals sent meanwhile were missed.
    """

    def __init__(self, db: PgDatabase, *, check_interval: float = 2.0, retry_max: float = 5.0) -> None:
        self._db = db
        self._check_interval = check_interval
        self._retry_max = retry_max
        self._callbacks: list[SignalCallback] = []
        self._conn: Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def notify(self, topic: str, payload: str) -> None:
        await self._db.execute("SELECT pg_notify($1, $2)", CHANNEL, _check_payload(topic, payload))

    def subscribe(self, callback: SignalCallback) -> None:
        self._callbacks.append(callback)

    async def start(self) -> None:
        if self._task is not None:
            return
        await self._listen()
        self._task = asyncio.get_running_loop().create_task(self._keep_listening(), name="pg-signals")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)
            self._conn = None

    async def _listen(self) -> None:
        conn = await self._db.connect_dedicated()
        try:
            conn.add_termination_listener(lambda _conn: self._lost.set())
            await conn.add_listener(CHANNEL, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        self._lost.clear()
        self._conn = conn

    def _on_notification(self, _conn: object, _pid: int, _channel: str, message: str) -> None:
        try:
            topic, payload = json.loads(message)
        except (ValueError, TypeError):
            log.warning("ignored a malformed signal on channel %s", CHANNEL)
            return
        _deliver(list(self._callbacks), str(topic), str(payload))

    async def _keep_listening(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._check_interval)
            if await self._alive():
                continue
            log.warning("signals: the listening connection to PostgreSQL was lost; reconnecting")
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            delay = 0.2
            while True:
                try:
                    await self._listen()
                    break
                except Exception as exc:
                    if not is_transient(exc):
                        log.error("signals: cannot listen: %s", type(exc).__name__)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._retry_max)
            self.reconnects += 1
            log.info("signals: listening again")
            _deliver(list(self._callbacks), RECONNECTED, "")

    async def _alive(self) -> bool:
        conn = self._conn
        if conn is None or conn.is_closed() or self._lost.is_set():
            return False
        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), self._check_interval * 2)
        except Exception:
            return False
        return True


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big", signed=True)


class PgSingleton:
    """Session advisory locks on one dedicated connection: the lock lives as long as it does.

    A lost connection means every singleton was lost (another node may hold them already): it is
    logged as a warning, told to ``on_lost`` per name, and the next ``try_hold`` reconnects and tries
    again.
    """

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._conn: Connection | None = None
        self._held: set[str] = set()
        self._lock = asyncio.Lock()
        self.on_lost: Callable[[str], None] | None = None

    async def try_hold(self, name: str) -> bool:
        async with self._lock:  # one connection: one statement at a time
            if name in self._held:
                if await self._alive():
                    return True
                self._lose()
            try:
                if self._conn is None or self._conn.is_closed():
                    self._lose()
                    self._conn = await self._db.connect_dedicated()
                held = bool(await self._conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", SINGLETON_CLASS,
                                                      _lock_key(name)))
            except Exception as exc:  # no database, no singleton: whatever the reason, try again later
                log.log(logging.DEBUG if is_transient(exc) else logging.WARNING,
                        "singleton %s: cannot reach PostgreSQL (%s)", name, type(exc).__name__)
                self._lose()
                return False
            if held:
                self._held.add(name)
            return held

    async def release(self, name: str) -> None:
        async with self._lock:
            if name in self._held and self._conn is not None:
                self._held.discard(name)
                with contextlib.suppress(Exception):
                    await self._conn.fetchval("SELECT pg_advisory_unlock($1, $2)", SINGLETON_CLASS, _lock_key(name))

    async def close(self) -> None:
        self._held.clear()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)
            self._conn = None

    async def _alive(self) -> bool:
        if self._conn is None or self._conn.is_closed():
            return False
        try:
            await asyncio.wait_for(self._conn.fetchval("SELECT 1"), 5)
        except Exception:
            return False
        return True

    def _lose(self) -> None:
        for name in sorted(self._held):
            log.warning("singleton %s lost: its PostgreSQL connection is gone", name)
            if self.on_lost is not None:
                self.on_lost(name)
        self._held.clear()
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None
