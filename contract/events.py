"""One payload type per event kind, and the envelope every event travels in.

The bus publishes ``Event(seq, at, selector, payload)``; ``event.kind`` is the payload's ``KIND``.
Payload objects are never changed after they are published (they are not frozen only because a
frozen dataclass costs twice as much to build, and the registration engine publishes thousands a
second). Some payloads are also documents of the operator API: a ``push`` event carries a
:class:`~contract.documents.PushRecord`, a ``call`` event a :class:`~contract.documents.HeldCall`,
an ``audit`` event an :class:`~contract.documents.AuditEntry`.

On the wire (``docs/operator-api.md``) an event is ``{"seq", "at", "kind", "selector", "data"}``,
and ``"node"`` in a cluster; ``data`` holds the payload's fields. Payloads whose ``OMIT_NONE`` is
true leave out their optional fields while those are ``None`` (they describe one of several things
that happened).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from contract.documents import AuditEntry, HeldCall, InstanceRow, InstanceView, PushRecord, SipMessage
from contract.kinds import (
    AlarmKind,
    AlarmState,
    AppState,
    EventKind,
    HealthState,
    HealthSubject,
    RegStatus,
    StreamNoticeKind,
)


@dataclass(slots=True)
class CoreStarted:
    KIND: ClassVar[EventKind] = EventKind.CORE_STARTED
    OMIT_NONE: ClassVar[bool] = False
    restored: int
    node: str


@dataclass(slots=True)
class CoreStopped:
    KIND: ClassVar[EventKind] = EventKind.CORE_STOPPED
    OMIT_NONE: ClassVar[bool] = False


@dataclass(slots=True)
class InstanceEnrolled:
    """A new instance was enrolled by its app."""

    KIND: ClassVar[EventKind] = EventKind.INSTANCE_ENROLLED
    OMIT_NONE: ClassVar[bool] = False
    aor: str


@dataclass(slots=True)
class InstanceUpdated:
    """An existing instance was enrolled again (new account data, push target or token)."""

    KIND: ClassVar[EventKind] = EventKind.INSTANCE_UPDATED
    OMIT_NONE: ClassVar[bool] = False
    credentials_changed: bool


@dataclass(slots=True)
class InstanceAppReport:
    """The app reported its state (``active`` with its own contact, or ``inactive``)."""

    KIND: ClassVar[EventKind] = EventKind.INSTANCE_APP
    OMIT_NONE: ClassVar[bool] = False
    reported: str
    contact: str | None


@dataclass(slots=True)
class InstancePushChanged:
    """The push target changed: a new one from the app (``provider``), or the provider reported
    its token dead (``unreachable``, with the push that found out and why)."""

    KIND: ClassVar[EventKind] = EventKind.INSTANCE_PUSH
    OMIT_NONE: ClassVar[bool] = True
    provider: str | None = None
    unreachable: bool | None = None
    push_id: str | None = None
    reason: str | None = None


@dataclass(slots=True)
class InstanceStateChanged:
    KIND: ClassVar[EventKind] = EventKind.INSTANCE_STATE
    OMIT_NONE: ClassVar[bool] = True
    state: AppState
    previous: AppState
    reason: str | None = None


@dataclass(slots=True)
class InstanceDeleted:
    KIND: ClassVar[EventKind] = EventKind.INSTANCE_DELETED
    OMIT_NONE: ClassVar[bool] = False
    reason: str


@dataclass(slots=True)
class RegistrationStatusChanged:
    KIND: ClassVar[EventKind] = EventKind.REGISTRATION_STATUS
    OMIT_NONE: ClassVar[bool] = False
    status: RegStatus
    previous: RegStatus


@dataclass(slots=True)
class RegistrationResult:
    """One REGISTER exchange ended. ``result``: ``registered``, ``unauthorized``, ``error``,
    ``unregistered`` or ``unregister-failed``; the times are the instance's after it (wall clock);
    ``duration`` the seconds the exchange took (monotonic), when known."""

    KIND: ClassVar[EventKind] = EventKind.REGISTRATION
    OMIT_NONE: ClassVar[bool] = False
    result: str
    code: int
    reason: str
    expires: int
    detail: str
    failure_count: int
    next_refresh_at: float | None
    expires_at: float | None
    duration: float | None = None


@dataclass(slots=True)
class MessageReceived:
    """A SIP MESSAGE for a sleeping app (pushed unless it was a delivery notification)."""

    KIND: ClassVar[EventKind] = EventKind.MESSAGE
    OMIT_NONE: ClassVar[bool] = True
    pushed: bool
    content_type: str
    push_id: str | None = None
    bytes: int | None = None


@dataclass(slots=True)
class Alarm:
    """An alarm raised (or, for episodes, cleared) by the core; which fields are set depends on
    ``alarm``. Episodes (pbx-down, auth-failures, provider-down, token-dead, storage-failing) carry
    the episode's ``state``, ``id`` and the ``target`` they are about (none: the node); per-instance
    alarms (unauthorized, push-rejected) have no state: each is raised, never cleared."""

    KIND: ClassVar[EventKind] = EventKind.ALARM
    OMIT_NONE: ClassVar[bool] = True
    alarm: AlarmKind
    code: int | None = None
    reason: str | None = None
    push_id: str | None = None
    outcome: str | None = None
    state: AlarmState | None = None  # episodes only: raised or cleared
    target: str | None = None
    id: str | None = None


@dataclass(slots=True)
class HealthChanged:
    """A registrar target or push provider moved from ``previous`` to ``state``; ``error`` is the
    last failure seen (``"408 Request Timeout"``, ``"connect refused"``), if any."""

    KIND: ClassVar[EventKind] = EventKind.HEALTH
    OMIT_NONE: ClassVar[bool] = True
    subject: HealthSubject
    target: str
    state: HealthState
    previous: HealthState
    error: str | None = None


@dataclass(slots=True)
class UnknownPayload:
    """What a decoder makes of a kind it does not know (a newer core): kept, shown raw."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    OMIT_NONE: ClassVar[bool] = False


