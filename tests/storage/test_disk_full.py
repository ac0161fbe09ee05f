"""A full disk at the storage driver boundary: named in words, one WARNING and one listener call per
episode, automatic recovery, and a bounded commit that says storage is unavailable."""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import replace

import pytest

from contract.events import Event
from storage.database import Database, is_disk_full
from storage.repositories import SqliteEventLog, sqlite_stores
from storage.writer import BatchedWriter, StorageUnavailable

from .factories import make_event

DISK_FULL = "database or disk is full"


class FullDiskEventLog(SqliteEventLog):
    """The driver says the disk is full for the first ``failures`` appends."""

    def __init__(self, db: Database, failures: int) -> None:
        super().__init__(db)
        self.failures = failures

    async def append_many(self, events: Sequence[Event]) -> None:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError(DISK_FULL)
        await super().append_many(events)


async def test_an_episode_is_one_warning_saying_disk_full_and_one_recovery(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    stores = replace(sqlite_stores(db), events=FullDiskEventLog(db, failures=45))  # > the old 20-line repeat
    writer = BatchedWriter(db, stores, retry_initial=0.001, retry_max=0.001)
    told: list[str | None] = []
    writer.on_failing = told.append
    caplog.set_level(logging.DEBUG, logger="storage.writer")
    async with writer:
        writer.append_event(make_event(1))
        await writer.commit(30)
    assert writer.health().failed_flushes == 45
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "disk full" in warnings[0]
    assert len([r for r in caplog.records if r.levelno == logging.INFO and "recovered" in r.getMessage()]) == 1
    assert len(told) == 2 and told[0] is not None and "disk full" in told[0] and told[1] is None
    assert [e.seq for e in await stores.events.recent(5)] == [1]


async def test_commit_gives_up_within_its_bound_and_keeps_the_ops(db: Database) -> None:
    stores = replace(sqlite_stores(db), events=FullDiskEventLog(db, failures=10**9))
    writer = BatchedWriter(db, stores, retry_initial=0.001, retry_max=0.001)
    writer.start()
    writer.append_event(make_event(1))
    with pytest.raises(StorageUnavailable, match="disk full"):
        await writer.commit(0.2)
    assert writer.pending == 1  # kept for the retry, not dropped
    stores.events.failures = 0  # type: ignore[attr-defined]
    await writer.commit(30)
    assert writer.pending == 0
    await writer.close()


def test_a_full_disk_is_recognised(tmp_path: object) -> None:
    assert is_disk_full(sqlite3.OperationalError(DISK_FULL))
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(sqlite3.OperationalError("disk I/O error"))  # without a path to look at
    assert not is_disk_full(ValueError("disk is full"))
