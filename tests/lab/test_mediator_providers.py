"""The lab mediator's FCM- and APNs-shaped endpoints, driven by the core's real providers.

Provider level: the ``[push.NAME]`` tables :meth:`LabMediator.push_tables` writes go through the
core's config parser and provider registry, so the real ``acrobits``, ``fcm`` (OAuth token fetch
with the lab's service account, FCM HTTP v1) and ``apns`` (HTTP/2, ES256 JWT with the lab's .p8
key) providers talk HTTPS to the lab: accepted pushes reach the attached phone callback, the
policy's transient failures (503 or 429 with Retry-After) and dead tokens (mediator code 404, FCM
404 UNREGISTERED, APNs 410 Unregistered) come back as the core's verdicts, latency is applied.

End to end: the real core, the lab PBX, callers and simulated Android (FCM) and iOS (APNs, with a
PushKit token) phones: a call wakes the phone through its provider and is released to it, a
transient failure is retried by the core and the call still gets through, a dead token leaves the
call ``device-unreachable`` and the instance's push target unreachable.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from lab.apns_server import Reply as ApnsReply
from lab.demo import DemoOptions
from lab.mediator import (
    ACCEPTED,
    LAB_APP_ID,
    PERMANENT,
    PROVIDER_NAMES,
    TRANSIENT,
    Distribution,
    LabMediator,
    LabPush,
    MediatorPolicy,
)
from lab.phones import LabPhone, PhoneProfile
from lab.push_servers import Reply
from sipis.config import parse_config
from sipis.push.base import PushKind, PushProvider, PushRequest, Verdict
from sipis.push.registry import build_providers
from tests.lab.world import LabSettings, LabWorld
from tests.waiting import wait_for

TYPES = ("acrobits", "fcm", "apns")
QUIET = MediatorPolicy(latency=Distribution.fixed(0.01), transient_rate=0.0,
                       delivery_latency=Distribution.fixed(0.02))



# ====================================================================== provider level


@dataclass
class Endpoints:
    mediator: LabMediator
    providers: dict[str, PushProvider]  # by type
    pushes: list[LabPush]

    def token(self, push_type: str) -> str:
        """A token of the platform's shape, attached to :attr:`pushes`."""
        token = uuid.uuid4().hex * 2 if push_type != "fcm" else f"fcm-{uuid.uuid4().hex}:APA91b{'x' * 100}"
        self.mediator.attach(token, self.pushes.append)
        return token


@pytest.fixture
async def endpoints(tmp_path: Path) -> AsyncIterator[Endpoints]:
    async with LabMediator(tmp_path / "lab", policy=QUIET, rng=random.Random(3), fcm=True, apns=True) as mediator:
        tables = mediator.push_tables(timeout=3)
        assert set(tables) == {"mediator", "fcm", "apns"}
        config = parse_config(provider_config(tmp_path / "state", tables), tmp_path)
        built = build_providers(config.push)
        providers = {provider.type: provider for provider in built.values()}
        try:
            yield Endpoints(mediator, providers, [])
        finally:
            for provider in built.values():
                await provider.close()


