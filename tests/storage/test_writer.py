"""BatchedWriter: batching, folding, ordering, persistence and failure handling."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from contract.events import Event, UnknownPayload
from storage.database import Database
from storage.records import InstanceRecord
from storage.repositories import SqliteEventLog, SqliteInstanceStore, sqlite_stores
from storage.writer import BatchedWriter, SnapshotInstance, UpsertInstance, WriterError

from .conftest import Backend
from .factories import make_audit, make_event, make_instance, make_push


class FlakyEventLog(SqliteEventLog):
    """Fails the first ``failures`` appends, i.e. in the middle of a batch's transaction."""

    def __init__(self, db: Database, failures: int) -> None:
        super().__init__(db)
        self.failures = failures
        self.calls = 0

    async def append_many(self, events: Sequence[Event]) -> None:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        await super().append_many(events)


class CountingEventLog(SqliteEventLog):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.calls = 0

    async def append_many(self, events: Sequence[Event]) -> None:
        self.calls += 1
        await super().append_many(events)


class CountingInstanceStore(SqliteInstanceStore):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.upserts = 0
        self.deletes = 0

    async def upsert_many(self, records: Sequence[InstanceRecord]) -> None:
        self.upserts += 1
        await super().upsert_many(records)

    async def delete_many(self, selectors: Sequence[str]) -> None:
        self.deletes += 1
        await super().delete_many(selectors)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def test_many_submits_share_few_transactions(backend: Backend) -> None:
    stores = await backend.open()
    db = backend.database
    async with BatchedWriter(db, stores) as writer:
        before = db.commits
        for i in range(1, 1201):
            writer.append_event(make_event(i, selector=f"sel-{i % 40}"))
            writer.upsert_instance(make_instance(f"sel-{i % 40}", failure_count=i))
        for i in range(10):
            writer.append_audit(make_audit(i))
            writer.upsert_push(make_push(f"p{i}"))
        await writer.flush()
        transactions = db.commits - before
        assert writer.pending == 0
    assert 1 <= transactions <= 3  # 2440 ops, one burst
    assert writer.health().transactions == transactions
    assert await stores.events.last_seq() == 1200
    assert len(await stores.instances.load_all()) == 40
    assert len(await stores.audit.recent(100)) == 10
    assert len(await stores.pushes.recent(100)) == 10


async def test_interval_flushes_without_being_asked(db: Database) -> None:
    async with BatchedWriter(db, sqlite_stores(db), interval=0.01) as writer:
        writer.append_event(make_event(1))
        await eventually(lambda: writer.pending == 0)
        assert writer.health().transactions == 1


async def test_full_batch_does_not_wait_for_the_interval(db: Database) -> None:
    async with BatchedWriter(db, sqlite_stores(db), interval=3600, max_batch=50) as writer:
        for i in range(1, 51):
            writer.append_event(make_event(i))
        await eventually(lambda: writer.pending == 0)


async def test_upserts_of_one_instance_are_folded(backend: Backend) -> None:
    stores = await backend.open()
    async with BatchedWriter(backend.database, stores) as writer:
        for i in range(100):
            writer.upsert_instance(make_instance("a", failure_count=i))
            writer.upsert_push(make_push("p1", attempt=i + 1))
        assert writer.pending == 2
        await writer.flush()
        assert writer.health().coalesced == 198
    assert await stores.instances.get("a") == make_instance("a", failure_count=99)
    assert await stores.pushes.get("p1") == make_push("p1", attempt=100)


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        (["upsert:1", "delete"], None),
        (["delete", "upsert:1"], 1),
        (["upsert:1", "delete", "upsert:2"], 2),
        (["upsert:1", "delete", "upsert:2", "upsert:3", "delete", "delete"], None),
        (["delete", "delete", "upsert:4"], 4),
    ],
)
async def test_upsert_and_delete_keep_their_order(backend: Backend, ops: list[str], expected: int | None) -> None:
    stores = await backend.open()
    await stores.instances.upsert(make_instance("a", failure_count=0))  # exists before the batch
    async with BatchedWriter(backend.database, stores) as writer:
        for op in ops:
            if op == "delete":
                writer.delete_instance("a")
            else:
                writer.upsert_instance(make_instance("a", failure_count=int(op.split(":")[1])))
        writer.upsert_instance(make_instance("b"))  # other rows are untouched by the folding
    record = await stores.instances.get("a")
    assert (record.failure_count if record else None) == expected
    assert await stores.instances.get("b") == make_instance("b")


async def test_close_flushes_and_data_survives_reopening(backend: Backend) -> None:
    stores = await backend.open()
    writer = BatchedWriter(backend.database, stores, interval=3600)
    writer.start()
    writer.upsert_instance(make_instance("a"))
    writer.append_event(make_event(1))
    writer.append_audit(make_audit(1))
    writer.upsert_push(make_push("p1"))
    await writer.close()
    assert writer.pending == 0
    with pytest.raises(RuntimeError, match="closed"):
        writer.append_event(make_event(2))
    await writer.close()  # idempotent
    await backend.close()

    stores = await backend.open()
    assert await stores.instances.load_all() == [make_instance("a")]
    assert await stores.events.recent(10) == [make_event(1)]
    assert await stores.audit.recent(10) == [make_audit(1)]
    assert await stores.pushes.recent(10) == [make_push("p1")]


