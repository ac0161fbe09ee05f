"""Clean-up that keeps storage from growing for ever: one job, run every hour.

* Each node prunes its own event log to the newest :data:`EVENTS_KEPT` events (on PostgreSQL the
  log is keyed by node, so no two nodes prune the same rows).
* Forgetting nodes that are long gone is cluster-wide: only the node holding the ``housekeeping``
  singleton (an advisory lock on PostgreSQL; always this node on SQLite) does it, and when that
  node dies its lock goes with its connection and the next node's hourly run takes the job over.

Ageing needs no singleton: every instance is aged by its owner only (:mod:`sipis.ageing`).
"""

from __future__ import annotations

import asyncio
import logging

from sipis.clock import Clock
from sipis.tasks import cancel_and_wait
from storage.cluster import NodeStore, Singleton
from storage.repositories import EventLog

log = logging.getLogger(__name__)

#: seconds between two runs
INTERVAL = 3600.0
#: events each node keeps (the operator API's history and the console's event log read the newest)
EVENTS_KEPT = 500_000
#: a node silent this long and holding no instance is dropped from the nodes list (seconds)
FORGET_AFTER = 24 * 3600.0
SINGLETON = "housekeeping"


class Housekeeping:
    def __init__(self, *, events: EventLog, nodes: NodeStore, singleton: Singleton, clock: Clock,
                 lease_ttl: float) -> None:
        self.events = events
        self.nodes = nodes
        self.singleton = singleton
        self.clock = clock
        self.lease_ttl = lease_ttl
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> None:
        """One clean-up; a storage failure is logged and waits for the next run."""
        try:
            pruned = await self.events.prune(EVENTS_KEPT)
            if pruned:
                log.info("housekeeping: %d old events pruned", pruned)
            if not await self.singleton.try_hold(SINGLETON):
                return
            now = self.clock.wall()
            for node in await self.nodes.nodes(gone_after=self.lease_ttl):
                if node.state == "gone" and node.instances == 0 and now - node.last_seen > FORGET_AFTER:
                    await self.nodes.forget(node.name)
                    log.info("housekeeping: node %s forgotten (silent since %.0f s)", node.name,
                             now - node.last_seen)
        except Exception as exc:  # storage down: the next run tries again
            log.warning("housekeeping failed: %s", exc)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="housekeeping")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            await self.run_once()
