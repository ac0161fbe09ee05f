"""The closed vocabularies of the contract. Values are the strings on the wire."""

from __future__ import annotations

from enum import StrEnum


class EventKind(StrEnum):
    """Every kind of event the core publishes on its bus (and streams to operators)."""

    CORE_STARTED = "core.started"
    CORE_STOPPED = "core.stopped"
    INSTANCE_ENROLLED = "instance.enrolled"
    INSTANCE_UPDATED = "instance.updated"
    INSTANCE_APP = "instance.app"
    INSTANCE_PUSH = "instance.push"
    INSTANCE_STATE = "instance.state"
    INSTANCE_DELETED = "instance.deleted"
    REGISTRATION = "registration"
    REGISTRATION_STATUS = "registration.status"
    CALL = "call"
    PUSH = "push"
    MESSAGE = "message"
    ALARM = "alarm"
    AUDIT = "audit"
    HEALTH = "health"  # a registrar target or push provider changed health state


class HealthState(StrEnum):
    """Health of one registrar target or push provider: never ``up`` until something showed it."""

    UNKNOWN = "unknown"
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"


class HealthSubject(StrEnum):
    """What a health state is about."""

    PBX = "pbx"  # one registrar target as resolved: ``transport:host:port``
    PROVIDER = "provider"  # one push provider, by its configured name


class AlarmKind(StrEnum):
    """Every alarm the core raises (the ``alarm`` field of an ``alarm`` event)."""

    UNAUTHORIZED = "unauthorized"  # the registrar refuses an instance's credentials
    PUSH_REJECTED = "push-rejected"  # a push ended without the provider accepting it
    STORAGE_FAILING = "storage-failing"  # storage cannot commit (disk full, I/O): app changes get 503
    # episodes (raised once, cleared when the cause ends; ``target`` names what they are about)
    PBX_DOWN = "pbx-down"  # a registrar target is down
    AUTH_FAILURES = "auth-failures"  # many instances of one registrar target refused within a window
    PROVIDER_DOWN = "provider-down"  # a push provider is down
    TOKEN_DEAD = "token-dead"  # many push tokens reported dead within a window


class AlarmState(StrEnum):
    """Where an alarm episode stands (the ``state`` of an ``alarm`` event)."""

    RAISED = "raised"
    CLEARED = "cleared"


class StreamNoticeKind(StrEnum):
    """Lines of the operator event stream that are not events."""

    HEARTBEAT = "heartbeat"
    GAP = "gap"  # events after ``since`` left the ring: reload the snapshots
    OVERFLOW = "overflow"  # this client fell behind and lost ``dropped`` events


class AppState(StrEnum):
    """What the app asked for and what we achieved (Acrobits' names in brackets)."""

    ACTIVE = "active"  # the app is in the foreground and registers itself (Idle)
    INACTIVE = "inactive"  # the app is asleep and the SIPIS is taking over (Registering)
    PROXIED = "proxied"  # the SIPIS holds a confirmed registration for it (Registered)
    OFF = "off"  # expired or disabled; credentials wiped (Off)


class RegStatus(StrEnum):
    """The registration engine's detail for one instance."""

    IDLE = "idle"
    REGISTERING = "registering"
    REGISTERED = "registered"
    UNREGISTERING = "unregistering"
    UNAUTHORIZED = "unauthorized"
    ERROR = "error"


class PushOutcome(StrEnum):
    """Where a push stands (``outcome`` of a push record)."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED_PERMANENT = "rejected-permanent"
    REJECTED_TRANSIENT = "rejected-transient"


class Role(StrEnum):
    """Operator roles, weakest first."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)
