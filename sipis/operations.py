"""Operator actions in the core: checked against the operator's role here (not only in a UI) and
written to the audit log with the operator's name, whatever the outcome.

Actions and the role they need: ``take_over``, ``hand_back``, ``re_register``, ``test_push``,
``replay_push``, ``acknowledge_alarm`` (operator); ``disable``, ``drain`` of a node (admin). Audit
outcomes: ``ok`` (done or started — the registration result follows as events), ``refused`` (role),
``not-found``, ``conflict`` (the instance's state does not allow it), ``forwarded`` (another node
owns the instance: it carries the action out and audits it again, with the same operator's name),
or a push verdict for pushes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from contract.documents import AlarmRecord, AuditEntry
from contract.masking import mask
from sipis.alarms import AlarmBoard
from sipis.clock import Clock
from sipis.cluster import ClusterView
from sipis.events import EventBus
from sipis.instance import Instance
from sipis.lifecycle import InstanceLifecycle, Unusable
from sipis.push.base import PushKind
from sipis.push.delivery import PushDelivery, PushTrace

if TYPE_CHECKING:
    from sipis.service import InstanceService

log = logging.getLogger(__name__)

ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
#: A test or replayed push may be retried for this long.
OPERATOR_PUSH_WINDOW = 30.0


@dataclass(frozen=True)
class Operator:
    name: str
    role: str  # viewer | operator | admin

    def may(self, needed: str) -> bool:
        return ROLE_RANK.get(self.role, -1) >= ROLE_RANK[needed]


class Forbidden(PermissionError):
    """The operator's role does not allow this action."""


class NotFound(LookupError):
    pass


class Conflict(RuntimeError):
    """The instance's state does not allow this action (e.g. it is off)."""


