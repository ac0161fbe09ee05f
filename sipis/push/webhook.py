"""A customer's own HTTP pusher (in the spirit of Flexisip's ``external-push-uri``).

``POST {url}`` with the configured ``headers`` (e.g. an ``Authorization``) and a JSON object::

    PushRequest.payload_fields()      type, push_id, selector, sent_at_ms, call_id, caller, ...
    app_id, token                     the push tuple (the receiver needs the real token)
    voip                              true when ``token`` is an iOS PushKit token
    ttl                               whole seconds the push is worth delivering

Answer: any 2xx → accepted; 404/410 → the token is dead; other 4xx → rejected for good; 429/5xx
→ try again later (honouring ``Retry-After``); anything else → rejected for good. The token and
the header values are never logged or put into ``request_summary`` (header names only).
"""

from __future__ import annotations

from typing import Any

from sipis.config import WebhookPush
from sipis.push.base import PushOutcome, PushRequest, Verdict
from sipis.push.http import (
    HttpPushProvider,
    base_summary,
    body_excerpt,
    json_or_none,
    mask_token,
    outcome,
    post,
    retry_after,
)


def webhook_body(request: PushRequest) -> dict[str, Any]:
    body: dict[str, Any] = dict(request.payload_fields())
    body.update(app_id=request.app_id, token=request.token, voip=request.voip,
                ttl=max(0, int(request.ttl)))
    return body


class WebhookProvider(HttpPushProvider):
    type: str = "webhook"

    def __init__(self, config: WebhookPush, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.headers: dict[str, str] = dict(config.headers)

    async def send(self, request: PushRequest) -> PushOutcome:
        body = webhook_body(request)
        summary = base_summary(self.name, self.type, self.config.url, request)
        summary["headers"] = sorted(self.headers)
        summary["body"] = {**body, "token": mask_token(request.token)}
        exchange = await post(self.client, self.config.url, json_body=body, headers=self.headers)
        latency = exchange.latency_ms
        if exchange.response is None:
            return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency, summary=summary,
                           error=exchange.error)
        response = exchange.response
        status = response.status_code
        answer = json_or_none(response)
        summary["response"] = {"status": status,
                             "body": answer if isinstance(answer, dict) else body_excerpt(response)}
        reason = response.reason_phrase or None
        if 200 <= status < 300:
            return outcome(Verdict.ACCEPTED, latency_ms=latency, summary=summary, code=status, reason=reason)
        if status == 429 or status >= 500:
            return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency, summary=summary, code=status,
                           reason=reason, retry=retry_after(response),
                           error=f"webhook answered HTTP {status}")
        return outcome(Verdict.REJECTED_PERMANENT, latency_ms=latency, summary=summary, code=status,
                       reason=reason, token_dead=status in (404, 410))
