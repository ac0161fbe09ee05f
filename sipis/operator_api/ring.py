"""The event ring: the operator API's memory of the last events, for ``GET /v1/events?since=`` replays,
instance timelines, the audit log's recent rows and the summary's alarm count."""

from __future__ import annotations

import marshal
from collections import deque
from typing import Any

from contract.codec import decode_payload, payload_data
from contract.documents import AuditEntry
from contract.events import Alarm, Event
from contract.kinds import AlarmState
from sipis.events import EventBus

EVENT_RING = 10_000


#: How the ring keeps an event: ``(seq, at, kind, selector, data, node)`` with ``data`` marshalled to
#: bytes. A tuple of numbers, strings and bytes is untracked by the cyclic garbage collector after
#: the first collection it survives, so the ring's 10,000 events (with their nested dicts: push
#: traces, request summaries) add nothing to the collector's pauses; an :class:`Event` is rebuilt
#: when somebody reads. Data marshal cannot write (an object in free-form data such as an audit
#: row's detail) is kept as it is.
RingEntry = tuple[int, float, str, "str | None", "bytes | dict[str, Any]", "str | None"]


def _pack(event: Event) -> RingEntry:
    data = payload_data(event.payload)
    packed: bytes | dict[str, Any]
    try:
        packed = marshal.dumps(data)
    except ValueError:
        packed = data
    return (event.seq, event.at, str(event.kind), event.selector, packed, event.node)


def _unpack(entry: RingEntry) -> Event:
    seq, at, kind, selector, packed, node = entry
    data = marshal.loads(packed) if isinstance(packed, bytes) else packed
    return Event(seq, at, selector, decode_payload(kind, data, selector), node)


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
        payload = event.payload
        if isinstance(payload, AuditEntry):
            self._audit.append(entry)
        elif isinstance(payload, Alarm) and payload.state != AlarmState.CLEARED:  # a clear is no new alarm
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
