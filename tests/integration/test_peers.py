"""Smoke tests of the real-peer harness: Kamailio on free ports, sipp scenarios, REGISTER load.

The caller scenarios (uac_final*, uac_cancel, uac_answered) are checked against a tiny SIPIS-like
UAS running in the test's own event loop while sipp runs: the pattern the SIP stack tests use.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import cast

import pytest

from lab import sipp
from lab.kamailio import Kamailio, free_port
from tests.integration.conftest import KamailioFactory

# ----------------------------------------------------------------------------- helpers


def _request(kam: Kamailio, method: str, user: str, port: int, extra: Iterable[str] = ()) -> bytes:
    lines = [
        f"{method} sip:{kam.domain} SIP/2.0",
        f"Via: SIP/2.0/UDP {kam.host}:{port};rport;branch=z9hG4bK{uuid.uuid4().hex[:12]}",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{kam.domain}>;tag={uuid.uuid4().hex[:8]}",
        f"To: <sip:{user}@{kam.domain}>",
        f"Call-ID: {uuid.uuid4().hex}",
        f"CSeq: 1 {method}",
        *extra,
        "Content-Length: 0",
        "",
        "",
    ]
    return "\r\n".join(lines).encode()


def udp_exchange(kam: Kamailio, method: str, user: str = "alice", extra: Iterable[str] = (),
                 timeout: float = 2.0) -> str | None:
    """Send one request to Kamailio over UDP; its first answer, or None on timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((kam.host, 0))
        sock.settimeout(timeout)
        port = sock.getsockname()[1]
        contact = [f"Contact: <sip:{user}@{kam.host}:{port}>"] if method == "REGISTER" else []
        sock.sendto(_request(kam, method, user, port, [*contact, *extra]), (kam.host, kam.udp_port))
        try:
            return sock.recv(65535).decode()
        except TimeoutError:
            return None


def header(message: str, name: str) -> str | None:
    for line in message.split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name.lower():
            return value.strip()
    return None


class ScriptedUas(asyncio.DatagramProtocol):
    """A SIPIS-like UAS: 100 and 180 (with push status) at once, the final answer on command."""

    def __init__(self, reorder_cancel: bool = False) -> None:
        self.reorder_cancel = reorder_cancel  # 487 before the CANCEL's 200, as a busy proxy may
        self.transport: asyncio.DatagramTransport | None = None
        self.invite: tuple[str, tuple[str, int]] | None = None
        self.invite_arrived = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.acked = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # selector transport: not a subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        text = data.decode()
        method = text.split(" ", 1)[0]
        if method == "INVITE" and self.invite is None:  # later copies are retransmissions
            self.invite = (text, addr)
            self._reply(text, addr, "100 Trying")
            self._reply(text, addr, "180 Ringing", ["X-Sipis-Push-Status: Alerting-Device"])
            self._reply(text, addr, "180 Ringing", ["X-Sipis-Push-Status: Push-Notification-Sent"])
            self.invite_arrived.set()
        elif method == "CANCEL":
            if self.reorder_cancel:
                self.final("487 Request Terminated")
            self._reply(text, addr, "200 OK")
            if not self.reorder_cancel:
                self.final("487 Request Terminated")
            self.cancelled.set()
        elif method == "ACK":
            self.acked.set()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def final(self, status: str, extra: Iterable[str] = ()) -> None:
        assert self.invite is not None
        self._reply(*self.invite, status, extra)

    def _reply(self, request: str, addr: tuple[str, int], status: str, extra: Iterable[str] = ()) -> None:
        copied = [line for line in request.split("\r\n")[1:]
                  if line.split(":", 1)[0].strip().lower() in ("via", "from", "call-id", "cseq")]
        to = header(request, "To") or ""
        if not status.startswith("100") and ";tag=" not in to:
            to += ";tag=uas1"
        lines = [f"SIP/2.0 {status}", *copied, f"To: {to}", *extra, "Content-Length: 0", "", ""]
        assert self.transport is not None
        self.transport.sendto("\r\n".join(lines).encode(), addr)


UasFactory = Callable[[str, str], Awaitable[tuple[ScriptedUas, int]]]


@pytest.fixture
async def registered_uas(kamailio: Kamailio) -> AsyncIterator[UasFactory]:
    """``await registered_uas(user, password)``: register ``user`` at a free UDP port (via sipp),
    then listen there with a ScriptedUas; returns it and the port."""
    made: list[ScriptedUas] = []

    async def make(user: str, password: str) -> tuple[ScriptedUas, int]:
        port = free_port(kamailio.host, udp=True, tcp=False)
        reg = await sipp.aregister_user(kamailio.target(), user, password, local_port=port)
        assert reg.ok, reg.describe()
        loop = asyncio.get_running_loop()
        _, uas = await loop.create_datagram_endpoint(ScriptedUas, local_addr=(kamailio.host, port))
        made.append(uas)
        return uas, port

    yield make
    for uas in made:
        uas.close()


