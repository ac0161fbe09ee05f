"""Ageing (max_age / not_registered_max_age): the pure decision and the sweep over a fake service."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import cast

import pytest

from sipis.ageing import Ageing, ageing_reason
from sipis.clock import FakeClock
from sipis.config import AgeingConfig
from sipis.engine import RegistrationEngine
from sipis.events import EventBus
from sipis.instance import Account, AppState, Instance, PushTarget
from sipis.lifecycle import InstanceLifecycle
from sipis.sip.register import Outcome, RegisterResult

NOW = 1_800_000_000.0
DAY, HOUR = 86400.0, 3600.0
POLICY = AgeingConfig()  # 3 days / 12 hours


def make_instance(selector: str = "sel-1", state: AppState = AppState.PROXIED, *,
                  last_seen_ago: float = 60.0, unregistered_ago: float | None = None,
                  disabled: bool = False, now: float = NOW) -> Instance:
    instance = Instance(
        selector=selector,
        account=Account(aor=f"sip:{selector}@pbx.example.org", username=selector, password="s3cret"),
        push=PushTarget("fcm", "org.example.phone", f"push-token-{selector}"),
        token_hash=f"hash-{selector}",
        state=state,
        app_last_seen=now - last_seen_ago,
        disabled=disabled,
    )
    if unregistered_ago is not None:
        instance.registration.unregistered_since = now - unregistered_ago
    return instance


def state_of(instance: Instance) -> AppState:
    """The state read afresh (an attribute narrowed by an earlier assert stays narrowed for mypy)."""
    return instance.state


# ---------------------------------------------------------------------------------------- ageing_reason


@pytest.mark.parametrize("state", [AppState.PROXIED, AppState.INACTIVE, AppState.ACTIVE])
def test_silent_app_goes_off_after_max_age(state: AppState) -> None:
    reason = ageing_reason(make_instance(state=state, last_seen_ago=3 * DAY + 1), NOW, POLICY)
    assert reason is not None and "(max_age)" in reason


def test_max_age_is_a_strict_limit() -> None:
    assert ageing_reason(make_instance(last_seen_ago=3 * DAY), NOW, POLICY) is None


def test_inactive_and_unregistered_too_long_goes_off() -> None:
    instance = make_instance(state=AppState.INACTIVE, unregistered_ago=12 * HOUR + 1)
    reason = ageing_reason(instance, NOW, POLICY)
    assert reason is not None and "not_registered_max_age" in reason


def test_policy_values_are_used() -> None:
    policy = AgeingConfig(max_age=100.0, not_registered_max_age=10.0)
    assert ageing_reason(make_instance(last_seen_ago=101), NOW, policy) is not None
    assert ageing_reason(make_instance(last_seen_ago=99), NOW, policy) is None
    inactive = make_instance(state=AppState.INACTIVE, last_seen_ago=1, unregistered_ago=11)
    assert ageing_reason(inactive, NOW, policy) is not None
    inactive.registration.unregistered_since = NOW - 9
    assert ageing_reason(inactive, NOW, policy) is None


@pytest.mark.parametrize(
    "instance",
    [
        # recently seen, registered
        make_instance(state=AppState.PROXIED),
        # the app is active: it registers itself, an old unregistered_since does not matter
        make_instance(state=AppState.ACTIVE, unregistered_ago=5 * DAY),
        # already off
        make_instance(state=AppState.OFF, last_seen_ago=30 * DAY, unregistered_ago=30 * DAY),
        # disabled by an operator
        make_instance(state=AppState.INACTIVE, disabled=True, last_seen_ago=30 * DAY, unregistered_ago=30 * DAY),
        # inactive but only briefly unregistered
        make_instance(state=AppState.INACTIVE, unregistered_ago=11 * HOUR),
        # inactive, never marked unregistered
        make_instance(state=AppState.INACTIVE),
        # proxied (the registration holds) with a stale unregistered_since
        make_instance(state=AppState.PROXIED, unregistered_ago=2 * DAY),
    ],
    ids=["proxied-recent", "active", "off", "disabled", "inactive-recent", "inactive-never", "proxied-stale"],
)
def test_no_reason(instance: Instance) -> None:
    assert ageing_reason(instance, NOW, POLICY) is None


async def test_not_registered_max_age_counts_from_the_take_over_not_the_last_hand_back() -> None:
    """An app that was in the foreground all day is not retired the moment it goes to sleep."""
    clock = FakeClock()

    async def exchange(instance: Instance, expires: int) -> RegisterResult:
        if expires == 0 or clock.monotonic() < 1000.0 + HOUR:
            return RegisterResult(Outcome.REGISTERED, 200, "OK", expires=expires)
        return RegisterResult(Outcome.FAILED, 503, "Service Unavailable", retry_after=60)

    engine = RegistrationEngine(exchange, EventBus(clock), clock, rng=random.Random(5))
    lifecycle = InstanceLifecycle(engine=engine, registrar=None, bus=engine.bus, clock=clock)  # type: ignore[arg-type]
    instance = make_instance(state=AppState.ACTIVE, now=clock.wall())
    lifecycle.take_over(instance)
    engine.tick()
    await engine.drain()
    lifecycle.hand_back(instance, None)  # the app is back in the foreground ...
    clock.advance(1)
    engine.tick()
    await engine.drain()
    assert instance.state is AppState.ACTIVE

    clock.advance(13 * HOUR)  # ... all day long, then goes to sleep while the PBX is down
    instance.app_last_seen = clock.wall()
    lifecycle.take_over(instance)
    engine.tick()
    await engine.drain()
    assert state_of(instance) is AppState.INACTIVE and instance.registration.failure_count == 1
    assert ageing_reason(instance, clock.wall(), POLICY) is None
    assert ageing_reason(instance, clock.wall() + 12 * HOUR - 1, POLICY) is None
    assert ageing_reason(instance, clock.wall() + 12 * HOUR + 1, POLICY) is not None
    await engine.stop(unregister=False)


# ---------------------------------------------------------------------------------------- Ageing.sweep


@dataclass
class FakeService:
    instances: dict[str, Instance] = field(default_factory=dict)
    retired: list[tuple[str, str, bool]] = field(default_factory=list)
    retired_event: asyncio.Event = field(default_factory=asyncio.Event)
    #: instances another node owns (and ages)
    elsewhere: set[str] = field(default_factory=set)

    def owns(self, selector: str) -> bool:
        return selector not in self.elsewhere

    async def retire(self, instance: Instance, *, reason: str, delete: bool) -> None:
        self.retired.append((instance.selector, reason, delete))
        instance.state = AppState.OFF
        self.retired_event.set()


def make_ageing(service: FakeService, clock: FakeClock) -> Ageing:
    return Ageing(cast("InstanceLifecycle", service), clock, POLICY)


async def test_sweep_retires_only_aged_instances() -> None:
    clock = FakeClock()
    now = clock.wall()
    service = FakeService()
    for instance in [
        make_instance("silent", last_seen_ago=4 * DAY, now=now),
        make_instance("unregistered", AppState.INACTIVE, unregistered_ago=13 * HOUR, now=now),
        make_instance("fresh", now=now),
        make_instance("active", AppState.ACTIVE, unregistered_ago=2 * DAY, now=now),
        make_instance("off", AppState.OFF, last_seen_ago=10 * DAY, now=now),
    ]:
        service.instances[instance.selector] = instance
    ageing = make_ageing(service, clock)

    assert await ageing.sweep() == 2
    assert {(s, d) for s, _, d in service.retired} == {("silent", False), ("unregistered", False)}
    reasons = {s: r for s, r, _ in service.retired}
    assert "(max_age)" in reasons["silent"]
    assert "not_registered_max_age" in reasons["unregistered"]
    assert service.instances["silent"].state is AppState.OFF

    assert await ageing.sweep() == 0  # off instances are not retired twice
    assert len(service.retired) == 2

    clock.advance(3 * DAY)  # now everybody still on has been silent too long
    assert await ageing.sweep() == 2
    assert {s for s, _, _ in service.retired[2:]} == {"fresh", "active"}


async def test_started_ageing_sweeps_periodically_and_stops() -> None:
    clock = FakeClock()
    service = FakeService()
    service.instances["silent"] = make_instance("silent", last_seen_ago=4 * DAY, now=clock.wall())
    ageing = make_ageing(service, clock)
    ageing.start(0.001)
    await asyncio.wait_for(service.retired_event.wait(), timeout=2.0)
    await ageing.stop()
    assert [s for s, _, _ in service.retired] == ["silent"]


async def test_only_the_owner_ages_an_instance() -> None:
    clock = FakeClock()
    service = FakeService()
    for selector in ("ours", "theirs"):
        service.instances[selector] = make_instance(selector, last_seen_ago=4 * DAY, now=clock.wall())
    service.elsewhere.add("theirs")
    assert await make_ageing(service, clock).sweep() == 1
    assert [selector for selector, _, _ in service.retired] == ["ours"]
