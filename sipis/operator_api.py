"""The operator API: what the console (one process per operator) and automation use to see and steer
the core. The contract is ``docs/operator-api.md``; this module serves it.

* :func:`create_operator_app` builds the FastAPI app from an :class:`OperatorContext` (the parts of
  the core it reads and the operations it calls).
* :class:`OperatorServer` runs it with uvicorn inside the core loop: on the unix socket (mode 0600,
  set before the socket accepts anything) and optionally on TCP — plain HTTP on a loopback address,
  TLS with the app API's certificate on any other address.
* Authentication: a bearer token from ``[[operator.tokens]]`` (both listeners) or a session token
  minted by :class:`OperatorSessions` (unix socket only — the SSH server mints one per console
  session). On the unix socket a request without a token is the local administrator, named by the
  ``X-Operator`` header. Roles are enforced here and in :class:`~sipis.operations.Operations`.
* :class:`EventRing` keeps the last events for ``/v1/events?since=`` and the instance timeline;
  :class:`InstanceIndex` keeps lower-case search keys, the aor order, per-state counts and each
  row's JSON from the bus, so the instance list and the summary stay cheap with 100k instances;
  :class:`PbxHealth` tracks whether the PBX answers.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import ipaddress
import json
import logging
import marshal
import os
import re
import secrets
import socket
import ssl
import stat
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import metadata
from operator import attrgetter
from pathlib import Path
from typing import Any, cast

import fastapi.routing
import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from contract.codec import decode_payload, encode_event, payload_data, to_json
from contract.documents import PushRecord as PushPayload
from contract.events import InstanceDeleted, RegistrationResult
from sipis.api.server import EmbeddedServer, bind_tcp
from sipis.calls import CallManager
from sipis.clock import Clock
from sipis.config import Config, OperatorToken
from sipis.events import Event, EventBus, EventQueue
from sipis.instance import AppState, Instance, RegStatus
from sipis.operations import ROLE_RANK, Conflict, Forbidden, NotFound, Operations, Operator
from sipis.push.delivery import PushDelivery, PushTrace
from sipis.service import InstanceService
from sipis.tls_certs import ensure_self_signed
from sipis.trace import TraceRecorder
from storage.records import AuditRecord, PushRecord
from storage.repositories import Stores
from storage.writer import WriterStatus

log = logging.getLogger(__name__)

#: The scope key telling the app which listener a request came in on ("unix" or "tcp").
LISTENER_KEY = "sipis.listener"
HEARTBEAT_INTERVAL = 15.0
EVENT_RING = 10_000
STREAM_QUEUE = 10_000
#: At most this many events go into one chunk of the stream.
STREAM_BATCH = 500
#: Instance pages longer than this are sent in slices of about SLICE_SECONDS of work each (see
#: ``instances``), the loop served in between; the rows are checked against the clock every
#: SLICE_CHECK rows.
STREAM_ROWS_OVER = 200
SLICE_SECONDS = 0.0005
SLICE_CHECK = 32
TIMELINE_LIMIT = 200
DETAIL_PUSHES = 50
PUSH_STATS_WINDOW = 1000
ALARM_WINDOW = 3600.0
SUMMARY_CACHE = 0.5
START_TIMEOUT = 10.0
GRACEFUL_TIMEOUT = 5
STATES = tuple(state.value for state in AppState)
_OPERATOR_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 422: "validation_error", 500: "internal_error"}


def _version() -> str:
    try:
        return metadata.version("sipis-console")
    except metadata.PackageNotFoundError:
        return "0+unknown"


VERSION = _version()


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


# --------------------------------------------------------------------------- sessions


class OperatorSessions:
    """Per-session bearer tokens bound to (name, role), in memory only (a restart ends them)."""

    def __init__(self) -> None:
        self._by_hash: dict[str, Operator] = {}

    def mint(self, name: str, role: str) -> str:
        if role not in ROLE_RANK:
            raise ValueError(f"unknown role {role!r}")
        token = secrets.token_urlsafe(32)
        self._by_hash[_token_hash(token)] = Operator(name, role)
        return token

    def revoke(self, token: str) -> bool:
        return self._by_hash.pop(_token_hash(token), None) is not None

    def revoke_all(self, name: str) -> int:
        gone = [digest for digest, operator in self._by_hash.items() if operator.name == name]
        for digest in gone:
            del self._by_hash[digest]
        return len(gone)

    def lookup(self, token: str) -> Operator | None:
        return self._by_hash.get(_token_hash(token))

    def __len__(self) -> int:
        return len(self._by_hash)


# --------------------------------------------------------------------------- bus subscribers


#: How the ring keeps an event: ``(seq, at, kind, selector, data)`` with ``data`` marshalled to
#: bytes. A tuple of numbers, strings and bytes is untracked by the cyclic garbage collector after
#: the first collection it survives, so the ring's 10,000 events (with their nested dicts: push
#: traces, request summaries) add nothing to the collector's pauses; an :class:`Event` is rebuilt
#: when somebody reads. Data marshal cannot write (an enum, an object) is kept as it is.
RingEntry = tuple[int, float, str, "str | None", "bytes | dict[str, Any]"]


def _pack(event: Event) -> RingEntry:
    data = payload_data(event.payload)
    packed: bytes | dict[str, Any]
    try:
        packed = marshal.dumps(data)
    except ValueError:
        packed = data
    return (event.seq, event.at, str(event.kind), event.selector, packed)


def _unpack(entry: RingEntry) -> Event:
    seq, at, kind, selector, packed = entry
    data = marshal.loads(packed) if isinstance(packed, bytes) else packed
    return Event(seq, at, selector, decode_payload(kind, data, selector))


class EventRing:
    """The last ``size`` events (for ``since`` replay and timelines), recent audit rows and alarms.

    Stored as :data:`RingEntry` tuples (out of the garbage collector's way); every read returns
    fresh :class:`Event` objects."""

    def __init__(self, bus: EventBus, size: int = EVENT_RING, audit_size: int = 1000) -> None:
        self.entries: deque[RingEntry] = deque(maxlen=size)
        self._audit: deque[RingEntry] = deque(maxlen=audit_size)
        self.alarm_times: deque[float] = deque(maxlen=size)
        self._unsubscribe = bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        entry = _pack(event)
        self.entries.append(entry)
        if event.kind == "audit":
            self._audit.append(entry)
        elif event.kind == "alarm":
            self.alarm_times.append(event.at)

    def close(self) -> None:
        self._unsubscribe()

    @property
    def events(self) -> list[Event]:
        """Every event in the ring, oldest first."""
        return [_unpack(entry) for entry in self.entries]

    @property
    def audit(self) -> list[Event]:
        """The recent audit events, oldest first."""
        return [_unpack(entry) for entry in self._audit]

    @property
    def last_seq(self) -> int:
        return self.entries[-1][0] if self.entries else 0

    @property
    def first_seq(self) -> int | None:
        return self.entries[0][0] if self.entries else None

    def since(self, seq: int) -> tuple[list[Event], bool]:
        """Events newer than ``seq``, oldest first, and whether some newer ones already left the ring."""
        newer: list[RingEntry] = []
        for entry in reversed(self.entries):
            if entry[0] <= seq:
                return [_unpack(e) for e in reversed(newer)], False
            newer.append(entry)
        newer.reverse()
        return [_unpack(e) for e in newer], bool(newer) and newer[0][0] > seq + 1

    def for_selector(self, selector: str, limit: int) -> list[Event]:
        found: list[RingEntry] = []
        for entry in reversed(self.entries):
            if entry[3] == selector:
                found.append(entry)
                if len(found) >= limit:
                    break
        return [_unpack(e) for e in reversed(found)]

    def alarms_since(self, since: float) -> int:
        count = 0
        for at in reversed(self.alarm_times):
            if at < since:
                break
            count += 1
        return count


class PbxHealth:
    """Is the PBX answering? Judged by the last registration exchange of any instance: an answer
    (any final response but 408/5xx) means reachable; a timeout, transport failure or 5xx means not,
    and its text is ``last_error`` until the next answer. No registration yet counts as reachable."""

    def __init__(self, bus: EventBus) -> None:
        self.reachable = True
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_answer_at: float | None = None
        self._unsubscribe = bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        result = event.payload
        if not isinstance(result, RegistrationResult):
            return
        code = result.code
        if code == 408 or code >= 500:
            self.reachable = False
            detail = result.detail
            self.last_error = f"{code} {result.reason or ''}".strip() + (f": {detail}" if detail else "")
            self.last_error_at = event.at
        else:
            self.reachable = True
            self.last_error = None
            self.last_answer_at = event.at

    def close(self) -> None:
        self._unsubscribe()


class _Entry:
    """One instance in the index: its lower-case search keys, the state and registration status it
    is counted under, its cached list row (JSON) and the instance itself."""

    __slots__ = ("aor", "haystack", "instance", "key", "rank", "registrar", "row_json", "row_source", "selector",
                 "source", "state", "status", "user")

    def __init__(self, instance: Instance, registrar: str | None) -> None:
        account = instance.account
        self.instance = instance
        self.selector = instance.selector
        #: what the search keys were made from: a change re-indexes the instance
        self.source = (account.aor, account.username, registrar)
        self.aor = account.aor.lower()
        self.user = account.username.lower()
        self.registrar = (registrar or "").lower()
        # selector, aor, user and registrar, NUL separated: one substring test per instance
        self.haystack = "\0".join((self.selector.lower(), self.aor, self.user, self.registrar))
        #: the aor order's key: unique (ties of the aor in selector order)
        self.key = (self.aor, self.selector)
        self.rank = 0  # position in the aor order: the tie-breaker of every other sort
        self.state: str = instance.state._value_
        self.status: str = instance.registration.status._value_
        self.row_json: bytes | None = None
        self.row_source: tuple[Any, ...] | None = None


#: Sort fields whose keys change only with enrolment: sorted once, cached until the next change.
STATIC_SORTS = ("aor", "selector", "user", "registrar")

#: Sort fields read from the live instance, sorted per request (stable on top of the aor order;
#: empty values last). Getters return the raw value, None when empty; C-level ``attrgetter``s, and
#: enums read through ``_value_`` (a plain str sorts and hashes in C, an enum member does not).
#: ``last_push_*`` come from the index itself (see :meth:`InstanceIndex.query`).
DYNAMIC_SORTS: dict[str, Callable[[_Entry], Any] | None] = {
    "state": attrgetter("instance.state._value_"),
    "reg_status": attrgetter("instance.registration.status._value_"),
    "last_code": attrgetter("instance.registration.last_code"),
    "last_reason": attrgetter("instance.registration.last_reason"),
    "expires_at": attrgetter("instance.registration.expires_at"),
    "next_refresh_at": attrgetter("instance.registration.next_refresh_at"),
    "failure_count": attrgetter("instance.registration.failure_count"),
    "backoff_until": attrgetter("instance.registration.backoff_until"),
    "push_provider": attrgetter("instance.push.provider"),
    "push_unreachable": attrgetter("instance.push.unreachable"),
    "app_last_seen": attrgetter("instance.app_last_seen"),
    "last_push_outcome": None,
    "last_push_at": None,
}
#: Live fields whose values rarely tie (times): sorted without the aor tie-breaker.
CONTINUOUS_SORTS = frozenset({"expires_at", "next_refresh_at", "backoff_until", "app_last_seen", "last_push_at"})
SORTS = (*STATIC_SORTS, *DYNAMIC_SORTS)
_STATE_OF = {state.value: state for state in AppState}
REG_STATUSES = tuple(status.value for status in RegStatus)
#: Everything of an instance a list row shows (but the last push, kept by the index): a cached row
#: is reused while this tuple is equal — exact whatever changed the instance, announced or not.
_ROW_SOURCE = attrgetter(
    "account.aor", "account.username", "account.registrar", "state._value_", "registration.status._value_",
    "registration.last_code", "registration.last_reason", "registration.expires_at",
    "registration.next_refresh_at", "registration.failure_count", "registration.backoff_until", "push.provider",
    "push.unreachable", "app_last_seen")
_KEY = attrgetter("key")
#: Announced changes are applied when somebody reads, or once this many selectors wait: the work
#: per read stays small however long nobody looked.
DIRTY_LIMIT = 256


class InstanceIndex:
    """Search keys, per-state counts and sorted orders for the instance list, kept in step with the bus.

    Every event about an instance marks it; marked instances are looked at again on the next read
    (or when :data:`DIRTY_LIMIT` are waiting): new, gone or re-keyed ones move in the aor order
    (a binary search and one list insert or delete), and the per-state and per-status counts are
    adjusted. Instances that appear without an event (a restore) are noticed by count and indexed
    in one pass. Costs with 100k instances: the first page or the whole list in aor order is a
    slice of the kept order, the counts are kept; a search is one substring test per instance; a
    live sort field is one sort of the matches per request; other static sorts are cached until an
    instance comes or goes or changes its account."""

    def __init__(self, service: InstanceService, bus: EventBus, default_registrar: str | None = None) -> None:
        self.service = service
        self.default_registrar = default_registrar
        self.entries: dict[str, _Entry] = {}
        #: selector → (outcome, wall time) of its latest push
        self.last_push: dict[str, tuple[str, float]] = {}
        #: instances per state and per registration status (as of the last :meth:`sync`)
        self.state_counts: dict[str, int] = dict.fromkeys(STATES, 0)
        self.status_counts: dict[str, int] = dict.fromkeys(REG_STATUSES, 0)
        self._dirty: set[str] = set()
        self._version = 0  # bumped when an instance comes, goes or is re-keyed
        self._ranked = -1  # the version the entries' ``rank`` belong to
        #: every entry in aor order (``_Entry.key``); replaced, not changed, while a reader holds it
        self._aor: list[_Entry] = []
        self._aor_lent = False
        self._sorted: dict[str, tuple[int, list[_Entry]]] = {}
        self._unsubscribe = bus.subscribe(self._on_event)

    def close(self) -> None:
        self._unsubscribe()

    def _on_event(self, event: Event) -> None:
        selector = event.selector
        if selector is None:
            return
        payload = event.payload
        if isinstance(payload, PushPayload):
            self.last_push[selector] = (payload.outcome, float(payload.stages.get("push_sent", event.at)))
        elif isinstance(payload, InstanceDeleted):
            self.last_push.pop(selector, None)
        dirty = self._dirty
        dirty.add(selector)
        if len(dirty) >= DIRTY_LIMIT:
            self._apply_dirty()

    def registrar_of(self, instance: Instance) -> str | None:
        return instance.account.registrar or self.default_registrar

    def sync(self) -> None:
        """Bring the index up to date: announced changes, then restores (noticed by count)."""
        if self._dirty:
            self._apply_dirty()
        if len(self.entries) != len(self.service.instances):
            self._rebuild()

    def _apply_dirty(self) -> None:
        instances, entries = self.service.instances, self.entries
        dirty, self._dirty = self._dirty, set()
        for selector in dirty:
            instance = instances.get(selector)
            entry = entries.get(selector)
            if instance is None:
                if entry is not None:
                    self._remove(entry)
                continue
            if entry is None:
                self._add(_Entry(instance, self.registrar_of(instance)))
                continue
            account = instance.account
            if (entry.instance is not instance or entry.source[0] != account.aor
                    or entry.source[1] != account.username or entry.source[2] != self.registrar_of(instance)):
                self._remove(entry)
                self._add(_Entry(instance, self.registrar_of(instance)))
                continue
            state, status = instance.state._value_, instance.registration.status._value_
            if state != entry.state:
                self.state_counts[entry.state] -= 1
                self.state_counts[state] += 1
                entry.state = state
            if status != entry.status:
                self.status_counts[entry.status] -= 1
                self.status_counts[status] += 1
                entry.status = status

    def _own_aor(self) -> list[_Entry]:
        """The aor order, copied first when a reader still holds it."""
        if self._aor_lent:
            self._aor = list(self._aor)
            self._aor_lent = False
        return self._aor

    def _add(self, entry: _Entry) -> None:
        self.entries[entry.selector] = entry
        self.state_counts[entry.state] += 1
        self.status_counts[entry.status] += 1
        bisect.insort(self._own_aor(), entry, key=_KEY)
        self._version += 1

    def _remove(self, entry: _Entry) -> None:
        del self.entries[entry.selector]
        self.state_counts[entry.state] -= 1
        self.status_counts[entry.status] -= 1
        order = self._own_aor()
        at = bisect.bisect_left(order, entry.key, key=_KEY)
        if at < len(order) and order[at] is entry:
            del order[at]
        else:  # cannot happen: keys are unique and never change in place
            order.remove(entry)
        self._version += 1

    def _rebuild(self) -> None:
        """Index every instance the service holds (a restore: instances that came without events)."""
        instances, entries = self.service.instances, self.entries
        for selector, instance in instances.items():
            entry = entries.get(selector)
            if entry is None or entry.instance is not instance:
                entries[selector] = _Entry(instance, self.registrar_of(instance))
        for selector in [s for s in entries if s not in instances]:
            del entries[selector]
        self.state_counts = dict.fromkeys(STATES, 0)
        self.status_counts = dict.fromkeys(REG_STATUSES, 0)
        for entry in entries.values():
            self.state_counts[entry.state] += 1
            self.status_counts[entry.status] += 1
        self._aor = sorted(entries.values(), key=_KEY)
        self._aor_lent = False
        self._version += 1

    def ordered(self, sort: str) -> list[_Entry]:
        """Every entry in ascending ``sort`` order for a static sort field (ties in aor order); the
        caller must not change the list."""
        if sort == "aor":
            return self._aor
        cached = self._sorted.get(sort)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        entries = sorted(self._aor, key=attrgetter(sort))
        self._sorted[sort] = (self._version, entries)
        return entries

    def _rank(self) -> None:
        """Set every entry's ``rank`` (its position in the aor order) if the order changed."""
        if self._ranked != self._version:
            for rank, entry in enumerate(self._aor):
                entry.rank = rank
            self._ranked = self._version

    def query(self, *, q: str = "", state: str = "", sort: str = "aor", desc: bool = False,
              offset: int = 0, limit: int = 200) -> tuple[int, int, dict[str, int], list[Instance]]:
        """(total, matched, counts by state among the ``q`` matches, the page of instances)."""
        total, matched, counts, page = self.query_entries(q=q, state=state, sort=sort, desc=desc, offset=offset,
                                                          limit=limit)
        return total, matched, counts, [e.instance for e in page]

    def query_entries(self, *, q: str = "", state: str = "", sort: str = "aor", desc: bool = False,
                      offset: int = 0, limit: int = 200) -> tuple[int, int, dict[str, int], list[_Entry]]:
        """:meth:`query` with the index's entries as the page (do not change it).

        Without ``q`` and ``state`` a static sort is a slice of a kept order and the counts are the
        kept ones. Otherwise filtering and reading live values walk the entries in insertion order —
        the order they sit in memory, several times faster than walking them in a sorted order with
        100k instances; only the requested page is taken from the sorted result."""
        self.sync()
        end = None if limit == 0 else offset + limit
        total = len(self.entries)
        wanted = _STATE_OF.get(state)
        if not q and wanted is None and sort in STATIC_SORTS:
            counts = dict(self.state_counts)
            ordered = self.ordered(sort)
            if desc:
                ordered = ordered[::-1]
            elif offset == 0 and end is None:  # the whole kept order, not a copy
                if sort == "aor":
                    self._aor_lent = True  # copied before it changes (the others are replaced)
                return total, total, counts, ordered
            return total, total, counts, ordered[offset:end]
        everything = list(self.entries.values())
        needle = q.lower()
        matches = [e for e in everything if needle in e.haystack] if needle else everything
        if needle:
            counts = dict.fromkeys(STATES, 0)
            counts.update(Counter([e.instance.state._value_ for e in matches]))
        else:
            counts = dict(self.state_counts)
        if wanted is not None:
            matches = [e for e in matches if e.instance.state is wanted]
        if sort in DYNAMIC_SORTS:
            self._rank()
            order = self._dynamic_order(sort, matches, desc, len(everything))
            page = [matches[i] for i in order[offset:end]]
        else:
            if sort == "aor":
                matches.sort(key=_KEY)
            else:
                self._rank()
                matches.sort(key=attrgetter(sort, "rank"))
            if desc:
                matches.reverse()
            page = matches[offset:end]
        return total, len(matches), counts, page

    def _dynamic_order(self, sort: str, matches: list[_Entry], desc: bool, total: int) -> list[int]:
        """Positions of ``matches`` sorted by a live field, empty values last. Times (continuous)
        are sorted directly; fields with few distinct values get ties in aor order through one
        integer key per match: (index of the value) * total + aor rank."""
        values = self._values(sort, matches)
        if sort in CONTINUOUS_SORTS:
            order = [i for i, v in enumerate(values) if v is not None]
            order.sort(key=values.__getitem__, reverse=desc)
            missing = [i for i, v in enumerate(values) if v is None]
            missing.sort(key=lambda i: matches[i].rank)
            return order + missing
        distinct = sorted({v for v in values if v is not None}, reverse=desc)
        position: dict[Any, int] = {value: k for k, value in enumerate(distinct)}
        position[None] = len(distinct)
        keys = [position[v] * total + e.rank for v, e in zip(values, matches, strict=True)]
        return sorted(range(len(matches)), key=keys.__getitem__)

    def _values(self, sort: str, entries: list[_Entry]) -> list[Any]:
        get = DYNAMIC_SORTS[sort]
        if get is not None:
            return list(map(get, entries))
        last = self.last_push
        which = 0 if sort == "last_push_outcome" else 1
        return [(last.get(e.selector) or (None, None))[which] for e in entries]

    def row(self, instance: Instance) -> dict[str, Any]:
        reg, push = instance.registration, instance.push
        last = self.last_push.get(instance.selector)
        return {
            "selector": instance.selector, "aor": instance.account.aor, "user": instance.account.username,
            "registrar": instance.account.registrar or self.default_registrar, "state": str(instance.state),
            "reg_status": str(reg.status), "last_code": reg.last_code, "last_reason": reg.last_reason,
            "expires_at": reg.expires_at, "next_refresh_at": reg.next_refresh_at,
            "failure_count": reg.failure_count, "backoff_until": reg.backoff_until,
            "push_provider": push.provider, "push_unreachable": push.unreachable,
            "last_push_outcome": last[0] if last else None, "last_push_at": last[1] if last else None,
            "app_last_seen": instance.app_last_seen,
        }

    def row_json(self, entry: _Entry) -> bytes:
        """:meth:`row` of the entry's instance as compact JSON, reused while nothing in it changed."""
        source = (_ROW_SOURCE(entry.instance), self.last_push.get(entry.selector))
        if entry.row_json is None or entry.row_source != source:
            entry.row_json = json.dumps(self.row(entry.instance), separators=(",", ":"), default=str).encode()
            entry.row_source = source
        return entry.row_json



# --------------------------------------------------------------------------- the context


@dataclass(eq=False)
class OperatorContext:
    """What the operator API reads and calls. The core builds one; tests build one from a small world."""

    service: InstanceService
    calls: CallManager
    delivery: PushDelivery
    operations: Operations
    bus: EventBus
    clock: Clock
    trace: TraceRecorder
    sessions: OperatorSessions = field(default_factory=OperatorSessions)
    tokens: tuple[OperatorToken, ...] = ()
    stores: Stores | None = None
    writer_status: Callable[[], WriterStatus] | None = None
    node: str = ""
    version: str = VERSION
    started_at: float = 0.0
    default_registrar: str | None = None
    heartbeat: float = HEARTBEAT_INTERVAL
    ring_size: int = EVENT_RING
    #: no longer used: the summary's counts are kept from the bus, always fresh (kept for callers)
    summary_ttl: float = SUMMARY_CACHE

    def __post_init__(self) -> None:
        self.ring = EventRing(self.bus, self.ring_size)
        self.index = InstanceIndex(self.service, self.bus, self.default_registrar)
        self.pbx = PbxHealth(self.bus)
        self.token_operators = {_token_hash(t.token): Operator(t.name, t.role) for t in self.tokens}
        self.streams: set[EventQueue] = set()

    def close_streams(self) -> None:
        """End every open event stream (server shutdown)."""
        for queue in list(self.streams):
            _wake_stream(queue)

    def close(self) -> None:
        self.close_streams()
        self.ring.close()
        self.index.close()
        self.pbx.close()

    def authenticate(self, token: str, listener: str) -> Operator | None:
        operator = self.token_operators.get(_token_hash(token))
        if operator is None and listener == "unix":
            operator = self.sessions.lookup(token)
        return operator

    def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Instances per state and per registration status: kept by the index from the bus."""
        index = self.index
        index.sync()
        return dict(index.state_counts), dict(index.status_counts)


def _wake_stream(queue: EventQueue) -> None:
    queue.close_stream()


# --------------------------------------------------------------------------- views


def push_view(trace: PushTrace) -> dict[str, Any]:
    return cast(dict[str, Any], to_json(trace.record()))


def push_record_view(record: PushRecord) -> dict[str, Any]:
    return {"selector": record.selector, "push_id": record.push_id, "kind": record.kind,
            "provider": record.provider, "call_id": record.call_id, "attempt": record.attempt,
            "outcome": record.outcome, "provider_code": record.provider_code, "provider_reason": None,
            "latency_ms": record.latency_ms, "error": record.error, "replay_of": record.replay_of,
            "stages": dict(record.stages), "request_summary": dict(record.request_summary)}


def audit_event_view(event: Event) -> dict[str, Any]:
    return {**payload_data(event.payload), "at": event.at}


def audit_record_view(record: AuditRecord) -> dict[str, Any]:
    return {"id": record.id, "at": record.at, "operator": record.operator, "role": record.role,
            "action": record.action, "target": record.target, "outcome": record.outcome,
            "detail": dict(record.detail)}


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return round(sorted_values[index], 1)


def push_stats(delivery: PushDelivery, window: int = PUSH_STATS_WINDOW) -> dict[str, Any]:
    """Outcomes and latency of the last ``window`` finished pushes (pending ones do not count)."""
    accepted = rejected = transient = 0
    latencies: list[float] = []
    for trace in reversed(delivery.traces.values()):
        verdict = trace.verdict
        if verdict == "pending":
            continue
        if verdict == "accepted":
            accepted += 1
        elif verdict == "rejected-permanent":
            rejected += 1
        else:
            transient += 1
        if trace.latency_ms is not None:
            latencies.append(trace.latency_ms)
        if accepted + rejected + transient >= window:
            break
    finished = accepted + rejected + transient
    latencies.sort()
    return {"accepted": accepted, "rejected": rejected, "transient": transient,
            "success_rate": round(accepted / finished, 4) if finished else None,
            "latency_p50_ms": _percentile(latencies, 0.5), "latency_p99_ms": _percentile(latencies, 0.99)}


# --------------------------------------------------------------------------- errors


class OperatorApiError(Exception):
    def __init__(self, status: int, detail: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or _STATUS_CODES.get(status, "error")
        self.headers = headers


def _error(status: int, detail: str, code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code or _STATUS_CODES.get(status, "error"), "detail": detail},
                        status_code=status, headers=headers)


async def _on_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, OperatorApiError)
    return _error(exc.status, exc.detail, exc.code, exc.headers)


async def _on_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for error in list(exc.errors())[:10]:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{loc}: {str(error.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return _error(422, "; ".join(parts) or "invalid request")


async def _on_http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    return _error(exc.status_code, detail, headers=dict(exc.headers) if exc.headers else None)


async def _on_forbidden(_: Request, exc: Exception) -> Response:
    return _error(403, str(exc), "forbidden")


async def _on_not_found(_: Request, exc: Exception) -> Response:
    return _error(404, f"no such item: {exc}", "not_found")


async def _on_conflict(_: Request, exc: Exception) -> Response:
    return _error(409, str(exc), "conflict")


# --------------------------------------------------------------------------- the app


def listener_app(app: ASGIApp, listener: str) -> ASGIApp:
    """Wrap ``app`` so every request carries the listener it came in on (``unix`` or ``tcp``)."""

    async def tagged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, LISTENER_KEY: listener}
        await app(scope, receive, send)

    return tagged


def _json_line(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), default=str) + "\n"


def create_operator_app(ctx: OperatorContext) -> FastAPI:
    app = FastAPI(title="SIPIS operator API", version="1", docs_url=None, redoc_url=None,
                  description="See docs/operator-api.md")
    app.add_exception_handler(OperatorApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Forbidden, _on_forbidden)
    app.add_exception_handler(NotFound, _on_not_found)
    app.add_exception_handler(Conflict, _on_conflict)
    ops = ctx.operations

    async def operator(request: Request) -> Operator:
        listener = str(request.scope.get(LISTENER_KEY, "tcp"))
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise OperatorApiError(401, "malformed Authorization header; use Bearer <token>",
                                       headers={"WWW-Authenticate": 'Bearer realm="sipis-operator"'})
            found = ctx.authenticate(token, listener)
            if found is None:
                raise OperatorApiError(401, "token not valid", headers={
                    "WWW-Authenticate": 'Bearer realm="sipis-operator", error="invalid_token"'})
            return found
        if listener == "unix":
            name = request.headers.get("x-operator", "local").strip()
            return Operator(name if _OPERATOR_NAME.fullmatch(name) else "local", "admin")
        raise OperatorApiError(401, "Authorization: Bearer <token> required",
                               headers={"WWW-Authenticate": 'Bearer realm="sipis-operator"'})

    async def viewer(who: Operator = Depends(operator)) -> Operator:
        if not who.may("viewer"):
            raise Forbidden(f"{who.name} has no role that may read")
        return who

    def instance_or_404(selector: str) -> Instance:
        instance = ctx.service.get(selector)
        if instance is None:
            raise OperatorApiError(404, f"no instance {selector}")
        return instance

    # ------------------------------------------------------------------ reads

    @app.get("/v1/whoami")
    async def whoami(who: Operator = Depends(operator)) -> dict[str, Any]:
        return {"name": who.name, "role": who.role}

    @app.get("/v1/summary")
    async def summary(_: Operator = Depends(viewer)) -> dict[str, Any]:
        counts, statuses = ctx.state_counts()
        now = ctx.clock.wall()
        calls = ctx.calls
        minute_ago = now - 60.0
        calls_per_min = sum(1 for c in calls.recent if c.received_at >= minute_ago)
        calls_per_min += sum(1 for c in calls.held.values() if c.received_at >= minute_ago)
        writer = ctx.writer_status() if ctx.writer_status is not None else None
        return {
            "node": ctx.node, "version": ctx.version, "started_at": ctx.started_at, "now": now,
            "counts": counts, "reg_status": statuses, "held_calls": len(calls.held),
            "calls_per_min": calls_per_min, "outcomes": dict(calls.outcomes), "push": push_stats(ctx.delivery),
            "pbx": {"reachable": ctx.pbx.reachable, "last_error": ctx.pbx.last_error},
            "writer": {"pending": writer.pending if writer else 0, "last_error": writer.last_error if writer else None},
            "alarms": ctx.ring.alarms_since(now - ALARM_WINDOW),
        }

    @app.get("/v1/instances")
    async def instances(
        _: Operator = Depends(viewer),
        offset: int = Query(0, ge=0),
        limit: int = Query(200, ge=0, le=1_000_000),
        q: str = Query("", max_length=200),
        state: str = Query("", pattern="^(|active|inactive|proxied|off)$"),
        sort: str = Query("aor"),
        desc: bool = Query(False),
    ) -> Response:
        if sort not in SORTS:
            raise OperatorApiError(422, f"sort: one of {', '.join(SORTS)}")
        index = ctx.index
        total, matched, counts, page = index.query_entries(q=q, state=state, sort=sort, desc=desc, offset=offset,
                                                           limit=limit)
        row_json = index.row_json
        head = json.dumps({"total": total, "matched": matched, "counts": counts},
                          separators=(",", ":"))[:-1].encode() + b',"items":['
        if len(page) <= STREAM_ROWS_OVER:
            return Response(b"".join((head, b",".join([row_json(e) for e in page]), b"]}")),
                            media_type="application/json")

        async def chunks() -> AsyncIterator[bytes]:
            """Big pages in slices of about SLICE_SECONDS of work, yielding to the loop in between:
            SIP keeps its timing (rows come from the index's per-instance JSON cache)."""
            yield head
            clock, budget, rows, n = time.perf_counter, SLICE_SECONDS, len(page), 0
            while n < rows:
                began, parts = clock(), []
                while n < rows:
                    stop = min(rows, n + SLICE_CHECK)
                    parts.extend([row_json(e) for e in page[n:stop]])
                    n = stop
                    if clock() - began >= budget:
                        break
                yield b",".join(parts) + (b"," if n < rows else b"")
                await asyncio.sleep(0)
            yield b"]}"

        return StreamingResponse(chunks(), media_type="application/json")

    async def instance_pushes(selector: str) -> list[dict[str, Any]]:
        memory = [push_view(t) for t in ctx.delivery.traces.values() if t.selector == selector]
        known = {p["push_id"] for p in memory}
        stored: list[dict[str, Any]] = []
        if ctx.stores is not None and len(memory) < DETAIL_PUSHES:
            try:
                records = await ctx.stores.pushes.recent(DETAIL_PUSHES, selector)
            except Exception:
                log.exception("reading pushes of %s failed", selector)
                records = []
            stored = [push_record_view(r) for r in records if r.push_id not in known]
        return (stored + memory)[-DETAIL_PUSHES:]

    @app.get("/v1/instances/{selector}")
    async def instance_detail(selector: str, _: Operator = Depends(viewer)) -> Response:
        instance = instance_or_404(selector)
        timeline = {e.seq: encode_event(e) for e in ctx.ring.for_selector(selector, TIMELINE_LIMIT)}
        if ctx.stores is not None and len(timeline) < TIMELINE_LIMIT:
            try:
                for record in await ctx.stores.events.recent(TIMELINE_LIMIT, selector=selector):
                    timeline.setdefault(record.seq, {"seq": record.seq, "at": record.at, "kind": record.kind,
                                                     "selector": record.selector, "data": record.data})
            except Exception:
                log.exception("reading the timeline of %s failed", selector)
        events = [timeline[seq] for seq in sorted(timeline)][-TIMELINE_LIMIT:]
        return JSONResponse(jsonable({
            "instance": instance.public_view(), "row": ctx.index.row(instance), "timeline": events,
            "pushes": await instance_pushes(selector),
            "sip": [m.as_dict() for m in ctx.trace.instance_messages(selector)],
        }))

    @app.get("/v1/calls")
    async def calls(_: Operator = Depends(viewer)) -> dict[str, Any]:
        clock = ctx.clock
        return {"held": to_json(ctx.calls.views()), "recent": [to_json(call.view(clock)) for call in ctx.calls.recent]}

    async def call_pushes(call_id: str) -> list[dict[str, Any]]:
        memory = [push_view(t) for t in ctx.delivery.traces.values() if t.call_id == call_id]
        known = {p["push_id"] for p in memory}
        stored: list[dict[str, Any]] = []
        if ctx.stores is not None:
            try:
                stored = [push_record_view(r) for r in await ctx.stores.pushes.for_call(call_id)
                          if r.push_id not in known]
            except Exception:
                log.exception("reading pushes of call %s failed", call_id)
        return stored + memory

    @app.get("/v1/calls/{call_id:path}/trace.txt", response_class=PlainTextResponse)
    async def call_trace_text(call_id: str, _: Operator = Depends(viewer)) -> Response:
        text = ctx.trace.text_ladder(call_id, await call_pushes(call_id))
        return PlainTextResponse(text, headers={
            "Content-Disposition": f'attachment; filename="{_file_name(call_id)}.txt"'})

    @app.get("/v1/calls/{call_id:path}/trace.pcap")
    async def call_trace_pcap(call_id: str, _: Operator = Depends(viewer)) -> Response:
        return Response(ctx.trace.pcap(call_id), media_type="application/vnd.tcpdump.pcap", headers={
            "Content-Disposition": f'attachment; filename="{_file_name(call_id)}.pcap"'})

    @app.get("/v1/calls/{call_id:path}/trace")
    async def call_trace(call_id: str, _: Operator = Depends(viewer)) -> Response:
        return JSONResponse(jsonable({"call_id": call_id, "selector": ctx.trace.selector_of_call(call_id),
                                      "messages": ctx.trace.messages(call_id),
                                      "pushes": await call_pushes(call_id)}))

    @app.get("/v1/pushes")
    async def pushes(_: Operator = Depends(viewer), limit: int = Query(200, ge=1, le=10_000),
                     selector: str = Query("", max_length=200)) -> Response:
        memory = [push_view(t) for t in ctx.delivery.traces.values() if not selector or t.selector == selector]
        memory = memory[-limit:]
        stored: list[dict[str, Any]] = []
        if ctx.stores is not None and len(memory) < limit:
            known = {p["push_id"] for p in memory}
            try:
                records = await ctx.stores.pushes.recent(limit, selector or None)
            except Exception:
                log.exception("reading pushes failed")
                records = []
            stored = [push_record_view(r) for r in records if r.push_id not in known]
        return JSONResponse(jsonable((stored + memory)[-limit:]))

    @app.get("/v1/audit")
    async def audit(_: Operator = Depends(viewer), limit: int = Query(200, ge=1, le=10_000)) -> Response:
        rows = {str(view["id"]): view for view in map(audit_event_view, ctx.ring.audit)}
        if ctx.stores is not None:
            try:
                for record in await ctx.stores.audit.recent(limit):
                    rows.setdefault(record.id, audit_record_view(record))
            except Exception:
                log.exception("reading the audit log failed")
        ordered = sorted(rows.values(), key=lambda r: float(r["at"]))
        return JSONResponse(jsonable(ordered[-limit:]))

    @app.get("/v1/events")
    async def events(_: Operator = Depends(viewer), since: int | None = Query(None, ge=0)) -> Response:
        return StreamingResponse(_event_stream(ctx, since), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ actions

    def action_answer(instance: Instance) -> Response:
        return JSONResponse(jsonable({"instance": instance.public_view(), "row": ctx.index.row(instance)}))

    @app.post("/v1/instances/{selector}/actions/take-over")
    async def take_over(selector: str, who: Operator = Depends(operator)) -> Response:
        return action_answer(await ops.take_over(selector, who))

    @app.post("/v1/instances/{selector}/actions/hand-back")
    async def hand_back(selector: str, who: Operator = Depends(operator)) -> Response:
        return action_answer(await ops.hand_back(selector, who))

    @app.post("/v1/instances/{selector}/actions/re-register")
    async def re_register(selector: str, who: Operator = Depends(operator)) -> Response:
        return action_answer(await ops.re_register(selector, who))

    @app.post("/v1/instances/{selector}/actions/disable")
    async def disable(selector: str, who: Operator = Depends(operator)) -> Response:
        return action_answer(await ops.disable(selector, who))

    @app.post("/v1/instances/{selector}/actions/test-push")
    async def test_push(selector: str, who: Operator = Depends(operator)) -> Response:
        return JSONResponse(jsonable({"push": push_view(await ops.test_push(selector, who))}))

    @app.post("/v1/pushes/{push_id}/replay")
    async def replay(push_id: str, who: Operator = Depends(operator)) -> Response:
        return JSONResponse(jsonable({"push": push_view(await ops.replay_push(push_id, who))}))

    return app


def jsonable(value: Any) -> Any:
    """Round-trip through json with ``default=str`` so odd values in event data never break a response."""
    return json.loads(json.dumps(value, default=str))


def _file_name(call_id: str) -> str:
    return "call-" + (re.sub(r"[^A-Za-z0-9._-]", "_", call_id)[:80] or "unknown")


async def _event_stream(ctx: OperatorContext, since: int | None) -> AsyncIterator[str]:
    """NDJSON: replay from the ring (``since``), then live events; a heartbeat when idle. Extra line
    kinds: ``gap`` (events after ``since`` already left the ring: resynchronise from the snapshot
    routes) and ``overflow`` (this client fell behind and ``dropped`` events were lost)."""
    queue = EventQueue(ctx.bus, maxsize=STREAM_QUEUE)
    ctx.streams.add(queue)
    try:
        last = ctx.ring.last_seq
        if since is not None:
            replay, gap = ctx.ring.since(since)
            if gap:
                yield _json_line({"kind": "gap", "since": since, "first_available": ctx.ring.first_seq,
                                  "at": ctx.clock.wall()})
            if replay:
                yield "".join(_json_line(encode_event(e)) for e in replay)
                last = replay[-1].seq
        else:
            yield _json_line({"kind": "heartbeat", "at": ctx.clock.wall(), "seq": last})
        dropped = 0
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=ctx.heartbeat)
            except TimeoutError:
                yield _json_line({"kind": "heartbeat", "at": ctx.clock.wall(), "seq": last})
                continue
            batch = [event]
            while len(batch) < STREAM_BATCH and not queue.queue.empty():
                batch.append(queue.queue.get_nowait())
            lines: list[str] = []
            if queue.dropped != dropped:
                lines.append(_json_line({"kind": "overflow", "dropped": queue.dropped - dropped,
                                         "at": ctx.clock.wall()}))
                dropped = queue.dropped
            closing = False
            for item in batch:
                if item is None:
                    closing = True
                    break
                if item.seq <= last:
                    continue  # already replayed from the ring
                last = item.seq
                lines.append(_json_line(encode_event(item)))
            if lines:
                yield "".join(lines)
            if closing:
                return
    finally:
        ctx.streams.discard(queue)
        queue.close()


# --------------------------------------------------------------------------- serving


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_unix_socket(path: Path) -> socket.socket:
    """Bind ``path`` (mode 0600 before anyone can connect); a stale socket file is replaced, a live
    one (another core) or a file that is not a socket is an error."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise OSError(f"{path} is in use by another process")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)  # before listen(): until then nobody can connect
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _local_get(app: ASGIApp, path: str, query: bytes) -> int:
    """GET ``path`` from ``app`` in process as the local administrator; the status (body dropped)."""
    status = 0
    done = asyncio.Event()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": [(b"host", b"localhost"), (b"x-operator", b"warm-up")], "client": None, "server": None}
    try:
        await app(scope, receive, send)  # type: ignore[arg-type]
    finally:
        done.set()
    return status


class OperatorServer:
    """Serves the operator API in the running loop: unix socket always, TCP when configured."""

    def __init__(self, ctx: OperatorContext, *, socket_path: Path | None, tcp_host: str | None = None,
                 tcp_port: int = 0, tls_files: tuple[Path, Path] | None = None,
                 app: FastAPI | None = None) -> None:
        self.ctx = ctx
        self.app = app or create_operator_app(ctx)
        self.socket_path = socket_path
        self.tcp_host = tcp_host
        self.tcp_port = tcp_port
        self.tls_files = tls_files
        self._servers: list[tuple[EmbeddedServer, asyncio.Task[None]]] = []

    @classmethod
    def from_config(cls, ctx: OperatorContext, config: Config) -> OperatorServer:
        """Unix socket always; TCP when configured — plain HTTP on a loopback address, TLS with the
        app API's certificate (generated in ``state_dir`` when none is configured) on any other."""
        operator, tcp = config.operator, config.operator.tcp_listen
        tls_files = None
        if tcp is not None and not is_loopback(tcp.host):
            api = config.api
            if api.tls_generate:
                ensure_self_signed(api.tls_cert, api.tls_key, [tcp.host, "localhost"])
            tls_files = (api.tls_cert, api.tls_key)
        return cls(ctx, socket_path=operator.socket, tcp_host=tcp.host if tcp is not None else None,
                   tcp_port=tcp.port if tcp is not None else 0, tls_files=tls_files)

    @property
    def tcp_url(self) -> str | None:
        if self.tcp_host is None:
            return None
        host = f"[{self.tcp_host}]" if ":" in self.tcp_host else self.tcp_host
        return f"{'https' if self.tls_files else 'http'}://{host}:{self.tcp_port}"

    async def start(self) -> None:
        try:
            if self.socket_path is not None:
                await self._serve(listener_app(self.app, "unix"), bind_unix_socket(self.socket_path), None, "unix")
                log.info("operator API on unix socket %s", self.socket_path)
            if self.tcp_host is not None:
                sock = bind_tcp(self.tcp_host, self.tcp_port)
                self.tcp_port = sock.getsockname()[1]
                await self._serve(listener_app(self.app, "tcp"), sock, self.tls_files, "tcp")
                log.info("operator API on %s", self.tcp_url)
            await self.warm_up()
        except BaseException:
            await self.stop()
            raise

    async def warm_up(self) -> None:
        """Do now, at start-up, what the first console's requests would otherwise do inside the
        loop (measured 5–10 ms stalls on the first login): FastAPI reads each endpoint's source
        location once (``inspect.getsourcelines``), anyio imports its asyncio backend for the first
        streamed response. One summary and one streamed instance page, in process, answers dropped."""
        extract = getattr(fastapi.routing, "_extract_endpoint_context", None)  # private: only if there
        for route in self.app.routes:
            endpoint = getattr(route, "endpoint", None)
            if callable(extract) and endpoint is not None:
                with contextlib.suppress(Exception):
                    extract(endpoint)
        for path, query in (("/v1/summary", b""), ("/v1/instances", b"limit=%d" % (STREAM_ROWS_OVER + 1))):
            with contextlib.suppress(Exception):
                await _local_get(listener_app(self.app, "unix"), path, query)

    async def _serve(self, app: ASGIApp, sock: socket.socket, tls: tuple[Path, Path] | None, name: str) -> None:
        config = uvicorn.Config(
            app, log_level="warning", log_config=None, lifespan="off", access_log=False, proxy_headers=False,
            server_header=False, timeout_graceful_shutdown=GRACEFUL_TIMEOUT,
            ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None,
        )
        try:
            config.load()
        except BaseException:
            sock.close()
            raise
        if config.ssl is not None:
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        server = EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"operator-api-{name}")
        self._servers.append((server, task))
        async with asyncio.timeout(START_TIMEOUT):
            while not server.started:
                if task.done():
                    sock.close()
                    await task
                    raise RuntimeError(f"operator API ({name}) exited during start-up")
                await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self.ctx.close_streams()
        servers, self._servers = self._servers, []
        for server, _ in servers:
            server.should_exit = True
        for _, task in servers:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        if self.socket_path is not None and servers:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                    self.socket_path.unlink()
