"""Alarm episodes (sipis/alarms.py): raised once, cleared once, logged once each; driven by a fake clock."""

from __future__ import annotations

import logging

import pytest

from contract.events import Alarm, Event, HealthChanged, InstancePushChanged, RegistrationResult
from contract.kinds import AlarmKind, AlarmState, HealthState, HealthSubject
from sipis.alarms import AUTH_FAILURES, DEAD_TOKENS, WINDOW, AlarmBoard
from sipis.clock import FakeClock
from sipis.events import EventBus
from sipis.instance import Account, Instance, PushTarget

TARGET = "udp:127.0.0.1:5060"


def instance(n: int) -> Instance:
    found = Instance(f"s{n}", Account(f"sip:u{n}@example.com", f"u{n}", "pw"), PushTarget("fcm", "app", "t"), "h")
    found.registration.target = TARGET
    return found


def world() -> tuple[AlarmBoard, list[Alarm], FakeClock]:
    clock = FakeClock()
    bus = EventBus(clock)
    seen: list[Alarm] = []

    def keep(event: Event) -> None:
        if isinstance(event.payload, Alarm):
            seen.append(event.payload)

    bus.subscribe(keep)
    instances = {f"s{n}": instance(n) for n in range(20)}
    return AlarmBoard(bus, clock, instances.get), seen, clock


def health(state: HealthState, previous: HealthState, subject: HealthSubject = HealthSubject.PBX) -> HealthChanged:
    name = TARGET if subject is HealthSubject.PBX else "fcm"
    return HealthChanged(subject, name, state, previous, "408 Request Timeout")


def refused() -> RegistrationResult:
    return RegistrationResult("unauthorized", 403, "Forbidden", 0, "", 1, None, None)


def test_pbx_down_is_raised_once_per_episode_and_cleared(caplog: pytest.LogCaptureFixture) -> None:
    board, seen, _ = world()
    caplog.set_level(logging.WARNING, "sipis.alarms")
    board.bus.publish(None, health(HealthState.DOWN, HealthState.UNKNOWN))
    board.bus.publish(None, health(HealthState.DOWN, HealthState.UNKNOWN))  # no second raise
    board.bus.publish(None, health(HealthState.UP, HealthState.DOWN))
    board.bus.publish(None, health(HealthState.UP, HealthState.DOWN))  # nothing left to clear
    assert [(a.alarm, a.state, a.target) for a in seen] == [
        (AlarmKind.PBX_DOWN, AlarmState.RAISED, TARGET), (AlarmKind.PBX_DOWN, AlarmState.CLEARED, TARGET)]
    assert seen[0].id == seen[1].id and seen[0].reason == "408 Request Timeout"
    assert [r.getMessage() for r in caplog.records] == [
        f"alarm pbx-down raised for {TARGET}: 408 Request Timeout", f"alarm pbx-down cleared for {TARGET}"]
    active, history = board.records()
    assert active == [] and [(r.id, r.state) for r in history] == [(seen[0].id, "cleared")]
    board.bus.publish(None, health(HealthState.DOWN, HealthState.UP))  # a new episode, a new id
    assert seen[-1].id != seen[0].id and len(board.records()[0]) == 1


def test_provider_down_follows_the_provider() -> None:
    board, seen, _ = world()
    board.bus.publish(None, health(HealthState.DOWN, HealthState.UP, HealthSubject.PROVIDER))
    board.bus.publish(None, health(HealthState.UP, HealthState.DOWN, HealthSubject.PROVIDER))
    assert [(a.alarm, a.state, a.target) for a in seen] == [
        (AlarmKind.PROVIDER_DOWN, AlarmState.RAISED, "fcm"), (AlarmKind.PROVIDER_DOWN, AlarmState.CLEARED, "fcm")]


def test_auth_failures_need_many_instances_of_one_pbx_within_the_window() -> None:
    board, seen, clock = world()
    for n in range(AUTH_FAILURES - 1):
        board.bus.publish(f"s{n}", refused())
        board.bus.publish(f"s{n}", refused())  # the same instance again counts once
    assert seen == []
    board.bus.publish(f"s{AUTH_FAILURES}", refused())
    assert [(a.alarm, a.state, a.target) for a in seen] == [(AlarmKind.AUTH_FAILURES, AlarmState.RAISED, TARGET)]
    board.bus.publish(f"s{AUTH_FAILURES + 1}", refused())
    assert len(seen) == 1
    board.tick()  # still within the window
    assert len(seen) == 1
    clock.advance(WINDOW + 1)
    board.tick()
    assert [(a.alarm, a.state) for a in seen][-1] == (AlarmKind.AUTH_FAILURES, AlarmState.CLEARED)


def test_a_registered_instance_no_longer_counts_as_refused() -> None:
    board, seen, _ = world()
    for n in range(AUTH_FAILURES):
        board.bus.publish(f"s{n}", refused())
    board.bus.publish("s0", RegistrationResult("registered", 200, "OK", 600, "", 0, None, None))
    board.tick()
    assert [a.state for a in seen] == [AlarmState.RAISED, AlarmState.CLEARED]


def test_token_dead_bursts() -> None:
    board, seen, clock = world()
    for n in range(DEAD_TOKENS):
        board.bus.publish(f"s{n}", InstancePushChanged(unreachable=True, reason="Unregistered"))
        clock.advance(1)
    board.bus.publish("s0", InstancePushChanged(provider="fcm"))  # not a dead token
    assert [(a.alarm, a.state, a.target) for a in seen] == [(AlarmKind.TOKEN_DEAD, AlarmState.RAISED, None)]
    clock.advance(WINDOW)
    board.tick()
    assert [a.state for a in seen] == [AlarmState.RAISED, AlarmState.CLEARED]


def test_storage_failing_episode_and_acknowledgement() -> None:
    board, seen, clock = world()
    board.storage("disk full")
    board.storage("disk full")
    record = board.records()[0][0]
    clock.advance(3)
    assert board.acknowledge(record.id, "ada") is record
    assert board.acknowledge(record.id, "bob") is record and record.acknowledged_by == "ada"
    assert record.acknowledged_at == clock.wall()
    board.storage(None)
    assert [(a.alarm, a.state) for a in seen] == [(AlarmKind.STORAGE_FAILING, AlarmState.RAISED),
                                                  (AlarmKind.STORAGE_FAILING, AlarmState.CLEARED)]
    assert board.find(record.id) is record and board.acknowledge("nope", "ada") is None
