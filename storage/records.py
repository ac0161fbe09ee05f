"""Storage's own row: the instance as it is kept on disk (with its encrypted password).

Events, audit entries and push records are stored and returned as the contract's types
(:mod:`contract.events`, :mod:`contract.documents`); only the instance row is storage's own.

Frozen and slotted: a record is a snapshot, changed with :func:`dataclasses.replace`. Times are
wall-clock epoch seconds (storage never sees the core's monotonic clock). Sensitive fields are left
out of ``repr`` so a record in a log line or a traceback leaks nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
