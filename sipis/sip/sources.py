"""Trusted sources: peers whose INVITE/MESSAGE we take besides our registrars.

Entries are an IP address (any port), ``address:port`` (IPv6 as ``[addr]:port``) or a CIDR
network (any port).
"""

from __future__ import annotations

import ipaddress

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


class TrustedSources:
    def __init__(self, entries: tuple[str, ...] | list[str] = ()) -> None:
        self.entries = [parse_source(entry) for entry in entries]

    def admits(self, address: tuple[str, int]) -> bool:
        if not self.entries:
            return False
        try:
            ip = ipaddress.ip_address(address[0].strip("[]"))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network and (port is None or port == address[1]) for network, port in self.entries)
