"""Nodes sharing one (fake) database: who registers what, lost leases, lost storage, changes made
on another node. The lease keeper, the lifecycle owner, the engine and the service are real; the
registrar records the REGISTERs it would send; storage and signals are tests/cluster_fakes."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from sipis.api.models import PushIn
from sipis.clock import FakeClock
from sipis.cluster import InstanceSync, LeaseKeeper
from sipis.config import parse_config
from sipis.core import Core
from sipis.engine import RegistrationEngine
from sipis.events import EventBus
from sipis.instance import Account, AppState, Instance, PushTarget
from sipis.lifecycle import InstanceLifecycle
from sipis.service import InstanceService
from sipis.sip.register import Outcome, RegisterResult
from tests.cluster_fakes import FakeCluster, FakeLeases, FakeNodes, FakeSignals, Row

TTL = 15.0


class Registrar:
    """Grants every REGISTER it is allowed to send; records (selector, expires, epoch)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, int]] = []
        self.owns: Callable[[str], bool] | None = None
        self.new_epoch = None

    async def __call__(self, instance: Instance, expires: int) -> RegisterResult:
        if self.owns is not None and not self.owns(instance.selector):
            return RegisterResult(Outcome.FENCED, 0, "Lease gone", transactions=0)
        self.sent.append((instance.selector, expires, instance.epoch))
        return RegisterResult(Outcome.REGISTERED, 200, "OK", expires=expires)

    def forget(self, selector: str) -> None:
        pass

    def prepare(self, instance: Instance) -> None:
        pass

    def registers(self, selector: str) -> int:
        return sum(1 for s, expires, _ in self.sent if s == selector and expires)

    def removals(self) -> int:
        return sum(1 for _, expires, _ in self.sent if not expires)


class Rows:
    """The instances table: what each node's service stores and each node's sync loads."""

    def __init__(self) -> None:
        self.rows: dict[str, Instance] = {}

    def storage(self) -> Storage:
        return Storage(self)

    async def load(self, selector: str) -> Instance | None:
        row = self.rows.get(selector)
        return copy.deepcopy(row) if row is not None else None


class Storage:
    def __init__(self, rows: Rows) -> None:
        self.table = rows

    async def store(self, instance: Instance) -> None:
        self.table.rows[instance.selector] = copy.deepcopy(instance)

    async def store_deletion(self, selector: str) -> None:
        self.table.rows.pop(selector, None)

    def undo_deletion(self, selector: str) -> None:
        pass


class Node:
    def __init__(self, name: str, cluster: FakeCluster, rows: Rows, clock: FakeClock) -> None:
        self.clock = clock
        self.bus = EventBus(clock)
        self.registrar = Registrar()
        self.engine = RegistrationEngine(self.registrar, self.bus, clock, rng=random.Random(1))
        self.life = InstanceLifecycle(engine=self.engine, registrar=self.registrar,  # type: ignore[arg-type]
                                      bus=self.bus, clock=clock)
        self.keeper = LeaseKeeper(node=name, leases=FakeLeases(cluster), nodes=FakeNodes(cluster),
                                  clock=clock, ttl=TTL, register_rate=1000.0)
        self.life.use_ownership(self.keeper)
        self.keeper.listener = self.life
        self.sync = InstanceSync(node=name, signals=FakeSignals(cluster), load=rows.load, adopter=self.life)
        self.sync.start()
        self.life.load_missing = self.sync.reload_soon
        self.service = InstanceService(lifecycle=self.life, registrar=self.registrar,  # type: ignore[arg-type]
                                       bus=self.bus, clock=clock, enroll_tokens=(), storage=rows.storage(),
                                       signal=self.sync)

    async def settle(self) -> None:
        await self.sync.wait()
        self.engine.tick()
        await self.engine.drain()


def make_instance(selector: str, state: AppState) -> Instance:
    return Instance(selector, Account(f"sip:{selector}@pbx", selector, "pw"), PushTarget("m", "app", "tok"), "hash",
                    instance_id=f"00000000-0000-0000-0000-{int(selector[1:]):012d}", state=state)


