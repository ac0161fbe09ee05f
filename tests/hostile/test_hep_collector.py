"""A core whose HEP collector is gone: SIP goes on as before, HEP packets are dropped and counted."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from sipis.config import parse_config
from sipis.core import Core
from tests.sip.test_transport import HOST, UdpPeer, as_response, sip_request


def closed_udp_port() -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind((HOST, 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


async def test_an_unreachable_collector_changes_nothing_but_the_drop_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = parse_config({
        "state_dir": str(tmp_path / "state"), "sip": {"listen": ["udp:127.0.0.1:0"]}, "api": {"listen": ""},
        "hep": {"collector": f"udp:127.0.0.1:{closed_udp_port()}", "auth_key": "hep-secret"},
    }, tmp_path)
    core = Core(config)
    await core.start()
    peer = await UdpPeer.open()
    try:
        port = core.listening.sip[0].port
        for n in range(50):
            peer.send(sip_request("OPTIONS", sent_by=f"{HOST}:{peer.address[1]}", branch=f"z9hG4bKhep{n}",
                                  call_id=f"hep-{n}"), (HOST, port))
            assert as_response(await peer.recv_message()).status == 200
        assert core.hep is not None
        stats = core.hep.stats()
    finally:
        peer.close()
        await core.stop()
    # 50 OPTIONS in, 50 answers out; the collector's ICMP refusals cost drops, nothing else
    assert stats["sent"] + stats["dropped_error"] == 100
    assert stats["dropped_error"] > 0 and stats["dropped_full"] == 0
    assert "packets dropped" in caplog.text and "hep-secret" not in caplog.text
