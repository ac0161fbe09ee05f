"""Junk and strangers against the real core on loopback (Kamailio where it matters).

Every flood is bounded in count, every wait in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipis.config import parse_config
from sipis.core import Core
from tests.sip.test_transport import HOST, UdpPeer, as_response, sip_request

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
    statuses: list[int] = []
    for burst in range(10):  # in bursts a loopback socket buffer surely holds
        for n in range(20):
            peer.send(unknown_user(method, f"junk-{burst}-{n}"), address)
        for _ in range(20):
            statuses.append(as_response(await peer.recv_message()).status)
    assert statuses == [404] * 200  # no 100 Trying before it either
    assert core.endpoint.pending_transactions == 0
    await asyncio.sleep(10 * T1)  # Timer G would have repeated each 404 by now
    assert peer.queue.empty()
