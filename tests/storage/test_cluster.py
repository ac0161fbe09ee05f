"""Leases, nodes, signals and singletons: on both backends, then PostgreSQL's many-node behaviour."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from lab.postgres import PostgresServer
from storage.cluster import (
    RECONNECTED,
    Lease,
    LeaseStore,
    LocalSignals,
    LocalSingleton,
    NodeStore,
    PgLeaseStore,
    PgNodeStore,
    PgSignals,
    PgSingleton,
    Signals,
    Singleton,
    SqliteLeaseStore,
    SqliteNodeStore,
)
from storage.database import Database
from storage.pg_repositories import pg_stores
from storage.postgres import PgDatabase
from storage.repositories import Stores
from storage.writer import UpsertInstance, apply_ops
from tests.waiting import wait_for

from .factories import make_instance


def test_both_backends_satisfy_the_protocols() -> None:
    # Assignments type-check the structural match under mypy.
    sqlite: tuple[type[LeaseStore], type[NodeStore], type[Signals], type[Singleton]] = (
        SqliteLeaseStore, SqliteNodeStore, LocalSignals, LocalSingleton)
    pg: tuple[type[LeaseStore], type[NodeStore], type[Signals], type[Singleton]] = (
        PgLeaseStore, PgNodeStore, PgSignals, PgSingleton)
    assert sqlite and pg


async def add_instances(stores: Stores, count: int) -> list[str]:
    selectors = [f"sel-{i:04d}" for i in range(count)]
    await stores.instances.upsert_many([make_instance(s) for s in selectors])
    return selectors


async def test_claim_renew_release(stores: Stores) -> None:
    selectors = await add_instances(stores, 5)
    first = await stores.leases.claim("a", 3, 15)
    assert len(first) == 3 and all(lease.epoch == 1 for lease in first)
    rest = await stores.leases.claim("b", 10, 15)
    assert {lease.selector for lease in first} | {lease.selector for lease in rest} == set(selectors)
    assert await stores.leases.claim("b", 10, 15) == []  # nothing unowned or expired is left
    assert await stores.leases.renew("a", 15) == first
    assert await stores.leases.counts() == {"a": 3, "b": 2}

    mine = [lease.selector for lease in first]
    assert await stores.leases.release("b", mine) == 0  # not b's to give
    assert await stores.leases.release("a", mine[:1]) == 1
    assert await stores.leases.renew("a", 15) == first[1:]
    owners = await stores.leases.owners(mine)
    assert owners == {mine[0]: None, mine[1]: "a", mine[2]: "a"}
    assert (await stores.leases.owners())[rest[0].selector] == "b"
    assert await stores.leases.counts() == {None: 1, "a": 2, "b": 2}
    again = await stores.leases.claim("b", 10, 15)
    assert again == [Lease(mine[0], 2)]  # every claim bumps the epoch


async def test_an_expired_lease_goes_to_another_node_with_the_next_epoch(stores: Stores) -> None:
    await add_instances(stores, 2)
    assert [lease.epoch for lease in await stores.leases.claim("a", 10, -1)] == [1, 1]  # already expired
    taken = await stores.leases.claim("b", 10, 15)
    assert [lease.epoch for lease in taken] == [2, 2]
    assert await stores.leases.renew("a", 15) == []  # a stops acting for them
    assert await stores.leases.counts() == {"b": 2}


async def test_the_instance_upsert_never_touches_the_lease(stores: Stores) -> None:
    await add_instances(stores, 1)
    leases = await stores.leases.claim("a", 1, 15)
    await stores.instances.upsert(make_instance("sel-0000", state="active", failure_count=4))
    await stores.instances.upsert_many([make_instance("sel-0000", state="proxied")])
    assert await stores.leases.renew("a", 15) == leases
    assert await stores.leases.claim("b", 1, 15) == []
    await stores.instances.delete("sel-0000")
    assert await stores.leases.counts() == {}


async def test_a_draining_node_claims_nothing_unless_told_to(stores: Stores) -> None:
    await add_instances(stores, 2)
    await stores.nodes.heartbeat("a", "draining")
    assert await stores.leases.claim("a", 10, 15) == []
    assert len(await stores.leases.claim("a", 10, 15, exclude_draining=False)) == 2


async def test_nodes_heartbeat_count_and_forget(stores: Stores) -> None:
    await add_instances(stores, 3)
    await stores.nodes.heartbeat("a", "up")
    await stores.nodes.heartbeat("b", "up")
    await stores.leases.claim("a", 2, 15)
    await stores.nodes.heartbeat("b", "draining")
    a, b = await stores.nodes.nodes()
    assert (a.name, a.state, a.instances, b.name, b.state, b.instances) == ("a", "up", 2, "b", "draining", 0)
    assert a.started_at <= a.last_seen
    assert [n.state for n in await stores.nodes.nodes(gone_after=-1)] == ["gone", "gone"]
    assert [n.state for n in await stores.nodes.nodes(gone_after=3600)] == ["up", "draining"]
    await stores.nodes.forget("b")
    assert [n.name for n in await stores.nodes.nodes()] == ["a"]


async def test_signals_reach_every_subscriber(stores: Stores) -> None:
    got: list[tuple[str, str]] = []
    stores.signals.subscribe(lambda topic, payload: got.append((topic, payload)))
    await stores.signals.start()
    try:
        await stores.signals.notify("instance", "sel-1")
        await wait_for(lambda: got == [("instance", "sel-1")], what="the signal")
        with pytest.raises(ValueError, match="too large"):
            await stores.signals.notify("instance", "x" * 7001)
    finally:
        await stores.signals.close()


async def test_sqlite_is_one_node_whose_singletons_are_always_held(db: Database) -> None:
    singleton: Singleton = LocalSingleton()
    assert await singleton.try_hold("ageing") and await singleton.try_hold("ageing")


# -- PostgreSQL: many nodes on one database ------------------------------------------------------


@pytest.fixture
async def two_nodes(pg_url: str) -> AsyncIterator[tuple[Stores, Stores]]:
    a, b = await PgDatabase.open(pg_url), await PgDatabase.open(pg_url)
    try:
        yield pg_stores(a, "a"), pg_stores(b, "b")
    finally:
        await a.close()
        await b.close()


async def test_concurrent_claims_never_share_an_instance(two_nodes: tuple[Stores, Stores]) -> None:
    a, b = two_nodes
    selectors = await add_instances(a, 300)

    async def claim_all(stores: Stores, node: str) -> list[str]:
        taken: list[str] = []
        while batch := await stores.leases.claim(node, 7, 15):
            taken += [lease.selector for lease in batch]
            await asyncio.sleep(0)
        return taken

    by_a, by_b = await asyncio.gather(claim_all(a, "a"), claim_all(b, "b"))
    assert not set(by_a) & set(by_b)
    assert sorted(by_a + by_b) == selectors
    assert by_a and by_b  # both took part
    owners = await a.leases.owners()
    assert all(owners[s] == "a" for s in by_a) and all(owners[s] == "b" for s in by_b)


async def test_a_nodes_writer_and_its_lease_rounds_never_deadlock(pg_url: str) -> None:
    # one node's writer (a batch of changed instances in whatever order they changed: one
    # transaction, many chunks) and its lease rounds lock the same rows: both take them in one order
    rounds_db, writer_db = await PgDatabase.open(pg_url), await PgDatabase.open(pg_url)
    try:
        rounds, writer = pg_stores(rounds_db, "a"), pg_stores(writer_db, "a")
        selectors = await add_instances(rounds, 400)
        assert len(await rounds.leases.claim("a", 400, 15)) == 400
        batch = [UpsertInstance(make_instance(s)) for s in reversed(selectors)]

        async def write() -> None:
            for _ in range(15):
                async with writer_db.transaction():
                    await apply_ops(writer, batch, chunk=50)

        async def renew() -> None:
            for _ in range(15):
                assert len(await rounds.leases.renew("a", 15)) == 400
                assert len(await rounds.leases.bump("a", selectors[::-1], 15)) == 400

        await asyncio.gather(write(), renew())
    finally:
        await rounds_db.close()
        await writer_db.close()


async def test_signals_cross_nodes(two_nodes: tuple[Stores, Stores]) -> None:
    a, b = two_nodes
    got_a: list[tuple[str, str]] = []
    got_b: list[tuple[str, str]] = []
    a.signals.subscribe(lambda *signal: got_a.append(signal))
    b.signals.subscribe(lambda *signal: got_b.append(signal))
    await a.signals.start()
    await b.signals.start()
    await a.signals.notify("instance", "sel-1")
    await wait_for(lambda: got_a == got_b == [("instance", "sel-1")], what="the signal on both nodes")
    await a.signals.close()
    await b.signals.close()


async def test_signals_listen_again_after_the_server_restarts(private_postgres: PostgresServer) -> None:
    url = private_postgres.create_database()
    a, b = await PgDatabase.open(url), await PgDatabase.open(url)
    listener = PgSignals(b, check_interval=0.1, retry_max=0.2)
    got: list[tuple[str, str]] = []
    listener.subscribe(lambda *signal: got.append(signal))
    await listener.start()
    try:
        private_postgres.restart()
        await wait_for(lambda: (RECONNECTED, "") in got, what="the listener's reconnection")
        sender = pg_stores(a, "a").signals
        for _ in range(50):  # the sender's pooled connections notice the restart on first use
            try:
                await sender.notify("instance", "after")
                break
            except Exception:
                await asyncio.sleep(0.1)
        await wait_for(lambda: ("instance", "after") in got, what="a signal after the restart")
        assert listener.reconnects == 1
    finally:
        await listener.close()
        await a.close()
        await b.close()


async def test_a_singleton_moves_when_its_holders_connection_closes(
    two_nodes: tuple[Stores, Stores], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = two_nodes
    holder, other = a.singletons, b.singletons
    assert isinstance(holder, PgSingleton) and isinstance(other, PgSingleton)
    lost: list[str] = []
    holder.on_lost = lost.append
    assert await holder.try_hold("ageing") is True
    assert await holder.try_hold("ageing") is True
    assert await other.try_hold("ageing") is False
    assert await other.try_hold("cleanup") is True  # names are independent

    # the holder's connection dies (as when its node loses PostgreSQL): the lock goes with it
    assert holder._conn is not None
    pid = holder._conn.get_server_pid()
    db = b.leases._db if isinstance(b.leases, PgLeaseStore) else None
    assert db is not None
    await db.execute("SELECT pg_terminate_backend($1)", pid)
    await wait_for_async(lambda: other.try_hold("ageing"), what="the other node taking the singleton")
    with caplog.at_level(logging.WARNING, logger="storage.cluster"):
        assert await holder.try_hold("ageing") is False
    assert lost == ["ageing"]
    assert "singleton ageing lost" in caplog.text

    await other.close()  # closing a connection frees its locks too
    await wait_for_async(lambda: holder.try_hold("ageing"), what="the singleton coming back")


async def wait_for_async(probe: object, what: str, timeout: float = 15.0) -> None:
    assert callable(probe)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await probe():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def test_a_claim_among_given_selectors_takes_only_those(stores: Stores) -> None:
    selectors = await add_instances(stores, 3)
    assert await stores.leases.claim("a", 5, 15, selectors=[selectors[1]]) == [Lease(selectors[1], 1)]
    assert await stores.leases.claim("b", 5, 15, selectors=[selectors[1]]) == []  # a holds it
    assert {lease.selector for lease in await stores.leases.claim("b", 5, 15)} == {selectors[0], selectors[2]}
