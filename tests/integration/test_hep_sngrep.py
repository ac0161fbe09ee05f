"""HEP v3 to a real receiver: Debian's sngrep listening for HEP (``-L``) with an auth key, writing
what it decodes to a pcap. The core registers an instance at a real Kamailio and takes a call
(sipp caller, then CANCEL); the pcap must hold the REGISTER, its 200 and the call's messages,
between the addresses the core's own trace recorder saw on the wire, at the times it saw them.

sngrep writes every message as an Ethernet + IPv4 + UDP frame (whatever the transport), so the
reader below needs only those three headers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import shutil
import signal
import socket
import ssl
import struct
from pathlib import Path

import httpx
import pytest

from lab.kamailio import Kamailio, free_port
from lab.push_servers import MediatorServer
from lab.sipp import arun_scenario
from sipis.config import parse_config
from sipis.core import Core
from sipis.trace import TracedMessage
from tests.integration.test_calls_e2e import Lab, make_config
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

AUTH_KEY = "homer-shared-secret"

Captured = tuple[float, tuple[str, int], tuple[str, int], bytes]  # time, source, destination, SIP text


def read_pcap(data: bytes) -> list[Captured]:
    """The UDP datagrams of a libpcap file of Ethernet frames carrying IPv4."""
    magic, _, _, _, _, _, linktype = struct.unpack("<IHHiIII", data[:24])
    assert magic == 0xA1B2C3D4 and linktype == 1
    captured: list[Captured] = []
    offset = 24
    while offset < len(data):
        seconds, micros, length, _ = struct.unpack("<IIII", data[offset:offset + 16])
        frame = data[offset + 16:offset + 16 + length]
        offset += 16 + length
        assert frame[12:14] == b"\x08\x00"  # IPv4
        ip = frame[14:]
        header = (ip[0] & 0x0F) * 4
        assert ip[9] == 17  # UDP
        src_port, dst_port = struct.unpack("!HH", ip[header:header + 4])
        captured.append((seconds + micros / 1_000_000, (socket.inet_ntoa(ip[12:16]), src_port),
                         (socket.inet_ntoa(ip[16:20]), dst_port), ip[header + 8:]))
    return captured


def listening(port: int) -> bool:
    """Is somebody bound to this UDP port (sngrep, once it has started)?"""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("127.0.0.1", port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    finally:
        probe.close()
    return False


def on_wire(message: TracedMessage) -> tuple[tuple[str, int], tuple[str, int]]:
    """(source, destination) of a message the trace recorder kept."""
    local, remote = tuple(message.local), tuple(message.remote)
    return (remote, local) if message.direction == "in" else (local, remote)  # type: ignore[return-value]


async def test_sngrep_captures_register_and_call_sent_as_hep(tmp_path: Path) -> None:
    sngrep = shutil.which("sngrep")
    assert sngrep is not None, "sngrep is missing: scripts/test installs it"
    hep_port = free_port(udp=True, tcp=False)
    pcap = tmp_path / "out.pcap"
    rc = tmp_path / "sngreprc"
    rc.write_text(f"set eep.listen.pass {AUTH_KEY}\n")  # packets without this key are dropped
    receiver = await asyncio.create_subprocess_exec(
        sngrep, "-f", str(rc), "-N", "-q", "-L", f"udp:127.0.0.1:{hep_port}", "-O", str(pcap),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_for(lambda: listening(hep_port), what="sngrep listening")
        with Kamailio() as kam:
            mediator = MediatorServer(tmp_path / "mediator")
            await mediator.start()
            base = make_config(tmp_path, mediator)
            hep = parse_config({"api": {"listen": ""}, "hep": {
                "collector": f"udp:127.0.0.1:{hep_port}", "capture_id": 2001, "auth_key": AUTH_KEY}}, tmp_path).hep
            core = Core(dataclasses.replace(base, hep=hep))
            listening_at = await core.start()
            assert listening_at.api_url is not None and core.hep is not None
            trust = ssl.create_default_context(cafile=str(tmp_path / "state" / "api-tls.crt"))
            api = httpx.AsyncClient(base_url=listening_at.api_url, verify=trust, timeout=10)
            try:
                lab = Lab(kam, mediator, core, api)
                selector, _ = await lab.enrol_sleeping("alice", "alicepw", "token-alice")
                result = await arun_scenario("uac_cancel.xml", kam.target("udp"), service="alice", timeout=20)
                assert result.ok, result.describe()
                await wait_for(lambda: bool(lab.pushes("NotifyIncomingCallMissed")), what="missed-call push")
                registers = [m for m in core.trace.instance_messages(selector) if m.summary()[2] == "REGISTER"]
                calls = [m for m in core.trace.instance_messages(selector) if m.summary()[2] in ("INVITE", "CANCEL")]
                sent = core.hep.stats()
            finally:
                await api.aclose()
                await core.stop()
                await mediator.stop()
    finally:
        if receiver.returncode is None:
            receiver.send_signal(signal.SIGTERM)
        _, errors = await receiver.communicate()
    assert sent["sent"] > 0 and sent["dropped_full"] == sent["dropped_error"] == 0
    captured = read_pcap(pcap.read_bytes())
    assert captured, f"sngrep captured nothing: {errors.decode(errors='replace')}"

    request = next(m for m in registers if m.summary()[3] is None)
    ok = next(m for m in registers if m.summary()[3] == 200)
    invite = next(m for m in calls if m.first_line().startswith("INVITE "))
    for message in (request, ok, invite):
        src, dst = on_wire(message)
        first_line = message.first_line().encode()
        matches = [c for c in captured if c[3].startswith(first_line + b"\r\n") and (c[1], c[2]) == (src, dst)
                   and message.call_id.encode() in c[3]]
        assert matches, f"{message.first_line()} {src} → {dst} not in the pcap"
        assert any(abs(c[0] - message.at) < 0.001 for c in matches)  # the time the core saw it, to the µs

    register_src, register_dst = on_wire(request)
    assert register_dst == ("127.0.0.1", kam.udp_port)  # the real registrar, the real ephemeral TCP port
    assert on_wire(ok) == (register_dst, register_src)
    invite_src, invite_dst = on_wire(invite)
    assert (invite_src, invite_dst) == (register_dst, register_src)  # the call came down our TCP flow
    assert any(c[3].startswith(b"SIP/2.0 487 ") and (c[1], c[2]) == (invite_dst, invite_src) for c in captured)
    assert not any(b"alicepw" in c[3] for c in captured)
