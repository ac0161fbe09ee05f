"""What one console shows, kept in the contract's types (``contract/``), and how events change it.

* :class:`InstanceStore` keeps **all** instance rows locally, updated from events, so filtering and
  sorting are local: the filter is the instance query language (:mod:`contract.query`) over kept
  lower-case search keys, sort keys are cached, and re-sorting starts from the previous order
  (nearly sorted, so Python's timsort runs in about linear time).
* :func:`row_patch` says which row fields a typed event payload changes.
* :class:`ConsoleModel` is everything one console shows: the store, the latest summary, sparkline
  series, held calls, the push, event and audit logs. Events are applied to it in batches. What the
  console derives from what it received (a held call's T1/T2 deadlines on the wall clock, when it
  first saw a push) is kept here, beside the contract's objects, never copied into a type of its own.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast, overload

from contract.documents import AuditEntry, CallsSnapshot, HeldCall, InstanceRow, NodeRow, PushRecord, Summary
from contract.events import (
    Event,
    InstanceAppReport,
    InstanceDeleted,
    InstanceEnrolled,
    InstancePushChanged,
    InstanceStateChanged,
    InstanceUpdated,
    RegistrationResult,
    RegistrationStatusChanged,
    StreamNotice,
)
from contract.kinds import AlarmKind, PushOutcome, RegStatus
from contract.query import FIELD_SOURCES, HAYSTACK_FIELDS, Term, haystack, parse_query, refines, select

# ---------------------------------------------------------------------------------------------- sorting

_STATE_RANK = {"active": 0, "proxied": 1, "inactive": 2, "off": 3}
_REG_RANK = {"unauthorized": 0, "error": 1, "registering": 2, "unregistering": 3, "registered": 4, "idle": 5}
_PUSH_RANK = {"rejected-permanent": 1, "rejected-transient": 2, "pending": 3, "accepted": 4}
_INF = math.inf

#: instance-table column key → (row fields the key depends on, key function); every key function
#: returns one type. The table's own order for operators: states and statuses by severity, empty
#: values last when ascending; descending is the exact reverse.
SORT_KEYS: dict[str, tuple[frozenset[str], Callable[[InstanceRow], Any]]] = {
    "state": (frozenset({"state"}), lambda r: _STATE_RANK.get(r.state, 9)),
    "aor": (frozenset({"aor"}), lambda r: r.aor.lower()),
    "reg": (frozenset({"reg_status"}), lambda r: _REG_RANK.get(r.reg_status, 9)),
    "code": (frozenset({"last_code"}), lambda r: _INF if r.last_code is None else float(r.last_code)),
    "refresh": (frozenset({"next_refresh_at"}), lambda r: _INF if r.next_refresh_at is None else r.next_refresh_at),
    "expires": (frozenset({"expires_at"}), lambda r: _INF if r.expires_at is None else r.expires_at),
    "push": (frozenset({"push_unreachable", "last_push_outcome"}),
             lambda r: 0 if r.push_unreachable else _PUSH_RANK.get(r.last_push_outcome or "", 9)),
    "fail": (frozenset({"failure_count"}), lambda r: r.failure_count),
    "provider": (frozenset({"push_provider"}), lambda r: r.push_provider or "~"),
    "pushed": (frozenset({"last_push_at"}), lambda r: _INF if r.last_push_at is None else -r.last_push_at),
    "registrar": (frozenset({"registrar"}), lambda r: (r.registrar or "").lower()),
    "selector": (frozenset({"selector"}), lambda r: r.selector),
}

_ROW_FIELDS = frozenset(f.name for f in fields(InstanceRow))


# ---------------------------------------------------------------------------------------------- instance store


class IndexedRows(Sequence[InstanceRow]):
    """A read-only view of some store slots, in order; rows are read at access time (always fresh)."""

    __slots__ = ("_index", "_indices", "_rows")

    def __init__(self, rows: list[InstanceRow | None], indices: list[int], index: dict[str, int] | None = None) -> None:
        self._rows = rows
        self._indices = indices
        self._index = index

    def locate(self, selector: str) -> int | None:
        """Position of ``selector`` in this view, or None (a C-speed search: fine at 100k rows)."""
        if self._index is None:
            return None
        slot = self._index.get(selector)
        if slot is None:
            return None
        try:
            return self._indices.index(slot)
        except ValueError:
            return None

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, index: int) -> InstanceRow: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[InstanceRow]: ...

    def __getitem__(self, index: int | slice) -> InstanceRow | Sequence[InstanceRow]:
        if isinstance(index, slice):
            return IndexedRows(self._rows, self._indices[index], self._index)
        row = self._rows[self._indices[index]]
        assert row is not None
        return row

    def __iter__(self) -> Iterator[InstanceRow]:
        rows = self._rows
        for i in self._indices:
            row = rows[i]
            assert row is not None
            yield row


class InstanceStore:
    """All instance rows, kept current by :meth:`patch`/:meth:`upsert`/:meth:`remove`.

    :meth:`view` returns the rows matching :attr:`query` in :attr:`sort_key` order; the work is
    done lazily and only what changed is redone.
    """

    def __init__(self) -> None:
        self._rows: list[InstanceRow | None] = []
        self._index: dict[str, int] = {}
        self._hay: list[str] = []
        self.query = ""
        self._terms: list[Term] = []
        self.sort_key = "aor"
        self.sort_desc = False
        self._keys: list[Any] | None = None
        self._order: list[int] = []
        self._order_stale = True  # the order must be rebuilt (rows added/removed)
        self._resort = False  # the order is complete but some sort keys changed
        self._filtered: list[int] | None = None
        self._filter_stale = True
        self._view: IndexedRows | None = None
        self.version = 0  # bumped whenever the visible rows (or their order) may have changed
        self.partial_total: int | None = None  # see load()

    # -------------------------------------------------------------- contents

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, selector: object) -> bool:
        return selector in self._index

    def get(self, selector: str) -> InstanceRow | None:
        slot = self._index.get(selector)
        return None if slot is None else self._rows[slot]

    def all_rows(self) -> Iterator[InstanceRow]:
        return (row for row in self._rows if row is not None)

    def load(self, rows: Iterable[InstanceRow], *, partial_total: int | None = None) -> None:
        """Replace everything (the first load, or a resync).

        ``partial_total``: ``rows`` are only the first rows of a list this long (a first page shown
        while the rest loads); :attr:`total` says the list's size and a filter waits for the rest.
        """
        self.partial_total = partial_total
        self._rows = list(rows)
        self._index = {row.selector: i for i, row in enumerate(self._rows) if row is not None}
        if len(self._index) != len(self._rows):  # duplicate selectors: keep the last
            keep = set(self._index.values())
            self._rows = [row for i, row in enumerate(self._rows) if i in keep]
            self._index = {row.selector: i for i, row in enumerate(self._rows) if row is not None}
        self._hay = [haystack(row) if row is not None else "" for row in self._rows]
        self._keys = None
        self._order = []
        self._order_stale = True
        self._changed_filter()

    def upsert(self, row: InstanceRow) -> None:
        slot = self._index.get(row.selector)
        if slot is not None:
            old = self._rows[slot]
            assert old is not None
            self._replace(slot, old, row, _ROW_FIELDS)
            return
        self._index[row.selector] = len(self._rows)
        self._rows.append(row)
        self._hay.append(haystack(row))
        if self._keys is not None:
            self._keys.append(SORT_KEYS[self.sort_key][1](row))
        self._order_stale = True
        self._changed_filter()

    def remove(self, selector: str) -> bool:
        slot = self._index.pop(selector, None)
        if slot is None:
            return False
        self._rows[slot] = None
        self._hay[slot] = ""
        self._order_stale = True
        self._changed_filter()
        if len(self._rows) > 1024 and len(self._index) < len(self._rows) // 2:
            self.load([row for row in self._rows if row is not None])
        return True

    def patch(self, selector: str, changes: dict[str, Any]) -> bool:
        """Change some fields of one row; returns whether anything changed."""
        slot = self._index.get(selector)
        if slot is None or not changes:
            return False
        old = self._rows[slot]
        assert old is not None
        new = replace(old, **changes)
        if new == old:
            return False
        self._replace(slot, old, new, changes.keys())
        return True

    def _replace(self, slot: int, old: InstanceRow, new: InstanceRow, names: Iterable[str]) -> None:
        changed = {name for name in names if getattr(old, name) != getattr(new, name)}
        if not changed:
            return
        self._rows[slot] = new
        if changed & HAYSTACK_FIELDS:
            self._hay[slot] = haystack(new)
        if self._terms and changed & (HAYSTACK_FIELDS | FIELD_SOURCES):
            self._changed_filter()
        depends, key = SORT_KEYS[self.sort_key]
        if changed & depends and self._keys is not None:
            self._keys[slot] = key(new)
            self._resort = True
            self._changed_filter()
        self.version += 1

    # -------------------------------------------------------------- query and sort

    def set_query(self, query: str) -> None:
        terms = parse_query(query)
        if terms == self._terms:
            self.query = query
            return
        narrowing = self._filtered is not None and not self._filter_stale and refines(terms, self._terms)
        self.query, self._terms = query, terms
        if narrowing and self._filtered is not None:
            self._filtered = self._apply_filter(self._filtered)
            self._view = None
            self.version += 1
        else:
            self._changed_filter()

    def set_sort(self, key: str, desc: bool | None = None) -> None:
        """Sort by column ``key``; the same key again flips the direction unless ``desc`` is given."""
        if key not in SORT_KEYS:
            raise KeyError(key)
        if desc is None:
            desc = not self.sort_desc if key == self.sort_key else False
        if key != self.sort_key:
            self._keys = None
        elif desc == self.sort_desc:
            return
        self.sort_key, self.sort_desc = key, desc
        self._resort = True
        self._changed_filter()

    def _changed_filter(self) -> None:
        self._filter_stale = True
        self._view = None
        self.version += 1

    def _ensure_order(self) -> None:
        _depends, key = SORT_KEYS[self.sort_key]
        if self._keys is None:
            self._keys = [key(row) if row is not None else None for row in self._rows]
            self._resort = True
        if self._order_stale:
            live = self._index
            previous = [slot for slot in self._order if slot < len(self._rows) and self._rows[slot] is not None]
            seen = set(previous)
            previous.extend(slot for slot in live.values() if slot not in seen)
            self._order = previous
            self._order_stale = False
            self._resort = True
        if self._resort:
            self._order.sort(key=self._keys.__getitem__, reverse=self.sort_desc)
            self._resort = False

    def _apply_filter(self, slots: list[int]) -> list[int]:
        """The slots (in the given order) whose rows match the query (kept search keys)."""
        rows = cast("list[InstanceRow]", self._rows)  # the given slots are live
        return select(self._terms, slots, self._hay.__getitem__, rows.__getitem__)

    def view(self) -> IndexedRows:
        """The visible rows (filtered and sorted), computed only if something changed."""
        if self._view is not None and not self._resort and not self._order_stale:
            return self._view
        self._ensure_order()
        if self._filter_stale or self._filtered is None:
            self._filtered = self._apply_filter(self._order) if self._terms else self._order
            self._filter_stale = False
        self._view = IndexedRows(self._rows, self._filtered, self._index)
        return self._view

    @property
    def partial(self) -> bool:
        """Only a first page of the list is in; the rest is on its way."""
        return self.partial_total is not None

    @property
    def total(self) -> int:
        if self.partial_total is not None:
            return max(self.partial_total, len(self._index))
        return len(self._index)

    @property
    def matched(self) -> int:
        if self.partial_total is not None and not self._terms:
            return self.total
        return len(self.view())

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for row in self.all_rows():
            result[row.state] = result.get(row.state, 0) + 1
        return result


# ---------------------------------------------------------------------------------------------- events → rows

#: what an alarm notification says, for every alarm the core raises
ALARM_TITLES: dict[AlarmKind, str] = {
    AlarmKind.UNAUTHORIZED: "Registrar refuses credentials",
    AlarmKind.PUSH_REJECTED: "Push rejected",
    AlarmKind.STORAGE_FAILING: "Storage failing: changes refused",
    AlarmKind.PBX_DOWN: "PBX down",
    AlarmKind.AUTH_FAILURES: "PBX refuses many instances",
    AlarmKind.PROVIDER_DOWN: "Push provider down",
    AlarmKind.TOKEN_DEAD: "Many push tokens dead",
}


def _text(value: str) -> str:
    """A plain, shared string (enum members from the payloads compare and sort slower, and the same
    few values repeat across 100k rows)."""
    return sys.intern(str(value))


def _shared(value: str | None) -> str | None:
    return None if value is None else _text(value)


def row_patch(event: Event) -> dict[str, Any]:
    """Which instance-row fields an event changes (empty if none)."""
    payload = event.payload
    if isinstance(payload, InstanceStateChanged):
        return {"state": _text(payload.state)}
    if isinstance(payload, RegistrationStatusChanged):
        if payload.status == RegStatus.IDLE:  # no binding of ours any more: the core has cleared its timers
            return {"reg_status": "idle", "next_refresh_at": None, "expires_at": None, "backoff_until": None}
        return {"reg_status": _text(payload.status)}
    if isinstance(payload, RegistrationResult):
        return {"last_code": payload.code, "last_reason": _shared(payload.reason),
                "failure_count": payload.failure_count, "next_refresh_at": payload.next_refresh_at,
                "expires_at": payload.expires_at}
    if isinstance(payload, InstancePushChanged):
        patch: dict[str, Any] = {}
        if payload.provider is not None:
            patch["push_provider"] = _text(payload.provider)
        if payload.unreachable is not None:
            patch["push_unreachable"] = payload.unreachable
        return patch
    if isinstance(payload, PushRecord) and payload.outcome:
        patch = {"last_push_outcome": _text(payload.outcome), "last_push_at": event.at}
        if payload.outcome == PushOutcome.ACCEPTED:
            patch["push_unreachable"] = False
        return patch
    if isinstance(payload, InstanceAppReport):
        return {"app_last_seen": event.at}
    return {}


# ---------------------------------------------------------------------------------------------- held calls and pushes


@dataclass(slots=True)
class CallEntry:
    """A held (or recently ended) call as the console shows it: the core's view of it and what the
    console derived when it arrived — its timers as wall-clock deadlines (the view's remaining
    seconds counted from when it was received) and the outcome of its push, from the push log."""

    call: HeldCall
    t1_deadline: float | None = None
    t2_deadline: float | None = None
    push_outcome: str | None = None

    @classmethod
    def received(cls, call: HeldCall, now: float, push_outcome: str | None = None) -> CallEntry:
        t1, t2 = call.t1_remaining, call.t2_remaining
        return cls(call, None if t1 is None else now + t1, None if t2 is None else now + t2, push_outcome)

    @property
    def held(self) -> bool:
        return self.call.outcome is None and self.call.stage != "Ended"


def push_time(push: PushRecord, seen: float | None = None) -> float:
    """When a push went out: its ``push_sent`` stage, else its earliest stage (one refused before
    sending has none or only ``invite_received``), else when the console first ``seen`` it."""
    stages = push.stages
    sent = stages.get("push_sent")
    if sent is not None:
        return sent
    if stages:
        return min(stages.values())
    return seen or 0.0


# ---------------------------------------------------------------------------------------------- the model


@dataclass(slots=True)
class Applied:
    """What a batch of events changed."""

    rows: int = 0
    touched: set[str] = field(default_factory=set)  # selectors with any event
    refetch: set[str] = field(default_factory=set)  # selectors whose full row must be fetched
    calls: bool = False
    pushes: bool = False
    audit: bool = False
    events: int = 0


#: an entry of the event log: an event, or a stream notice saying events were lost
LogItem = Event | StreamNotice


class ConsoleModel:
    """Everything one console shows; updated from events in batches and from periodic summaries."""

    SERIES = ("proxied", "calls", "push_failures")

    def __init__(self, *, history: int = 120, log_size: int = 5000, push_log_size: int = 2000) -> None:
        self.store = InstanceStore()
        self.summary: Summary | None = None
        self.series: dict[str, deque[float]] = {name: deque(maxlen=history) for name in self.SERIES}
        self.held: dict[str, CallEntry] = {}  # push_id → call
        self.recent_calls: deque[CallEntry] = deque(maxlen=200)
        self.pushes: OrderedDict[str, PushRecord] = OrderedDict()
        self._push_seen: dict[str, float] = {}  # push_id → when its first event arrived
        self.push_log_size = push_log_size
        self.events: deque[LogItem] = deque(maxlen=log_size)
        self.audit: deque[AuditEntry] = deque(maxlen=log_size)
        #: the cluster's nodes, as of the last summary poll
        self.nodes: list[NodeRow] = []
        self.last_seq: int | None = None
        self._last_push_failures: int | None = None
        self.version = 0  # bumped for every applied batch / new summary / reloaded list

    # -------------------------------------------------------------- loads

    def load_calls(self, snapshot: CallsSnapshot, now: float) -> None:
        """The held and recent calls as the core saw them at ``now`` (when the answer arrived)."""
        self.held = {call.push_id: self._entry(call, now) for call in snapshot.held}
        self.recent_calls.clear()
        self.recent_calls.extend(self._entry(call, now) for call in snapshot.recent)
        self.version += 1

    def load_pushes(self, pushes: Iterable[PushRecord]) -> None:
        self.pushes.clear()
        self._push_seen.clear()
        for push in sorted(pushes, key=push_time):
            self._remember_push(push)
        self.version += 1

    def load_nodes(self, nodes: Iterable[NodeRow]) -> None:
        rows = sorted(nodes, key=lambda n: n.name)
        if rows != self.nodes:
            self.nodes = rows
            self.version += 1

    def load_audit(self, entries: Iterable[AuditEntry]) -> None:
        self.audit.clear()
        self.audit.extend(sorted(entries, key=lambda a: a.at))
        self.version += 1

    def _remember_push(self, push: PushRecord) -> None:
        self.pushes[push.push_id] = push
        self.pushes.move_to_end(push.push_id)
        while len(self.pushes) > self.push_log_size:
            gone, _ = self.pushes.popitem(last=False)
            self._push_seen.pop(gone, None)

    def record_summary(self, summary: Summary) -> None:
        self.summary = summary
        self.series["proxied"].append(float(summary.counts.get("proxied", 0)))
        self.series["calls"].append(float(summary.calls_per_min))
        failures = summary.push.rejected + summary.push.transient
        delta = 0 if self._last_push_failures is None else max(0, failures - self._last_push_failures)
        self._last_push_failures = failures
        self.series["push_failures"].append(float(delta))
        self.version += 1

    # -------------------------------------------------------------- events

    def apply(self, items: Sequence[LogItem]) -> Applied:
        """Apply a batch of events (in order); stream notices only go to the event log."""
        result = Applied(events=len(items))
        store = self.store
        for event in items:
            if isinstance(event, StreamNotice):
                self.events.append(event)
                continue
            if self.last_seq is not None and 0 < event.seq <= self.last_seq:
                continue  # replayed after a reconnect
            if event.seq:
                self.last_seq = event.seq
            self.events.append(event)
            selector = event.selector
            payload = event.payload
            if selector:
                result.touched.add(selector)
            if isinstance(payload, InstanceDeleted) and selector:
                if store.remove(selector):
                    result.rows += 1
                continue
            if isinstance(payload, InstanceEnrolled | InstanceUpdated) and selector:
                if selector not in store:
                    aor = payload.aor if isinstance(payload, InstanceEnrolled) else ""
                    store.upsert(InstanceRow(selector=selector, aor=aor))
                    result.rows += 1
                result.refetch.add(selector)
                continue
            if isinstance(payload, HeldCall):
                self._apply_call(payload, event.at)
                result.calls = True
            elif isinstance(payload, PushRecord):
                self._apply_push(payload, event.at)
                result.pushes = True
            elif isinstance(payload, AuditEntry):
                self.audit.append(payload)
                result.audit = True
            if selector:
                patch = row_patch(event)
                if patch and store.patch(selector, patch):
                    result.rows += 1
        if items:
            self.version += 1
        return result

    def _entry(self, call: HeldCall, now: float, previous: CallEntry | None = None) -> CallEntry:
        push = self.pushes.get(call.push_id)
        outcome = push.outcome if push is not None else (previous.push_outcome if previous else None)
        return CallEntry.received(call, now, outcome)

    def _apply_call(self, call: HeldCall, at: float) -> None:
        entry = self._entry(call, at, self.held.get(call.push_id))
        if entry.held:
            self.held[call.push_id] = entry
        else:
            self.held.pop(call.push_id, None)
            self.recent_calls.append(entry)

    def _apply_push(self, push: PushRecord, at: float) -> None:
        self._push_seen.setdefault(push.push_id, at)
        self._remember_push(push)
        call = self.held.get(push.push_id)
        if call is not None:
            call.push_outcome = push.outcome

    # -------------------------------------------------------------- views

    def push_at(self, push: PushRecord) -> float:
        """When ``push`` went out (:func:`push_time`, with when this console first saw it)."""
        return push_time(push, self._push_seen.get(push.push_id))

    # The logs are newest first by when things happened, never by when a row last changed: a push
    # whose stages come in later keeps its place while the operator reads.

    def push_log(self) -> list[PushRecord]:
        return sorted(self.pushes.values(), key=self.push_at, reverse=True)

    def event_log(self) -> list[LogItem]:
        return sorted(reversed(self.events), key=lambda event: event.at, reverse=True)  # ties: last in first

    def audit_log(self) -> list[AuditEntry]:
        return sorted(reversed(self.audit), key=lambda entry: entry.at, reverse=True)

    def held_calls(self) -> list[CallEntry]:
        return sorted(self.held.values(), key=lambda c: (c.call.received_at, c.call.call_id))

    def recent(self) -> list[CallEntry]:
        """Newest first by when the INVITE came (not by when the call ended)."""
        return sorted(reversed(self.recent_calls), key=lambda c: c.call.received_at, reverse=True)
