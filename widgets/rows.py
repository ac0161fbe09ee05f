"""Plain, immutable snapshot rows: the data contract between the console and its widgets.

Widgets render these and nothing else; they never call the core. The console builds them from the
operator API (``console/feed.py``) and keeps them current from the event stream. Times are wall-clock
epoch seconds; countdowns are computed from them at render time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """One instance in the instance list (operator API "Row")."""

    selector: str
    aor: str
    user: str = ""
    registrar: str = ""
    state: str = "inactive"  # active | inactive | proxied | off
    reg_status: str = "idle"  # idle | registering | registered | unregistering | unauthorized | error
    last_code: int | None = None
    last_reason: str | None = None
    expires_at: float | None = None
    next_refresh_at: float | None = None
    failure_count: int = 0
    backoff_until: float | None = None
    push_provider: str | None = None
    push_unreachable: bool = False
    last_push_outcome: str | None = None
    last_push_at: float | None = None
    app_last_seen: float | None = None


@dataclass(frozen=True, slots=True)
class CallRow:
    """A held (or recently ended) INVITE waiting for a woken app."""

    call_id: str
    push_id: str
    selector: str
    caller: str | None = None
    stage: str = "Alerting-Device"
    received_at: float | None = None
    outcome: str | None = None
    final_status: int | None = None
    t1_deadline: float | None = None  # wall clock, derived from t1_remaining when the view was taken
    t2_deadline: float | None = None
    push_outcome: str | None = None

    @property
    def held(self) -> bool:
        return self.outcome is None and self.stage != "Ended"


@dataclass(frozen=True, slots=True)
class PushRow:
    """One push request (a trace of its attempts and outcome)."""

    push_id: str
    selector: str
    at: float
    kind: str = "call"
    provider: str = ""
    call_id: str | None = None
    attempt: int = 0
    outcome: str = "pending"  # pending | accepted | rejected-permanent | rejected-transient
    provider_code: int | None = None
    provider_reason: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    replay_of: str | None = None
    stages: dict[str, float] = field(default_factory=dict, compare=False)
    request_summary: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class EventRow:
    """One event from the core's bus (also the instance timeline)."""

    seq: int
    at: float
    kind: str
    selector: str | None
    data: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class AuditRow:
    at: float
    operator: str
    role: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class SipMessageRow:
    """One SIP message from a trace (raw text already masked by the core)."""

    at: float
    direction: str  # "in" (PBX → SIPIS) | "out" (SIPIS → PBX)
    first_line: str
    raw: str = ""
    transport: str = ""
    local: str = ""
    remote: str = ""
    call_id: str | None = None
    cseq: str | None = None
    method: str | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class LadderRow:
    """One arrow of a ladder diagram between lanes (indices into the ladder's lane names)."""

    at: float
    source: int
    target: int
    label: str
    tone: str = ""  # ok | warn | bad | info | dim | accent | "" (plain)
    detail: str = ""  # what the side panel shows when the arrow is selected
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """Everything the status strip shows."""

    node: str = "?"
    version: str = ""
    uptime: float | None = None
    pbx_reachable: bool | None = None
    pbx_error: str | None = None
    counts: dict[str, int] = field(default_factory=dict, compare=False)
    reg_status: dict[str, int] = field(default_factory=dict, compare=False)
    held_calls: int = 0
    calls_per_min: float = 0.0
    push_success_rate: float | None = None
    push_p50_ms: float | None = None
    push_p99_ms: float | None = None
    alarms: int = 0
    operator: str = ""
    role: str = ""
    paused: bool = False
    connected: bool = True
