"""The data model the console renders, and where it comes from.

* :class:`Feed` mirrors the operator API (``docs/operator-api.md``) with snapshot rows from
  ``widgets/rows.py``; :class:`OperatorFeed` wraps the HTTP client, :class:`FakeFeed` serves
  deterministic rows and scripted events for tests and demos.
* :class:`InstanceStore` keeps **all** instance rows locally, updated from events, so filtering and
  sorting are local: precomputed lower-case search keys, cached sort keys, and re-sorting the previous
  order (nearly sorted, so Python's timsort runs in about linear time).
* :class:`ConsoleModel` is everything one console shows: the store, the latest summary, sparkline
  series, held calls, the push, event and audit logs. Events are applied to it in batches.
"""

from __future__ import annotations

import asyncio
import math
import sys
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, overload, runtime_checkable

from widgets.rows import AuditRow, CallRow, EventRow, InstanceRow, PushRow, SipMessageRow

# ---------------------------------------------------------------------------------------------- roles

ROLES = ("viewer", "operator", "admin")

#: instance actions (operator API path names) → (label, role needed)
ACTIONS: dict[str, tuple[str, str]] = {
    "take-over": ("Take over", "operator"),
    "hand-back": ("Hand back", "operator"),
    "re-register": ("Re-register", "operator"),
    "test-push": ("Test push", "operator"),
    "disable": ("Disable", "admin"),
}
REPLAY_ROLE = "operator"


def role_allows(role: str | None, needed: str) -> bool:
    """Whether ``role`` may do what needs ``needed`` (unknown roles may only view)."""
    rank = ROLES.index(role) if role in ROLES else 0
    return rank >= ROLES.index(needed)


# ---------------------------------------------------------------------------------------------- errors


class FeedError(Exception):
    """The core refused or failed a request (``status`` is the HTTP status when there is one)."""

    def __init__(self, detail: str, *, status: int | None = None, code: str = "error") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code


class Forbidden(FeedError):
    """403: the operator's role does not allow this (the core checks, whatever the UI shows)."""


class NotFound(FeedError):
    """404."""


# ---------------------------------------------------------------------------------------------- snapshots


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    role: str


@dataclass(frozen=True, slots=True)
class Summary:
    node: str = "?"
    version: str = ""
    started_at: float | None = None
    now: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    reg_status: dict[str, int] = field(default_factory=dict)
    held_calls: int = 0
    calls_per_min: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    push_accepted: int = 0
    push_rejected: int = 0
    push_transient: int = 0
    push_success_rate: float | None = None
    push_p50_ms: float | None = None
    push_p99_ms: float | None = None
    pbx_reachable: bool | None = None
    pbx_error: str | None = None
    writer_pending: int = 0
    writer_error: str | None = None
    alarms: int = 0


@dataclass(frozen=True, slots=True)
class InstancePage:
    """The first rows of the instance list in AOR order, with the list's size: enough for a first frame."""

    total: int
    matched: int
    rows: list[InstanceRow]
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InstanceDetail:
    row: InstanceRow
    view: dict[str, Any]  # the core's public view (secrets masked), for the detail header
    timeline: list[EventRow]
    pushes: list[PushRow]
    sip: list[SipMessageRow]


@dataclass(frozen=True, slots=True)
class CallsSnapshot:
    held: list[CallRow]
    recent: list[CallRow]


@dataclass(frozen=True, slots=True)
class CallTrace:
    call_id: str
    messages: list[SipMessageRow]
    pushes: list[PushRow]
    selector: str | None = None


@dataclass(frozen=True, slots=True)
class ActionResult:
    name: str
    target: str
    push: PushRow | None = None
    row: InstanceRow | None = None  # the instance's row after the action, when the core sends it
    raw: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- the protocol


@runtime_checkable
class Feed(Protocol):
    """What the console needs from the core; one method per operator API call."""

    async def whoami(self) -> Operator: ...

    async def summary(self) -> Summary: ...

    async def instances(self) -> list[InstanceRow]:
        """All instance rows (``GET /v1/instances?limit=0``)."""
        ...

    async def instance_page(self, limit: int) -> InstancePage:
        """The first ``limit`` rows in AOR order and the list's size (``GET /v1/instances?limit=N``)."""
        ...

    async def instance(self, selector: str) -> InstanceDetail: ...

    async def calls(self) -> CallsSnapshot: ...

    async def call_trace(self, call_id: str) -> CallTrace: ...

    async def call_trace_text(self, call_id: str) -> str: ...

    async def call_trace_pcap(self, call_id: str) -> bytes: ...

    async def pushes(self, limit: int = 200, selector: str | None = None) -> list[PushRow]: ...

    async def audit(self, limit: int = 200) -> list[AuditRow]: ...

    def events(self, since: int | None = None) -> AsyncIterator[EventRow]:
        """The event stream, forever (heartbeats are not yielded)."""
        ...

    async def action(self, selector: str, name: str) -> ActionResult: ...

    async def replay_push(self, push_id: str) -> PushRow: ...


# ---------------------------------------------------------------------------------------------- JSON → rows


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _shared(value: Any) -> str | None:
    """One string object for all rows with this value (states, codes' reasons, providers,
    registrars repeat across 100k rows: ~27 MB of copies otherwise)."""
    return None if value is None else sys.intern(str(value))


