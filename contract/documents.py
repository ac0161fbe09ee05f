"""Rows and response documents of the operator API (``docs/operator-api.md``).

Times are wall-clock epoch seconds. Row fields that hold a value of one of the enums in
:mod:`contract.kinds` are typed ``str``: the console keeps 100k rows and compares, sorts and
interns plain strings much faster than enum members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from contract.kinds import EventKind


@dataclass(slots=True)
class InstanceRow:
    """One instance in the instance list. ``registrar`` is the instance's own or the default one."""

    #: values that repeat across 100k rows: decoded into one shared string each (~27 MB of copies
    #: in a console otherwise)
    SHARED: ClassVar[tuple[str, ...]] = ("registrar", "state", "reg_status", "last_reason", "push_provider",
                                         "last_push_outcome", "registrar_agent")
    selector: str
    aor: str
    user: str = ""
    registrar: str | None = None
    state: str = "inactive"  # an AppState value
    reg_status: str = "idle"  # a RegStatus value
    last_code: int | None = None
    last_reason: str | None = None
    expires_at: float | None = None
    next_refresh_at: float | None = None
    failure_count: int = 0
    backoff_until: float | None = None
    push_provider: str | None = None
    push_unreachable: bool = False
    last_push_outcome: str | None = None  # a PushOutcome value
    last_push_at: float | None = None
    app_last_seen: float | None = None
    #: what the registrar says it is: the Server (else User-Agent) header of its last answer to us
    registrar_agent: str | None = None
    #: the node acting for it (a cluster; None: one node, or nobody holds its lease now)
    owner: str | None = None


@dataclass(slots=True)
class PushRecord:
    """One push request: its attempts, outcome and the time of each stage reached.

    ``kind``: call, missed, answered-elsewhere, text, test; ``outcome``: a PushOutcome value;
    stages ``invite_received``, ``push_sent``, ``provider_accepted``, ``device_progress``,
    ``app_active``, ``released``/``ended``. Also the payload of ``push`` events.
    """

    KIND: ClassVar[EventKind] = EventKind.PUSH
    OMIT_NONE: ClassVar[bool] = False
    push_id: str
    selector: str
    kind: str
    provider: str
    call_id: str | None = None
    attempt: int = 0
    outcome: str = "pending"
    provider_code: int | None = None
    provider_reason: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    replay_of: str | None = None
    stages: dict[str, float] = field(default_factory=dict)
    request_summary: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class HeldCall:
    """A held (or recently ended) INVITE waiting for a woken app; remaining timers in seconds as
    of when the view was taken. Also the payload of ``call`` events."""

    KIND: ClassVar[EventKind] = EventKind.CALL
    OMIT_NONE: ClassVar[bool] = False
    call_id: str
    push_id: str
    selector: str
    caller: str | None = None
    stage: str = "Alerting-Device"
    received_at: float = 0.0
    outcome: str | None = None
    final_status: int | None = None
    t1_remaining: float | None = None
    t2_remaining: float | None = None


@dataclass(slots=True)
class AuditEntry:
    """One operator action, whatever its outcome (``ok``, ``refused``, ``not-found``, ``conflict``,
    ``error`` or a push verdict). Also the payload of ``audit`` events."""

    KIND: ClassVar[EventKind] = EventKind.AUDIT
    OMIT_NONE: ClassVar[bool] = False
    id: str
    at: float
    operator: str
    role: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SipMessage:
    """One SIP message of a trace; ``raw`` has credentials masked. ``cseq`` is the CSeq number,
    ``method`` the request's (for a response its CSeq method), ``status`` null for requests."""

    at: float
    direction: str  # "in" (to the SIPIS) | "out"
    transport: str
    local: str
    remote: str
    first_line: str
    call_id: str | None = None
    cseq: int | None = None
    method: str | None = None
    status: int | None = None
    selector: str | None = None
    raw: str = ""


@dataclass(slots=True)
class PushView:
    """An instance's push target as anyone may see it: tokens masked."""

    provider: str
    app_id: str
    token: str | None
    voip_token: str | None
    unreachable: bool