class Cluster:
    def __init__(self, instances: list[Instance]) -> None:
        self.clock = FakeClock()
        self.db = FakeCluster(self.clock, [i.selector for i in instances])
        self.rows = Rows()
        self.rows.rows = {i.selector: copy.deepcopy(i) for i in instances}
        self.nodes: dict[str, Node] = {}

    async def start(self, name: str) -> Node:
        node = self.nodes[name] = Node(name, self.db, self.rows, self.clock)
        for row in self.rows.rows.values():  # every node holds every instance, as restored
            node.life.resume(copy.deepcopy(row))
        await node.keeper.round()
        await node.settle()
        return node

    async def advance(self, seconds: float) -> None:
        """Time passes: every node's keeper and engine run."""
        step = TTL / 3
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step
            for node in self.nodes.values():
                await node.keeper.round()
                await node.settle()


SLEEPING = [make_instance(f"s{i}", AppState.PROXIED) for i in range(4)]


async def test_one_node_registers_every_sleeping_instance_in_the_epoch_of_its_lease() -> None:
    cluster = Cluster([*SLEEPING, make_instance("s9", AppState.ACTIVE)])
    a = await cluster.start("a")
    assert sorted(a.registrar.sent) == [(f"s{i}", 600, 1) for i in range(4)]  # the app of s9 registers itself
    assert a.keeper.held() == 5


async def test_a_lost_lease_stops_refreshes_at_once_without_unregister() -> None:
    cluster = Cluster(SLEEPING)
    a = await cluster.start("a")
    b = await cluster.start("b")
    assert b.keeper.held() == 0  # a holds all of them, valid leases
    await cluster.advance(TTL)  # a hands its excess over, b registers it in a new epoch
    assert (a.keeper.held(), b.keeper.held()) == (2, 2)
    moved = [s for s in ("s0", "s1", "s2", "s3") if b.keeper.owns(s)]
    assert sorted(moved) == sorted(s for s, _, epoch in b.registrar.sent if epoch == 2)
    assert a.registrar.removals() == 0  # make-before-break: the new owner's REGISTER replaced ours
    a.registrar.sent.clear()
    await cluster.advance(1200)
    assert all(a.registrar.registers(s) == 0 for s in moved)
    assert all(b.registrar.registers(s) > 0 for s in moved)


async def test_without_storage_a_node_refreshes_until_its_leases_end_then_stops() -> None:
    cluster = Cluster(SLEEPING)
    a = await cluster.start("a")
    cluster.db.unreachable = True
    a.registrar.sent.clear()
    a.engine.refresh_now(a.life.instances["s0"])
    await cluster.advance(TTL / 3)
    assert a.registrar.registers("s0") == 1  # still ours: refreshes go on
    assert a.life.may_act(a.life.instances["s0"])
    await cluster.advance(TTL)
    assert not a.life.may_act(a.life.instances["s0"])
    a.registrar.sent.clear()
    await cluster.advance(1200)
    assert a.registrar.sent == []  # stopped: no refresh, no unREGISTER


async def test_a_node_that_restarts_holding_leases_counts_in_a_new_epoch() -> None:
    cluster = Cluster(SLEEPING[:1])
    await cluster.start("a")
    again = await cluster.start("a")  # killed and started again within the lease
    assert again.registrar.sent == [("s0", 600, 2)]


async def test_a_refused_send_forfeits_the_lease() -> None:
    cluster = Cluster(SLEEPING[:1])
    a = await cluster.start("a")
    a.registrar.owns = lambda selector: False  # as when the lease ends between the check and the send
    a.engine.refresh_now(a.life.instances["s0"])
    await a.settle()
    assert not a.keeper.owns("s0")
    assert a.engine.entries() == 0
    a.registrar.owns = a.keeper.owns
    await cluster.advance(TTL / 3)  # released, claimed again: registered in a new epoch
    assert a.keeper.owns("s0")
    assert cluster.db.rows["s0"].epoch == 2
    assert a.registrar.sent[-1] == ("s0", 600, 2)


# --------------------------------------------------------------------------- changes on another node


@pytest.fixture
async def pair() -> tuple[Cluster, Node, Node]:
    cluster = Cluster([make_instance("s0", AppState.ACTIVE)])
    a = await cluster.start("a")  # owns s0
    b = await cluster.start("b")
    return cluster, a, b


