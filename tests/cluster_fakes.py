"""In-memory stand-ins for storage.cluster's stores (unit tests of the runtime side).

One :class:`FakeCluster` is the database every fake node shares: instance leases (owner,
lease_until, epoch), node rows and the signal channel. Database time is the fake clock's wall
time; ``unreachable`` makes every call fail as a lost connection would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sipis.clock import FakeClock
from storage.cluster import Lease, NodeRecord


class Unreachable(ConnectionError):
    pass


@dataclass
class Row:
    owner: str | None = None
    lease_until: float = 0.0
    epoch: int = 0


class FakeCluster:
    def __init__(self, clock: FakeClock, selectors: Sequence[str] = ()) -> None:
        self.clock = clock
        self.rows: dict[str, Row] = {selector: Row() for selector in selectors}
        self.node_rows: dict[str, NodeRecord] = {}
        self.unreachable = False
        self.subscribers: list[Callable[[str, str], None]] = []
        self.sent: list[tuple[str, str]] = []

    def check(self) -> float:
        if self.unreachable:
            raise Unreachable("connection refused")
        return self.clock.wall()

    def owned_by(self, node: str) -> set[str]:
        now = self.clock.wall()
        return {s for s, row in self.rows.items() if row.owner == node and row.lease_until > now}


class FakeLeases:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.claims: list[int] = []  # the limit of every claim

    async def claim(self, node: str, limit: int, ttl: float, *, exclude_draining: bool = True,
                    selectors: Sequence[str] | None = None) -> list[Lease]:
        now = self.cluster.check()
        self.claims.append(limit)
        taken = []
        for selector, row in self.cluster.rows.items():
            if len(taken) >= limit:
                break
            if selectors is not None and selector not in selectors:
                continue
            if row.owner is None or row.lease_until <= now:
                row.owner, row.lease_until, row.epoch = node, now + ttl, row.epoch + 1
                taken.append(Lease(selector, row.epoch))
        return taken

    async def renew(self, node: str, ttl: float) -> list[Lease]:
        now = self.cluster.check()
        kept = []
        for selector, row in self.cluster.rows.items():
            if row.owner == node:
                row.lease_until = now + ttl
                kept.append(Lease(selector, row.epoch))
        return kept

    async def release(self, node: str, selectors: Sequence[str]) -> int:
        self.cluster.check()
        count = 0
        for selector in selectors:
            row = self.cluster.rows.get(selector)
            if row is not None and row.owner == node:
                row.owner, row.lease_until = None, 0.0
                count += 1
        return count

    async def owners(self, selectors: Sequence[str] | None = None) -> dict[str, str | None]:
        self.cluster.check()
        rows = self.cluster.rows
        return {s: rows[s].owner for s in (selectors if selectors is not None else rows) if s in rows}

    async def counts(self) -> dict[str | None, int]:
        self.cluster.check()
        counts: dict[str | None, int] = {}
        for row in self.cluster.rows.values():
            counts[row.owner] = counts.get(row.owner, 0) + 1
        return counts

    async def bump(self, node: str, selectors: Sequence[str], ttl: float) -> list[Lease]:
        now = self.cluster.check()
        bumped = []
        for selector in selectors:
            row = self.cluster.rows.get(selector)
            if row is not None and row.owner == node:
                row.epoch, row.lease_until = row.epoch + 1, now + ttl
                bumped.append(Lease(selector, row.epoch))
        return bumped


class FakeNodes:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    async def heartbeat(self, name: str, state: str) -> None:
        now = self.cluster.check()
        old = self.cluster.node_rows.get(name)
        self.cluster.node_rows[name] = NodeRecord(name, state, now, 0, old.started_at if old else now)

    async def nodes(self, gone_after: float | None = None) -> list[NodeRecord]:
        """As the real stores: "gone" only when asked with ``gone_after``."""
        now = self.cluster.check()
        counts: dict[str | None, int] = {}
        for row in self.cluster.rows.values():
            counts[row.owner] = counts.get(row.owner, 0) + 1

        def state(r: NodeRecord) -> str:
            return "gone" if gone_after is not None and r.last_seen < now - gone_after else r.state
        return [NodeRecord(r.name, state(r), r.last_seen,
                           counts.get(r.name, 0), r.started_at) for r in self.cluster.node_rows.values()]

    async def forget(self, name: str) -> None:
        self.cluster.check()
        self.cluster.node_rows.pop(name, None)


class FakeSignals:
    """Every node's signals on one shared channel, delivered at once (to the sender too)."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    async def notify(self, topic: str, payload: str) -> None:
        self.cluster.check()
        self.cluster.sent.append((topic, payload))
        for callback in list(self.cluster.subscribers):
            callback(topic, payload)

    def subscribe(self, callback: Callable[[str, str], None]) -> None:
        self.cluster.subscribers.append(callback)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
