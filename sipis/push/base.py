"""One interface and one outcome model for every push provider (acrobits mediator, FCM, APNs,
webhook).

A provider turns a :class:`PushRequest` into one HTTP request and classifies the answer as a
:class:`PushOutcome`: ``accepted``, ``rejected-permanent`` (do not retry; ``token_dead`` says the
device token is gone for good), or ``rejected-transient`` (retry later, honouring ``retry_after``).
Providers never retry and never raise for a provider-side problem: timeouts, connection failures
and unparsable answers are transient outcomes with an ``error`` text. Retrying inside the wake
timer is the delivery layer's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class PushKind(StrEnum):
    CALL = "call"                          # wake the app for an incoming call (VoIP token if any)
    MISSED = "missed"                      # the caller cancelled
    ANSWERED_ELSEWHERE = "answered-elsewhere"
    TEXT = "text"                          # a SIP MESSAGE arrived
    TEST = "test"                          # operator's test push


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    REJECTED_PERMANENT = "rejected-permanent"
    REJECTED_TRANSIENT = "rejected-transient"


@dataclass(frozen=True)
class PushRequest:
    """What to push; providers map it onto their wire format."""

    push_id: str
    kind: PushKind
    selector: str
    app_id: str
    token: str  # the device token to use (VoIP token for calls when the app has one)
    voip: bool  # ``token`` is an iOS PushKit/VoIP token
    sent_at: float  # wall clock, epoch seconds; goes into the payload so the app can drop stale calls
    ttl: float  # seconds the push is worth delivering (calls: the remaining wake timer)
    call_id: str | None = None
    caller: str | None = None  # From URI of the INVITE
    caller_display_name: str | None = None
    user_name: str | None = None  # the callee's SIP user
    user_display_name: str | None = None
    message: str | None = None  # text for TEXT/TEST pushes
    extra: dict[str, str] = field(default_factory=dict)

    def payload_fields(self) -> dict[str, str]:
        """Provider-neutral string fields for data payloads (FCM data, APNs custom keys, webhook)."""
        fields = {
            "type": self.kind.value, "push_id": self.push_id, "selector": self.selector,
            "sent_at_ms": str(int(self.sent_at * 1000)),
        }
        for key, value in (("call_id", self.call_id), ("caller", self.caller),
                           ("caller_name", self.caller_display_name), ("user", self.user_name),
                           ("message", self.message)):
            if value is not None:
                fields[key] = value
        fields.update(self.extra)
        return fields


@dataclass(frozen=True)
class PushOutcome:
    verdict: Verdict
    provider_code: int | None = None  # HTTP status, or the mediator's own code
    provider_reason: str | None = None  # e.g. "Unregistered", "UNAVAILABLE", the mediator's text
    latency_ms: float | None = None
    retry_after: float | None = None
    token_dead: bool = False  # the provider says this device token will never work again
    error: str | None = None  # transport-level problem (timeout, connection reset ...)
    request_summary: dict[str, Any] = field(default_factory=dict)  # what was sent, no secrets

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPTED


class PushProvider(Protocol):
    name: str  # the [push.NAME] table this provider was built from
    type: str  # acrobits | fcm | apns | webhook

    async def send(self, request: PushRequest) -> PushOutcome: ...

    async def close(self) -> None: ...
