"""Cluster stores: leases with an epoch, nodes, cross-node signals and singletons (interfaces)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Lease:
    selector: str
    epoch: int  # bumped by every claim; fencing derives CSeq from it


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    state: str  # "up" | "draining" | "gone"(derived: last_seen older than lease_ttl)
    last_seen: float  # wall clock (database time on PostgreSQL)
    instances: int  # leases held
    started_at: float


class LeaseStore(Protocol):
    async def claim(self, node: str, limit: int, ttl: float, *, exclude_draining: bool = True) -> list[Lease]:
        """Take up to ``limit`` instances with no owner or an expired lease (db time), set owner=node,
        lease_until=now+ttl, epoch=epoch+1. Disabled/off instances are claimed too (ownership is
        about who acts; the lifecycle decides what to do)."""
        ...

    async def renew(self, node: str, ttl: float) -> list[Lease]:
        """Extend every lease ``node`` still holds (owner=node); return exactly those (a lease another
        node took is absent, so the caller stops acting for it)."""
        ...

    async def release(self, node: str, selectors: Sequence[str]) -> int:
        """Give these up (owner NULL, lease_until in the past) if ``node`` still owns them; count."""
        ...

    async def owners(self, selectors: Sequence[str] | None = None) -> dict[str, str | None]: ...

    async def counts(self) -> dict[str | None, int]:  # owner -> instances (None = unowned)
        ...

    async def bump(self, node: str, selectors: Sequence[str], ttl: float) -> list[Lease]:
        """epoch+1 (and lease_until=now+ttl) for those of ``selectors`` that ``node`` still owns;
        return them. A node's CSeq space within an epoch is used up, or the node restarted while it
        still held leases (it cannot know the CSeqs its previous life used)."""
        ...


class NodeStore(Protocol):
    async def heartbeat(self, name: str, state: str) -> None:  # upsert, last_seen = db now
        ...

    async def nodes(self) -> list[NodeRecord]:  # all known, with instance counts
        ...

    async def forget(self, name: str) -> None: ...


class Signals(Protocol):
    """Cross-node nudges: PostgreSQL LISTEN/NOTIFY on channel 'sipis'; SQLite: delivered in-process."""

    async def notify(self, topic: str, payload: str) -> None:  # payload ≤ 7000 bytes
        ...

    def subscribe(self, callback: Callable[[str, str], None]) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Singleton(Protocol):
    async def try_hold(self, name: str) -> bool:  # pg_try_advisory_lock on a dedicated connection; SQLite: True
        ...