@dataclass(slots=True)
class RegistrationView:
    status: str  # a RegStatus value
    last_code: int | None
    last_reason: str | None
    expires_at: float | None
    next_refresh_at: float | None
    failure_count: int
    backoff_until: float | None
    flow: str | None


@dataclass(slots=True)
class InstanceView:
    """Everything an app or operator may see of an instance: no password, no bearer token."""

    selector: str
    state: str  # an AppState value
    aor: str
    username: str
    auth_username: str | None
    registrar: str | None
    display_name: str | None
    instance_id: str
    reg_id: int
    push: PushView
    registration: RegistrationView
    app_contact: str | None
    app_last_seen: float
    created_at: float
    disabled: bool
    credentials_stored: bool


@dataclass(slots=True)
class InstancePage:
    """A page of the instance list. ``total``: all instances; ``matched``: after the query;
    ``counts``: per state among the query's matches, ignoring its state filter."""

    total: int
    matched: int
    counts: dict[str, int]
    items: list[InstanceRow]


@dataclass(slots=True)
class CallsSnapshot:
    held: list[HeldCall]
    recent: list[HeldCall]


@dataclass(slots=True)
class CallTrace:
    call_id: str
    selector: str | None
    messages: list[SipMessage]
    pushes: list[PushRecord]


@dataclass(slots=True)
class PushStats:
    """Over the last 1,000 finished pushes; rates and latencies null when there are none."""

    accepted: int
    rejected: int
    transient: int
    success_rate: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None


@dataclass(slots=True)
class PbxStatus:
    """``reachable``: no registrar target is down; ``last_error``: the newest error of a target that
    is not up; the counts: registrar targets per health state (all 0: nothing known yet)."""

    reachable: bool
    last_error: str | None
    up: int = 0
    degraded: int = 0
    down: int = 0
    unknown: int = 0


@dataclass(slots=True)
class HealthTarget:
    """One registrar target (``transport:host:port``) or push provider and its health; ``since``,
    ``last_error_at``: wall clock; ``instances``: how many registered there last (a PBX) or use it
    (a provider)."""

    subject: str
    target: str
    state: str
    since: float
    last_error: str | None
    last_error_at: float | None
    instances: int


@dataclass(slots=True)
class HealthTargets:
    """``GET /v1/health/targets``: PBX targets first, then providers, each by name."""

    targets: list[HealthTarget]


@dataclass(slots=True)
class AlarmRecord:
    """One alarm episode (wall-clock times); ``state``: raised or cleared."""

    id: str
    alarm: str
    target: str | None
    state: str
    raised_at: float
    reason: str | None
    cleared_at: float | None = None
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None


@dataclass(slots=True)
class AlarmList:
    """``GET /v1/alarms``: the active episodes (oldest first) and the last finished ones (newest first)."""

    active: list[AlarmRecord]
    history: list[AlarmRecord]


@dataclass(slots=True)
class WriterStatus:
    pending: int
    last_error: str | None


@dataclass(slots=True)
class Summary:
    node: str
    version: str
    started_at: float
    now: float
    counts: dict[str, int]
    reg_status: dict[str, int]
    held_calls: int
    calls_per_min: int
    outcomes: dict[str, int]
    push: PushStats
    pbx: PbxStatus
    writer: WriterStatus
    alarms: int
    #: nodes up in the cluster (this one included)
    nodes_up: int = 1


@dataclass(slots=True)
class NodeRow:
    """One node of the cluster (``GET /v1/nodes``)."""

    name: str
    state: str  # up | draining | gone
    instances: int
    #: seconds since the node last renewed its leases (its heartbeat), as this node sees it
    lease_lag: float
    started_at: float


@dataclass(slots=True)
class NodeList:
    nodes: list[NodeRow]


@dataclass(slots=True)
class Whoami:
    name: str
    role: str  # a Role value


@dataclass(slots=True)
class ActionResult:
    """The answer to an instance action: the instance as it is once the action started."""

    instance: InstanceView
    row: InstanceRow


@dataclass(slots=True)
class PushResult:
    push: PushRecord


@dataclass(slots=True)
class ErrorBody:
    """Every error answer: ``error`` is one of unauthorized, forbidden, not_found, conflict,
    validation_error."""

    error: str
    detail: str | None = None
