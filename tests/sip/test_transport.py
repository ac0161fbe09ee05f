"""TransportLayer on loopback against raw sockets: listeners, client flows, framing, 400s, keep-alive,
connect backoff, TLS (verification, SNI, client certificates) and received/rport stamping.

Every socket binds port 0. "Nothing came back" is never asserted by waiting: the peer sends a probe
after the message under test and the first thing it gets back must be the probe's answer.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sipis.clock import FakeClock
from sipis.sip.message import Limits, Message, Request, Response, make_response, new_branch, parse_message
from sipis.sip.transport import (
    Address,
    Flow,
    JunkLog,
    ListenSpec,
    TlsSettings,
    TransportError,
    TransportLayer,
    TransportName,
)
from tests.waiting import wait_for

HOST = "127.0.0.1"
WAIT = 5.0  # a safety net against hangs, never a measured quantity


# --------------------------------------------------------------------------- SIP text


def sip_request(
    method: str = "OPTIONS",
    *,
    transport: str = "UDP",
    sent_by: str = "127.0.0.1:5999",
    branch: str | None = None,
    via_params: str = "",
    via: str | None = None,
    to_tag: str | None = None,
    call_id: str = "call-1@test",
    cseq: int = 1,
    cseq_method: str | None = None,
    body: bytes = b"",
    extra: Iterable[str] = (),
    content_length: str | None = None,
) -> bytes:
    """A request as a peer would put it on the wire."""
    top = via or f"SIP/2.0/{transport} {sent_by};branch={branch or new_branch()}{via_params}"
    lines = [
        f"{method} sip:sipis@127.0.0.1 SIP/2.0",
        f"Via: {top}",
        "Max-Forwards: 70",
        "From: <sip:peer@example.test>;tag=peer1",
        "To: <sip:sipis@example.test>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}",
        *extra,
        f"Content-Length: {len(body) if content_length is None else content_length}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse(data: bytes, *, stream: bool = False) -> Message:
    return parse_message(data, stream=stream)


def as_response(message: Message) -> Response:
    assert isinstance(message, Response), f"expected a response, got {message!r}"
    return message


# --------------------------------------------------------------------------- raw peers


class UdpPeer(asyncio.DatagramProtocol):
    """A plain UDP socket on loopback that queues what it receives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls) -> UdpPeer:
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_datagram_endpoint(cls, local_addr=(HOST, 0))
        return peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # not a subclass at run time

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.queue.put_nowait((data, (str(addr[0]), int(addr[1]))))

    @property
    def address(self) -> Address:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (host, port)

    def send(self, data: bytes, to: Address) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)

    async def recv(self) -> tuple[bytes, Address]:
        return await asyncio.wait_for(self.queue.get(), WAIT)

    async def recv_message(self) -> Message:
        data, _ = await self.recv()
        return parse(data)

    async def recv_response(self, call_id: str | None = None, *, skip: Iterable[int] = ()) -> Response:
        """The next response (for ``call_id`` if given), skipping the statuses in ``skip``."""
        skipped = set(skip)
        while True:
            response = as_response(await self.recv_message())
            if (call_id is None or response.call_id == call_id) and response.status not in skipped:
                return response

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class StreamPeer:
    """One TCP or TLS connection driven by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, ssl_ctx: ssl.SSLContext | None = None,
                      server_hostname: str | None = None) -> StreamPeer:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, ssl=ssl_ctx, server_hostname=server_hostname), WAIT)
        return cls(reader, writer)

    @property
    def address(self) -> Address:
        host, port = self.writer.get_extra_info("sockname")[:2]
        return (host, port)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_message(self) -> Message:
        """The next message; line ends before it (pongs, stray CRLFs) are skipped."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)
        while head.startswith(b"\r\n"):
            head = head[2:]
            if not head:
                head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)
        match = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
        body = await asyncio.wait_for(self.reader.readexactly(int(match[1])), WAIT) if match else b""
        return parse(head + body, stream=True)

    async def read_response(self) -> Response:
        return as_response(await self.read_message())

    async def read_exactly(self, count: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(count), WAIT)

    async def closed_by_other_side(self) -> bool:
        """True once the other side closed (EOF or reset); whatever else arrives first is dropped."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), WAIT):
                pass
        except (ConnectionError, ssl.SSLError):
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass


class RawServer:
    """A listening TCP/TLS socket in the test: accepted connections come out of ``accepted``."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[StreamPeer] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.peers: list[StreamPeer] = []

    @classmethod
    async def start(cls, ssl_ctx: ssl.SSLContext | None = None) -> RawServer:
        raw = cls()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = StreamPeer(reader, writer)
            raw.peers.append(peer)
            raw.accepted.put_nowait(peer)

        raw.server = await asyncio.start_server(accept, HOST, 0, ssl=ssl_ctx)
        return raw

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def next_peer(self) -> StreamPeer:
        return await asyncio.wait_for(self.accepted.get(), WAIT)

    async def close(self) -> None:
        for peer in self.peers:
            await peer.close()
        if self.server is not None:
            self.server.close()
            await asyncio.wait_for(self.server.wait_closed(), WAIT)


# --------------------------------------------------------------------------- the layer under test