def row_from_dict(d: dict[str, Any]) -> InstanceRow:
    """An operator API instance-list row."""
    get = d.get
    return InstanceRow(
        selector=str(d["selector"]),
        aor=str(get("aor") or ""),
        user=str(get("user") or ""),
        registrar=sys.intern(str(get("registrar") or "")),
        state=sys.intern(str(get("state") or "inactive")),
        reg_status=sys.intern(str(get("reg_status") or "idle")),
        last_code=_int(get("last_code")),
        last_reason=_shared(get("last_reason")),
        expires_at=_float(get("expires_at")),
        next_refresh_at=_float(get("next_refresh_at")),
        failure_count=int(get("failure_count") or 0),
        backoff_until=_float(get("backoff_until")),
        push_provider=_shared(get("push_provider")),
        push_unreachable=bool(get("push_unreachable")),
        last_push_outcome=_shared(get("last_push_outcome")),
        last_push_at=_float(get("last_push_at")),
        app_last_seen=_float(get("app_last_seen")),
    )


def row_from_public_view(view: dict[str, Any], previous: InstanceRow | None = None) -> InstanceRow:
    """An instance's public view (``GET /v1/instances/{selector}``) as a list row."""
    reg = view.get("registration") or {}
    push = view.get("push") or {}
    base = previous or InstanceRow(selector=str(view["selector"]), aor="")
    return replace(
        base,
        selector=str(view["selector"]),
        aor=str(view.get("aor") or base.aor),
        user=str(view.get("username") or view.get("user") or base.user),
        registrar=str(view.get("registrar") or base.registrar),
        state=str(view.get("state") or base.state),
        reg_status=str(reg.get("status") or base.reg_status),
        last_code=_int(reg.get("last_code")),
        last_reason=reg.get("last_reason"),
        expires_at=_float(reg.get("expires_at")),
        next_refresh_at=_float(reg.get("next_refresh_at")),
        failure_count=int(reg.get("failure_count") or 0),
        backoff_until=_float(reg.get("backoff_until")),
        push_provider=push.get("provider", base.push_provider),
        push_unreachable=bool(push.get("unreachable", base.push_unreachable)),
        last_push_outcome=view.get("last_push_outcome", base.last_push_outcome),
        last_push_at=_float(view.get("last_push_at", base.last_push_at)),
        app_last_seen=_float(view.get("app_last_seen", base.app_last_seen)),
    )


def push_from_dict(d: dict[str, Any], *, selector: str | None = None, at: float | None = None) -> PushRow:
    stages = {str(k): float(v) for k, v in (d.get("stages") or {}).items() if v is not None}
    when = d.get("at") or d.get("created_at") or stages.get("push_sent") or at or (
        min(stages.values()) if stages else 0.0)
    return PushRow(
        push_id=str(d.get("push_id") or d.get("id") or ""),
        selector=str(d.get("selector") or selector or ""),
        at=float(when),
        kind=str(d.get("kind") or "call"),
        provider=str(d.get("provider") or ""),
        call_id=d.get("call_id"),
        attempt=int(d.get("attempt") or 0),
        outcome=str(d.get("outcome") or d.get("verdict") or "pending"),
        provider_code=_int(d.get("provider_code")),
        provider_reason=d.get("provider_reason"),
        latency_ms=_float(d.get("latency_ms")),
        error=d.get("error"),
        replay_of=d.get("replay_of"),
        stages=stages,
        request_summary=dict(d.get("request_summary") or {}),
    )


def call_from_dict(d: dict[str, Any], *, now: float, push_outcome: str | None = None) -> CallRow:
    """A held-call view; ``t1_remaining``/``t2_remaining`` become deadlines relative to ``now``."""
    t1, t2 = d.get("t1_remaining"), d.get("t2_remaining")
    return CallRow(
        call_id=str(d.get("call_id") or ""),
        push_id=str(d.get("push_id") or d.get("call_id") or ""),
        selector=str(d.get("selector") or ""),
        caller=d.get("caller"),
        stage=str(d.get("stage") or "Alerting-Device"),
        received_at=_float(d.get("received_at")),
        outcome=d.get("outcome"),
        final_status=_int(d.get("final_status")),
        t1_deadline=None if t1 is None else now + float(t1),
        t2_deadline=None if t2 is None else now + float(t2),
        push_outcome=push_outcome,
    )


def event_from_dict(d: dict[str, Any]) -> EventRow:
    return EventRow(
        seq=int(d.get("seq") or 0),
        at=float(d.get("at") or 0.0),
        kind=str(d.get("kind") or ""),
        selector=d.get("selector"),
        data=dict(d.get("data") or {}),
    )


def audit_from_dict(d: dict[str, Any]) -> AuditRow:
    data = d.get("data") if isinstance(d.get("data"), dict) else d
    assert isinstance(data, dict)
    return AuditRow(
        at=float(d.get("at") or data.get("at") or 0.0),
        operator=str(data.get("operator") or ""),
        role=str(data.get("role") or ""),
        action=str(data.get("action") or ""),
        target=data.get("target"),
        outcome=str(data.get("outcome") or ""),
        detail=dict(data.get("detail") or {}),
    )


def message_from_dict(d: dict[str, Any]) -> SipMessageRow:
    return SipMessageRow(
        at=float(d.get("at") or 0.0),
        direction=str(d.get("direction") or "in"),
        first_line=str(d.get("first_line") or ""),
        raw=str(d.get("raw") or ""),
        transport=str(d.get("transport") or ""),
        local=str(d.get("local") or ""),
        remote=str(d.get("remote") or ""),
        call_id=d.get("call_id"),
        cseq=None if d.get("cseq") is None else str(d.get("cseq")),
        method=d.get("method"),
        status=_int(d.get("status")),
    )


