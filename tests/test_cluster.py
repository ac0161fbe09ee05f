"""The lease keeper: claim, renew, expiry without storage, fair share, pacing, drain (fake store, fake clock)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sipis.clock import FakeClock
from sipis.cluster import DRAINING, LeaseKeeper
from storage.cluster import Lease
from tests.cluster_fakes import FakeCluster, FakeLeases, FakeNodes, Row

TTL = 15.0


class Listener:
    def __init__(self) -> None:
        self.epochs: dict[str, int] = {}
        self.lost_ones: list[str] = []

    def acquired(self, leases: Sequence[Lease], *, reload: bool) -> None:
        self.epochs.update((lease.selector, lease.epoch) for lease in leases)

    def lost(self, selectors: Sequence[str]) -> None:
        self.lost_ones.extend(selectors)
        for selector in selectors:
            self.epochs.pop(selector, None)


def keeper(cluster: FakeCluster, node: str, rate: float = 10.0) -> tuple[LeaseKeeper, Listener, FakeLeases]:
    leases = FakeLeases(cluster)
    k = LeaseKeeper(node=node, leases=leases, nodes=FakeNodes(cluster), clock=cluster.clock, ttl=TTL,
                    register_rate=rate)
    listener = Listener()
    k.listener = listener
    return k, listener, leases


def selectors(n: int) -> list[str]:
    return [f"s{i:04d}" for i in range(n)]


async def test_a_node_alone_claims_everything_at_once_with_epoch_1() -> None:
    cluster = FakeCluster(FakeClock(), selectors(300))
    a, listener, leases = keeper(cluster, "a")
    await a.round()
    assert a.held() == 300
    assert all(a.owns(s) for s in selectors(300))
    assert set(listener.epochs.values()) == {1}
    assert leases.claims == [300]  # alone: no pacing of claims (the engine paces REGISTERs)


async def test_a_restart_holding_leases_counts_in_a_new_epoch() -> None:
    cluster = FakeCluster(FakeClock(), selectors(3))
    first, _, _ = keeper(cluster, "a")
    await first.round()
    again, listener, _ = keeper(cluster, "a")  # the same node, started again before its leases ended
    await again.round()
    assert listener.epochs == {s: 2 for s in selectors(3)}
    assert again.owns("s0000")


async def test_renewal_drops_a_lease_another_node_took() -> None:
    cluster = FakeCluster(FakeClock(), selectors(2))
    a, listener, _ = keeper(cluster, "a")
    await a.round()
    cluster.rows["s0001"].owner = "b"
    await a.round()
    assert listener.lost_ones == ["s0001"]
    assert not a.owns("s0001")
    assert a.owns("s0000")


async def test_without_storage_a_node_acts_until_its_own_deadline_then_stops() -> None:
    clock = FakeClock()
    cluster = FakeCluster(clock, selectors(2))
    a, listener, _ = keeper(cluster, "a")
    await a.round()  # renewed at t0: the leases end at t0 + TTL on this node's clock
    cluster.unreachable = True
    clock.advance(TTL / 3)
    await a.round()
    clock.advance(TTL / 3)
    await a.round()
    assert a.owns("s0000") and listener.lost_ones == []
    clock.advance(TTL / 3 - 0.01)
    assert a.owns("s0000")
    clock.advance(0.01)
    assert not a.owns("s0000")  # may_act says no from this moment, whatever the keeper's timer does
    await a.round()
    assert sorted(listener.lost_ones) == selectors(2)
    assert a.held() == 0

    # back, and nobody took them meanwhile: ours again in the same epoch (the bindings' CSeqs went
    # on counting in this node's memory, and no other node counted in a higher epoch)
    cluster.unreachable = False
    await a.round()
    assert listener.epochs == {s: 1 for s in selectors(2)}
    assert a.owns("s0000")


async def test_leases_renewed_after_the_deadline_passed_are_taken_over_again() -> None:
    # storage slow, not gone: no round declared the leases ended, but between the deadline and the
    # next good round may_act said no and the engine dropped what it was about to register
    clock = FakeClock()
    cluster = FakeCluster(clock, selectors(2))
    a, listener, _ = keeper(cluster, "a")
    await a.round()
    cluster.unreachable = True
    clock.advance(TTL / 3)
    await a.round()
    clock.advance(TTL / 3)
    await a.round()
    cluster.unreachable = False
    clock.advance(TTL / 3)
    assert not a.owns("s0000")
    listener.epochs.clear()
    await a.round()
    assert listener.epochs == {s: 1 for s in selectors(2)}
    assert listener.lost_ones == []
    assert a.owns("s0000")

    listener.epochs.clear()
    clock.advance(TTL / 3)
    await a.round()  # renewed in time: nothing to take over again
    assert listener.epochs == {}


async def test_a_joining_node_takes_its_fair_share_gradually() -> None:
    cluster = FakeCluster(FakeClock(), selectors(300))
    a, a_listener, _ = keeper(cluster, "a", rate=10.0)  # 50 per round (ttl/3 = 5 s at 10/s)
    b, b_listener, b_leases = keeper(cluster, "b", rate=10.0)
    await a.round()
    assert a.held() == 300
    rounds = 0
    while b.held() < 150:
        await b.round()
        await a.round()
        rounds += 1
        assert a.held() + b.held() <= 300  # never two owners
        assert not set(a_listener.epochs) & set(b_listener.epochs)
    assert (a.held(), b.held()) == (150, 150)
    assert rounds == 4  # 150 handed over, 50 a round (the first round finds nothing free yet)
    assert max(b_leases.claims) <= 50
    assert set(b_listener.epochs.values()) == {2}  # every handed-over lease counts in a new epoch


async def test_three_nodes_spread_evenly() -> None:
    cluster = FakeCluster(FakeClock(), selectors(300))
    nodes = [keeper(cluster, name, rate=100.0)[0] for name in "abc"]
    for _ in range(5):
        for node in nodes:
            await node.round()
    assert [n.held() for n in nodes] == [100, 100, 100]


async def test_the_survivors_of_a_silent_node_share_its_instances_once_its_leases_end() -> None:
    cluster = FakeCluster(FakeClock(), selectors(300))
    a, b, c = (keeper(cluster, name, rate=100.0)[0] for name in "abc")
    for _ in range(5):
        for node in (a, b, c):
            await node.round()
    cluster.clock.advance(TTL + 1)  # c was killed: no heartbeat, no renewal since
    for _ in range(3):
        for node in (a, b):
            await node.round()
    assert [a.held(), b.held()] == [150, 150]
    assert [row.state for row in await FakeNodes(cluster).nodes(gone_after=TTL)] == ["up", "up", "gone"]
async def test_a_killed_nodes_instances_go_to_the_others_once_its_leases_end() -> None:
    clock = FakeClock()
    cluster = FakeCluster(clock, selectors(300))
    (a, a_listener, _), (b, b_listener, _), (c, _, _) = (keeper(cluster, name, rate=100.0) for name in "abc")
    for _ in range(5):
        for node in (a, b, c):
            await node.round()
    assert [n.held() for n in (a, b, c)] == [100, 100, 100]
    # c is killed: no more rounds; a and b go on every ttl/3
    for _ in range(6):
        clock.advance(TTL / 3)
        await a.round()
        await b.round()
    assert (a.held(), b.held()) == (150, 150)
    assert not set(a_listener.epochs) & set(b_listener.epochs)
    assert a.live_nodes == 2


async def test_a_draining_node_hands_everything_over_in_paced_batches(caplog: pytest.LogCaptureFixture) -> None:
    cluster = FakeCluster(FakeClock(), selectors(120))
    a, _, _ = keeper(cluster, "a", rate=10.0)
    b, _, _ = keeper(cluster, "b", rate=10.0)
    await a.round()
    await b.round()
    a.drain()
    assert a.state == DRAINING
    caplog.set_level("INFO", "sipis.cluster")
    held = [a.held()]
    while a.held():
        await a.round()
        await b.round()
        held.append(a.held())
    assert held == [120, 70, 20, 0]
    assert b.held() == 120
    assert cluster.node_rows["a"].state == DRAINING
    assert "drain: 120/120 handed over" in caplog.text


async def test_a_forfeited_lease_goes_back_and_a_used_up_epoch_is_replaced() -> None:
    cluster = FakeCluster(FakeClock(), selectors(2))
    a, _, _ = keeper(cluster, "a")
    await a.round()
    a.forfeit("s0000")
    assert not a.owns("s0000")
    assert await a.new_epoch("s0001") == 2
    cluster.rows["s0001"].owner = "b"
    assert await a.new_epoch("s0001") is None
    assert not a.owns("s0001")
    await a.round()  # s0000 released, then claimed again in a new epoch
    assert a.owns("s0000")
    assert cluster.rows["s0000"].epoch == 2


async def test_a_node_owns_what_it_just_enrolled_whatever_the_shares() -> None:
    cluster = FakeCluster(FakeClock(), selectors(4))
    a, _, _ = keeper(cluster, "a")
    b, listener, _ = keeper(cluster, "b")
    await a.round()
    await b.round()
    full = b.held()
    cluster.rows["new"] = Row()  # stored by b's enrolment a moment ago
    await b.claim_new("new")
    assert b.owns("new") and listener.epochs["new"] == 1 and b.held() == full + 1
    await a.claim_new("new")  # nobody takes it from its owner this way
    assert not a.owns("new")