async def test_ops_submitted_before_start_are_written_by_close(db: Database) -> None:
    stores = sqlite_stores(db)
    writer = BatchedWriter(db, stores)
    writer.upsert_instance(make_instance("a"))
    await writer.close()
    assert await stores.instances.get("a") == make_instance("a")


async def test_failed_flush_is_retried_until_everything_is_written(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyEventLog(db, failures=3)
    stores = replace(sqlite_stores(db), events=flaky)
    writer = BatchedWriter(db, stores, retry_initial=0.01, retry_max=0.02)
    writer.start()
    caplog.set_level(logging.INFO, logger="storage.writer")

    writer.upsert_instance(make_instance("a", push_token="very-secret-push-token"))
    writer.append_event(make_event(1))
    await eventually(lambda: writer.last_error is not None)
    assert "disk I/O error" in (writer.last_error or "")
    assert writer.pending == 2  # kept, not dropped
    assert await stores.instances.get("a") is None  # the half-written batch was rolled back

    # Ops arriving while the database is failing queue up behind the failed batch, in order.
    writer.delete_instance("a")
    writer.upsert_instance(make_instance("b"))
    writer.append_event(make_event(2))
    await asyncio.wait_for(writer.flush(), 5)

    assert flaky.failures == 0
    assert writer.pending == 0 and writer.last_error is None
    status = writer.health()
    assert status.failed_flushes == 3 and status.consecutive_failures == 0
    assert db.rollbacks == 3
    assert await stores.instances.get("a") is None
    assert await stores.instances.get("b") == make_instance("b")
    assert [e.seq for e in await stores.events.recent(10)] == [1, 2]
    await writer.close()

    assert "storage failing" in caplog.text and "recovered" in caplog.text
    assert "very-secret-push-token" not in caplog.text


async def test_close_gives_up_loudly_after_timeout(db: Database) -> None:
    stores = replace(sqlite_stores(db), events=FlakyEventLog(db, failures=10**9))
    writer = BatchedWriter(db, stores, retry_initial=0.01, retry_max=0.01)
    writer.start()
    writer.append_event(make_event(1))
    writer.append_event(make_event(2))
    flush = asyncio.ensure_future(writer.flush())
    with pytest.raises(WriterError, match="2 storage operations were not persisted"):
        await writer.close(timeout=0.1)
    with pytest.raises(WriterError):
        await flush
    with pytest.raises(RuntimeError, match="closed"):
        writer.append_event(make_event(3))


async def test_flush_needs_a_running_writer(db: Database) -> None:
    writer = BatchedWriter(db, sqlite_stores(db))
    await writer.flush()  # nothing submitted: nothing to wait for
    writer.append_event(make_event(1))
    with pytest.raises(RuntimeError, match="not running"):
        await writer.flush()
    await writer.close()


async def test_bad_ops_are_refused_at_submit_time(db: Database) -> None:
    writer = BatchedWriter(db, sqlite_stores(db))
    with pytest.raises(TypeError):
        writer.submit(make_event(1))  # type: ignore[arg-type]
    writer.submit(UpsertInstance(make_instance("a")))
    assert writer.pending == 1
    await writer.close()


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        BatchedWriter(None, None, max_batch=0)  # type: ignore[arg-type]


async def test_unwritable_op_is_set_aside_and_does_not_block_the_rest(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    stores = sqlite_stores(db)
    poison = make_instance("bad", display_name=object(), push_token="very-secret-push-token")
    async with BatchedWriter(db, stores, retry_initial=0.01, retry_max=0.01) as writer:
        writer.upsert_instance(make_instance("a"))
        writer.upsert_instance(poison)
        writer.append_event(make_event(1))
        writer.upsert_instance(make_instance("c"))
        await asyncio.wait_for(writer.flush(), 5)
        status = writer.health()
        assert status.pending == 0 and status.dead_lettered == 1 and status.failed_flushes == 1
        assert [d.op for d in writer.dead_letters] == [UpsertInstance(poison)]
        # Back to batching afterwards.
        writer.upsert_instance(make_instance("d"))
        await writer.flush()
    assert [r.selector for r in await stores.instances.load_all()] == ["a", "c", "d"]
    assert [e.seq for e in await stores.events.recent(10)] == [1]
    assert "set aside an unwritable instance upsert …" in caplog.text  # the selector masked
    assert "very-secret-push-token" not in caplog.text


async def test_nothing_is_set_aside_while_the_database_is_down(db: Database) -> None:
    stores = replace(sqlite_stores(db), events=FlakyEventLog(db, failures=10**9))
    writer = BatchedWriter(db, stores, retry_initial=0.01, retry_max=0.01)
    writer.start()
    writer.upsert_instance(make_instance("bad", display_name=object()))  # permanent error first
    writer.append_event(make_event(1))
    await eventually(lambda: writer.health().failed_flushes >= 5)
    assert writer.health().dead_lettered == 1  # only the op that fails on its own
    assert writer.pending == 1  # the event waits for the database instead of being dropped
    with pytest.raises(WriterError):
        await writer.close(timeout=0.05)


async def test_odd_values_in_event_data_are_stored_as_text(db: Database) -> None:
    stores = sqlite_stores(db)
    async with BatchedWriter(db, stores) as writer:
        odd = UnknownPayload("reg.refreshed", {"path": Path("/x"), "n": 1})
        writer.append_event(replace(make_event(1), payload=odd))
    assert (await stores.events.recent(1))[0].payload == UnknownPayload("reg.refreshed", {"path": "/x", "n": 1})


async def test_an_interleaved_stream_costs_one_statement_per_table(db: Database) -> None:
    """Mass registration publishes event, upsert, event, event, upsert, ...: written table by table,
    that is one executemany each instead of one per op (the writer fell behind at ~15k ops/s)."""
    events, instances = CountingEventLog(db), CountingInstanceStore(db)
    stores = replace(sqlite_stores(db), events=events, instances=instances)
    async with BatchedWriter(db, stores, interval=3600, max_batch=1000) as writer:
        for i in range(1, 301):
            writer.append_event(make_event(i, selector=f"sel-{i}"))
            writer.upsert_instance(make_instance(f"sel-{i}", failure_count=i))
        await writer.flush()
    assert (events.calls, instances.upserts) == (1, 1)
    assert await stores.events.last_seq() == 300
    assert len(await stores.instances.load_all()) == 300


async def test_deletes_and_upserts_of_instances_keep_their_order_among_other_tables(db: Database) -> None:
    instances = CountingInstanceStore(db)
    stores = replace(sqlite_stores(db), instances=instances)
    await stores.instances.upsert(make_instance("a", failure_count=0))
    async with BatchedWriter(db, stores, interval=3600) as writer:
        writer.upsert_instance(make_instance("b"))
        writer.append_event(make_event(1))
        writer.delete_instance("a")
        writer.append_event(make_event(2))
        writer.upsert_instance(make_instance("a", failure_count=7))  # re-enrolled after the delete
        await writer.flush()
    record = await stores.instances.get("a")
    assert record is not None and record.failure_count == 7
    assert await stores.instances.get("b") == make_instance("b")
    # the upsert before the writer, then the batch in its order: upsert b, delete a, upsert a
    assert (instances.upserts, instances.deletes) == (3, 1)


async def test_a_snapshot_is_taken_when_the_batch_is_written(db: Database) -> None:
    """Snapshot ops carry a lookup, not a record: a burst of changes to one instance builds one
    row, the latest, and an instance gone by then writes nothing."""
    stores = sqlite_stores(db)
    state: dict[str, InstanceRecord] = {}
    built: list[str] = []

    def snapshot(selector: str) -> InstanceRecord | None:
        built.append(selector)
        return state.get(selector)

    async with BatchedWriter(db, stores, interval=3600) as writer:
        for i in range(50):
            state["a"] = make_instance("a", failure_count=i)
            writer.snapshot_instance("a", snapshot)
        writer.snapshot_instance("gone", snapshot)
        assert writer.pending == 2 and writer.health().coalesced == 49
        state["a"] = make_instance("a", failure_count=99)  # changed after the last submit
        await writer.flush()
        assert built == ["a", "gone"]
        assert await stores.instances.get("a") == make_instance("a", failure_count=99)
        assert await stores.instances.get("gone") is None

        writer.delete_instance("a")  # a snapshot queued before a delete is folded into it
        writer.snapshot_instance("a", snapshot)  # ... one after it is written after it
        writer.upsert_instance(make_instance("b"))
        writer.snapshot_instance("b", snapshot)  # replaces the queued upsert: nothing known for b now
        await writer.flush()
    assert await stores.instances.get("a") == make_instance("a", failure_count=99)
    assert await stores.instances.get("b") is None


async def test_a_failed_batch_takes_its_snapshots_again(db: Database) -> None:
    flaky = FlakyEventLog(db, failures=2)
    stores = replace(sqlite_stores(db), events=flaky)
    state = {"a": make_instance("a", failure_count=1)}
    async with BatchedWriter(db, stores, retry_initial=0.01, retry_max=0.02) as writer:
        writer.snapshot_instance("a", state.get)
        writer.append_event(make_event(1))
        await eventually(lambda: writer.health().failed_flushes >= 1)
        state["a"] = make_instance("a", failure_count=2)
        await asyncio.wait_for(writer.flush(), 5)
    assert await stores.instances.get("a") == make_instance("a", failure_count=2)
    assert writer.health().dead_lettered == 0


def test_snapshot_ops_name_only_the_masked_selector() -> None:
    from storage.writer import describe_op

    assert describe_op(SnapshotInstance("sel-9", lambda _selector: None)) == "instance upsert …"
    assert describe_op(SnapshotInstance("0123456789ABCDEF:01", lambda _selector: None)) == "instance upsert 0123…F:01"
