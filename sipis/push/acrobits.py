"""Acrobits PN Mediator, JSON API: ``POST https://pnm.cloudsoftphone.com/pnm2/send``.

The configured ``url`` is the full endpoint (the default already ends in ``/pnm2/send``).

Request body (one JSON object, all values strings)::

    verb             NotifyIncomingCall | NotifyIncomingCallMissed |
                     NotifyIncomingCallAnsweredElsewhere | NotifyTextMessage |
                     NotifyGenericTextMessage (our TEST push)
    AppId, DeviceToken, Selector     the app's push tuple
    Id               our push id (the mediator's pairing/dedup id)
    UserName, UserDisplayName        the callee's SIP user, when known
    Message          text for NotifyTextMessage / NotifyGenericTextMessage

Additional attributes the mediator passes through to the app (our own, documented here):
``CallId`` (SIP Call-ID of the held INVITE), ``SentAt`` (send time, epoch milliseconds, so the app
can drop stale calls), ``Caller`` / ``CallerDisplayName`` (From of the INVITE), plus every
``PushRequest.extra`` item under its own key (never overriding the attributes above).

Answer: HTTP 2xx with ``{"code": int, "response": str}``. Code 200 → accepted; 404 → the token is
dead; other 4xx → rejected for good; 5xx → try again later. HTTP 429/5xx → transient (honouring
``Retry-After``); any other HTTP non-2xx → permanent (an HTTP 404 means a wrong URL, *not* a dead
token); an answer without that JSON → transient with an error.
"""

from __future__ import annotations

from typing import Any

from sipis.config import AcrobitsPush
from sipis.push.base import PushKind, PushOutcome, PushRequest, Verdict
from sipis.push.http import (
    HttpPushProvider,
    base_summary,
    body_excerpt,
    json_or_none,
    mask_token,
    outcome,
    parsed_url,
    post,
    retry_after,
)

VERBS: dict[PushKind, str] = {
    PushKind.CALL: "NotifyIncomingCall",
    PushKind.MISSED: "NotifyIncomingCallMissed",
    PushKind.ANSWERED_ELSEWHERE: "NotifyIncomingCallAnsweredElsewhere",
    PushKind.TEXT: "NotifyTextMessage",
    PushKind.TEST: "NotifyGenericTextMessage",
}
DEFAULT_TEST_MESSAGE = "Test push"


def mediator_body(request: PushRequest) -> dict[str, str]:
    """The JSON object the mediator gets for ``request``."""
    body: dict[str, str] = {
        "verb": VERBS[request.kind], "AppId": request.app_id, "DeviceToken": request.token,
        "Selector": request.selector, "Id": request.push_id,
    }
    optional = (
        ("UserName", request.user_name), ("UserDisplayName", request.user_display_name),
        ("CallId", request.call_id), ("Caller", request.caller),
        ("CallerDisplayName", request.caller_display_name),
    )
    body.update({key: value for key, value in optional if value is not None})
    message = request.message
    if request.kind is PushKind.TEST and not message:
        message = DEFAULT_TEST_MESSAGE
    if message is not None and request.kind in (PushKind.TEXT, PushKind.TEST):
        body["Message"] = message
    body["SentAt"] = str(int(request.sent_at * 1000))
    for key, value in request.extra.items():
        body.setdefault(key, value)
    return body


class AcrobitsProvider(HttpPushProvider):
    type: str = "acrobits"

    def __init__(self, config: AcrobitsPush, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.url = parsed_url(config.url)

    async def send(self, request: PushRequest) -> PushOutcome:
        body = mediator_body(request)
        exchange = await post(self.client, self.url, json_body=body)  # on the wire first, then the rest
        summary = base_summary(self.name, self.type, self.config.url, request)
        summary["body"] = {**body, "DeviceToken": mask_token(request.token)}
        latency = exchange.latency_ms
        if exchange.response is None:
            return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency, summary=summary,
                           error=exchange.error)
        response = exchange.response
        status = response.status_code
        answer = json_or_none(response)
        summary["response"] = {"status": status, "body": answer if isinstance(answer, dict)
                             else body_excerpt(response)}
        if status == 429 or status >= 500:
            return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency, summary=summary, code=status,
                           reason=_text(answer) or response.reason_phrase, retry=retry_after(response),
                           error=f"mediator answered HTTP {status}")
        if not 200 <= status < 300:
            return outcome(Verdict.REJECTED_PERMANENT, latency_ms=latency, summary=summary, code=status,
                           reason=_text(answer) or response.reason_phrase,
                           error=f"mediator answered HTTP {status}")
        code = answer.get("code") if isinstance(answer, dict) else None
        if not isinstance(code, int) or isinstance(code, bool):
            return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency, summary=summary, code=status,
                           error=f"unparsable mediator answer (HTTP {status}): {body_excerpt(response)!r}")
        reason = _text(answer)
        if 200 <= code < 300:
            return outcome(Verdict.ACCEPTED, latency_ms=latency, summary=summary, code=code, reason=reason)
        if code == 404:
            return outcome(Verdict.REJECTED_PERMANENT, latency_ms=latency, summary=summary, code=code,
                           reason=reason or "token not found", token_dead=True)
        if 400 <= code < 500 and code != 429:
            return outcome(Verdict.REJECTED_PERMANENT, latency_ms=latency, summary=summary, code=code,
                           reason=reason)
        return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency, summary=summary, code=code,
                       reason=reason, retry=retry_after(response),
                       error=None if code >= 500 or code == 429 else f"unexpected mediator code {code}")


def _text(answer: Any) -> str | None:
    if isinstance(answer, dict):
        text = answer.get("response")
        if isinstance(text, str) and text:
            return text
    return None
