"""Health of every registrar target and push provider: unknown, up, degraded or down.

Inputs
    :meth:`HealthMonitor.pbx_result` for every REGISTER exchange with one target (the proxy
    registrar reports each target it tries, failovers included); :meth:`HealthMonitor.flow_lost`
    when a connection to a target closes; ``push`` events from the bus for providers.

Rules (one :class:`TargetHealth` per target)
    * nothing is ``up`` until it answered; a target that never answered is ``unknown``;
    * an answer (any final response but 408/5xx, a 401/403 included: the registrar is there) or an
      accepted push → ``up``;
    * a failure (408, 5xx, a transport error; a push rejected as transient) → ``down`` when nothing
      was known yet or after :data:`FAILURES_FOR_DOWN` failures in a row, else ``degraded``;
    * a lost connection makes an ``up`` target ``degraded`` until the next exchange says more.

Outputs
    A ``health`` event (:class:`~contract.events.HealthChanged`) on the bus for each change; the
    alarms, metrics and the registration engine's recovery read those. :meth:`HealthMonitor.tick`
    (every :data:`LOG_INTERVAL`) logs one WARNING line per target that had failures in the interval.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from contract.documents import PushRecord
from contract.events import Event, HealthChanged
from contract.kinds import HealthState, HealthSubject, PushOutcome
from sipis.clock import Clock
from sipis.events import EventBus
from sipis.sip.register import Outcome, RegisterResult
from sipis.sip.transport import Flow

log = logging.getLogger(__name__)

#: failures in a row that make a known target ``down`` (one is enough for a target never seen up)
FAILURES_FOR_DOWN = 3
#: seconds between aggregated failure lines
LOG_INTERVAL = 60.0


def target_name(transport: str, host: str, port: int) -> str:
    """``transport:host:port``, one shared string per target."""
    return sys.intern(f"{transport}:{host}:{port}")


def failed(result: RegisterResult) -> bool:
    """The registrar did not answer: a timeout, a transport failure or a 5xx."""
    return result.outcome is Outcome.FAILED and (result.status == 408 or result.status >= 500)


def describe(result: RegisterResult) -> str:
    text = f"{result.status} {result.reason}".strip()
    return f"{text}: {result.detail}" if result.detail else text


@dataclass(slots=True)
class TargetHealth:
    subject: HealthSubject
    name: str
    state: HealthState = HealthState.UNKNOWN
    since: float = 0.0  # wall clock of the last change
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0  # in a row
    #: outcomes since the last aggregated log line
    window_ok: int = 0
    window_failed: int = 0
    window_error: str | None = None


class HealthMonitor:
    def __init__(self, bus: EventBus, clock: Clock) -> None:
        self.bus = bus
        self.clock = clock
        self.targets: dict[tuple[HealthSubject, str], TargetHealth] = {}
        self._unsubscribe = bus.subscribe(self._on_event)

    # ------------------------------------------------------------------ inputs

    def pbx_result(self, target: str, result: RegisterResult) -> None:
        if failed(result):
            self.failure(HealthSubject.PBX, target, describe(result))
        else:
            self.success(HealthSubject.PBX, target)

    def flow_lost(self, flow: Flow, reason: str) -> None:
        health = self.targets.get((HealthSubject.PBX, target_name(*flow.key)))
        if health is not None and health.state is HealthState.UP:
            self._note_error(health, f"connection lost: {reason}")
            self._set(health, HealthState.DEGRADED)

    def success(self, subject: HealthSubject, name: str) -> None:
        health = self.get(subject, name)
        health.failures = 0
        health.window_ok += 1
        self._set(health, HealthState.UP)

    def failure(self, subject: HealthSubject, name: str, error: str) -> None:
        health = self.get(subject, name)
        health.failures += 1
        health.window_failed += 1
        self._note_error(health, error)
        if health.state is HealthState.UNKNOWN or health.failures >= FAILURES_FOR_DOWN:
            self._set(health, HealthState.DOWN)
        elif health.state is HealthState.UP:
            self._set(health, HealthState.DEGRADED)

    def _on_event(self, event: Event) -> None:
        push = event.payload
        if not isinstance(push, PushRecord) or push.outcome == PushOutcome.PENDING:
            return
        if push.outcome == PushOutcome.REJECTED_TRANSIENT:
            error = f"{push.provider_code or ''} {push.provider_reason or push.error or 'failed'}".strip()
            self.failure(HealthSubject.PROVIDER, push.provider, error)
        else:  # accepted, or refused for this token only: the provider answered
            self.success(HealthSubject.PROVIDER, push.provider)

    # ------------------------------------------------------------------ reads

    def get(self, subject: HealthSubject, name: str) -> TargetHealth:
        health = self.targets.get((subject, name))
        if health is None:
            health = self.targets[(subject, name)] = TargetHealth(subject, sys.intern(name),
                                                                 since=self.clock.wall())
        return health

    def state(self, subject: HealthSubject, name: str) -> HealthState:
        health = self.targets.get((subject, name))
        return health.state if health is not None else HealthState.UNKNOWN

    def counts(self, subject: HealthSubject) -> dict[str, int]:
        """Targets per state (only states some target is in)."""
        result: dict[str, int] = {}
        for health in self.targets.values():
            if health.subject is subject:
                result[health.state.value] = result.get(health.state.value, 0) + 1
        return result

    # ------------------------------------------------------------------ the aggregated log

    def tick(self) -> None:
        """One WARNING line per target with failures since the last tick; nothing when all is well."""
        for health in self.targets.values():
            if health.window_failed:
                noun = "registrations" if health.subject is HealthSubject.PBX else "pushes"
                log.warning("%s %s — %d %s failing (%s), %d ok", health.subject.value, health.name,
                            health.window_failed, noun, health.window_error, health.window_ok)
            health.window_ok = health.window_failed = 0
            health.window_error = None

    def close(self) -> None:
        self._unsubscribe()

    # ------------------------------------------------------------------ internals

    def _note_error(self, health: TargetHealth, error: str) -> None:
        health.last_error, health.last_error_at = error, self.clock.wall()
        health.window_error = error

    def _set(self, health: TargetHealth, state: HealthState) -> None:
        if health.state is state:
            return
        previous, health.state, health.since = health.state, state, self.clock.wall()
        error = health.last_error if state is not HealthState.UP else None
        self.bus.publish(None, HealthChanged(health.subject, health.name, state, previous, error))

