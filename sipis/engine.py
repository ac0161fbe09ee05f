"""The registration engine: keeps every sleeping app registered at the PBX on its behalf.

Per instance it reconciles what is *wanted* (registered while the app sleeps, not registered while
the app is active, removed on DELETE) with what was *achieved*, one SIP exchange at a time. Timing
lives in one schedule keyed on monotonic time from the engine's :class:`Clock`; :meth:`tick` starts
whatever is due, so tests drive it with a fake clock and a scripted exchange function.

Policy (see README, "Registration engine"):

* refresh at ``refresh_min``–``refresh_max`` (default 50–80 %) of the granted expiry, jittered;
* 401/407 are answered by the REGISTER client; a repeated challenge or 403 → ``unauthorized``,
  retried only after ``unauthorized_retry`` (no hammering);
* 5xx honour ``Retry-After``; timeouts, transport errors and lost flows back off exponentially
  with jitter (``backoff_base`` doubling up to ``backoff_max``);
* every attempt not due by the clock alone is paced by a token bucket (``register_rate`` REGISTER
  transactions per second, a challenged REGISTER and its retry counting 2): start-up, take-over,
  re-registration (operator, changed credentials), removals (hand-back, DELETE, disable) and
  retries, so neither a restart, a PBX coming back nor a client flipping states or re-enrolling
  floods the registrar. Only refreshes of a confirmed registration run outside the bucket, on time;
  removals wait for the next token, never behind a burst of registrations;
* going ``active`` removes only our own contact (REGISTER with our Contact and expires=0);
* a registrar target that is ``down`` (``health`` events from :mod:`sipis.health`) holds no binding
  of ours as far as anyone can tell: the instances that registered there last are no longer
  ``proxied``, and one of them is retried every :data:`PROBE_INTERVAL` (paced) as a probe. The moment
  the target is ``up`` again, every instance waiting on it is retried at once, paced, instead of
  each after its own grown backoff.

The engine writes only the instance's ``registration``; the lifecycle owner (:mod:`sipis.lifecycle`)
installs itself as :attr:`RegistrationEngine.owner`, is asked :meth:`~Owner.may_act` before a
REGISTER for a binding starts, and is told what was :class:`Achieved` (it changes ``state``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from contract.events import Alarm, Event, HealthChanged, RegistrationResult, RegistrationStatusChanged
from contract.kinds import AlarmKind, HealthState, HealthSubject
from contract.masking import mask
from sipis.clock import Clock
from sipis.config import SipConfig
from sipis.events import EventBus
from sipis.instance import Instance, Registration, RegStatus
from sipis.sip.register import Outcome, RegisterResult
from sipis.sip.transport import Flow
from sipis.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Want(StrEnum):
    REGISTERED = "registered"
    UNREGISTERED = "unregistered"
    REMOVED = "removed"


#: REGISTER exchanges running at once, at most.
MAX_IN_FLIGHT = 2000


class Achieved(StrEnum):
    """What an exchange achieved while the engine is meant to hold the registration."""

    REGISTERED = "registered"  # a binding confirmed by the registrar
    LAPSED = "lapsed"  # no valid binding any more (failed and the last one expired)


class Owner(Protocol):
    """The lifecycle owner, as the engine sees it."""

    def may_act(self, instance: Instance) -> bool: ...

    def achieved(self, instance: Instance, what: Achieved) -> None: ...

    def fenced(self, instance: Instance) -> None:
        """The registrar refused our REGISTER as older than the binding's: another node owns it."""
        ...


class _NoOwner:
    """Until an owner installs itself: act for everyone, report to no one."""

    def may_act(self, instance: Instance) -> bool:
        return True

    def achieved(self, instance: Instance, what: Achieved) -> None:
        pass

    def fenced(self, instance: Instance) -> None:
        pass


@dataclass
class EngineStats:
    """How punctual the engine is: lateness of refreshes/removals against their due time."""

    unpaced_starts: int = 0
    max_lateness: float = 0.0
    late_over_1s: int = 0

    def note_unpaced_start(self, lateness: float) -> None:
        self.unpaced_starts += 1
        self.max_lateness = max(self.max_lateness, lateness)
        if lateness > 1.0:
            self.late_over_1s += 1