class Harness:
    """A TransportLayer whose handler records everything and answers requests with 200."""

    def __init__(self, *, answer: bool = True, **kwargs: Any) -> None:
        self.answer = answer
        self.messages: asyncio.Queue[tuple[Message, Flow]] = asyncio.Queue()
        self.closed: asyncio.Queue[tuple[Flow, str]] = asyncio.Queue()
        self.layer = TransportLayer(self.on_message, self.on_closed, **kwargs)

    def on_message(self, message: Message, flow: Flow) -> None:
        self.messages.put_nowait((message, flow))
        if self.answer and isinstance(message, Request) and message.method != "ACK":
            flow.send(make_response(message, 200, to_tag="uas").to_bytes())

    def on_closed(self, flow: Flow, reason: str) -> None:
        self.closed.put_nowait((flow, reason))

    async def next_message(self) -> tuple[Message, Flow]:
        return await asyncio.wait_for(self.messages.get(), WAIT)

    async def next_closed(self) -> tuple[Flow, str]:
        return await asyncio.wait_for(self.closed.get(), WAIT)

    async def listen(self, transport: TransportName) -> int:
        return (await self.layer.listen(ListenSpec(transport, HOST, 0))).port


HarnessFactory = Callable[..., Harness]


@pytest.fixture
async def make_harness() -> AsyncIterator[HarnessFactory]:
    made: list[Harness] = []

    def make(**kwargs: Any) -> Harness:
        kwargs.setdefault("keepalive_interval", 0)
        harness = Harness(**kwargs)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.layer.close()


@pytest.fixture
async def cleanup() -> AsyncIterator[Callable[[Callable[[], Awaitable[None]] | Callable[[], None]], None]]:
    """Register closers for raw peers and servers; they run after the test, newest first."""
    closers: list[Callable[[], Awaitable[None]] | Callable[[], None]] = []
    yield closers.append
    for closer in reversed(closers):
        result = closer()
        if result is not None:
            await result


Cleanup = Callable[[Callable[[], Awaitable[None]] | Callable[[], None]], None]


async def udp_peer(cleanup: Cleanup) -> UdpPeer:
    peer = await UdpPeer.open()
    cleanup(peer.close)
    return peer


async def stream_peer(cleanup: Cleanup, port: int, **kwargs: Any) -> StreamPeer:
    peer = await StreamPeer.connect(port, **kwargs)
    cleanup(peer.close)
    return peer


async def raw_server(cleanup: Cleanup, ssl_ctx: ssl.SSLContext | None = None) -> RawServer:
    server = await RawServer.start(ssl_ctx)
    cleanup(server.close)
    return server


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing we use

    def server_settings(self) -> TlsSettings:
        return TlsSettings(ca_file=str(self.ca), server_cert=str(self.server_cert),
                           server_key=str(self.server_key))

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(self.ca))
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


