"""The one event bus. Every state change in the core is published here exactly once, as one of
the contract's typed payloads (:mod:`contract.events`); storage (:mod:`sipis.persistence`), the
operator API (its event ring, instance index, PBX health and event streams) and the lab's demo
subscribe (DESIGN.md, rules of the house). The SIP trace recorder does not: it observes messages at
the SIP endpoint.

Publishing is synchronous and cheap: subscribers are plain callables that must not block (the
storage writer only enqueues; the operator stream pushes into bounded queues and drops the
oldest when a slow client falls behind).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from contract.events import Event, Payload
from sipis.clock import Clock, SystemClock

__all__ = ["Event", "EventBus", "EventQueue", "Subscriber"]

log = logging.getLogger(__name__)

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

    def publish(self, selector: str | None, payload: Payload) -> Event:
        """Announce ``payload`` about the instance ``selector`` (None: about no instance)."""
        event = Event(next(self._seq), self.clock.wall(), selector, payload)
        self.deliver(event)
        return event

    def deliver(self, event: Event) -> None:
        """Hand ``event`` (numbered already) to every subscriber."""
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", subscriber, event.kind)

    def next_seq(self) -> int:
        """Take the next seq for an event not published here (another node's, shown to this node's
        operators): their streams number everything in one order."""
        return next(self._seq)


class EventQueue:
    """A bounded per-client queue fed by the bus; drops the oldest events when full."""

    def __init__(self, bus: EventBus, maxsize: int = 10_000) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)
        self.dropped = 0
        self._unsubscribe = bus.subscribe(self._push)

    def _push(self, event: Event | None) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    def close_stream(self) -> None:
        """Wake the reader with ``None``: the stream ends (server shutdown)."""
        self._push(None)

    async def get(self) -> Event | None:
        return await self.queue.get()

    def close(self) -> None:
        self._unsubscribe()