def summary_from_dict(d: dict[str, Any]) -> Summary:
    push = d.get("push") or {}
    pbx = d.get("pbx") or {}
    writer = d.get("writer") or {}
    return Summary(
        node=str(d.get("node") or "?"),
        version=str(d.get("version") or ""),
        started_at=_float(d.get("started_at")),
        now=_float(d.get("now")),
        counts={str(k): int(v) for k, v in (d.get("counts") or {}).items()},
        reg_status={str(k): int(v) for k, v in (d.get("reg_status") or {}).items()},
        held_calls=int(d.get("held_calls") or 0),
        calls_per_min=float(d.get("calls_per_min") or 0.0),
        outcomes={str(k): int(v) for k, v in (d.get("outcomes") or {}).items()},
        push_accepted=int(push.get("accepted") or 0),
        push_rejected=int(push.get("rejected") or 0),
        push_transient=int(push.get("transient") or 0),
        push_success_rate=_float(push.get("success_rate")),
        push_p50_ms=_float(push.get("latency_p50_ms")),
        push_p99_ms=_float(push.get("latency_p99_ms")),
        pbx_reachable=None if pbx.get("reachable") is None else bool(pbx.get("reachable")),
        pbx_error=pbx.get("last_error"),
        writer_pending=int(writer.get("pending") or 0),
        writer_error=writer.get("last_error"),
        alarms=int(d.get("alarms") or 0),
    )


# ---------------------------------------------------------------------------------------------- instance store

_STATE_RANK = {"active": 0, "proxied": 1, "inactive": 2, "off": 3}
_REG_RANK = {"unauthorized": 0, "error": 1, "registering": 2, "unregistering": 3, "registered": 4, "idle": 5}
_PUSH_RANK = {"rejected-permanent": 1, "rejected-transient": 2, "pending": 3, "accepted": 4}
_INF = math.inf

#: column key → (row fields the key depends on, key function); every key function returns one type
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
    "registrar": (frozenset({"registrar"}), lambda r: r.registrar.lower()),
    "selector": (frozenset({"selector"}), lambda r: r.selector),
}

_HAY_FIELDS = frozenset({"selector", "aor", "user", "registrar"})

#: ``field:value`` filter tokens (value matches as a prefix, case-insensitive)
FILTER_FIELDS: dict[str, Callable[[InstanceRow], str]] = {
    "state": lambda r: r.state,
    "status": lambda r: r.reg_status,
    "reg": lambda r: r.reg_status,
    "code": lambda r: "" if r.last_code is None else str(r.last_code),
    "push": lambda r: "unreachable" if r.push_unreachable else (r.last_push_outcome or ""),
    "provider": lambda r: (r.push_provider or "").lower(),
}
_FILTER_SOURCE_FIELDS = frozenset({"state", "reg_status", "last_code", "push_unreachable", "last_push_outcome",
                                   "push_provider"})

_ROW_FIELDS = frozenset(f.name for f in fields(InstanceRow))

Token = tuple[str | None, str]


def parse_query(query: str) -> list[Token]:
    """``alice state:proxied`` → [(None, "alice"), ("state", "proxied")]; all tokens must match."""
    tokens: list[Token] = []
    for word in query.lower().split():
        name, sep, value = word.partition(":")
        if sep and name in FILTER_FIELDS:
            tokens.append((name, value))
        else:
            tokens.append((None, word))
    return tokens


def _refines(new: list[Token], old: list[Token]) -> bool:
    """Whether every row matching ``new`` also matches ``old`` (so we can filter the old result)."""
    if len(new) < len(old):
        return False
    return all(n[0] == o[0] and n[1].startswith(o[1]) if n[0] is not None else n[0] == o[0] and o[1] in n[1]
               for n, o in zip(new, old, strict=False))


def _hay(row: InstanceRow) -> str:
    return f"{row.selector}\0{row.aor}\0{row.user}\0{row.registrar}".lower()


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
        self._tokens: list[Token] = []
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
        self._hay = [_hay(row) if row is not None else "" for row in self._rows]
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
        self._hay.append(_hay(row))
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
        if changed & _HAY_FIELDS:
            self._hay[slot] = _hay(new)
        if self._tokens and changed & (_HAY_FIELDS | _FILTER_SOURCE_FIELDS):
            self._changed_filter()
        depends, key = SORT_KEYS[self.sort_key]
        if changed & depends and self._keys is not None:
            self._keys[slot] = key(new)
            self._resort = True
            self._changed_filter()
        self.version += 1

    # -------------------------------------------------------------- query and sort

    def set_query(self, query: str) -> None:
        tokens = parse_query(query)
        if tokens == self._tokens:
            self.query = query
            return
        narrowing = self._filtered is not None and not self._filter_stale and _refines(tokens, self._tokens)
        self.query, self._tokens = query, tokens
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
        """The slots (in the given order) matching every token; one list comprehension per token."""
        hay, rows = self._hay, self._rows
        result = slots
        for name, value in sorted(self._tokens, key=lambda t: t[0] is not None):  # plain tokens first
            if name is None:
                result = [slot for slot in result if value in hay[slot]]
            else:
                getter = FILTER_FIELDS[name]
                result = [slot for slot in result if getter(rows[slot]).startswith(value)]  # type: ignore[arg-type]
        return result

    def view(self) -> IndexedRows:
        """The visible rows (filtered and sorted), computed only if something changed."""
        if self._view is not None and not self._resort and not self._order_stale:
            return self._view
        self._ensure_order()
        if self._filter_stale or self._filtered is None:
            self._filtered = self._apply_filter(self._order) if self._tokens else self._order
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
        if self.partial_total is not None and not self._tokens:
            return self.total
        return len(self.view())

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for row in self.all_rows():
            result[row.state] = result.get(row.state, 0) + 1
        return result


# ---------------------------------------------------------------------------------------------- events → model

#: stream lines that say events were lost for this client: reload the snapshots
RESYNC_KINDS = frozenset({"gap", "overflow"})

ALARM_TITLES = {
    "unauthorized": "Registrar refuses credentials",
    "push-rejected": "Push rejected",
    "pbx-down": "PBX unreachable",
    "pbx-unreachable": "PBX unreachable",
}