async def test_an_app_report_to_another_node_is_carried_out_by_the_owner(pair: tuple[Cluster, Node, Node]) -> None:
    cluster, a, b = pair
    await b.service.set_state("s0", "inactive", None)
    assert cluster.rows.rows["s0"].state is AppState.INACTIVE  # stored first
    await a.settle()
    assert a.registrar.sent == [("s0", 600, 1)]  # the owner took over
    assert b.registrar.sent == []
    assert a.life.instances["s0"].state is AppState.PROXIED
    assert b.life.instances["s0"].state is AppState.INACTIVE  # b's copy shows what it stored

    await b.service.set_state("s0", "active", "sip:s0@10.0.0.1")
    await a.settle()
    assert a.life.instances["s0"].state is AppState.ACTIVE
    assert a.registrar.removals() == 1  # hand-back: the owner removed its binding
    assert b.registrar.sent == []


async def test_the_owners_change_reaches_the_other_nodes_copies(pair: tuple[Cluster, Node, Node]) -> None:
    cluster, a, b = pair
    await a.service.update_push("s0", PushIn(provider="m", app_id="app", token="new-token"))
    await b.settle()
    assert b.life.instances["s0"].push.token == "new-token"
    assert cluster.db.sent  # one signal


async def test_a_delete_on_another_node_makes_the_owner_remove_the_binding(pair: tuple[Cluster, Node, Node]) -> None:
    _, a, b = pair
    await b.service.set_state("s0", "inactive", None)
    await a.settle()
    await b.service.delete("s0")
    await a.settle()
    assert "s0" not in a.life.instances and "s0" not in b.life.instances
    assert a.registrar.removals() == 1
    assert b.registrar.sent == []


async def test_an_instance_enrolled_elsewhere_is_loaded_by_whoever_wins_its_lease() -> None:
    cluster = Cluster([])
    a = await cluster.start("a")
    new = make_instance("s7", AppState.INACTIVE)
    cluster.rows.rows["s7"] = new  # stored by a node that went away before signalling
    cluster.db.rows["s7"] = Row()
    await cluster.advance(TTL / 3)
    assert a.keeper.owns("s7")
    assert a.registrar.sent == [("s7", 600, 1)]


async def test_fenced_exchanges_are_warned_about_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster(SLEEPING)
    a = await cluster.start("a")
    a.registrar.owns = lambda selector: False
    for selector in ("s0", "s1", "s2"):
        a.engine.refresh_now(a.life.instances[selector])
    await a.settle()
    warnings = [r.getMessage() for r in caplog.records if r.name == "sipis.engine"]
    assert len(warnings) == 1 and "lease is gone" in warnings[0]
    assert a.engine.entries() == 1  # s3 only: the others were given up


async def test_sigterm_hands_everything_over_before_the_core_stops() -> None:
    cluster = FakeCluster(FakeClock(), [f"s{i}" for i in range(30)])
    keepers = [LeaseKeeper(node=name, leases=FakeLeases(cluster), nodes=FakeNodes(cluster), clock=cluster.clock,
                           ttl=0.3, register_rate=50.0) for name in ("a", "b")]  # 5 a round, every 0.1 s
    for keeper in keepers:
        await keeper.start()
    a, b = keepers
    await a.round()  # a knows b is up
    core = Core(parse_config({"api": {"listen": ""}, "cluster": {"drain_timeout": 30}}, Path(".")))
    core.keeper = a
    try:
        await core.hand_over()
        assert (a.held(), b.held()) == (0, 30)
    finally:
        for keeper in keepers:
            await keeper.stop()


async def test_a_node_alone_does_not_drain_on_sigterm() -> None:
    cluster = FakeCluster(FakeClock(), ["s0"])
    keeper = LeaseKeeper(node="a", leases=FakeLeases(cluster), nodes=FakeNodes(cluster), clock=cluster.clock,
                         ttl=TTL, register_rate=50.0)
    await keeper.round()
    core = Core(parse_config({"api": {"listen": ""}}, Path(".")))
    core.keeper = keeper
    await core.hand_over()
    assert keeper.state == "up" and keeper.held() == 1
