"""Junk on the cluster's signal channel (anyone who can NOTIFY on the database's channel, or a
newer node): every reader drops it with one WARNING, nothing raises, nothing acts."""

from __future__ import annotations

import json
import logging

import pytest

from sipis.clock import FakeClock
from sipis.cluster import DRAINING, INSTANCE_TOPIC, NODE_TOPIC, InstanceSync, LeaseKeeper, read_signal
from tests.cluster_fakes import FakeCluster, FakeLeases, FakeNodes, FakeSignals

JUNK = ["", "not json", "[]", "42", json.dumps({"node": "a"}), json.dumps({"unrelated": 1}), "{" * 5000,
        json.dumps({"node": 7, "action": "drain", "selector": "s1"}),
        json.dumps({"node": None, "action": ["drain"], "selector": {}})]


@pytest.mark.parametrize("payload", JUNK)
def test_read_signal_refuses_junk_with_one_warning(payload: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        fields = read_signal("topic", payload, "node", "action", "selector")
    assert fields is None
    assert len(caplog.records) == 1


async def test_junk_signals_drain_nothing_and_reload_nothing() -> None:
    cluster = FakeCluster(FakeClock(), ["s1"])
    keeper = LeaseKeeper(node="a", leases=FakeLeases(cluster), nodes=FakeNodes(cluster), clock=cluster.clock,
                         ttl=15.0, register_rate=10.0)
    reloads: list[str] = []

    async def load(selector: str) -> None:
        reloads.append(selector)

    sync = InstanceSync(node="a", signals=FakeSignals(cluster), load=load, adopter=None)  # type: ignore[arg-type]
    for payload in JUNK:
        keeper.on_signal(NODE_TOPIC, payload)
        sync._on_signal(INSTANCE_TOPIC, payload)
    await sync.wait()
    assert keeper.state != DRAINING and reloads == []
