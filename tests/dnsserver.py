"""A tiny authoritative DNS server for tests: asyncio UDP on 127.0.0.1, a free port.

It answers from a zone given as ``{name: {rdtype: [rdata text, ...]}}``::

    zone = {
        "_sip._tcp.pbx.test": {"SRV": ["10 0 5060 a.pbx.test."]},
        "a.pbx.test": {"A": ["127.0.0.1"]},
    }
    async with DnsServer(zone, ttl=60) as dns:
        resolver = Resolver(nameservers=[dns.address])

A known name without records of the asked type gets an empty NOERROR answer (NODATA), an unknown
name NXDOMAIN. Every query is counted per ``(name, type)`` in :attr:`DnsServer.queries` (names in
lower case without the final dot). ``servfail=True`` makes it answer SERVFAIL to everything.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import TracebackType
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

Zone = dict[str, dict[str, list[str]]]


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


class DnsServer(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone | None = None, *, ttl: int = 60, servfail: bool = False) -> None:
        self.zone: Zone = {}
        self.ttls: dict[tuple[str, str], int] = {}
        self.default_ttl = ttl
        self.servfail = servfail
        self.queries: Counter[tuple[str, str]] = Counter()
        self._transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        for name, rrsets in (zone or {}).items():
            for rdtype, rdatas in rrsets.items():
                self.add(name, rdtype, *rdatas)

    # ------------------------------------------------------------------ zone

    def add(self, name: str, rdtype: str, *rdatas: str, ttl: int | None = None) -> None:
        """Set (replace) the records of one type for a name; ``ttl`` overrides the default."""
        name, rdtype = _norm(name), rdtype.upper()
        self.zone.setdefault(name, {})[rdtype] = list(rdatas)
        if ttl is not None:
            self.ttls[(name, rdtype)] = ttl

    def remove(self, name: str) -> None:
        """Forget a name altogether (it answers NXDOMAIN from now on)."""
        name = _norm(name)
        self.zone.pop(name, None)
        for key in [k for k in self.ttls if k[0] == name]:
            del self.ttls[key]

    def count(self, name: str, rdtype: str) -> int:
        return self.queries[(_norm(name), rdtype.upper())]

    @property
    def total_queries(self) -> int:
        return sum(self.queries.values())

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        return self.address

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)  # a datagram endpoint by construction
        host, port = transport.get_extra_info("sockname")[:2]
        self.address = (str(host), int(port))

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        if not query.question or self._transport is None:
            return
        response = self.answer(query)
        self._transport.sendto(response.to_wire(), (str(addr[0]), int(addr[1])))

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        question = query.question[0]
        name = _norm(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[(name, rdtype)] += 1
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif self.zone[name].get(rdtype):
            ttl = self.ttls.get((name, rdtype), self.default_ttl)
            response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", rdtype, *self.zone[name][rdtype]))
        return response
