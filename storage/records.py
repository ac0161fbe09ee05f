"""The plain records the rest of the system exchanges with storage.

Frozen and slotted: a record is a snapshot, changed with :func:`dataclasses.replace`. Times are
wall-clock epoch seconds (storage never sees the core's monotonic clock). Sensitive fields are left
out of ``repr`` so a record in a log line or a traceback leaks nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One app instance whose SIP registration the SIPIS keeps on its behalf."""

    selector: str
    aor: str
    username: str
    auth_username: str | None
    password_blob: bytes | None = field(repr=False)  # SecretBox blob; None once wiped
    registrar: str | None
    display_name: str | None
    instance_id: str  # urn:uuid of the +sip.instance, without the prefix
    reg_id: int
    push_provider: str
    push_app_id: str
    push_token: str = field(repr=False)
    push_voip_token: str | None = field(repr=False)
    token_hash: str = field(repr=False)  # sha256 hex of the instance's bearer token
    state: str
    reg_status: str
    last_code: int | None
    last_reason: str | None
    expires_at: float | None
    failure_count: int
    app_contact: str | None
    app_last_seen: float
    created_at: float
    updated_at: float
    unregistered_since: float | None
    push_unreachable: bool
    disabled: bool


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event from the bus. ``seq`` is allocated by the bus (continue from ``EventLog.last_seq``)."""

    seq: int
    at: float
    kind: str
    selector: str | None
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One operator action. ``id`` is allocated by the caller (e.g. ``uuid4().hex``)."""

    id: str
    at: float
    operator: str
    role: str
    action: str
    target: str | None
    detail: dict[str, Any]
    outcome: str


@dataclass(frozen=True, slots=True)
class PushRecord:
    """One push request to a provider and what became of it.

    ``kind``: call / missed / answered-elsewhere / text / test.
    ``outcome``: pending / accepted / rejected-permanent / rejected-transient / error.
    ``provider_code`` is the provider's status (HTTP status for FCM/APNs/mediator); the provider's
    reason text goes to ``error``. ``stages`` maps a stage name to the wall time it was reached.
    """

    push_id: str
    selector: str
    call_id: str | None
    provider: str
    kind: str
    request_summary: dict[str, Any]
    outcome: str
    provider_code: int | None
    attempt: int
    replay_of: str | None
    stages: dict[str, float]
    latency_ms: float | None
    error: str | None
