"""Health of registrar targets and push providers (sipis/health.py), driven by a fake clock."""

from __future__ import annotations

import logging

import pytest

from contract.documents import PushRecord
from contract.events import Event, HealthChanged
from contract.kinds import HealthState, HealthSubject
from sipis.clock import FakeClock
from sipis.events import EventBus
from sipis.health import HealthMonitor
from sipis.sip.register import Outcome, RegisterResult
from sipis.sip.transport import Flow

PBX = HealthSubject.PBX
TARGET = "udp:127.0.0.1:5060"
OK = RegisterResult(Outcome.REGISTERED, 200, "OK", 600)
TIMEOUT = RegisterResult(Outcome.FAILED, 408, "Request Timeout")
REFUSED = RegisterResult(Outcome.UNAUTHORIZED, 403, "Forbidden")


def world() -> tuple[HealthMonitor, list[HealthChanged], FakeClock]:
    clock = FakeClock()
    bus = EventBus(clock)
    changes: list[HealthChanged] = []

    def keep(event: Event) -> None:
        if isinstance(event.payload, HealthChanged):
            changes.append(event.payload)

    bus.subscribe(keep)
    return HealthMonitor(bus, clock), changes, clock


def test_nothing_is_up_until_it_answered() -> None:
    health, changes, _ = world()
    assert health.state(PBX, TARGET) is HealthState.UNKNOWN and health.counts(PBX) == {}
    health.pbx_result(TARGET, REFUSED)  # a 403 is an answer: the registrar is there
    assert health.state(PBX, TARGET) is HealthState.UP
    assert changes == [HealthChanged(PBX, TARGET, HealthState.UP, HealthState.UNKNOWN)]


def test_a_target_never_seen_up_is_down_at_its_first_failure() -> None:
    health, changes, clock = world()
    clock.advance(5)
    health.pbx_result(TARGET, TIMEOUT)
    target = health.get(PBX, TARGET)
    assert target.state is HealthState.DOWN and target.last_error == "408 Request Timeout"
    assert target.since == clock.wall()
    assert changes == [HealthChanged(PBX, TARGET, HealthState.DOWN, HealthState.UNKNOWN, "408 Request Timeout")]


def test_a_known_target_degrades_then_goes_down_and_comes_back() -> None:
    health, changes, _ = world()
    health.pbx_result(TARGET, OK)
    health.pbx_result(TARGET, TIMEOUT)
    assert health.state(PBX, TARGET) is HealthState.DEGRADED
    health.pbx_result(TARGET, OK)  # one answer in between: up again
    for _ in range(3):
        health.pbx_result(TARGET, TIMEOUT)
    assert health.state(PBX, TARGET) is HealthState.DOWN
    health.pbx_result(TARGET, TIMEOUT)  # no repeated event while it stays down
    health.pbx_result(TARGET, OK)
    assert [(c.previous, c.state) for c in changes] == [
        (HealthState.UNKNOWN, HealthState.UP), (HealthState.UP, HealthState.DEGRADED),
        (HealthState.DEGRADED, HealthState.UP), (HealthState.UP, HealthState.DEGRADED),
        (HealthState.DEGRADED, HealthState.DOWN), (HealthState.DOWN, HealthState.UP)]
    assert health.counts(PBX) == {"up": 1}


def test_a_lost_connection_degrades_an_up_target() -> None:
    health, changes, _ = world()
    flow = Flow("tcp", ("127.0.0.1", 40000), ("127.0.0.1", 5060), True, lambda data: None, lambda: None)
    health.flow_lost(flow, "reset")  # a target we know nothing of stays unknown
    assert health.targets == {}
    health.pbx_result("tcp:127.0.0.1:5060", OK)
    health.flow_lost(flow, "reset")
    assert health.get(PBX, "tcp:127.0.0.1:5060").state is HealthState.DEGRADED
    assert changes[-1].error == "connection lost: reset"


def test_providers_follow_push_outcomes() -> None:
    health, _, _ = world()
    bus = health.bus
    bus.publish("s", PushRecord("p1", "s", "call", "fcm", outcome="pending"))
    assert health.targets == {}
    bus.publish("s", PushRecord("p1", "s", "call", "fcm", outcome="rejected-transient", provider_code=503,
                                provider_reason="Unavailable"))
    provider = health.get(HealthSubject.PROVIDER, "fcm")
    assert provider.state is HealthState.DOWN and provider.last_error == "503 Unavailable"
    bus.publish("s", PushRecord("p2", "s", "call", "fcm", outcome="rejected-permanent"))  # the token's fault
    assert provider.state is HealthState.UP


def test_failures_are_logged_once_per_interval_per_target(caplog: pytest.LogCaptureFixture) -> None:
    health, _, _ = world()
    caplog.set_level(logging.WARNING, "sipis.health")
    health.tick()
    health.pbx_result(TARGET, OK)
    health.tick()
    assert caplog.records == []  # nothing when all is well
    for _ in range(37):
        health.pbx_result(TARGET, TIMEOUT)
    health.tick()
    assert [r.getMessage() for r in caplog.records] == [
        "pbx udp:127.0.0.1:5060 — 37 registrations failing (408 Request Timeout), 0 ok"]
    assert caplog.records[0].levelno == logging.WARNING
    health.tick()
    assert len(caplog.records) == 1
