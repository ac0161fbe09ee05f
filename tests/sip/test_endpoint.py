"""SipEndpoint on loopback: client requests with local 408/503, the automatic answers (100, OPTIONS,
CANCEL, 405, 481), INVITE handling with retransmissions, CANCEL and ACK, failing handlers, and two
endpoints talking to each other over UDP, TCP and TLS.

Raw peers are plain sockets (helpers shared with ``test_transport``). SIP timers run with the RFC's
values on a fake clock: a test moves time on explicitly (``scheduler.advance``), nothing waits for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sipis.clock import FakeClock
from sipis.sip.endpoint import EndpointSettings, IncomingRequest, SipEndpoint
from sipis.sip.message import Headers, Message, Request, Response, make_response, new_branch, new_call_id, new_tag
from sipis.sip.transaction import State, build_cancel
from sipis.sip.transport import Flow, ListenSpec, TransportName
from sipis.timers import FakeTimers
from tests.sip.test_transport import (
    HOST,
    WAIT,
    Pki,
    RawServer,
    StreamPeer,
    UdpPeer,
    make_pki,
    sip_request,
)
from tests.waiting import wait_for

EndpointFactory = Callable[..., Awaitable[SipEndpoint]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def scheduler() -> FakeTimers:
    """The fake clock every endpoint of a test runs its SIP timers on."""
    return FakeTimers(FakeClock())


@pytest.fixture
async def make_endpoint(pki: Pki, scheduler: FakeTimers) -> AsyncIterator[EndpointFactory]:
    made: list[SipEndpoint] = []

    async def make(*transports: TransportName) -> SipEndpoint:
        settings = EndpointSettings(
            listen=[ListenSpec(transport, HOST, 0) for transport in transports],
            tls=pki.server_settings(), keepalive_interval=0,
        )
        endpoint = SipEndpoint(settings, clock=scheduler.clock, scheduler=scheduler)
        made.append(endpoint)
        await endpoint.start()
        return endpoint

    yield make
    for endpoint in made:
        await endpoint.close()


@pytest.fixture
async def peers() -> AsyncIterator[list[UdpPeer | StreamPeer | RawServer]]:
    """Raw peers to close after the test."""
    opened: list[UdpPeer | StreamPeer | RawServer] = []
    yield opened
    for peer in reversed(opened):
        if isinstance(peer, UdpPeer):
            peer.close()
        else:
            await peer.close()


def port_of(endpoint: SipEndpoint, transport: TransportName) -> int:
    address = endpoint.transport.local_address(transport)
    assert address is not None
    return address[1]


async def udp_peer(peers: list[Any]) -> UdpPeer:
    peer = await UdpPeer.open()
    peers.append(peer)
    return peer


def outgoing(endpoint: SipEndpoint, flow: Flow, method: str = "OPTIONS", *, body: bytes = b"",
             extra: tuple[tuple[str, str], ...] = ()) -> Request:
    """A request from ``endpoint`` on ``flow``, with its Via on top."""
    headers = Headers([
        ("From", f"<sip:sipis@{HOST}>;tag={new_tag()}"),
        ("To", f"<sip:peer@{HOST}>"),
        ("Call-ID", new_call_id()),
        ("CSeq", f"1 {method}"),
        *extra,
    ])
    request = Request(method, f"sip:peer@{HOST}", headers, body)
    endpoint.add_via(request, flow)
    return request


class Recorder:
    """A request handler that keeps every IncomingRequest and answers as told (or not at all)."""

    def __init__(self, *answers: int) -> None:
        self.answers = answers
        self.calls: list[IncomingRequest] = []
        self.arrived = asyncio.Event()

    def __call__(self, incoming: IncomingRequest) -> None:
        self.calls.append(incoming)
        self.arrived.set()
        for status in self.answers:
            incoming.respond(status)

    async def first(self) -> IncomingRequest:
        await asyncio.wait_for(self.arrived.wait(), WAIT)
        return self.calls[0]


# =========================================================================== client side


# Sent at 0 and retransmitted until 64*T1 = 32 s: Timer E doubles from T1 up to T2 (0.5, 1.5, 3.5,
# 7.5, then every 4 s up to 31.5), Timer A doubles without a cap (0.5, 1.5, 3.5, 7.5, 15.5, 31.5).
@pytest.mark.parametrize("method, copies", [("OPTIONS", 11), ("INVITE", 7)])
async def test_request_to_a_silent_udp_peer_ends_in_a_local_408(
    method: str, copies: int, make_endpoint: EndpointFactory, peers: list[Any], scheduler: FakeTimers,
) -> None:
    endpoint = await make_endpoint()
    silent = await udp_peer(peers)
    flow = await endpoint.transport.flow_to("udp", *silent.address)
    request = outgoing(endpoint, flow, method)

    pending = asyncio.ensure_future(endpoint.request(request, flow))
    await asyncio.sleep(0)  # sent
    scheduler.advance(31.9)
    await asyncio.sleep(0)
    assert not pending.done()
    scheduler.advance(0.1)  # Timer F (OPTIONS) or B (INVITE)
    response = await asyncio.wait_for(pending, WAIT)

    assert response.status == 408
    assert (response.call_id, response.cseq) == (request.call_id, request.cseq)
    await wait_for(lambda: silent.queue.qsize() >= copies, WAIT, "the retransmissions")
    received = [silent.queue.get_nowait()[0] for _ in range(silent.queue.qsize())]
    assert received == [request.to_bytes()] * copies
    assert endpoint.pending_transactions == 0 and scheduler.pending == 0


async def test_one_wake_up_is_armed_for_all_transactions(
    make_endpoint: EndpointFactory, peers: list[Any], scheduler: FakeTimers,
) -> None:
    endpoint = await make_endpoint()
    silent = await udp_peer(peers)
    flow = await endpoint.transport.flow_to("udp", *silent.address)
    pending = []
    for method in ("OPTIONS", "INVITE", "MESSAGE"):
        pending.append(asyncio.ensure_future(endpoint.request(outgoing(endpoint, flow, method), flow)))
        await asyncio.sleep(0)
        scheduler.advance(0.2)
        assert scheduler.pending == 1  # at the earliest retransmission, whatever their number
    scheduler.advance(32.0)
    assert [(await asyncio.wait_for(future, WAIT)).status for future in pending] == [408] * 3
    assert scheduler.pending == 0 and endpoint.pending_transactions == 0


async def test_request_over_tcp_to_a_peer_that_closes_ends_in_a_local_503(
    make_endpoint: EndpointFactory, peers: list[Any],
) -> None:
    endpoint = await make_endpoint()
    server = await RawServer.start()
    peers.append(server)
    flow = await endpoint.transport.flow_to("tcp", HOST, server.port)
    peer = await server.next_peer()
    request = outgoing(endpoint, flow, "REGISTER")
    pending = asyncio.create_task(endpoint.request(request, flow))

    received = await peer.read_message()
    assert isinstance(received, Request) and received.call_id == request.call_id
    await peer.close()  # read the request, then hang up without answering

    response = await asyncio.wait_for(pending, WAIT)
    assert response.status == 503
    assert endpoint.pending_transactions == 0


async def test_request_on_a_dead_flow_ends_in_a_local_503(make_endpoint: EndpointFactory, peers: list[Any]) -> None:
    endpoint = await make_endpoint()
    closed: asyncio.Queue[Flow] = asyncio.Queue()
    endpoint.flow_closed_listeners.append(lambda flow, reason: closed.put_nowait(flow))
    server = await RawServer.start()
    peers.append(server)
    flow = await endpoint.transport.flow_to("tcp", HOST, server.port)
    await (await server.next_peer()).close()
    assert await asyncio.wait_for(closed.get(), WAIT) is flow
    assert not flow.alive

    response = await asyncio.wait_for(endpoint.request(outgoing(endpoint, flow), flow), WAIT)
    assert response.status == 503


async def test_stray_responses_are_dropped(make_endpoint: EndpointFactory, peers: list[Any]) -> None:
    endpoint = await make_endpoint("udp", "tcp")
    peer = await udp_peer(peers)
    stray = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKnobodyhome\r\n" \
            b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: stray\r\nCSeq: 1 OPTIONS\r\n" \
            b"Content-Length: 0\r\n\r\n"
    peer.send(stray, (HOST, port_of(endpoint, "udp")))
    peer.send(sip_request(call_id="probe"), (HOST, port_of(endpoint, "udp")))
    first = await peer.recv_response()
    assert (first.status, first.call_id) == (200, "probe")

    stream = await StreamPeer.connect(port_of(endpoint, "tcp"))
    peers.append(stream)
    stream.send(stray.replace(b"UDP", b"TCP") + sip_request(transport="TCP", call_id="probe-tcp"))
    first = await stream.read_response()
    assert (first.status, first.call_id) == (200, "probe-tcp")


async def test_provisional_responses_reach_the_callback(make_endpoint: EndpointFactory, peers: list[Any]) -> None:
    endpoint = await make_endpoint()
    peer = await udp_peer(peers)
    flow = await endpoint.transport.flow_to("udp", *peer.address)
    request = outgoing(endpoint, flow, "INVITE")
    provisional: list[Response] = []
    pending = asyncio.create_task(endpoint.request(request, flow, on_provisional=provisional.append))

    data, source = await peer.recv()
    assert data == request.to_bytes()
    peer.send(make_response(request, 180, to_tag="callee").to_bytes(), source)
    peer.send(make_response(request, 486, to_tag="callee").to_bytes(), source)
    response = await asyncio.wait_for(pending, WAIT)

    assert response.status == 486
    assert [r.status for r in provisional] == [180]
    ack = await peer.recv_message()  # the transaction ACKs the non-2xx final response itself
    assert isinstance(ack, Request) and ack.method == "ACK"
    assert ack.top_via.branch == request.top_via.branch and ack.to.tag == "callee"


# =========================================================================== automatic answers


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_options_gets_200_with_allow_on_every_transport(
    transport: TransportName, make_endpoint: EndpointFactory, peers: list[Any], pki: Pki,
) -> None:
    endpoint = await make_endpoint(transport)
    endpoint.handlers["INVITE"] = Recorder(480)
    data = sip_request(transport=transport.upper(), call_id=f"options-{transport}")
    response: Response
    if transport == "udp":
        peer = await udp_peer(peers)
        peer.send(data, (HOST, port_of(endpoint, "udp")))
        response = await peer.recv_response()
    else:
        stream = await StreamPeer.connect(port_of(endpoint, transport),
                                          ssl_ctx=pki.client_context() if transport == "tls" else None)
        peers.append(stream)
        stream.send(data)
        response = await stream.read_response()

    assert (response.status, response.call_id) == (200, f"options-{transport}")
    assert response.headers.get_all("Allow") == ["ACK", "CANCEL", "INVITE", "OPTIONS"]
    assert response.to.tag  # a final response carries our To tag
    assert response.headers.get("Server") == "sipis-console"


async def test_unknown_method_gets_405_with_allow(make_endpoint: EndpointFactory, peers: list[Any]) -> None:
    endpoint = await make_endpoint("udp")
    peer = await udp_peer(peers)
    peer.send(sip_request("SUBSCRIBE", call_id="sub"), (HOST, port_of(endpoint, "udp")))

    response = await peer.recv_response()
    assert (response.status, response.call_id) == (405, "sub")
    assert response.headers.get_all("Allow") == ["ACK", "CANCEL", "OPTIONS"]


async def test_in_dialog_requests_get_481(make_endpoint: EndpointFactory, peers: list[Any]) -> None:
    endpoint = await make_endpoint("udp")
    invite_handler = Recorder(180)
    endpoint.handlers["INVITE"] = invite_handler
    peer = await udp_peer(peers)
    port = port_of(endpoint, "udp")

    peer.send(sip_request("BYE", to_tag="dialog1", call_id="bye"), (HOST, port))
    response = await peer.recv_response()
    assert (response.status, response.call_id, response.to.tag) == (481, "bye", "dialog1")

    peer.send(sip_request("INVITE", to_tag="dialog1", call_id="reinvite"), (HOST, port))
    assert (await peer.recv_response()).status == 100
    assert (await peer.recv_response()).status == 481
    assert not invite_handler.calls  # a re-INVITE never reaches the INVITE handler


async def test_handler_that_raises_gets_500_and_the_endpoint_carries_on(
    make_endpoint: EndpointFactory, peers: list[Any],
) -> None:
    endpoint = await make_endpoint("udp")

    def broken(incoming: IncomingRequest) -> None:
        raise RuntimeError("handler bug")

    endpoint.handlers["MESSAGE"] = broken
    peer = await udp_peer(peers)
    port = port_of(endpoint, "udp")
    peer.send(sip_request("MESSAGE", call_id="boom"), (HOST, port))
    response = await peer.recv_response()
    assert (response.status, response.call_id) == (500, "boom")

    endpoint.handlers["MESSAGE"] = Recorder(202)
    peer.send(sip_request("MESSAGE", call_id="fine"), (HOST, port))
    response = await peer.recv_response()
    assert (response.status, response.call_id) == (202, "fine")


async def test_retransmitted_non_invite_is_answered_again_without_the_handler(
    make_endpoint: EndpointFactory, peers: list[Any],
) -> None:
    endpoint = await make_endpoint("udp")
    handler = Recorder(200)
    endpoint.handlers["MESSAGE"] = handler
    peer = await udp_peer(peers)
    data = sip_request("MESSAGE", call_id="once", body=b"hello")
    peer.send(data, (HOST, port_of(endpoint, "udp")))
    first = await peer.recv_response()
    peer.send(data, (HOST, port_of(endpoint, "udp")))
    second = await peer.recv_response()

    assert first.status == second.status == 200
    assert first.to.tag == second.to.tag
    assert len(handler.calls) == 1 and handler.calls[0].request.body == b"hello"


# =========================================================================== INVITE, CANCEL, ACK


async def test_invite_gets_100_then_the_handlers_answers_and_retransmissions_are_absorbed(
    make_endpoint: EndpointFactory, peers: list[Any],
) -> None:
    endpoint = await make_endpoint("udp")
    handler = Recorder(180)  # rings, the final answer comes later
    endpoint.handlers["INVITE"] = handler
    peer = await udp_peer(peers)
    port = port_of(endpoint, "udp")
    branch = new_branch()
    invite = sip_request("INVITE", branch=branch, call_id="inv")

    peer.send(invite, (HOST, port))
    trying = await peer.recv_response()
    assert trying.status == 100 and trying.to.tag is None
    ringing = await peer.recv_response()
    assert ringing.status == 180 and ringing.to.tag

    peer.send(invite, (HOST, port))  # a retransmission: the last response again, no new call
    again = await peer.recv_response()
    assert (again.status, again.to.tag) == (180, ringing.to.tag)
    assert len(handler.calls) == 1

    incoming = handler.calls[0]
    assert incoming.respond(480, headers=[("X-Sipis-Reason", "test")])
    assert not incoming.respond(486)  # one final answer only
    final = await peer.recv_response()
    assert (final.status, final.to.tag, final.headers.get("X-Sipis-Reason")) == (480, ringing.to.tag, "test")

    peer.send(invite, (HOST, port))  # after the final answer (which Timer G repeats too): no new call
    assert (await peer.recv_response(skip=[180])).status == 480
    assert len(handler.calls) == 1
    assert incoming.transaction.state is State.COMPLETED

    peer.send(sip_request("ACK", branch=branch, call_id="inv", to_tag=final.to.tag), (HOST, port))
    peer.send(sip_request(call_id="probe"), (HOST, port))
    await peer.recv_response("probe")  # the ACK before it has been handled
    assert incoming.transaction.state in (State.CONFIRMED, State.TERMINATED)
    assert len(handler.calls) == 1


@pytest.mark.parametrize("method", ["INVITE", "MESSAGE"])
async def test_a_screened_request_gets_one_stateless_answer_and_nothing_is_kept(
    method: str, make_endpoint: EndpointFactory, peers: list[Any], scheduler: FakeTimers,
) -> None:
    endpoint = await make_endpoint("udp")
    handler = Recorder(200)
    endpoint.handlers[method] = handler
    screened: list[tuple[str, Flow]] = []

    def screen(request: Request, flow: Flow) -> int | None:
        screened.append((request.call_id, flow))
        return 404 if request.call_id == "junk" else None

    endpoint.screens[method] = screen
    peer = await udp_peer(peers)
    port = port_of(endpoint, "udp")
    junk = sip_request(method, call_id="junk")

    peer.send(junk, (HOST, port))
    refused = await peer.recv_response("junk")
    assert refused.status == 404 and refused.to.tag  # final at once: no 100 Trying
    assert endpoint.pending_transactions == 0 and not handler.calls and endpoint.refused == 1
    assert screened[0][1].remote == peer.address

    peer.send(junk, (HOST, port))  # a retransmission is simply refused again
    assert (await peer.recv_response("junk")).status == 404
    scheduler.advance(64 * 0.5 + 5)  # Timer G/H (INVITE) and J (MESSAGE) would have run out by now
    peer.send(sip_request(method, call_id="served"), (HOST, port))
    assert (await peer.recv_response("served", skip=[100])).status == 200
    assert peer.queue.empty()  # no retransmitted 404 came in between
    assert len(handler.calls) == 1 and endpoint.refused == 2


async def test_what_the_endpoint_answers_itself_keeps_no_transaction(
    make_endpoint: EndpointFactory, peers: list[Any],
) -> None:
    endpoint = await make_endpoint("udp")
    endpoint.handlers["INVITE"] = Recorder(180)
    peer = await udp_peer(peers)
    port = port_of(endpoint, "udp")
    for method, to_tag, status in [("OPTIONS", None, 200), ("SUBSCRIBE", None, 405), ("BYE", "gone", 481),
                                   ("CANCEL", None, 481)]:
        peer.send(sip_request(method, to_tag=to_tag, call_id=f"junk-{method}"), (HOST, port))
        assert (await peer.recv_response(f"junk-{method}")).status == status
        assert endpoint.pending_transactions == 0, method


async def test_cancel_of_a_pending_invite_gives_200_and_487(make_endpoint: EndpointFactory,
                                                            peers: list[Any]) -> None:
    endpoint = await make_endpoint("udp")
    handler = Recorder()  # never answers by itself
    cancelled: list[Request] = []

    def on_invite(incoming: IncomingRequest) -> None:
        handler(incoming)
        incoming.on_cancel(cancelled.append)

    endpoint.handlers["INVITE"] = on_invite
    peer = await udp_peer(peers)
    port = port_of(endpoint, "udp")
    branch = new_branch()

    peer.send(sip_request("INVITE", branch=branch, call_id="c1"), (HOST, port))
    assert (await peer.recv_response()).status == 100
    incoming = await handler.first()

    peer.send(sip_request("CANCEL", branch=branch, call_id="c1"), (HOST, port))
    to_cancel = await peer.recv_response()
    assert (to_cancel.status, to_cancel.cseq) == (200, (1, "CANCEL"))
    terminated = await peer.recv_response()
    assert (terminated.status, terminated.cseq) == (487, (1, "INVITE"))
    assert terminated.to.tag == to_cancel.to.tag == incoming.to_tag

    assert [c.method for c in cancelled] == ["CANCEL"]
    assert incoming.cancelled and incoming.final_status == 487
    assert not incoming.respond(200)  # too late to answer

    peer.send(sip_request("ACK", branch=branch, call_id="c1", to_tag=terminated.to.tag), (HOST, port))
    peer.send(sip_request(call_id="probe"), (HOST, port))
    probe = await peer.recv_response("probe")  # 487 retransmissions (Timer G) may come before it
    assert probe.status == 200
    assert incoming.transaction.state in (State.CONFIRMED, State.TERMINATED)
    assert len(handler.calls) == 1


@pytest.mark.parametrize("to_tag", [None, "dialog7"])
async def test_an_ack_matching_nothing_is_never_answered(to_tag: str | None, make_endpoint: EndpointFactory,
                                                        peers: list[Any]) -> None:
    endpoint = await make_endpoint("udp")
    peer = await udp_peer(peers)
    port = port_of(endpoint, "udp")
    peer.send(sip_request("ACK", to_tag=to_tag, call_id="lone-ack"), (HOST, port))  # e.g. the ACK to a 2xx
    peer.send(sip_request(call_id="probe"), (HOST, port))
    first = await peer.recv_response()
    assert (first.status, first.call_id) == (200, "probe")


async def test_cancel_without_a_matching_invite_gets_481(make_endpoint: EndpointFactory, peers: list[Any]) -> None:
    endpoint = await make_endpoint("udp")
    handler = Recorder()
    endpoint.handlers["INVITE"] = handler
    peer = await udp_peer(peers)
    port = port_of(endpoint, "udp")
    peer.send(sip_request("INVITE", call_id="c2"), (HOST, port))
    assert (await peer.recv_response()).status == 100

    peer.send(sip_request("CANCEL", branch=new_branch(), call_id="c2"), (HOST, port))  # other branch
    response = await peer.recv_response()
    assert (response.status, response.cseq) == (481, (1, "CANCEL"))
    assert not (await handler.first()).cancelled


async def test_cancel_after_the_final_answer_gets_200_and_changes_nothing(
    make_endpoint: EndpointFactory, peers: list[Any],
) -> None:
    endpoint = await make_endpoint("tcp")
    endpoint.handlers["INVITE"] = Recorder(480)
    stream = await StreamPeer.connect(port_of(endpoint, "tcp"))
    peers.append(stream)
    branch = new_branch()
    stream.send(sip_request("INVITE", transport="TCP", branch=branch, call_id="c3"))
    assert [(await stream.read_response()).status for _ in range(2)] == [100, 480]

    stream.send(sip_request("CANCEL", transport="TCP", branch=branch, call_id="c3"))
    response = await stream.read_response()
    assert (response.status, response.cseq) == (200, (1, "CANCEL"))
    stream.send(sip_request(transport="TCP", call_id="probe"))
    assert (await stream.read_response()).call_id == "probe"  # no 487 in between


# =========================================================================== two endpoints


def echo(incoming: IncomingRequest) -> None:
    incoming.respond(200, headers=[("Content-Type", "text/plain")], body=incoming.request.body[::-1])


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_two_endpoints_exchange_requests(transport: TransportName, make_endpoint: EndpointFactory,
                                               scheduler: FakeTimers) -> None:
    server = await make_endpoint(transport)
    client = await make_endpoint()  # no listener: answers come back on the client's own flow
    server.handlers["MESSAGE"] = echo
    flow = await client.transport.flow_to(transport, HOST, port_of(server, transport))

    response = await client.request(outgoing(client, flow, "MESSAGE", body=b"ping-pong",
                                             extra=(("Content-Type", "text/plain"),)), flow)
    assert (response.status, response.body) == (200, b"gnop-gnip")
    options = await client.request(outgoing(client, flow), flow)
    assert options.status == 200 and "MESSAGE" in options.headers.get_all("Allow")
    if transport == "udp":  # the client's transactions linger in Completed for Timer K (T4)
        assert client.pending_transactions == 2
        scheduler.advance(5.0)
    assert client.pending_transactions == 0


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_two_endpoints_invite_ring_and_cancel(transport: TransportName, make_endpoint: EndpointFactory) -> None:
    server = await make_endpoint(transport)
    client = await make_endpoint()
    ringing = Recorder(180)
    cancelled: list[Request] = []

    def on_invite(incoming: IncomingRequest) -> None:
        incoming.on_cancel(cancelled.append)
        ringing(incoming)

    server.handlers["INVITE"] = on_invite
    states_after_ack: list[State] = []

    def watch(direction: str, message: Message, _flow: Flow) -> None:
        # observers see a message before it is matched: look at the transaction just after that
        if direction == "in" and isinstance(message, Request) and message.method == "ACK":
            tx = ringing.calls[0].transaction
            asyncio.get_running_loop().call_soon(lambda: states_after_ack.append(tx.state))

    server.observers.append(watch)
    flow = await client.transport.flow_to(transport, HOST, port_of(server, transport))
    invite = outgoing(client, flow, "INVITE")
    provisional: list[Response] = []
    got_180 = asyncio.Event()

    def on_provisional(response: Response) -> None:
        provisional.append(response)
        if response.status == 180:
            got_180.set()

    call = asyncio.create_task(client.request(invite, flow, on_provisional=on_provisional))
    await asyncio.wait_for(got_180.wait(), WAIT)
    cancel_response = await client.request(build_cancel(invite), flow)
    final = await asyncio.wait_for(call, WAIT)

    assert cancel_response.status == 200
    assert final.status == 487
    assert [r.status for r in provisional][-1] == 180
    assert [c.method for c in cancelled] == ["CANCEL"]
    # the client's transaction ACKs the 487 by itself, and the ACK matches the server transaction:
    # it leaves Completed as the ACK is handled (§17.2.1), not at Timer H (64*T1 later)
    await wait_for(lambda: bool(states_after_ack), WAIT, "the ACK")
    assert states_after_ack[0] in (State.CONFIRMED, State.TERMINATED)


async def test_an_ack_no_transaction_takes_goes_to_the_unmatched_ack_hook(
    make_endpoint: EndpointFactory, peers: list[Any],
) -> None:
    """The ACK for a 2xx matches no transaction (RFC 3261 §17.2.1): dropped without a word, unless
    someone keeping dialogs set ``unmatched_ack``."""
    endpoint = await make_endpoint("udp")
    peer = await udp_peer(peers)
    to = (HOST, port_of(endpoint, "udp"))
    sent_by = f"{HOST}:{peer.address[1]}"
    peer.send(sip_request("ACK", sent_by=sent_by, to_tag="t2xx", call_id="dropped@test"), to)
    peer.send(sip_request("OPTIONS", sent_by=sent_by, call_id="after@test"), to)
    answer, _ = await peer.recv()  # the ACK before it was handled: dropped, not answered
    assert answer.startswith(b"SIP/2.0 200") and b"after@test" in answer

    seen: list[tuple[Request, Flow]] = []
    endpoint.unmatched_ack = lambda request, flow: seen.append((request, flow))
    peer.send(sip_request("ACK", sent_by=sent_by, to_tag="t2xx", call_id="acked@test"), to)
    await wait_for(lambda: bool(seen), WAIT, "the ACK at the hook")
    request, flow = seen[0]
    assert (request.method, request.call_id, flow.remote) == ("ACK", "acked@test", peer.address)
    assert peer.queue.empty()  # an ACK is never answered


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_request_back_over_the_connection_the_other_side_opened(
    transport: TransportName, make_endpoint: EndpointFactory,
) -> None:
    server = await make_endpoint(transport)
    client = await make_endpoint("tcp")  # has a listener of its own; the connection must be used anyway
    register = Recorder(200)
    server.handlers["REGISTER"] = register
    flow = await client.transport.flow_to(transport, HOST, port_of(server, transport))
    assert (await client.request(outgoing(client, flow, "REGISTER"), flow)).status == 200
    inbound = register.calls[0].flow
    assert not inbound.outbound and inbound.remote == flow.local

    seen: list[Flow] = []

    def on_message(incoming: IncomingRequest) -> None:
        seen.append(incoming.flow)
        incoming.respond(200)

    client.handlers["MESSAGE"] = on_message
    response = await server.request(outgoing(server, inbound, "MESSAGE"), inbound)
    assert response.status == 200
    assert seen == [flow]  # arrived on (and was answered over) the connection the client opened


async def test_flow_closed_listeners_hear_about_closed_connections(make_endpoint: EndpointFactory,
                                                                  peers: list[Any]) -> None:
    endpoint = await make_endpoint("tcp")
    closed: asyncio.Queue[tuple[Flow, str]] = asyncio.Queue()
    endpoint.flow_closed_listeners.append(lambda flow, reason: closed.put_nowait((flow, reason)))

    def broken(flow: Flow, reason: str) -> None:
        raise RuntimeError("listener bug")

    endpoint.flow_closed_listeners.insert(0, broken)  # a broken listener must not stop the others
    stream = await StreamPeer.connect(port_of(endpoint, "tcp"))
    stream.send(sip_request(transport="TCP", call_id="x"))
    await stream.read_response()
    await stream.close()

    flow, reason = await asyncio.wait_for(closed.get(), WAIT)
    assert flow.remote == stream.address and "closed" in reason
