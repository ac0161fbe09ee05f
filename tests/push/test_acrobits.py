"""The Acrobits mediator provider against a loopback HTTPS server speaking the pnm2 JSON API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lab.push_servers import MediatorServer, Reply
from sipis.config import AcrobitsPush
from sipis.push.acrobits import AcrobitsProvider
from sipis.push.base import PushKind, Verdict
from tests.push import DEVICE_TOKEN, push_request


@pytest.fixture
async def mediator(tmp_path: Path) -> AsyncIterator[MediatorServer]:
    async with MediatorServer(tmp_path) as server:
        yield server


def make_provider(server: MediatorServer, *, url: str | None = None, timeout: float = 2.0) -> AcrobitsProvider:
    return AcrobitsProvider(AcrobitsPush(name="pnm", url=url or server.send_url, ca_file=server.ca_file,
                                         timeout=timeout))


@pytest.fixture
async def provider(mediator: MediatorServer) -> AsyncIterator[AcrobitsProvider]:
    provider = make_provider(mediator)
    yield provider
    await provider.close()


async def test_call_accepted_with_full_body(mediator: MediatorServer, provider: AcrobitsProvider) -> None:
    request = push_request(extra={"Badge": "1", "verb": "must-not-override"})
    outcome = await provider.send(request)

    assert outcome.verdict is Verdict.ACCEPTED and outcome.accepted
    assert outcome.provider_code == 200 and outcome.provider_reason == "OK"
    assert outcome.latency_ms is not None and outcome.latency_ms > 0
    assert outcome.error is None and not outcome.token_dead
    [received] = mediator.requests
    assert received.path == "/pnm2/send"
    assert received.headers["content-type"] == "application/json"
    assert received.json == {
        "verb": "NotifyIncomingCall", "AppId": "com.example.phone", "DeviceToken": DEVICE_TOKEN,
        "Selector": "sel-0001", "Id": "5f0c2a9e-push", "UserName": "bob", "UserDisplayName": "Bob B.",
        "CallId": "a84b4c76e66710@pbx", "Caller": "sip:alice@example.com", "CallerDisplayName": "Alice",
        "SentAt": str(int(request.sent_at * 1000)), "Badge": "1",
    }
    assert provider.name == "pnm" and provider.type == "acrobits"


@pytest.mark.parametrize(("kind", "message", "verb", "sent_message"), [
    (PushKind.MISSED, None, "NotifyIncomingCallMissed", None),
    (PushKind.ANSWERED_ELSEWHERE, None, "NotifyIncomingCallAnsweredElsewhere", None),
    (PushKind.TEXT, "see you at 5", "NotifyTextMessage", "see you at 5"),
    (PushKind.TEST, "NOC test 42", "NotifyGenericTextMessage", "NOC test 42"),
    (PushKind.TEST, None, "NotifyGenericTextMessage", "Test push"),
])
async def test_verb_per_kind(mediator: MediatorServer, provider: AcrobitsProvider, kind: PushKind,
                             message: str | None, verb: str, sent_message: str | None) -> None:
    outcome = await provider.send(push_request(kind=kind, message=message))
    assert outcome.accepted
    body = mediator.requests[0].json
    assert body["verb"] == verb
    assert body.get("Message") == sent_message
    assert body["Selector"] == "sel-0001" and body["Id"] == "5f0c2a9e-push"


async def test_request_summary_masks_the_token(mediator: MediatorServer, provider: AcrobitsProvider) -> None:
    outcome = await provider.send(push_request())
    summary = outcome.request_summary
    text = json.dumps(summary)
    assert DEVICE_TOKEN not in text
    assert summary["token"] == "dEvI…tail" and summary["body"]["DeviceToken"] == "dEvI…tail"
    assert summary["body"]["verb"] == "NotifyIncomingCall"
    assert summary["provider"] == "pnm" and summary["type"] == "acrobits"
    assert summary["response"] == {"status": 200, "body": {"code": 200, "response": "OK"}}


async def test_code_404_means_dead_token(mediator: MediatorServer, provider: AcrobitsProvider) -> None:
    mediator.dead_tokens.add(DEVICE_TOKEN)
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_PERMANENT
    assert outcome.token_dead and outcome.provider_code == 404
    assert outcome.provider_reason == "Device token not found"


async def test_other_4xx_code_is_permanent_but_token_kept(mediator: MediatorServer,
                                                          provider: AcrobitsProvider) -> None:
    mediator.script(DEVICE_TOKEN, [Reply(code=403)])
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_PERMANENT
    assert outcome.provider_code == 403 and not outcome.token_dead


async def test_http_400_for_a_malformed_push_is_permanent(mediator: MediatorServer,
                                                          provider: AcrobitsProvider) -> None:
    outcome = await provider.send(push_request(app_id=""))  # the real mediator refuses it
    assert outcome.verdict is Verdict.REJECTED_PERMANENT and not outcome.token_dead
    assert outcome.provider_code == 400 and outcome.provider_reason == "missing AppId"
    assert mediator.requests[0].status == 400


async def test_http_404_wrong_url_does_not_kill_the_token(mediator: MediatorServer) -> None:
    provider = make_provider(mediator, url=f"{mediator.url}/pnm2/sned")
    try:
        outcome = await provider.send(push_request())
    finally:
        await provider.close()
    assert outcome.verdict is Verdict.REJECTED_PERMANENT
    assert outcome.provider_code == 404 and not outcome.token_dead
    assert "HTTP 404" in (outcome.error or "")


async def test_code_5xx_is_transient_with_retry_after(mediator: MediatorServer,
                                                      provider: AcrobitsProvider) -> None:
    mediator.script(DEVICE_TOKEN, [Reply(code=503, retry_after=7)])
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.provider_code == 503 and outcome.retry_after == 7.0


@pytest.mark.parametrize(("status", "retry_after"), [(503, 1), (429, 2.5), (500, None), (502, None)])
async def test_http_5xx_and_429_are_transient(mediator: MediatorServer, provider: AcrobitsProvider,
                                              status: int, retry_after: float | None) -> None:
    mediator.script(DEVICE_TOKEN, [Reply(status, retry_after=retry_after)])
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT and not outcome.token_dead
    assert outcome.provider_code == status
    assert outcome.retry_after == retry_after
    assert f"HTTP {status}" in (outcome.error or "")


async def test_script_then_recovery_on_the_warm_client(mediator: MediatorServer,
                                                       provider: AcrobitsProvider) -> None:
    mediator.script(DEVICE_TOKEN, [Reply(503, retry_after=1), Reply(200)])
    first = await provider.send(push_request())
    second = await provider.send(push_request())
    assert (first.verdict, first.retry_after) == (Verdict.REJECTED_TRANSIENT, 1.0)
    assert second.accepted
    assert [r.status for r in mediator.requests] == [503, 200]
    assert mediator.requests[0].peer == mediator.requests[1].peer  # one warm connection


@pytest.mark.parametrize("body", ["<html><body>Bad gateway</body></html>", {"status": "ok"}, {"code": "200"}])
async def test_unparsable_answer_is_transient(mediator: MediatorServer, provider: AcrobitsProvider,
                                              body: object) -> None:
    mediator.script(DEVICE_TOKEN, [Reply(200, body=body)])
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.error is not None and "unparsable mediator answer" in outcome.error


async def test_connection_refused_is_transient(mediator: MediatorServer, provider: AcrobitsProvider) -> None:
    assert (await provider.send(push_request())).accepted
    await mediator.stop()
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.provider_code is None
    assert outcome.error is not None and outcome.error.startswith(("connection failed", "network error"))
    assert outcome.latency_ms is not None


async def test_timeout_is_transient(mediator: MediatorServer) -> None:
    provider = make_provider(mediator, timeout=0.3)
    mediator.script(DEVICE_TOKEN, [Reply(200, delay=5)])
    try:
        outcome = await provider.send(push_request())
    finally:
        await provider.close()
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.error is not None and "timeout" in outcome.error
    assert outcome.latency_ms is not None and 250 <= outcome.latency_ms < 3000
