"""PostgreSQL fixtures (a pytest plugin, loaded by tests/conftest.py).

``postgres`` (session): one throwaway cluster for the whole run (lab/postgres.py: initdb + pg_ctl on
a free loopback port, as the ``postgres`` user when we are root), stopped at the end of the session
and at interpreter exit whatever happens. ``pg_url`` (per test): the URL of a fresh, empty database
on it. Tests that stop the server (``postgres.stop()``/``postgres.start()``/``postgres.restart()``)
get their own cluster from ``private_postgres`` so they cannot disturb the others.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.postgres import PostgresServer, postgres_bin


def _server() -> PostgresServer:
    if postgres_bin() is None:
        pytest.fail("PostgreSQL is not installed (scripts/test installs the Debian package 'postgresql')")
    server = PostgresServer()
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = _server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh database (``CREATE DATABASE t_<n>``) on the session's server."""
    if not postgres.running:  # a test that stopped it failed before starting it again
        postgres.start()
    return postgres.create_database()


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A cluster of this test's own, for tests that stop, restart or cut off the server."""
    server = _server()
    try:
        yield server
    finally:
        server.close()
