"""HEP v3 packets decoded back, chunk by chunk (vendor, type, length, value)."""

from __future__ import annotations

import struct

import pytest

from sipis import hep

Chunk = tuple[int, int, int, bytes]  # vendor, type, length, value

SIP_TEXT = b"REGISTER sip:pbx.example.com SIP/2.0\r\nCall-ID: c1\r\nContent-Length: 0\r\n\r\n"


def decode(packet: bytes) -> list[Chunk]:
    """The chunks of one packet, after checking its header and every length."""
    magic, total = struct.unpack("!4sH", packet[:6])
    assert magic == b"HEP3"
    assert total == len(packet)
    chunks: list[Chunk] = []
    offset = 6
    while offset < total:
        vendor, kind, length = struct.unpack("!HHH", packet[offset:offset + 6])
        assert length >= 6 and offset + length <= total
        chunks.append((vendor, kind, length, packet[offset + 6:offset + length]))
        offset += length
    assert offset == total
    return chunks


def by_type(packet: bytes) -> dict[int, bytes]:
    chunks = decode(packet)
    assert all(vendor == 0 for vendor, _, _, _ in chunks)
    assert all(length == 6 + len(value) for _, _, length, value in chunks)
    types = [kind for _, kind, _, _ in chunks]
    assert len(types) == len(set(types))
    return {kind: value for _, kind, _, value in chunks}


def test_ipv4_sip_packet_has_every_chunk() -> None:
    packet = hep.encode(kind=hep.SIP, transport="udp", src=("192.0.2.10", 5060), dst=("198.51.100.7", 5070),
                        at=1_700_000_000.123456, capture_id=2001, payload=SIP_TEXT)
    chunks = by_type(packet)
    assert chunks == {
        0x01: b"\x02",                      # AF_INET
        0x02: b"\x11",                      # UDP
        0x03: bytes([192, 0, 2, 10]),
        0x04: bytes([198, 51, 100, 7]),
        0x07: struct.pack("!H", 5060),
        0x08: struct.pack("!H", 5070),
        0x09: struct.pack("!I", 1_700_000_000),
        0x0A: struct.pack("!I", 123_456),
        0x0B: b"\x01",                      # SIP
        0x0C: struct.pack("!I", 2001),
        0x0F: SIP_TEXT,
    }
    # the order Homer's agents use: addresses and ports, time, protocol type, capture id, payload
    assert [kind for _, kind, _, _ in decode(packet)] == [1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 15]


def test_ipv6_tls_log_with_auth_key_and_correlation() -> None:
    packet = hep.encode(kind=hep.LOG, transport="tls", src=("[2001:db8::1]", 5061), dst=("2001:db8::2%eth0", 40000),
                        at=5.000001, capture_id=0xFFFFFFFF, payload=b'{"stage":"push_sent"}',
                        auth_key=b"hunter2", correlation_id=b"call-1@pbx")
    chunks = by_type(packet)
    assert chunks[0x01] == b"\x0a"                        # AF_INET6
    assert chunks[0x02] == b"\x06"                        # TCP: HEP has no id for TLS
    assert chunks[0x05] == bytes.fromhex("20010db8000000000000000000000001")
    assert chunks[0x06] == bytes.fromhex("20010db8000000000000000000000002")
    assert 0x03 not in chunks and 0x04 not in chunks
    assert chunks[0x07] == struct.pack("!H", 5061) and chunks[0x08] == struct.pack("!H", 40000)
    assert chunks[0x09] == struct.pack("!I", 5) and chunks[0x0A] == struct.pack("!I", 1)
    assert chunks[0x0B] == bytes([100])                   # log
    assert chunks[0x0C] == b"\xff\xff\xff\xff"
    assert chunks[0x0E] == b"hunter2"
    assert chunks[0x0F] == b'{"stage":"push_sent"}'
    assert chunks[0x11] == b"call-1@pbx"


def test_mixed_families_are_written_ipv4_mapped() -> None:
    chunks = by_type(hep.encode(kind=hep.SIP, transport="tcp", src=("127.0.0.1", 1), dst=("::1", 2), at=0.0,
                                capture_id=1, payload=b"x"))
    assert chunks[0x01] == b"\x0a"
    assert chunks[0x05] == bytes.fromhex("00000000000000000000ffff7f000001")
    assert chunks[0x06] == bytes.fromhex("00000000000000000000000000000001")


def test_microseconds_never_round_up_to_a_second() -> None:
    chunks = by_type(hep.encode(kind=hep.SIP, transport="udp", src=("10.0.0.1", 1), dst=("10.0.0.2", 2),
                                at=9.9999999, capture_id=1, payload=b"x"))
    assert struct.unpack("!I", chunks[0x09]) == (9,)
    assert struct.unpack("!I", chunks[0x0A]) == (999_999,)


def test_a_name_instead_of_an_address_is_written_as_zero() -> None:
    chunks = by_type(hep.encode(kind=hep.SIP, transport="udp", src=("pbx.example.com", 1), dst=("10.0.0.2", 2),
                                at=0.0, capture_id=1, payload=b"x"))
    assert chunks[0x03] == b"\0\0\0\0"


def test_largest_payload_fits_and_larger_is_refused() -> None:
    big = b"x" * hep.MAX_PAYLOAD
    packet = hep.encode(kind=hep.SIP, transport="udp", src=("::1", 1), dst=("::1", 2), at=0.0, capture_id=1,
                        payload=big, auth_key=b"k" * 64, correlation_id=b"c" * 200)
    assert by_type(packet)[0x0F] == big
    with pytest.raises(ValueError):
        hep.packet([hep.chunk(hep.PAYLOAD, b"x" * 65535)])


def test_chunk_of_another_vendor() -> None:
    assert hep.chunk(0x20, b"ab", vendor=0x0030) == struct.pack("!HHH", 0x30, 0x20, 8) + b"ab"
