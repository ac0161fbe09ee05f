"""Junk and strangers against the real core on loopback (Kamailio where it matters): requests
for unknown users cost one stateless 404; requests for our bindings from anywhere but the
registrar get 403 and ring nothing; a junk flood writes a bounded amount of log; stalled
connections are capped and closed.

Every flood is bounded in count, every wait in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lab.kamailio import USERS
from sipis.config import parse_config
from sipis.core import Core
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.message import Headers, Request, SipURI
from sipis.sip.transport import ListenSpec, TransportName
from tests.integration.test_calls_e2e import Lab, start_lab
from tests.sip.test_transport import HOST, UdpPeer, as_response, sip_request
from tests.waiting import wait_for

T1 = 0.05  # short SIP timers: a retransmission that were due would come within a few T1


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    config = parse_config({
        "state_dir": str(tmp_path / "state"),
        "sip": {"listen": ["udp:127.0.0.1:0", "tcp:127.0.0.1:0"], "t1": T1, "t2": 4 * T1, "t4": 5 * T1},
        "api": {"listen": ""},
    }, tmp_path)
    core = Core(config)
    await core.start()
    try:
        yield core
    finally:
        await core.stop()


def sip_port(core: Core, transport: str) -> int:
    return next(spec.port for spec in core.listening.sip if spec.transport == transport)


@pytest.fixture
async def peer() -> AsyncIterator[UdpPeer]:
    udp = await UdpPeer.open()
    try:
        yield udp
    finally:
        udp.close()


def unknown_user(method: str, call_id: str) -> bytes:
    return sip_request(method, call_id=call_id).replace(b"sip:sipis@", b"sip:sipis-0123456789abcdef@", 1)


@pytest.mark.parametrize("method", ["INVITE", "MESSAGE"])
async def test_requests_for_unknown_users_get_one_404_and_cost_no_memory(
    method: str, core: Core, peer: UdpPeer,
) -> None:
    assert core.endpoint is not None
    address = (HOST, sip_port(core, "udp"))
    assert core.trace.observed == 0
    statuses: list[int] = []
    for burst in range(10):  # in bursts a loopback socket buffer surely holds
        for n in range(20):
            peer.send(unknown_user(method, f"junk-{burst}-{n}"), address)
        for _ in range(20):
            statuses.append(as_response(await peer.recv_message()).status)
    assert statuses == [404] * 200  # no 100 Trying before it either
    assert core.endpoint.pending_transactions == 0
    assert core.trace.calls.messages == 0 and core.trace.observed == 0  # not even traced
    await asyncio.sleep(10 * T1)  # Timer G would have repeated each 404 by now
    assert peer.queue.empty()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async for value in start_lab(tmp_path):
        yield value


def message_to(uri: str, method: str, call_id: str) -> Request:
    return Request(method, uri, Headers([
        ("From", "<sip:mallory@example.test>;tag=m1"), ("To", f"<{uri}>"), ("Call-ID", call_id),
        ("CSeq", f"1 {method}"), ("Content-Type", "text/plain")]), b"hello" if method == "MESSAGE" else b"")


STRANGER = "127.0.0.2"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_invite_and_message_straight_to_the_core_get_403_and_ring_nothing(
    transport: TransportName, lab: Lab,
) -> None:
    await lab.enrol_sleeping("frank", USERS["frank"], "token-frank")
    contact = SipURI.parse(next(c["contact"] for c in lab.kam.ul_dump() if c["aor"] == "frank"))
    target = f"sip:{contact.user}@{HOST}"
    # another loopback address than the registrar's: the check is by address (a registrar may
    # deliver a call over a new connection from any port of its own)
    stranger = SipEndpoint(EndpointSettings(listen=[ListenSpec(transport, STRANGER, 0)], keepalive_interval=0))
    await stranger.start()
    try:
        flow = await stranger.transport.flow_to(transport, HOST, sip_port(lab.core, transport))
        for method in ("INVITE", "MESSAGE"):
            request = message_to(target, method, f"direct-{method}")
            stranger.add_via(request, flow)
            assert (await stranger.request(request, flow)).status == 403
        # the same MESSAGE through the registrar is taken and pushed
        via_pbx = await stranger.transport.flow_to("udp", lab.kam.host, lab.kam.udp_port)
        request = message_to(f"sip:frank@{lab.kam.domain}", "MESSAGE", "through-pbx")
        stranger.add_via(request, via_pbx)
        assert (await stranger.request(request, via_pbx)).status == 200
        await wait_for(lambda: bool(lab.pushes("NotifyTextMessage")), what="text push")
    finally:
        await stranger.close()
    assert [push.json["verb"] for push in lab.pushes() if push.json] == ["NotifyTextMessage"]
    assert lab.core.calls is not None and not lab.core.calls.held and not lab.core.calls.recent


#: the issue's bound: 60 s of 10k junk datagrams/s write < 100 KiB of log, i.e. per junk message
LOG_BYTES_PER_JUNK = 100 * 1024 / (60 * 10_000)
JUNK = [b"GARBAGE\x00\x01 not sip at all\r\n\r\n", b"INVITE sip:x SIP/2.0\r\nVia: nonsense\r\n\r\n",
        sip_request("OPTIONS", extra=["CSeq: x y z"])]


async def test_a_junk_flood_writes_a_bounded_amount_of_log(core: Core, peer: UdpPeer) -> None:
    assert core.endpoint is not None
    stats = core.endpoint.transport.stats
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level, root.level = root.level, logging.INFO
    root.addHandler(handler)
    before = stats["parse_errors"] + stats["framing_errors"]
    try:
        address = (HOST, sip_port(core, "udp"))
        for _ in range(60):
            for n in range(50):
                peer.send(JUNK[n % len(JUNK)], address)
            await asyncio.sleep(0)
        for _ in range(40):  # malformed TCP: each connection dies of a framing error
            _, writer = await asyncio.open_connection(HOST, sip_port(core, "tcp"))
            writer.write(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: -5\r\n\r\n")
            await writer.drain()
            writer.close()
        await wait_for(lambda: stats["framing_errors"] >= 40, what="every connection's framing error")
        await asyncio.sleep(0.2)  # what is still queued on the UDP socket
    finally:
        root.removeHandler(handler)
        root.level = level
    junk = stats["parse_errors"] + stats["framing_errors"] - before
    assert junk >= 1000  # most of the flood arrived (loopback may drop some datagrams)
    log_bytes = len(written.getvalue().encode())
    assert log_bytes <= junk * LOG_BYTES_PER_JUNK, written.getvalue()


async def test_stalled_connections_are_capped_and_closed_when_idle(core: Core) -> None:
    assert core.endpoint is not None
    layer = core.endpoint.transport
    per_source = core.config.sip.max_connections_per_source
    port = sip_port(core, "tcp")
    peers = []
    for _ in range(per_source + 10):  # half a message each, then nothing
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999\r\n")
        peers.append((reader, writer))
    try:
        await wait_for(lambda: layer.stats["connections_refused"] == 10, what="the ten over the cap refused")
        assert layer.inbound_connections == per_source
        now = asyncio.get_running_loop().time()
        layer.close_idle(now)
        layer.close_idle(now + core.config.sip.idle_timeout)
        for reader, _ in peers:  # every one of them is closed by the core
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5.0) == b""
        assert layer.stats["idle_closed"] == per_source
        await wait_for(lambda: layer.inbound_connections == 0, what="all released")
    finally:
        for _, writer in peers:
            writer.close()
