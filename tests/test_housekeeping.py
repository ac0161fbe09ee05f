"""Housekeeping (sipis/housekeeping.py): every node prunes its own events; only the singleton's
holder forgets nodes long gone, and the job moves when the holder dies."""

from __future__ import annotations

from collections.abc import Sequence

from contract.events import Event
from sipis.clock import FakeClock
from sipis.housekeeping import EVENTS_KEPT, FORGET_AFTER, Housekeeping
from tests.cluster_fakes import FakeCluster, FakeNodes

TTL = 15.0


class Events:
    def __init__(self) -> None:
        self.prunes: list[int] = []

    async def append(self, event: Event) -> None: ...

    async def append_many(self, events: Sequence[Event]) -> None: ...

    async def recent(self, limit: int, selector: str | None = None, since_seq: int | None = None) -> list[Event]:
        return []

    async def last_seq(self) -> int:
        return 0

    async def prune(self, keep: int) -> int:
        self.prunes.append(keep)
        return 0


class Lock:
    """One advisory lock shared by the nodes: held by the first to ask until it "dies"."""

    holder: str | None = None

    def __init__(self, node: str) -> None:
        self.node = node

    async def try_hold(self, name: str) -> bool:
        if Lock.holder is None:
            Lock.holder = self.node
        return Lock.holder == self.node


def house(cluster: FakeCluster, node: str, events: Events) -> Housekeeping:
    return Housekeeping(events=events, nodes=FakeNodes(cluster), singleton=Lock(node), clock=cluster.clock,
                        lease_ttl=TTL)


async def test_only_the_holder_forgets_long_gone_nodes_and_the_job_moves_when_it_dies() -> None:
    Lock.holder = None
    cluster = FakeCluster(FakeClock(), ["s1"])
    for name in ("a", "b", "dead"):
        await FakeNodes(cluster).heartbeat(name, "up")
    a_events, b_events = Events(), Events()
    a, b = house(cluster, "a", a_events), house(cluster, "b", b_events)
    cluster.clock.advance(FORGET_AFTER + 1)
    for name in ("a", "b"):  # a and b are alive; "dead" has been silent for a day
        await FakeNodes(cluster).heartbeat(name, "up")
    await b.run_once()  # b takes the job first
    assert set(cluster.node_rows) == {"a", "b"}
    await FakeNodes(cluster).heartbeat("late", "up")
    cluster.clock.advance(FORGET_AFTER + 1)
    await FakeNodes(cluster).heartbeat("a", "up")
    await a.run_once()  # not the holder: forgets nothing
    assert "late" in cluster.node_rows and "b" in cluster.node_rows
    Lock.holder = None  # b died: its lock went with its connection
    await a.run_once()
    assert set(cluster.node_rows) == {"a"}
    assert a_events.prunes == [EVENTS_KEPT, EVENTS_KEPT] and b_events.prunes == [EVENTS_KEPT]


async def test_a_node_holding_instances_is_never_forgotten() -> None:
    Lock.holder = None
    cluster = FakeCluster(FakeClock(), ["s1"])
    await FakeNodes(cluster).heartbeat("owner", "up")
    cluster.rows["s1"].owner = "owner"
    cluster.clock.advance(FORGET_AFTER + 1)
    await house(cluster, "a", Events()).run_once()
    assert "owner" in cluster.node_rows
