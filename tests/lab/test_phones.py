"""Simulated phones against the real core, the lab PBX and the lab mediator (all on loopback).

A phone enrols over HTTPS, goes to sleep (the core registers for it), receives the call push
through the mediator, wakes, reports progress, registers itself, reports ``active`` and answers
the call the core released with 302; the caller sees the push stages and a 200, ACKs and hangs
up. Also: the app rejecting a released call, and the awkward phones (never wakes, dead token, a
caller who gives up while the phone is still waking) — plus the ``Distribution`` helper.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path

import pytest

from lab.demo import DemoOptions
from lab.mediator import Distribution, LabMediator, MediatorPolicy
from lab.pbx import LabPbx
from lab.phones import FleetSettings, LabPhone, PhoneFleet, PhoneProfile
from sipis.instance import AppState
from tests.lab.world import LabSettings, LabWorld
from tests.waiting import wait_for

ENROL = "phones-test-enrol-token"
SLEEPER = PhoneProfile(first_foreground=Distribution.fixed(0.1), background=Distribution.fixed(1000),
                       wake_delay=Distribution.fixed(0.3), answer_delay=Distribution.fixed(0.1), reject_rate=0.0)


class Lab(LabWorld):
    async def phone(self, user: str, profile: PhoneProfile) -> LabPhone:
        return await self.start_phone(user, profile)

    def state(self, phone: LabPhone) -> AppState | None:
        instance = self.instance(phone)
        return instance.state if instance is not None else None

    async def asleep(self, phone: LabPhone) -> None:
        def proxied_only() -> bool:
            contacts = self.pbx.registered_contacts(phone.user)
            return (phone.state == "asleep" and self.state(phone) is AppState.PROXIED
                    and [c.startswith("sip:sipis-") for c in contacts] == [True])

        await wait_for(proxied_only, what=f"{phone.user} asleep, only the core's binding at the PBX")


@pytest.fixture
def lab_settings() -> LabSettings:
    policy = MediatorPolicy(latency=Distribution.fixed(0.01), transient_rate=0.0,
                            delivery_latency=Distribution.fixed(0.05))
    return LabSettings(Lab, ENROL, policy, DemoOptions(wake_timeout=2.0, answer_timeout=3.0))


async def test_phone_enrols_sleeps_receives_a_push_wakes_and_answers(lab: Lab) -> None:
    phone = await lab.phone("load0001", SLEEPER)
    assert phone.selector and phone.stats["enrolments"] == 1
    await lab.asleep(phone)

    record = await lab.callers.call("load0001", hold=0.3)

    assert record.outcome == "released-answered", record.as_dict()
    assert record.status == 200 and record.detail == "BYE 200"
    assert record.push_statuses[:3] == ["Alerting-Device", "Push-Notification-Sent", "Device-Making-Progress"]
    [push] = phone.pushes
    assert push.is_call and push.push_id == record.push_id and push.call_id == record.call_id
    assert push.selector == phone.selector and push.token == phone.token
    stats = phone.stats
    assert [stats[k] for k in ("woken", "progress_reported", "answered", "acks", "byes")] == [1, 1, 1, 1, 1]
    assert phone.state == "awake" and lab.state(phone) is AppState.ACTIVE
    contacts = lab.pbx.registered_contacts("load0001")
    assert contacts == [phone.contact]  # the app's own binding; the core removed its own before the 302
    assert lab.core.calls is not None and lab.core.calls.outcomes == {"released": 1}
    assert lab.mediator.answers["accepted"] == 1 and lab.mediator.delivered == 1


async def test_a_call_ringing_when_the_load_stops_is_cancelled_on_both_sides(lab: Lab) -> None:
    never = await lab.phone("load0006", replace(SLEEPER, never_wakes=True))
    await lab.asleep(never)
    lab.callers.place("load0006")
    await wait_for(lambda: any(r.via_sipis for r in lab.callers.ringing()), what="the call held and ringing")
    await lab.callers.stop()
    [record] = lab.callers.records
    assert record.outcome == "cancelled-held" and lab.callers.abandoned == 0
    assert lab.callers.outcomes["cancelled-held"] == 1
    assert lab.core.calls is not None
    await wait_for(lambda: lab.core.calls is not None and lab.core.calls.outcomes == {"cancelled": 1},
                   what="the core counting it cancelled")


async def test_the_app_rejects_the_released_call(lab: Lab) -> None:
    phone = await lab.phone("load0002", replace(SLEEPER, reject_rate=1.0))
    await lab.asleep(phone)
    record = await lab.callers.call("load0002")
    assert record.outcome == "released-rejected", record.as_dict()
    assert record.status in (486, 603) and record.via_sipis
    assert phone.stats["rejected"] == 1 and lab.core.calls is not None
    assert lab.core.calls.outcomes == {"released": 1}


async def test_never_waking_dead_token_and_early_hang_up(lab: Lab) -> None:
    never = await lab.phone("load0003", replace(SLEEPER, never_wakes=True))
    dead = await lab.phone("load0004", replace(SLEEPER, dead_token=True))
    slow = await lab.phone("load0005", replace(SLEEPER, wake_delay=Distribution.fixed(1.5)))
    for phone in (never, dead, slow):
        await lab.asleep(phone)
    assert dead.token in lab.mediator.dead_tokens

    no_response, unreachable, cancelled = await asyncio.gather(
        lab.callers.call("load0003"), lab.callers.call("load0004"), lab.callers.call("load0005", cancel_after=0.4))

    assert no_response.outcome == "no-response" and no_response.status == 480  # T1 (2 s)
    assert never.stats["call_pushes"] == 1 and never.stats["pushes_ignored"] == 1 and never.stats["woken"] == 0
    assert unreachable.outcome == "device-unreachable" and unreachable.status == 480
    assert dead.pushes == [] and lab.core.service is not None
    instance = lab.core.service.get(dead.selector or "")
    assert instance is not None and instance.push.unreachable
    assert cancelled.outcome == "cancelled-held" and cancelled.status == 487 and cancelled.cancel_sent
    await wait_for(lambda: slow.stats["missed_call_pushes"] == 1, what="the missed-call push")
    await wait_for(lambda: slow.stats["wake_aborted"] == 1, what="the slow phone going back to sleep")
    assert slow.state == "asleep" and slow.stats["answered"] == 0
    assert lab.core.calls is not None
    assert lab.core.calls.outcomes == {"no-response": 1, "push-rejected": 1, "cancelled": 1}


def test_fleet_assigns_exact_seeded_shares(tmp_path: Path) -> None:
    settings = FleetSettings(apps=10, never_wake_rate=0.2, dead_token_rate=0.1, stale_password_rate=0.1)
    pbx, mediator = LabPbx(), LabMediator(tmp_path)  # not started: profiles need neither

    def kinds(seed: int) -> list[str]:
        fleet = PhoneFleet(settings, pbx=pbx, mediator=mediator, api_url="https://127.0.0.1:1", api_ca_file=None,
                           enroll_token=ENROL, seed=seed)
        return [p.kind for p in fleet.profiles()]

    first = kinds(3)
    assert first.count("never-wakes") == 2 and first.count("dead-token") == 1
    assert first.count("stale-password") == 1 and first.count("normal") == 6
    assert kinds(3) == first and any(kinds(seed) != first for seed in range(4, 10))


def test_distributions() -> None:
    rng = random.Random(5)
    lognormal = Distribution.parse("lognormal:1.5,0.5")
    samples = sorted(lognormal.sample(rng) for _ in range(2001))
    assert 1.3 < samples[1000] < 1.7  # the median
    assert all(0.5 <= Distribution.parse("uniform:0.5,3").sample(rng) <= 3 for _ in range(100))
    assert Distribution.parse("2.5").sample(rng) == 2.5
    assert Distribution.parse("exponential:20,30").sample(rng) <= 30
    assert {Distribution.parse("choice:none,30").sample_optional(rng) for _ in range(50)} == {None, 30.0}
    assert str(Distribution.parse("lognormal:1.5,0.5")) == "lognormal:1.5,0.5"
    with pytest.raises(ValueError, match="bad distribution"):
        Distribution.parse("gauss:1,2")
