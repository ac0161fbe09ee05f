"""What the operator API reads and calls: the parts of the core, and the read models it keeps from
the bus (event ring, instance index) and the health of registrar targets and push providers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from contract.documents import WriterStatus
from sipis.calls import CallManager
from sipis.clock import Clock
from sipis.cluster import ClusterView
from sipis.config import OperatorToken
from sipis.config.model import package_version
from sipis.events import EventBus, EventQueue
from sipis.health import HealthMonitor
from sipis.operations import Operations
from sipis.operator_api.auth import Authenticator, OperatorSessions
from sipis.operator_api.index import InstanceIndex
from sipis.operator_api.ring import EVENT_RING, EventRing
from sipis.push.delivery import PushDelivery
from sipis.service import InstanceService
from sipis.trace import TraceRecorder
from storage.repositories import Stores

HEARTBEAT_INTERVAL = 15.0


VERSION = package_version()


@dataclass(eq=False)
class OperatorContext:
    """What the operator API reads and calls. The core builds one; tests build one from a small world."""

    service: InstanceService
    calls: CallManager
    delivery: PushDelivery
    operations: Operations
    bus: EventBus
    clock: Clock
    trace: TraceRecorder
    sessions: OperatorSessions = field(default_factory=OperatorSessions)
    tokens: tuple[OperatorToken, ...] = ()
    stores: Stores | None = None
    writer_status: Callable[[], WriterStatus] | None = None
    node: str = ""
    version: str = VERSION
    started_at: float = 0.0
    default_registrar: str | None = None
    heartbeat: float = HEARTBEAT_INTERVAL
    ring_size: int = EVENT_RING
    #: registrar targets and push providers (the core shares its own; else one fed from the bus only)
    health: HealthMonitor | None = None
    #: the cluster's nodes and owners (None: one node)
    cluster: ClusterView | None = None

    def __post_init__(self) -> None:
        self.ring = EventRing(self.bus, self.ring_size)
        self.index = InstanceIndex(self.service, self.bus, self.default_registrar)
        self._own_health = self.health is None
        self.targets = self.health if self.health is not None else HealthMonitor(self.bus, self.clock)
        if self.cluster is not None:
            self.index.owner_of = self.cluster.owner
        self.auth = Authenticator(self.tokens, self.sessions)
        self.streams: set[EventQueue] = set()

    def close_streams(self) -> None:
        """End every open event stream (server shutdown)."""
        for queue in list(self.streams):
            queue.close_stream()

    def close(self) -> None:
        self.close_streams()
        self.ring.close()
        self.index.close()
        if self._own_health:
            self.targets.close()

    def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Instances per state and per registration status: kept by the index from the bus."""
        index = self.index
        index.sync()
        return dict(index.state_counts), dict(index.status_counts)