def row_patch(event: EventRow) -> dict[str, Any]:
    """Which instance-row fields an event changes (empty if none)."""
    kind, data = event.kind, event.data
    if kind == "instance.state" and "state" in data:
        return {"state": str(data["state"])}
    if kind == "registration.status" and "status" in data:
        if data["status"] == "idle":  # no binding of ours any more: the core has cleared its timers
            return {"reg_status": "idle", "next_refresh_at": None, "expires_at": None, "backoff_until": None}
        return {"reg_status": str(data["status"])}
    if kind == "registration":
        patch: dict[str, Any] = {}
        if "code" in data:
            patch["last_code"] = _int(data["code"])
        if "reason" in data:
            patch["last_reason"] = data["reason"]
        if "failure_count" in data:
            patch["failure_count"] = int(data["failure_count"] or 0)
        for name in ("next_refresh_at", "expires_at", "backoff_until"):
            if name in data:
                patch[name] = _float(data[name])
        return patch
    if kind == "instance.push":
        patch = {}
        if "provider" in data:
            patch["push_provider"] = data["provider"]
        if "unreachable" in data:
            patch["push_unreachable"] = bool(data["unreachable"])
        return patch
    if kind == "push" and data.get("outcome"):
        patch = {"last_push_outcome": str(data["outcome"]), "last_push_at": event.at}
        if data.get("outcome") == "accepted":
            patch["push_unreachable"] = False
        return patch
    if kind == "instance.app":
        return {"app_last_seen": event.at}
    return {}


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


class ConsoleModel:
    """Everything one console shows; updated from events in batches and from periodic summaries."""

    SERIES = ("proxied", "calls", "push_failures")

    def __init__(self, *, history: int = 120, log_size: int = 5000, push_log_size: int = 2000) -> None:
        self.store = InstanceStore()
        self.summary: Summary | None = None
        self.series: dict[str, deque[float]] = {name: deque(maxlen=history) for name in self.SERIES}
        self.held: dict[str, CallRow] = {}  # push_id → call
        self.recent_calls: deque[CallRow] = deque(maxlen=200)
        self.pushes: OrderedDict[str, PushRow] = OrderedDict()
        self.push_log_size = push_log_size
        self.events: deque[EventRow] = deque(maxlen=log_size)
        self.audit: deque[AuditRow] = deque(maxlen=log_size)
        self.last_seq: int | None = None
        self._last_push_failures: int | None = None
        self.version = 0  # bumped for every applied batch / new summary / reloaded list

    # -------------------------------------------------------------- loads

    def load_calls(self, snapshot: CallsSnapshot) -> None:
        self.held = {call.push_id: call for call in snapshot.held}
        self.recent_calls.clear()
        self.recent_calls.extend(snapshot.recent)
        self.version += 1

    def load_pushes(self, pushes: Iterable[PushRow]) -> None:
        self.pushes.clear()
        for push in sorted(pushes, key=lambda p: p.at):
            self._remember_push(push)
        self.version += 1

    def load_audit(self, entries: Iterable[AuditRow]) -> None:
        self.audit.clear()
        self.audit.extend(sorted(entries, key=lambda a: a.at))
        self.version += 1

    def _remember_push(self, push: PushRow) -> None:
        self.pushes[push.push_id] = push
        self.pushes.move_to_end(push.push_id)
        while len(self.pushes) > self.push_log_size:
            self.pushes.popitem(last=False)

    def record_summary(self, summary: Summary) -> None:
        self.summary = summary
        self.series["proxied"].append(float(summary.counts.get("proxied", 0)))
        self.series["calls"].append(float(summary.calls_per_min))
        failures = summary.push_rejected + summary.push_transient
        delta = 0 if self._last_push_failures is None else max(0, failures - self._last_push_failures)
        self._last_push_failures = failures
        self.series["push_failures"].append(float(delta))
        self.version += 1

    # -------------------------------------------------------------- events

    def apply(self, events: Sequence[EventRow]) -> Applied:
        """Apply a batch of events (in order)."""
        result = Applied(events=len(events))
        store = self.store
        for event in events:
            if self.last_seq is not None and 0 < event.seq <= self.last_seq:
                continue  # replayed after a reconnect
            if event.seq:
                self.last_seq = event.seq
            self.events.append(event)
            selector = event.selector
            kind = event.kind
            if selector:
                result.touched.add(selector)
            if kind == "instance.deleted" and selector:
                if store.remove(selector):
                    result.rows += 1
                continue
            if kind in ("instance.enrolled", "instance.updated") and selector:
                if selector not in store:
                    store.upsert(InstanceRow(selector=selector, aor=str(event.data.get("aor") or "")))
                    result.rows += 1
                result.refetch.add(selector)
                continue
            if kind == "call":
                self._apply_call(event)
                result.calls = True
            elif kind == "push":
                self._apply_push(event)
                result.pushes = True
            elif kind == "audit":
                self.audit.append(audit_from_dict({"at": event.at, "data": event.data}))
                result.audit = True
            if selector:
                patch = row_patch(event)
                if patch and store.patch(selector, patch):
                    result.rows += 1
        if events:
            self.version += 1
        return result

    def _apply_call(self, event: EventRow) -> None:
        data = dict(event.data)
        data.setdefault("selector", event.selector)
        previous = self.held.get(str(data.get("push_id") or data.get("call_id") or ""))
        push = self.pushes.get(str(data.get("push_id") or ""))
        push_outcome = push.outcome if push is not None else (previous.push_outcome if previous else None)
        call = call_from_dict(data, now=event.at, push_outcome=push_outcome)
        if call.held:
            self.held[call.push_id] = call
        else:
            self.held.pop(call.push_id, None)
            self.recent_calls.append(call)

    def _apply_push(self, event: EventRow) -> None:
        previous = self.pushes.get(str(event.data.get("push_id") or ""))
        push = push_from_dict(event.data, selector=event.selector,
                              at=previous.at if previous is not None else event.at)
        self._remember_push(push)
        call = self.held.get(push.push_id)
        if call is not None:
            self.held[push.push_id] = replace(call, push_outcome=push.outcome)

    # -------------------------------------------------------------- views

    def push_log(self) -> list[PushRow]:
        """Newest first."""
        return list(reversed(self.pushes.values()))

    def event_log(self) -> list[EventRow]:
        return list(reversed(self.events))

    def audit_log(self) -> list[AuditRow]:
        return list(reversed(self.audit))

    def held_calls(self) -> list[CallRow]:
        return sorted(self.held.values(), key=lambda c: (c.received_at or 0.0, c.call_id))

    def recent(self) -> list[CallRow]:
        return list(reversed(self.recent_calls))


