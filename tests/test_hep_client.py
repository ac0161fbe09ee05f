"""The HEP client: what it sends for SIP messages and push stages, and that a dead or full
collector costs nothing but counted drops (real sockets on loopback, fake clock for the report)."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.documents import PushRecord
from contract.events import Event
from sipis import hep
from sipis.clock import FakeClock
from sipis.config import ConfigError, parse_config
from sipis.config.model import HepConfig
from sipis.hep_client import HepClient
from sipis.sip.message import Message, parse_message
from sipis.sip.transport import Flow
from sipis.timers import FakeTimers
from tests.test_hep import by_type

REGISTER = (b"REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5080;branch=z9hG4bK1\r\n"
            b"From: <sip:alice@pbx>;tag=1\r\nTo: <sip:alice@pbx>\r\nCall-ID: reg-1\r\nCSeq: 2 REGISTER\r\n"
            b"Authorization: Digest username=\"alice\", response=\"0123456789abcdef\"\r\n"
            b"Contact: <sip:sipis-1@127.0.0.1:5080>\r\nContent-Length: 0\r\n\r\n")
INVITE = (b"INVITE sip:sipis-1@127.0.0.1:5080 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bK2\r\n"
          b"From: <sip:bob@pbx>;tag=2\r\nTo: <sip:alice@pbx>\r\nCall-ID: call-1\r\nCSeq: 1 INVITE\r\n"
          b"Contact: <sip:bob@127.0.0.2>\r\nContent-Length: 0\r\n\r\n")


def flow(transport: str, local: tuple[str, int], remote: tuple[str, int]) -> Flow:
    return Flow(transport, local, remote, False, lambda data: None, lambda: None)  # type: ignore[arg-type]


def message(raw: bytes) -> Message:
    return parse_message(raw)


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def read(hep_table: dict[str, object]) -> HepConfig:
    return parse_config({"api": {"listen": ""}, "hep": hep_table}, Path(".")).hep


def settings(collector: str, **more: object) -> HepConfig:
    return read({"collector": collector, **more})


async def started(collector: str, clock: FakeClock | None = None, timers: FakeTimers | None = None,
                  **more: object) -> HepClient:
    clock = clock or FakeClock()
    client = HepClient(settings(collector, **more), clock, timers or FakeTimers(clock))
    await client.start()
    return client


def push_event(stages: dict[str, float], call_id: str | None = "call-1", push_id: str = "p1") -> Event:
    record = PushRecord(push_id, "0123456789abcdef0123456789abcdef", "call", "mediator", call_id=call_id,
                        attempt=1, stages=dict(stages))
    return Event(1, 0.0, record.selector, record)


async def test_sip_messages_go_out_with_their_flow_addresses_and_credentials_masked(
        receiver: socket.socket) -> None:
    port = receiver.getsockname()[1]
    clock = FakeClock(start=1000.0, wall_offset=1_699_999_000.5)
    client = await started(f"udp:127.0.0.1:{port}", clock, capture_id=77, auth_key="s3cret")
    try:
        client.observe("out", message(REGISTER), flow("tcp", ("127.0.0.1", 5080), ("127.0.0.2", 5060)))
        client.observe("in", message(INVITE), flow("udp", ("127.0.0.1", 5080), ("127.0.0.2", 5060)))
        out, inbound = by_type(receiver.recv(65535)), by_type(receiver.recv(65535))
    finally:
        client.close()
    assert out[hep.IP_PROTO] == b"\x06" and inbound[hep.IP_PROTO] == b"\x11"
    assert (out[hep.IPV4_SRC], out[hep.SRC_PORT]) == (bytes([127, 0, 0, 1]), struct.pack("!H", 5080))
    assert (out[hep.IPV4_DST], out[hep.DST_PORT]) == (bytes([127, 0, 0, 2]), struct.pack("!H", 5060))
    assert (inbound[hep.IPV4_SRC], inbound[hep.SRC_PORT]) == (bytes([127, 0, 0, 2]), struct.pack("!H", 5060))
    assert (inbound[hep.IPV4_DST], inbound[hep.DST_PORT]) == (bytes([127, 0, 0, 1]), struct.pack("!H", 5080))
    assert out[hep.PROTO_TYPE] == bytes([hep.SIP]) and out[hep.CAPTURE_ID] == struct.pack("!I", 77)
    assert out[hep.AUTH_KEY] == b"s3cret"
    assert struct.unpack("!I", out[hep.TIME_SECONDS])[0] == int(clock.wall())
    assert struct.unpack("!I", out[hep.TIME_MICROS])[0] == round((clock.wall() % 1) * 1_000_000)
    assert out[hep.PAYLOAD].startswith(b"REGISTER sip:127.0.0.1 SIP/2.0\r\n")
    assert b"0123456789abcdef" not in out[hep.PAYLOAD] and b"Authorization: Digest <masked>" in out[hep.PAYLOAD]
    assert inbound[hep.PAYLOAD].startswith(b"INVITE sip:sipis-1@127.0.0.1:5080 SIP/2.0\r\n")
    assert client.stats() == {"sent": 2, "dropped_full": 0, "dropped_error": 0}


async def test_each_push_stage_goes_out_once_as_a_log_correlated_by_call_id(receiver: socket.socket) -> None:
    client = await started(f"udp:127.0.0.1:{receiver.getsockname()[1]}")
    try:
        client.observe("in", message(INVITE), flow("udp", ("127.0.0.1", 5080), ("127.0.0.2", 5060)))
        receiver.recv(65535)
        client.on_event(push_event({"invite_received": 10.25, "push_sent": 10.5}))
        client.on_event(push_event({"invite_received": 10.25, "push_sent": 10.5}))  # nothing new
        client.on_event(push_event({"invite_received": 10.25, "push_sent": 10.5, "provider_accepted": 11.0}))
        client.on_event(push_event({"push_sent": 3.0}, call_id=None, push_id="test-push"))
        logs = [by_type(receiver.recv(65535)) for _ in range(4)]
        receiver.settimeout(0.05)
        with pytest.raises(TimeoutError):
            receiver.recv(65535)
    finally:
        client.close()
    assert [log[hep.PROTO_TYPE] for log in logs] == [bytes([hep.LOG])] * 4
    assert [log[hep.PAYLOAD].split(b'"stage":"')[1].split(b'"')[0] for log in logs] == [
        b"invite_received", b"push_sent", b"provider_accepted", b"push_sent"]
    assert [log.get(hep.CORRELATION_ID) for log in logs] == [b"call-1"] * 3 + [None]
    assert [struct.unpack("!II", log[hep.TIME_SECONDS] + log[hep.TIME_MICROS]) for log in logs] == [
        (10, 250_000), (10, 500_000), (11, 0), (3, 0)]
    # the call's logs take its INVITE's addresses (PBX → us); a push of no call has none
    assert (logs[0][hep.IPV4_SRC], logs[0][hep.SRC_PORT]) == (bytes([127, 0, 0, 2]), struct.pack("!H", 5060))
    assert logs[3][hep.IPV4_SRC] == bytes(4)
    assert b"0123456789abcdef0123456789abcdef" not in logs[0][hep.PAYLOAD]  # the selector is masked


async def test_an_unreachable_collector_costs_counted_drops_and_one_warning_a_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nobody listens: each datagram draws an ICMP port unreachable
    clock = FakeClock()
    timers = FakeTimers(clock)
    client = await started(f"udp:127.0.0.1:{port}", clock, timers, auth_key="never-logged")
    caplog.set_level(logging.WARNING, logger="sipis.hep_client")
    try:
        for _ in range(20):
            client.observe("in", message(INVITE), flow("udp", ("127.0.0.1", 5080), ("127.0.0.2", 5060)))
        assert client.dropped_error > 0 and client.dropped_full == 0
        assert client.sent + client.dropped_error == 20
        timers.advance(0.0)
        assert len(caplog.records) == 1
        first = client.dropped_error
        assert f"{first} packets dropped" in caplog.text
        for _ in range(20):
            client.observe("in", message(INVITE), flow("udp", ("127.0.0.1", 5080), ("127.0.0.2", 5060)))
        timers.advance(59.0)
        assert len(caplog.records) == 1  # at most one line a minute
        timers.advance(1.0)
        assert len(caplog.records) == 2
        assert f"{client.dropped_error - first} packets dropped" in caplog.records[1].getMessage()
        timers.advance(600.0)
        assert len(caplog.records) == 2  # no drops, no line
    finally:
        client.close()
    assert "never-logged" not in caplog.text


async def test_a_full_socket_drops_and_counts_without_blocking(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    timers = FakeTimers(clock)
    client = HepClient(settings("udp:127.0.0.1:9"), clock, timers)
    ours, collector = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)  # a peer that never reads
    ours.setblocking(False)
    client.sock = ours
    try:
        for _ in range(5000):
            client.on_event(push_event({"push_sent": 1.0}, push_id=f"p{_}"))
        assert client.dropped_full > 0
        assert client.sent > 0 and client.sent + client.dropped_full == 5000
        timers.advance(0.0)
        assert f"socket buffer full: {client.dropped_full}" in caplog.text
    finally:
        client.close()
        collector.close()


def test_the_section_reads_and_checks_the_collector() -> None:
    assert read({}).collector is None
    hep_settings = settings("udp:[::1]:9060", capture_id=5, auth_key="k")
    assert (hep_settings.collector, hep_settings.capture_id, hep_settings.auth_key) == ("udp:[::1]:9060", 5, "k")
    assert "k" not in repr(hep_settings).replace("hep", "")
    for bad in ("tcp:127.0.0.1:9060", "udp:127.0.0.1", "udp:127.0.0.1:0", "udp:127.0.0.1:70000", "udp::::1:9060"):
        with pytest.raises(ConfigError, match=r"hep\.collector"):
            settings(bad)
    with pytest.raises(ConfigError, match=r"hep\.capture_id"):
        settings("udp:127.0.0.1:9060", capture_id=-1)


async def test_a_collector_name_that_does_not_resolve_turns_hep_off_with_counted_drops(
        caplog: pytest.LogCaptureFixture) -> None:
    client = await started("udp:no-such-collector.invalid:9060")
    try:
        client.observe("in", message(INVITE), flow("udp", ("127.0.0.1", 5080), ("127.0.0.2", 5060)))
    finally:
        client.close()
    assert client.stats() == {"sent": 0, "dropped_full": 0, "dropped_error": 1}
    assert "HEP to no-such-collector.invalid:9060 off" in caplog.text
