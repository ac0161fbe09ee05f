"""Alarms with episodes: raised once when a cause starts, cleared once when it ends.

Causes, all read from the bus:

* ``pbx-down`` (per registrar target) and ``provider-down`` (per push provider): while the target's
  health (``health`` events, :mod:`sipis.health`) is ``down``;
* ``auth-failures`` (per registrar target): at least :data:`AUTH_FAILURES` instances registering
  there were refused (``unauthorized``) within :data:`WINDOW`; cleared when fewer were;
* ``token-dead``: at least :data:`DEAD_TOKENS` push tokens reported dead within :data:`WINDOW`;
* ``storage-failing``: from the storage writer (:meth:`AlarmBoard.storage`), until it commits again.

Each raise and each clear is one ``alarm`` event (``state`` raised/cleared, the episode's ``id``) and
one WARNING line. The board keeps the active episodes and a bounded history for the operator API;
operators acknowledge an episode through :class:`~sipis.operations.Operations`. Windows are judged at
:meth:`AlarmBoard.tick` (driven every few seconds by the core, by hand in tests).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable

from contract.documents import AlarmRecord
from contract.events import Alarm, Event, HealthChanged, InstancePushChanged, RegistrationResult
from contract.kinds import AlarmKind, AlarmState, HealthState, HealthSubject
from sipis.clock import Clock
from sipis.events import EventBus
from sipis.instance import Instance

log = logging.getLogger(__name__)

#: the window of the counting alarms (seconds)
WINDOW = 300.0
#: instances of one PBX refused within the window that raise ``auth-failures``
AUTH_FAILURES = 5
#: push tokens reported dead within the window that raise ``token-dead``
DEAD_TOKENS = 10
#: finished episodes kept for the operator API
HISTORY = 200

DOWN_ALARMS = {HealthSubject.PBX: AlarmKind.PBX_DOWN, HealthSubject.PROVIDER: AlarmKind.PROVIDER_DOWN}


class AlarmBoard:
    def __init__(self, bus: EventBus, clock: Clock, lookup: Callable[[str], Instance | None]) -> None:
        self.bus = bus
        self.clock = clock
        self.lookup = lookup
        self.active: dict[tuple[AlarmKind, str | None], AlarmRecord] = {}
        self.history: deque[AlarmRecord] = deque(maxlen=HISTORY)
        self._ids = itertools.count(1)
        #: target → selector → monotonic time of its last refusal
        self._refused: dict[str, dict[str, float]] = {}
        self._dead_tokens: deque[float] = deque()
        self._unsubscribe = bus.subscribe(self._on_event)

    # ------------------------------------------------------------------ causes

    def _on_event(self, event: Event) -> None:
        payload = event.payload
        if isinstance(payload, HealthChanged):
            kind = DOWN_ALARMS[payload.subject]
            if payload.state is HealthState.DOWN:
                self.raise_alarm(kind, payload.target, payload.error)
            else:
                self.clear(kind, payload.target)
        elif isinstance(payload, RegistrationResult) and event.selector is not None:
            self._registration(event.selector, payload)
        elif isinstance(payload, InstancePushChanged) and payload.unreachable:
            self._dead_tokens.append(self.clock.monotonic())
            if len(self._dead_tokens) >= DEAD_TOKENS:
                self.raise_alarm(AlarmKind.TOKEN_DEAD, None, f"{len(self._dead_tokens)} push tokens dead "
                                 f"within {WINDOW:.0f} s")

    def _registration(self, selector: str, result: RegistrationResult) -> None:
        instance = self.lookup(selector)
        target = instance.registration.target if instance is not None else None
        if target is None:
            return
        refused = self._refused.get(target)
        if result.result == "unauthorized":
            if refused is None:
                refused = self._refused[target] = {}
            refused[selector] = self.clock.monotonic()
            if len(refused) >= AUTH_FAILURES:
                self.raise_alarm(AlarmKind.AUTH_FAILURES, target, f"{len(refused)} instances refused "
                                 f"within {WINDOW:.0f} s ({result.code} {result.reason})")
        elif result.result == "registered" and refused is not None:
            refused.pop(selector, None)

    def storage(self, error: str | None) -> None:
        """The storage writer's verdict: failing with ``error``, or committing again (None)."""
        if error is None:
            self.clear(AlarmKind.STORAGE_FAILING, None)
        else:
            self.raise_alarm(AlarmKind.STORAGE_FAILING, None, error)

    def tick(self) -> None:
        """Forget what left the window; clear the counting alarms whose count fell below the bar."""
        horizon = self.clock.monotonic() - WINDOW
        for target, refused in list(self._refused.items()):
            for selector in [s for s, at in refused.items() if at < horizon]:
                del refused[selector]
            if len(refused) < AUTH_FAILURES:
                self.clear(AlarmKind.AUTH_FAILURES, target)
            if not refused:
                del self._refused[target]
        while self._dead_tokens and self._dead_tokens[0] < horizon:
            self._dead_tokens.popleft()
        if len(self._dead_tokens) < DEAD_TOKENS:
            self.clear(AlarmKind.TOKEN_DEAD, None)

    # ------------------------------------------------------------------ episodes

    def raise_alarm(self, kind: AlarmKind, target: str | None, reason: str | None) -> None:
        if (kind, target) in self.active:
            return
        record = AlarmRecord(f"{kind.value}-{next(self._ids)}", kind.value, target, AlarmState.RAISED.value,
                             self.clock.wall(), reason)
        self.active[(kind, target)] = record
        log.warning("alarm %s raised%s: %s", kind.value, f" for {target}" if target else "", reason or "-")
        self.bus.publish(None, Alarm(kind, reason=reason, state=AlarmState.RAISED, target=target, id=record.id))

    def clear(self, kind: AlarmKind, target: str | None) -> None:
        record = self.active.pop((kind, target), None)
        if record is None:
            return
        record.state, record.cleared_at = AlarmState.CLEARED.value, self.clock.wall()
        self.history.append(record)
        log.warning("alarm %s cleared%s", kind.value, f" for {target}" if target else "")
        self.bus.publish(None, Alarm(kind, state=AlarmState.CLEARED, target=target, id=record.id))

    def find(self, alarm_id: str) -> AlarmRecord | None:
        for record in self.active.values():
            if record.id == alarm_id:
                return record
        return next((record for record in self.history if record.id == alarm_id), None)

    def acknowledge(self, alarm_id: str, by: str) -> AlarmRecord | None:
        """Mark the episode seen by operator ``by`` (the caller checks the role and audits)."""
        record = self.find(alarm_id)
        if record is not None and record.acknowledged_by is None:
            record.acknowledged_by, record.acknowledged_at = by, self.clock.wall()
        return record

    def records(self) -> tuple[list[AlarmRecord], list[AlarmRecord]]:
        """Active episodes (oldest first) and finished ones (newest first)."""
        return sorted(self.active.values(), key=lambda r: r.raised_at), list(reversed(self.history))

    def close(self) -> None:
        self._unsubscribe()
