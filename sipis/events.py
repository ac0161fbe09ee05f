"""The one event bus. Every state change in the core is published here exactly once; storage,
metrics, the operator API stream and the trace recorder subscribe (DESIGN.md, rules of the house).

Publishing is synchronous and cheap: subscribers are plain callables that must not block (the
storage writer only enqueues; the operator stream pushes into bounded queues and drops the
oldest when a slow client falls behind).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sipis.clock import Clock, SystemClock

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    at: float  # wall clock, for display and storage
    kind: str  # e.g. "instance.state", "registration", "call.stage", "push.outcome", "alarm"
    selector: str | None
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at, "kind": self.kind, "selector": self.selector,
                "data": self.data}


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self, clock: Clock | None = None, first_seq: int = 1) -> None:
        self.clock = clock or SystemClock()
        self._seq = itertools.count(first_seq)
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(self, kind: str, selector: str | None = None, /, **data: Any) -> Event:
        event = Event(next(self._seq), self.clock.wall(), kind, selector, data)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", subscriber, kind)
        return event


class EventQueue:
    """A bounded per-client queue fed by the bus; drops the oldest events when full."""

    def __init__(self, bus: EventBus, maxsize: int = 10_000) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0
        self._unsubscribe = bus.subscribe(self._push)

    def _push(self, event: Event) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()

    def close(self) -> None:
        self._unsubscribe()