SERVER_NAME = "sip.example.test"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _key_pem(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
          sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(folder: Path) -> Pki:
    """A test CA, a server certificate for SERVER_NAME and 127.0.0.1, a client certificate."""
    ca, ca_key = _ca("sipis test CA")
    other_ca, _ = _ca("unrelated CA")
    server, server_key = _leaf(
        ca, ca_key, SERVER_NAME,
        [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address(HOST))],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client, client_key = _leaf(ca, ca_key, "sipis-client", [], ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(
        ca=_pem(folder / "ca.pem", ca),
        server_cert=_pem(folder / "server.pem", server),
        server_key=_key_pem(folder / "server.key", server_key),
        client_cert=_pem(folder / "client.pem", client),
        client_key=_key_pem(folder / "client.key", client_key),
        other_ca=_pem(folder / "other-ca.pem", other_ca),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# =========================================================================== listeners


async def test_udp_listener_answers_to_the_sending_socket(make_harness: HarnessFactory, cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("udp")
    peer = await udp_peer(cleanup)
    peer.send(sip_request(call_id="udp-1"), (HOST, port))

    data, source = await peer.recv()
    response = as_response(parse(data))
    assert (response.status, response.call_id) == (200, "udp-1")
    assert source == (HOST, port)  # from the listening socket itself
    message, flow = await harness.next_message()
    assert isinstance(message, Request) and message.method == "OPTIONS"
    assert (flow.transport, flow.remote, flow.local, flow.outbound) == ("udp", peer.address, (HOST, port), False)
    assert harness.layer.find_flow("udp", *peer.address) is flow


async def test_tcp_listener_answers_each_connection_on_itself(make_harness: HarnessFactory,
                                                              cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("tcp")
    first = await stream_peer(cleanup, port)
    second = await stream_peer(cleanup, port)
    # two pipelined requests in one write on the first connection, one on the second
    first.send(sip_request(transport="TCP", call_id="a-1") + sip_request(transport="TCP", call_id="a-2"))
    second.send(sip_request(transport="TCP", call_id="b-1"))

    assert [(await first.read_response()).call_id for _ in range(2)] == ["a-1", "a-2"]
    assert (await second.read_response()).call_id == "b-1"
    flows = {}
    for _ in range(3):
        message, flow = await harness.next_message()
        flows[message.call_id] = flow
    assert flows["a-1"] is flows["a-2"] and flows["a-1"] is not flows["b-1"]
    assert flows["a-1"].remote == first.address and flows["b-1"].remote == second.address
    assert all(flow.reliable and not flow.outbound for flow in flows.values())


async def test_tls_listener_answers_a_verifying_client(make_harness: HarnessFactory, cleanup: Cleanup,
                                                       pki: Pki) -> None:
    harness = make_harness(tls=pki.server_settings())
    port = await harness.listen("tls")
    peer = await stream_peer(cleanup, port, ssl_ctx=pki.client_context(), server_hostname=SERVER_NAME)
    peer.send(sip_request(transport="TLS", call_id="tls-1"))

    response = await peer.read_response()
    assert (response.status, response.call_id) == (200, "tls-1")
    _, flow = await harness.next_message()
    assert (flow.transport, flow.via_transport, flow.remote) == ("tls", "TLS", peer.address)


async def test_tls_listener_needs_a_certificate(make_harness: HarnessFactory) -> None:
    harness = make_harness()
    with pytest.raises(ValueError, match="certificate"):
        await harness.listen("tls")


def test_listen_spec_parses_and_prints() -> None:
    assert ListenSpec.parse("udp:127.0.0.1:5070") == ListenSpec("udp", "127.0.0.1", 5070)
    assert ListenSpec.parse("TLS:[::1]:5071") == ListenSpec("tls", "::1", 5071)
    assert str(ListenSpec("tls", "::1", 5071)) == "tls:[::1]:5071"
    for bad in ("sctp:1.2.3.4:5060", "udp:1.2.3.4", "udp::5060", "udp:1.2.3.4:99999", "tcp:host:x"):
        with pytest.raises(ValueError):
            ListenSpec.parse(bad)


# =========================================================================== client flows


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_request_on_a_connection_we_opened_is_answered_on_it(
    transport: TransportName, make_harness: HarnessFactory, cleanup: Cleanup, pki: Pki,
) -> None:
    harness = make_harness(tls=TlsSettings(ca_file=str(pki.ca)))
    await harness.listen("tcp")  # a listener of our own exists, the answer must still not use it
    server = await raw_server(cleanup, pki.server_context() if transport == "tls" else None)

    flow = await harness.layer.flow_to(transport, HOST, server.port)
    assert flow.outbound and flow.transport == transport
    peer = await server.next_peer()
    # The peer's Via names a host we could never reach: only the connection leads back.
    peer.send(sip_request(transport=transport.upper(), sent_by="192.0.2.99:5060", call_id="back-1"))

    response = await peer.read_response()
    assert (response.status, response.call_id) == (200, "back-1")
    assert response.top_via.params["received"] == HOST
    message, received_on = await harness.next_message()
    assert isinstance(message, Request)
    assert received_on is flow
    assert await harness.layer.flow_to(transport, HOST, server.port) is flow  # reused, not reopened
    assert server.accepted.empty()


async def test_flow_to_reuses_and_sends_on_the_same_connection(make_harness: HarnessFactory,
                                                               cleanup: Cleanup) -> None:
    harness = make_harness()
    server = await raw_server(cleanup)
    flow = await harness.layer.flow_to("tcp", HOST, server.port)
    peer = await server.next_peer()
    again = await harness.layer.flow_to("tcp", f"[{HOST}]", server.port)  # brackets are tolerated
    assert again is flow
    again.send(sip_request(transport="TCP", call_id="reuse"))
    assert (await peer.read_message()).call_id == "reuse"
    assert flow.remote == (HOST, server.port) and flow.local == peer.writer.get_extra_info("peername")[:2]


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
async def test_inbound_connection_from_the_same_address_does_not_displace_our_flow(
    make_harness: HarnessFactory, cleanup: Cleanup,
) -> None:
    # A peer that connects back from its listening port (as a PBX on 5060 may) gives an inbound flow
    # with the same key as the one we opened: we keep using ours, and answer the peer on its own.
    harness = make_harness()
    port = await harness.listen("tcp")
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[StreamPeer] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(StreamPeer(reader, writer))

    server = await asyncio.start_server(accept, HOST, 0, reuse_port=True)
    peer_port: int = server.sockets[0].getsockname()[1]

    async def close_server() -> None:
        server.close()
        await server.wait_closed()

    cleanup(close_server)
    ours = await harness.layer.flow_to("tcp", HOST, peer_port)
    cleanup((await asyncio.wait_for(accepted.get(), WAIT)).close)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, peer_port))
    sock.setblocking(False)
    await loop.sock_connect(sock, (HOST, port))
    back = StreamPeer(*await asyncio.open_connection(sock=sock))
    cleanup(back.close)
    back.send(sip_request(transport="TCP", call_id="from-5060"))

    assert (await back.read_response()).call_id == "from-5060"
    _, inbound = await harness.next_message()
    assert inbound is not ours and inbound.key == ours.key and not inbound.outbound
    assert harness.layer.find_flow("tcp", HOST, peer_port) is ours
    assert await harness.layer.flow_to("tcp", HOST, peer_port) is ours


async def test_concurrent_flow_to_opens_one_connection(make_harness: HarnessFactory, cleanup: Cleanup,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    harness = make_harness()
    server = await raw_server(cleanup)
    loop = asyncio.get_running_loop()
    real = loop.create_connection
    calls: list[tuple[Any, ...]] = []

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        await asyncio.sleep(0)  # let the other callers arrive while this connect is under way
        return await real(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", counting)
    flows = await asyncio.gather(*(harness.layer.flow_to("tcp", HOST, server.port) for _ in range(5)))

    assert len(calls) == 1
    assert all(flow is flows[0] for flow in flows)
    await server.next_peer()
    assert server.accepted.empty()


async def test_udp_flow_to_uses_one_socket_and_hands_replies_to_the_same_flow(
    make_harness: HarnessFactory, cleanup: Cleanup,
) -> None:
    harness = make_harness(answer=False)
    peer = await udp_peer(cleanup)
    flow = await harness.layer.flow_to("udp", *peer.address)
    assert (flow.transport, flow.remote, flow.reliable) == ("udp", peer.address, False)
    assert await harness.layer.flow_to("udp", *peer.address) is flow

    flow.send(sip_request(call_id="out-1"))
    data, source = await peer.recv()
    request = parse(data)
    assert isinstance(request, Request) and request.call_id == "out-1"
    assert source == flow.local
    peer.send(make_response(request, 200, to_tag="x").to_bytes(), source)
    message, received_on = await harness.next_message()
    assert isinstance(message, Response) and message.status == 200
    assert received_on is flow


async def test_closed_flow_is_replaced_and_refuses_to_send(make_harness: HarnessFactory, cleanup: Cleanup) -> None:
    harness = make_harness()
    server = await raw_server(cleanup)
    flow = await harness.layer.flow_to("tcp", HOST, server.port)
    peer = await server.next_peer()
    await peer.close()

    closed, reason = await harness.next_closed()
    assert closed is flow and not flow.alive and "closed by peer" in reason
    with pytest.raises(TransportError):
        flow.send(b"OPTIONS")
    assert harness.layer.find_flow("tcp", HOST, server.port) is None
    fresh = await harness.layer.flow_to("tcp", HOST, server.port)
    assert fresh is not flow and fresh.alive
    await server.next_peer()


# =========================================================================== TLS client side


async def _tls_request_roundtrip(harness: Harness, server: RawServer, **flow_kwargs: Any) -> Flow:
    flow = await harness.layer.flow_to("tls", HOST, server.port, **flow_kwargs)
    peer = await server.next_peer()
    flow.send(sip_request(transport="TLS", call_id="tls-out"))
    message = await peer.read_message()
    assert isinstance(message, Request) and message.call_id == "tls-out"
    return flow


async def test_tls_client_verifies_against_the_ca_file(make_harness: HarnessFactory, cleanup: Cleanup,
                                                       pki: Pki) -> None:
    server = await raw_server(cleanup, pki.server_context())
    harness = make_harness(tls=TlsSettings(ca_file=str(pki.ca)))
    flow = await _tls_request_roundtrip(harness, server)
    assert flow.transport == "tls" and flow.outbound


async def test_tls_client_rejects_a_certificate_from_another_ca(make_harness: HarnessFactory, cleanup: Cleanup,
                                                                pki: Pki) -> None:
    server = await raw_server(cleanup, pki.server_context())
    harness = make_harness(tls=TlsSettings(ca_file=str(pki.other_ca)))
    with pytest.raises(TransportError, match="certificate verify failed"):
        await harness.layer.flow_to("tls", HOST, server.port)
    assert harness.layer.find_flow("tls", HOST, server.port) is None


async def test_tls_client_without_verification_accepts_an_untrusted_certificate(
    make_harness: HarnessFactory, cleanup: Cleanup, pki: Pki,
) -> None:
    server = await raw_server(cleanup, pki.server_context())
    harness = make_harness(tls=TlsSettings(ca_file=str(pki.other_ca), verify=False))
    await _tls_request_roundtrip(harness, server, server_name="not-the-name.example")


async def test_tls_client_sends_sni_and_checks_the_name(make_harness: HarnessFactory, cleanup: Cleanup,
                                                        pki: Pki) -> None:
    seen: list[str | None] = []

    def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    ctx = pki.server_context()
    ctx.sni_callback = record_sni  # type: ignore[assignment]  # typeshed says SSLSocket; asyncio gives SSLObject
    server = await raw_server(cleanup, ctx)
    harness = make_harness(tls=TlsSettings(ca_file=str(pki.ca)))

    await _tls_request_roundtrip(harness, server, server_name=SERVER_NAME)
    assert seen == [SERVER_NAME]

    other = make_harness(tls=TlsSettings(ca_file=str(pki.ca)))
    with pytest.raises(TransportError, match="Hostname mismatch"):
        await other.layer.flow_to("tls", HOST, server.port, server_name="wrong.example.test")
    assert seen[-1] == "wrong.example.test"


async def test_tls_client_certificate_is_presented_to_a_server_that_requires_one(
    make_harness: HarnessFactory, cleanup: Cleanup, pki: Pki,
) -> None:
    server = await raw_server(cleanup, pki.server_context(require_client_cert=True))
    harness = make_harness(tls=TlsSettings(ca_file=str(pki.ca), client_cert=str(pki.client_cert),
                                           client_key=str(pki.client_key)))
    await _tls_request_roundtrip(harness, server)
    peer_cert = server.peers[0].writer.get_extra_info("peercert")
    assert peer_cert["subject"] == ((("commonName", "sipis-client"),),)


async def test_tls_server_requiring_a_client_certificate_refuses_a_client_without(
    make_harness: HarnessFactory, cleanup: Cleanup, pki: Pki,
) -> None:
    server = await raw_server(cleanup, pki.server_context(require_client_cert=True))
    harness = make_harness(tls=TlsSettings(ca_file=str(pki.ca)))
    try:
        flow = await harness.layer.flow_to("tls", HOST, server.port)
    except TransportError:
        pass  # TLS 1.2: the handshake itself fails
    else:  # TLS 1.3: the client finishes first, then the server's alert closes the flow
        closed, _ = await harness.next_closed()
        assert closed is flow
    assert not server.peers  # the server never got a usable connection


async def test_tls_with_the_self_signed_certificate_of_tls_certs(make_harness: HarnessFactory,
                                                                  tmp_path: Path) -> None:
    from sipis.tls_certs import ensure_self_signed

    cert, key = tmp_path / "sip.pem", tmp_path / "sip.key"
    ensure_self_signed(cert, key, [HOST])
    server = make_harness(tls=TlsSettings(server_cert=str(cert), server_key=str(key)))
    port = await server.listen("tls")
    client = make_harness(answer=False, tls=TlsSettings(ca_file=str(cert)))  # pinned as its own anchor

    flow = await client.layer.flow_to("tls", HOST, port)
    flow.send(sip_request(transport="TLS", call_id="pinned"))
    message, received_on = await client.next_message()
    assert isinstance(message, Response) and (message.status, message.call_id) == (200, "pinned")
    assert received_on is flow


# =========================================================================== framing


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(sip_request(transport="TCP", content_length="100000"), id="content-length-over-limit"),
        pytest.param(sip_request(transport="TCP", content_length="twelve"), id="content-length-not-a-number"),
        pytest.param(b"\x16\x03\x01" + b"A" * 3000, id="no-header-end-within-limit"),
    ],
)
async def test_framing_error_closes_only_that_connection(garbage: bytes, make_harness: HarnessFactory,
                                                         cleanup: Cleanup) -> None:
    harness = make_harness(limits=Limits(max_message_bytes=4096, max_header_bytes=1024))
    tcp_port = await harness.listen("tcp")
    udp_port = await harness.listen("udp")
    bad = await stream_peer(cleanup, tcp_port)
    good = await stream_peer(cleanup, tcp_port)
    udp = await udp_peer(cleanup)
    good.send(sip_request(transport="TCP", call_id="before"))
    assert (await good.read_response()).call_id == "before"

    bad.send(garbage)
    assert await bad.closed_by_other_side()
    dead, reason = await harness.next_closed()
    assert dead.remote == bad.address and not dead.alive and "framing error" in reason
    assert harness.layer.stats["framing_errors"] == 1

    good.send(sip_request(transport="TCP", call_id="after"))
    assert (await good.read_response()).call_id == "after"
    udp.send(sip_request(call_id="udp-after"), (HOST, udp_port))
    assert (await udp.recv_response()).call_id == "udp-after"
    assert harness.closed.empty()


async def test_messages_before_a_framing_error_in_the_same_read_are_still_handled(
    make_harness: HarnessFactory, cleanup: Cleanup,
) -> None:
    harness = make_harness(limits=Limits(max_message_bytes=4096))
    port = await harness.listen("tcp")
    peer = await stream_peer(cleanup, port)
    peer.send(sip_request(transport="TCP", call_id="intact") + sip_request(transport="TCP", content_length="9999"))

    assert (await peer.read_response()).call_id == "intact"
    assert await peer.closed_by_other_side()
    message, _ = await harness.next_message()
    assert message.call_id == "intact"


async def test_message_split_across_reads_and_keepalive_between_messages(make_harness: HarnessFactory,
                                                                        cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("tcp")
    peer = await stream_peer(cleanup, port)
    body = b"v=0\r\n\r\nsplit body"  # a blank line inside the body must not cut it
    data = sip_request("MESSAGE", transport="TCP", call_id="split", body=body)
    for i in range(0, len(data), 7):
        peer.send(data[i : i + 7])
        await peer.writer.drain()
        await asyncio.sleep(0)
    assert (await peer.read_response()).call_id == "split"
    message, _ = await harness.next_message()
    assert message.body == body


# =========================================================================== malformed input


BAD_MAX_FORWARDS = sip_request(call_id="bad-1", extra=["Max-Forwards: lots"])
CSEQ_MISMATCH = sip_request("OPTIONS", call_id="bad-2", cseq_method="INVITE")


@pytest.mark.parametrize("bad", [BAD_MAX_FORWARDS, CSEQ_MISMATCH], ids=["max-forwards", "cseq-method"])
async def test_malformed_udp_request_gets_400(bad: bytes, make_harness: HarnessFactory, cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("udp")
    peer = await udp_peer(cleanup)
    peer.send(bad, (HOST, port))

    response = await peer.recv_response()
    assert response.status == 400 and response.reason.startswith("Bad Request")
    assert response.call_id == parse_call_id(bad)
    peer.send(sip_request(call_id="probe"), (HOST, port))
    assert (await peer.recv_response()).call_id == "probe"
    message, _ = await harness.next_message()
    assert message.call_id == "probe"  # the malformed request never reached the handler
    assert harness.layer.stats["parse_errors"] == 1


async def test_malformed_tcp_request_gets_400_and_the_connection_stays(make_harness: HarnessFactory,
                                                                       cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("tcp")
    peer = await stream_peer(cleanup, port)
    peer.send(sip_request(transport="TCP", call_id="bad-tcp", extra=["Max-Forwards: lots"]))

    response = await peer.read_response()
    assert (response.status, response.call_id) == (400, "bad-tcp")
    peer.send(sip_request(transport="TCP", call_id="probe"))
    assert (await peer.read_response()).call_id == "probe"
    message, _ = await harness.next_message()
    assert message.call_id == "probe"


NO_VIA = b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: nonsense\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\n" \
         b"Call-ID: novia\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
MISSING_VIA = NO_VIA.replace(b"Via: nonsense\r\n", b"")
NOT_SIP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
BROKEN_RESPONSE = b"SIP/2.0 200 OK\r\nVia: what\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("bad", [NO_VIA, MISSING_VIA, NOT_SIP, BROKEN_RESPONSE, b"\x00\xff" * 40 + b"\r\n\r\n"],
                         ids=["bad-via", "missing-via", "http", "broken-response", "binary"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_unanswerable_garbage_gets_nothing_and_the_listener_carries_on(
    bad: bytes, transport: TransportName, make_harness: HarnessFactory, cleanup: Cleanup,
) -> None:
    harness = make_harness()
    port = await harness.listen(transport)
    probe = sip_request(transport=transport.upper(), call_id="probe")
    if transport == "udp":
        peer = await udp_peer(cleanup)
        peer.send(bad, (HOST, port))
        peer.send(probe, (HOST, port))
        first = await peer.recv_response()
    else:
        stream = await stream_peer(cleanup, port)
        stream.send(bad)
        stream.send(probe)
        first = await stream.read_response()
    assert (first.status, first.call_id) == (200, "probe")  # nothing came back for the garbage
    message, _ = await harness.next_message()
    assert message.call_id == "probe"


def parse_call_id(data: bytes) -> str:
    match = re.search(rb"Call-ID: (\S+)", data)
    assert match is not None
    return match[1].decode()


# =========================================================================== keep-alive


async def test_peer_ping_gets_a_pong(make_harness: HarnessFactory, cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("tcp")
    peer = await stream_peer(cleanup, port)
    peer.send(b"\r\n\r\n")
    assert await peer.read_exactly(2) == b"\r\n"
    peer.send(b"\r\n\r\n" + sip_request(transport="TCP", call_id="after-ping"))
    assert await peer.read_exactly(2) == b"\r\n"
    assert (await peer.read_response()).call_id == "after-ping"
    assert harness.closed.empty()


async def test_ping_on_a_connection_we_opened_gets_a_pong(make_harness: HarnessFactory, cleanup: Cleanup) -> None:
    harness = make_harness()
    server = await raw_server(cleanup)
    await harness.layer.flow_to("tcp", HOST, server.port)
    peer = await server.next_peer()
    peer.send(b"\r\n\r\n")
    assert await peer.read_exactly(2) == b"\r\n"


async def test_outbound_flow_pings_and_is_closed_when_pongs_stop(make_harness: HarnessFactory,
                                                                 cleanup: Cleanup) -> None:
    # No listener at all: a client-only layer must keep its flows alive too.
    harness = make_harness(keepalive_interval=0.2, pong_timeout=0.5)
    server = await raw_server(cleanup)
    flow = await harness.layer.flow_to("tcp", HOST, server.port)
    peer = await server.next_peer()

    for _ in range(3):
        assert await peer.read_exactly(4) == b"\r\n\r\n"
        assert flow.ping_sent_at is not None
        peer.send(b"\r\n")  # pong
    assert await peer.read_exactly(4) == b"\r\n\r\n"  # pinged again: the pongs kept it alive
    assert flow.alive and harness.closed.empty()

    # this ping stays unanswered
    closed, reason = await harness.next_closed()
    assert closed is flow and "pong" in reason and not flow.alive
    assert await peer.closed_by_other_side()
    assert harness.layer.find_flow("tcp", HOST, server.port) is None


async def test_inbound_flows_are_not_pinged(make_harness: HarnessFactory, cleanup: Cleanup) -> None:
    harness = make_harness(keepalive_interval=0.2, pong_timeout=0.5)
    port = await harness.listen("tcp")
    server = await raw_server(cleanup)
    await harness.layer.flow_to("tcp", HOST, server.port)
    outbound_peer = await server.next_peer()
    inbound = await stream_peer(cleanup, port)
    inbound.send(sip_request(transport="TCP", call_id="in"))
    assert (await inbound.read_response()).call_id == "in"

    # two pings go out on our own connection while the accepted one gets nothing
    for _ in range(2):
        assert await outbound_peer.read_exactly(4) == b"\r\n\r\n"
        outbound_peer.send(b"\r\n")
    inbound.send(sip_request(transport="TCP", call_id="probe"))
    first = await inbound.read_exactly(4)
    assert first == b"SIP/"


# =========================================================================== connect failures


def refusing_port(cleanup: Cleanup) -> int:
    """A port bound to a socket that never listens: connects are refused, nobody else takes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    cleanup(sock.close)
    port: int = sock.getsockname()[1]
    return port


def count_connects(monkeypatch: pytest.MonkeyPatch, *, fail_first: int = 0) -> list[int]:
    """Count the loop's create_connection calls (optionally refusing the first ones by hand)."""
    loop = asyncio.get_running_loop()
    real = loop.create_connection
    calls: list[int] = []

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[2])
        if len(calls) <= fail_first:
            raise ConnectionRefusedError("refused by the test")
        return await real(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", counting)
    return calls


async def test_connect_to_a_closed_port_fails_then_backs_off(make_harness: HarnessFactory, cleanup: Cleanup,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    harness = make_harness(backoff_base=60.0)
    port = refusing_port(cleanup)
    other = refusing_port(cleanup)
    calls = count_connects(monkeypatch)

    with pytest.raises(TransportError, match="connect tcp"):
        await harness.layer.flow_to("tcp", HOST, port)
    assert calls == [port]
    with pytest.raises(TransportError, match="unreachable"):
        await harness.layer.flow_to("tcp", HOST, port)
    assert calls == [port]  # failed fast, no second connect
    with pytest.raises(TransportError, match="connect tcp"):
        await harness.layer.flow_to("tcp", HOST, other)  # the backoff is per destination
    assert calls == [port, other]
    with pytest.raises(TransportError, match="connect tls"):
        await harness.layer.flow_to("tls", HOST, port)  # and per transport
    assert calls == [port, other, port]


async def test_connect_is_tried_again_after_the_backoff(make_harness: HarnessFactory, cleanup: Cleanup,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    harness = make_harness(backoff_base=0.05)
    server = await raw_server(cleanup)
    calls = count_connects(monkeypatch, fail_first=1)

    with pytest.raises(TransportError):
        await harness.layer.flow_to("tcp", HOST, server.port)
    with pytest.raises(TransportError, match="unreachable"):
        await harness.layer.flow_to("tcp", HOST, server.port)
    assert len(calls) == 1
    await asyncio.sleep(0.1)  # past the longest possible first backoff (backoff_base)
    flow = await harness.layer.flow_to("tcp", HOST, server.port)
    assert flow.alive and len(calls) == 2
    await server.next_peer()


async def test_concurrent_callers_share_one_failed_connect(make_harness: HarnessFactory, cleanup: Cleanup,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    harness = make_harness(backoff_base=60.0)
    port = refusing_port(cleanup)
    calls = count_connects(monkeypatch)
    results = await asyncio.gather(*(harness.layer.flow_to("tcp", HOST, port) for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(result, TransportError) for result in results)
    assert len(calls) == 1


async def test_cancelled_connect_propagates_cancellation(make_harness: HarnessFactory, cleanup: Cleanup,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    harness = make_harness(backoff_base=60.0)
    server = await raw_server(cleanup)
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    async def hanging(*args: Any, **kwargs: Any) -> Any:
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(loop, "create_connection", hanging)
    task = asyncio.create_task(harness.layer.flow_to("tcp", HOST, server.port))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.undo()
    # a cancelled attempt is no failure of the destination: no backoff afterwards
    flow = await harness.layer.flow_to("tcp", HOST, server.port)
    assert flow.alive
    await server.next_peer()


# =========================================================================== received / rport


async def test_rport_and_received_are_stamped_on_udp_requests(make_harness: HarnessFactory,
                                                              cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("udp")
    peer = await udp_peer(cleanup)
    peer_host, peer_port = peer.address
    peer.send(sip_request(sent_by=f"{peer_host}:{peer_port}", via_params=";rport", call_id="rport"), (HOST, port))

    response = await peer.recv_response()
    via = response.top_via
    assert via.params["rport"] == str(peer_port)
    assert via.params["received"] == HOST
    message, _ = await harness.next_message()
    assert message.top_via.params["rport"] == str(peer_port)


async def test_received_is_added_when_the_sent_by_host_differs(make_harness: HarnessFactory,
                                                               cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("udp")
    peer = await udp_peer(cleanup)
    peer.send(sip_request(sent_by="192.0.2.7:5060", call_id="nat"), (HOST, port))

    via = (await peer.recv_response()).top_via
    assert via.params["received"] == HOST
    assert "rport" not in via.params  # not asked for
    assert (via.host, via.port) == ("192.0.2.7", 5060)


async def test_nothing_is_stamped_when_sent_by_matches_and_no_rport(make_harness: HarnessFactory,
                                                                     cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("udp")
    peer = await udp_peer(cleanup)
    branch = new_branch()
    peer.send(sip_request(sent_by=f"{HOST}:{peer.address[1]}", branch=branch, call_id="plain"), (HOST, port))

    via = (await peer.recv_response()).top_via
    assert via.params == {"branch": branch}


async def test_only_the_top_via_of_a_comma_joined_line_is_stamped(make_harness: HarnessFactory,
                                                                   cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("udp")
    peer = await udp_peer(cleanup)
    lower = "SIP/2.0/UDP 192.0.2.2:5060;branch=z9hG4bKlower"
    peer.send(sip_request(via=f"SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKtop;rport, {lower}",
                          call_id="joined"), (HOST, port))

    response = await peer.recv_response()
    top, second = response.vias
    assert (top.params["received"], top.params["rport"]) == (HOST, str(peer.address[1]))
    assert str(second) == lower


async def test_rport_on_a_tcp_request_names_the_connection_port(make_harness: HarnessFactory,
                                                                cleanup: Cleanup) -> None:
    harness = make_harness()
    port = await harness.listen("tcp")
    peer = await stream_peer(cleanup, port)
    peer.send(sip_request(transport="TCP", sent_by="192.0.2.1:5060", via_params=";rport", call_id="tcp-rport"))

    via = (await peer.read_response()).top_via
    assert (via.params["received"], via.params["rport"]) == (HOST, str(peer.address[1]))


async def test_responses_are_passed_up_unstamped(make_harness: HarnessFactory, cleanup: Cleanup) -> None:
    harness = make_harness(answer=False)
    port = await harness.listen("udp")
    peer = await udp_peer(cleanup)
    request = parse(sip_request(sent_by="192.0.2.1:5060", via_params=";rport"))
    assert isinstance(request, Request)
    peer.send(make_response(request, 180).to_bytes(), (HOST, port))

    message, _ = await harness.next_message()
    assert isinstance(message, Response) and message.status == 180
    assert message.top_via.params["rport"] is None and "received" not in message.top_via.params


async def test_traffic_on_a_flow_counts_as_a_pong() -> None:
    """A peer busy answering our requests may send its pong late; its messages prove the flow alive."""
    from sipis.sip.transport import TransportLayer, _StreamProtocol

    received: list[object] = []
    layer = TransportLayer(lambda message, flow: received.append(message), keepalive_interval=0)
    protocol = _StreamProtocol(layer, "tcp", outbound=True)

    class FakeTransport:
        def get_extra_info(self, name: str) -> tuple[str, int]:
            return ("127.0.0.1", 5000) if name == "sockname" else ("127.0.0.1", 5060)

        def write(self, data: bytes) -> None:
            pass

        def close(self) -> None:
            pass

    protocol.connection_made(FakeTransport())  # type: ignore[arg-type]
    assert protocol.flow is not None
    protocol.flow.ping_sent_at = 123.0
    protocol.data_received(
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 127.0.0.1:5000;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\n"
        b"To: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n")
    assert received and protocol.flow.ping_sent_at is None


# =========================================================================== junk in the log


def test_junk_is_logged_once_per_source_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    junk = JunkLog(clock.monotonic, interval=60.0)
    with caplog.at_level(logging.INFO, logger="sipis.sip.transport"):
        for _ in range(10_000):
            junk.info("192.0.2.1", "malformed message from %s: %s", "udp:192.0.2.1:5060", "bad")
        junk.info("192.0.2.2", "malformed message from %s: %s", "udp:192.0.2.2:5060", "bad")
        assert len(caplog.records) == 2  # the first from each source
        clock.advance(60.0)
        junk.info("192.0.2.1", "malformed message from %s: %s", "udp:192.0.2.1:5060", "bad")
    assert len(caplog.records) == 3
    assert caplog.records[-1].getMessage() == (
        "malformed message from udp:192.0.2.1:5060: bad (and 9999 more from 192.0.2.1 in the last 60 s)")


def test_junk_from_many_sources_is_bounded_too(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    junk = JunkLog(clock.monotonic, interval=60.0, max_sources=8)
    with caplog.at_level(logging.INFO, logger="sipis.sip.transport"):
        for n in range(1000):  # a spoofed flood: every datagram from another address
            junk.info(f"198.51.100.{n % 250}", "malformed message from %s", n)
    assert len(caplog.records) == 8 + 1  # the tracked sources, then one line for all the others
    assert len({record.getMessage() for record in caplog.records}) == 9


# =========================================================================== connection limits


async def test_inbound_connections_idle_for_the_limit_are_closed_but_never_ours(
    make_harness: HarnessFactory, cleanup: Cleanup,
) -> None:
    harness = make_harness(idle_timeout=30.0)
    port = await harness.listen("tcp")
    server = await raw_server(cleanup)
    ours = await harness.layer.flow_to("tcp", HOST, server.port)  # e.g. to our registrar: silent
    stalled = await stream_peer(cleanup, port)
    stalled.send(b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999\r\n")  # half a message, forever
    busy = await stream_peer(cleanup, port)
    await wait_for(lambda: harness.layer.inbound_connections == 2, what="both connections accepted")

    harness.layer.close_idle(0.0)  # the idle watch starts
    busy.send(sip_request(transport="TCP", call_id="busy-1"))
    assert (await busy.read_response()).call_id == "busy-1"
    stalled.send(b"\r\n")  # a lone CRLF is no message
    harness.layer.close_idle(29.0)
    assert harness.layer.inbound_connections == 2
    harness.layer.close_idle(30.0)
    assert await stalled.closed_by_other_side()
    assert harness.layer.stats["idle_closed"] == 1 and ours.alive
    busy.send(sip_request(transport="TCP", call_id="busy-2"))  # still served
    assert (await busy.read_response()).call_id == "busy-2"

    harness.layer.close_idle(60.0)  # the busy one went quiet after its message at 30 s
    harness.layer.close_idle(90.0)
    assert await busy.closed_by_other_side()
    assert harness.layer.stats["idle_closed"] == 2 and ours.alive and harness.layer.inbound_connections == 0


async def connect_from(host: str, port: int, cleanup: Cleanup) -> StreamPeer:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, local_addr=(host, 0)), WAIT)
    peer = StreamPeer(reader, writer)
    cleanup(peer.close)
    return peer


async def test_inbound_connections_are_capped_per_source_and_in_total(
    make_harness: HarnessFactory, cleanup: Cleanup,
) -> None:
    harness = make_harness(max_connections=3, max_connections_per_source=2)
    port = await harness.listen("tcp")
    layer = harness.layer
    first = [await connect_from("127.0.0.1", port, cleanup) for _ in range(2)]
    await connect_from("127.0.0.2", port, cleanup)
    await wait_for(lambda: layer.inbound_connections == 3, what="three connections accepted")

    over_source = await connect_from("127.0.0.1", port, cleanup)  # a third from one address
    assert await over_source.closed_by_other_side()
    over_total = await connect_from("127.0.0.3", port, cleanup)  # a fourth in all
    assert await over_total.closed_by_other_side()
    assert layer.stats["connections_refused"] == 2 and layer.inbound_connections == 3

    await first[0].close()  # room again, for that address too
    await wait_for(lambda: layer.inbound_connections == 2, what="the closed connection released")
    again = await connect_from("127.0.0.1", port, cleanup)
    again.send(sip_request(transport="TCP", call_id="again"))
    assert (await again.read_response()).call_id == "again"
    assert layer.stats["connections_refused"] == 2