#: A registrar target that is down gets one REGISTER (an instance waiting on it) this often (seconds).
PROBE_INTERVAL = 5.0

#: The shortest sleep of :meth:`RegistrationEngine.run` between ticks (seconds).
MIN_TICK = 0.01


#: Seconds between warnings about exchanges not sent because the lease was gone.
FENCED_WARNING_INTERVAL = 60.0


#: The longest registrar agent string kept (a hostile registrar may send anything).
MAX_AGENT = 200


def _note_answer(reg: Registration, result: RegisterResult) -> None:
    """What the registrar answered: status, reason and who it says it is."""
    reg.last_code, reg.last_reason = result.status, _shared(result.reason)
    response = result.response
    if response is not None:
        agent = response.headers.get("Server") or response.headers.get("User-Agent")
        if agent:
            reg.registrar_agent = _shared(agent[:MAX_AGENT])


def _shared(text: str) -> str:
    """One string object for values that repeat across instances ("OK", a flow's name).

    Interned strings go away with their last user, so a registrar's odd reason phrases cost
    nothing once no registration remembers them.
    """
    return sys.intern(text)


#: Performs one REGISTER exchange for an instance: ``exchange(instance, expires)``.
Exchange = Callable[[Instance, int], Awaitable[RegisterResult]]


@dataclass(eq=False, slots=True)
class _Entry:
    """One instance's schedule. Slotted and without a list of its own: there is one per instance."""

    instance: Instance
    want: Want = Want.UNREGISTERED
    #: we hold (or may hold) a binding at the registrar that must be removed when unwanted
    bound: bool = False
    busy: bool = False
    due: float | None = None  # monotonic time of the next attempt
    queued: bool = False  # waiting in the paced ready queue
    #: the next attempt waits for a pacing token; only routine refreshes don't
    paced: bool = True
    #: futures of hand_back/remove waiting for the binding to be gone (None: nobody waits)
    waiters: list[asyncio.Future[RegisterResult | None]] | None = None


