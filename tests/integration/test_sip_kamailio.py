"""Our SIP layer against a real Kamailio (registrar + proxy) and real sipp callers.

Covers, over UDP, TCP and TLS: register with MD5 and SHA-256 digest, refresh, 423 → Min-Expires,
wrong password → unauthorized, and calls from sipp through Kamailio that arrive on the flow our
REGISTER opened and are answered 180 (custom headers) then 302 or 480; caller CANCEL → 487.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest

from lab.kamailio import Kamailio
from lab.sipp import arun_scenario
from sipis.sip.digest import Credentials
from sipis.sip.endpoint import EndpointSettings, IncomingRequest, SipEndpoint
from sipis.sip.message import SipURI
from sipis.sip.register import Binding, Outcome, register
from sipis.sip.transport import Flow, ListenSpec, TlsSettings

pytestmark = pytest.mark.integration

TRANSPORTS = ["udp", "tcp", "tls"]


@pytest.fixture(scope="module", params=["MD5", "SHA-256"])
def kamailio(request: pytest.FixtureRequest) -> Iterator[Kamailio]:
    """Registration tests run against both digest algorithms."""
    defines = ["AUTH_SHA256"] if request.param == "SHA-256" else []
    with Kamailio(defines=defines) as kam:
        yield kam


@pytest.fixture(scope="module")
def call_kamailio() -> Iterator[Kamailio]:
    """Call routing does not depend on the digest algorithm: one MD5 registrar serves the call tests.

    NO_RETARGET: these tests look at what our layer answers, so Kamailio relays a 3xx to the caller
    instead of looking the AOR up again (the retarget path is exercised by the end-to-end call tests).
    """
    with Kamailio(defines=["NO_RETARGET"]) as kam:
        yield kam


async def start_endpoint(kam: Kamailio) -> SipEndpoint:
    settings = EndpointSettings(listen=[ListenSpec.parse("udp:127.0.0.1:0")],
                                tls=TlsSettings(ca_file=str(kam.ca_file)))
    ep = SipEndpoint(settings)
    await ep.start()
    return ep


@pytest.fixture
async def endpoint(kamailio: Kamailio) -> AsyncIterator[SipEndpoint]:
    ep = await start_endpoint(kamailio)
    yield ep
    await ep.close()


@pytest.fixture
async def call_endpoint(call_kamailio: Kamailio) -> AsyncIterator[SipEndpoint]:
    ep = await start_endpoint(call_kamailio)
    yield ep
    await ep.close()


def registrar_port(kam: Kamailio, transport: str) -> int:
    return kam.tls_port if transport == "tls" else kam.udp_port


def make_binding(kam: Kamailio, user: str, password: str, contact_user: str) -> Binding:
    return Binding(
        aor=SipURI.parse(f"sip:{user}@{kam.domain}"),
        registrar=SipURI.parse(f"sip:{kam.host}"),
        credentials=Credentials(user, password),
        contact_params={"+sip.instance": '"<urn:uuid:00000000-0000-4000-8000-0000000000aa>"', "reg-id": "1"},
        contact_user=contact_user,
    )


async def flow_to(ep: SipEndpoint, kam: Kamailio, transport: str) -> Flow:
    return await ep.transport.flow_to(transport, kam.host, registrar_port(kam, transport))  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_register_refresh_and_unregister(kamailio: Kamailio, endpoint: SipEndpoint, transport: str) -> None:
    flow = await flow_to(endpoint, kamailio, transport)
    binding = make_binding(kamailio, "alice", "alicepw", f"reg-{transport}")

    first = await register(endpoint, binding, flow, 300)
    assert first.outcome is Outcome.REGISTERED, first.detail
    assert first.expires == 300
    challenge = first.response
    assert challenge is not None
    contacts = kamailio.registered_contacts("alice")
    assert any(f"reg-{transport}@" in c for c in contacts), contacts
    dump = [c for c in kamailio.ul_dump() if f"reg-{transport}@" in c["contact"]]
    assert dump and dump[0]["instance"] == "<urn:uuid:00000000-0000-4000-8000-0000000000aa>"
    assert dump[0]["reg_id"] == 1
    if transport != "udp":  # the registrar keeps our connection as the way back (received=)
        assert dump[0]["received"] is not None and str(flow.local[1]) in dump[0]["received"]

    cseq_before = binding.cseq
    refresh = await register(endpoint, binding, flow, 300)
    assert refresh.outcome is Outcome.REGISTERED
    assert binding.cseq > cseq_before  # same Call-ID, rising CSeq

    removal = await register(endpoint, binding, flow, 0)
    assert removal.outcome is Outcome.REGISTERED
    assert not any(f"reg-{transport}@" in c for c in kamailio.registered_contacts("alice"))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_interval_too_brief_retries_with_min_expires(kamailio: Kamailio, endpoint: SipEndpoint,
                                                          transport: str) -> None:
    flow = await flow_to(endpoint, kamailio, transport)
    binding = make_binding(kamailio, "bob", "bobpw", f"brief-{transport}")
    result = await register(endpoint, binding, flow, 30)
    assert result.outcome is Outcome.REGISTERED, result.detail
    assert result.expires == 60  # Kamailio's Min-Expires
    await register(endpoint, binding, flow, 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_wrong_password_is_unauthorized_without_looping(kamailio: Kamailio, endpoint: SipEndpoint,
                                                             transport: str) -> None:
    flow = await flow_to(endpoint, kamailio, transport)
    binding = make_binding(kamailio, "carol", "not-carols-password", f"bad-{transport}")
    result = await register(endpoint, binding, flow, 300)
    assert result.outcome is Outcome.UNAUTHORIZED
    assert result.status == 401
    assert binding.cseq == 2  # one unauthenticated try, one answer to the challenge, then stop
    assert kamailio.registered_contacts("carol") == []


@dataclass
class CallRecorder:
    """An INVITE handler that answers like a SIPIS: 180 with push status, then a final answer."""

    final: int
    flows: list[Flow] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    hold: bool = False

    def __call__(self, incoming: IncomingRequest) -> None:
        self.flows.append(incoming.flow)
        incoming.respond(180, headers=[("X-Sipis-Push-Status", "Alerting-Device"), ("X-Push-ID", "p-1")])
        incoming.on_cancel(lambda _cancel: self.cancelled.set())
        if self.hold:
            return  # wait for the caller's CANCEL
        # The final answer a moment later, as a SIPIS gives it (never in the same instant as the
        # 180): two datagrams sent back to back may be relayed out of order by Kamailio's parallel
        # UDP workers, and the caller would then miss the 180.
        asyncio.get_running_loop().call_later(0.05, self._answer, incoming)

    def _answer(self, incoming: IncomingRequest) -> None:
        if self.final == 302:
            incoming.respond(302, headers=[("Contact", "<sip:alice-app@127.0.0.1:5999>"),
                                           ("X-Sipis-Reason", "Released-To-App")])
        else:
            incoming.respond(480, headers=[("X-Sipis-Reason", "No-Response-From-Device")])


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("final", [302, 480])
async def test_call_arrives_on_our_flow_and_gets_final_answer(call_kamailio: Kamailio, call_endpoint: SipEndpoint,
                                                              transport: str, final: int) -> None:
    kamailio, endpoint = call_kamailio, call_endpoint
    flow = await flow_to(endpoint, kamailio, transport)
    user = "dave"
    binding = make_binding(kamailio, user, "davepw", f"call-{transport}")
    assert (await register(endpoint, binding, flow, 300)).ok
    recorder = CallRecorder(final)
    endpoint.handlers["INVITE"] = recorder
    try:
        result = await arun_scenario("uac_final.xml", f"{kamailio.host}:{kamailio.udp_port}",
                                     service=user, timeout=20)
    finally:
        await register(endpoint, binding, flow, 0)
    assert result.ok, result.describe()
    assert len(recorder.flows) == 1
    arrived = recorder.flows[0]
    assert arrived.transport == transport
    assert arrived.local == flow.local  # the INVITE came back over the flow our REGISTER used
    ringing = result.received(180)
    assert ringing and ringing[0].header("X-Sipis-Push-Status") == "Alerting-Device"
    finals = result.received(final)
    assert finals, result.describe()
    if final == 302:
        assert "alice-app@127.0.0.1:5999" in (finals[0].header("Contact") or "")
    else:
        assert finals[0].header("X-Sipis-Reason") == "No-Response-From-Device"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_caller_cancel_gets_487(call_kamailio: Kamailio, call_endpoint: SipEndpoint, transport: str) -> None:
    kamailio, endpoint = call_kamailio, call_endpoint
    flow = await flow_to(endpoint, kamailio, transport)
    user = "erin"
    binding = make_binding(kamailio, user, "erinpw", f"cancel-{transport}")
    assert (await register(endpoint, binding, flow, 300)).ok
    recorder = CallRecorder(final=0, hold=True)
    endpoint.handlers["INVITE"] = recorder
    try:
        result = await arun_scenario("uac_cancel.xml", f"{kamailio.host}:{kamailio.udp_port}",
                                     service=user, timeout=20)
    finally:
        await register(endpoint, binding, flow, 0)
    assert result.ok, result.describe()
    assert recorder.cancelled.is_set()
    assert result.received(487)
