"""Write-behind for the hot path: queue now, commit in batches in the background.

The SIP and push code must never wait for the disk. They call the synchronous :meth:`submit` (or a
helper such as :meth:`BatchedWriter.upsert_instance`), which only appends to a queue. A background
task commits everything queued in ONE transaction, ``interval`` seconds after the first op arrived
or as soon as ``max_batch`` ops are waiting.

Failure policy: a failed transaction is rolled back, its ops go back to the head of the queue (in
order, ahead of anything submitted since) and are retried with exponential backoff, for as long as
it takes. Transient errors (the database is locked, the disk is full) just wait. A permanent error
means one op can never be written (a bug upstream: a value SQLite cannot bind, say); so that it
cannot block persistence for good, the next attempt writes the ops one by one and sets aside only
those that still fail while the database demonstrably works, with an ERROR log line each and a
count in :meth:`BatchedWriter.health`. Otherwise nothing is dropped unless :meth:`close` gives up on
a ``timeout``, and then loudly too. The operator summary reads :attr:`pending` and :attr:`last_error`
(:meth:`status`, the contract's ``WriterStatus``); :meth:`health` adds the writer's own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from contract.documents import AuditEntry, PushRecord, WriterStatus
from contract.events import Event
from contract.masking import mask
from storage.records import InstanceRecord
from storage.repositories import Stores

log = logging.getLogger(__name__)


class TransactionProvider(Protocol):
    """What the writer needs from a database backend."""

    def transaction(self) -> AbstractAsyncContextManager[None]: ...

    def is_transient(self, exc: BaseException) -> bool:
        """True if retrying later may succeed (locks, I/O); False if the same op will fail again."""
        ...

    def is_disk_full(self, exc: BaseException) -> bool:
        """True if ``exc`` means the disk under the database is full."""
        ...


class WriterError(RuntimeError):
    """Queued operations could not be persisted before the writer was closed."""


class StorageUnavailable(RuntimeError):
    """Storage did not commit within the bound asked for; ``reason`` says why (no values)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Told when the writer starts failing (with the error, in words) and when it recovers (None).
FailingListener = Callable[[str | None], None]


# -- operations ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpsertInstance:
    record: InstanceRecord


@dataclass(frozen=True, slots=True)
class SnapshotInstance:
    """Write the instance's row as it is when the batch is written (``snapshot(selector)``; None
    means the instance is gone and nothing is written).

    For callers that report every change of an instance: one row per instance and batch is
    built, not one per change, and the queue holds a reference instead of a full record. What
    is written is never older than the state at submit time, so :meth:`BatchedWriter.flush`
    still means "what was submitted before is on disk".
    """

    selector: str
    snapshot: Callable[[str], InstanceRecord | None]


@dataclass(frozen=True, slots=True)
class DeleteInstance:
    selector: str


@dataclass(frozen=True, slots=True)
class AppendEvent:
    event: Event


@dataclass(frozen=True, slots=True)
class AppendAudit:
    entry: AuditEntry


@dataclass(frozen=True, slots=True)
class UpsertPush:
    record: PushRecord


WriteOp = UpsertInstance | SnapshotInstance | DeleteInstance | AppendEvent | AppendAudit | UpsertPush


def describe_op(op: WriteOp) -> str:
    """Kind and key of an op, for logs: identifiers only (selectors masked), never record contents."""
    match op:
        case UpsertInstance(record=record):
            return f"instance upsert {mask(record.selector)}"
        case SnapshotInstance(selector=selector):
            return f"instance upsert {mask(selector)}"
        case DeleteInstance(selector=selector):
            return f"instance delete {mask(selector)}"
        case AppendEvent(event=event):
            return f"event {event.seq}"
        case AppendAudit(entry=entry):
            return f"audit entry {entry.id}"
        case UpsertPush(record=record):
            return f"push record {record.push_id}"
    raise TypeError(f"not a storage operation: {type(op).__name__}")


