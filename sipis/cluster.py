"""Which instances this node acts for: the lease keeper (DESIGN.md, §Cluster).

Every ``lease_ttl / 3`` (and on start) :class:`LeaseKeeper` heartbeats the node, renews every lease
it holds, then moves it toward its fair share (``ceil(instances / live nodes)``): it claims when
under it and releases its excess when over it, never more per round than ``register_rate`` allows
while other nodes are up (so a joining node takes over gradually; a node alone takes everything
at once, and the registration engine paces the REGISTERs as it always did). A draining node
releases everything, in the same paced batches.

What it owns is what its last successful renewal returned, until that renewal's start + ``ttl`` on
this node's monotonic clock: a node that cannot reach storage keeps acting until then, and not a
moment longer (by then another node may have claimed the lease). :meth:`LeaseKeeper.owns` is what
:meth:`InstanceLifecycle.may_act <sipis.lifecycle.InstanceLifecycle.may_act>` asks; the listener
(the lifecycle) is told what was acquired (register it with the lease's epoch) and lost (stop at
once, no unREGISTER: the new owner's REGISTER replaces the binding).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from contract.documents import NodeRow
from contract.masking import mask
from sipis.clock import Clock
from sipis.instance import Instance
from sipis.tasks import cancel_and_wait
from storage.cluster import Lease, LeaseStore, NodeStore, Signals

log = logging.getLogger(__name__)


def read_signal(topic: str, payload: str, *names: str, lists: tuple[str, ...] = ()) -> list[Any] | None:
    """The values of ``names`` in a signal's JSON object, in that order: strings, or lists for the
    names in ``lists``. None (and one WARNING) for anything else: a malformed signal is dropped,
    never fatal, and never coerced into a selector or node name."""
    try:
        message = json.loads(payload)
        values = [message[name] for name in names]
    except (ValueError, TypeError, KeyError):
        values = None
    if values is None or not all(isinstance(value, list if name in lists else str)
                                 for name, value in zip(names, values, strict=True)):
        log.warning("ignored a malformed %r signal", topic)
        return None
    return values

UP, DRAINING, GONE = "up", "draining", "gone"

#: The signal topic of a request to a node (payload: JSON with the node's name and the action).
NODE_TOPIC = "node"


class LeaseListener(Protocol):
    def acquired(self, leases: Sequence[Lease], *, reload: bool) -> None:
        """These instances are this node's now, each with the epoch its REGISTERs count in.
        ``reload``: this node's copies may be stale (taken from another node; not at start-up,
        when the rows were just loaded)."""
        ...

    def lost(self, selectors: Sequence[str]) -> None:
        """These are not this node's any more: stop acting for them at once."""
        ...


