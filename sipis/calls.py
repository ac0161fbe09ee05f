"""Held calls: an INVITE for a sleeping app is held while a push wakes it, then released.

The flow (README, "Incoming calls"):

1. INVITE on our binding → ``100`` (transaction layer), then ``180 Ringing`` with
   ``X-Sipis-Push-Status: Alerting-Device`` and the call's ``X-Push-ID``; the push goes out and T1
   (wake timer) starts.
2. The provider accepts the push → another ``180`` with ``Push-Notification-Sent``.
3. The app's first progress report → ``180`` with ``Device-Making-Progress``; T1 stops, T2 (answer
   timer) starts.
4. The app reports ``active`` (or an operator hands back; the lifecycle owner tells its hand-back
   listeners, this manager among them) → our binding is removed first (we wait for the registrar's 200),
   then ``302 Moved Temporarily`` to the app's contact (or its AOR) — ``release = "redirect"`` — or
   ``480`` — ``release = "reject"``. The PBX delivers the call straight to the app.

Endings: T1 → ``no_response_status`` with ``X-Sipis-Reason: No-Response-From-Device``; T2 → ``480``
with ``Device-Did-Not-Answer``; a push rejected for good → ``480`` with ``Device-Unreachable``;
caller CANCEL → ``487`` (transaction layer) and a missed-call push, or an answered-elsewhere push
when the CANCEL carries ``Reason: SIP;cause=200``. Unknown instance → ``404`` (statelessly, by
:class:`~sipis.inbound.InboundGate` before any transaction exists); an instance this node
may not act for (off, disabled: :meth:`InstanceLifecycle.may_act`) → ``480``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from contract.documents import HeldCall as CallView
from contract.masking import mask
from sipis.clock import Clock
from sipis.config import CallsConfig
from sipis.events import EventBus
from sipis.inbound import instance_for
from sipis.instance import Instance
from sipis.lifecycle import InstanceLifecycle
from sipis.push.base import PushKind, Verdict
from sipis.push.delivery import PushDelivery, PushTrace
from sipis.push.eager import start_eagerly
from sipis.sip.endpoint import IncomingRequest
from sipis.sip.message import NameAddr, Request, SipParseError
from sipis.sip.register import RegisterResult
from sipis.timers import TimerHandle, Timers

log = logging.getLogger(__name__)

PUSH_STATUS = "X-Sipis-Push-Status"
REASON = "X-Sipis-Reason"
PUSH_ID = "X-Push-ID"
#: Ended calls kept for the console.
RECENT_CALLS = 1000
#: How long a release waits for the registrar to confirm the removal of our binding.
RELEASE_WAIT = 5.0


class Stage(StrEnum):
    ALERTING = "Alerting-Device"
    PUSH_SENT = "Push-Notification-Sent"
    PROGRESS = "Device-Making-Progress"
    RELEASING = "Releasing"
    ENDED = "Ended"


@dataclass(eq=False)
class HeldCall:
    call_id: str
    push_id: str
    selector: str
    incoming: IncomingRequest | None  # None once the call has ended: nothing answers it any more
    trace: PushTrace
    caller: str | None
    received_at: float  # wall clock
    stage: Stage = Stage.ALERTING
    t1_deadline: float | None = None  # monotonic
    t2_deadline: float | None = None
    outcome: str | None = None
    final_status: int | None = None
    timer: TimerHandle | None = field(default=None, repr=False)
    alerted: bool = field(default=False, repr=False)  # the first 180 is out

    def view(self, clock: Clock) -> CallView:
        """A snapshot for the ``call`` event, the operator API and the app (timers as seconds remaining)."""
        now = clock.monotonic()
        return CallView(
            self.call_id, self.push_id, self.selector, self.caller, self.stage.value, self.received_at,
            self.outcome, self.final_status,
            None if self.t1_deadline is None else max(0.0, self.t1_deadline - now),
            None if self.t2_deadline is None else max(0.0, self.t2_deadline - now))


class CallError(LookupError):
    """No such held call for this instance."""


class CallManager:
    def __init__(self, *, lifecycle: InstanceLifecycle, delivery: PushDelivery, bus: EventBus, clock: Clock,
                 timers: Timers, settings: CallsConfig | None = None) -> None:
        self.lifecycle = lifecycle
        self.delivery = delivery
        self.bus = bus
        self.clock = clock
        self.timers = timers
        self.settings = settings or CallsConfig()
        self.held: dict[str, HeldCall] = {}  # push_id → call
        self.recent: deque[HeldCall] = deque(maxlen=RECENT_CALLS)
        self.outcomes: dict[str, int] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        lifecycle.on_hand_back(self.app_active)

    # ------------------------------------------------------------------ SIP side

    def on_invite(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        instance = instance_for(self.lifecycle, request)
        if instance is None:
            self._count("unknown-instance")
            incoming.respond(404)
            return
        if not self.lifecycle.may_act(instance):
            self._count("instance-off")
            incoming.respond(480, headers=[(REASON, "Instance-Off")])
            return
        # From here until the push request is written the cyclic garbage collector is off: a
        # collection triggered by this handler's allocations (a young one takes ~0.5 ms, an older
        # one 5-100 ms) runs right after the push is out instead of holding it up.
        collecting = gc.isenabled()
        gc.disable()
        try:
            call = self._hold(instance, incoming, request)
        finally:
            if collecting:
                gc.enable()
        self._alert(call)
        if call.stage is not Stage.ENDED:  # a push that cannot go out (no provider, dead token) ended it
            call.timer = self.timers.call_later(self.settings.wake_timeout, lambda: self._t1_expired(call))

    def _hold(self, instance: Instance, incoming: IncomingRequest, request: Request) -> HeldCall:
        """Hold the call and start its push: started eagerly, the request is on the wire before the
        INVITE handler sends the 180 or publishes anything (issue 4: INVITE → push p99 ≤ 5 ms);
        with a provider that cannot be started that way, in a task."""
        caller = _caller(request)
        trace = self.delivery.new_trace(instance, PushKind.CALL, call_id=request.call_id, caller=caller[0],
                                        caller_display_name=caller[1])
        call = HeldCall(request.call_id, trace.push_id, instance.selector, incoming, trace, caller[0],
                        self.clock.wall())
        self.held[call.push_id] = call
        self.delivery.stamp(trace, "invite_received")  # published with push_sent, a moment later
        call.t1_deadline = self.clock.monotonic() + self.settings.wake_timeout
        incoming.on_cancel(lambda cancel: self._cancelled(call, cancel))
        if self.delivery.eager_safe(instance):
            self._track(start_eagerly(self._push_call(instance, call)))
        else:
            self._spawn(self._push_call(instance, call))
        return call

    async def _push_call(self, instance: Instance, call: HeldCall) -> None:
        outcome = await self.delivery.deliver(instance, call.trace, deadline=call.t1_deadline)
        self._alert(call)  # done already, unless the push ended without suspending (started eagerly)
        if call.stage is Stage.ENDED:
            return
        if outcome.accepted:
            if call.stage is Stage.ALERTING:
                self._provisional(call, Stage.PUSH_SENT)
                self._publish(call)
        elif outcome.verdict is Verdict.REJECTED_PERMANENT:
            self._end(call, 480, "Device-Unreachable", "push-rejected")

    def _alert(self, call: HeldCall) -> None:
        """The first ``180`` (Alerting-Device) and the call's first event, once."""
        if call.alerted:
            return
        call.alerted = True
        self._provisional(call, Stage.ALERTING)
        self._publish(call)

    def _provisional(self, call: HeldCall, stage: Stage) -> None:
        call.stage = stage
        if call.incoming is not None:
            call.incoming.respond(180, headers=[(PUSH_STATUS, stage.value), (PUSH_ID, call.push_id)])

    def _t1_expired(self, call: HeldCall) -> None:
        if call.stage in (Stage.ALERTING, Stage.PUSH_SENT):
            self._end(call, self.settings.no_response_status, "No-Response-From-Device", "no-response",
                      reason_phrase=self.settings.no_response_reason)

    def _t2_expired(self, call: HeldCall) -> None:
        if call.stage is Stage.PROGRESS:
            self._end(call, 480, "Device-Did-Not-Answer", "not-answered")

    def _cancelled(self, call: HeldCall, cancel: Request) -> None:
        """The caller cancelled: the 487 is already out; tell the app what happened to the call."""
        if call.stage is Stage.ENDED:
            return
        answered_elsewhere = _answered_elsewhere(cancel)
        self._finish(call, 487, "answered-elsewhere" if answered_elsewhere else "cancelled")
        instance = self.lifecycle.get(call.selector)
        if instance is not None:
            kind = PushKind.ANSWERED_ELSEWHERE if answered_elsewhere else PushKind.MISSED
            trace = self.delivery.new_trace(instance, kind, call_id=call.call_id, caller=call.caller)
            self._spawn(self.delivery.deliver(instance, trace,
                                              deadline=self.clock.monotonic() + self.settings.wake_timeout))

    # ------------------------------------------------------------------ app side

    def progress(self, selector: str, push_id: str) -> HeldCall:
        """The app is waking up for this call (first report only counts)."""
        call = self.held.get(push_id)
        if call is None or call.selector != selector:
            raise CallError(push_id)
        if call.stage in (Stage.ALERTING, Stage.PUSH_SENT):
            self._provisional(call, Stage.PROGRESS)
            self.delivery.stage(call.trace, "device_progress")
            if call.timer is not None:
                call.timer.cancel()
            call.t1_deadline = None
            call.t2_deadline = self.clock.monotonic() + self.settings.answer_timeout
            call.timer = self.timers.call_later(self.settings.answer_timeout, lambda: self._t2_expired(call))
            self._publish(call)
        return call

    def app_active(self, instance: Instance, removal: asyncio.Future[RegisterResult | None],
                   contact: str | None) -> None:
        """The app is back: once our binding is gone, hand every held call of it to the PBX again."""
        calls = [c for c in self.held.values() if c.selector == instance.selector and c.stage is not Stage.ENDED]
        for call in calls:
            call.stage = Stage.RELEASING
            self.delivery.stage(call.trace, "app_active")
            if call.timer is not None:
                call.timer.cancel()
            self._publish(call)
        if calls:
            self._spawn(self._release(instance, calls, removal, contact))

    async def _release(self, instance: Instance, calls: list[HeldCall],
                       removal: asyncio.Future[RegisterResult | None], contact: str | None) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(removal), RELEASE_WAIT)
        except TimeoutError:
            log.warning("binding removal for %s not confirmed in %.0f s; releasing anyway", mask(instance.selector),
                        RELEASE_WAIT)
        target = contact or instance.account.aor
        for call in calls:
            if call.stage is Stage.ENDED:
                continue
            if self.settings.release == "redirect":
                self._end(call, 302, "Released-To-App", "released", contact=target)
            else:
                self._end(call, 480, "Released-To-App", "released")

    # ------------------------------------------------------------------ endings

    def _end(self, call: HeldCall, status: int, reason: str, outcome: str, *, contact: str | None = None,
             reason_phrase: str | None = None) -> None:
        headers = [(REASON, reason), (PUSH_ID, call.push_id)]
        if contact is not None:
            headers.append(("Contact", f"<{contact}>"))
        if call.incoming is not None:
            call.incoming.respond(status, reason_phrase, headers=headers)
        self._finish(call, status, outcome)

    def _finish(self, call: HeldCall, status: int, outcome: str) -> None:
        if call.stage is Stage.ENDED:
            return
        call.stage, call.outcome, call.final_status = Stage.ENDED, outcome, status
        call.t1_deadline = call.t2_deadline = None
        if call.timer is not None:
            call.timer.cancel()
        # Ended calls stay in ``recent`` for the console: keep the summary, not the transaction,
        # request and timer behind it (they only cost memory and GC time from here on).
        call.incoming, call.timer = None, None
        self.delivery.stage(call.trace, "released" if outcome == "released" else "ended")
        self.held.pop(call.push_id, None)
        self.recent.append(call)
        self._count(outcome)
        self._publish(call)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _publish(self, call: HeldCall) -> None:
        self.bus.publish(call.selector, call.view(self.clock))

    def _spawn(self, coroutine: Any) -> None:
        self._track(asyncio.ensure_future(coroutine))

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("call task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Shutdown: end every held call (480, Shutting-Down) and stop their timers and pushes, so
        nothing publishes after storage has closed."""
        for call in list(self.held.values()):
            self._end(call, 480, "Shutting-Down", "shutdown")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)

    async def drain(self) -> None:
        """Wait for pushes and releases in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def views(self) -> list[CallView]:
        return [call.view(self.clock) for call in self.held.values()]


def _caller(request: Request) -> tuple[str | None, str | None]:
    try:
        sender: NameAddr = request.from_
    except SipParseError:
        return None, None
    return str(sender.uri), sender.display_name


def _answered_elsewhere(cancel: Request) -> bool:
    """RFC 3326 ``Reason: SIP;cause=200`` on a CANCEL means another device took the call."""
    for value in cancel.headers.get_all("Reason"):
        protocol, _, params = value.partition(";")
        if protocol.strip().upper() == "SIP" and "cause=200" in params.replace(" ", "").lower():
            return True
    return False