class _Batch:
    """Ops in submission order, with superseded full-row writes folded away.

    An instance upsert replaces the whole row and instance ops touch no other row (no foreign keys,
    no cascades), so only the last instance op per selector matters. Folding it into the slot of
    the pending upsert it supersedes is therefore exact. A delete followed by an upsert is kept as
    two ops so the delete still happens first. Push upserts are last-wins per push_id likewise.
    """

    __slots__ = ("_instance_at", "_push_at", "ops")

    def __init__(self) -> None:
        self.ops: list[WriteOp] = []
        self._instance_at: dict[str, int] = {}
        self._push_at: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ops)

    def add(self, op: WriteOp) -> bool:
        """Queue ``op``; True if it was folded into an op already queued."""
        match op:
            case UpsertInstance(record=record):
                return self._add_instance_op(record.selector, op)
            case SnapshotInstance(selector=selector) | DeleteInstance(selector=selector):
                return self._add_instance_op(selector, op)
            case UpsertPush(record=record):
                index = self._push_at.get(record.push_id)
                if index is not None:
                    self.ops[index] = op
                    return True
                self._push_at[record.push_id] = len(self.ops)
            case AppendEvent() | AppendAudit():
                pass
            case _:
                raise TypeError(f"not a storage operation: {type(op).__name__}")
        self.ops.append(op)
        return False

    def _add_instance_op(self, selector: str, op: UpsertInstance | SnapshotInstance | DeleteInstance) -> bool:
        index = self._instance_at.get(selector)
        if index is not None:
            previous = self.ops[index]
            if isinstance(previous, UpsertInstance | SnapshotInstance):
                self.ops[index] = op
                return True
            if isinstance(op, DeleteInstance):
                return True  # already being deleted
        self._instance_at[selector] = len(self.ops)
        self.ops.append(op)
        return False


#: Which table an op writes: ops of different tables are independent of each other.
_TABLE: dict[type, int] = {
    UpsertInstance: 0, SnapshotInstance: 0, DeleteInstance: 0, AppendEvent: 1, AppendAudit: 2, UpsertPush: 3,
}


async def apply_ops(stores: Stores, ops: Sequence[WriteOp], chunk: int = 500) -> None:
    """Apply ``ops`` within the caller's transaction: per table in submission order, as runs of
    the same kind.

    The tables share no keys, triggers or foreign keys, so only the order of ops on one table
    matters (an instance's delete before its re-enrolment's upsert). Taking each table's ops
    apart means the usual interleaved stream (event, upsert, event, event, upsert, ...) becomes
    one statement per table and chunk instead of one per op. Runs are cut into ``chunk``-sized
    calls so a long backlog gives the event loop room to breathe.
    """
    tables: tuple[list[WriteOp], ...] = ([], [], [], [])
    for op in ops:
        tables[_TABLE[type(op)]].append(op)
    for table_ops in tables:
        for kind, run in itertools.groupby(table_ops, key=_run_kind):
            group = list(run)
            if table_ops is tables[0]:
                # one batch is one transaction: its rows are locked in selector order across the
                # chunks too (storage.postgres.INSTANCE_LOCK_ORDER); a stable sort keeps one
                # instance's ops in the order they came
                group.sort(key=_selector)
            for start in range(0, len(group), chunk):
                await _apply_run(stores, kind, group[start : start + chunk])


def _selector(op: WriteOp) -> str:
    """The instance an op of the instances table writes."""
    if isinstance(op, UpsertInstance):
        return op.record.selector
    return op.selector if isinstance(op, (SnapshotInstance, DeleteInstance)) else ""


def _run_kind(op: WriteOp) -> type:
    return UpsertInstance if isinstance(op, SnapshotInstance) else type(op)


async def _apply_run(stores: Stores, kind: type, run: list[WriteOp]) -> None:
    if kind is UpsertInstance:
        records = [record for op in run if (record := _instance_record(op)) is not None]
        if records:
            await stores.instances.upsert_many(records)
    elif kind is DeleteInstance:
        await stores.instances.delete_many([op.selector for op in run if isinstance(op, DeleteInstance)])
    elif kind is AppendEvent:
        await stores.events.append_many([op.event for op in run if isinstance(op, AppendEvent)])
    elif kind is AppendAudit:
        await stores.audit.append_many([op.entry for op in run if isinstance(op, AppendAudit)])
    else:
        await stores.pushes.upsert_many([op.record for op in run if isinstance(op, UpsertPush)])


def _instance_record(op: WriteOp) -> InstanceRecord | None:
    if isinstance(op, SnapshotInstance):
        return op.snapshot(op.selector)
    return op.record if isinstance(op, UpsertInstance) else None


# -- the writer ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An op set aside because it fails on its own while the database works."""

    op: WriteOp
    error: str


@dataclass(frozen=True, slots=True)
class WriterHealth:
    """The writer's counters, for tests, benchmarks and logs (the operator API shows only
    ``pending`` and ``last_error``, as the contract's ``WriterStatus``)."""

    pending: int
    last_error: str | None
    consecutive_failures: int
    failed_flushes: int
    transactions: int
    ops_written: int
    coalesced: int
    dead_lettered: int