class LeaseKeeper:
    def __init__(self, *, node: str, leases: LeaseStore, nodes: NodeStore, clock: Clock, ttl: float,
                 register_rate: float) -> None:
        self.node = node
        self.leases = leases
        self.nodes = nodes
        self.clock = clock
        self.ttl = ttl
        self.interval = ttl / 3
        #: instances one round may claim or release while other nodes are up
        self.per_round = max(1, int(register_rate * self.interval))
        self.state = UP
        self.listener: LeaseListener | None = None
        #: how drain requests reach other nodes (None: one node)
        self.signals: Signals | None = None
        #: live nodes (up, this one included) at the last balancing round
        self.live_nodes = 1
        self._drained = asyncio.Event()
        #: selector → epoch of every lease held
        self._held: dict[str, int] = {}
        #: monotonic time our leases end unless renewed: the start of the last good renewal + ttl
        self._deadline = -math.inf
        #: given up locally (the registrar says another node owns them): released next round
        self._forfeited: set[str] = set()
        self._first = True
        self._storage_failing = False
        self._handed_over = 0
        self._drain_total = 0
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ questions

    def owns(self, selector: str) -> bool:
        return selector in self._held and self.clock.monotonic() < self._deadline

    def epoch(self, selector: str) -> int:
        return self._held.get(selector, 0)

    def held(self) -> int:
        return len(self._held)

    def lease_lag(self) -> float:
        """Seconds since the last successful renewal started (the console's "lease lag")."""
        return max(0.0, self.clock.monotonic() - (self._deadline - self.ttl))

    # ------------------------------------------------------------------ changes

    def forfeit(self, selector: str) -> None:
        """The registrar refused our REGISTER as outdated: the instance is not ours, whatever
        storage says; its lease goes back next round."""
        if self._held.pop(selector, None) is not None:
            self._forfeited.add(selector)

    async def new_epoch(self, selector: str) -> int | None:
        """A new epoch for a lease we hold (its CSeqs are used up); None: not ours any more."""
        leases = await self.leases.bump(self.node, [selector], self.ttl)
        if not leases:
            self._lose([selector])
            return None
        self._held[selector] = leases[0].epoch
        return leases[0].epoch

    async def claim_new(self, selector: str) -> None:
        """Take the instance this node just enrolled at once, whatever the shares (balancing moves
        it later if need be): its app may go to sleep right after enrolling. Storage failing: the
        next round claims it."""
        if self.state == DRAINING:
            return
        try:
            leases = await self.leases.claim(self.node, 1, self.ttl, selectors=[selector])
        except Exception as exc:  # the rounds take it later
            log.debug("claiming a new instance failed: %s", exc)
            return
        leases = [lease for lease in leases if lease.selector not in self._held]
        if leases:
            self._held.update((lease.selector, lease.epoch) for lease in leases)
            self._acquired(leases, reload=False)

    def drain(self) -> None:
        """Hand every instance over to the other nodes (paced), then hold nothing."""
        if self.state != DRAINING:
            self.state = DRAINING
            self._drain_total, self._handed_over = len(self._held), 0
            log.info("drain: handing over %d instances", self._drain_total)
        if not self._held:
            self._drained.set()

    async def drained(self, timeout: float) -> bool:
        """Wait until a drain handed everything over (True), for ``timeout`` seconds at most."""
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    async def request_drain(self, node: str) -> None:
        """Drain ``node``: this one at once, another through a signal."""
        if node == self.node:
            self.drain()
            return
        if self.signals is None:
            raise LookupError(f"no node {node} here")
        await self.signals.notify(NODE_TOPIC, json.dumps({"node": node, "action": "drain"}))

    def on_signal(self, topic: str, payload: str) -> None:
        """Requests to this node from any node's operator API (``sipis-console drain``)."""
        if topic != NODE_TOPIC:
            return
        fields = read_signal(topic, payload, "node", "action")
        if fields is None:
            return
        node, action = fields
        if node == self.node and action == "drain":
            self.drain()

    # ------------------------------------------------------------------ driving

    async def start(self) -> None:
        """The first round (what this node owns when it starts), then one every ttl/3."""
        await self.round()
        self._task = asyncio.create_task(self._run(), name="lease-keeper")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def round(self) -> None:
        """Heartbeat, renew, then claim toward the fair share or release the excess."""
        started = self.clock.monotonic()
        try:
            await self._round(started)
        except Exception as exc:  # storage unreachable: keep what we hold until the deadline
            if not self._storage_failing:
                self._storage_failing = True
                log.warning("leases not renewed (%s); acting for %d instances until the leases end "
                            "in %.1f s", exc, len(self._held), max(0.0, self._deadline - started))
            self.expire_if_due()
            return
        if self._storage_failing:
            self._storage_failing = False
            log.warning("leases renewed again: %d instances held", len(self._held))

    def expire_if_due(self) -> None:
        """Past the deadline every lease may be another node's: stop acting for all of them."""
        if self._held and self.clock.monotonic() >= self._deadline:
            log.warning("leases ended without renewal: stopped acting for %d instances", len(self._held))
            self._lose(list(self._held))

    async def _round(self, started: float) -> None:
        await self.nodes.heartbeat(self.node, self.state)
        if self._forfeited:
            forfeited, self._forfeited = list(self._forfeited), set()
            await self.leases.release(self.node, forfeited)
        renewed = await self.leases.renew(self.node, self.ttl)
        first = self._first  # at start-up: the instances were just loaded, no need to reload them
        if first and renewed:
            # held from a previous life of this node: the CSeqs it used are unknown, so a new epoch
            renewed = await self.leases.bump(self.node, [lease.selector for lease in renewed], self.ttl)
        self._first = False
        # Past our own deadline may_act said no, and the engine dropped every REGISTER it was about
        # to send: leases renewed after such a lapse are taken over again like fresh ones.
        lapsed = self.clock.monotonic() >= self._deadline
        self._deadline = started + self.ttl
        kept = {lease.selector: lease.epoch for lease in renewed}
        gone = [selector for selector in self._held if selector not in kept]
        if gone:
            self._lose(gone)
        fresh = [lease for lease in renewed if lapsed or lease.selector not in self._held]
        self._held = kept
        if fresh:  # the first round, or back after storage was lost and nobody took them meanwhile
            self._acquired(fresh, reload=not first)
        await self._balance(reload=not first)

    async def _balance(self, *, reload: bool) -> None:
        # a node silent for a lease's life is gone: its instances are shared out among the live ones
        others = sum(1 for record in await self.nodes.nodes(gone_after=self.ttl)
                     if record.state == UP and record.name != self.node)
        live = self.live_nodes = others + 1
        if self.state == DRAINING:
            if others:  # alone, it keeps everything: nobody would take over
                await self._release(min(self.per_round, len(self._held)))
            if not self._held:
                self._drained.set()
            return
        total = sum((await self.leases.counts()).values())
        share = math.ceil(total / live)
        alone = live == 1
        missing = share - len(self._held)
        if missing > 0:
            claimed = await self.leases.claim(self.node, missing if alone else min(missing, self.per_round),
                                              self.ttl)
            claimed = [lease for lease in claimed if lease.selector not in self._held]
            if claimed:
                self._held.update((lease.selector, lease.epoch) for lease in claimed)
                self._acquired(claimed, reload=reload)
        elif missing < 0 and not alone:
            await self._release(min(-missing, self.per_round))

    async def _release(self, count: int) -> None:
        """Give up ``count`` leases: stop acting first, then let them go (no unREGISTER; the next
        owner's REGISTER replaces our binding while ours is still valid: make-before-break)."""
        if count <= 0:
            return
        chosen = list(itertools.islice(self._held, count))
        self._lose(chosen)
        await self.leases.release(self.node, chosen)
        if self.state == DRAINING:
            self._handed_over += len(chosen)
            log.info("drain: %d/%d handed over", self._handed_over, self._drain_total)
            if not self._held:
                self._drained.set()

    def _acquired(self, leases: Sequence[Lease], *, reload: bool) -> None:
        if self.listener is not None:
            self.listener.acquired(leases, reload=reload)

    def _lose(self, selectors: Sequence[str]) -> None:
        for selector in selectors:
            self._held.pop(selector, None)
        if self.listener is not None:
            self.listener.lost(selectors)

    async def _run(self) -> None:
        while True:
            started = self.clock.monotonic()
            with contextlib.suppress(TimeoutError):
                # a storage call that hangs counts as a failed round; the deadline is checked after
                async with asyncio.timeout(self.interval):
                    await self.round()
            self.expire_if_due()
            now = self.clock.monotonic()
            wake = min(started + self.interval, self._deadline if self._held else math.inf)
            await asyncio.sleep(max(0.0, wake - now))