class Operations:
    def __init__(self, *, service: InstanceService, lifecycle: InstanceLifecycle, delivery: PushDelivery,
                 bus: EventBus, clock: Clock, alarms: AlarmBoard | None = None) -> None:
        self.service = service
        self.lifecycle = lifecycle
        self.delivery = delivery
        self.bus = bus
        self.clock = clock
        self.alarms = alarms if alarms is not None else AlarmBoard(bus, clock, lifecycle.get)
        #: the cluster, when there is one: actions on instances owned elsewhere go to their owner
        self.cluster: ClusterView | None = None

    def audit(self, operator: Operator, action: str, target: str | None, outcome: str, *,
              about: str | None = None, **detail: Any) -> None:
        """One audit row (an ``audit`` event; ``about`` = the selector it concerns, for its timeline)."""
        self.bus.publish(about, AuditEntry(uuid.uuid4().hex, self.clock.wall(), operator.name, operator.role,
                                           action, target, outcome, detail))

    def _require(self, operator: Operator, needed: str, action: str, target: str | None) -> None:
        if not operator.may(needed):
            self.audit(operator, action, target, "refused", needed_role=needed)
            raise Forbidden(f"{action} needs the {needed} role; {operator.name} is {operator.role}")

    async def test_push(self, selector: str, operator: Operator) -> PushTrace:
        self._require(operator, "operator", "test_push", selector)
        instance = self.service.get(selector)
        if instance is None:
            self.audit(operator, "test_push", selector, "not-found")
            raise NotFound(selector)
        trace = self.delivery.new_trace(instance, PushKind.TEST, message=f"Test push from {operator.name}")
        outcome = await self.delivery.deliver(instance, trace,
                                              deadline=self.clock.monotonic() + OPERATOR_PUSH_WINDOW)
        self.audit(operator, "test_push", selector, outcome.verdict.value, push_id=trace.push_id,
                   provider_code=outcome.provider_code)
        return trace

    async def replay_push(self, push_id: str, operator: Operator) -> PushTrace:
        self._require(operator, "operator", "replay_push", push_id)
        original = self.delivery.trace(push_id)
        instance = self.service.get(original.selector) if original is not None else None
        if original is None or instance is None:
            self.audit(operator, "replay_push", push_id, "not-found")
            raise NotFound(push_id)
        trace = self.delivery.new_trace(instance, original.push_kind, call_id=original.call_id, caller=original.caller,
                                        caller_display_name=original.caller_display_name,
                                        message=original.message, replay_of=push_id)
        outcome = await self.delivery.deliver(instance, trace,
                                              deadline=self.clock.monotonic() + OPERATOR_PUSH_WINDOW)
        self.audit(operator, "replay_push", push_id, outcome.verdict.value, new_push_id=trace.push_id,
                   selector=instance.selector, provider_code=outcome.provider_code)
        return trace

    def acknowledge_alarm(self, alarm_id: str, operator: Operator) -> AlarmRecord:
        """Mark an alarm episode (active or past) as seen; acknowledging twice keeps the first."""
        self._require(operator, "operator", "acknowledge_alarm", alarm_id)
        record = self.alarms.acknowledge(alarm_id, operator.name)
        if record is None:
            self.audit(operator, "acknowledge_alarm", alarm_id, "not-found")
            raise NotFound(alarm_id)
        self.audit(operator, "acknowledge_alarm", alarm_id, "ok", alarm=record.alarm, alarm_target=record.target)
        return record

    # ------------------------------------------------------------------ instance actions

    def _target(self, operator: Operator, needed: str, action: str, selector: str) -> Instance:
        """Role check, then the instance; refusals are audited."""
        self._require(operator, needed, action, selector)
        instance = self.service.get(selector)
        if instance is None:
            self.audit(operator, action, selector, "not-found")
            raise NotFound(selector)
        return instance

    async def _forwarded(self, operator: Operator, action: str, instance: Instance) -> bool:
        """Another node owns the instance: the action goes to it (True), audited here as forwarded."""
        cluster = self.cluster
        if cluster is None or self.lifecycle.owns(instance.selector):
            return False
        await cluster.forward(action, instance.selector, operator.name, operator.role)
        self.audit(operator, action, instance.selector, "forwarded", about=instance.selector,
                   owner=cluster.owner(instance.selector))
        return True

    async def carry_out(self, action: str, selector: str, operator: str, role: str) -> None:
        """An action an operator asked another node for (checked and audited there as forwarded)."""
        actions = {"take_over": self.take_over, "hand_back": self.hand_back, "re_register": self.re_register,
                   "disable": self.disable}
        run = actions.get(action)
        if run is None:
            log.warning("ignored a forwarded action %r", action[:40])
            return
        try:
            await run(selector, Operator(operator, role))
        except (Forbidden, NotFound, Conflict):
            pass  # audited by the action
        except Exception:
            log.exception("forwarded %s of %s failed", action, mask(selector))

    async def drain_node(self, node: str, operator: Operator) -> None:
        """Hand every instance of ``node`` over to the other nodes (paced), through storage's signals."""
        self._require(operator, "admin", "drain", node)
        if self.cluster is None or node not in {row.name for row in await self.cluster.nodes()}:
            self.audit(operator, "drain", node, "not-found")
            raise NotFound(node)
        await self.cluster.keeper.request_drain(node)
        self.audit(operator, "drain", node, "ok")

    def _conflict(self, operator: Operator, action: str, instance: Instance, why: str) -> Conflict:
        self.audit(operator, action, instance.selector, "conflict", about=instance.selector, reason=why)
        return Conflict(why)

    async def take_over(self, selector: str, operator: Operator) -> Instance:
        """Force the hand-over to the SIPIS: register on the app's behalf now."""
        instance = self._target(operator, "operator", "take_over", selector)
        if await self._forwarded(operator, "take_over", instance):
            return instance
        previous = instance.state.value
        try:
            self.lifecycle.take_over(instance, reason=f"taken over by {operator.name}")
        except Unusable as exc:
            raise self._conflict(operator, "take_over", instance, str(exc)) from None
        self.audit(operator, "take_over", selector, "ok", about=selector, previous_state=previous)
        return instance

    async def hand_back(self, selector: str, operator: Operator) -> Instance:
        """Force the hand-over to the app: drop only our binding (held calls are released to the AOR)."""
        instance = self._target(operator, "operator", "hand_back", selector)
        if await self._forwarded(operator, "hand_back", instance):
            return instance
        previous = instance.state.value
        try:
            self.lifecycle.hand_back(instance, None, reason=f"handed back by {operator.name}")
        except Unusable as exc:
            raise self._conflict(operator, "hand_back", instance, str(exc)) from None
        self.audit(operator, "hand_back", selector, "ok", about=selector, previous_state=previous)
        return instance

    async def re_register(self, selector: str, operator: Operator) -> Instance:
        """Send a REGISTER now (also cuts short a backoff or the wait after ``unauthorized``)."""
        instance = self._target(operator, "operator", "re_register", selector)
        if await self._forwarded(operator, "re_register", instance):
            return instance
        try:
            self.lifecycle.re_register(instance)
        except Unusable as exc:
            raise self._conflict(operator, "re_register", instance, str(exc)) from None
        self.audit(operator, "re_register", selector, "ok", about=selector,
                   reg_status=instance.registration.status.value)
        return instance

    async def disable(self, selector: str, operator: Operator) -> Instance:
        """Unregister, wipe the credentials, state off. Only a new enrolment brings it back."""
        instance = self._target(operator, "admin", "disable", selector)
        if await self._forwarded(operator, "disable", instance):
            return instance
        previous = instance.state.value
        try:
            await self.lifecycle.disable(instance, reason=f"disabled by {operator.name}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("disable of %s failed", mask(selector))
            self.audit(operator, "disable", selector, "error", about=selector, error=type(exc).__name__)
            raise
        self.audit(operator, "disable", selector, "ok", about=selector, previous_state=previous)
        return instance
