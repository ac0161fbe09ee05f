"""Trusted sources: peers whose INVITE/MESSAGE we take besides our registrars.

Entries are an IP address (any port), ``address:port`` (IPv6 as ``[addr]:port``) or a CIDR
network (any port).
"""

from __future__ import annotations

import ipaddress

from sipis.config.addresses import parse_source


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
