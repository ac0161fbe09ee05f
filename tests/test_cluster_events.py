"""One event stream and one set of counts for the whole cluster (sipis/operator_api/merged.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from console.client import OperatorClient
from contract.codec import decode_stream_line, encode_event
from contract.documents import AuditEntry
from contract.events import Alarm, CoreStarted, Event, RegistrationResult
from contract.kinds import AlarmKind, AlarmState
from sipis.events import EventBus, EventQueue
from sipis.operator_api import OperatorServer
from sipis.operator_api.merged import EVENTS_TOPIC, EventForwarder, MergedEvents
from storage.cluster import MAX_PAYLOAD, LocalSignals, PgSignals
from storage.postgres import PgDatabase
from tests.test_operator_api import Op, make_op
from tests.waiting import wait_for

ADMIN = "tok-admin-0123456789"


def alarm(target: str = "udp:pbx:5060") -> Alarm:
    return Alarm(AlarmKind.PBX_DOWN, reason="timeout", state=AlarmState.RAISED, target=target, id="e1")


def registration() -> RegistrationResult:
    return RegistrationResult("registered", 200, "OK", 600, "", 0, None, None)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Op, Op]]:
    """Two nodes' operator APIs on one in-process signal channel."""
    signals = LocalSignals()
    made = [make_op(node=name, signals=signals) for name in ("a", "b")]
    yield made[0], made[1]
    for op in made:
        op.ctx.close()
        await op.world.engine.stop(unregister=False)


async def flush(*ops: Op) -> None:
    for op in ops:
        assert op.ctx.forwarder is not None
        await op.ctx.forwarder.flush()
    await asyncio.sleep(0)  # LocalSignals deliver on the next turn


async def test_an_alarm_on_one_node_shows_on_the_other_with_its_node(pair: tuple[Op, Op]) -> None:
    a, b = pair
    stream = EventQueue(b.ctx.events)
    a.world.bus.publish(None, alarm())
    a.world.bus.publish("sel-1", registration())  # stays home
    await flush(a)
    remote = [e for e in b.ctx.ring.events if e.node == "a"]
    assert [(e.kind, e.payload) for e in remote] == [("alarm", alarm())]
    assert stream.queue.get_nowait() == remote[0]
    assert encode_event(remote[0])["node"] == "a"
    # a sees its own alarm once, marked with itself; b's core bus never saw a's alarm
    assert [e.node for e in a.ctx.ring.events if e.kind == "alarm"] == ["a"]
    assert b.world.events_of("alarm") == []
    stream.close()


async def test_remote_events_are_numbered_in_the_receiving_nodes_sequence(pair: tuple[Op, Op]) -> None:
    a, b = pair
    b.world.bus.publish(None, CoreStarted(0, "b"))
    a.world.bus.publish(None, alarm("one"))
    a.world.bus.publish(None, alarm("two"))
    await flush(a)
    b.world.bus.publish(None, CoreStarted(1, "b"))
    events = b.ctx.ring.events
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [(e.node, e.kind) for e in events[-4:]] == [("b", "core.started"), ("a", "alarm"), ("a", "alarm"),
                                                      ("b", "core.started")]
    replay, gap = b.ctx.ring.since(events[-4].seq)
    assert not gap and [e.node for e in replay] == ["a", "a", "b"]


async def test_one_node_events_carry_no_node() -> None:
    op = make_op()
    try:
        op.world.bus.publish(None, alarm())
        (event,) = [e for e in op.ctx.ring.events if e.kind == "alarm"]
        assert event.node is None and "node" not in encode_event(event)
        assert op.ctx.forwarder is None
    finally:
        op.ctx.close()
        await op.world.engine.stop(unregister=False)