# ---------------------------------------------------------------------------------------------- the real feed


def _status_of(exc: BaseException) -> int | None:
    for name in ("status", "status_code"):
        value = getattr(exc, name, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


def _detail_of(exc: BaseException) -> str:
    detail = getattr(exc, "detail", None)
    if isinstance(detail, str) and detail:
        return detail
    return str(exc) or type(exc).__name__


def map_error(exc: Exception) -> FeedError:
    """Turn whatever the client raised into a :class:`FeedError` (403 → :class:`Forbidden`)."""
    if isinstance(exc, FeedError):
        return exc
    status = _status_of(exc)
    code = str(getattr(exc, "code", None) or getattr(exc, "error", None) or "error")
    detail = _detail_of(exc)
    if status == 403:
        return Forbidden(detail, status=403, code="forbidden")
    if status == 404:
        return NotFound(detail, status=404, code="not-found")
    if not status and (status == 0 or isinstance(exc, OSError | ConnectionError | asyncio.TimeoutError)):
        return FeedError(detail, code="unreachable")  # the client's Unreachable has status 0
    return FeedError(detail, status=status, code=code)


class OperatorFeed:
    """:class:`Feed` over ``console.client.OperatorClient`` (the operator API over HTTP).

    The client is duck-typed: it returns the JSON bodies of ``docs/operator-api.md`` as dicts (bytes
    for pcap, str for text) and raises exceptions carrying ``status``/``status_code`` on errors.
    """

    def __init__(self, client: Any, *, clock: Callable[[], float] | None = None) -> None:
        import time

        self.client = client
        self.clock = clock or time.time

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self.client, name)(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc) from exc

    async def whoami(self) -> Operator:
        d = await self._call("whoami")
        return Operator(name=str(d.get("name") or "?"), role=str(d.get("role") or "viewer"))

    async def summary(self) -> Summary:
        return summary_from_dict(await self._call("summary"))

    async def instances(self) -> list[InstanceRow]:
        if hasattr(self.client, "stream_instances"):  # rows decoded while they arrive (client.py)
            rows: list[InstanceRow] = []

            def take(items: list[dict[str, Any]]) -> None:
                rows.extend([row_from_dict(item) for item in items])

            await self._call("stream_instances", take, offset=0, limit=0, q="", state="", sort="aor", desc=False)
            return rows
        d = await self._call("instances", offset=0, limit=0, q="", state="", sort="aor", desc=False)
        items = d.get("items", []) if isinstance(d, dict) else d
        return [row_from_dict(item) for item in items]

    async def instance_page(self, limit: int) -> InstancePage:
        d = await self._call("instances", offset=0, limit=max(1, limit), q="", state="", sort="aor", desc=False)
        rows = [row_from_dict(item) for item in d.get("items") or []]
        total = int(d.get("total") or len(rows))
        return InstancePage(total=total, matched=int(d.get("matched") or total), rows=rows,
                            counts={str(k): int(v) for k, v in (d.get("counts") or {}).items()})

    async def instance(self, selector: str) -> InstanceDetail:
        d = await self._call("instance", selector)
        view = dict(d.get("instance") or {})
        row = d.get("row")
        return InstanceDetail(
            row=row_from_dict(row) if isinstance(row, dict) else row_from_public_view(view),
            view=view,
            timeline=[event_from_dict(e) for e in d.get("timeline") or []],
            pushes=[push_from_dict(p, selector=selector) for p in d.get("pushes") or []],
            sip=[message_from_dict(m) for m in d.get("sip") or []],
        )

    async def calls(self) -> CallsSnapshot:
        d = await self._call("calls")
        now = self.clock()
        return CallsSnapshot(held=[call_from_dict(c, now=now) for c in d.get("held") or []],
                             recent=[call_from_dict(c, now=now) for c in d.get("recent") or []])

    async def call_trace(self, call_id: str) -> CallTrace:
        d = await self._call("call_trace", call_id)
        return CallTrace(call_id=str(d.get("call_id") or call_id),
                         messages=[message_from_dict(m) for m in d.get("messages") or []],
                         pushes=[push_from_dict(p) for p in d.get("pushes") or []],
                         selector=d.get("selector"))

    async def call_trace_text(self, call_id: str) -> str:
        return str(await self._call("call_trace_text", call_id))

    async def call_trace_pcap(self, call_id: str) -> bytes:
        return bytes(await self._call("call_trace_pcap", call_id))

    async def pushes(self, limit: int = 200, selector: str | None = None) -> list[PushRow]:
        items = await self._call("pushes", limit=limit, selector=selector)
        return [push_from_dict(p) for p in items]

    async def audit(self, limit: int = 200) -> list[AuditRow]:
        return [audit_from_dict(a) for a in await self._call("audit", limit=limit)]

    async def events(self, since: int | None = None) -> AsyncIterator[EventRow]:
        try:
            async for item in self.client.events(since=since):
                if not isinstance(item, dict) or item.get("kind") == "heartbeat":
                    continue
                if item.get("kind") in RESYNC_KINDS:  # no seq of their own; what was lost is in data
                    item = {"kind": item["kind"], "at": item.get("at"), "seq": 0, "selector": None,
                            "data": {k: v for k, v in item.items() if k not in ("kind", "at")}}
                yield event_from_dict(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc) from exc

    async def action(self, selector: str, name: str) -> ActionResult:
        d = await self._call("action", selector, name)
        d = d if isinstance(d, dict) else {}
        push, row = d.get("push"), d.get("row")
        return ActionResult(name=name, target=selector,
                            push=push_from_dict(push, selector=selector) if isinstance(push, dict) else None,
                            row=row_from_dict(row) if isinstance(row, dict) else None, raw=d)

    async def replay_push(self, push_id: str) -> PushRow:
        d = await self._call("replay_push", push_id)
        push = d.get("push", d) if isinstance(d, dict) else {}
        return push_from_dict(push)