async def until(event: asyncio.Event, call: asyncio.Task[sipp.SippResult], timeout: float = 10) -> None:
    """Wait for ``event``; fail with sipp's diagnosis if the call ends first."""
    waiter = asyncio.create_task(event.wait())
    done, _ = await asyncio.wait({waiter, call}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        pytest.fail(f"no INVITE at the UAS: {call.result().describe() if call in done else 'timeout'}")


# ----------------------------------------------------------------------------- Kamailio


def test_starts_on_free_ports_and_answers_udp_tcp_tls(kamailio: Kamailio) -> None:
    assert kamailio.running
    assert kamailio.udp_port == kamailio.tcp_port != kamailio.tls_port
    assert {kamailio.udp_port, kamailio.tls_port}.isdisjoint({5060, 5061})
    answer = udp_exchange(kamailio, "OPTIONS")
    assert answer is not None and answer.startswith("SIP/2.0 200")
    # TLS with the generated certificate, verified against ca_file and the IP SAN
    context = ssl.create_default_context(cafile=str(kamailio.ca_file))
    with socket.create_connection((kamailio.host, kamailio.tls_port), timeout=3) as raw, \
            context.wrap_socket(raw, server_hostname=kamailio.host) as tls:
        tls.sendall(_request(kamailio, "OPTIONS", "alice", 9).replace(b"SIP/2.0/UDP", b"SIP/2.0/TLS"))
        assert tls.recv(65535).startswith(b"SIP/2.0 200")


@pytest.mark.parametrize(
    ("defines", "algorithm", "qop"),
    [((), None, True), (("AUTH_SHA256",), "SHA-256", True), (("AUTH_NO_QOP",), None, False)],
)
def test_digest_challenge_switches(kamailio_factory: KamailioFactory, defines: tuple[str, ...],
                                   algorithm: str | None, qop: bool) -> None:
    kam = kamailio_factory(defines=defines)
    answer = udp_exchange(kam, "REGISTER", "alice", ["Expires: 3600"])
    assert answer is not None and answer.startswith("SIP/2.0 401"), answer
    challenge = header(answer, "WWW-Authenticate") or ""
    assert f'realm="{kam.domain}"' in challenge
    assert (f"algorithm={algorithm}" in challenge) if algorithm else ("algorithm=SHA" not in challenge)
    assert ('qop="auth"' in challenge) is qop


@pytest.mark.parametrize(("expires_header", "contact_param"), [("30", ""), ("3600", ";expires=30")])
def test_interval_too_brief(kamailio: Kamailio, expires_header: str, contact_param: str) -> None:
    """423 + Min-Expires below 60 s, also when the Contact parameter (which wins) asks for it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((kamailio.host, 0))
        sock.settimeout(2)
        port = sock.getsockname()[1]
        extra = [f"Contact: <sip:bob@{kamailio.host}:{port}>{contact_param}", f"Expires: {expires_header}"]
        sock.sendto(_request(kamailio, "REGISTER", "bob", port, extra), (kamailio.host, kamailio.udp_port))
        answer = sock.recv(65535).decode()
    assert answer.startswith("SIP/2.0 423"), answer
    assert header(answer, "Min-Expires") == "60"


def test_stop_and_start_again_on_the_same_ports(kamailio: Kamailio) -> None:
    assert sipp.register_user(kamailio.target(), "alice", "alicepw").ok
    ports = (kamailio.udp_port, kamailio.tcp_port, kamailio.tls_port)
    kamailio.stop()
    assert not kamailio.running
    assert udp_exchange(kamailio, "OPTIONS", timeout=0.3) is None  # outage
    kamailio.start()
    assert (kamailio.udp_port, kamailio.tcp_port, kamailio.tls_port) == ports
    assert kamailio.registered_contacts("alice") == []  # usrloc is memory only
    assert sipp.register_user(kamailio.target("tcp"), "alice", "alicepw", transport="tcp").ok
    assert len(kamailio.registered_contacts("alice")) == 1
    assert kamailio.log_text().count("=== start") == 2


# ----------------------------------------------------------------------------- sipp


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_sipp_registers_with_digest(kamailio: Kamailio, transport: str) -> None:
    result = await sipp.aregister_user(kamailio.target(transport), "alice", "alicepw", transport=transport)
    assert result.ok, result.describe()
    assert [m.status for m in result.received()] == [401, 200]
    authorization = result.sent(method="REGISTER")[-1].header("Authorization") or ""
    assert "qop=auth" in authorization and 'username="alice"' in authorization
    (binding,) = kamailio.ul_dump()
    assert binding["aor"] == "alice"
    assert binding["contact"] == f"sip:alice@127.0.0.1:{result.local_port};transport={transport.upper()}"
    assert binding["expires"] is not None and 3500 < binding["expires"] <= 3600
    assert binding["call_id"] == result.sent()[0].header("Call-ID")
    assert binding["socket"] == f"{transport}:{kamailio.host}:{kamailio.udp_port}"
    if transport == "tcp":  # fix_nated_register: INVITEs go back over the REGISTER's connection
        assert binding["received"] == f"sip:127.0.0.1:{result.local_port};transport=tcp"
    else:
        assert binding["received"] is None


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_register_load_reports_a_rate(kamailio: Kamailio, transport: str) -> None:
    load = sipp.register_load(kamailio.target(transport), users=200, transport=transport, concurrency=20)
    assert load.successful == 200 and load.failed == 0, load.result.describe()
    assert load.rate > 0 and load.cpu_seconds > 0
    assert kamailio.contact_count() == 200
    assert kamailio.registered_contacts(sipp.load_user(200))


async def test_caller_gets_ringing_headers_and_480(kamailio: Kamailio, registered_uas: UasFactory) -> None:
    uas, _ = await registered_uas("erin", "erinpw")
    call = asyncio.create_task(sipp.arun_scenario("uac_final_push", kamailio.target(), service="erin",
                                                  timeout=15))
    await until(uas.invite_arrived, call)
    # Kamailio's UDP workers run in parallel: a 180 sent right before the final answer can be
    # relayed after it, and tm then drops it. Give the 180s a head start.
    await asyncio.sleep(0.2)
    uas.final("480 Temporarily Unavailable", ["X-Sipis-Reason: No-Response-From-Device"])
    result = await call
    assert result.ok, result.describe()
    statuses = [h.header("X-Sipis-Push-Status") or "" for h in result.received(180)]
    assert sorted(statuses) == ["Alerting-Device", "Push-Notification-Sent"]  # order: see above
    assert result.received(480)[0].header("X-Sipis-Reason") == "No-Response-From-Device"
    await asyncio.wait_for(uas.acked.wait(), 5)  # Kamailio ACKs the 480 hop by hop


async def test_caller_cancel_gets_487(kamailio: Kamailio, registered_uas: UasFactory) -> None:
    uas, _ = await registered_uas("dave", "davepw")
    result = await sipp.arun_scenario("uac_cancel", kamailio.target(), service="dave", timeout=15)
    assert result.ok, result.describe()
    assert uas.cancelled.is_set()
    assert result.received(487)


async def test_cancel_scenario_accepts_487_before_the_cancels_200() -> None:
    """No proxy: sipp calls the UAS directly, which answers the CANCEL in the 'wrong' order."""
    loop = asyncio.get_running_loop()
    port = free_port("127.0.0.1", udp=True, tcp=False)
    transport, uas = await loop.create_datagram_endpoint(lambda: ScriptedUas(reorder_cancel=True),
                                                         local_addr=("127.0.0.1", port))
    try:
        result = await sipp.arun_scenario("uac_cancel", f"127.0.0.1:{port}", service="dave", timeout=15)
    finally:
        transport.close()
    assert result.ok, result.describe()
    assert [m.status for m in result.received() if m.status and m.status >= 200] == [487, 200]
    assert uas.acked.is_set()


async def test_302_retargets_to_the_fresh_binding_which_answers(kamailio: Kamailio,
                                                                registered_uas: UasFactory) -> None:
    """The SIPIS hand-over: 302 from the held binding, Kamailio looks frank up again, the app answers."""
    uas, uas_port = await registered_uas("frank", "frankpw")
    call = asyncio.create_task(sipp.arun_scenario("uac_answered", kamailio.target(), service="frank",
                                                  timeout=15))
    await until(uas.invite_arrived, call)
    app_port = free_port(kamailio.host, udp=True, tcp=False)
    assert (await sipp.aregister_user(kamailio.target(), "frank", "frankpw", local_port=app_port)).ok
    app = await sipp.start_scenario("uas_answer", kamailio.target(), service="frank", local_port=app_port,
                                    timeout=15)
    await app.wait_listening()
    kamailio.ul_remove_contact("frank", f"sip:frank@127.0.0.1:{uas_port};transport=UDP")
    uas.final("302 Moved Temporarily", [f"Contact: <sip:frank@127.0.0.1:{app_port}>"])
    caller, phone = await call, await app.wait()
    assert caller.ok, caller.describe()
    assert phone.ok, phone.describe()
    assert [m.method for m in phone.received()] == ["INVITE", "ACK", "BYE"]
    assert "retarget after 302" in kamailio.log_text()
