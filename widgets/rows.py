"""Widget-only rows: what the ladder and the status strip draw.

Widgets render these and the contract's types (``contract/``: instance rows, pushes, events) and
nothing else; they never call the core. Times are wall-clock epoch seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    #: registrar targets per health state (all 0: nothing known yet)
    pbx_up: int = 0
    pbx_degraded: int = 0
    pbx_down: int = 0
    counts: dict[str, int] = field(default_factory=dict, compare=False)
    reg_status: dict[str, int] = field(default_factory=dict, compare=False)
    held_calls: int = 0
    calls_per_min: float = 0.0
    push_success_rate: float | None = None
    push_p50_ms: float | None = None
    push_p99_ms: float | None = None
    alarms: int = 0
    nodes_up: int = 1  # nodes up in the cluster (shown when more than one)
    operator: str = ""
    role: str = ""
    paused: bool = False
    connected: bool = True