# ---------------------------------------------------------------------------------------------- the fake feed

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar")
PROVIDERS = ("fcm", "apns", "acrobits", "webhook")


def fake_rows(n: int, now: float) -> list[InstanceRow]:
    """``n`` deterministic instance rows around the wall-clock time ``now``."""
    rows = []
    for i in range(n):
        name = f"{NAMES[i % len(NAMES)]}{i:05d}"
        pbx = f"pbx{i % 3 + 1}.example.net"
        bucket = i % 10
        state = "proxied" if bucket < 6 else "active" if bucket < 8 else "inactive" if bucket == 8 else "off"
        reg_status, code, reason, failures = "idle", None, None, 0
        expires = refresh = backoff = None
        if state == "proxied":
            reg_status, code, reason = "registered", 200, "OK"
            expires = now + 60 + (i * 37) % 3540
            refresh = expires - 30
            if i % 47 == 5:
                reg_status, code, reason, failures = "unauthorized", 403, "Forbidden", 3
                expires, refresh, backoff = None, now + 20 + i % 40, now + 20 + i % 40
            elif i % 53 == 7:
                reg_status, code, reason, failures = "error", 503, "Service Unavailable", 1
                refresh = backoff = now + 5 + i % 10
        outcome = (None, "accepted", "accepted", "accepted", "rejected-transient", "accepted",
                   "rejected-permanent", "accepted")[i % 8]
        rows.append(InstanceRow(
            selector=f"s{i:06d}",
            aor=f"sip:{name}@{pbx}",
            user=name,
            registrar=f"sip:{pbx}:5061;transport=tls",
            state=state,
            reg_status=reg_status,
            last_code=code,
            last_reason=reason,
            expires_at=expires,
            next_refresh_at=refresh,
            failure_count=failures,
            backoff_until=backoff,
            push_provider=PROVIDERS[i % len(PROVIDERS)],
            push_unreachable=i % 97 == 13,
            last_push_outcome=outcome,
            last_push_at=None if outcome is None else now - 30 - (i * 131) % 7200,
            app_last_seen=now - (i * 17) % 3600,
        ))
    return rows


def _fake_sip(selector: str, row: InstanceRow, now: float) -> list[SipMessageRow]:
    aor = row.aor
    host = aor.split("@", 1)[-1]
    reg_call, inv_call = f"reg-{selector}@sipis", f"inv-{selector}@{host}"
    t0 = now - 95.0

    def msg(dt: float, direction: str, first: str, call_id: str, cseq: str, extra: str = "") -> SipMessageRow:
        method = first.split(" ", 1)[0] if not first.startswith("SIP/") else cseq.split()[-1]
        status = int(first.split()[1]) if first.startswith("SIP/") else None
        via = "Via: SIP/2.0/TLS 192.0.2.10:5061;branch=z9hG4bK" + f"{zlib.crc32((call_id + cseq).encode()):08x}"
        raw = (f"{first}\r\n{via}\r\nFrom: <{aor}>;tag=a1\r\nTo: <{aor}>\r\nCall-ID: {call_id}\r\n"
               f"CSeq: {cseq}\r\n{extra}Content-Length: 0\r\n\r\n")
        return SipMessageRow(at=t0 + dt, direction=direction, first_line=first, raw=raw, transport="TLS",
                             local="192.0.2.10:5061", remote="198.51.100.20:5061", call_id=call_id, cseq=cseq,
                             method=method, status=status)

    return [
        msg(0.000, "out", f"REGISTER sip:{host} SIP/2.0", reg_call, "1 REGISTER", "Expires: 3600\r\n"),
        msg(0.041, "in", "SIP/2.0 401 Unauthorized", reg_call, "1 REGISTER",
            'WWW-Authenticate: Digest realm="pbx", nonce="n1", algorithm=SHA-256\r\n'),
        msg(0.045, "out", f"REGISTER sip:{host} SIP/2.0", reg_call, "2 REGISTER",
            'Authorization: Digest username="***", response="***"\r\nExpires: 3600\r\n'),
        msg(0.090, "in", "SIP/2.0 200 OK", reg_call, "2 REGISTER", "Expires: 3600\r\n"),
        msg(60.000, "in", f"INVITE {aor} SIP/2.0", inv_call, "101 INVITE"),
        msg(60.002, "out", "SIP/2.0 100 Trying", inv_call, "101 INVITE"),
        msg(60.003, "out", "SIP/2.0 180 Ringing", inv_call, "101 INVITE",
            "X-Sipis-Push-Status: Alerting-Device\r\n"),
        msg(60.150, "out", "SIP/2.0 180 Ringing", inv_call, "101 INVITE",
            "X-Sipis-Push-Status: Push-Notification-Sent\r\n"),
        msg(63.800, "out", "SIP/2.0 302 Moved Temporarily", inv_call, "101 INVITE",
            f"Contact: <{aor};transport=tls>\r\n"),
        msg(63.840, "in", f"ACK {aor} SIP/2.0", inv_call, "101 ACK"),
    ]


