"""One event stream for the whole cluster: each node sends the events its operators would want to
see to the other nodes, and shows theirs to its own operators, each marked with its node.

What goes out (:data:`FORWARDED`) is what an operator follows: alarms, calls, pushes, messages,
instance state changes and deletions, audit rows, health changes, a core starting or stopping.
Registration results and status changes stay home: a failover or a PBX outage makes thousands a
second, their outcome shows in the instance rows (owner's storage) and the alarms. Events go out
batched on the signal topic :data:`EVENTS_TOPIC`: one signal per :data:`FLUSH_INTERVAL` per node
at most, split where one would exceed the signal payload limit.

What comes in feeds only the operator API's own bus (:attr:`MergedEvents.bus`: the event ring and
the streams), never the core's: another node's events must not drive this node's storage or logic.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from contract.codec import decode_payload, payload_data
from contract.events import Event
from contract.kinds import EventKind
from sipis.cluster import read_signal
from sipis.events import EventBus
from storage.cluster import MAX_PAYLOAD, Signals

log = logging.getLogger(__name__)

EVENTS_TOPIC = "events"
FLUSH_INTERVAL = 0.2  # seconds: at most five signals a second per node while events flow

FORWARDED = frozenset({
    EventKind.CORE_STARTED, EventKind.CORE_STOPPED, EventKind.INSTANCE_STATE, EventKind.INSTANCE_DELETED,
    EventKind.CALL, EventKind.PUSH, EventKind.MESSAGE, EventKind.ALARM, EventKind.AUDIT, EventKind.HEALTH,
})

#: room for the envelope around the events (``{"node":…,"events":[…]}``, escaped once more by
#: the signal itself)
_ENVELOPE = 200


def _cost(text: str) -> int:
    """What ``text`` adds to a signal: its length once escaped into the signal's JSON (ASCII, so
    never less than its UTF-8 size)."""
    return len(json.dumps(text)) - 2


class MergedEvents:
    """The operator API's bus: this node's events (marked with ``node`` when given: a cluster) and
    the other nodes' that arrive on :data:`EVENTS_TOPIC`, numbered in this node's one sequence."""

    def __init__(self, core: EventBus, node: str | None) -> None:
        self.core = core
        self.node = node
        self.bus = EventBus(core.clock)
        self._unsubscribe = core.subscribe(self._local)
        self._closed = False

    def _local(self, event: Event) -> None:
        if self.node is not None:
            event = Event(event.seq, event.at, event.selector, event.payload, self.node)
        self.bus.deliver(event)

    def on_signal(self, topic: str, payload: str) -> None:
        if topic != EVENTS_TOPIC or self._closed:
            return
        fields = read_signal(topic, payload, "node", "events", lists=("events",))
        if fields is None:
            return
        node, events = fields
        if node == self.node:
            return  # ours: shown already
        for item in events:
            try:
                at, kind, selector, data = item
                event = Event(self.core.next_seq(), float(at), None if selector is None else str(selector),
                              decode_payload(str(kind), dict(data), selector), node)
            except (ValueError, TypeError):
                log.warning("ignored a malformed event from node %s", node)
                continue
            self.bus.deliver(event)

    def close(self) -> None:
        self._closed = True
        self._unsubscribe()


class EventForwarder:
    """Sends this node's :data:`FORWARDED` events to the other nodes, batched per ``interval``."""

    def __init__(self, core: EventBus, signals: Signals, node: str, interval: float = FLUSH_INTERVAL) -> None:
        self.signals = signals
        self.node = node
        self.interval = interval
        self._prefix = '{"node":' + json.dumps(node) + ',"events":['
        self._budget = MAX_PAYLOAD - _ENVELOPE - _cost(self._prefix)
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        #: events not sent: too large for one signal, or the signal failed
        self.dropped = 0
        self.signals_sent = 0
        self._unsubscribe = core.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.kind not in FORWARDED:
            return
        item: list[Any] = [event.at, str(event.kind), event.selector, payload_data(event.payload)]
        try:
            line = json.dumps(item, separators=(",", ":"), default=str)
        except ValueError:
            self.dropped += 1
            return
        if _cost(line) > self._budget:
            self.dropped += 1
            log.warning("a %s event is too large to show on the other nodes (%d bytes)", event.kind, len(line))
            return
        self._pending.append(line)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    def batches(self, lines: list[str]) -> list[tuple[str, int]]:
        """``lines`` as signal payloads within the limit, each with how many events it holds."""
        payloads: list[tuple[str, int]] = []
        chunk: list[str] = []
        size = 0
        for line in lines:
            cost = _cost(line) + 1
            if chunk and size + cost > self._budget:
                payloads.append((self._prefix + ",".join(chunk) + "]}", len(chunk)))
                chunk, size = [], 0
            chunk.append(line)
            size += cost
        if chunk:
            payloads.append((self._prefix + ",".join(chunk) + "]}", len(chunk)))
        return payloads

    async def flush(self) -> None:
        """Send what is pending now. Lost signals are logged and counted, not retried: operators'
        view of another node is best effort (the stored event log has every event)."""
        lines, self._pending = self._pending, []
        for payload, count in self.batches(lines):
            try:
                await self.signals.notify(EVENTS_TOPIC, payload)
                self.signals_sent += 1
            except Exception as exc:
                self.dropped += count
                log.warning("could not send events to the other nodes: %s", exc)

    def close(self) -> None:
        self._unsubscribe()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