def provider_config(state_dir: Path, tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A core config with only these push tables (the app API off: nothing listens)."""
    return {"state_dir": str(state_dir), "api": {"listen": ""}, "push": tables}


def call_push(token: str, *, voip: bool = False, kind: PushKind = PushKind.CALL) -> PushRequest:
    return PushRequest(push_id=str(uuid.uuid4()), kind=kind, selector="sel-lab-1", app_id=LAB_APP_ID,
                       token=token, voip=voip, sent_at=time.time(), ttl=20.0, call_id="call-1@lab",
                       caller="sip:alice@lab", caller_display_name="Alice", user_name="load0001")


@pytest.mark.parametrize("push_type", TYPES)
async def test_accepted_push_reaches_the_phone_after_the_latency(endpoints: Endpoints, push_type: str) -> None:
    mediator = endpoints.mediator
    mediator.policy = replace(QUIET, latency=Distribution.fixed(0.25))
    token = endpoints.token(push_type)
    request = call_push(token)

    outcome = await endpoints.providers[push_type].send(request)

    assert outcome.verdict is Verdict.ACCEPTED, outcome
    assert outcome.latency_ms is not None and outcome.latency_ms >= 250
    await wait_for(lambda: len(endpoints.pushes) == 1, what="the push on the device")
    [push] = endpoints.pushes
    assert push.provider == push_type and push.token == token
    assert push.is_call and push.verb == "NotifyIncomingCall"
    assert (push.push_id, push.call_id, push.selector, push.caller) == (
        request.push_id, "call-1@lab", "sel-lab-1", "sip:alice@lab")
    assert push.sent_at_ms == int(request.sent_at * 1000)
    assert mediator.answers_by_provider[push_type] == {ACCEPTED: 1}
    assert mediator.answers == {ACCEPTED: 1} and mediator.delivered_by_provider == {push_type: 1}


async def test_fcm_and_apns_speak_their_wire_formats(endpoints: Endpoints) -> None:
    fcm, apns = endpoints.mediator.fcm, endpoints.mediator.apns
    assert fcm is not None and apns is not None
    android, iphone, pushkit = endpoints.token("fcm"), endpoints.token("apns"), endpoints.token("apns")
    missed = call_push(iphone, kind=PushKind.MISSED)
    results = [await endpoints.providers["fcm"].send(call_push(android)),
               await endpoints.providers["apns"].send(call_push(pushkit, voip=True)),
               await endpoints.providers["apns"].send(missed)]

    assert all(outcome.accepted for outcome in results), results
    [token_request] = fcm.token_requests  # the OAuth exchange with the lab's service account
    assert token_request.status == 200
    [send] = fcm.requests
    assert send.path == "/v1/projects/sipis-lab/messages:send" and send.status == 200
    assert send.json["message"]["token"] == android and send.json["message"]["android"]["priority"] == "HIGH"
    voip, alert = apns.requests
    assert voip.headers["apns-push-type"] == "voip" and voip.headers["apns-topic"] == f"{LAB_APP_ID}.voip"
    assert alert.headers["apns-push-type"] == "alert" and alert.headers["apns-topic"] == LAB_APP_ID
    assert voip.jwt is not None and voip.status == alert.status == 200
    await wait_for(lambda: len(endpoints.pushes) == 3, what="three pushes on the devices")
    by_token = {push.token: push for push in endpoints.pushes}
    assert by_token[pushkit].is_call and by_token[iphone].is_missed and by_token[android].is_call
    assert by_token[iphone].push_id == missed.push_id and "aps" not in by_token[iphone].body


@pytest.mark.parametrize(("push_type", "throttle", "status"), [
    ("acrobits", 0.0, 503), ("fcm", 0.0, 503), ("fcm", 1.0, 429), ("apns", 0.0, 503), ("apns", 1.0, 429)])
async def test_transient_failure_then_accepted(endpoints: Endpoints, push_type: str, throttle: float,
                                               status: int) -> None:
    mediator = endpoints.mediator
    mediator.policy = replace(QUIET, transient_rate=1.0, throttle_share=throttle, retry_after=Distribution.fixed(2))
    provider = endpoints.providers[push_type]
    token = endpoints.token(push_type)

    failed = await provider.send(call_push(token))

    assert failed.verdict is Verdict.REJECTED_TRANSIENT, failed
    assert failed.provider_code == status and failed.retry_after == 2.0
    if push_type == "fcm":
        assert failed.provider_reason == ("QUOTA_EXCEEDED" if status == 429 else "UNAVAILABLE")
    if push_type == "apns":
        assert failed.provider_reason == ("TooManyRequests" if status == 429 else "ServiceUnavailable")

    mediator.policy = QUIET
    accepted = await provider.send(call_push(token))

    assert accepted.verdict is Verdict.ACCEPTED, accepted
    await wait_for(lambda: len(endpoints.pushes) == 1, what="the push on the device")
    assert mediator.answers_by_provider[push_type] == {TRANSIENT: 1, ACCEPTED: 1}


@pytest.mark.parametrize(("push_type", "code", "reason"), [
    ("acrobits", 404, "Device token not found"), ("fcm", 404, "UNREGISTERED"), ("apns", 410, "Unregistered")])
async def test_dead_token_is_permanent_and_dead(endpoints: Endpoints, push_type: str, code: int,
                                                reason: str) -> None:
    token = endpoints.token(push_type)
    endpoints.mediator.kill(token)

    outcome = await endpoints.providers[push_type].send(call_push(token, voip=push_type == "apns"))

    assert outcome.verdict is Verdict.REJECTED_PERMANENT, outcome
    assert outcome.token_dead and outcome.provider_code == code and outcome.provider_reason == reason
    assert endpoints.mediator.answers_by_provider[push_type] == {PERMANENT: 1}
    await asyncio.sleep(0.1)
    assert endpoints.pushes == [] and endpoints.mediator.delivered == 0


async def test_fcm_and_apns_still_check_credentials(endpoints: Endpoints, tmp_path: Path) -> None:
    """The policy only decides for pushes the real service would take: a wrong project is refused."""
    fcm = endpoints.mediator.fcm
    assert fcm is not None
    tables = endpoints.mediator.push_tables()
    tables["fcm"]["project_id"] = "someone-else"
    config = parse_config(provider_config(tmp_path / "other", {"fcm": tables["fcm"]}), tmp_path)
    [provider] = build_providers(config.push).values()
    try:
        outcome = await provider.send(call_push(endpoints.token("fcm")))
    finally:
        await provider.close()
    assert outcome.verdict is Verdict.REJECTED_PERMANENT and outcome.provider_code == 403
    assert endpoints.mediator.answers_by_provider["fcm"] == {PERMANENT: 1} and endpoints.pushes == []


# ====================================================================== end to end through the core


ENROL = "providers-test-enrol-token"
SLEEPER = PhoneProfile(first_foreground=Distribution.fixed(0.1), background=Distribution.fixed(1000),
                       wake_delay=Distribution.fixed(0.3), answer_delay=Distribution.fixed(0.1), reject_rate=0.0)


class Lab(LabWorld):
    async def phone(self, user: str, push_type: str, *, dead_token: bool = False) -> LabPhone:
        profile = replace(SLEEPER, provider=PROVIDER_NAMES[push_type], push_type=push_type, dead_token=dead_token)
        return await self.start_phone(user, profile)

    async def asleep(self, phone: LabPhone) -> None:
        assert self.core.service is not None

        def proxied() -> bool:
            instance = self.instance(phone)
            return phone.state == "asleep" and instance is not None and instance.state.value == "proxied"

        await wait_for(proxied, what=f"{phone.user} asleep with the core registered for it")


@pytest.fixture
def lab_settings() -> LabSettings:
    return LabSettings(Lab, ENROL, QUIET, DemoOptions(wake_timeout=5.0, answer_timeout=3.0), fcm=True, apns=True)


@pytest.mark.parametrize("push_type", ["fcm", "apns"])
async def test_calls_through_the_provider_released_retried_and_unreachable(lab: Lab, push_type: str) -> None:
    mediator = lab.mediator
    fcm, apns = mediator.fcm, mediator.apns
    assert fcm is not None and apns is not None
    plain = await lab.phone("load0011", push_type)
    retried = await lab.phone("load0012", push_type)
    dead = await lab.phone("load0013", push_type, dead_token=True)
    assert (plain.voip_token is not None) is (push_type == "apns")
    if push_type == "fcm":  # the first push for this token: 503 with Retry-After 1, then the real answer
        fcm.script(retried.token, [Reply(503, retry_after=1)])
    else:  # calls go to the PushKit token
        assert retried.voip_token is not None
        apns.script(retried.voip_token, ApnsReply(503, "ServiceUnavailable", headers={"retry-after": "1"}))
    for phone in (plain, retried, dead):
        await lab.asleep(phone)

    answered, after_retry, unreachable = await asyncio.gather(
        lab.callers.call("load0011", hold=0.2), lab.callers.call("load0012", hold=0.2),
        lab.callers.call("load0013"))

    for record in (answered, after_retry):
        assert record.outcome == "released-answered", record.as_dict()
        assert record.push_statuses[:3] == ["Alerting-Device", "Push-Notification-Sent", "Device-Making-Progress"]
    [push] = plain.pushes
    assert push.provider == push_type and push.is_call and push.push_id == answered.push_id
    assert push.call_id == answered.call_id and push.selector == plain.selector
    assert push.token == (plain.voip_token if push_type == "apns" else plain.token)
    assert [p.provider for p in retried.pushes] == [push_type]
    assert unreachable.outcome == "device-unreachable" and dead.pushes == []
    assert lab.core.service is not None and lab.core.delivery is not None
    instance = lab.core.service.get(dead.selector or "")
    assert instance is not None and instance.push.unreachable
    traces = {t.push_id: t for t in lab.core.delivery.traces.values()}
    assert after_retry.push_id is not None and answered.push_id is not None
    assert traces[after_retry.push_id].attempt == 2 and traces[after_retry.push_id].provider == push_type
    assert traces[answered.push_id].outcome == ACCEPTED and traces[answered.push_id].attempt == 1
    assert mediator.answers_by_provider[push_type] == {ACCEPTED: 2, TRANSIENT: 1, PERMANENT: 1}
    assert mediator.answers_by_provider["acrobits"] == {}
    if push_type == "apns":
        assert {r.headers["apns-push-type"] for r in apns.requests} == {"voip"}
    assert lab.core.calls is not None
    assert lab.core.calls.outcomes == {"released": 2, "push-rejected": 1}
