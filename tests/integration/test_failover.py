"""Registrar failover: DNS SRV (our test DNS server) → dead or silent targets first → a real Kamailio.

The registrar URI names ``pbx.test``; its SRV records put a broken target at priority 10 and
Kamailio at priority 20. :class:`ProxyRegistrar` must try them in that order and move on after a
refused TCP connect, a UDP transaction timeout (small timers: Timer F = 64·T1 = 0.64 s) or a
408/503 answer, and must *not* move on after other answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from lab.kamailio import Kamailio, UlContact
from sipis.instance import Account, Instance, PushTarget
from sipis.proxy_register import ProxyRegistrar, contact_user
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.message import Request, make_response, parse_message
from sipis.sip.register import Outcome
from sipis.sip.resolver import Resolver
from sipis.sip.transaction import TimerSettings
from sipis.sip.transport import ListenSpec
from tests.dnsserver import DnsServer

pytestmark = pytest.mark.integration

SMALL_TIMERS = TimerSettings(t1=0.01, t2=0.04, t4=0.05)


# --------------------------------------------------------------------------- broken targets


@pytest.fixture
def dead_tcp_port() -> Iterator[Callable[[], int]]:
    """Ports bound on 127.0.0.1 but never listening: a connect is refused, and nobody else gets them."""
    sockets: list[socket.socket] = []

    def make() -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

    yield make
    for sock in sockets:
        sock.close()


@pytest.fixture
def silent_udp() -> Iterator[Callable[[], socket.socket]]:
    """UDP sockets that receive and never answer."""
    sockets: list[socket.socket] = []

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(sock)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        return sock

    yield make
    for sock in sockets:
        sock.close()


def received_methods(sock: socket.socket) -> list[str]:
    """The request methods of every datagram waiting on a silent socket."""
    methods = []
    with contextlib.suppress(BlockingIOError):
        while True:
            methods.append(sock.recv(65535).split(b" ", 1)[0].decode())
    return methods


class Responder(asyncio.DatagramProtocol):
    """A UDP SIP peer that answers every request with one fixed status."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[Request] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint by construction

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        message = parse_message(data)
        if isinstance(message, Request) and self.transport is not None:
            self.requests.append(message)
            response = make_response(message, self.status, to_tag="responder")
            self.transport.sendto(response.to_bytes(), (str(addr[0]), int(addr[1])))

    @property
    def port(self) -> int:
        assert self.transport is not None
        port: int = self.transport.get_extra_info("sockname")[1]
        return port


# --------------------------------------------------------------------------- our side


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    async with DnsServer(ttl=60) as server:
        yield server


@pytest.fixture
async def endpoint() -> AsyncIterator[SipEndpoint]:
    ep = SipEndpoint(EndpointSettings(listen=[ListenSpec.parse("udp:127.0.0.1:0")], timers=SMALL_TIMERS))
    await ep.start()
    yield ep
    await ep.close()


@pytest.fixture
def registrar(endpoint: SipEndpoint, dns_server: DnsServer) -> ProxyRegistrar:
    return ProxyRegistrar(endpoint, Resolver(nameservers=[dns_server.address], timeout=2.0))


def make_instance(registrar_uri: str, user: str = "alice", password: str = "alicepw") -> Instance:
    return Instance(
        selector=f"sel-{user}",
        account=Account(aor=f"sip:{user}@127.0.0.1", username=user, password=password, registrar=registrar_uri),
        push=PushTarget(provider="fcm", app_id="com.example.app", token="push-token-0123456789"),
        token_hash="not-a-real-hash",
    )


def srv_zone(dns_server: DnsServer, service: str, *ports: int) -> None:
    """``service``.pbx.test → one SRV record per port, priorities 10, 20, ... in the order given."""
    records = []
    for index, port in enumerate(ports):
        name = f"t{index}.pbx.test"
        dns_server.add(name, "A", "127.0.0.1")
        records.append(f"{10 * (index + 1)} 0 {port} {name}.")
    dns_server.add(f"{service}.pbx.test", "SRV", *records)


def our_bindings(kam: Kamailio, instance: Instance) -> list[UlContact]:
    return [c for c in kam.ul_dump() if f"{contact_user(instance)}@" in c["contact"]]


# --------------------------------------------------------------------------- TCP: refused connect


