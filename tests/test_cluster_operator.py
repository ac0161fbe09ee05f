"""The cluster in the operator API: nodes, owners, drain, and actions carried out by the owner."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from contract.codec import payload_data
from sipis.cluster import ClusterView, LeaseKeeper
from sipis.instance import AppState
from tests.cluster_fakes import FakeCluster, FakeLeases, FakeNodes, FakeSignals
from tests.test_operator_api import Op, make_op

TTL = 15.0
ADMIN = "tok-admin-0123456789"  # ada


@pytest.fixture
async def op() -> AsyncIterator[Op]:
    made = make_op()
    yield made
    made.ctx.close()
    await made.world.engine.stop(unregister=False)


def audit(op: Op) -> list[dict[str, Any]]:
    return [payload_data(e.payload) for e in op.world.events_of("audit")]


async def test_one_node_lists_itself_and_has_no_drain(op: Op) -> None:
    await op.enrol("alice")
    async with op.http(ADMIN) as http:
        nodes = (await http.get("/v1/nodes")).json()
        assert nodes == {"nodes": [{"name": "test-node", "state": "up", "instances": 1, "lease_lag": 0.0,
                                    "started_at": op.ctx.started_at}]}
        assert (await http.get("/v1/summary")).json()["nodes_up"] == 1
        assert (await http.get("/v1/instances")).json()["items"][0]["owner"] is None
        assert (await http.post("/v1/nodes/test-node/drain")).status_code == 404


class Node:
    def __init__(self, name: str, cluster: FakeCluster) -> None:
        self.keeper = LeaseKeeper(node=name, leases=FakeLeases(cluster), nodes=FakeNodes(cluster),
                                  clock=cluster.clock, ttl=TTL, register_rate=1000.0)
        signals = FakeSignals(cluster)
        self.keeper.signals = signals
        self.view = ClusterView(keeper=self.keeper, signals=signals, clock=cluster.clock)
        self.op = make_op(cluster=self.view)
        self.op.world.operations.cluster = self.view
        self.view.run_action = self.op.world.operations.carry_out
        self.op.world.service.lifecycle.use_ownership(self.keeper)
        self.keeper.listener = self.op.world.service.lifecycle
        signals.subscribe(self.keeper.on_signal)
        signals.subscribe(self.view.on_signal)


@pytest.fixture
async def two() -> AsyncIterator[tuple[FakeCluster, Node, Node]]:
    made: list[Node] = []
    first = make_op()  # enrols the instance both nodes hold
    instance = await first_enrolment(first)
    first.ctx.close()
    await first.world.engine.stop(unregister=False)
    cluster = FakeCluster(first.world.clock, [instance.selector])
    for name in ("a", "b"):
        node = Node(name, cluster)
        node.op.world.service.lifecycle.add(copy.deepcopy(instance))
        made.append(node)
    await made[0].keeper.round()  # a owns it
    await made[1].keeper.round()
    yield cluster, made[0], made[1]
    for node in made:
        node.op.ctx.close()
        await node.op.world.engine.stop(unregister=False)


async def first_enrolment(op: Op) -> Any:
    instance = await op.enrol("alice", sleeping=True)
    return instance


async def test_an_action_on_an_instance_owned_elsewhere_is_carried_out_by_its_owner(
        two: tuple[FakeCluster, Node, Node]) -> None:
    _, a, b = two
    selector = next(iter(a.op.world.service.instances))
    b.op.world.registrar.calls.clear()
    async with b.op.http(ADMIN) as http:
        answer = await http.post(f"/v1/instances/{selector}/actions/hand-back")
        assert answer.status_code == 200
        rows = (await http.get("/v1/instances")).json()["items"]
        assert [row["owner"] for row in rows] == ["a"]
    await asyncio.sleep(0)
    await a.op.world.settle()
    assert a.op.world.service.instances[selector].state is AppState.ACTIVE  # the owner handed back
    assert b.op.world.registrar.calls == []  # b sent nothing
    mine = [(e["operator"], e["action"], e["outcome"]) for e in audit(b.op)]
    theirs = [(e["operator"], e["action"], e["outcome"]) for e in audit(a.op)]
    assert mine == [("ada", "hand_back", "forwarded")]
    assert theirs == [("ada", "hand_back", "ok")]


async def test_nodes_drain_and_summary(two: tuple[FakeCluster, Node, Node]) -> None:
    cluster, a, b = two
    async with b.op.http(ADMIN) as http:
        nodes = (await http.get("/v1/nodes")).json()["nodes"]
        assert [(n["name"], n["state"], n["instances"]) for n in nodes] == [("a", "up", 1), ("b", "up", 0)]
        assert (await http.get("/v1/summary")).json()["nodes_up"] == 2
        assert (await http.post("/v1/nodes/a/drain")).status_code == 200  # asked through b
        assert (await http.post("/v1/nodes/zed/drain")).status_code == 404
    assert a.keeper.state == "draining"
    await a.keeper.round()
    assert await a.keeper.drained(0.0)
    await b.keeper.round()
    assert b.keeper.held() == 1
    assert cluster.node_rows["a"].state == "draining"
    assert [(e["action"], e["target"], e["outcome"]) for e in audit(b.op)][-2:] == [
        ("drain", "a", "ok"), ("drain", "zed", "not-found")]

