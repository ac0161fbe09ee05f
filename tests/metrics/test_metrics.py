"""The Prometheus metrics and Acrobits statistics on the small in-process core world of
``test_operator_api`` (fake clock, scripted registrar and push provider), read the way Prometheus
reads them: the text format, parsed."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from contract.events import Alarm, HealthChanged
from contract.kinds import AlarmKind, AlarmState, HealthState, HealthSubject
from sipis.clock import FakeClock
from sipis.config import parse_config
from sipis.core import Core
from sipis.metrics import CoreMetrics, LoopLag, apply_alarm, create_metrics_app
from sipis.push.base import PushOutcome, Verdict
from sipis.timers import FakeTimers
from tests.test_calls import invite
from tests.test_operator_api import Op, make_op

#: every metric of docs/monitoring.md (issue 14, item 5), as exposed
METRICS = ("sipis_instances", "sipis_registration_status", "sipis_registrations_total",
           "sipis_register_duration_seconds", "sipis_pbx_up", "sipis_pushes_total", "sipis_push_duration_seconds",
           "sipis_wake_duration_seconds", "sipis_calls_total", "sipis_held_calls", "sipis_alarms_active",
           "sipis_event_loop_lag_seconds", "sipis_storage_pending", "sipis_build_info")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: CoreMetrics) -> Samples:
    text = generate_latest(metrics.registry).decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@dataclass
class World:
    op: Op
    metrics: CoreMetrics
    lag: LoopLag


@pytest.fixture
async def world() -> AsyncIterator[World]:
    op = make_op()
    timers = FakeTimers(FakeClock())
    lag = LoopLag(timers.clock, timers)
    metrics = CoreMetrics(op.ctx, lag)
    yield World(op, metrics, lag)
    metrics.close()
    op.ctx.close()
    await op.world.engine.stop(unregister=False)


def family_names(samples: Samples) -> set[str]:
    found = set()
    for name in names(samples):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name.removesuffix(suffix) in METRICS:
                name = name.removesuffix(suffix)
        found.add(name)
    return found


async def test_a_registration_and_a_released_call_are_counted_once_each(world: World) -> None:
    instance = await world.op.enrol("alice", sleeping=True)
    samples = scrape(world.metrics)
    assert value(samples, "sipis_instances", state="proxied") == 1
    assert value(samples, "sipis_instances", state="active") == 0
    assert value(samples, "sipis_registration_status", status="registered") == 1
    # the scripted registrar is the instance's configured one: the label until targets are named
    assert value(samples, "sipis_registrations_total", pbx="sip:pbx.example.com", result="registered") == 1
    assert value(samples, "sipis_register_duration_seconds_count") == 1
    assert value(samples, "sipis_held_calls") == 0

    w = world.op.world
    w.provider.script = [PushOutcome(Verdict.ACCEPTED, 200, latency_ms=40.0)]
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle()
    assert value(scrape(world.metrics), "sipis_held_calls") == 1
    push_id = call.responses[0][1]["X-Push-ID"]
    w.calls.progress(instance.selector, push_id)
    await w.service.set_state(instance.selector, "active", "sip:alice@10.0.0.7:5060")
    await w.settle()
    samples = scrape(world.metrics)
    assert value(samples, "sipis_held_calls") == 0
    assert value(samples, "sipis_calls_total", outcome="released") == 1
    # the push was published at every later stage; it is one accepted attempt
    assert value(samples, "sipis_pushes_total", provider="mediator", kind="call", outcome="accepted") == 1
    assert value(samples, "sipis_push_duration_seconds_count", provider="mediator") == 1
    assert value(samples, "sipis_push_duration_seconds_sum", provider="mediator") == pytest.approx(0.04)
    for stage in ("push_sent", "provider_accepted", "device_progress", "app_active", "released"):
        assert value(samples, "sipis_wake_duration_seconds_count", stage=stage) == 1, stage
    assert value(samples, "sipis_instances", state="active") == 1
    assert value(samples, "sipis_registrations_total", pbx="sip:pbx.example.com", result="unregistered") == 1


async def test_a_transient_failure_then_success_counts_both_attempts(world: World) -> None:
    instance = await world.op.enrol("bob", sleeping=True)
    w = world.op.world
    w.provider.script = [PushOutcome(Verdict.REJECTED_TRANSIENT, 503, latency_ms=20.0, retry_after=0.01),
                         PushOutcome(Verdict.ACCEPTED, 200, latency_ms=30.0)]
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle()
    samples = scrape(world.metrics)
    assert value(samples, "sipis_pushes_total", provider="mediator", kind="call", outcome="rejected-transient") == 1
    assert value(samples, "sipis_pushes_total", provider="mediator", kind="call", outcome="accepted") == 1


async def test_pbx_up_follows_health_changes_and_is_absent_until_one(world: World) -> None:
    bus = world.op.world.bus
    assert not any(name == "sipis_pbx_up" for name, _ in scrape(world.metrics))
    bus.publish(None, HealthChanged(HealthSubject.PBX, "udp:127.0.0.1:5060", HealthState.UP, HealthState.UNKNOWN))
    bus.publish(None, HealthChanged(HealthSubject.PROVIDER, "mediator", HealthState.DOWN, HealthState.UP))
    assert value(scrape(world.metrics), "sipis_pbx_up", pbx="udp:127.0.0.1:5060") == 1
    bus.publish(None, HealthChanged(HealthSubject.PBX, "udp:127.0.0.1:5060", HealthState.DEGRADED, HealthState.UP))
    samples = scrape(world.metrics)
    assert value(samples, "sipis_pbx_up", pbx="udp:127.0.0.1:5060") == 0
    assert value(samples, "sipis_pbx_up", pbx="mediator") is None


async def test_alarms_active_counts_open_episodes_only(world: World) -> None:
    bus = world.op.world.bus
    bus.publish(None, Alarm(AlarmKind.STORAGE_FAILING, reason="disk full", state=AlarmState.RAISED))
    bus.publish("s1", Alarm(AlarmKind.UNAUTHORIZED, code=403))  # per instance, never an open episode
    samples = scrape(world.metrics)
    assert value(samples, "sipis_alarms_active", alarm="storage-failing") == 1
    assert value(samples, "sipis_alarms_active", alarm="unauthorized") is None
    bus.publish(None, Alarm(AlarmKind.STORAGE_FAILING, state=AlarmState.CLEARED))
    assert value(scrape(world.metrics), "sipis_alarms_active", alarm="storage-failing") == 0


def test_apply_alarm_never_goes_below_zero() -> None:
    active: dict[str, int] = {}
    for state in (AlarmState.RAISED, AlarmState.RAISED, AlarmState.CLEARED):
        apply_alarm(active, Alarm(AlarmKind.PBX_DOWN, target="udp:a:5060", state=state))
    assert active == {"pbx-down": 1}
    for _ in range(2):
        apply_alarm(active, Alarm(AlarmKind.PBX_DOWN, target="udp:a:5060", state=AlarmState.CLEARED))
    assert active == {"pbx-down": 0}


def test_loop_lag_reports_the_worst_delay_of_its_window() -> None:
    clock = FakeClock()
    timers = FakeTimers(clock)
    lag = LoopLag(clock, timers, interval=0.5, window=15.0)
    assert lag.worst() == 0.0
    lag.start()
    timers.advance(2.0)
    assert lag.worst() == 0.0 and len(lag.samples) == 4
    clock.advance(1.3)  # the loop stalls: the timer due in 0.5 s runs 0.8 s late
    timers.advance(0.0)
    assert lag.worst() == pytest.approx(0.8)
    timers.advance(15.5)
    assert lag.worst() == 0.0  # the stall left the window
    lag.stop()
    assert timers.pending == 0


async def test_every_metric_is_exposed_with_the_constant_labels(world: World) -> None:
    w = world.op.world
    noded = CoreMetrics(world.op.ctx, world.lag, const_labels={"node": "sipis-1"})
    try:
        carol = await world.op.enrol("carol", sleeping=True)
        w.bus.publish(None, HealthChanged(HealthSubject.PBX, "udp:127.0.0.1:5060", HealthState.UP,
                                          HealthState.UNKNOWN))
        w.bus.publish(None, Alarm(AlarmKind.STORAGE_FAILING, state=AlarmState.RAISED))
        w.provider.script = [PushOutcome(Verdict.ACCEPTED, 200, latency_ms=40.0)]
        w.calls.on_invite(invite(carol))  # type: ignore[arg-type]
        await w.settle()
        await w.service.set_state(carol.selector, "active", None)
        await w.settle()
        samples = scrape(noded)
        assert family_names(samples) == set(METRICS)
        assert all(dict(labels).get("node") == "sipis-1" for _, labels in samples)
        build = [dict(labels) for name, labels in samples if name == "sipis_build_info"]
        assert build[0]["version"] == world.op.ctx.version and build[0]["sip"] in ("compiled", "python")
    finally:
        noded.close()


async def test_the_listener_serves_metrics_and_acrobits_statistics(world: World) -> None:
    await world.op.enrol("dave", sleeping=True)
    await world.op.enrol("erin")
    world.op.world.clock.advance(42.0)
    transport = httpx.ASGITransport(app=create_metrics_app(world.metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://metrics") as http:
        response = await http.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        assert 'sipis_instances{state="proxied"} 1.0' in response.text
        stats = (await http.get("/stats/summary/json")).json()
        assert (await http.post("/metrics")).status_code == 405
    assert stats["Instance"] == {"Count": 2, "CountInState": {"Idle": 1, "Registering": 0, "Registered": 1,
                                                              "Unauthorized": 0, "Error": 0}}
    server = stats["Server"]
    assert server["UptimeInSeconds"] == 42 and server["MessageLoopQueueSize"] == 0
    assert server["VersionNumber"] == world.op.ctx.version


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="metrics-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_the_core_serves_metrics_only_when_configured(short_dir: Path) -> None:
    def config(listen: str | None) -> Core:
        settings: dict[str, object] = {"state_dir": str(short_dir / "state"), "api": {"listen": ""},
                                       "sip": {"listen": ["udp:127.0.0.1:0"]},
                                       "operator": {"socket": str(short_dir / "op.sock")}}
        if listen is not None:
            settings["metrics"] = {"listen": listen}
        return Core(parse_config(settings, short_dir))

    for off in (None, ""):
        core = config(off)
        listening = await core.start()
        try:
            assert listening.metrics_url is None and core.metrics is None
        finally:
            await core.stop()
    core = config("127.0.0.1:0")
    listening = await core.start()
    try:
        assert listening.metrics_url is not None and listening.metrics_url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=listening.metrics_url) as http:
            text = (await http.get("/metrics")).text
            stats = (await http.get("/stats/summary/json")).json()
        assert "sipis_build_info{" in text and "sipis_event_loop_lag_seconds " in text
        assert stats["Instance"]["Count"] == 0
    finally:
        await core.stop()
