"""The registrar resolver (RFC 3263 subset) against a real DNS server on loopback.

Every test talks UDP DNS to :class:`tests.dnsserver.DnsServer`; time is a :class:`FakeClock`, so the
cache expiry is checked without sleeping.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from sipis.clock import FakeClock
from sipis.sip.message import SipURI
from sipis.sip.resolver import MAX_CACHE_TTL, NEGATIVE_CACHE_TTL, ResolveError, Resolver, Target
from tests.dnsserver import DnsServer

ZONE = {
    # SRV per transport, each with its own port so the answer shows which service was asked
    "_sip._udp.pbx.test": {"SRV": ["10 0 5070 a.pbx.test."]},
    "_sip._tcp.pbx.test": {"SRV": ["10 0 5071 a.pbx.test."]},
    "_sips._tcp.pbx.test": {"SRV": ["10 0 5072 a.pbx.test."]},
    "pbx.test": {"A": ["127.0.0.9"]},
    "a.pbx.test": {"A": ["127.0.0.1"]},
    "b.pbx.test": {"A": ["127.0.0.2"]},
    "c.pbx.test": {"A": ["127.0.0.3"]},
    "multi.test": {"A": ["127.0.1.1", "127.0.1.2"], "AAAA": ["::1"]},
    # by priority: listed out of order on purpose
    "_sip._udp.prio.test": {"SRV": ["30 0 5003 c.pbx.test.", "10 0 5001 a.pbx.test.", "20 0 5002 b.pbx.test."]},
    "_sip._udp.several.test": {"SRV": ["10 0 6000 multi.test.", "20 0 6001 a.pbx.test."]},
    "plain.test": {"A": ["127.0.0.5"]},  # no SRV at all
    "v6.test": {"AAAA": ["::1"]},
}


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    async with DnsServer(ZONE, ttl=60) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(dns_server: DnsServer, clock: FakeClock) -> Resolver:
    return Resolver(nameservers=[dns_server.address], clock=clock, rng=random.Random(3263), timeout=2.0)


async def resolve(resolver: Resolver, uri: str) -> list[Target]:
    return await resolver.resolve(SipURI.parse(uri))


def hosts_ports(targets: list[Target]) -> list[tuple[str, int]]:
    return [(t.host, t.port) for t in targets]


# --------------------------------------------------------------------------- literals and ports


@pytest.mark.parametrize(("uri", "expected"), [
    ("sip:127.0.0.1", Target("udp", "127.0.0.1", 5060, "127.0.0.1")),
    ("sip:127.0.0.1:5090;transport=tcp", Target("tcp", "127.0.0.1", 5090, "127.0.0.1")),
    ("sips:127.0.0.1", Target("tls", "127.0.0.1", 5061, "127.0.0.1")),
    ("sips:[::1]:5071", Target("tls", "::1", 5071, "::1")),
    ("sip:[2001:db8::1];transport=TCP", Target("tcp", "2001:db8::1", 5060, "2001:db8::1")),
])
async def test_ip_literal_is_used_as_is_without_a_query(resolver: Resolver, dns_server: DnsServer, uri: str,
                                                        expected: Target) -> None:
    assert await resolve(resolver, uri) == [expected]
    assert dns_server.total_queries == 0


async def test_explicit_port_looks_up_addresses_only(resolver: Resolver, dns_server: DnsServer) -> None:
    targets = await resolve(resolver, "sip:pbx.test:5080")
    assert targets == [Target("udp", "127.0.0.9", 5080, "pbx.test")]
    assert dns_server.count("pbx.test", "A") == 1
    assert dns_server.count("_sip._udp.pbx.test", "SRV") == 0
    assert not any(rdtype == "SRV" for _, rdtype in dns_server.queries)


async def test_explicit_port_with_ipv4_and_ipv6_addresses(resolver: Resolver) -> None:
    targets = await resolve(resolver, "sip:multi.test:5099;transport=tcp")
    # an RRset has no order of its own: IPv4 (any order) first, then IPv6
    assert {t.host for t in targets[:2]} == {"127.0.1.1", "127.0.1.2"}
    assert targets[2] == Target("tcp", "::1", 5099, "multi.test")
    assert {(t.transport, t.port, t.server_name) for t in targets} == {("tcp", 5099, "multi.test")}


async def test_unsupported_transport_is_an_error(resolver: Resolver, dns_server: DnsServer) -> None:
    with pytest.raises(ResolveError, match="unsupported transport"):
        await resolve(resolver, "sip:pbx.test;transport=sctp")
    assert dns_server.total_queries == 0


# --------------------------------------------------------------------------- SRV


@pytest.mark.parametrize(("uri", "service", "transport", "port"), [
    ("sip:pbx.test", "_sip._udp.pbx.test", "udp", 5070),
    ("sip:pbx.test;transport=udp", "_sip._udp.pbx.test", "udp", 5070),
    ("sip:pbx.test;transport=tcp", "_sip._tcp.pbx.test", "tcp", 5071),
    ("sip:pbx.test;transport=tls", "_sips._tcp.pbx.test", "tls", 5072),
    ("sips:pbx.test", "_sips._tcp.pbx.test", "tls", 5072),
    ("sips:PBX.Test", "_sips._tcp.pbx.test", "tls", 5072),
])
async def test_service_name_follows_the_transport(resolver: Resolver, dns_server: DnsServer, uri: str,
                                                  service: str, transport: str, port: int) -> None:
    targets = await resolve(resolver, uri)
    assert targets == [Target(transport, "127.0.0.1", port, "a.pbx.test")]  # type: ignore[arg-type]
    assert dns_server.count(service, "SRV") == 1
    srv_queries = {name for name, rdtype in dns_server.queries if rdtype == "SRV"}
    assert srv_queries == {service}
    assert dns_server.count("pbx.test", "A") == 0  # SRV found: the name's own A record is not used


async def test_srv_targets_come_in_priority_order(resolver: Resolver) -> None:
    targets = await resolve(resolver, "sip:prio.test")
    assert hosts_ports(targets) == [("127.0.0.1", 5001), ("127.0.0.2", 5002), ("127.0.0.3", 5003)]
    assert [t.server_name for t in targets] == ["a.pbx.test", "b.pbx.test", "c.pbx.test"]


async def test_srv_target_with_several_addresses_gives_one_target_each(resolver: Resolver) -> None:
    targets = await resolve(resolver, "sip:several.test")
    assert len(targets) == 4
    assert set(hosts_ports(targets[:2])) == {("127.0.1.1", 6000), ("127.0.1.2", 6000)}
    assert hosts_ports(targets[2:]) == [("::1", 6000), ("127.0.0.1", 6001)]  # then the priority-20 target
    assert [t.server_name for t in targets] == ["multi.test"] * 3 + ["a.pbx.test"]


async def test_srv_target_without_address_is_skipped(resolver: Resolver, dns_server: DnsServer) -> None:
    dns_server.add("_sip._udp.gap.test", "SRV", "10 0 5001 missing.test.", "20 0 5002 b.pbx.test.")
    dns_server.add("gap.test", "A", "127.0.0.8")
    targets = await resolve(resolver, "sip:gap.test")
    assert hosts_ports(targets) == [("127.0.0.2", 5002)]


async def test_weighted_choice_within_one_priority(dns_server: DnsServer, clock: FakeClock) -> None:
    dns_server.add("_sip._udp.weighted.test", "SRV", "10 90 5001 a.pbx.test.", "10 10 5002 b.pbx.test.",
                   "20 0 5003 c.pbx.test.")
    resolver = Resolver(nameservers=[dns_server.address], clock=clock, rng=random.Random(2782))
    firsts: Counter[int] = Counter()
    rounds = 400
    for _ in range(rounds):
        clock.advance(MAX_CACHE_TTL + 1)  # every round a fresh lookup
        targets = await resolve(resolver, "sip:weighted.test")
        assert sorted(t.port for t in targets[:2]) == [5001, 5002]  # both priority-10 targets first
        assert targets[2].port == 5003  # the priority-20 one always last
        firsts[targets[0].port] += 1
    assert dns_server.count("_sip._udp.weighted.test", "SRV") == rounds
    # expected 360 vs 40: generous bounds, only the direction and "both appear" matter
    assert firsts[5001] > firsts[5002] > 0
    assert firsts[5001] > rounds * 0.7
    assert firsts[5002] > rounds * 0.02


async def test_weight_zero_goes_after_weighted_targets(resolver: Resolver, dns_server: DnsServer) -> None:
    dns_server.add("_sip._udp.zero.test", "SRV", "10 0 5001 a.pbx.test.", "10 5 5002 b.pbx.test.")
    for _ in range(50):
        targets = await resolve(resolver, "sip:zero.test")
        assert [t.port for t in targets] == [5002, 5001]


async def test_cached_srv_is_reordered_on_each_resolution(resolver: Resolver, dns_server: DnsServer) -> None:
    """The cache keeps the records, not one drawn order: the load still spreads by weight."""
    dns_server.add("_sip._udp.spread.test", "SRV", "10 50 5001 a.pbx.test.", "10 50 5002 b.pbx.test.")
    firsts = Counter([(await resolve(resolver, "sip:spread.test"))[0].port for _ in range(100)])
    assert dns_server.count("_sip._udp.spread.test", "SRV") == 1  # all from the cache after the first
    assert firsts[5001] > 10 and firsts[5002] > 10


# --------------------------------------------------------------------------- no SRV, no name


@pytest.mark.parametrize(("uri", "transport", "port"), [
    ("sip:plain.test", "udp", 5060),
    ("sip:plain.test;transport=tcp", "tcp", 5060),
    ("sips:plain.test", "tls", 5061),
])
async def test_without_srv_the_name_is_used_on_the_default_port(resolver: Resolver, dns_server: DnsServer,
                                                                uri: str, transport: str, port: int) -> None:
    targets = await resolve(resolver, uri)
    assert targets == [Target(transport, "127.0.0.5", port, "plain.test")]  # type: ignore[arg-type]
    assert sum(n for (_, rdtype), n in dns_server.queries.items() if rdtype == "SRV") == 1
    assert dns_server.count("plain.test", "A") == 1


async def test_ipv6_only_name(resolver: Resolver) -> None:
    assert await resolve(resolver, "sips:v6.test") == [Target("tls", "::1", 5061, "v6.test")]


async def test_unknown_name_is_a_resolve_error(resolver: Resolver, dns_server: DnsServer) -> None:
    with pytest.raises(ResolveError, match=r"nowhere\.test"):
        await resolve(resolver, "sip:nowhere.test")
    assert dns_server.count("_sip._udp.nowhere.test", "SRV") == 1
    assert dns_server.count("nowhere.test", "A") == 1


async def test_name_without_addresses_is_a_resolve_error(resolver: Resolver, dns_server: DnsServer) -> None:
    dns_server.add("empty.test", "TXT", '"nothing here"')  # the name exists, but has no A/AAAA
    with pytest.raises(ResolveError):
        await resolve(resolver, "sip:empty.test:5060")


# --------------------------------------------------------------------------- caching


async def test_answers_are_cached_for_their_ttl(resolver: Resolver, dns_server: DnsServer,
                                               clock: FakeClock) -> None:
    first = await resolve(resolver, "sip:pbx.test;transport=tcp")
    queries = dns_server.total_queries
    assert queries > 0
    assert await resolve(resolver, "sip:pbx.test;transport=tcp") == first
    clock.advance(59)
    assert await resolve(resolver, "sip:pbx.test;transport=tcp") == first
    assert dns_server.total_queries == queries  # no query while the TTL (60 s) runs
    clock.advance(2)
    assert await resolve(resolver, "sip:pbx.test;transport=tcp") == first
    assert dns_server.count("_sip._tcp.pbx.test", "SRV") == 2
    assert dns_server.total_queries == 2 * queries


async def test_cache_is_per_transport_and_port(resolver: Resolver, dns_server: DnsServer) -> None:
    udp = await resolve(resolver, "sip:pbx.test")
    tcp = await resolve(resolver, "sip:pbx.test;transport=tcp")
    explicit = await resolve(resolver, "sip:pbx.test:5090")
    assert [t.port for t in (*udp, *tcp, *explicit)] == [5070, 5071, 5090]
    assert dns_server.count("_sip._udp.pbx.test", "SRV") == 1
    assert dns_server.count("_sip._tcp.pbx.test", "SRV") == 1


async def test_changed_zone_is_seen_after_expiry(resolver: Resolver, dns_server: DnsServer,
                                                 clock: FakeClock) -> None:
    assert hosts_ports(await resolve(resolver, "sip:pbx.test")) == [("127.0.0.1", 5070)]
    dns_server.add("_sip._udp.pbx.test", "SRV", "10 0 5080 b.pbx.test.")
    assert hosts_ports(await resolve(resolver, "sip:pbx.test")) == [("127.0.0.1", 5070)]
    clock.advance(61)
    assert hosts_ports(await resolve(resolver, "sip:pbx.test")) == [("127.0.0.2", 5080)]


async def test_long_ttl_is_capped(resolver: Resolver, dns_server: DnsServer, clock: FakeClock) -> None:
    dns_server.add("_sip._udp.long.test", "SRV", "10 0 5001 long-a.test.", ttl=86400)
    dns_server.add("long-a.test", "A", "127.0.0.1", ttl=86400)
    await resolve(resolver, "sip:long.test")
    clock.advance(MAX_CACHE_TTL - 1)
    await resolve(resolver, "sip:long.test")
    assert dns_server.count("_sip._udp.long.test", "SRV") == 1
    clock.advance(2)
    await resolve(resolver, "sip:long.test")
    assert dns_server.count("_sip._udp.long.test", "SRV") == 2


async def test_shortest_ttl_of_srv_and_addresses_wins(resolver: Resolver, dns_server: DnsServer,
                                                      clock: FakeClock) -> None:
    dns_server.add("_sip._udp.short.test", "SRV", "10 0 5001 short-a.test.", ttl=200)
    dns_server.add("short-a.test", "A", "127.0.0.1", ttl=10)
    await resolve(resolver, "sip:short.test")
    clock.advance(9)
    await resolve(resolver, "sip:short.test")
    assert dns_server.count("short-a.test", "A") == 1
    clock.advance(2)
    await resolve(resolver, "sip:short.test")
    assert dns_server.count("short-a.test", "A") == 2


async def test_failures_are_cached_negatively(resolver: Resolver, dns_server: DnsServer,
                                              clock: FakeClock) -> None:
    with pytest.raises(ResolveError):
        await resolve(resolver, "sip:later.test")
    queries = dns_server.total_queries
    dns_server.add("later.test", "A", "127.0.0.7")  # appears, but the failure is remembered
    clock.advance(NEGATIVE_CACHE_TTL - 1)
    with pytest.raises(ResolveError, match="cached"):
        await resolve(resolver, "sip:later.test")
    assert dns_server.total_queries == queries
    clock.advance(2)
    assert await resolve(resolver, "sip:later.test") == [Target("udp", "127.0.0.7", 5060, "later.test")]
    assert dns_server.total_queries > queries


async def test_ip_literals_are_not_cached(resolver: Resolver, clock: FakeClock) -> None:
    await resolve(resolver, "sip:127.0.0.1")
    assert resolver._cache == {}


# --------------------------------------------------------------------------- nameservers


async def test_each_nameserver_keeps_its_own_port(dns_server: DnsServer, clock: FakeClock) -> None:
    async with DnsServer(servfail=True) as broken:
        resolver = Resolver(nameservers=[broken.address, dns_server.address], clock=clock, timeout=2.0)
        targets = await resolve(resolver, "sip:pbx.test")
    assert hosts_ports(targets) == [("127.0.0.1", 5070)]
    assert broken.total_queries > 0  # asked first, answered SERVFAIL
    assert dns_server.count("_sip._udp.pbx.test", "SRV") == 1


async def test_all_nameservers_failing_is_a_resolve_error(clock: FakeClock) -> None:
    async with DnsServer(ZONE, servfail=True) as broken:
        resolver = Resolver(nameservers=[broken.address], clock=clock, timeout=2.0)
        with pytest.raises(ResolveError):
            await resolve(resolver, "sip:pbx.test")
