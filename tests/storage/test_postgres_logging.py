"""asyncpg's pool retries while PostgreSQL is down: no traceback at WARNING (the core's own
storage-failing alarm says it once), one DEBUG line each when debugging."""

from __future__ import annotations

import logging

import pytest

import storage.postgres  # noqa: F401  (installs the filter on asyncpg's pool logger)

POOL = logging.getLogger("asyncpg.pool")


def _retry() -> None:
    try:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
    except ConnectionRefusedError:
        POOL.warning("Failed to restore the pool connection floor; retrying", exc_info=True)


def test_pool_retries_are_not_warnings_with_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        _retry()
    assert not caplog.records


def test_pool_retries_are_one_debug_line_when_debugging(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        _retry()
    [record] = caplog.records
    assert record.levelno == logging.DEBUG and record.exc_info is None
    assert record.getMessage().startswith("Failed to restore the pool connection floor; retrying: "
                                          "ConnectionRefusedError")
