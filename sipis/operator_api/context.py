"""What the operator API reads and calls: the parts of the core, and the read models it keeps from
the bus (event ring, instance index) and the health of registrar targets and push providers."""

from __future__ import annotations

import asyncio
import logging
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
from sipis.operator_api.index import REG_STATUSES, STATES, InstanceIndex
from sipis.operator_api.merged import EventForwarder, MergedEvents
from sipis.operator_api.ring import EVENT_RING, EventRing
from sipis.push.delivery import PushDelivery
from sipis.service import InstanceService
from sipis.trace import TraceRecorder
from storage.cluster import Signals
from storage.repositories import Stores

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 15.0
#: seconds a cluster's counts read from storage are shown before they are read again
COUNTS_INTERVAL = 5.0


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
    #: a cluster's signals (None: one node): this node's events go to the other nodes' operators
    #: and theirs come in, every event is marked with its node, and the summary counts the cluster
    signals: Signals | None = None

    def __post_init__(self) -> None:
        in_cluster = self.signals is not None
        #: what operators see: this node's events and, in a cluster, the other nodes'
        self.merged = MergedEvents(self.bus, self.node if in_cluster else None)
        self.events = self.merged.bus
        self.forwarder: EventForwarder | None = None
        if self.signals is not None:
            self.signals.subscribe(self.merged.on_signal)
            self.forwarder = EventForwarder(self.bus, self.signals, self.node)
        self._counts: tuple[dict[str, int], dict[str, int]] | None = None
        self._counted_at = 0.0
        self._counting = asyncio.Lock()
        self.ring = EventRing(self.events, self.ring_size)
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
        self.merged.close()
        if self.forwarder is not None:
            self.forwarder.close()
        self.index.close()
        if self._own_health:
            self.targets.close()

    def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Instances per state and per registration status: kept by the index from the bus."""
        index = self.index
        index.sync()
        return dict(index.state_counts), dict(index.status_counts)

    async def summary_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """The summary's counts: this node's (:meth:`state_counts`), or in a cluster the whole
        cluster's, one storage read per :data:`COUNTS_INTERVAL` whatever the number of consoles
        (other nodes' registration results reach this node only through storage). While storage
        cannot be read the last counts stay; with none yet, this node's."""
        if self.signals is None or self.stores is None:
            return self.state_counts()
        async with self._counting:
            now = self.clock.monotonic()
            if self._counts is None or now - self._counted_at >= COUNTS_INTERVAL:
                try:
                    counted = await self.stores.instances.count_by_state_and_status()
                except Exception as exc:
                    log.warning("could not count the cluster's instances: %s", exc)
                else:
                    states = dict.fromkeys(STATES, 0)
                    statuses = dict.fromkeys(REG_STATUSES, 0)
                    for (state, status), count in counted.items():
                        states[state] = states.get(state, 0) + count
                        statuses[status] = statuses.get(status, 0) + count
                    self._counts = states, statuses
                self._counted_at = now
        return self._counts if self._counts is not None else self.state_counts()
