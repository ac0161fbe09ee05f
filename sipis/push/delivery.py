"""Push delivery: pick the provider and token, retry inside the remaining wake time, record it all.

Every push gets a :class:`PushTrace` — kind, provider, attempts, outcome and the time of each stage
(``invite_received → push_sent → provider_accepted → device_progress → app_active → released`` or
``ended``). Each change to a trace is published on the bus as a ``push`` event; storage follows
from there. A dead token marks the instance's push target unreachable (visible, no more pushes to
it). VoIP tokens are used only for calls. Operators can replay a push or send a test push; both are
audited with the operator's name.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from contract.documents import PushRecord
from contract.events import Alarm, InstancePushChanged
from contract.kinds import AlarmKind
from sipis.clock import Clock
from sipis.events import EventBus
from sipis.instance import Instance, mask
from sipis.push.base import PushKind, PushOutcome, PushProvider, PushRequest, Verdict

log = logging.getLogger(__name__)

#: Traces kept in memory for replay and the console (older ones live in storage).
RECENT_TRACES = 10_000


def new_push_id() -> str:
    return str(uuid.uuid4())


@dataclass(slots=True, eq=False)
class PushTrace(PushRecord):
    """A push in flight: its :class:`PushRecord`, changed here as the push goes on (``kind`` holds
    the :class:`PushKind` member), plus what it takes to send it again — no secrets: the token is
    read from the instance at replay. What gets published is :meth:`record`, a copy."""

    caller: str | None = None
    caller_display_name: str | None = None
    message: str | None = None
    #: a publication is scheduled (:meth:`PushDelivery._publish_soon`)
    publish_pending: bool = field(default=False, repr=False)

    @property
    def push_kind(self) -> PushKind:
        return PushKind(self.kind)

    def record(self) -> PushRecord:
        """The trace as it is now (the ``push`` event and the operator API's push document)."""
        return PushRecord(
            self.push_id, self.selector, str(self.kind), self.provider, self.call_id, self.attempt, self.outcome,
            self.provider_code, self.provider_reason, self.latency_ms, self.error, self.replay_of,
            dict(self.stages), self.request_summary)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base: float = 0.25
    backoff_max: float = 8.0


class PushDelivery:
    def __init__(self, providers: dict[str, PushProvider], bus: EventBus, clock: Clock, *,
                 retry: RetryPolicy | None = None, rng: random.Random | None = None) -> None:
        self.providers = providers
        self.bus = bus
        self.clock = clock
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()
        self.traces: OrderedDict[str, PushTrace] = OrderedDict()

    # ------------------------------------------------------------------ traces

    def trace(self, push_id: str) -> PushTrace | None:
        return self.traces.get(push_id)

    def stage(self, trace: PushTrace, name: str) -> None:
        """Record that a stage was reached (first time only) and publish the trace."""
        if self.stamp(trace, name):
            self._publish(trace)

    def stamp(self, trace: PushTrace, name: str) -> bool:
        """Record that a stage was reached (first time only), without publishing: the next
        publication of the trace carries it. True if it was new."""
        if name in trace.stages:
            return False
        trace.stages[name] = self.clock.wall()
        return True

    def eager_safe(self, instance: Instance) -> bool:
        """Can :meth:`deliver` for ``instance`` be started eagerly (:mod:`sipis.push.eager`)?
        Yes when it ends at once (no provider, dead token) or the provider says its ``send`` is
        safe to run outside a task of its own until it first suspends (``eager_send``)."""
        provider = self.providers.get(instance.push.provider)
        return provider is None or instance.push.unreachable or bool(getattr(provider, "eager_send", False))

    def _publish(self, trace: PushTrace) -> None:
        trace.publish_pending = False
        self.bus.publish(trace.selector, trace.record())

    def _publish_soon(self, trace: PushTrace) -> None:
        """Publish the trace in the loop's next turn, unless it is published before that anyway
        (the event shows the trace as it is then)."""
        if not trace.publish_pending:
            trace.publish_pending = True
            asyncio.get_running_loop().call_soon(self._publish_pending, trace)

    def _publish_pending(self, trace: PushTrace) -> None:
        if trace.publish_pending:
            self._publish(trace)

    def _remember(self, trace: PushTrace) -> None:
        self.traces[trace.push_id] = trace
        while len(self.traces) > RECENT_TRACES:
            self.traces.popitem(last=False)

    # ------------------------------------------------------------------ sending

    def new_trace(self, instance: Instance, kind: PushKind, *, push_id: str | None = None,
                  call_id: str | None = None, caller: str | None = None, caller_display_name: str | None = None,
                  message: str | None = None, replay_of: str | None = None) -> PushTrace:
        trace = PushTrace(push_id or new_push_id(), instance.selector, kind, instance.push.provider,
                          call_id=call_id, replay_of=replay_of, caller=caller,
                          caller_display_name=caller_display_name, message=message)
        self._remember(trace)
        return trace

    async def deliver(self, instance: Instance, trace: PushTrace, *, deadline: float | None = None) -> PushOutcome:
        """Send the push, retrying transient failures while ``deadline`` (monotonic) allows."""
        provider = self.providers.get(instance.push.provider)
        if provider is None:
            return self._finish(trace, PushOutcome(Verdict.REJECTED_PERMANENT,
                                                   error=f"no push provider '{instance.push.provider}' configured"))
        if instance.push.unreachable:
            return self._finish(trace, PushOutcome(Verdict.REJECTED_PERMANENT,
                                                   error="device unreachable: its token was reported dead"))
        outcome = PushOutcome(Verdict.REJECTED_TRANSIENT, error="not sent")
        while trace.attempt < self.retry.max_attempts:
            trace.attempt += 1
            request = self._request(instance, trace, deadline)
            trace.request_summary = _summary(request, provider)
            if self.stamp(trace, "push_sent"):
                # published a moment later, once ``send`` has written the request (it does so
                # before it first waits) and the caller's handler has returned to the loop
                self._publish_soon(trace)
            outcome = await provider.send(request)
            if outcome.verdict is not Verdict.REJECTED_TRANSIENT:
                break
            delay = self._retry_delay(trace.attempt, outcome.retry_after)
            if deadline is not None and self.clock.monotonic() + delay >= deadline:
                break
            self._record(trace, outcome)
            self._publish(trace)
            await asyncio.sleep(delay)
        if outcome.token_dead:
            self._token_dead(instance, trace, outcome)
        return self._finish(trace, outcome)

    def _request(self, instance: Instance, trace: PushTrace, deadline: float | None) -> PushRequest:
        push = instance.push
        use_voip = trace.kind == PushKind.CALL and push.voip_token is not None
        remaining = deadline - self.clock.monotonic() if deadline is not None else 3600.0
        return PushRequest(
            push_id=trace.push_id, kind=trace.push_kind, selector=instance.selector, app_id=push.app_id,
            token=push.voip_token if use_voip and push.voip_token else push.token, voip=use_voip,
            sent_at=self.clock.wall(), ttl=max(1.0, remaining), call_id=trace.call_id, caller=trace.caller,
            caller_display_name=trace.caller_display_name, user_name=instance.account.username,
            user_display_name=instance.account.display_name, message=trace.message,
        )

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None and retry_after > 0:
            return retry_after
        base = min(self.retry.backoff_max, self.retry.backoff_base * float(2 ** (attempt - 1)))
        return base * self.rng.uniform(0.5, 1.0)

    def _record(self, trace: PushTrace, outcome: PushOutcome) -> None:
        trace.outcome = outcome.verdict.value
        trace.provider_code = outcome.provider_code
        trace.provider_reason = outcome.provider_reason
        trace.latency_ms = outcome.latency_ms
        trace.error = outcome.error

    def _finish(self, trace: PushTrace, outcome: PushOutcome) -> PushOutcome:
        self._record(trace, outcome)
        if outcome.accepted:
            trace.stages.setdefault("provider_accepted", self.clock.wall())
        self._publish(trace)
        if not outcome.accepted:
            self.bus.publish(trace.selector, Alarm(AlarmKind.PUSH_REJECTED, push_id=trace.push_id,
                                                   outcome=outcome.verdict.value, code=outcome.provider_code,
                                                   reason=outcome.provider_reason or outcome.error))
        return outcome

    def _token_dead(self, instance: Instance, trace: PushTrace, outcome: PushOutcome) -> None:
        instance.push.unreachable = True
        log.warning("push token of %s reported dead by %s (%s)", mask(instance.selector), trace.provider,
                    outcome.provider_reason)
        self.bus.publish(instance.selector, InstancePushChanged(
            unreachable=True, push_id=trace.push_id, reason=outcome.provider_reason or "token dead"))

    async def close(self) -> None:
        for provider in self.providers.values():
            try:
                await provider.close()
            except Exception:
                log.exception("closing push provider %s failed", provider.name)


def _summary(request: PushRequest, provider: PushProvider) -> dict[str, Any]:
    return {"provider": provider.name, "type": provider.type, "kind": request.kind.value, "app_id": request.app_id,
            "token": mask(request.token), "voip": request.voip, "ttl": round(request.ttl, 3),
            "call_id": request.call_id}
