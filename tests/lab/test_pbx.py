"""The lab PBX (`lab.pbx`) passes the registration and call tests that run against Kamailio.

Registration over UDP, TCP and TLS with MD5 and SHA-256 through our REGISTER client, 423 →
Min-Expires, wrong password, auth user ≠ To user, instance/reg-id replacement, ``Contact: *``,
expiry, nonce reuse; calls from sipp to a registered user that arrive over the registering flow
(180 with custom headers, 302/480, CANCEL → 487, an answered call whose ACK and BYE reach the
callee) and the 3xx retarget (once) that releases a held call to a freshly registered app.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from lab.pbx import LabPbx
from lab.sipp import arun_scenario
from sipis.sip.digest import Credentials, DigestSession, choose_challenge, parse_challenges
from sipis.sip.endpoint import EndpointSettings, IncomingRequest, SipEndpoint
from sipis.sip.message import Headers, Message, Request, Response, SipURI, new_call_id, new_tag
from sipis.sip.register import Binding, Outcome, RegisterResult, register
from sipis.sip.transport import Flow, ListenSpec, TlsSettings, TransportName
from tests.waiting import wait_for

TRANSPORTS: list[TransportName] = ["udp", "tcp", "tls"]
INSTANCE_A = '"<urn:uuid:00000000-0000-4000-8000-0000000000aa>"'
INSTANCE_B = '"<urn:uuid:00000000-0000-4000-8000-0000000000bb>"'
SDP = (b"v=0\r\no=app 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")

requires_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing (run scripts/test)")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(params=["MD5", "SHA-256"])
async def any_pbx(request: pytest.FixtureRequest) -> AsyncIterator[LabPbx]:
    async with LabPbx(algorithm=request.param) as pbx:
        yield pbx


@pytest.fixture
async def pbx() -> AsyncIterator[LabPbx]:
    async with LabPbx() as pbx:
        yield pbx


@pytest.fixture
async def relay_pbx() -> AsyncIterator[LabPbx]:
    """Like Kamailio with NO_RETARGET: a 3xx goes to the caller (what the binding said is visible)."""
    async with LabPbx(retarget=False) as pbx:
        yield pbx


class Phone:
    """Our SIP endpoint as a registered device: records what reaches it; answers INVITEs via ``answer``."""

    def __init__(self, pbx: LabPbx, user: str, password: str | None = None, *, transport: TransportName = "udp",
                 contact_user: str | None = None, instance: str | None = INSTANCE_A, reg_id: str | None = "1") -> None:
        self.pbx, self.user, self.transport = pbx, user, transport
        self.endpoint = SipEndpoint(EndpointSettings(listen=[ListenSpec.parse("udp:127.0.0.1:0")],
                                                     tls=TlsSettings(ca_file=str(pbx.ca_file))))
        params: dict[str, str | None] = {}
        if instance is not None:
            params["+sip.instance"] = instance
            if reg_id is not None:
                params["reg-id"] = reg_id
        self.binding = Binding(aor=SipURI.parse(pbx.aor(user)), registrar=SipURI.parse(f"sip:{pbx.host}"),
                               credentials=Credentials(user, password or pbx.users[user]), contact_params=params,
                               contact_user=contact_user or f"{user}-{transport}")
        self.invites: list[IncomingRequest] = []
        self.requests: list[Request] = []  # every other request (BYE, MESSAGE, ...)
        self.acks: list[Request] = []
        self.cancelled = asyncio.Event()
        self.answer: Callable[[IncomingRequest], object] = self.answer_200
        self.flow: Flow | None = None

    async def start(self) -> Phone:
        await self.endpoint.start()
        self.endpoint.handlers["INVITE"] = self._on_invite
        for method in ("BYE", "MESSAGE", "INFO", "OPTIONS"):
            self.endpoint.handlers[method] = self._on_other
        self._watch_acks()
        self.flow = await self.endpoint.transport.flow_to(self.transport, self.pbx.host, self.pbx.port(self.transport))
        return self

    def _watch_acks(self) -> None:
        """Record ACKs as they arrive (the endpoint absorbs them below any handler)."""

        def on_message(direction: str, message: Message, _flow: Flow) -> None:
            if direction == "in" and isinstance(message, Request) and message.method == "ACK":
                self.acks.append(message)

        self.endpoint.observers.append(on_message)

    async def register(self, expires: int = 300) -> RegisterResult:
        assert self.flow is not None
        return await register(self.endpoint, self.binding, self.flow, expires)

    @property
    def contact(self) -> str:
        assert self.binding.contact_uri is not None
        return self.binding.contact_uri

    def _on_invite(self, incoming: IncomingRequest) -> None:
        self.invites.append(incoming)
        incoming.on_cancel(lambda _cancel: self.cancelled.set())
        self.answer(incoming)

    def _on_other(self, incoming: IncomingRequest) -> None:
        self.requests.append(incoming.request)
        incoming.respond(200)

    def answer_200(self, incoming: IncomingRequest) -> None:
        incoming.respond(180)
        incoming.respond(200, headers=[("Contact", f"<{self.contact}>"), ("Content-Type", "application/sdp")],
                         body=SDP)

    async def close(self) -> None:
        await self.endpoint.close()


@pytest.fixture
async def phones() -> AsyncIterator[Callable[..., Phone]]:
    made: list[Phone] = []

    def make(*args: object, **kwargs: object) -> Phone:
        phone = Phone(*args, **kwargs)  # type: ignore[arg-type]
        made.append(phone)
        return phone

    yield make
    for phone in made:
        await phone.close()


@dataclass
class Caller:
    """Our endpoint as a caller (for cases sipp's scenarios do not cover)."""

    pbx: LabPbx
    endpoint: SipEndpoint
    provisionals: list[Response] = field(default_factory=list)

    async def send(self, method: str, uri: str, *, to_user: str = "bob", body: bytes = b"",
                   transport: TransportName = "udp") -> Response:
        flow = await self.endpoint.transport.flow_to(transport, self.pbx.host, self.pbx.port(transport))
        headers = Headers([
            ("From", f"<sip:caller@{self.pbx.domain}>;tag={new_tag()}"), ("To", f"<sip:{to_user}@{self.pbx.domain}>"),
            ("Call-ID", new_call_id()), ("CSeq", f"1 {method}"),
            ("Contact", f"<sip:caller@{flow.local[0]}:{flow.local[1]}>"),
        ])
        if body:
            headers.add("Content-Type", "text/plain" if method == "MESSAGE" else "application/sdp")
        request = Request(method, uri, headers, body)
        self.endpoint.add_via(request, flow)
        return await self.endpoint.request(request, flow, on_provisional=self.provisionals.append)

    async def invite(self, user: str) -> Response:
        return await self.send("INVITE", f"sip:{user}@{self.pbx.host}:{self.pbx.udp_port}", to_user=user, body=SDP)


@pytest.fixture
async def caller(pbx: LabPbx) -> AsyncIterator[Caller]:
    endpoint = SipEndpoint(EndpointSettings(listen=[ListenSpec.parse("udp:127.0.0.1:0")]))
    await endpoint.start()
    yield Caller(pbx, endpoint)
    await endpoint.close()



async def raw_register(phone: Phone, headers: list[tuple[str, str]], *, call_id: str, cseq: int,
                       authorization: str | None = None) -> Response:
    """One REGISTER with hand-made headers (``Contact: *``, reused nonces) from ``phone``."""
    assert phone.flow is not None
    aor = phone.pbx.aor(phone.user)
    request = Request("REGISTER", f"sip:{phone.pbx.domain}", Headers([
        ("From", f"<{aor}>;tag={new_tag()}"), ("To", f"<{aor}>"), ("Call-ID", call_id), ("CSeq", f"{cseq} REGISTER"),
        *headers,
    ]))
    if authorization is not None:
        request.headers.add("Authorization", authorization)
    phone.endpoint.add_via(request, phone.flow)
    return await phone.endpoint.request(request, phone.flow)


# --------------------------------------------------------------------------- registrar


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_register_refresh_and_unregister(any_pbx: LabPbx, phones: Callable[..., Phone],
                                               transport: TransportName) -> None:
    phone = await phones(any_pbx, "alice", transport=transport, contact_user=f"reg-{transport}").start()
    first = await phone.register(300)
    assert first.outcome is Outcome.REGISTERED, first.detail
    assert first.expires == 300
    assert any_pbx.stats["challenged"] == 1
    dump = any_pbx.ul_dump()
    assert len(dump) == 1 and f"reg-{transport}@" in dump[0]["contact"]
    assert dump[0]["aor"] == "alice"
    assert dump[0]["instance"] == "<urn:uuid:00000000-0000-4000-8000-0000000000aa>"
    assert dump[0]["reg_id"] == 1
    assert phone.flow is not None
    if transport != "udp":  # the registrar keeps our connection as the way back (received=)
        assert dump[0]["received"] is not None and str(phone.flow.local[1]) in dump[0]["received"]
    binding_id = any_pbx.bindings("alice")[0].id

    cseq_before = phone.binding.cseq
    refresh = await phone.register(300)
    assert refresh.outcome is Outcome.REGISTERED
    assert phone.binding.cseq > cseq_before  # same Call-ID, rising CSeq
    assert [b.id for b in any_pbx.bindings("alice")] == [binding_id]  # the same binding, refreshed

    removal = await phone.register(0)
    assert removal.outcome is Outcome.REGISTERED
    assert any_pbx.registered_contacts("alice") == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_interval_too_brief_retries_with_min_expires(pbx: LabPbx, phones: Callable[..., Phone],
                                                          transport: TransportName) -> None:
    phone = await phones(pbx, "bob", transport=transport).start()
    result = await phone.register(30)
    assert result.outcome is Outcome.REGISTERED, result.detail
    assert result.expires == 60  # Min-Expires
    assert pbx.ul_dump()[0]["expires"] == 60


async def test_expiry_above_max_is_lowered(pbx: LabPbx, phones: Callable[..., Phone]) -> None:
    phone = await phones(pbx, "bob").start()
    result = await phone.register(7200)
    assert result.ok and result.expires == 3600


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_wrong_password_is_unauthorized_without_looping(pbx: LabPbx, phones: Callable[..., Phone],
                                                             transport: TransportName) -> None:
    phone = await phones(pbx, "carol", "not-carols-password", transport=transport).start()
    result = await phone.register(300)
    assert result.outcome is Outcome.UNAUTHORIZED
    assert result.status == 401
    assert phone.binding.cseq == 2  # one unauthenticated try, one answer to the challenge, then stop
    assert pbx.registered_contacts("carol") == []


async def test_auth_user_other_than_to_user_is_forbidden(pbx: LabPbx, phones: Callable[..., Phone]) -> None:
    phone = await phones(pbx, "alice").start()
    phone.binding.credentials = Credentials("bob", "bobpw")
    phone.binding.digest = DigestSession(phone.binding.credentials)
    result = await phone.register(300)
    assert result.outcome is Outcome.UNAUTHORIZED and result.status == 403
    assert pbx.ul_dump() == []


async def test_load_users_share_one_password(pbx: LabPbx, phones: Callable[..., Phone]) -> None:
    phone = await phones(pbx, "load00042", "loadpw").start()
    assert (await phone.register(300)).ok
    assert pbx.registered_contacts("load00042")


async def test_same_instance_and_reg_id_replace_the_binding(pbx: LabPbx, phones: Callable[..., Phone]) -> None:
    first = await phones(pbx, "dave", contact_user="dave-one").start()
    assert (await first.register(300)).ok
    second = await phones(pbx, "dave", contact_user="dave-two", transport="tcp").start()  # new Call-ID too
    result = await second.register(300)
    assert result.ok
    contacts = pbx.registered_contacts("dave")
    assert len(contacts) == 1 and "dave-two@" in contacts[0]
    assert result.response is not None and len(result.response.contacts) == 1

    other_reg_id = await phones(pbx, "dave", contact_user="dave-three", reg_id="2").start()
    assert (await other_reg_id.register(300)).ok
    other_instance = await phones(pbx, "dave", contact_user="dave-four", instance=INSTANCE_B).start()
    assert (await other_instance.register(300)).ok
    no_instance = await phones(pbx, "dave", contact_user="dave-five", instance=None).start()
    assert (await no_instance.register(300)).ok
    assert len(pbx.registered_contacts("dave")) == 4
    before = {b.contact: b.id for b in pbx.bindings("dave")}
    no_instance.binding.call_id = new_call_id()  # the same contact URI from another registration
    assert (await no_instance.register(300)).ok
    after = {b.contact: b.id for b in pbx.bindings("dave")}
    assert after.keys() == before.keys()
    assert after[no_instance.contact] != before[no_instance.contact]  # replaced, not added


async def test_star_removes_every_binding(pbx: LabPbx, phones: Callable[..., Phone]) -> None:
    one = await phones(pbx, "erin", contact_user="erin-one").start()
    two = await phones(pbx, "erin", contact_user="erin-two", instance=INSTANCE_B).start()
    assert (await one.register(300)).ok and (await two.register(300)).ok
    assert len(pbx.registered_contacts("erin")) == 2
    call_id = new_call_id()
    star = [("Contact", "*"), ("Expires", "0")]
    challenge_response = await raw_register(one, star, call_id=call_id, cseq=1)
    assert challenge_response.status == 401
    challenge = choose_challenge(parse_challenges(challenge_response.headers.get_all("WWW-Authenticate")))
    assert challenge is not None and challenge.algorithm == "MD5"
    session = DigestSession(Credentials("erin", "erinpw"))
    authorization = session.authorize(challenge, "REGISTER", f"sip:{pbx.domain}")
    ok = await raw_register(one, star, call_id=call_id, cseq=2, authorization=authorization)
    assert ok.status == 200 and ok.contacts == []
    assert pbx.registered_contacts("erin") == []


async def test_nonce_reuse_is_accepted(pbx: LabPbx, phones: Callable[..., Phone]) -> None:
    phone = await phones(pbx, "frank").start()
    assert phone.flow is not None
    call_id, contact = new_call_id(), [("Contact", f"<sip:frank@{phone.flow.local[0]}:{phone.flow.local[1]}>")]
    first = await raw_register(phone, contact, call_id=call_id, cseq=1)
    challenge = choose_challenge(parse_challenges(first.headers.get_all("WWW-Authenticate")))
    assert challenge is not None
    session = DigestSession(Credentials("frank", "frankpw"))
    for cseq in (2, 3, 4):  # nc=1, 2, 3 on the same nonce: no new challenge
        authorization = session.authorize(challenge, "REGISTER", f"sip:{pbx.domain}")
        response = await raw_register(phone, contact, call_id=call_id, cseq=cseq, authorization=authorization)
        assert response.status == 200, response
    replay = await raw_register(phone, contact, call_id=call_id, cseq=5, authorization=authorization)
    assert replay.status == 200  # the same nc again is accepted too
    stale = await raw_register(phone, contact, call_id=call_id, cseq=6,
                               authorization=authorization.replace(challenge.nonce, "not-our-nonce"))
    assert stale.status == 401  # a nonce we never gave out


async def test_expired_nonce_gets_a_stale_challenge(pbx: LabPbx, phones: Callable[..., Phone]) -> None:
    phone = await phones(pbx, "frank").start()
    assert phone.flow is not None
    call_id, contact = new_call_id(), [("Contact", f"<sip:frank@{phone.flow.local[0]}:{phone.flow.local[1]}>")]
    first = await raw_register(phone, contact, call_id=call_id, cseq=1)
    challenge = choose_challenge(parse_challenges(first.headers.get_all("WWW-Authenticate")))
    assert challenge is not None
    pbx.nonces.lifetime = 0.0
    authorization = DigestSession(Credentials("frank", "frankpw")).authorize(challenge, "REGISTER",
                                                                            f"sip:{pbx.domain}")
    response = await raw_register(phone, contact, call_id=call_id, cseq=2, authorization=authorization)
    assert response.status == 401
    again = choose_challenge(parse_challenges(response.headers.get_all("WWW-Authenticate")))
    assert again is not None and again.stale and again.nonce != challenge.nonce


async def test_binding_expires_on_time() -> None:
    async with LabPbx(min_expires=1) as pbx:
        phone = Phone(pbx, "alice")
        await phone.start()
        try:
            events: list[str] = []
            pbx.location.listeners.append(lambda kind, _binding: events.append(kind))
            assert (await phone.register(1)).ok
            assert pbx.registered_contacts("alice")
            await wait_for(lambda: "expired" in events, timeout=3)
            assert pbx.ul_dump() == []
        finally:
            await phone.close()


# --------------------------------------------------------------------------- routing (our endpoint as caller)


async def test_unknown_user_404_unregistered_480_options_200(pbx: LabPbx, caller: Caller) -> None:
    assert (await caller.invite("nobody")).status == 404
    assert (await caller.invite("bob")).status == 480
    options = await caller.send("OPTIONS", f"sip:{pbx.host}:{pbx.udp_port}")
    assert options.status == 200 and "INVITE" in (options.headers.get("Allow") or "")


async def test_message_is_routed_to_the_binding(pbx: LabPbx, caller: Caller, phones: Callable[..., Phone]) -> None:
    phone = await phones(pbx, "bob", transport="tls").start()
    assert (await phone.register(300)).ok
    response = await caller.send("MESSAGE", f"sip:bob@{pbx.host}", body=b"lunch at noon?")
    assert response.status == 200
    assert [r.body for r in phone.requests] == [b"lunch at noon?"]
    assert phone.requests[0].uri == phone.contact  # the Request-URI is the registered contact


async def test_parallel_fork_first_2xx_wins_and_cancels_the_other(pbx: LabPbx, caller: Caller,
                                                                  phones: Callable[..., Phone]) -> None:
    ringing = await phones(pbx, "carol", contact_user="carol-desk", transport="tcp").start()
    answering = await phones(pbx, "carol", contact_user="carol-mobile", instance=INSTANCE_B).start()
    ringing.answer = lambda incoming: incoming.respond(180)
    assert (await ringing.register(300)).ok and (await answering.register(300)).ok
    response = await caller.invite("carol")
    assert response.status == 200
    assert "carol-mobile@" in (response.headers.get("Contact") or "")
    await asyncio.wait_for(ringing.cancelled.wait(), 5)
    assert ringing.invites[0].final_status == 487


async def test_invite_timeout_cancels_and_answers_408(phones: Callable[..., Phone]) -> None:
    async with LabPbx(invite_timeout=0.5) as pbx:
        endpoint = SipEndpoint(EndpointSettings(listen=[ListenSpec.parse("udp:127.0.0.1:0")]))
        await endpoint.start()
        try:
            phone = await phones(pbx, "dave").start()
            phone.answer = lambda incoming: incoming.respond(180)
            assert (await phone.register(300)).ok
            caller = Caller(pbx, endpoint)
            response = await caller.invite("dave")
            assert response.status == 408
            assert [r.status for r in caller.provisionals] == [100, 180]  # our 100, the phone's 180
            await asyncio.wait_for(phone.cancelled.wait(), 5)
        finally:
            await endpoint.close()


async def test_retarget_happens_once(pbx: LabPbx, caller: Caller, phones: Callable[..., Phone]) -> None:
    """A 3xx from the second round goes to the caller: no loop, nobody rung twice."""
    first = await phones(pbx, "erin", contact_user="erin-sipis").start()
    second = await phones(pbx, "erin", contact_user="erin-app", instance=INSTANCE_B).start()

    tasks: list[asyncio.Future[None]] = []

    def redirect_after_second_registers(incoming: IncomingRequest) -> None:
        async def later() -> None:
            assert (await second.register(300)).ok
            incoming.respond(302, headers=[("Contact", f"<{second.contact}>")])

        tasks.append(asyncio.ensure_future(later()))

    first.answer = redirect_after_second_registers
    second.answer = lambda incoming: incoming.respond(302, headers=[("Contact", "<sip:elsewhere@127.0.0.1:9>")])
    assert (await first.register(300)).ok
    response = await caller.invite("erin")
    assert response.status == 302
    assert "elsewhere@" in (response.headers.get("Contact") or "")
    assert len(first.invites) == 1 and len(second.invites) == 1
    assert pbx.stats["retarget"] == 1
    await asyncio.gather(*tasks)


async def test_retarget_with_nobody_new_gives_480(pbx: LabPbx, caller: Caller, phones: Callable[..., Phone]) -> None:
    sipis = await phones(pbx, "frank", contact_user="frank-sipis").start()
    sipis.answer = lambda incoming: incoming.respond(302, headers=[("Contact", f"<{pbx.aor('frank')}>")])
    assert (await sipis.register(300)).ok
    response = await caller.invite("frank")
    assert response.status == 480
    assert len(sipis.invites) == 1


# --------------------------------------------------------------------------- calls from sipp


@dataclass
class CallRecorder:
    """An INVITE handler that answers like a SIPIS: 180 with push status, then a final answer."""

    final: int
    flows: list[Flow] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    hold: bool = False

    def __call__(self, incoming: IncomingRequest) -> None:
        self.flows.append(incoming.flow)
        self.uris.append(incoming.request.uri)
        incoming.respond(180, headers=[("X-Sipis-Push-Status", "Alerting-Device"), ("X-Push-ID", "p-1")])
        if self.hold:
            return  # wait for the caller's CANCEL
        if self.final == 302:
            incoming.respond(302, headers=[("Contact", "<sip:alice-app@127.0.0.1:5999>"),
                                           ("X-Sipis-Reason", "Released-To-App")])
        else:
            incoming.respond(480, headers=[("X-Sipis-Reason", "No-Response-From-Device")])


@pytest.mark.integration
@requires_sipp
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("final", [302, 480])
async def test_call_arrives_on_the_registering_flow_and_gets_the_final_answer(
        relay_pbx: LabPbx, phones: Callable[..., Phone], transport: TransportName, final: int) -> None:
    pbx = relay_pbx
    phone = await phones(pbx, "dave", transport=transport, contact_user=f"call-{transport}").start()
    assert (await phone.register(300)).ok
    recorder = CallRecorder(final)
    phone.answer = recorder
    result = await arun_scenario("uac_final.xml", pbx.target("udp"), service="dave", timeout=15)
    assert result.ok, result.describe()
    assert len(recorder.flows) == 1
    arrived = recorder.flows[0]
    assert arrived.transport == transport
    assert phone.flow is not None and arrived.local == phone.flow.local  # back over our REGISTER's flow
    assert recorder.uris == [phone.contact]
    ringing = result.received(180)
    assert ringing and ringing[0].header("X-Sipis-Push-Status") == "Alerting-Device"
    assert ringing[0].header("X-Push-ID") == "p-1"
    finals = result.received(final)
    assert finals, result.describe()
    if final == 302:
        assert "alice-app@127.0.0.1:5999" in (finals[0].header("Contact") or "")
        assert finals[0].header("X-Sipis-Reason") == "Released-To-App"
    else:
        assert finals[0].header("X-Sipis-Reason") == "No-Response-From-Device"


@pytest.mark.integration
@requires_sipp
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_caller_cancel_gets_487_and_cancels_the_branch(pbx: LabPbx, phones: Callable[..., Phone],
                                                             transport: TransportName) -> None:
    phone = await phones(pbx, "erin", transport=transport).start()
    assert (await phone.register(300)).ok
    phone.answer = CallRecorder(final=0, hold=True)
    result = await arun_scenario("uac_cancel.xml", pbx.target("udp"), service="erin", timeout=15)
    assert result.ok, result.describe()
    assert result.received(487)
    await asyncio.wait_for(phone.cancelled.wait(), 5)  # our CANCEL reached the branch
    assert phone.invites[0].final_status == 487


@pytest.mark.integration
@requires_sipp
@pytest.mark.parametrize("caller_transport", ["udp", "tcp"])
async def test_answered_call_ack_and_bye_reach_the_callee(pbx: LabPbx, phones: Callable[..., Phone],
                                                          caller_transport: str) -> None:
    phone = await phones(pbx, "alice", transport="tcp").start()
    assert (await phone.register(300)).ok
    result = await arun_scenario("uac_answered.xml", pbx.target(caller_transport), service="alice",
                                 transport=caller_transport, timeout=15)
    assert result.ok, result.describe()
    assert result.received(200, "INVITE") and result.received(200, "BYE")
    assert len(phone.invites) == 1
    await wait_for(lambda: bool(phone.acks))
    assert [r.method for r in phone.requests] == ["BYE"]
    assert pbx.stats["ack_forwarded"] == 1


@pytest.mark.integration
@requires_sipp
async def test_3xx_from_the_sipis_binding_reaches_the_fresh_app_binding(pbx: LabPbx,
                                                                        phones: Callable[..., Phone]) -> None:
    """The held-call release: the SIPIS rings, the app registers, the SIPIS leaves and answers 302."""
    sipis = await phones(pbx, "alice", transport="tcp", contact_user="sipis-0001").start()
    app = await phones(pbx, "alice", contact_user="alice-app", instance=None).start()
    assert (await sipis.register(300)).ok

    tasks: list[asyncio.Future[None]] = []

    def hold_then_release(incoming: IncomingRequest) -> None:
        incoming.respond(180, headers=[("X-Sipis-Push-Status", "Alerting-Device")])

        async def release() -> None:
            assert (await app.register(300)).ok  # the woken app registers itself
            assert (await sipis.register(0)).ok  # the SIPIS removes only its own binding
            incoming.respond(302, headers=[("Contact", f"<{app.contact}>"), ("X-Sipis-Reason", "Released-To-App")])

        tasks.append(asyncio.ensure_future(release()))

    sipis.answer = hold_then_release
    result = await arun_scenario("uac_answered.xml", pbx.target("udp"), service="alice", timeout=15)
    assert result.ok, result.describe()
    assert [m.header("X-Sipis-Push-Status") for m in result.received(180)][:1] == ["Alerting-Device"]
    assert result.received(200, "INVITE")
    assert not result.received(302)  # the 3xx stayed inside the PBX
    assert len(sipis.invites) == 1 and len(app.invites) == 1
    assert app.invites[0].request.uri == app.contact
    await wait_for(lambda: bool(app.acks))
    assert [r.method for r in app.requests] == ["BYE"]
    assert pbx.stats["retarget"] == 1
    assert not any(c["contact"].startswith("sip:sipis-") for c in pbx.ul_dump())
    await asyncio.gather(*tasks)  # the release itself went through without errors

