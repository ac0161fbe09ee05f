"""PostgreSQL's own machinery: URLs, migrations, errors, durability and an outage of the server."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from lab.postgres import PostgresServer
from storage.database import SchemaTooNewError
from storage.pg_repositories import PgEventLog, pg_stores
from storage.pg_url import PasswordInUrlError, check_url, redact_url
from storage.postgres import (
    PG_MIGRATIONS,
    PgDatabase,
    PgError,
    is_disk_full,
    is_transient,
)
from storage.writer import BatchedWriter, StorageUnavailable

from .factories import make_audit, make_event, make_instance


def test_a_password_in_the_url_is_refused_without_repeating_it() -> None:
    with pytest.raises(PasswordInUrlError) as caught:
        check_url("postgresql://sipis:s3cret@db.example:5432/sipis")
    assert "s3cret" not in str(caught.value) and "PGPASSWORD" in str(caught.value)
    with pytest.raises(PasswordInUrlError):
        check_url("postgresql://sipis@db/sipis?sslmode=require&password=s3cret")
    with pytest.raises(ValueError, match="postgresql://"):
        check_url("mysql://sipis@db/sipis")
    assert check_url("postgresql://sipis@db:5432/sipis") == "postgresql://sipis@db:5432/sipis"
    assert redact_url("postgresql://u:s3cret@db:5432/x?password=s3cret") == "postgresql://u:***@db:5432/x?password=***"


def test_which_errors_are_transient() -> None:
    assert is_transient(ConnectionRefusedError())
    assert is_transient(PgError("40001", "could not serialize access"))
    assert is_transient(PgError("57P01", "terminating connection due to administrator command"))
    assert is_transient(PgError("53100", "could not extend file"))
    assert is_disk_full(PgError("53100", "could not extend file"))
    assert not is_disk_full(PgError("53300", "too many connections"))
    assert not is_transient(PgError("22P02", "invalid input syntax"))
    assert not is_transient(ValueError("bad value"))


async def test_migrates_once_when_several_nodes_start_at_once(pg_url: str) -> None:
    databases = await asyncio.gather(*(PgDatabase.open(pg_url) for _ in range(4)))
    try:
        rows = await databases[0].fetch("SELECT version FROM schema_version ORDER BY version")
        assert [row[0] for row in rows] == list(range(1, len(PG_MIGRATIONS) + 1))
        assert all([await db.schema_version() == len(PG_MIGRATIONS) for db in databases])
    finally:
        for db in databases:
            await db.close()


async def test_upgrades_from_the_previous_version_and_refuses_a_newer_one(pg_url: str) -> None:
    old = await PgDatabase.open(pg_url, migrations=PG_MIGRATIONS[:1])
    await pg_stores(old, "a").instances.upsert(make_instance("a"))
    await old.close()
    newer = await PgDatabase.open(pg_url, migrations=[*PG_MIGRATIONS, "CREATE TABLE later (x INTEGER)"])
    assert await pg_stores(newer, "a").instances.load_all() == [make_instance("a")]
    await newer.close()
    with pytest.raises(SchemaTooNewError, match="schema version"):
        await PgDatabase.open(pg_url)


async def test_errors_never_carry_the_offending_values(pg_url: str) -> None:
    db = await PgDatabase.open(pg_url)
    try:
        await pg_stores(db, "a").audit.append(make_audit(1))
        with pytest.raises(PgError) as caught:
            await db.execute("INSERT INTO audit (id, at, operator, role, action, target, detail, outcome) "
                             "SELECT id, at, operator, role, action, target, detail, outcome FROM audit")
        assert caught.value.sqlstate == "23505"
        assert "audit-1" not in str(caught.value)
    finally:
        await db.close()


async def test_every_node_numbers_its_own_events(pg_url: str) -> None:
    db = await PgDatabase.open(pg_url)
    try:
        a, b = PgEventLog(db, "a"), PgEventLog(db, "b")
        await a.append_many([make_event(1, selector="x"), make_event(2)])
        await b.append(make_event(1, selector="x", kind="other"))
        assert (await a.last_seq(), await b.last_seq()) == (2, 1)
        assert [e.kind for e in await b.recent(10)] == ["other"]
        assert await b.prune(keep=0) == 1 and await a.last_seq() == 2
        await b.append(make_event(1, selector="x", kind="other"))
        merged = await a.recent_all(10, selector="x")
        assert sorted(node for node, _ in merged) == ["a", "b"]
    finally:
        await db.close()


async def test_a_commit_is_visible_to_every_other_connection_when_it_returns(pg_url: str) -> None:
    db = await PgDatabase.open(pg_url)
    other = await asyncpg.connect(pg_url)
    try:
        stores = pg_stores(db, "a")
        async with BatchedWriter(db, stores, interval=3600) as writer:
            writer.upsert_instance(make_instance("a"))
            writer.append_event(make_event(1))
            await writer.commit(10)
            assert await other.fetchval("SELECT count(*) FROM instances") == 1
            assert await other.fetchval("SELECT count(*) FROM events") == 1
    finally:
        await other.close()
        await db.close()


async def test_the_writer_waits_out_a_server_outage(private_postgres: PostgresServer) -> None:
    db = await PgDatabase.open(private_postgres.create_database())
    stores = pg_stores(db, "a")
    failing: list[str | None] = []
    try:
        async with BatchedWriter(db, stores, interval=0, retry_initial=0.05, retry_max=0.2) as writer:
            writer.on_failing = failing.append
            writer.upsert_instance(make_instance("a"))
            await writer.commit(10)
            private_postgres.stop()
            writer.upsert_instance(make_instance("b"))
            with pytest.raises(StorageUnavailable):
                await writer.commit(1)
            assert writer.pending == 1
            private_postgres.start()
            await writer.commit(30)
            assert writer.health().dead_lettered == 0
        assert failing[0] is not None and failing[-1] is None
        assert [r.selector for r in await stores.instances.load_all()] == ["a", "b"]
    finally:
        await db.close()