Payload = (CoreStarted | CoreStopped | InstanceEnrolled | InstanceUpdated | InstanceAppReport
           | InstancePushChanged | InstanceStateChanged | InstanceDeleted | RegistrationStatusChanged
           | RegistrationResult | MessageReceived | Alarm | HealthChanged | PushRecord | HeldCall | AuditEntry)

#: event kind → payload type: every kind has exactly one (checked in tests/contract)
PAYLOADS: dict[EventKind, type[Payload]] = {
    cls.KIND: cls for cls in (
        CoreStarted, CoreStopped, InstanceEnrolled, InstanceUpdated, InstanceAppReport, InstancePushChanged,
        InstanceStateChanged, InstanceDeleted, RegistrationStatusChanged, RegistrationResult, MessageReceived,
        Alarm, HealthChanged, PushRecord, HeldCall, AuditEntry)
}


@dataclass(slots=True)
class Event:
    """One published fact. ``at`` is wall-clock epoch seconds; ``selector`` the instance it is
    about, if any; ``node`` the node it happened on, set in a cluster only (on the operator stream
    every event of a cluster carries it; one node leaves it out)."""

    seq: int
    at: float
    selector: str | None
    payload: Payload | UnknownPayload
    node: str | None = None

    @property
    def kind(self) -> str:
        payload = self.payload
        return payload.kind if isinstance(payload, UnknownPayload) else payload.KIND


@dataclass(slots=True)
class StreamNotice:
    """A line of the operator event stream that is not an event: a heartbeat (``seq`` = the last
    event seq sent), a gap (events after ``since`` are gone; the replay goes on from
    ``first_available``) or an overflow (``dropped`` events lost for this client)."""

    kind: StreamNoticeKind
    at: float
    seq: int | None = None
    since: int | None = None
    first_available: int | None = None
    dropped: int | None = None


@dataclass(slots=True)
class InstanceDetail:
    """``GET /v1/instances/{selector}``: the instance, its list row, its last events (oldest
    first), its last pushes and the SIP messages kept for it."""

    instance: InstanceView
    row: InstanceRow
    timeline: list[Event]
    pushes: list[PushRecord]
    sip: list[SipMessage]
