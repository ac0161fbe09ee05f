"""The instance index: the operator API's read model of the instance list (``GET /v1/instances``).

:class:`InstanceIndex` keeps, in step with the bus, each instance's lower-case search keys, the aor
order, the per-state and per-status counts and each row's JSON, so the instance list and the
summary stay cheap with 100k instances. Queries are the instance query language
(:mod:`contract.query`, the same the console's filter speaks); rows are the contract's
:class:`~contract.documents.InstanceRow`.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from contract.codec import encoder
from contract.documents import InstanceRow
from contract.documents import PushRecord as PushPayload
from contract.events import Event, InstanceDeleted
from contract.query import haystack, parse_query, select
from sipis.events import EventBus
from sipis.instance import AppState, Instance, RegStatus
from sipis.service import InstanceService

STATES = tuple(state.value for state in AppState)

#: selector → (outcome, wall time) of its latest push
LastPushes = dict[str, tuple[str, float]]


class _Entry:
    """One instance in the index: its lower-case search keys, the state and registration status it
    is counted under, its cached list row (JSON) and the instance itself. With the properties (live
    values) it is what a query reads (:class:`contract.query.Filterable`)."""

    __slots__ = ("aor", "counted_state", "counted_status", "haystack", "instance", "key", "pushes", "rank",
                 "registrar", "row_json", "row_source", "selector", "source", "user")

    def __init__(self, instance: Instance, registrar: str | None, pushes: LastPushes) -> None:
        account = instance.account
        self.instance = instance
        self.pushes = pushes  # the index's latest push per selector
        self.selector = instance.selector
        #: what the search keys were made from: a change re-indexes the instance
        self.source = (account.aor, account.username, registrar)
        self.aor = account.aor.lower()
        self.user = account.username.lower()
        self.registrar = (registrar or "").lower()
        self.haystack = haystack(self)  # what a plain query word searches: one substring test
        #: the aor order's key: unique (ties of the aor in selector order)
        self.key = (self.aor, self.selector)
        self.rank = 0  # position in the aor order: the tie-breaker of every other sort
        self.counted_state: str = instance.state._value_
        self.counted_status: str = instance.registration.status._value_
        self.row_json: bytes | None = None
        self.row_source: tuple[Any, ...] | None = None

    @property
    def state(self) -> str:
        return self.instance.state._value_

    @property
    def reg_status(self) -> str:
        return self.instance.registration.status._value_

    @property
    def last_code(self) -> int | None:
        return self.instance.registration.last_code

    @property
    def push_unreachable(self) -> bool:
        return self.instance.push.unreachable

    @property
    def push_provider(self) -> str | None:
        return self.instance.push.provider

    @property
    def last_push_outcome(self) -> str | None:
        last = self.pushes.get(self.selector)
        return last[0] if last else None


#: Sort fields whose keys change only with enrolment: sorted once, cached until the next change.
STATIC_SORTS = ("aor", "selector", "user", "registrar")

#: Sort fields read from the live instance, sorted per request (stable on top of the aor order;
#: empty values last). Getters return the raw value, None when empty; C-level ``attrgetter``s, and
#: enums read through ``_value_`` (a plain str sorts and hashes in C, an enum member does not).
#: ``last_push_*`` come from the index itself (see :meth:`InstanceIndex._values`).
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
    "push.unreachable", "app_last_seen", "registration.registrar_agent")
_KEY = attrgetter("key")
_HAYSTACK = attrgetter("haystack")
_ROW = encoder(InstanceRow)
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
    slice of the kept order, the counts are kept; a plain query word is one substring test per
    instance; a live sort field is one sort of the matches per request; other static sorts are
    cached until an instance comes or goes or changes its account."""

    def __init__(self, service: InstanceService, bus: EventBus, default_registrar: str | None = None) -> None:
        self.service = service
        self.default_registrar = default_registrar
        self.entries: dict[str, _Entry] = {}
        #: selector → (outcome, wall time) of its latest push
        self.last_push: LastPushes = {}
        #: instances per state and per registration status (as of the last :meth:`sync`)
        self.state_counts: dict[str, int] = dict.fromkeys(STATES, 0)
        self.status_counts: dict[str, int] = dict.fromkeys(REG_STATUSES, 0)
        self._dirty: set[str] = set()
        #: the node acting for an instance (a cluster's; None: one node)
        self.owner_of: Callable[[str], str | None] | None = None
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
                self._add(_Entry(instance, self.registrar_of(instance), self.last_push))
                continue
            account = instance.account
            if (entry.instance is not instance or entry.source[0] != account.aor
                    or entry.source[1] != account.username or entry.source[2] != self.registrar_of(instance)):
                self._remove(entry)
                self._add(_Entry(instance, self.registrar_of(instance), self.last_push))
                continue
            state, status = instance.state._value_, instance.registration.status._value_
            if state != entry.counted_state:
                self.state_counts[entry.counted_state] -= 1
                self.state_counts[state] += 1
                entry.counted_state = state
            if status != entry.counted_status:
                self.status_counts[entry.counted_status] -= 1
                self.status_counts[status] += 1
                entry.counted_status = status

    def _own_aor(self) -> list[_Entry]:
        """The aor order, copied first when a reader still holds it."""
        if self._aor_lent:
            self._aor = list(self._aor)
            self._aor_lent = False
        return self._aor

    def _add(self, entry: _Entry) -> None:
        self.entries[entry.selector] = entry
        self.state_counts[entry.counted_state] += 1
        self.status_counts[entry.counted_status] += 1
        bisect.insort(self._own_aor(), entry, key=_KEY)
        self._version += 1

    def _remove(self, entry: _Entry) -> None:
        del self.entries[entry.selector]
        self.state_counts[entry.counted_state] -= 1
        self.status_counts[entry.counted_status] -= 1
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
                entries[selector] = _Entry(instance, self.registrar_of(instance), self.last_push)
        for selector in [s for s in entries if s not in instances]:
            del entries[selector]
        self.state_counts = dict.fromkeys(STATES, 0)
        self.status_counts = dict.fromkeys(REG_STATUSES, 0)
        for entry in entries.values():
            self.state_counts[entry.counted_state] += 1
            self.status_counts[entry.counted_status] += 1
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
        terms = parse_query(q)
        matches = select(terms, everything, _HAYSTACK) if terms else everything
        if terms:
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

    def instance_row(self, instance: Instance) -> InstanceRow:
        """The instance's row in the list (the contract's document)."""
        reg, push = instance.registration, instance.push
        last = self.last_push.get(instance.selector)
        return InstanceRow(
            instance.selector, instance.account.aor, instance.account.username,
            instance.account.registrar or self.default_registrar, instance.state._value_, reg.status._value_,
            reg.last_code, reg.last_reason, reg.expires_at, reg.next_refresh_at, reg.failure_count,
            reg.backoff_until, push.provider, push.unreachable, last[0] if last else None,
            last[1] if last else None, instance.app_last_seen, reg.registrar_agent,
            self.owner_of(instance.selector) if self.owner_of is not None else None)

    def row(self, instance: Instance) -> dict[str, Any]:
        """:meth:`instance_row` as JSON values."""
        return _ROW(self.instance_row(instance))

    def row_json(self, entry: _Entry) -> bytes:
        """:meth:`row` of the entry's instance as compact JSON, reused while nothing in it changed."""
        owner = self.owner_of(entry.selector) if self.owner_of is not None else None
        source = (_ROW_SOURCE(entry.instance), self.last_push.get(entry.selector), owner)
        if entry.row_json is None or entry.row_source != source:
            entry.row_json = json.dumps(self.row(entry.instance), separators=(",", ":"), default=str).encode()
            entry.row_source = source
        return entry.row_json