class FakeFeed:
    """A deterministic :class:`Feed` for tests and demos: fixed rows, scripted events, recorded actions."""

    def __init__(self, *, instances: int = 40, now: float = 1_700_000_000.0, name: str = "alice",
                 role: str = "operator", refuse_actions: bool = False, rows: list[InstanceRow] | None = None) -> None:
        self.now = now
        self.operator = Operator(name, role)
        self.rows = rows if rows is not None else fake_rows(instances, now)
        self.refuse_actions = refuse_actions
        self.actions: list[tuple[str, str]] = []  # (selector or push id, action) that the "core" carried out
        self.requests: list[tuple[str, tuple[Any, ...]]] = []  # every call, in order
        self._queue: asyncio.Queue[EventRow] | None = None
        self._seq = 0
        self._summaries = 0
        self._push_seq = 0
        self.pbx_reachable = True

    # -------------------------------------------------------------- scripting

    @property
    def queue(self) -> asyncio.Queue[EventRow]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def emit(self, kind: str, selector: str | None = None, *, at: float | None = None, **data: Any) -> EventRow:
        """Put one event on the stream (and keep the fake's own rows in step)."""
        if kind not in RESYNC_KINDS:  # like the core: gap/overflow lines carry no seq of their own
            self._seq += 1
        event = EventRow(seq=0 if kind in RESYNC_KINDS else self._seq, at=self.now if at is None else at, kind=kind,
                         selector=selector, data=data)
        patch = row_patch(event)
        if selector and patch:
            self.rows = [replace(r, **patch) if r.selector == selector else r for r in self.rows]
        self.queue.put_nowait(event)
        return event

    def _row(self, selector: str) -> InstanceRow:
        for row in self.rows:
            if row.selector == selector:
                return row
        raise NotFound(f"no instance {selector}", status=404, code="not-found")

    def _log(self, name: str, *args: Any) -> None:
        self.requests.append((name, args))

    # -------------------------------------------------------------- the Feed protocol

    async def whoami(self) -> Operator:
        self._log("whoami")
        return self.operator

    async def summary(self) -> Summary:
        self._log("summary")
        self._summaries += 1
        k = self._summaries
        counts: dict[str, int] = {"active": 0, "inactive": 0, "proxied": 0, "off": 0}
        reg: dict[str, int] = {}
        for row in self.rows:
            counts[row.state] = counts.get(row.state, 0) + 1
            reg[row.reg_status] = reg.get(row.reg_status, 0) + 1
        return Summary(
            node="sipis-lab-1", version="0.1.0", started_at=self.now - 3 * 86400 - 4 * 3600 - 5 * 60,
            now=self.now, counts=counts, reg_status=reg, held_calls=2, calls_per_min=float((k * 7) % 13),
            outcomes={"redirected": 40 + k, "timeout": 3}, push_accepted=1000 + 10 * k,
            push_rejected=3 + (k * 5) % 7 // 3 + k // 4, push_transient=2 + k // 3,
            push_success_rate=0.994, push_p50_ms=84.0, push_p99_ms=412.0,
            pbx_reachable=self.pbx_reachable, pbx_error=None if self.pbx_reachable else "connect timeout",
            alarms=0 if self.pbx_reachable else 1,
        )

    async def instances(self) -> list[InstanceRow]:
        self._log("instances")
        return list(self.rows)

    async def instance_page(self, limit: int) -> InstancePage:
        self._log("instance_page", limit)
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.state] = counts.get(row.state, 0) + 1
        first = sorted(self.rows, key=lambda r: r.aor.lower())[:max(1, limit)]
        return InstancePage(total=len(self.rows), matched=len(self.rows), rows=first, counts=counts)

    async def instance(self, selector: str) -> InstanceDetail:
        self._log("instance", selector)
        row = self._row(selector)
        sip = _fake_sip(selector, row, self.now)
        t_invite = sip[4].at
        push = PushRow(push_id=f"p-{selector}-1", selector=selector, at=t_invite + 0.004, kind="call",
                       provider=row.push_provider or "fcm", call_id=sip[4].call_id, attempt=1,
                       outcome="accepted", provider_code=200, latency_ms=142.0,
                       stages={"invite_received": t_invite, "push_sent": t_invite + 0.004,
                               "provider_accepted": t_invite + 0.146, "app_active": t_invite + 3.7},
                       request_summary={"priority": "high", "type": "voip"})
        view = {
            "selector": selector, "state": row.state, "aor": row.aor, "username": row.user,
            "auth_username": row.user, "registrar": row.registrar, "display_name": row.user.title(),
            "instance_id": f"urn:uuid:00000000-0000-4000-8000-{int(selector[1:]):012d}", "reg_id": 1,
            "push": {"provider": row.push_provider, "app_id": "com.example.phone", "token": "f3a9…c01d",
                     "voip_token": None, "unreachable": row.push_unreachable},
            "registration": {"status": row.reg_status, "last_code": row.last_code,
                             "last_reason": row.last_reason, "expires_at": row.expires_at,
                             "next_refresh_at": row.next_refresh_at, "failure_count": row.failure_count,
                             "backoff_until": row.backoff_until, "flow": "tls:198.51.100.20:5061"},
            "app_contact": f"<{row.aor};transport=tls>",
        }
        timeline = [
            EventRow(1, sip[0].at - 1, "instance.app", selector, {"reported": "inactive"}),
            EventRow(2, sip[3].at, "registration", selector, {"result": "registered", "code": 200,
                                                               "expires": 3600}),
            EventRow(3, sip[3].at, "instance.state", selector, {"state": "proxied", "previous": "active"}),
            EventRow(4, t_invite, "call", selector, {"call_id": sip[4].call_id, "stage": "Alerting-Device"}),
            EventRow(5, push.stages["provider_accepted"], "push", selector, {"push_id": push.push_id,
                                                                    "outcome": "accepted"}),
            EventRow(6, t_invite + 3.7, "instance.app", selector, {"reported": "active"}),
        ]
        return InstanceDetail(row=row, view=view, timeline=timeline, pushes=[push], sip=sip)

    async def calls(self) -> CallsSnapshot:
        self._log("calls")
        held = [
            CallRow(call_id=f"inv-{row.selector}@pbx", push_id=f"p-{row.selector}-9", selector=row.selector,
                    caller=f"sip:+4930123456{n}@pbx1.example.net", stage=stage, received_at=self.now - 8 - n,
                    t1_deadline=self.now + 112 - 40 * n, t2_deadline=self.now + 232 - 40 * n,
                    push_outcome=outcome)
            for n, (row, stage, outcome) in enumerate(zip(
                self.rows[:2], ("Push-Notification-Sent", "Alerting-Device"), ("accepted", "pending"),
                strict=False))
        ]
        recent = [CallRow(call_id="inv-old@pbx", push_id="p-old", selector=self.rows[0].selector if self.rows
                          else "", caller="sip:+493099@pbx1.example.net", stage="Ended",
                          received_at=self.now - 600, outcome="redirected", final_status=302,
                          push_outcome="accepted")]
        return CallsSnapshot(held=held, recent=recent)

    async def call_trace(self, call_id: str) -> CallTrace:
        self._log("call_trace", call_id)
        selector = call_id.split("-", 1)[-1].split("@", 1)[0]
        detail = await self.instance(selector if any(r.selector == selector for r in self.rows)
                                     else self.rows[0].selector)
        return CallTrace(call_id=call_id, messages=[m for m in detail.sip if m.method in ("INVITE", "ACK")
                                                    or (m.cseq or "").endswith("INVITE")],
                         pushes=detail.pushes, selector=detail.row.selector)

    async def call_trace_text(self, call_id: str) -> str:
        self._log("call_trace_text", call_id)
        trace = await self.call_trace(call_id)
        lines = [f"call {call_id}"] + [f"{m.at:.3f} {m.direction} {m.first_line}" for m in trace.messages]
        return "\n".join(lines) + "\n"

    async def call_trace_pcap(self, call_id: str) -> bytes:
        self._log("call_trace_pcap", call_id)
        # a valid, empty libpcap file (magic, v2.4, snaplen 65535, linktype 101/RAW)
        return bytes.fromhex("d4c3b2a1020004000000000000000000ffff000065000000")

    async def pushes(self, limit: int = 200, selector: str | None = None) -> list[PushRow]:
        self._log("pushes", limit, selector)
        rows = [r for r in self.rows if r.last_push_outcome and (selector is None or r.selector == selector)]
        pushes = [PushRow(push_id=f"p-{r.selector}-1", selector=r.selector, at=r.last_push_at or self.now,
                          kind="call" if i % 3 else "test", provider=r.push_provider or "",
                          attempt=1 + (i % 4 == 3), outcome=r.last_push_outcome or "pending",
                          provider_code=200 if r.last_push_outcome == "accepted" else 410 if
                          r.last_push_outcome == "rejected-permanent" else 503,
                          latency_ms=60.0 + (i * 37) % 300)
                  for i, r in enumerate(rows)]
        pushes.sort(key=lambda p: p.at)
        return pushes[-limit:]

    async def audit(self, limit: int = 200) -> list[AuditRow]:
        self._log("audit", limit)
        return [AuditRow(at=self.now - 3600, operator="root", role="admin", action="take_over",
                         target=self.rows[0].selector if self.rows else None, outcome="ok")][:limit]

    async def events(self, since: int | None = None) -> AsyncIterator[EventRow]:
        self._log("events", since)
        while True:
            yield await self.queue.get()

    def _require(self, needed: str, action: str, target: str) -> None:
        if self.refuse_actions or not role_allows(self.operator.role, needed):
            raise Forbidden(f"{action} needs the {needed} role; {self.operator.name} is {self.operator.role}",
                            status=403, code="forbidden")

    async def action(self, selector: str, name: str) -> ActionResult:
        self._log("action", selector, name)
        if name not in ACTIONS:
            raise FeedError(f"unknown action {name}", status=404, code="not-found")
        self._require(ACTIONS[name][1], name, selector)
        self._row(selector)
        self.actions.append((selector, name))
        push = None
        if name == "test-push":
            self._push_seq += 1
            push = PushRow(push_id=f"test-{self._push_seq}", selector=selector, at=self.now, kind="test",
                           provider="fcm", attempt=1, outcome="accepted", provider_code=200, latency_ms=90.0)
        return ActionResult(name=name, target=selector, push=push)

    async def replay_push(self, push_id: str) -> PushRow:
        self._log("replay_push", push_id)
        self._require(REPLAY_ROLE, "replay", push_id)
        self.actions.append((push_id, "replay"))
        self._push_seq += 1
        return PushRow(push_id=f"replay-{self._push_seq}", selector="", at=self.now, kind="call",
                       provider="fcm", attempt=1, outcome="accepted", replay_of=push_id)
