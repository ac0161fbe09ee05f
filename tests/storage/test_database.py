"""Opening, pragmas, migrations and transactions."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import stat
from pathlib import Path

import pytest

from storage.database import MIGRATIONS, Database, Migration, SchemaTooNewError, split_sql
from storage.repositories import SqliteInstanceStore

from .factories import make_instance

TABLES = {"schema_version", "instances", "events", "audit", "pushes"}


async def tables(db: Database) -> set[str]:
    rows = await db.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {row[0] for row in rows}


async def test_open_creates_state_dir_and_private_file(db_path: Path) -> None:
    db = await Database.open(db_path)
    try:
        assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
        assert (await db.fetchall("PRAGMA journal_mode"))[0][0] == "wal"
        assert (await db.fetchall("PRAGMA synchronous"))[0][0] == 1  # NORMAL
        assert (await db.fetchall("PRAGMA foreign_keys"))[0][0] == 1
        assert (await db.fetchall("PRAGMA busy_timeout"))[0][0] == 5000
    finally:
        await db.close()


async def test_migrates_from_empty(db: Database) -> None:
    assert await db.schema_version() == len(MIGRATIONS)
    assert await tables(db) >= TABLES


async def test_reopening_is_idempotent(db_path: Path) -> None:
    for _ in range(3):
        db = await Database.open(db_path)
        assert await db.schema_version() == len(MIGRATIONS)
        await db.close()
    db = await Database.open(db_path)
    rows = await db.fetchall("SELECT version FROM schema_version ORDER BY version")
    await db.close()
    assert [row[0] for row in rows] == list(range(1, len(MIGRATIONS) + 1))


async def test_upgrades_from_previous_version(db_path: Path) -> None:
    old = await Database.open(db_path, migrations=MIGRATIONS[:-1])
    assert await old.schema_version() == len(MIGRATIONS) - 1
    await old.close()

    db = await Database.open(db_path)
    try:
        assert await db.schema_version() == len(MIGRATIONS)
        store = SqliteInstanceStore(db)
        await store.upsert(make_instance())
        assert await store.get("sel-1") == make_instance()
    finally:
        await db.close()


async def test_upgrade_keeps_data_and_runs_callable_migrations(db_path: Path) -> None:
    db = await Database.open(db_path)
    await SqliteInstanceStore(db).upsert(make_instance("a", state="proxied"))
    await db.close()

    async def backfill(database: Database) -> None:
        rows = await database.fetchall("SELECT selector, state FROM instances")
        for selector, state in rows:
            await database.execute("INSERT INTO notes (selector, note) VALUES (?, ?)", (selector, state))

    newer: list[Migration] = [*MIGRATIONS, "CREATE TABLE notes (selector TEXT, note TEXT);", backfill]
    db = await Database.open(db_path, migrations=newer)
    try:
        assert await db.schema_version() == len(MIGRATIONS) + 2
        assert [tuple(r) for r in await db.fetchall("SELECT * FROM notes")] == [("a", "proxied")]
        assert await SqliteInstanceStore(db).get("a") == make_instance("a", state="proxied")
    finally:
        await db.close()


async def test_failing_migration_rolls_back_and_keeps_version(db_path: Path) -> None:
    broken: list[Migration] = [
        *MIGRATIONS,
        "CREATE TABLE half_done (x INTEGER); INSERT INTO no_such_table VALUES (1);",
    ]
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        await Database.open(db_path, migrations=broken)
    db = await Database.open(db_path)
    try:
        assert await db.schema_version() == len(MIGRATIONS)
        assert "half_done" not in await tables(db)
    finally:
        await db.close()


async def test_newer_schema_is_refused(db_path: Path) -> None:
    await (await Database.open(db_path, migrations=[*MIGRATIONS, "CREATE TABLE later (x);"])).close()
    with pytest.raises(SchemaTooNewError, match="schema version"):
        await Database.open(db_path)


async def test_transaction_rolls_back_on_error(db: Database) -> None:
    store = SqliteInstanceStore(db)
    with pytest.raises(RuntimeError):
        async with db.transaction():
            await store.upsert(make_instance("a"))  # joins the outer transaction
            raise RuntimeError("boom")
    assert await store.get("a") is None
    assert db.rollbacks == 1


async def test_transactions_of_different_tasks_are_serialised(db: Database) -> None:
    store = SqliteInstanceStore(db)
    order: list[str] = []

    async def writer(name: str) -> None:
        async with db.transaction():
            order.append(f"{name}-begin")
            await store.upsert(make_instance(name))
            await asyncio.sleep(0.01)
            order.append(f"{name}-end")

    await asyncio.gather(writer("a"), writer("b"))
    assert order in (["a-begin", "a-end", "b-begin", "b-end"], ["b-begin", "b-end", "a-begin", "a-end"])
    assert {r.selector for r in await store.load_all()} == {"a", "b"}


def test_split_sql_handles_comments_and_triggers() -> None:
    script = """
    -- a comment; with a semicolon
    CREATE TABLE t (x INTEGER); -- trailing
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN
        UPDATE t SET x = x + 1; DELETE FROM t WHERE x > 9;
    END;
    INSERT INTO t VALUES (1)
    """
    statements = split_sql(script)
    assert len(statements) == 3
    assert "CREATE TRIGGER" in statements[1] and statements[1].endswith("END;")
    assert statements[2] == "INSERT INTO t VALUES (1)"
    conn = sqlite3.connect(":memory:")
    for statement in statements:
        conn.execute(statement)
    assert conn.execute("SELECT x FROM t").fetchall() == [(2,)]  # the trigger body ran whole
    conn.close()


async def test_the_driver_debug_log_never_shows_sql_parameters(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await db.execute("CREATE TABLE secrets (value TEXT)")
    async with db.transaction():
        await db.execute("INSERT INTO secrets VALUES (?)", ("push-token-0123456789-very-secret",))
        await db.executemany("INSERT INTO secrets VALUES (?)", [("selector-ABCDEF0123456789:0011",)])
    assert any(r.name == "aiosqlite" for r in caplog.records)  # the driver did log each call
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "very-secret" not in logged and "ABCDEF0123456789" not in logged
