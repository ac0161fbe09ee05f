"""register() against a scripted registrar on loopback: the digest rounds, credentials offered
again on a refresh (one transaction instead of two) and every way back to the challenge flow, the
next nc on a retry after 423, cancellation, and the one-go REGISTER builder.

The registrar is a SipEndpoint with a REGISTER handler that checks digest with the server-side
functions of ``sipis.sip.digest``; what it does with nonces is up to each test.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from sipis.sip.digest import (
    AuthorizationParams,
    Challenge,
    Credentials,
    DigestError,
    DigestSession,
    _NonceState,
    make_challenge,
    verify_authorization,
)
from sipis.sip.endpoint import EndpointSettings, IncomingRequest, SipEndpoint
from sipis.sip.message import Request, SipURI, _Message
from sipis.sip.register import Binding, Outcome, _register_request, build_register, register
from sipis.sip.transaction import TimerSettings
from sipis.sip.transport import Flow, ListenSpec, TransportName
from tests.sip.test_transport import HOST, WAIT

TIMERS = TimerSettings(t1=0.01, t2=0.04, t4=0.05, timer_d=0.1)
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
async def registrar() -> AsyncIterator[Registrar]:
    endpoint = SipEndpoint(EndpointSettings(listen=[ListenSpec("udp", HOST, 0), ListenSpec("tcp", HOST, 0)],
                                            timers=TIMERS, keepalive_interval=0))
    await endpoint.start()
    made = Registrar(endpoint)
    endpoint.handlers["REGISTER"] = made
    yield made
    await endpoint.close()


@pytest.fixture
async def client() -> AsyncIterator[SipEndpoint]:
    endpoint = SipEndpoint(EndpointSettings(timers=TIMERS, keepalive_interval=0))
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
    assert first.ok and first.expires == 300
    assert [(s.nonce, s.nc, s.answer) for s in registrar.seen] == [(None, None, 401),
                                                                   ("nonce-1", "00000001", 200)]
    refresh = await register(client, alice, flow, 300)
    assert refresh.ok
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
    assert result.ok and result.expires == 600
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
    await asyncio.sleep(0.2)
    assert [s.answer for s in registrar.seen] == [401]  # its 401 was not answered


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


def test_the_one_go_register_equals_build_register_plus_add_via() -> None:
    endpoint = SipEndpoint(EndpointSettings(keepalive_interval=0))
    flow = Flow("tcp", ("192.0.2.1", 5070), ("192.0.2.9", 5060), True, _write=lambda _: None,
                _close=lambda: None)
    for user_agent in (None, "own agent/1"):
        for authorization in (None, ("Authorization", 'Digest username="alice"'),
                              ("proxy-authorization", 'Digest username="alice"')):
            one, two = binding(), binding()
            two.call_id, two.from_tag = one.call_id, one.from_tag
            one.user_agent = two.user_agent = user_agent
            one.contact_params = two.contact_params = {"+sip.instance": '"<urn:uuid:1>"', "reg-id": "1"}
            built, branch, template = _register_request(endpoint, one, flow, 300, authorization)
            reference = build_register(two, flow, 300, authorization)
            other_branch = endpoint.add_via(reference, flow)
            prepared = built.to_bytes()  # the bytes written along with the fields
            assert prepared.replace(branch.encode(), b"BRANCH") == \
                reference.to_bytes().replace(other_branch.encode(), b"BRANCH")
            assert built.to_bytes() == prepared  # serialised from the fields this time
            assert built.cseq == (1, "REGISTER") and built.branch == branch
            # the exchange's next REGISTER, from the template: as if built afresh
            again, branch, _ = _register_request(endpoint, one, flow, 300, ("Authorization", "x"), template)
            reference = build_register(two, flow, 300, ("Authorization", "x"))
            other_branch = endpoint.add_via(reference, flow)
            assert again.to_bytes().replace(branch.encode(), b"BRANCH") == \
                reference.to_bytes().replace(other_branch.encode(), b"BRANCH")
            assert again.cseq == (2, "REGISTER") and template.head_values[4] == "1 REGISTER"  # left as it was


def test_prepared_bytes_are_not_used_once_the_request_changed() -> None:
    endpoint = SipEndpoint(EndpointSettings(keepalive_interval=0))
    flow = Flow("udp", ("192.0.2.1", 5070), ("192.0.2.9", 5060), False, _write=lambda _: None,
                _close=lambda: None)
    for change in ("header", "headers", "uri", "body"):
        request, _, _ = _register_request(endpoint, binding(), flow, 300, None)
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
        assert data == Request.to_bytes(request) and data == _Message.to_bytes(request)
