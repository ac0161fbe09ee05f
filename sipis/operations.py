"""Operator actions in the core: checked against the operator's role here (not only in a UI) and
written to the audit log with the operator's name, whatever the outcome."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sipis.clock import Clock
from sipis.events import EventBus
from sipis.push.base import PushKind
from sipis.push.delivery import PushDelivery, PushTrace

if TYPE_CHECKING:
    from sipis.service import InstanceService

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


class Operations:
    def __init__(self, *, service: InstanceService, delivery: PushDelivery, bus: EventBus, clock: Clock) -> None:
        self.service = service
        self.delivery = delivery
        self.bus = bus
        self.clock = clock

    def audit(self, operator: Operator, action: str, target: str | None, outcome: str,
              **detail: Any) -> None:
        self.bus.publish("audit", None, id=uuid.uuid4().hex, operator=operator.name, role=operator.role,
                         action=action, target=target, outcome=outcome, detail=detail)

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
        trace = self.delivery.new_trace(instance, original.kind, call_id=original.call_id, caller=original.caller,
                                        caller_display_name=original.caller_display_name,
                                        message=original.message, replay_of=push_id)
        outcome = await self.delivery.deliver(instance, trace,
                                              deadline=self.clock.monotonic() + OPERATOR_PUSH_WINDOW)
        self.audit(operator, "replay_push", push_id, outcome.verdict.value, new_push_id=trace.push_id,
                   selector=instance.selector, provider_code=outcome.provider_code)
        return trace