class ChangeSignal(Protocol):
    """Tells the other nodes of a stored change (:class:`InstanceSync`)."""

    async def changed(self, selector: str) -> None: ...


class Adopter(Protocol):
    """The lifecycle owner, as the sync sees it."""

    async def adopt(self, stored: Instance) -> None: ...

    async def deleted_elsewhere(self, selector: str) -> None: ...


#: The signal topic of a stored change of one instance (payload: JSON with its selector and the node).
INSTANCE_TOPIC = "instance"


class InstanceSync:
    """A change stored on one node reaches every node: the node that stored it signals the
    selector; every other node reloads the row and applies it (:meth:`Adopter.adopt`: the owner
    carries it out, the others mirror it). Registration results need no signal: each owner keeps
    its instances' rows, and the rows are the cluster's view.

    Reloads of one selector run one at a time and in order; a signal arriving during a reload
    reloads once more afterwards.
    """

    def __init__(self, *, node: str, signals: Signals, load: Callable[[str], Awaitable[Instance | None]],
                 adopter: Adopter) -> None:
        self.node = node
        self.signals = signals
        self.load = load
        self.adopter = adopter
        self._reloading: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

    def start(self) -> None:
        self.signals.subscribe(self._on_signal)

    async def changed(self, selector: str) -> None:
        """Tell the other nodes (after the change is stored). A lost signal is logged, not raised:
        the change is durable, and the app's retry stores and signals it again."""
        payload = json.dumps({"selector": selector, "node": self.node})
        try:
            await self.signals.notify(INSTANCE_TOPIC, payload)
        except Exception as exc:
            log.warning("could not signal a change of %s to the other nodes: %s", mask(selector), exc)

    def reload_soon(self, selector: str) -> None:
        if selector in self._reloading:
            self._again.add(selector)
            return
        self._reloading[selector] = asyncio.get_running_loop().create_task(self._reload(selector))

    async def wait(self) -> None:
        """Until every reload under way is done (tests)."""
        while self._reloading:
            await asyncio.wait(list(self._reloading.values()))

    def _on_signal(self, topic: str, payload: str) -> None:
        if topic != INSTANCE_TOPIC:
            return
        fields = read_signal(topic, payload, "selector", "node")
        if fields is None:
            return
        selector, node = fields
        if node != self.node:  # the node that stored the change applied it already
            self.reload_soon(selector)

    async def _reload(self, selector: str) -> None:
        try:
            while True:
                self._again.discard(selector)
                try:
                    stored = await self.load(selector)
                    if stored is None:
                        await self.adopter.deleted_elsewhere(selector)
                    else:
                        await self.adopter.adopt(stored)
                except Exception:
                    log.exception("applying a change of %s stored on another node failed", mask(selector))
                if selector not in self._again:
                    return
        finally:
            self._reloading.pop(selector, None)


