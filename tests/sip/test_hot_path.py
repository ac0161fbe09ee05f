"""The REGISTER hot path's shortcuts behave like the general code they stand in for.

Header index and prepend, the header reader on plain and odd blocks, Via and parameter fast paths,
list splitting, the registrar-contact check that parses only candidates, the known client key,
the release of ended transactions, coalesced stream writes and drained UDP sockets.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipis.clock import FakeClock
from sipis.sip.digest import Credentials
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.framing import FramingError, _content_length, _content_length_by_line
from sipis.sip.message import (
    _NOT_QUICK,
    Headers,
    Request,
    Response,
    SipParseError,
    SipURI,
    Via,
    _quick_branch,
    _quick_via,
    first_list_element,
    make_response,
    parse_message,
    split_list,
)
from sipis.sip.register import Binding, _granted_expires
from sipis.sip.transaction import ClientKey, ClientNonInviteTransaction, TimerSettings, client_key
from sipis.sip.transport import Flow, ListenSpec
from sipis.timers import FakeTimers
from tests.sip.test_transport import HOST, WAIT, Harness, RawServer, UdpPeer, sip_request


def request_with(branch: str, method: str = "OPTIONS") -> Request:
    request = parse_message(sip_request(method, branch=branch))
    assert isinstance(request, Request)
    return request


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    made = Harness(answer=False, keepalive_interval=0)
    yield made
    await made.layer.close()

# --------------------------------------------------------------------------- headers


def test_prepend_puts_the_field_first_and_keeps_lookups_right() -> None:
    headers = Headers([("Via", "SIP/2.0/UDP a;branch=z9hG4bK1"), ("To", "<sip:b@h>")])
    headers.prepend("v", "SIP/2.0/TCP c;branch=z9hG4bK2")
    assert next(iter(headers)) == ("Via", "SIP/2.0/TCP c;branch=z9hG4bK2")
    assert headers.get("Via") == "SIP/2.0/TCP c;branch=z9hG4bK2"
    assert headers.raw_values("VIA") == ["SIP/2.0/TCP c;branch=z9hG4bK2", "SIP/2.0/UDP a;branch=z9hG4bK1"]
    headers.remove("via")
    assert "Via" not in headers and list(headers) == [("To", "<sip:b@h>")]
    headers.set("x-foo", "1")
    headers.add("X-Foo", "2")
    assert headers.raw_values("X-FOO") == ["1", "2"]


@pytest.mark.parametrize("name, value", [("Via", "a\r\nEvil: 1"), ("Via", "a\nb"), ("Via", "a\x00"),
                                         ("Bad Name", "x"), ("Evil:", "x")])
def test_prepend_refuses_header_injection(name: str, value: str) -> None:
    headers = Headers()
    with pytest.raises(ValueError):
        headers.prepend(name, value)
    assert len(headers) == 0


def test_a_copy_has_its_own_index() -> None:
    headers = Headers([("Contact", "<sip:a@h>")])
    clone = headers.copy()
    clone.add("Contact", "<sip:b@h>")
    clone.remove("To")
    assert headers.get_all("Contact") == ["<sip:a@h>"]
    assert clone.get_all("Contact") == ["<sip:a@h>", "<sip:b@h>"]


@pytest.mark.parametrize("value, parts", [
    ("a, b ,, c", ["a", "b", "c"]),
    ("<sip:a@h;x=1,2>;q=1, <sip:b@h>", ["<sip:a@h;x=1,2>;q=1", "<sip:b@h>"]),
    ('"Bell, A." <sip:a@h>, b', ['"Bell, A." <sip:a@h>', "b"]),
    ('"x\\", y" <sip:a@h>, c', ['"x\\", y" <sip:a@h>', "c"]),
    ('"unterminated, a', ['"unterminated, a']),
    ("<unclosed, a", ["<unclosed, a"]),
    (" , ,", []),
])
def test_list_splitting(value: str, parts: list[str]) -> None:
    assert split_list(value) == parts
    assert first_list_element(value) == (parts[0] if parts else None)


# --------------------------------------------------------------------------- parsing

PLAIN = (b"SIP/2.0 200 OK\r\n"
         b"Via: SIP/2.0/UDP 192.0.2.1:5060;rport=5060;branch=z9hG4bKx;received=192.0.2.9\r\n"
         b"From: <sip:a@h>;tag=1\r\nTo: <sip:a@h>;tag=2\r\nCall-ID: c1\r\nCSeq: 2 REGISTER\r\n"
         b'Contact: <sip:a@192.0.2.1:5060;transport=tcp>;expires=60;received="sip:192.0.2.9:1"\r\n'
         b"Content-Length: 0\r\n\r\n")


@pytest.mark.parametrize("variant", [
    PLAIN.replace(b"\r\n", b"\n"),                      # bare LF
    PLAIN.replace(b"Call-ID: c1", b"Call-ID:   c1 \t"),  # spaces around the value
    PLAIN.replace(b"CSeq: 2 REGISTER", b"CSeq: 2\r\n REGISTER"),  # folded
    PLAIN.replace(b"From:", b"f  :"),                   # compact form, space before the colon
])
def test_odd_but_valid_header_blocks_read_like_the_plain_one(variant: bytes) -> None:
    reference, other = parse_message(PLAIN), parse_message(variant)
    assert list(other.headers) == list(reference.headers)
    assert other.shared_top_via() == reference.shared_top_via() and other.cseq == reference.cseq


@pytest.mark.parametrize("line", [b"Expires", b"X-Odd", b": 1", b"Bad Name: 1"])
def test_a_line_that_is_no_field_fails_whatever_its_name(line: bytes) -> None:
    request = sip_request("OPTIONS").replace(b"Content-Length", line + b"\r\nContent-Length")
    with pytest.raises(SipParseError, match="bad header line") as caught:
        parse_message(request)
    assert caught.value.partial is not None  # what a response is built from is intact: a 400


def test_a_control_character_still_fails_the_field() -> None:
    with pytest.raises(SipParseError, match="control character"):
        parse_message(PLAIN.replace(b"Call-ID: c1", b"Call-ID: c\x011"))


@pytest.mark.parametrize("text, transport, host, port, params", [
    ("SIP/2.0/udp h.example;branch=z9hG4bK1;rport", "UDP", "h.example", None,
     {"branch": "z9hG4bK1", "rport": None}),
    ("SIP/2.0/TCP 192.0.2.1:5060 ; Branch = z9hG4bK2", "TCP", "192.0.2.1", 5060, {"branch": "z9hG4bK2"}),
    ('SIP/2.0/TLS [2001:db8::1]:5061;x="a;b"', "TLS", "[2001:db8::1]", 5061, {"x": '"a;b"'}),
    ("SIP / 2.0 / UDP h : 5060;received=1.2.3.4", "UDP", "h", 5060, {"received": "1.2.3.4"}),
])
def test_via_parses_the_same_by_either_path(text: str, transport: str, host: str, port: int | None,
                                            params: dict[str, str | None]) -> None:
    assert Via.parse(text) == Via(transport, host, port, params)


@pytest.mark.parametrize("text", ["SIP/2.0/UDP h:65536;branch=z9hG4bK1", "SIP/2.0/UDP h:0",
                                  "SIP/2.0/UDP h;branch", "SIP/2.0/UDP h;;", "SIP/2.0/UDP [zz]:1"])
def test_via_the_fast_path_does_not_accept_what_the_parser_rejects(text: str) -> None:
    if text.endswith(";branch") or text.endswith(";;"):
        assert Via.parse(text).host == "h"  # a flag and empty parameters are fine
        return
    with pytest.raises(SipParseError):
        Via.parse(text)


def test_the_shared_top_via_follows_header_changes() -> None:
    response = parse_message(PLAIN)
    assert response.branch == "z9hG4bKx"
    copy = response.top_via
    copy.params["branch"] = "changed"  # a copy: the cached one stays
    assert response.branch == "z9hG4bKx"
    response.headers.set("Via", "SIP/2.0/UDP h;branch=z9hG4bKy")
    assert response.branch == "z9hG4bKy"
    response.headers = Headers([("Via", "SIP/2.0/UDP h;branch=z9hG4bKz"), ("CSeq", "3 REGISTER")])
    assert response.branch == "z9hG4bKz" and response.cseq == (3, "REGISTER")


# --------------------------------------------------------------------------- register


def binding(contact_uri: str, **params: str | None) -> Binding:
    return Binding(aor=SipURI.parse("sip:alice@example.net"), registrar=SipURI.parse("sip:example.net"),
                   credentials=Credentials("alice", "secret"), contact_params=dict(params),
                   contact_uri=contact_uri)


def ok_with(*contacts: str) -> Response:
    response = parse_message(PLAIN)
    assert isinstance(response, Response)
    response.headers.remove("Contact")
    for contact in contacts:
        response.headers.add("Contact", contact)
    return response


def test_granted_expiry_ignores_a_malformed_foreign_binding() -> None:
    response = ok_with("<sip:bob@[nonsense>;expires=5", "<sip:alice@192.0.2.1:5070>;expires=120")
    assert _granted_expires(response, binding("sip:alice@192.0.2.1:5070"), 300) == 120


def test_granted_expiry_matches_our_uri_in_another_spelling() -> None:
    response = ok_with("<sip:alice@192.0.2.1:5071>;expires=5", "<sip:alice@HOST.example:5070;ob>;expires=90")
    assert _granted_expires(response, binding("sip:alice@host.example:5070"), 300) == 90


def test_granted_expiry_by_instance_and_fallbacks() -> None:
    instance = '"<urn:uuid:1>"'
    response = ok_with(f"<sip:other@192.0.2.7>;+sip.instance={instance};expires=45")
    assert _granted_expires(response, binding("sip:alice@h", **{"+sip.instance": instance}), 300) == 45
    assert _granted_expires(ok_with("<sip:x@y>;expires=1"), binding("sip:alice@h"), 300) == 0
    assert _granted_expires(ok_with(), binding("sip:alice@h"), 300) == 300


# --------------------------------------------------------------------------- transactions


def test_a_client_transaction_takes_a_known_key() -> None:
    request = request_with("z9hG4bKknown", "REGISTER")
    key = client_key(request)
    assert key == ClientKey("z9hG4bKknown", "REGISTER") and key.branch == "z9hG4bKknown"
    tx = ClientNonInviteTransaction(request, reliable=True, key=key)
    assert tx.key is key


def _live_marked_requests() -> int:
    """Requests marked ``X-Test: gone`` still alive (found among the objects the GC tracks; weak
    references are no use here: compiled, Request does not take them)."""
    return sum(1 for obj in gc.get_objects() if type(obj) is Request and obj.headers.get("X-Test") == "gone")


async def test_ended_transactions_are_not_kept_alive() -> None:
    """Each REGISTER's transaction ends at its final response (TCP: no Timer K); the deadline heap
    must not keep the requests until Timer F would have run out."""
    server = await RawServer.start()
    endpoint = SipEndpoint(EndpointSettings(keepalive_interval=0))
    await endpoint.start()
    try:
        flow = await endpoint.transport.flow_to("tcp", HOST, server.port)
        peer = await server.next_peer()
        probe = request_with("z9hG4bKprobe")
        probe.headers.add("X-Test", "gone")
        assert _live_marked_requests() == 1  # the count sees a live one
        del probe
        for n in range(300):
            request = request_with(f"z9hG4bKgone{n}")
            request.headers.remove("Via")
            request.headers.add("X-Test", "gone")
            endpoint.add_via(request, flow)
            waiting = asyncio.ensure_future(endpoint.request(request, flow))
            incoming = await peer.read_message()
            assert isinstance(incoming, Request)
            peer.send(make_response(incoming, 200).to_bytes())
            assert (await asyncio.wait_for(waiting, WAIT)).status == 200
            del request, waiting, incoming
        gc.collect()  # only what something still refers to survives
        alive = _live_marked_requests()
        assert alive <= 65, f"{alive} ended transactions still referenced"
    finally:
        await endpoint.close()
        await server.close()


# --------------------------------------------------------------------------- transport


async def test_writes_in_one_pass_arrive_in_order_and_close_flushes(harness: Harness) -> None:
    server = await RawServer.start()
    try:
        flow = await harness.layer.flow_to("tcp", HOST, server.port)
        peer = await server.next_peer()
        for n in range(5):
            flow.send(sip_request("OPTIONS", branch=f"z9hG4bKw{n}"))
        branches = [(await peer.read_message()).branch for _ in range(5)]
        assert branches == [f"z9hG4bKw{n}" for n in range(5)]
        flow.send(sip_request("OPTIONS", branch="z9hG4bKlast"))
        flow.close()  # the queued write goes out before the connection closes
        assert (await peer.read_message()).branch == "z9hG4bKlast"
    finally:
        await server.close()


async def test_a_burst_of_datagrams_is_read_in_full(harness: Harness) -> None:
    port = (await harness.layer.listen(ListenSpec("udp", HOST, 0))).port
    peer = await UdpPeer.open()
    try:
        for n in range(40):
            peer.send(sip_request("OPTIONS", branch=f"z9hG4bKd{n}"), (HOST, port))
        received = [(await harness.next_message())[0] for _ in range(40)]
        assert [message.branch for message in received] == [f"z9hG4bKd{n}" for n in range(40)]
    finally:
        peer.close()


# --------------------------------------------------------------------------- shortcuts vs the general way

_PARAM_NAMES = st.sampled_from(["branch", "Branch", "BRANCH", "branchx", "rport", "received", "x", "ttl", ""])
_PARAM_VALUES = st.one_of(st.none(), st.just(""), st.sampled_from(["z9hG4bK1", "5060", "192.0.2.1", "a=b", "Z"]))


@st.composite
def via_texts(draw: st.DrawFn) -> str:
    transport = draw(st.sampled_from(["UDP", "tcp", "TLS", "WSS", "XYZ"]))
    host = draw(st.sampled_from(["192.0.2.1", "h.example", "[2001:db8::1]", "bad host", ""]))
    port = draw(st.sampled_from(["", ":5060", ":0", ":65535", ":65536", ":x"]))
    params = "".join(
        f";{name}" + ("" if value is None else f"={value}")
        for name, value in draw(st.lists(st.tuples(_PARAM_NAMES, _PARAM_VALUES), max_size=5)))
    tail = draw(st.sampled_from(["", "", ";", " ", ";=x"]))
    return f"SIP/2.0/{transport} {host}{port}{params}{tail}"


@settings(max_examples=600, deadline=None)
@given(via_texts())
def test_the_quick_via_readers_agree_with_the_parser(text: str) -> None:
    try:
        reference: Via | None = Via.parse(text.replace("SIP/2.0/", "SIP/2.0 /", 1))  # the general way
    except SipParseError:
        reference = None
    quick = _quick_via(text)
    if quick is not None:
        assert quick == reference
    branch = _quick_branch(text)
    if branch is not _NOT_QUICK:
        assert reference is not None and branch == reference.branch
    assert (Via.parse(text) if reference is not None else None) == reference


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    "Content-Length: 12", "content-length:3", "l: 7", "Content-Length :  0 ", "Contentlength: 4",
    "Content-Length: x", "X: 1", " folded", "Content-Length-X: 9", "L:2",
]), max_size=6))
def test_the_framer_finds_content_length_as_reading_every_line_does(fields: list[str]) -> None:
    head = "\r\n".join(["SIP/2.0 200 OK", *fields]).encode()
    try:
        expected: int | str = _content_length_by_line(head)
    except FramingError as exc:
        expected = exc.reason
    try:
        got: int | str = _content_length(head)
    except FramingError as exc:
        got = exc.reason
    assert got == expected


async def test_a_completed_transaction_is_kept_as_its_key_until_its_timer_k_ends() -> None:
    clock = FakeClock()
    scheduler = FakeTimers(clock)
    endpoint = SipEndpoint(EndpointSettings(keepalive_interval=0, timers=TimerSettings(t4=5.0)),
                           clock=clock, scheduler=scheduler)
    await endpoint.start()
    flow = Flow("udp", ("192.0.2.1", 5070), ("192.0.2.9", 5060), False, _write=lambda _: None,
                _close=lambda: None)
    try:
        request = request_with("z9hG4bKdone", "OPTIONS")
        request.headers.remove("Via")
        endpoint.add_via(request, flow)
        waiting = asyncio.ensure_future(endpoint.request(request, flow))
        await asyncio.sleep(0)
        endpoint._on_message(make_response(request, 200), flow)
        assert (await waiting).status == 200
        assert endpoint.pending_transactions == 1  # in Completed for Timer K, as its key only
        retransmitted = make_response(request, 200)
        assert len(endpoint.table) == 0 and endpoint.table.absorbs(retransmitted, clock.monotonic())
        assert not endpoint.table.absorbs(make_response(request_with("z9hG4bKother"), 200), clock.monotonic())
        scheduler.advance(4.9)
        assert endpoint.pending_transactions == 1
        scheduler.advance(0.1)  # T4 is over: the endpoint's wake-up had the table forget the key
        assert endpoint.pending_transactions == 0 and scheduler.pending == 0
        assert not endpoint.table.absorbs(retransmitted, clock.monotonic())
    finally:
        await endpoint.close()
    assert endpoint.pending_transactions == 0


async def test_a_full_udp_socket_leaves_the_datagram_to_the_transport(harness: Harness) -> None:
    await harness.layer.listen(ListenSpec("udp", HOST, 0))
    protocol = harness.layer._udp_sockets[0]

    class Full:
        def sendto(self, data: bytes, address: tuple[str, int]) -> int:
            raise BlockingIOError

    real, protocol._sock = protocol._sock, Full()  # type: ignore[assignment]
    peer = await UdpPeer.open()
    try:
        flow = protocol.flow_for(peer.address)
        flow.send(sip_request("OPTIONS", branch="z9hG4bKqueued"))
        assert (await peer.recv_message()).branch == "z9hG4bKqueued"  # sent by the transport
        assert protocol._handed
    finally:
        protocol._sock = real
        peer.close()


async def test_udp_requests_of_one_pass_go_together_and_a_response_keeps_its_place(harness: Harness) -> None:
    await harness.layer.listen(ListenSpec("udp", HOST, 0))
    protocol = harness.layer._udp_sockets[0]
    peer = await UdpPeer.open()
    try:
        flow = protocol.flow_for(peer.address)
        flow.send(sip_request("OPTIONS", branch="z9hG4bKfirst"))
        flow.send(sip_request("OPTIONS", branch="z9hG4bKsecond"))
        assert len(protocol._out) == 2  # held until the end of this pass of the loop
        response = make_response(request_with("z9hG4bKanswer"), 180)
        flow.send(response.to_bytes())  # a response goes at once, behind what was waiting
        assert protocol._out == []
        flow.send(sip_request("OPTIONS", branch="z9hG4bKlast"))
        received = [await peer.recv_message() for _ in range(4)]
        assert [message.branch for message in received] == [
            "z9hG4bKfirst", "z9hG4bKsecond", "z9hG4bKanswer", "z9hG4bKlast"]
    finally:
        peer.close()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["sip:", "SIPS:", "sip:alice@", "sip:a:pw@", "sip:@"]),
       st.sampled_from(["127.0.0.1", "h.example", "h_x", "bad!host", "", "[::1]"]),
       st.sampled_from(["", ":5060", ":0", ":65536", ":x", ":", ":050"]))
def test_a_plain_sip_uri_parses_as_the_general_way_does(prefix: str, host: str, port: str) -> None:
    text = prefix + host + port
    try:
        reference: SipURI | None = SipURI.parse(text + "?")  # "?": never the shortcut
    except SipParseError:
        reference = None
    try:
        quick: SipURI | None = SipURI.parse(text)
    except SipParseError:
        quick = None
    assert quick == reference
