"""Shared fixtures: a fresh database per test in its own temp dir.

``backend`` runs a test once on SQLite and once on PostgreSQL (a fresh database on the session's
throwaway server, tests/pg.py); ``stores`` is that backend's set of stores. Tests of one backend's
own machinery (pragmas, files, a disk filling up) use ``db`` (SQLite) or ``pg_url``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.database import Database
from storage.pg_repositories import pg_stores
from storage.postgres import PgDatabase
from storage.repositories import Stores, sqlite_stores


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "sipis.db"


@pytest.fixture
async def db(db_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(db_path)
    try:
        yield database
    finally:
        await database.close()


class Backend:
    """Opens the stores of one database, as often as a test likes (to see what persisted)."""

    def __init__(self, name: str, location: str, node: str = "node-a") -> None:
        self.name = name
        self.location = location
        self.node = node
        self._open: list[Database | PgDatabase] = []

    async def open(self, node: str | None = None) -> Stores:
        if self.name == "sqlite":
            database = await Database.open(self.location)
            self._open.append(database)
            return sqlite_stores(database)
        pg = await PgDatabase.open(self.location)
        self._open.append(pg)
        return pg_stores(pg, node or self.node)

    @property
    def database(self) -> Database | PgDatabase:
        """The database :meth:`open` opened last."""
        return self._open[-1]

    async def close(self) -> None:
        while self._open:
            await self._open.pop().close()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        chosen = Backend("sqlite", str(db_path))
    else:
        chosen = Backend("postgres", request.getfixturevalue("pg_url"))
    try:
        yield chosen
    finally:
        await chosen.close()


@pytest.fixture
async def stores(backend: Backend) -> Stores:
    return await backend.open()
