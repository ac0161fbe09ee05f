"""HEP v3 (Homer Encapsulation Protocol) packets, built from chunks: pure functions, no I/O.

A packet is ``"HEP3"``, its total length (uint16, header included) and a run of chunks; a chunk is
vendor id (uint16, 0 = the generic chunks below), type id (uint16), its length (uint16, the 6-byte
chunk header included) and the value. Every number is big-endian (network order).

Inputs: the addresses of one datagram or flow (``(host, port)``, IPv4 or IPv6 text), the transport
(``udp``; ``tcp`` and ``tls`` are both IP protocol 6: HEP has no id for TLS), the wall-clock time
(split into seconds and microseconds), the capture agent id, the payload and what kind it is
(:data:`SIP` or :data:`LOG`), optionally an auth key and a correlation id (the Call-ID, which ties
a push stage's log to its call in Homer). Output: the packet's bytes. Failures: ``ValueError`` when
a chunk or the packet would be longer than a uint16 can say (the caller cuts SIP payloads to
:data:`MAX_PAYLOAD` first).
"""

from __future__ import annotations

import ipaddress
import struct
from functools import lru_cache
from typing import Final

MAGIC: Final = b"HEP3"
HEADER: Final = struct.Struct("!4sH")
CHUNK_HEADER: Final = struct.Struct("!HHH")
#: the generic vendor: chunk types defined by the HEP v3 specification itself
VENDOR_GENERIC: Final = 0

# generic chunk types (vendor 0)
IP_FAMILY: Final = 0x0001
IP_PROTO: Final = 0x0002
IPV4_SRC: Final = 0x0003
IPV4_DST: Final = 0x0004
IPV6_SRC: Final = 0x0005
IPV6_DST: Final = 0x0006
SRC_PORT: Final = 0x0007
DST_PORT: Final = 0x0008
TIME_SECONDS: Final = 0x0009
TIME_MICROS: Final = 0x000A
PROTO_TYPE: Final = 0x000B
CAPTURE_ID: Final = 0x000C
AUTH_KEY: Final = 0x000E
PAYLOAD: Final = 0x000F
CORRELATION_ID: Final = 0x0011

# values of IP_FAMILY and IP_PROTO (the socket module's numbers on Linux, fixed here for the wire)
AF_INET: Final = 2
AF_INET6: Final = 10
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17

# values of PROTO_TYPE
SIP: Final = 1
LOG: Final = 100

#: room for the header and every other chunk below the uint16 total length
MAX_PAYLOAD: Final = 65535 - 512

Address = tuple[str, int]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def chunk(type_id: int, value: bytes, vendor: int = VENDOR_GENERIC) -> bytes:
    """One chunk: vendor, type, length (header included), value."""
    length = CHUNK_HEADER.size + len(value)
    if length > 0xFFFF:
        raise ValueError(f"HEP chunk of {length} bytes is longer than 65535")
    return CHUNK_HEADER.pack(vendor, type_id, length) + value


def u8(type_id: int, value: int) -> bytes:
    return chunk(type_id, struct.pack("!B", value))


def u16(type_id: int, value: int) -> bytes:
    return chunk(type_id, struct.pack("!H", value))


def packet(chunks: list[bytes]) -> bytes:
    """The packet: magic, total length, the chunks in order."""
    length = HEADER.size + sum(len(c) for c in chunks)
    if length > 0xFFFF:
        raise ValueError(f"HEP packet of {length} bytes is longer than 65535")
    return HEADER.pack(MAGIC, length) + b"".join(chunks)


def ip_of(host: str) -> IP:
    """The address of ``host`` (IPv6 with or without brackets or a zone); 0.0.0.0 when it is none."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return ipaddress.IPv4Address(0)


def _same_family(src: IP, dst: IP) -> tuple[IP, IP]:
    """One packet has one family: an IPv4 end next to an IPv6 one is written IPv4-mapped."""
    if src.version == dst.version:
        return src, dst
    if src.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{src}"), dst
    return src, ipaddress.IPv6Address(f"::ffff:{dst}")


@lru_cache(maxsize=4096)
def address_chunks(transport: str, src: Address, dst: Address) -> bytes:
    """Family, IP protocol, both addresses and both ports (cached: a core talks over few flows)."""
    src_ip, dst_ip = _same_family(ip_of(src[0]), ip_of(dst[0]))
    v4 = src_ip.version == 4
    return b"".join((
        u8(IP_FAMILY, AF_INET if v4 else AF_INET6),
        u8(IP_PROTO, IPPROTO_UDP if transport.lower() == "udp" else IPPROTO_TCP),
        chunk(IPV4_SRC if v4 else IPV6_SRC, src_ip.packed),
        chunk(IPV4_DST if v4 else IPV6_DST, dst_ip.packed),
        u16(SRC_PORT, src[1] & 0xFFFF),
        u16(DST_PORT, dst[1] & 0xFFFF),
    ))


#: time (seconds, microseconds), protocol type and capture id: four chunks in one pack
_FIXED = struct.Struct("!HHHI HHHI HHHB HHHI")


def fixed_chunks(at: float, kind: int, capture_id: int) -> bytes:
    """The wall-clock time as seconds and microseconds, the protocol type, the capture agent id."""
    seconds = int(at)
    micros = min(999_999, round((at - seconds) * 1_000_000))
    return _FIXED.pack(VENDOR_GENERIC, TIME_SECONDS, 10, seconds & 0xFFFFFFFF,
                       VENDOR_GENERIC, TIME_MICROS, 10, micros,
                       VENDOR_GENERIC, PROTO_TYPE, 7, kind,
                       VENDOR_GENERIC, CAPTURE_ID, 10, capture_id & 0xFFFFFFFF)


def encode(*, kind: int, transport: str, src: Address, dst: Address, at: float, capture_id: int,
           payload: bytes, auth_key: bytes | None = None, correlation_id: bytes | None = None) -> bytes:
    """A whole packet: addresses, time, protocol type, capture id, [auth key,] payload [, correlation]."""
    chunks = [address_chunks(transport, src, dst), fixed_chunks(at, kind, capture_id)]
    if auth_key:
        chunks.append(chunk(AUTH_KEY, auth_key))
    chunks.append(chunk(PAYLOAD, payload))
    if correlation_id:
        chunks.append(chunk(CORRELATION_ID, correlation_id))
    return packet(chunks)