def test_the_console_decodes_events_with_and_without_node() -> None:
    line = encode_event(Event(7, 1.0, None, alarm(), "a"))
    assert decode_stream_line(json.loads(json.dumps(line))) == Event(7, 1.0, None, alarm(), "a")
    del line["node"]
    assert decode_stream_line(line) == Event(7, 1.0, None, alarm())


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def notify(self, topic: str, payload: str) -> None:
        self.sent.append((topic, payload))

    def subscribe(self, callback: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_events_go_out_batched_and_split_within_the_signal_limit() -> None:
    bus = EventBus()
    signals = Recorder()
    forwarder = EventForwarder(bus, signals, "a", interval=3600)
    detail = {"note": 'quoted "text" ' * 40}
    for n in range(200):
        bus.publish(None, AuditEntry(f"id-{n}", 1.0, "ada", "admin", "note", None, "ok", detail))
    assert signals.sent == []  # nothing until the batch is due
    await forwarder.flush()
    assert len(signals.sent) > 1
    received = MergedEvents(EventBus(), "b")
    got: list[Event] = []
    received.bus.subscribe(got.append)
    for topic, payload in signals.sent:
        assert topic == EVENTS_TOPIC
        assert len(payload.encode()) <= MAX_PAYLOAD and len(json.dumps([topic, payload])) <= 7900
        received.on_signal(topic, payload)
    assert [e.payload.id for e in got if isinstance(e.payload, AuditEntry)] == [f"id-{n}" for n in range(200)]
    assert {e.node for e in got} == {"a"}
    sent = len(signals.sent)
    await forwarder.flush()
    assert len(signals.sent) == sent  # nothing pending: nothing sent
    forwarder.close()
    received.close()


async def test_an_event_too_large_for_a_signal_is_dropped_and_counted() -> None:
    bus = EventBus()
    signals = Recorder()
    forwarder = EventForwarder(bus, signals, "a", interval=3600)
    bus.publish(None, AuditEntry("big", 1.0, "ada", "admin", "note", None, "ok", {"x": "y" * MAX_PAYLOAD}))
    bus.publish(None, alarm())
    await forwarder.flush()
    assert forwarder.dropped == 1 and len(signals.sent) == 1 and '"alarm"' in signals.sent[0][1]
    forwarder.close()


async def test_malformed_and_own_signals_are_ignored() -> None:
    merged = MergedEvents(EventBus(), "b")
    got: list[Event] = []
    merged.bus.subscribe(got.append)
    merged.on_signal(EVENTS_TOPIC, "not json")
    merged.on_signal(EVENTS_TOPIC, json.dumps({"node": "a", "events": [["x"]]}))
    merged.on_signal(EVENTS_TOPIC, json.dumps({"node": "b", "events": [[1.0, "alarm", None, {"alarm": "pbx-down"}]]}))
    merged.on_signal("instance", json.dumps({"node": "a", "events": []}))
    assert got == []
    merged.close()


async def test_the_summary_counts_the_cluster_from_storage_every_few_seconds(pair: tuple[Op, Op]) -> None:
    _, b = pair

    class Counting:
        reads = 0

        async def count_by_state_and_status(self) -> dict[tuple[str, str], int]:
            Counting.reads += 1
            return {("proxied", "registered"): 7, ("active", "none"): 3}

    class FakeStores:
        instances = Counting()

    b.ctx.stores = FakeStores()  # type: ignore[assignment]
    async with b.http(ADMIN) as http:
        for _ in range(3):
            summary = (await http.get("/v1/summary")).json()
            assert summary["counts"] == {"active": 3, "inactive": 0, "proxied": 7, "off": 0}
            assert summary["reg_status"]["registered"] == 7
        assert Counting.reads == 1
        b.world.clock.advance(5.0)
        await http.get("/v1/summary")
        assert Counting.reads == 2


async def test_an_alarm_on_node_a_reaches_node_b_stream_over_postgresql(pg_url: str, tmp_path: Path) -> None:
    db = await PgDatabase.open(pg_url)
    signals = {name: PgSignals(db) for name in ("A", "B")}
    for s in signals.values():
        await s.start()
    a, b = (make_op(node=name, signals=signals[name]) for name in ("A", "B"))
    socket_path = Path("/tmp") / f"ev-{tmp_path.name[-20:]}.sock"
    server = OperatorServer(b.ctx, socket_path=socket_path, app=b.app)
    await server.start()
    try:
        async with OperatorClient(socket_path=socket_path, operator_name="tester") as client:
            stream = client.events()
            a.world.bus.publish(None, alarm())
            line = await asyncio.wait_for(anext(stream), 10)
            while line["kind"] != "alarm":
                line = await asyncio.wait_for(anext(stream), 10)
            assert line["kind"] == "alarm" and line["node"] == "A" and line["data"]["target"] == "udp:pbx:5060"
            b.world.bus.publish(None, CoreStarted(0, "B"))
            line = await asyncio.wait_for(anext(stream), 10)
            assert line["kind"] == "core.started" and line["node"] == "B"
            await stream.aclose()
        await wait_for(lambda: a.ctx.forwarder is not None and a.ctx.forwarder.signals_sent >= 1)
    finally:
        await server.stop()
        for op in (a, b):
            op.ctx.close()
            await op.world.engine.stop(unregister=False)
        for s in signals.values():
            await s.close()
        await db.close()