async def test_tcp_fails_over_from_refused_target_to_kamailio(
        kamailio: Kamailio, dns_server: DnsServer, registrar: ProxyRegistrar,
        dead_tcp_port: Callable[[], int]) -> None:
    srv_zone(dns_server, "_sip._tcp", dead_tcp_port(), kamailio.tcp_port)
    instance = make_instance("sip:pbx.test;transport=tcp")

    result = await registrar(instance, 120)

    assert result.outcome is Outcome.REGISTERED, result.detail
    assert result.expires == 120
    assert result.flow is not None
    assert (result.flow.transport, result.flow.remote) == ("tcp", ("127.0.0.1", kamailio.tcp_port))
    assert dns_server.count("_sip._tcp.pbx.test", "SRV") == 1
    bindings = our_bindings(kamailio, instance)
    assert len(bindings) == 1, kamailio.ul_dump()
    assert bindings[0]["aor"] == "alice"
    assert bindings[0]["instance"] == f"<urn:uuid:{instance.instance_id}>"
    assert bindings[0]["reg_id"] == 1
    assert "transport=tcp" in bindings[0]["contact"]

    # removal walks the same list (the dead target is still first) and reaches Kamailio again
    removal = await registrar(instance, 0)
    assert removal.outcome is Outcome.REGISTERED, removal.detail
    assert our_bindings(kamailio, instance) == []


async def test_all_tcp_targets_dead_fails_with_503(dns_server: DnsServer, registrar: ProxyRegistrar,
                                                   dead_tcp_port: Callable[[], int]) -> None:
    srv_zone(dns_server, "_sip._tcp", dead_tcp_port(), dead_tcp_port())
    result = await registrar(make_instance("sip:pbx.test;transport=tcp"), 120)
    assert result.outcome is Outcome.FAILED
    assert result.status == 503
    assert result.detail  # says which connect failed


async def test_unresolvable_registrar_fails_with_503(dns_server: DnsServer, registrar: ProxyRegistrar) -> None:
    result = await registrar(make_instance("sip:nowhere.test;transport=tcp"), 120)
    assert result.outcome is Outcome.FAILED
    assert result.status == 503
    assert "nowhere.test" in result.detail
    assert dns_server.count("_sip._tcp.nowhere.test", "SRV") == 1


# --------------------------------------------------------------------------- UDP: silence and answers


async def test_udp_fails_over_after_timeout_of_silent_target(
        kamailio: Kamailio, dns_server: DnsServer, registrar: ProxyRegistrar,
        silent_udp: Callable[[], socket.socket]) -> None:
    silent = silent_udp()
    srv_zone(dns_server, "_sip._udp", silent.getsockname()[1], kamailio.udp_port)
    instance = make_instance("sip:pbx.test")

    result = await registrar(instance, 120)

    assert result.outcome is Outcome.REGISTERED, result.detail
    assert result.flow is not None
    assert (result.flow.transport, result.flow.remote) == ("udp", ("127.0.0.1", kamailio.udp_port))
    methods = received_methods(silent)
    assert methods and set(methods) == {"REGISTER"}  # tried first (and retransmitted) until Timer F
    bindings = our_bindings(kamailio, instance)
    assert len(bindings) == 1, kamailio.ul_dump()
    assert bindings[0]["instance"] == f"<urn:uuid:{instance.instance_id}>"


async def test_all_udp_targets_silent_fails_with_408(dns_server: DnsServer, registrar: ProxyRegistrar,
                                                     silent_udp: Callable[[], socket.socket]) -> None:
    first, second = silent_udp(), silent_udp()
    srv_zone(dns_server, "_sip._udp", first.getsockname()[1], second.getsockname()[1])
    result = await registrar(make_instance("sip:pbx.test"), 120)
    assert result.outcome is Outcome.FAILED
    assert result.status == 408
    assert received_methods(first) and received_methods(second)  # both were tried


@pytest.mark.parametrize(("status", "outcome", "fails_over"), [
    (503, Outcome.FAILED, True),
    (408, Outcome.FAILED, True),
    (500, Outcome.FAILED, False),
    (403, Outcome.UNAUTHORIZED, False),
    (404, Outcome.REJECTED, False),
])
async def test_answers_that_fail_over_and_answers_that_do_not(
        kamailio: Kamailio, dns_server: DnsServer, registrar: ProxyRegistrar,
        status: int, outcome: Outcome, fails_over: bool) -> None:
    loop = asyncio.get_running_loop()
    transport, responder = await loop.create_datagram_endpoint(lambda: Responder(status),
                                                               local_addr=("127.0.0.1", 0))
    try:
        srv_zone(dns_server, "_sip._udp", responder.port, kamailio.udp_port)
        instance = make_instance("sip:pbx.test", user="bob", password="bobpw")
        result = await registrar(instance, 120)
    finally:
        transport.close()
    assert responder.requests and responder.requests[0].method == "REGISTER"  # always asked first
    if fails_over:
        assert result.outcome is Outcome.REGISTERED, result.detail
        assert result.flow is not None and result.flow.remote == ("127.0.0.1", kamailio.udp_port)
        assert len(our_bindings(kamailio, instance)) == 1
    else:
        assert result.outcome is outcome
        assert result.status == status
        assert our_bindings(kamailio, instance) == []
