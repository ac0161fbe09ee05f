"""Listen addresses as the config file writes them: ``host:port`` and ``transport:host:port``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, cast

Transport: TypeAlias = Literal["udp", "tcp", "tls"]
TRANSPORTS: Final[tuple[Transport, ...]] = ("udp", "tcp", "tls")


@dataclass(frozen=True)
class HostPort:
    """A TCP listen address; ``host`` is bare (IPv6 without brackets). Port 0 = any free port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class SipListen:
    """One SIP listener, written ``transport:host:port`` in the file."""

    transport: Transport
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.transport}:{HostPort(self.host, self.port)}"


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def parse_host_port(text: str) -> HostPort:
    """Parse ``host:port`` (IPv6 as ``[addr]:port``); raises ValueError with a readable reason."""
    if text.startswith("["):
        addr, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected '[IPv6]:port'")
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            raise ValueError(f"{addr!r} is not an IPv6 address") from None
        host = addr
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError("expected 'host:port'")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets: '[addr]:port'")
        if not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} is not a host name or IPv4 address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
    return HostPort(host, int(port_text))


def parse_sip_listen(text: str) -> SipListen:
    """Parse ``udp|tcp|tls:host:port``; raises ValueError with a readable reason."""
    transport, sep, rest = text.partition(":")
    if not sep or transport.lower() not in TRANSPORTS:
        raise ValueError("expected 'udp|tcp|tls:host:port'")
    address = parse_host_port(rest)
    return SipListen(cast(Transport, transport.lower()), address.host, address.port)


# -- trusted sources ([sip] trusted_sources): an IP address (any port), address:port or a CIDR network

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_source(text: str) -> tuple[Network, int | None]:
    """One entry as (network, port or None for any); ValueError names what is wrong."""
    entry = text.strip()
    port: int | None = None
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{text!r}: expected [address]:port")
            port = int(rest[1:])
        entry = host
    elif entry.count(":") == 1:
        entry, _, digits = entry.partition(":")
        if not digits.isdigit():
            raise ValueError(f"{text!r}: expected address:port")
        port = int(digits)
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{text!r}: port out of range")
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(f"{text!r}: not an IP address, address:port or CIDR network") from None
    return network, port


def source_problem(entries: tuple[str, ...]) -> str | None:
    """What is wrong with the first bad entry, for the config reader; None when all parse."""
    for entry in entries:
        try:
            parse_source(entry)
        except ValueError as exc:
            return str(exc)
    return None
