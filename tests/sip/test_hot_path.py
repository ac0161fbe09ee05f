"""The REGISTER hot path's shortcuts behave like the general code they stand in for.

Header index and prepend, the one-pass parse of plain header blocks, Via and parameter fast paths,
list splitting, the registrar-contact check that parses only candidates, the known client key,
the release of ended transactions, coalesced stream writes and drained UDP sockets.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator

import pytest

from sipis.sip.digest import Credentials
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.message import (
    Headers,
    Request,
    Response,
    SipParseError,
    SipURI,
    Via,
    first_list_element,
    make_response,
    parse_message,
    split_list,
)
from sipis.sip.register import Binding, _granted_expires
from sipis.sip.transaction import ClientKey, ClientNonInviteTransaction, client_key
from sipis.sip.transport import ListenSpec
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
    PLAIN.replace(b"CSeq: 2 REGISTER", b"CSeq: 2\r\n REGISTER"),  # folded: the general reader
    PLAIN.replace(b"From:", b"f  :"),                   # compact form, space before the colon
])
def test_plain_and_general_header_readers_agree(variant: bytes) -> None:
    reference, other = parse_message(PLAIN), parse_message(variant)
    assert list(other.headers) == list(reference.headers)
    assert other.shared_top_via() == reference.shared_top_via() and other.cseq == reference.cseq


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


async def test_ended_transactions_are_not_kept_alive() -> None:
    """Each REGISTER's transaction ends at its final response (TCP: no Timer K); the deadline heap
    must not keep the requests until Timer F would have run out."""
    server = await RawServer.start()
    endpoint = SipEndpoint(EndpointSettings(keepalive_interval=0))
    await endpoint.start()
    try:
        flow = await endpoint.transport.flow_to("tcp", HOST, server.port)
        peer = await server.next_peer()
        refs: list[weakref.ref[Request]] = []
        for n in range(300):
            request = request_with(f"z9hG4bKgone{n}")
            request.headers.remove("Via")
            endpoint.add_via(request, flow)
            refs.append(weakref.ref(request))
            waiting = asyncio.ensure_future(endpoint.request(request, flow))
            incoming = await peer.read_message()
            assert isinstance(incoming, Request)
            peer.send(make_response(incoming, 200).to_bytes())
            assert (await asyncio.wait_for(waiting, WAIT)).status == 200
            del request, waiting, incoming
        alive = sum(ref() is not None for ref in refs)
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
