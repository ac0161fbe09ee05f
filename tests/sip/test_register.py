"""The REGISTER exchange: the pure machine driven by hand (no event loop), the REGISTER it writes,
and register() against a scripted registrar on loopback: the digest rounds, credentials offered
again on a refresh (one transaction instead of two) and every way back to the challenge flow, the
next nc on a retry after 423, cancellation.

The registrar is a SipEndpoint with a REGISTER handler that checks digest with the lab's server
side (``lab.digest_server``); what it does with nonces is up to each test.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from lab.digest_server import AuthorizationParams, make_challenge, verify_authorization
from sipis.clock import FakeClock
from sipis.sip.digest import Challenge, Credentials, DigestError, DigestSession, _NonceState
from sipis.sip.endpoint import EndpointSettings, IncomingRequest, SipEndpoint
from sipis.sip.message import Request, Response, SipURI, _Message, make_response, parse_message
from sipis.sip.register import Binding, Outcome, RegisterExchange, RegisterResult, build_register, register
from sipis.sip.transport import Flow, ListenSpec, TransportName
from sipis.timers import FakeTimers
from tests.sip.test_transport import HOST, WAIT
from tests.waiting import wait_for

REALM = "example.test"
PASSWORD = "s3cret"


@dataclass
class Seen:
    """One REGISTER as the registrar saw it."""

    cseq: int
    nonce: str | None  # of its credentials, None without
    nc: str | None
    answer: int


@dataclass
class Registrar:
    """Challenges, checks credentials, and answers 200 (or what ``script`` says first)."""

    endpoint: SipEndpoint
    nonces: set[str] = field(default_factory=set)  # the nonces it takes
    seen: list[Seen] = field(default_factory=list)
    script: list[tuple[int, list[tuple[str, str]]]] = field(default_factory=list)  # answers to give first
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def nonce(self) -> str:
        nonce = f"nonce-{next(self._numbers)}"
        self.nonces.add(nonce)
        return nonce

    def __call__(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        value = request.headers.get("Authorization")
        params = AuthorizationParams.parse(value) if value else None
        status, headers = self._answer(request.method, params)
        if status == 200:  # the binding as asked for
            headers = [*headers, ("Contact", request.headers.get("Contact") or "")]
        self.seen.append(Seen(request.cseq[0], params.nonce if params else None,
                              params.nc if params else None, status))
        incoming.respond(status, headers=headers)

    def _answer(self, method: str, params: AuthorizationParams | None) -> tuple[int, list[tuple[str, str]]]:
        if self.script:
            return self.script.pop(0)
        if params is None:
            return 401, [("WWW-Authenticate", make_challenge(REALM, nonce=self.nonce()))]
        good = verify_authorization(params, method, PASSWORD)
        if good and params.nonce in self.nonces:
            return 200, []
        challenge = make_challenge(REALM, nonce=self.nonce(), stale=good)
        return 401, [("WWW-Authenticate", challenge)]


@pytest.fixture
def scheduler() -> FakeTimers:
    """The fake clock both endpoints run their SIP timers on: nothing is retransmitted unless a
    test moves it on."""
    return FakeTimers(FakeClock())


@pytest.fixture
async def registrar(scheduler: FakeTimers) -> AsyncIterator[Registrar]:
    endpoint = SipEndpoint(EndpointSettings(listen=[ListenSpec("udp", HOST, 0), ListenSpec("tcp", HOST, 0)],
                                            keepalive_interval=0), clock=scheduler.clock, scheduler=scheduler)
    await endpoint.start()
    made = Registrar(endpoint)
    endpoint.handlers["REGISTER"] = made
    yield made
    await endpoint.close()


@pytest.fixture
async def client(scheduler: FakeTimers) -> AsyncIterator[SipEndpoint]:
    endpoint = SipEndpoint(EndpointSettings(keepalive_interval=0), clock=scheduler.clock, scheduler=scheduler)
    await endpoint.start()
    yield endpoint
    await endpoint.close()


async def flow_to(client: SipEndpoint, registrar: Registrar, transport: TransportName = "udp") -> Flow:
    address = registrar.endpoint.transport.local_address(transport)
    assert address is not None
    return await client.transport.flow_to(transport, *address)


def binding(password: str = PASSWORD) -> Binding:
    return Binding(aor=SipURI.parse(f"sip:alice@{REALM}"), registrar=SipURI.parse(f"sip:{REALM}"),
                   credentials=Credentials("alice", password), contact_user="alice")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_refresh_sends_the_accepted_credentials_again(
        registrar: Registrar, client: SipEndpoint, transport: TransportName) -> None:
    flow = await flow_to(client, registrar, transport)
    alice = binding()
    first = await register(client, alice, flow, 300)
    assert first.ok and first.expires == 300 and first.transactions == 2  # what pacing charges
    assert [(s.nonce, s.nc, s.answer) for s in registrar.seen] == [(None, None, 401),
                                                                   ("nonce-1", "00000001", 200)]
    refresh = await register(client, alice, flow, 300)
    assert refresh.ok and refresh.transactions == 1
    # one transaction: the same nonce with the next nc, never challenged
    assert [(s.cseq, s.nonce, s.nc, s.answer) for s in registrar.seen[2:]] == [(3, "nonce-1", "00000002", 200)]
    removal = await register(client, alice, flow, 0)
    assert removal.ok and registrar.seen[-1].nc == "00000003"


async def test_an_expired_nonce_is_answered_and_not_offered_that_old_again(
        registrar: Registrar, client: SipEndpoint) -> None:
    flow = await flow_to(client, registrar)
    alice = binding()
    assert (await register(client, alice, flow, 300)).ok
    registrar.nonces.clear()  # every nonce so far has expired: right credentials get stale=true
    refresh = await register(client, alice, flow, 300)
    assert refresh.ok, refresh.detail
    assert [(s.nonce, s.nc, s.answer) for s in registrar.seen[2:]] == [("nonce-1", "00000002", 401),
                                                                       ("nonce-2", "00000001", 200)]
    # the refused nonce had been in use for less than a second: younger ones only from now on
    digest = alice.digest
    assert digest is not None and digest._reuse_max_age is not None and digest._reuse_max_age < 1.0


async def test_credentials_refused_outright_are_answered_once_then_unauthorized(
        registrar: Registrar, client: SipEndpoint) -> None:
    flow = await flow_to(client, registrar)
    alice = binding()
    assert (await register(client, alice, flow, 300)).ok
    alice.credentials.password = "changed at the PBX"  # our answers are wrong from now on
    result = await register(client, alice, flow, 300)
    assert result.outcome is Outcome.UNAUTHORIZED and result.detail == "credentials rejected"
    # the offered credentials (refused: a plain 401), one answer to the new challenge, no loop
    assert [(s.nonce, s.answer) for s in registrar.seen[2:]] == [("nonce-1", 401), ("nonce-2", 401)]


async def test_a_403_to_offered_credentials_stops_offering_them(registrar: Registrar, client: SipEndpoint) -> None:
    flow = await flow_to(client, registrar)
    alice = binding()
    assert (await register(client, alice, flow, 300)).ok
    registrar.script.append((403, []))
    assert (await register(client, alice, flow, 300)).outcome is Outcome.UNAUTHORIZED
    again = await register(client, alice, flow, 300)
    assert again.ok
    assert [(s.nonce, s.answer) for s in registrar.seen[3:]] == [(None, 401), ("nonce-2", 200)]


async def test_credentials_go_again_only_to_the_server_that_took_them(
        registrar: Registrar, client: SipEndpoint) -> None:
    alice = binding()
    assert (await register(client, alice, await flow_to(client, registrar, "udp"), 300)).ok
    # the registrar's TCP listener has a port of its own: another address, the challenge again
    assert (await register(client, alice, await flow_to(client, registrar, "tcp"), 300)).ok
    assert [(s.nonce, s.nc, s.answer) for s in registrar.seen[2:]] == [(None, None, 401),
                                                                       ("nonce-2", "00000001", 200)]


async def test_a_retry_after_423_carries_the_next_nc(registrar: Registrar, client: SipEndpoint) -> None:
    flow = await flow_to(client, registrar)
    alice = binding()
    registrar.script = [(401, [("WWW-Authenticate", make_challenge(REALM, nonce="n0"))]),
                        (423, [("Min-Expires", "600")])]
    registrar.nonces.add("n0")
    result = await register(client, alice, flow, 300)
    assert result.ok and result.expires == 600 and result.transactions == 3
    assert [(s.nonce, s.nc, s.answer) for s in registrar.seen] == [(None, None, 401), ("n0", "00000001", 423),
                                                                   ("n0", "00000002", 200)]


async def test_a_cancelled_register_sends_no_further_round(registrar: Registrar, client: SipEndpoint) -> None:
    flow = await flow_to(client, registrar)
    alice = binding()
    task = asyncio.create_task(register(client, alice, flow, 300))
    await asyncio.sleep(0)  # the first REGISTER is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the 401 has come back once the transaction is done (in Completed, kept as its key)
    await wait_for(lambda: client.pending_transactions == 1 and len(client.table) == 0, WAIT, "the 401")
    assert [s.answer for s in registrar.seen] == [401]  # and it was not answered


async def test_what_answering_a_challenge_raises_comes_out_of_register(
        registrar: Registrar, client: SipEndpoint) -> None:
    flow = await flow_to(client, registrar)
    alice = binding()
    registrar.script = [(401, [("WWW-Authenticate", make_challenge(REALM, nonce="n1"))])]
    assert alice.digest is not None
    alice.digest._states[REALM] = _NonceState("n1", count=0xFFFFFFFF)  # nc used up for n1
    with pytest.raises(DigestError, match="nonce count exhausted"):
        await asyncio.wait_for(register(client, alice, flow, 300), WAIT)


def test_the_digest_session_learns_how_old_a_nonce_may_be() -> None:
    session = DigestSession(Credentials("alice", PASSWORD))
    assert session.reuse("REGISTER", "sip:x", 0.0) is None  # nothing accepted yet
    challenge = session_challenge("n1")
    session.authorize(challenge, "REGISTER", "sip:x")
    session.accepted(challenge, "Authorization", since=100.0, scope="pbx")
    assert session.reuse("REGISTER", "sip:x", 130.0, "elsewhere") is None
    offered = session.reuse("REGISTER", "sip:x", 130.0, "pbx")
    assert offered is not None and offered[0] == "Authorization" and "nc=00000002" in offered[1]
    session.reuse_refused(now=140.0)  # refused at 40 s: offer nothing 30 s old or older
    assert session.reuse("REGISTER", "sip:x", 141.0, "pbx") is None  # and not this nonce any more
    fresh = session_challenge("n2")
    session.authorize(fresh, "REGISTER", "sip:x")
    session.accepted(fresh, "Authorization", since=200.0, scope="pbx")
    assert session.reuse("REGISTER", "sip:x", 229.0, "pbx") is not None
    assert session.reuse("REGISTER", "sip:x", 230.0, "pbx") is None
    session.forget_reuse()
    assert session.reuse("REGISTER", "sip:x", 201.0, "pbx") is None


def session_challenge(nonce: str) -> Challenge:
    return Challenge.parse(make_challenge(REALM, nonce=nonce))


# --------------------------------------------------------------------------- the machine, by hand

LOCAL, REMOTE = ("192.0.2.1", 5070), ("192.0.2.9", 5060)


def exchange(alice: Binding, expires: int = 300, remote: tuple[str, int] = REMOTE) -> RegisterExchange:
    return RegisterExchange(alice, expires, transport="udp", local=LOCAL, remote=remote, user_agent="ua/1")


def challenge(request: Request, nonce: str, *, stale: bool = False, status: int = 401) -> Response:
    header = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
    return make_response(request, status, to_tag="registrar",
                         headers=[(header, make_challenge(REALM, nonce=nonce, stale=stale))])


def bound(request: Request, **extra: str) -> Response:
    """200 with the binding as asked for (the Contact with its expires)."""
    return make_response(request, 200, to_tag="registrar",
                         headers=[("Contact", request.headers.get("Contact") or ""), *extra.items()])


def credentials(request: Request) -> AuthorizationParams | None:
    value = request.headers.get("Authorization") or request.headers.get("Proxy-Authorization")
    return AuthorizationParams.parse(value) if value else None


def next_request(step: Request | RegisterResult) -> Request:
    assert isinstance(step, Request), step
    return step


def verdict(step: Request | RegisterResult) -> RegisterResult:
    assert isinstance(step, RegisterResult), step
    return step


def answering(alice: Binding, nonce: str = "n1") -> tuple[RegisterExchange, Request]:
    """A new exchange for ``alice`` whose first REGISTER was challenged: it and the REGISTER answering."""
    machine = exchange(alice)
    return machine, next_request(machine.on_response(challenge(machine.start(0.0), nonce), 0.0))


def test_a_challenge_is_answered_by_a_new_transaction_without_the_to_tag() -> None:
    alice = binding()
    machine = exchange(alice)
    first = machine.start(0.0)
    assert credentials(first) is None and first.cseq == (1, "REGISTER")
    second = next_request(machine.on_response(challenge(first, "n1"), 0.1))
    assert second.cseq == (2, "REGISTER") and second.branch != first.branch
    assert second.to.tag is None and second.call_id == first.call_id and second.from_.tag == first.from_.tag
    params = credentials(second)
    assert params is not None and (params.nonce, params.nc) == ("n1", "00000001")
    assert verify_authorization(params, "REGISTER", PASSWORD)
    result = verdict(machine.on_response(bound(second), 0.2))
    assert result.ok and result.expires == 300 and result.flow is None and machine.result is result


def test_a_407_is_answered_with_proxy_credentials() -> None:
    machine = exchange(binding())
    first = machine.start(0.0)
    second = next_request(machine.on_response(challenge(first, "p1", status=407), 0.1))
    assert "Authorization" not in second.headers
    assert AuthorizationParams.parse(second.headers.get("Proxy-Authorization") or "").nonce == "p1"


def test_a_refresh_offers_the_accepted_credentials_to_the_same_registrar_only() -> None:
    alice = binding()
    machine, second = answering(alice)
    assert verdict(machine.on_response(bound(second), 0.0)).ok
    refresh = exchange(alice).start(100.0)
    params = credentials(refresh)
    assert params is not None and (params.nonce, params.nc) == ("n1", "00000002") and refresh.cseq[0] == 3
    assert credentials(exchange(alice, remote=("192.0.2.10", 5060)).start(100.0)) is None


def test_refused_offered_credentials_are_answered_and_not_offered_that_old_again() -> None:
    alice = binding()
    machine, second = answering(alice)
    verdict(machine.on_response(bound(second), 0.0))
    machine = exchange(alice)
    offered = machine.start(40.0)
    answer = next_request(machine.on_response(challenge(offered, "n2", stale=True), 40.0))
    params = credentials(answer)
    assert params is not None and (params.nonce, params.nc) == ("n2", "00000001")
    assert verdict(machine.on_response(bound(answer), 40.0)).ok
    assert alice.digest is not None and alice.digest._reuse_max_age == 30.0  # 75 % of the 40 s it lived


def test_a_challenge_repeated_for_fresh_credentials_is_unauthorized() -> None:
    machine, second = answering(binding())
    result = verdict(machine.on_response(challenge(second, "n2"), 0.0))
    assert (result.outcome, result.status, result.detail) == (Outcome.UNAUTHORIZED, 401, "credentials rejected")


def test_a_stale_challenge_repeating_a_nonce_is_a_loop() -> None:
    machine, second = answering(binding())
    result = verdict(machine.on_response(challenge(second, "n1", stale=True), 0.0))
    assert (result.outcome, result.detail) == (Outcome.UNAUTHORIZED, "challenge loop")


def test_a_challenge_without_a_digest_we_can_answer_is_unauthorized() -> None:
    machine = exchange(binding())
    first = machine.start(0.0)
    basic = make_response(first, 401, headers=[("WWW-Authenticate", 'Basic realm="x"')])
    result = verdict(machine.on_response(basic, 0.0))
    assert (result.outcome, result.detail) == (Outcome.UNAUTHORIZED, "no digest challenge we can answer")


def test_423_is_retried_once_with_min_expires_and_the_next_nc() -> None:
    machine, second = answering(binding())
    third = next_request(machine.on_response(make_response(second, 423, headers=[("Min-Expires", "600")]), 0.0))
    assert third.headers.get("Expires") == "600" and ";expires=600" in (third.headers.get("Contact") or "")
    params = credentials(third)
    assert params is not None and (params.nonce, params.nc) == ("n1", "00000002") and third.cseq[0] == 3
    again = verdict(machine.on_response(make_response(third, 423, headers=[("Min-Expires", "900")]), 0.0))
    assert (again.outcome, again.status) == (Outcome.REJECTED, 423)


@pytest.mark.parametrize("min_expires", [None, "300", "soon"])
def test_423_without_a_usable_min_expires_is_rejected(min_expires: str | None) -> None:
    machine = exchange(binding())
    first = machine.start(0.0)
    extra = [("Min-Expires", min_expires)] if min_expires is not None else []
    result = verdict(machine.on_response(make_response(first, 423, headers=extra), 0.0))
    assert (result.outcome, result.detail) == (Outcome.REJECTED, "423 without a usable Min-Expires")


def test_403_to_offered_credentials_stops_offering_them() -> None:
    alice = binding()
    machine, second = answering(alice)
    verdict(machine.on_response(bound(second), 0.0))
    machine = exchange(alice)
    result = verdict(machine.on_response(make_response(machine.start(1.0), 403), 1.0))
    assert (result.outcome, result.detail) == (Outcome.UNAUTHORIZED, "forbidden")
    assert credentials(exchange(alice).start(2.0)) is None


@pytest.mark.parametrize(("status", "outcome"), [(408, Outcome.FAILED), (480, Outcome.FAILED),
                                                 (503, Outcome.FAILED), (404, Outcome.REJECTED),
                                                 (603, Outcome.REJECTED)])
def test_other_answers_are_classified(status: int, outcome: Outcome) -> None:
    machine = exchange(binding())
    response = make_response(machine.start(0.0), status, headers=[("Retry-After", "30")])
    result = verdict(machine.on_response(response, 0.0))
    assert (result.outcome, result.status) == (outcome, status)
    assert result.retry_after == (30.0 if outcome is Outcome.FAILED else None)


def test_a_2xx_without_our_contact_did_not_bind_it() -> None:
    machine = exchange(binding())
    first = machine.start(0.0)
    other = make_response(first, 200, headers=[("Contact", "<sip:someone@192.0.2.77>;expires=300")])
    result = verdict(machine.on_response(other, 0.0))
    assert (result.outcome, result.detail) == (Outcome.FAILED, "registrar did not bind our contact")


def test_a_removal_takes_any_2xx() -> None:
    machine = exchange(binding(), expires=0)
    first = machine.start(0.0)
    assert first.headers.get("Expires") == "0"
    result = verdict(machine.on_response(make_response(first, 200), 0.0))
    assert result.ok and result.expires == 0


def test_a_transaction_without_a_final_response_is_a_failure() -> None:
    machine = exchange(binding())
    machine.start(0.0)
    result = machine.on_error("connection lost")
    assert (result.outcome, result.status, result.detail) == (Outcome.FAILED, 503, "connection lost")


def test_a_used_up_nonce_count_raises_from_the_input_that_needs_it() -> None:
    alice = binding()
    assert alice.digest is not None
    alice.digest._states[REALM] = _NonceState("n1", count=0xFFFFFFFF)
    machine = exchange(alice)
    with pytest.raises(DigestError, match="nonce count exhausted"):
        machine.on_response(challenge(machine.start(0.0), "n1"), 0.0)


# --------------------------------------------------------------------------- the REGISTER


@pytest.mark.parametrize("own_agent", [None, "own agent/1"])
@pytest.mark.parametrize("authorization", [None, ("Authorization", 'Digest username="alice"'),
                                           ("proxy-authorization", 'Digest username="alice"')])
def test_the_register_on_the_wire(own_agent: str | None, authorization: tuple[str, str] | None) -> None:
    alice = binding()
    alice.user_agent = own_agent
    alice.display_name = 'Alice "A"'
    alice.contact_params = {"+sip.instance": '"<urn:uuid:1>"', "reg-id": "1"}
    request = build_register(alice, 300, authorization, transport="tcp", local=("2001:db8::1", 5070),
                             user_agent="sipis/1")
    data = request.to_bytes()  # the bytes written along with the fields
    assert _Message.to_bytes(request) == data  # what serialising the fields gives
    parsed = parse_message(data)
    assert isinstance(parsed, Request) and (parsed.method, parsed.uri) == ("REGISTER", f"sip:{REALM}")
    agent = [("User-Agent", own_agent)] if own_agent else []
    offered = [(authorization[0].title(), authorization[1])] if authorization else []
    assert list(parsed.headers) == [
        ("Via", f"SIP/2.0/TCP [2001:db8::1]:5070;rport;branch={request.branch}"),
        ("From", f'"Alice \\"A\\"" <sip:alice@{REALM}>;tag={alice.from_tag}'),
        ("To", f'"Alice \\"A\\"" <sip:alice@{REALM}>'),
        ("Call-ID", alice.call_id),
        ("CSeq", "1 REGISTER"),
        ("Contact", '<sip:alice@[2001:db8::1]:5070;transport=tcp>;+sip.instance="<urn:uuid:1>";reg-id=1;expires=300'),
        ("Expires", "300"),
        ("Supported", "path, outbound"),
        *agent,
        *offered,
        ("Max-Forwards", "70"),
        *([] if own_agent else [("User-Agent", "sipis/1")]),
    ]
    assert request.branch and request.branch.startswith("z9hG4bK") and parsed.branch == request.branch
    assert parsed.cseq == request.cseq == (1, "REGISTER")
    assert alice.contact_uri == "sip:alice@[2001:db8::1]:5070;transport=tcp"  # kept for the unREGISTER
    again = build_register(alice, 300, None, transport="tcp", local=("2001:db8::1", 5070))
    assert again.cseq == (2, "REGISTER") and again.branch != request.branch


@pytest.mark.parametrize("change", ["header", "headers", "uri", "body"])
def test_written_bytes_are_not_sent_once_the_request_changed(change: str) -> None:
    request = build_register(binding(), 300, None, transport="udp", local=LOCAL)
    if change == "header":
        request.headers.add("X-Changed", "1")
    elif change == "headers":
        request.headers = request.headers.copy()
        request.headers.set("Expires", "5")
    elif change == "uri":
        request.uri = "sip:elsewhere.test"
    else:
        request.body = b"x"
    data = request.to_bytes()
    assert data == _Message.to_bytes(request) and data == request.to_bytes()
