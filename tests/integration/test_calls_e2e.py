"""Incoming calls end to end, all real protocols on loopback:

sipp (caller) → Kamailio → the core holds the INVITE and pushes through a mediator-shaped HTTPS
server → a test app (our own SIP endpoint) gets the push, registers itself at Kamailio, reports
progress and ``active`` → the core removes its binding and answers 302 → Kamailio looks the user up
again and delivers the call to the app, which answers → the caller gets 200.

Also: caller CANCEL → 487 + missed-call push; T1 expiry (short timers) → 480; provider down → 480
after T1; dead token → 480 at once and the device marked unreachable; SIP MESSAGE → text push.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lab.kamailio import Kamailio, free_port
from lab.push_servers import MediatorServer, Received, Reply
from lab.sipp import arun_scenario
from sipis.config import parse_config
from sipis.core import Core
from sipis.sip.digest import Credentials
from sipis.sip.endpoint import EndpointSettings, IncomingRequest, SipEndpoint
from sipis.sip.message import Headers, Request, SipURI
from sipis.sip.register import Binding, register
from sipis.sip.transport import ListenSpec
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

ENROL = "e2e-enrol-token"
SDP = (b"v=0\r\no=app 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


@dataclass
class Lab:
    kam: Kamailio
    mediator: MediatorServer
    core: Core
    api: httpx.AsyncClient

    async def enrol_sleeping(self, user: str, password: str, token: str) -> tuple[str, str]:
        response = await self.api.post("/v1/instances", headers={"Authorization": f"Bearer {ENROL}"}, json={
            "account": {"aor": f"sip:{user}@{self.kam.domain}", "username": user, "password": password,
                        "registrar": f"sip:{self.kam.host}:{self.kam.udp_port};transport=tcp"},
            "push": {"provider": "mediator", "app_id": "com.example.phone", "token": token}})
        assert response.status_code == 201, response.text
        selector, bearer = response.json()["selector"], response.json()["token"]
        await self.put_state(selector, bearer, "inactive")
        await wait_for(lambda: any(c["contact"].startswith("sip:sipis-") and c["aor"] == user
                                   for c in self.kam.ul_dump()), what=f"{user} proxied")
        return selector, bearer

    async def put_state(self, selector: str, bearer: str, state: str, contact: str | None = None) -> None:
        body: dict[str, Any] = {"state": state}
        if contact:
            body["contact"] = contact
        response = await self.api.put(f"/v1/instances/{selector}/state", json=body,
                                      headers={"Authorization": f"Bearer {bearer}"})
        assert response.status_code == 200, response.text

    def pushes(self, verb: str | None = None) -> list[Received]:
        return [r for r in self.mediator.requests if verb is None or (r.json or {}).get("verb") == verb]



def make_config(tmp: Path, mediator: MediatorServer, *, wake: float = 20.0, answer: float = 20.0) -> Any:
    sip_port = free_port()
    return parse_config({
        "state_dir": str(tmp / "state"),
        "sip": {"listen": [f"udp:127.0.0.1:{sip_port}", f"tcp:127.0.0.1:{sip_port}"], "register_expires": 300},
        "api": {"listen": "127.0.0.1:0", "enroll_tokens": [ENROL]},
        "calls": {"wake_timeout": wake, "answer_timeout": answer},
        "push": {"mediator": {"type": "acrobits", "url": mediator.send_url, "ca_file": str(mediator.ca_file),
                              "timeout": 2}},
    }, tmp)


async def start_lab(tmp_path: Path, **timers: float) -> AsyncIterator[Lab]:
    with Kamailio() as kam:
        mediator = MediatorServer(tmp_path / "mediator")
        await mediator.start()
        core = Core(make_config(tmp_path, mediator, **timers))
        listening = await core.start()
        assert listening.api_url is not None
        trust = ssl.create_default_context(cafile=str(tmp_path / "state" / "api-tls.crt"))
        api = httpx.AsyncClient(base_url=listening.api_url, verify=trust, timeout=10)
        try:
            yield Lab(kam, mediator, core, api)
        finally:
            await api.aclose()  # first: an open keep-alive connection would hold up the API's shutdown
            await core.stop()
            await mediator.stop()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async for value in start_lab(tmp_path):
        yield value


@pytest.fixture
async def short_lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async for value in start_lab(tmp_path, wake=1.5, answer=1.5):
        yield value


class WokenApp:
    """The woken phone: registers itself at Kamailio over UDP and answers the call with 200."""

    def __init__(self, kam: Kamailio, user: str, password: str) -> None:
        self.kam, self.user, self.password = kam, user, password
        self.endpoint = SipEndpoint(EndpointSettings(listen=[ListenSpec.parse("udp:127.0.0.1:0")]))
        self.invites: list[Request] = []
        self.binding: Binding | None = None

    async def start(self) -> None:
        await self.endpoint.start()
        self.endpoint.handlers["INVITE"] = self._answer
        self.endpoint.handlers["BYE"] = lambda incoming: incoming.respond(200)

    def _answer(self, incoming: IncomingRequest) -> None:
        self.invites.append(incoming.request)
        contact = f"<sip:{self.user}@{incoming.flow.local[0]}:{incoming.flow.local[1]}>"
        incoming.respond(200, headers=[("Contact", contact), ("Content-Type", "application/sdp")], body=SDP)

    async def register(self) -> str:
        flow = await self.endpoint.transport.flow_to("udp", self.kam.host, self.kam.udp_port)
        self.binding = Binding(aor=SipURI.parse(f"sip:{self.user}@{self.kam.domain}"),
                               registrar=SipURI.parse(f"sip:{self.kam.host}"),
                               credentials=Credentials(self.user, self.password), contact_user=f"{self.user}-app")
        result = await register(self.endpoint, self.binding, flow, 300)
        assert result.ok, result.detail
        assert self.binding.contact_uri is not None
        return self.binding.contact_uri

    async def close(self) -> None:
        await self.endpoint.close()


async def test_woken_app_gets_the_call_and_the_caller_hears_200(lab: Lab) -> None:
    selector, bearer = await lab.enrol_sleeping("alice", "alicepw", "token-alice")
    app = WokenApp(lab.kam, "alice", "alicepw")
    await app.start()
    try:
        caller = asyncio.ensure_future(arun_scenario("uac_answered.xml", lab.kam.target("udp"), service="alice",
                                                     timeout=30))
        await wait_for(lambda: bool(lab.pushes("NotifyIncomingCall")), what="the call push")
        push = lab.pushes("NotifyIncomingCall")[0].json
        assert push["AppId"] == "com.example.phone" and push["DeviceToken"] == "token-alice"
        assert push["Selector"] == selector and push["Id"]
        push_id = push["Id"]

        contact = await app.register()  # the app woke up and registers itself
        progress = await lab.api.post(f"/v1/instances/{selector}/calls/{push_id}/progress",
                                      headers={"Authorization": f"Bearer {bearer}"})
        assert progress.status_code == 200 and progress.json()["stage"] == "Device-Making-Progress"
        await lab.put_state(selector, bearer, "active", contact)
        result = await caller
        assert result.ok, result.describe()
        assert len(app.invites) == 1  # Kamailio delivered the released call straight to the app
        statuses = [m.header("X-Sipis-Push-Status") for m in result.received(180)]
        assert "Alerting-Device" in statuses
        assert result.received(200)
        assert not any(c["contact"].startswith("sip:sipis-") for c in lab.kam.ul_dump())  # our binding is gone
        trace = lab.core.delivery.trace(push_id) if lab.core.delivery else None
        assert trace is not None and {"push_sent", "provider_accepted", "device_progress", "app_active",
                                      "released"} <= set(trace.stages)
    finally:
        await app.close()


async def test_caller_cancel_gives_487_and_a_missed_call_push(lab: Lab) -> None:
    await lab.enrol_sleeping("bob", "bobpw", "token-bob")
    result = await arun_scenario("uac_cancel.xml", lab.kam.target("udp"), service="bob", timeout=20)
    assert result.ok, result.describe()
    assert result.received(487)
    await wait_for(lambda: bool(lab.pushes("NotifyIncomingCallMissed")), what="missed-call push")
    assert lab.pushes("NotifyIncomingCallMissed")[0].json["DeviceToken"] == "token-bob"


async def test_no_wake_within_t1_gives_480_no_response_from_device(short_lab: Lab) -> None:
    await short_lab.enrol_sleeping("carol", "carolpw", "token-carol")
    result = await arun_scenario("uac_final.xml", short_lab.kam.target("udp"), service="carol", timeout=20)
    assert result.ok, result.describe()
    final = result.received(480)
    assert final and final[0].header("X-Sipis-Reason") == "No-Response-From-Device"


async def test_provider_down_still_ends_after_t1(short_lab: Lab) -> None:
    await short_lab.enrol_sleeping("dave", "davepw", "token-dave")
    await short_lab.mediator.stop()  # the push provider is unreachable
    result = await arun_scenario("uac_final.xml", short_lab.kam.target("udp"), service="dave", timeout=20)
    assert result.ok, result.describe()
    assert result.received(480)[0].header("X-Sipis-Reason") == "No-Response-From-Device"
    alarms = [c for c in short_lab.core.calls.recent] if short_lab.core.calls else []
    assert alarms and alarms[-1].trace.outcome == "rejected-transient"


async def test_dead_token_ends_the_call_and_marks_the_device_unreachable(lab: Lab) -> None:
    selector, bearer = await lab.enrol_sleeping("erin", "erinpw", "token-erin")
    lab.mediator.script("token-erin", [Reply(200, code=404)])
    result = await arun_scenario("uac_final.xml", lab.kam.target("udp"), service="erin", timeout=20)
    assert result.ok, result.describe()
    assert result.received(480)[0].header("X-Sipis-Reason") == "Device-Unreachable"
    state = await lab.api.get(f"/v1/instances/{selector}", headers={"Authorization": f"Bearer {bearer}"})
    assert state.json()["push"]["unreachable"] is True


async def test_sip_message_is_answered_and_pushed(lab: Lab) -> None:
    await lab.enrol_sleeping("frank", "frankpw", "token-frank")
    contact = next(c["contact"] for c in lab.kam.ul_dump() if c["aor"] == "frank")
    target = SipURI.parse(contact)
    sender = SipEndpoint(EndpointSettings(listen=[ListenSpec.parse("udp:127.0.0.1:0")]))
    await sender.start()
    try:
        flow = await sender.transport.flow_to("udp", lab.kam.host, lab.kam.udp_port)
        request = Request("MESSAGE", f"sip:frank@{lab.kam.domain}", Headers([
            ("From", f"<sip:bob@{lab.kam.domain}>;tag=m1"), ("To", f"<sip:frank@{lab.kam.domain}>"),
            ("Call-ID", "message-1"), ("CSeq", "1 MESSAGE"), ("Content-Type", "text/plain")]), b"lunch at noon?")
        sender.add_via(request, flow)
        response = await sender.request(request, flow)
        assert response.status == 200
        await wait_for(lambda: bool(lab.pushes("NotifyTextMessage")), what="text push")
        assert target.user is not None and target.user.startswith("sipis-")
    finally:
        await sender.close()


