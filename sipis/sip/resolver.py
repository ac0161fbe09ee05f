"""Locating the registrar (RFC 3263, the parts a UAC registering to a known PBX needs).

* An IP literal is used as it is (default port 5060, or 5061 for TLS).
* A name with an explicit port: its A/AAAA records, in order.
* A name without a port: SRV ``_sips._tcp`` (TLS), ``_sip._tcp`` (TCP) or ``_sip._udp`` (UDP),
  ordered by priority and weighted-randomly within a priority (RFC 2782), each target's A/AAAA
  records; when there is no SRV record, the name's A/AAAA records on the default port.

Results are cached for their TTL (capped) so 100k instances behind one PBX do not cost 100k
lookups. The caller fails over to the next target on a transport error or timeout.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from sipis.clock import Clock, SystemClock
from sipis.sip.message import SipURI
from sipis.sip.transport import DEFAULT_PORTS, TransportName

log = logging.getLogger(__name__)

MAX_CACHE_TTL = 300.0
NEGATIVE_CACHE_TTL = 30.0


@dataclass(frozen=True)
class Target:
    transport: TransportName
    host: str  # an IP address
    port: int
    server_name: str  # for TLS SNI and certificate checks

    def __str__(self) -> str:
        return f"{self.transport}:{self.host}:{self.port}"


class ResolveError(OSError):
    """No address for the registrar."""


@dataclass(frozen=True)
class _Entry:
    """One SRV record with its targets (or, without SRV, the name's addresses at priority 0).

    The cache keeps these rather than an ordered list, so the weighted order is drawn afresh on
    every resolution and the load spreads over same-priority targets as their weights say.
    """

    priority: int
    weight: int
    targets: tuple[Target, ...]


class Resolver:
    def __init__(self, nameservers: list[tuple[str, int]] | None = None, clock: Clock | None = None,
                 rng: random.Random | None = None, timeout: float = 3.0) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        if nameservers:
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
        self._resolver.lifetime = timeout
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._cache: dict[tuple[str, str, int | None], tuple[float, list[_Entry]]] = {}

    async def resolve(self, uri: SipURI) -> list[Target]:
        transport: TransportName = uri.transport  # type: ignore[assignment]
        if transport not in DEFAULT_PORTS:
            raise ResolveError(f"unsupported transport {transport!r} in {uri}")
        host = uri.host.strip("[]")
        if _is_ip(host):
            return [Target(transport, host, uri.port or DEFAULT_PORTS[transport], host)]
        key = (transport, host.lower(), uri.port)
        cached = self._cache.get(key)
        now = self.clock.monotonic()
        if cached is not None and cached[0] > now:
            targets = [t for entry in self._order_srv(cached[1]) for t in entry.targets]
            if not targets:
                raise ResolveError(f"no address for {host} (cached)")
            return targets
        entries, ttl = await self._lookup(transport, host, uri.port)
        targets = [t for entry in self._order_srv(entries) for t in entry.targets]
        self._cache[key] = (now + (min(ttl, MAX_CACHE_TTL) if targets else NEGATIVE_CACHE_TTL), entries)
        if not targets:
            raise ResolveError(f"no address for {host}")
        return targets

    async def _lookup(self, transport: TransportName, host: str, port: int | None) -> tuple[list[_Entry], float]:
        """The entries for a name and how long they may be cached (the shortest TTL involved)."""
        if port is None:
            service = "_sips._tcp" if transport == "tls" else f"_sip._{'udp' if transport == 'udp' else 'tcp'}"
            srv, ttl = await self._query(f"{service}.{host}", "SRV")
            if srv:
                entries: list[_Entry] = []
                for record in srv:
                    name = str(record.target).rstrip(".")
                    addresses, address_ttl = await self._addresses(name)
                    if addresses:
                        ttl = min(ttl, address_ttl)
                    entries.append(_Entry(int(record.priority), int(record.weight),
                                          tuple(Target(transport, a, int(record.port), name) for a in addresses)))
                return entries, ttl
        addresses, ttl = await self._addresses(host)
        return [_Entry(0, 0, tuple(Target(transport, a, port or DEFAULT_PORTS[transport], host)
                                   for a in addresses))], ttl

    async def _addresses(self, name: str) -> tuple[list[str], float]:
        found: list[str] = []
        ttls: list[float] = []
        for rdtype in ("A", "AAAA"):
            records, ttl = await self._query(name, rdtype)
            found.extend(str(r.address) for r in records)
            if records:
                ttls.append(ttl)
        return found, min(ttls) if ttls else NEGATIVE_CACHE_TTL

    async def _query(self, name: str, rdtype: str) -> tuple[list[Any], float]:
        try:
            answer = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            log.debug("DNS %s %s: %s", rdtype, name, exc)
            return [], NEGATIVE_CACHE_TTL
        except dns.exception.DNSException as exc:
            log.info("DNS %s %s failed: %s", rdtype, name, exc)
            return [], NEGATIVE_CACHE_TTL
        if answer.rrset is None:
            return [], NEGATIVE_CACHE_TTL
        return list(answer.rrset), float(answer.rrset.ttl)

    def _order_srv(self, records: list[_Entry]) -> list[_Entry]:
        """RFC 2782: ascending priority; within one priority a weighted random order."""
        ordered: list[_Entry] = []
        for priority in sorted({int(r.priority) for r in records}):
            group = [r for r in records if int(r.priority) == priority]
            while group:
                total = sum(int(r.weight) for r in group)
                pick = self.rng.uniform(0, total) if total else 0
                for record in group:
                    pick -= int(record.weight)
                    if pick <= 0 or total == 0:
                        break
                ordered.append(record)
                group.remove(record)
        return ordered


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