class BatchedWriter:
    def __init__(
        self,
        db: TransactionProvider,
        stores: Stores,
        *,
        interval: float = 0.05,
        max_batch: int = 500,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        keep_dead_letters: int = 1000,
    ) -> None:
        if interval < 0 or max_batch < 1 or retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("invalid BatchedWriter timing parameters")
        self._db = db
        self._stores = stores
        self._interval = interval
        self._max_batch = max_batch
        self._retry_initial = retry_initial
        self._retry_max = retry_max

        self._queue = _Batch()
        self._inflight = 0
        # Marks: every submit bumps _submitted; _durable is the highest mark known committed.
        self._submitted = 0
        self._durable = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()  # the queue is no longer empty, or we are closing
        self._urgent = asyncio.Event()  # stop lingering: batch full, flush() or close()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False

        self._isolate_next = False  # the last failure was permanent: go op by op
        self._dead_letters: deque[DeadLetter] = deque(maxlen=keep_dead_letters)
        self._dead_lettered = 0

        self._last_error: str | None = None
        #: called once when an episode of failed flushes starts and once when it ends
        self.on_failing: FailingListener | None = None
        self._consecutive_failures = 0
        self._failed_flushes = 0
        self._transactions = 0
        self._ops_written = 0
        self._coalesced = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background task (needs a running event loop)."""
        if self._task is not None:
            return
        if self._closed:
            raise RuntimeError("storage writer is closed")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="storage-writer")
        self._task.add_done_callback(self._on_task_done)

    async def __aenter__(self) -> BatchedWriter:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self, timeout: float | None = None) -> None:
        """Commit everything queued, then stop. Idempotent.

        With a ``timeout`` (seconds) the writer stops trying after that long, logs how many ops it
        gives up and raises :class:`WriterError`; without one it keeps retrying.
        """
        if self._task is None:
            if self._closed:
                return
            self.start()
        assert self._task is not None
        if self._task.done():
            if self.pending:
                raise WriterError(f"{self.pending} storage operations were not persisted: {self._last_error}")
            return
        self._closing = True
        self._urgent.set()
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            lost = self.pending
            log.error("storage writer closed with %d operations not persisted (%s)", lost, self._last_error)
            raise WriterError(f"{lost} storage operations were not persisted: {self._last_error}") from None

    # -- hot path -------------------------------------------------------------------------------

    def submit(self, op: WriteOp) -> None:
        """Queue ``op``. Never blocks, never touches the database."""
        if self._closed:
            raise RuntimeError("storage writer is closed")
        if self._queue.add(op):
            self._coalesced += 1
        self._submitted += 1
        self._wakeup.set()
        if len(self._queue) >= self._max_batch:
            self._urgent.set()

    def upsert_instance(self, record: InstanceRecord) -> None:
        self.submit(UpsertInstance(record))

    def snapshot_instance(self, selector: str, snapshot: Callable[[str], InstanceRecord | None]) -> None:
        """Upsert the row ``snapshot(selector)`` returns when the batch is written (see
        :class:`SnapshotInstance`)."""
        self.submit(SnapshotInstance(selector, snapshot))

    def delete_instance(self, selector: str) -> None:
        self.submit(DeleteInstance(selector))

    def append_event(self, event: Event) -> None:
        self.submit(AppendEvent(event))

    def append_audit(self, entry: AuditEntry) -> None:
        self.submit(AppendAudit(entry))

    def upsert_push(self, record: PushRecord) -> None:
        self.submit(UpsertPush(record))

    async def flush(self) -> None:
        """Return once everything submitted before this call is committed (or set aside as dead).

        While the database keeps failing this keeps waiting; bound it with ``asyncio.wait_for``.
        """
        target = self._submitted
        if self._durable >= target:
            return
        if self._task is None or self._task.done():
            raise RuntimeError("storage writer is not running")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        self._urgent.set()
        self._wakeup.set()
        await waiter

    async def commit(self, timeout: float) -> None:
        """:meth:`flush` within ``timeout`` seconds, else :class:`StorageUnavailable` (what was
        submitted stays queued: the caller decides what to do about it)."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            raise StorageUnavailable(self._last_error or f"no commit within {timeout:g} s") from None
        except (WriterError, RuntimeError) as exc:
            raise StorageUnavailable(str(exc)) from None

    # -- console --------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Ops not yet committed: queued plus in the transaction under way."""
        return len(self._queue) + self._inflight

    @property
    def last_error(self) -> str | None:
        """The error of the latest failed flush; None once a flush succeeds again."""
        return self._last_error

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """The most recent ops set aside as unwritable (bounded)."""
        return list(self._dead_letters)

    def status(self) -> WriterStatus:
        """What the operator summary shows."""
        return WriterStatus(pending=self.pending, last_error=self._last_error)

    def health(self) -> WriterHealth:
        return WriterHealth(
            pending=self.pending,
            last_error=self._last_error,
            consecutive_failures=self._consecutive_failures,
            failed_flushes=self._failed_flushes,
            transactions=self._transactions,
            ops_written=self._ops_written,
            coalesced=self._coalesced,
            dead_lettered=self._dead_lettered,
        )

    # -- background task ------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._retry_initial
        while True:
            if not self._queue:
                if self._closing:
                    self._closed = True  # set before yielding control: later submits must fail
                    return
                self._urgent.clear()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._urgent.is_set() and self._interval > 0:
                # Linger so the ops of one burst share a transaction.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self._interval)
            self._urgent.clear()
            write = self._write_one_by_one if self._isolate_next else self._write_queued
            if await write():
                backoff = self._retry_initial
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._retry_max)

    async def _write_queued(self) -> bool:
        batch, self._queue = self._queue, _Batch()
        mark = self._submitted
        self._inflight = len(batch)
        try:
            async with self._db.transaction():
                await apply_ops(self._stores, batch.ops, self._max_batch)
        except asyncio.CancelledError:
            self._requeue(batch.ops)
            raise
        except Exception as exc:
            self._requeue(batch.ops)
            self._note_failure(exc, permanent=not self._db.is_transient(exc))
            return False
        self._transactions += 1
        self._ops_written += len(batch)
        self._succeeded(mark)
        return True

    async def _write_one_by_one(self) -> bool:
        """Write each op in its own transaction to find the ones that can never be written."""
        batch, self._queue = self._queue, _Batch()
        mark = self._submitted
        ops = batch.ops
        self._inflight = len(ops)
        index = 0
        try:
            while index < len(ops):
                op = ops[index]
                try:
                    async with self._db.transaction():
                        await apply_ops(self._stores, [op])
                except Exception as exc:
                    if self._db.is_transient(exc) or not await self._database_works():
                        self._requeue(ops[index:])
                        self._note_failure(exc, permanent=False)
                        return False
                    self._set_aside(op, exc)
                else:
                    self._transactions += 1
                    self._ops_written += 1
                index += 1
                self._inflight -= 1
        except asyncio.CancelledError:
            self._requeue(ops[index:])
            raise
        self._succeeded(mark)
        return True

    async def _database_works(self) -> bool:
        try:
            async with self._db.transaction():
                pass
        except Exception:
            return False
        return True

    def _succeeded(self, mark: int) -> None:
        self._inflight = 0
        if self._consecutive_failures:
            log.info("storage recovered: flush committed after %d failed attempts", self._consecutive_failures)
            if self.on_failing is not None:
                self.on_failing(None)
        self._consecutive_failures = 0
        self._isolate_next = False
        self._last_error = None
        self._durable = mark
        self._release_waiters()

    def _requeue(self, ops: Sequence[WriteOp]) -> None:
        # Failed ops go back in front of what arrived meanwhile; re-adding re-folds both.
        merged = _Batch()
        for op in itertools.chain(ops, self._queue.ops):
            merged.add(op)
        self._queue = merged
        self._inflight = 0

    def _note_failure(self, exc: Exception, *, permanent: bool) -> None:
        self._consecutive_failures += 1
        self._failed_flushes += 1
        self._isolate_next = permanent
        self._last_error = _describe(exc)
        if self._db.is_disk_full(exc):
            self._last_error = f"disk full ({self._last_error})"
        if self._consecutive_failures > 1:  # one WARNING per episode; the retries only at DEBUG
            log.debug("storage flush failed (attempt %d): %s", self._consecutive_failures, self._last_error)
            return
        log.warning("storage failing: %s; %d ops kept for retry until it recovers", self._last_error,
                    self.pending)
        if self.on_failing is not None:
            self.on_failing(self._last_error)

    def _set_aside(self, op: WriteOp, exc: Exception) -> None:
        self._dead_letters.append(DeadLetter(op, _describe(exc)))
        self._dead_lettered += 1
        log.error("storage set aside an unwritable %s: %s", describe_op(op), _describe(exc))

    def _release_waiters(self) -> None:
        still_waiting: list[tuple[int, asyncio.Future[None]]] = []
        for target, waiter in self._waiters:
            if waiter.done():
                continue
            if target <= self._durable:
                waiter.set_result(None)
            else:
                still_waiting.append((target, waiter))
        self._waiters = still_waiting

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._closed = True
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("storage writer stopped unexpectedly: %s", type(exc).__name__)
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(WriterError(f"{self.pending} storage operations were not persisted"))
        self._waiters = []


def _describe(exc: BaseException) -> str:
    # sqlite3/json messages name tables, constraints and parameter positions, never bound values.
    # A backend whose errors echo values (PostgreSQL's DETAIL lines) must strip them first.
    return f"{type(exc).__name__}: {exc}"[:300]
