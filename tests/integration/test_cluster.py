"""Three real cores on one real PostgreSQL in front of one real Kamailio (issue 13, item 10).

Short leases (``lease_ttl`` 3 s: a renewal every second) and a high ``register_rate`` keep it fast.
Sleeping apps are Kamailio's ``loadNNNNN`` users, enrolled over TCP (lab/outage.py); "which node acts
for an instance" is read from the operator API's owner column and from Kamailio, whose SIPIS binding
for it addresses the node that registered it (each node's Contact is its own SIP listener).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from lab.cluster import Cluster
from lab.kamailio import Kamailio
from lab.outage import enrol_sleeping, wait_for
from lab.postgres import PostgresServer
from lab.push_servers import MediatorServer
from lab.sipp import arun_scenario
from sipis.sip.register import EPOCH_SHIFT
from tests.integration.conftest import KamailioFactory
from tests.integration.test_calls_e2e import WokenApp
from tests.waiting import wait_for as await_for

pytestmark = pytest.mark.integration

TTL = 3.0
RATE = 200.0  # REGISTERs per second at most, per node
FAST = {"register_rate": RATE}
SHORT_EXPIRES = 8
#: a binding granted SHORT_EXPIRES is refreshed within this (refresh_max = 0.8 of the expiry)
REFRESHED_WITHIN = 0.8 * SHORT_EXPIRES


@pytest.fixture
def kam(kamailio_factory: KamailioFactory) -> Kamailio:
    return kamailio_factory(min_expires=1)


@pytest.fixture
async def mediator(tmp_path: Path) -> AsyncIterator[MediatorServer]:
    server = MediatorServer(tmp_path / "mediator")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def make_cluster(kam: Kamailio) -> Iterator[list[Cluster]]:
    made: list[Cluster] = []
    yield made
    for cluster in made:
        cluster.close()


def per_node(owners: dict[str, str | None]) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for owner in owners.values():
        counts[owner] = counts.get(owner, 0) + 1
    return counts


def one_binding_each(cluster: Cluster, users: list[str]) -> dict[str, str | None]:
    """AOR user → the node of its single SIPIS binding; fails when one has none or several."""
    bound = cluster.sipis_bindings(users)
    wrong = {user: nodes for user, nodes in bound.items() if len(nodes) != 1}
    assert not wrong, f"{len(wrong)} instances without exactly one binding, e.g. {list(wrong.items())[:5]}"
    return {user: nodes[0] for user, nodes in bound.items()}


def users(n: int) -> list[str]:
    return [f"load{k:05d}" for k in range(1, n + 1)]


async def test_300_instances_spread_a_killed_node_s_move_and_a_moved_one_still_rings(
        kam: Kamailio, pg_url: str, mediator: MediatorServer, make_cluster: list[Cluster]) -> None:
    n = 300
    cluster = Cluster(kam, pg_url, lease_ttl=TTL, sip_options=FAST, mediator=(mediator.send_url, mediator.ca_file))
    make_cluster.append(cluster)
    cluster.start()
    with cluster.nodes["a"].client() as client:
        apps = dict(zip(users(n), enrol_sleeping(client, kam, n), strict=True))

    def spread() -> bool:
        counts = per_node(cluster.owners())
        return sum(counts.get(name, 0) for name in "abc") == n and all(80 <= counts.get(name, 0) <= 120
                                                                        for name in "abc")

    wait_for(spread, 30, "300 instances owned, 80–120 per node", poll=0.5)
    wait_for(lambda: kam.contact_count() == n, 30, f"{n} bindings")
    counts = {name: row["instances"] for name, row in cluster.node_rows(via="b").items()}
    assert sum(counts.values()) == n and all(80 <= counts[name] <= 120 for name in "abc"), counts
    # the bindings follow ownership: each instance is registered by the node that owns it
    # node c's owner column is refreshed from storage every ttl/3: wait until it has caught up
    wait_for(lambda: None not in cluster.owners(via="c").values(), 3 * TTL, "c's view of every owner", poll=0.5)
    owners = cluster.owners(via="c")
    bound_to = one_binding_each(cluster, list(apps))
    assert bound_to == owners, {u: (bound_to[u], owners[u]) for u in owners if bound_to[u] != owners[u]}

    # kill -9 of c: its instances are registered again by a and b within lease_ttl + N/register_rate + 5 s
    moved = [user for user, owner in owners.items() if owner == "c"]
    cluster.nodes["c"].kill()

    def taken_over() -> bool:
        by_node = cluster.sipis_bindings(moved)
        return all(by_node[user] and set(by_node[user]) <= {"a", "b"} for user in moved)

    wait_for(taken_over, TTL + len(moved) / RATE + 5, f"c's {len(moved)} instances registered by a and b", poll=0.2)
    # exactly one SIPIS binding per instance afterwards, and Kamailio holds nothing else
    after = one_binding_each(cluster, list(apps))
    assert set(after.values()) <= {"a", "b"}
    assert kam.contact_count() == n
    assert set(per_node(cluster.owners(via="b"))) <= {"a", "b"}

    # a call to a moved instance: held and pushed by its new owner, released to the woken app
    user = moved[0]
    selector, bearer = apps[user]
    app = WokenApp(kam, user, "loadpw")
    await app.start()
    try:
        caller = asyncio.ensure_future(arun_scenario("uac_answered.xml", kam.target("udp"), service=user,
                                                     timeout=30))
        await await_for(lambda: any((r.json or {}).get("Selector") == selector for r in mediator.requests),
                        timeout=15, what="the call push")
        contact = await app.register()
        with cluster.nodes["a"].client() as client:
            answer = await asyncio.to_thread(client.put, f"/v1/instances/{selector}/state",
                                             json={"state": "active", "contact": contact},
                                             headers={"Authorization": f"Bearer {bearer}"})
        assert answer.status_code == 200, answer.text
        result = await caller
        assert result.ok, result.describe()
        assert result.received(200)
        assert len(app.invites) == 1
    finally:
        await app.close()


async def test_a_drain_leaves_no_instance_without_a_binding(kam: Kamailio, pg_url: str,
                                                            make_cluster: list[Cluster]) -> None:
    n = 60
    cluster = Cluster(kam, pg_url, lease_ttl=TTL, sip_options=FAST)
    make_cluster.append(cluster)
    cluster.start()
    with cluster.nodes["a"].client() as client:
        apps = users(len(enrol_sleeping(client, kam, n)))
    wait_for(lambda: set(per_node(cluster.owners())) == {"a", "b", "c"}, 30, "every node owning some", poll=0.5)
    owners = cluster.owners()
    wait_for(lambda: one_binding_each(cluster, apps) == owners, 30, "bindings addressing the owners", poll=0.5)
    handed = [user for user, owner in owners.items() if owner == "b"]

    with cluster.nodes["a"].operator() as op:  # any node's operator API drains any node
        op.post("/v1/nodes/b/drain").raise_for_status()
    samples = 0

    def handed_over() -> bool:
        nonlocal samples
        samples += 1
        assert kam.contact_count() == n  # replaced, never removed first (nor doubled)
        bound = cluster.sipis_bindings(handed)
        unbound = [user for user, nodes in bound.items() if not nodes]
        assert not unbound, f"without a binding during the drain: {unbound}"
        return all(set(nodes) <= {"a", "c"} for nodes in bound.values())

    # b releases in batches of register_rate × ttl/3, a and c claim them in their next rounds
    wait_for(handed_over, 3 * TTL + len(handed) / RATE + 5, f"b's {len(handed)} instances handed over", poll=0.05)
    assert samples > 1
    rows = cluster.node_rows(via="c")
    assert (rows["b"]["state"], rows["b"]["instances"]) == ("draining", 0)
    assert set(one_binding_each(cluster, apps).values()) <= {"a", "c"}


async def test_a_stale_node_cannot_take_back_the_new_owner_s_bindings(kam: Kamailio, pg_url: str,
                                                                     make_cluster: list[Cluster]) -> None:
    n = 30
    # short registrations, so refreshes of c's bindings fall due while it is frozen, yet longer than
    # lease_ttl + a round: they do not expire before a and b take over
    cluster = Cluster(kam, pg_url, lease_ttl=TTL, sip_options={**FAST, "register_expires": SHORT_EXPIRES})
    make_cluster.append(cluster)
    cluster.start()
    with cluster.nodes["a"].client() as client:
        apps = users(len(enrol_sleeping(client, kam, n)))
    wait_for(lambda: set(per_node(cluster.owners())) == {"a", "b", "c"}, 30, "every node owning some", poll=0.5)
    owners = cluster.owners()
    wait_for(lambda: one_binding_each(cluster, apps) == owners, 30, "bindings addressing the owners", poll=0.5)
    stale = [user for user, owner in owners.items() if owner == "c"]

    def epochs() -> dict[str, int]:
        found = {}
        for user in stale:
            (binding,) = [c for c in kam.ul_lookup(user) if c["contact"].startswith("sip:sipis-")]
            assert binding["cseq"] is not None
            found[user] = binding["cseq"] >> EPOCH_SHIFT
        return found

    old = epochs()
    cluster.nodes["c"].pause()  # past its lease: a and b take its instances over
    paused = time.monotonic()
    try:
        wait_for(lambda: all(set(nodes) <= {"a", "b"} for nodes in cluster.sipis_bindings(stale).values()),
                 TTL + len(stale) / RATE + 5, "c's instances registered by a and b", poll=0.2)
        taken = epochs()
        assert all(taken[user] > old[user] for user in stale)
        time.sleep(max(0.0, paused + REFRESHED_WITHIN - time.monotonic()))  # every refresh of c's overdue
    finally:
        cluster.nodes["c"].resume()
    # c wakes with overdue refreshes and a lease it no longer holds: none of its REGISTERs may land.
    # It may claim a share again (a new epoch, higher still), so what must never be seen is a
    # binding in an epoch older than the takeover's.
    deadline = time.monotonic() + 2 * TTL
    while time.monotonic() < deadline:
        now = epochs()
        assert all(now[user] >= taken[user] for user in stale), {u: (old[u], taken[u], now[u]) for u in stale}
        time.sleep(0.1)
    assert cluster.node_rows()["c"]["state"] == "up"  # awake and back in the cluster meanwhile
    assert kam.contact_count() == n


async def test_postgresql_restarted_then_unreachable_for_a_while(kam: Kamailio, private_postgres: PostgresServer,
                                                                 make_cluster: list[Cluster]) -> None:
    n, ttl = 30, 10.0
    outage = 0.8 * ttl  # shorter than the leases: every node keeps acting for what it owns throughout
    cluster = Cluster(kam, private_postgres.create_database(), lease_ttl=ttl,
                      sip_options={**FAST, "register_expires": SHORT_EXPIRES})
    make_cluster.append(cluster)
    cluster.start()
    with cluster.nodes["a"].client() as client:
        apps = dict(zip(users(n), enrol_sleeping(client, kam, n), strict=True))

    def all_owned() -> bool:
        return sum(count for owner, count in per_node(cluster.owners()).items() if owner) == n

    wait_for(all_owned, 3 * ttl, "every instance owned", poll=0.5)
    wait_for(lambda: kam.contact_count() == n, 30, f"{n} bindings")

    def write(node: str, state: str = "inactive") -> int:
        selector, bearer = next(iter(apps.values()))
        with cluster.nodes[node].client() as client:
            return client.put(f"/v1/instances/{selector}/state", json={"state": state},
                              headers={"Authorization": f"Bearer {bearer}"}).status_code

    def recovered() -> bool:
        rows = cluster.node_rows()
        return (all(write(node) == 200 for node in "abc") and all_owned()
                and all(rows[node]["state"] == "up" and rows[node]["lease_lag"] < ttl for node in "abc"))

    # a restart: every node reconnects, nothing is lost
    private_postgres.restart()
    wait_for(recovered, 2 * ttl, "every node writing and renewing again", poll=0.5)
    assert len(cluster.owners()) == n
    one_binding_each(cluster, list(apps))

    # unreachable: refreshes go on (the leases have not ended), writes are refused with 503
    def cseqs() -> dict[str, int]:
        return {user: binding["cseq"] or 0 for user in apps for binding in kam.ul_lookup(user)}

    before = cseqs()
    private_postgres.stop()
    stopped = time.monotonic()
    try:
        assert {write(node) for node in "abc"} == {503}
        refreshed: set[str] = set()
        while time.monotonic() < stopped + outage:  # sampled throughout: each refresh is seen once
            refreshed |= {user for user, cseq in cseqs().items() if cseq > before[user]}
            time.sleep(0.5)
        assert refreshed == set(apps), f"not refreshed during the outage: {sorted(set(apps) - refreshed)}"
        assert kam.contact_count() == n
    finally:
        private_postgres.start()
    wait_for(recovered, 2 * ttl, "every node writing and renewing again", poll=0.5)
    assert len(cluster.owners()) == n
    one_binding_each(cluster, list(apps))


async def test_postgresql_unreachable_past_the_leases_then_everything_is_registered_again(
        kam: Kamailio, private_postgres: PostgresServer, make_cluster: list[Cluster]) -> None:
    n = 30
    cluster = Cluster(kam, private_postgres.create_database(), lease_ttl=TTL,
                      sip_options={**FAST, "register_expires": SHORT_EXPIRES})
    make_cluster.append(cluster)
    cluster.start()
    with cluster.nodes["a"].client() as client:
        apps = users(len(enrol_sleeping(client, kam, n)))
    wait_for(lambda: set(per_node(cluster.owners())) == {"a", "b", "c"}, 30, "every node owning some", poll=0.5)
    wait_for(lambda: kam.contact_count() == n, 30, f"{n} bindings")

    def cseqs() -> dict[str, int]:
        return {user: binding["cseq"] or 0 for user in apps for binding in kam.ul_lookup(user)}

    private_postgres.stop()
    try:
        # past its leases a node stops acting (another may own the instances by now)
        wait_for(lambda: all("leases ended without renewal" in node.log_text() for node in cluster.nodes.values()),
                 2 * TTL, "every node to stop acting")
        stopped = cseqs()
    finally:
        private_postgres.start()
    # back: the leases are renewed or claimed again and every instance is registered again, its
    # CSeq still growing (in the epoch its node kept, or in a new one)
    wait_for(lambda: sum(count for owner, count in per_node(cluster.owners()).items() if owner) == n,
             3 * TTL, "every instance owned again", poll=0.5)

    def registered_again() -> bool:
        now = cseqs()
        return len(now) == n and all(now[user] > stopped.get(user, 0) for user in apps)

    wait_for(registered_again, 2 * TTL + n / RATE + 5, "every instance registered again", poll=0.2)
    one_binding_each(cluster, apps)


def test_an_app_change_sent_to_another_node_takes_effect_on_the_owner(
        kam: Kamailio, pg_url: str, make_cluster: list[Cluster]) -> None:
    cluster = Cluster(kam, pg_url, nodes=2, lease_ttl=TTL, sip_options=FAST)
    make_cluster.append(cluster)
    cluster.start()
    with cluster.nodes["a"].client() as client:
        [(selector, bearer)] = enrol_sleeping(client, kam, 1)  # enrolled on a, which claims it
    user = users(1)[0]
    wait_for(lambda: cluster.sipis_bindings([user])[user] == ["a"], 15, "the app registered by its owner a")
    wait_for(lambda: cluster.owners(via="b") == {user: "a"}, 5, "b seeing a as the owner")
    headers = {"Authorization": f"Bearer {bearer}"}
    with cluster.nodes["b"].client() as client:  # the app wakes up and tells node b, not its owner
        answer = client.put(f"/v1/instances/{selector}/state", json={"state": "active"}, headers=headers)
        assert answer.status_code == 200, answer.text
        # the bound: on the owner within 1 s, plus the unREGISTER itself
        wait_for(lambda: cluster.sipis_bindings([user])[user] == [], 1.0 + 1.0, "a removing its binding")
        answer = client.put(f"/v1/instances/{selector}/state", json={"state": "inactive"}, headers=headers)
        assert answer.status_code == 200, answer.text
        wait_for(lambda: cluster.sipis_bindings([user])[user] == ["a"], 5, "a registering it again")
    with cluster.nodes["a"].client() as client:  # the owner's own API shows what b stored
        assert client.get(f"/v1/instances/{selector}", headers=headers).json()["state"] in ("inactive", "proxied")