class RegistrationEngine:
    def __init__(self, exchange: Exchange, bus: EventBus, clock: Clock,
                 settings: SipConfig | None = None, rng: random.Random | None = None) -> None:
        self.exchange = exchange
        self.bus = bus
        self.clock = clock
        self.settings = settings or SipConfig()
        self.rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}
        #: (due, selector): stale pairs are skipped when popped (the entry's own ``due`` differs)
        self._heap: list[tuple[float, str]] = []
        self._ready: deque[str] = deque()
        #: paced removals: served before ``_ready`` (an app that is active again waits for one token)
        self._removals: deque[str] = deque()
        #: the bucket holds one second's worth (at least one token) and starts full
        self._tokens = max(1.0, self.settings.register_rate)
        #: tokens a paced attempt reserves when it starts: the transactions the last one used
        self._per_attempt = 1.0
        self._tokens_at = clock.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.attempts = 0
        self._fenced_count = 0
        self._fenced_warned_at = -FENCED_WARNING_INTERVAL
        self.stats = EngineStats()
        self._named_flow: Flow | None = None
        self._named_flow_text = ""
        #: the lifecycle owner (sipis.lifecycle installs itself)
        self.owner: Owner = _NoOwner()
        #: registrar targets that are down → monotonic time of their next probe
        self._down: dict[str, float] = {}
        bus.subscribe(self._on_health)

    # ------------------------------------------------------------------ public operations

    def take_over(self, instance: Instance, *, fresh: bool) -> None:
        """Register on the instance's behalf (the owner changed its state first). ``fresh``: the
        app just went to sleep, not a restart or a repeated take-over."""
        entry = self._entry(instance)
        entry.want = Want.REGISTERED
        if fresh:
            # not_registered_max_age counts from now, not from the last hand-back (sipis/ageing.py)
            instance.registration.unregistered_since = self.clock.wall()
        self._set_status(instance, RegStatus.REGISTERING)
        self._schedule(entry, self.clock.monotonic())

    def hand_back(self, instance: Instance) -> asyncio.Future[RegisterResult | None]:
        """The app is active again: drop only our binding. The future resolves once the registrar
        confirmed the removal (or at once, with None, when we held nothing)."""
        entry = self._entry(instance)
        entry.want = Want.UNREGISTERED
        return self._settle(entry)

    def remove(self, instance: Instance, *, paced: bool = True) -> asyncio.Future[RegisterResult | None]:
        """Forget the instance after removing our binding (DELETE, ageing, disable; unpaced only
        when the core stops)."""
        entry = self._entry(instance)
        entry.want = Want.REMOVED
        return self._settle(entry, paced=paced)

    def abandon(self, instance: Instance) -> None:
        """This node no longer owns the instance: stop at once, without unREGISTER (the new owner's
        REGISTER replaces our binding; ours lapses at its expiry). An exchange in flight ends
        unheeded; whoever waits for a removal is told None."""
        entry = self._entries.pop(instance.selector, None)
        if entry is None:
            return
        entry.want, entry.bound, entry.due = Want.UNREGISTERED, False, None
        waiters, entry.waiters = entry.waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def refresh_now(self, instance: Instance) -> None:
        """Re-register now, paced (operator action, changed credentials), if we are meant to hold
        a registration."""
        entry = self._entries.get(instance.selector)
        if entry is not None and entry.want is Want.REGISTERED:
            self._schedule(entry, self.clock.monotonic())

    def flow_lost(self, selectors: list[str]) -> None:
        """The flow these instances registered over died: re-register them soon, spread out."""
        now = self.clock.monotonic()
        for selector in selectors:
            entry = self._entries.get(selector)
            if entry is not None and entry.want is Want.REGISTERED:
                self._schedule(entry, now + self.rng.uniform(0.0, 2.0))

    def entries(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ registrar targets

    def _on_health(self, event: Event) -> None:
        change = event.payload
        if not isinstance(change, HealthChanged) or change.subject is not HealthSubject.PBX:
            return
        if change.state is HealthState.DOWN:
            self._down[change.target] = self.clock.monotonic() + PROBE_INTERVAL
            self._target_down(change.target)
            self._wake.set()
        else:
            self._down.pop(change.target, None)
            if change.state is HealthState.UP:
                self._target_up(change.target)

    def _waiting_on(self, target: str) -> list[_Entry]:
        """Instances meant to be registered whose last exchange went to ``target`` and failed."""
        return [entry for entry in self._entries.values()
                if entry.want is Want.REGISTERED and entry.instance.registration.target == target
                and entry.instance.registration.status is not RegStatus.REGISTERED]

    def _target_down(self, target: str) -> None:
        """Every binding at ``target`` counts as gone: its instances are no longer ``proxied``."""
        wall = self.clock.wall()
        for entry in self._entries.values():
            instance, reg = entry.instance, entry.instance.registration
            if entry.want is not Want.REGISTERED or reg.target != target or reg.expires_at is None:
                continue
            reg.expires_at = None
            if reg.unregistered_since is None:
                reg.unregistered_since = wall
            self.owner.achieved(instance, Achieved.LAPSED)
            if not entry.busy:
                self._set_status(instance, RegStatus.ERROR)

    def _target_up(self, target: str) -> None:
        """Everyone waiting on ``target`` is retried now, paced, whatever their backoff said."""
        now = self.clock.monotonic()
        waiting = [entry for entry in self._waiting_on(target) if not entry.busy]
        for entry in waiting:
            self._schedule(entry, now)
        if waiting:
            log.info("registrar %s is back: re-registering %d instances", target, len(waiting))

    def _probe(self, now: float) -> float | None:
        """Start the due probes of dead targets; the time of the next one."""
        for target, due in self._down.items():
            if due <= now:
                self._down[target] = now + PROBE_INTERVAL
                idle = next((entry for entry in self._waiting_on(target) if not entry.busy and not entry.queued),
                            None)
                if idle is not None:
                    self._schedule(idle, now)
        return min(self._down.values(), default=None)

    # ------------------------------------------------------------------ driving

    def tick(self) -> float | None:
        """Start what is due (within the pacing budget); return seconds until the next due item."""
        now = self.clock.monotonic()
        next_probe = self._probe(now) if self._down else None
        while self._heap and self._heap[0][0] <= now:
            due, selector = heapq.heappop(self._heap)
            entry = self._entries.get(selector)
            if entry is None or entry.due != due:
                continue
            entry.due = None  # also when already queued: a stale due would block every later _schedule
            if entry.queued:
                continue
            if not entry.paced and not entry.busy and len(self._tasks) < MAX_IN_FLIGHT:
                self.stats.note_unpaced_start(now - due)
                self._start(entry)  # a routine refresh or a removal: on time, outside the bucket
                continue
            entry.queued = True
            (self._ready if entry.want is Want.REGISTERED else self._removals).append(selector)
        self._refill_tokens(now)
        while self._tokens >= 1.0 and len(self._tasks) < MAX_IN_FLIGHT:
            queue = self._removals or self._ready
            if not queue:
                break
            entry = self._entries.get(queue.popleft())
            if entry is None:
                continue
            entry.queued = False
            if entry.busy:
                continue  # the running exchange reconciles when it finishes
            if entry.want is not Want.REGISTERED and not entry.bound:
                continue  # nothing to register and nothing to remove
            reserved = self._per_attempt
            if self._start(entry, reserved):
                self._tokens -= reserved
        if self._ready or self._removals:
            # tokens may be below zero: the last exchanges used more transactions than reserved
            return max(0.001, (1.0 - self._tokens) / self.settings.register_rate)
        due = min(self._heap[0][0] if self._heap else float("inf"), next_probe or float("inf"))
        return max(0.0, due - now) if due != float("inf") else None

    async def run(self) -> None:
        """Production driver: tick whenever something is due or new work arrives.

        Sleeps at least :data:`MIN_TICK` between ticks it schedules itself, so refreshes spread
        over time (hundreds a second at 100k instances) start a few per wake-up instead of one:
        each wake-up costs a timer and a future, and the delay is far below anything that counts
        as late. New work (``_wake``) is still picked up at once.
        """
        while True:
            delay = self.tick()
            if delay is not None:
                delay = max(delay, MIN_TICK)
            self._wake.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that lands in the same loop iteration as the wake-up (gh-86296), so stop() hung.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay if delay is not None else 3600):
                    await self._wake.wait()

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self.run(), name="registration-engine")

    async def stop(self, *, unregister: bool, timeout: float = 5.0) -> None:
        """Stop scheduling; with ``unregister`` remove every binding we hold first (paced)."""
        if unregister:
            futures = [self.remove(entry.instance, paced=False)
                       for entry in list(self._entries.values()) if entry.bound]
            if futures:
                self._wake.set()
                await asyncio.wait(futures, timeout=timeout)
        await cancel_and_wait(self._runner)
        self._runner = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    async def drain(self) -> None:
        """Wait for in-flight exchanges (tests)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    # ------------------------------------------------------------------ internals

    def _entry(self, instance: Instance) -> _Entry:
        entry = self._entries.get(instance.selector)
        if entry is None:
            entry = _Entry(instance)
            self._entries[instance.selector] = entry
        else:
            entry.instance = instance
        return entry

    def _settle(self, entry: _Entry, *, paced: bool = True) -> asyncio.Future[RegisterResult | None]:
        future: asyncio.Future[RegisterResult | None] = asyncio.get_running_loop().create_future()
        if not entry.bound and not entry.busy:
            self._finish_unwanted(entry, None)
            future.set_result(None)
            return future
        if entry.waiters is None:
            entry.waiters = []
        entry.waiters.append(future)
        if not entry.busy:
            self._schedule(entry, self.clock.monotonic(), paced=paced)
        return future

    def _schedule(self, entry: _Entry, due: float, *, paced: bool = True) -> None:
        """Plan the next attempt. ``paced`` attempts share the ``register_rate`` budget: all but the
        refreshes of a confirmed registration, which are never late because of a burst."""
        if entry.due is not None and entry.due <= due:
            entry.paced = entry.paced and paced
            return
        entry.paced = paced
        entry.due = due
        # The runner sleeps until the earliest due time it knows of; only an earlier one needs
        # it awake now (a refresh rescheduled 5 minutes ahead does not).
        earlier = not self._heap or due < self._heap[0][0]
        heapq.heappush(self._heap, (due, entry.instance.selector))
        if earlier:
            self._wake.set()

    def _refill_tokens(self, now: float) -> None:
        rate = self.settings.register_rate
        self._tokens = min(max(1.0, rate), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now

    def _start(self, entry: _Entry, reserved: float = 0.0) -> bool:
        """Start the entry's exchange, unless it is a REGISTER for a binding the owner says this
        node may not make now (its schedule is dropped: the owner takes the instance over again).
        ``reserved``: the pacing tokens taken for it (0: unpaced)."""
        if entry.want is Want.REGISTERED and not self.owner.may_act(entry.instance):
            entry.due = None
            return False
        entry.busy = True
        task = asyncio.create_task(self._attempt(entry, reserved))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _attempt(self, entry: _Entry, reserved: float) -> None:
        instance = entry.instance
        registering = entry.want is Want.REGISTERED
        expires = self.settings.register_expires if registering else 0
        if not registering:
            self._set_status(instance, RegStatus.UNREGISTERING)
        self.attempts += 1
        started = self.clock.monotonic()
        try:
            result = await self.exchange(instance, expires)
        except asyncio.CancelledError:
            entry.busy = False
            raise
        except Exception as exc:  # a bug in the exchange must not kill the engine
            log.exception("registration exchange failed for %s", mask(instance.selector))
            result = RegisterResult(Outcome.FAILED, 500, "Internal error", detail=str(exc))
        entry.busy = False
        duration = self.clock.monotonic() - started
        if self._entries.get(instance.selector) is not entry:
            return  # abandoned meanwhile: another node acts for the instance now
        if reserved:
            # charge what the exchange really sent (a challenged REGISTER and its retry: 2)
            self._tokens -= result.transactions - reserved
            self._per_attempt = float(max(1, result.transactions))
        if registering:
            self._after_register(entry, result, duration)
        else:
            self._after_unregister(entry, result, duration)

    def _after_register(self, entry: _Entry, result: RegisterResult, duration: float) -> None:
        instance, reg, now = entry.instance, entry.instance.registration, self.clock.monotonic()
        wall = self.clock.wall()
        if result.outcome is Outcome.FENCED:
            self._fenced(entry, result)
            return
        _note_answer(reg, result)
        if result.flow is not None:
            reg.flow = self._flow_name(result.flow)
        if result.target:
            reg.target = result.target
        if result.ok and result.expires > 0:
            entry.bound = True
            delay = result.expires * self.rng.uniform(self.settings.refresh_min, self.settings.refresh_max)
            reg.failure_count, reg.backoff_until = 0, None
            reg.expires_at = wall + result.expires
            reg.next_refresh_at = wall + delay
            reg.registered_at, reg.unregistered_since = wall, None
            self._set_status(instance, RegStatus.REGISTERED)
            if entry.want is Want.REGISTERED:  # not when the app took over meanwhile (hand_back)
                self.owner.achieved(instance, Achieved.REGISTERED)
            self._publish_registration(instance, result, "registered", duration)
            self._reconcile(entry, now + delay, paced=False)
            return
        if result.status == 408:
            entry.bound = True  # the REGISTER may have reached the registrar: remove it on hand-back
        reg.failure_count += 1
        if result.outcome is Outcome.UNAUTHORIZED:
            delay = self.settings.unauthorized_retry
            status = RegStatus.UNAUTHORIZED
        else:
            delay = self._backoff(reg.failure_count, result.retry_after)
            status = RegStatus.ERROR
        reg.backoff_until = wall + delay
        reg.next_refresh_at = wall + delay
        if result.target in self._down:
            reg.expires_at = None  # nothing answers there: whatever binding we had is gone
        if reg.expires_at is None or reg.expires_at <= wall:
            reg.expires_at = None
            if reg.unregistered_since is None:
                reg.unregistered_since = wall
            if entry.want is Want.REGISTERED:
                self.owner.achieved(instance, Achieved.LAPSED)
        self._set_status(instance, status)
        self._publish_registration(instance, result, status.value, duration)
        if status is RegStatus.UNAUTHORIZED:
            self.bus.publish(instance.selector, Alarm(AlarmKind.UNAUTHORIZED, code=result.status,
                                                      reason=result.reason))
        self._reconcile(entry, now + delay)

    def _fenced(self, entry: _Entry, result: RegisterResult) -> None:
        """This node's lease on the binding is gone: stop acting for the instance (no retry, no
        removal: the new owner's REGISTER replaces our binding) and tell the owner. A lease
        deadline passing fences many at once: one warning a minute says how many."""
        instance = entry.instance
        self._fenced_count += 1
        now = self.clock.monotonic()
        if now >= self._fenced_warned_at + FENCED_WARNING_INTERVAL:
            self._fenced_warned_at = now
            log.warning("stopped acting for %d instances whose lease is gone (last: %s, %s)", self._fenced_count,
                        mask(instance.selector), result.detail or result.reason)
            self._fenced_count = 0
        self.abandon(instance)
        self.owner.fenced(instance)

    def _after_unregister(self, entry: _Entry, result: RegisterResult, duration: float) -> None:
        instance = entry.instance
        reg = instance.registration
        _note_answer(reg, result)
        self._publish_registration(instance, result, "unregistered" if result.ok else "unregister-failed",
                                   duration)
        # Whatever the registrar said, our binding will lapse at its expiry; never loop on removal.
        entry.bound = False
        self._reconcile(entry, self.clock.monotonic(), result)

    def _reconcile(self, entry: _Entry, next_due: float, result: RegisterResult | None = None, *,
                   paced: bool = True) -> None:
        """After an exchange: do what is wanted now (it may have changed meanwhile)."""
        if entry.want is Want.REGISTERED:
            self._schedule(entry, next_due, paced=paced)
            return
        if entry.bound:
            self._schedule(entry, self.clock.monotonic())  # a registration raced the hand-back
            return
        self._finish_unwanted(entry, result)

    def _finish_unwanted(self, entry: _Entry, result: RegisterResult | None) -> None:
        instance, reg = entry.instance, entry.instance.registration
        reg.expires_at = reg.next_refresh_at = reg.backoff_until = None
        reg.failure_count = 0
        if reg.unregistered_since is None:
            reg.unregistered_since = self.clock.wall()
        self._set_status(instance, RegStatus.IDLE)
        entry.due = None
        if entry.want is Want.REMOVED:
            self._entries.pop(instance.selector, None)
        waiters, entry.waiters = entry.waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(result)

    def _flow_name(self, flow: Flow) -> str:
        """``str(flow)`` for the console: one string for all the instances on a flow, not one each."""
        if flow is not self._named_flow:
            self._named_flow, self._named_flow_text = flow, _shared(str(flow))
        return self._named_flow_text

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        if retry_after is not None and retry_after > 0:
            return min(retry_after, self.settings.backoff_max * 4)
        base = self.settings.backoff_base * float(2 ** min(failures - 1, 30))
        return min(self.settings.backoff_max, base) * self.rng.uniform(0.5, 1.0)

    def _set_status(self, instance: Instance, status: RegStatus) -> None:
        reg = instance.registration
        if reg.status is not status:
            old, reg.status = reg.status, status
            self.bus.publish(instance.selector, RegistrationStatusChanged(status, old))

    def _publish_registration(self, instance: Instance, result: RegisterResult, what: str,
                              duration: float) -> None:
        reg = instance.registration
        self.bus.publish(instance.selector, RegistrationResult(
            what, result.status, result.reason, result.expires, result.detail, reg.failure_count,
            reg.next_refresh_at, reg.expires_at, duration))