#: The signal topic of an operator's action on an instance owned by another node (payload: JSON
#: with the selector, the action, the operator's name and role).
ACTION_TOPIC = "action"

#: Carries out an operator's action forwarded from another node: (action, selector, operator name, role).
ActionRunner = Callable[[str, str, str, str], Coroutine[Any, Any, None]]


class ClusterView:
    """The cluster as the operator API shows it (nodes, owners) and how an operator's action on an
    instance reaches the node that owns it."""

    def __init__(self, *, keeper: LeaseKeeper, signals: Signals, clock: Clock) -> None:
        self.keeper = keeper
        self.signals = signals
        self.clock = clock
        #: who owns what, as storage said at most ``keeper.interval`` ago (read when asked for)
        self._owners: dict[str, str | None] = {}
        self._owners_at = -math.inf
        self.run_action: ActionRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def node(self) -> str:
        return self.keeper.node

    def nodes_up(self) -> int:
        return self.keeper.live_nodes

    async def nodes(self) -> list[NodeRow]:
        now = self.clock.wall()
        return [NodeRow(record.name, record.state, record.instances, round(max(0.0, now - record.last_seen), 1),
                        record.started_at)
                for record in sorted(await self.keeper.nodes.nodes(gone_after=self.keeper.ttl), key=lambda r: r.name)]

    async def refresh_owners(self) -> None:
        """Read the owners again when the last read is older than a lease round."""
        now = self.clock.monotonic()
        if now - self._owners_at >= self.keeper.interval:
            self._owners = await self.keeper.leases.owners()
            self._owners_at = now

    def owner(self, selector: str) -> str | None:
        if self.keeper.owns(selector):
            return self.keeper.node
        owner = self._owners.get(selector)
        return None if owner == self.keeper.node else owner  # not ours any more, whatever the last read said

    async def forward(self, action: str, selector: str, operator: str, role: str) -> None:
        await self.signals.notify(ACTION_TOPIC, json.dumps(
            {"selector": selector, "action": action, "operator": operator, "role": role}))

    def on_signal(self, topic: str, payload: str) -> None:
        if topic != ACTION_TOPIC or self.run_action is None:
            return
        fields = read_signal(topic, payload, "action", "selector", "operator", "role")
        if fields is None:
            return
        action, selector, operator, role = fields
        if not self.keeper.owns(selector):
            return  # another node's (or nobody's: then nobody acts, and the operator sees it)
        task = asyncio.get_running_loop().create_task(self.run_action(action, selector, operator, role))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
