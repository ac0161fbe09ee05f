"""The webhook provider against a loopback HTTPS pusher, plus the shared HTTP helpers."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest

from lab.push_servers import Reply, WebhookServer
from sipis.config import WebhookPush
from sipis.push.base import PushKind, Verdict
from sipis.push.http import build_client, describe_error, mask_token, parse_retry_after, safe_url
from sipis.push.webhook import WebhookProvider
from tests.push import DEVICE_TOKEN, push_request

SECRET = "Bearer hook-secret-" + "s" * 24


@pytest.fixture
async def hook(tmp_path: Path) -> AsyncIterator[WebhookServer]:
    async with WebhookServer(tmp_path) as server:
        yield server


def make_provider(server: WebhookServer, *, path: str = "/push?key=query-secret", timeout: float = 2.0,
                  **overrides: object) -> WebhookProvider:
    config = WebhookPush(name="hook", url=f"{server.url}{path}", ca_file=server.ca_file, timeout=timeout,
                         headers=MappingProxyType({"Authorization": SECRET, "X-Tenant": "acme"}),
                         **overrides)  # type: ignore[arg-type]
    return WebhookProvider(config)


@pytest.fixture
async def provider(hook: WebhookServer) -> AsyncIterator[WebhookProvider]:
    provider = make_provider(hook)
    yield provider
    await provider.close()


async def test_accepted_with_headers_and_body(hook: WebhookServer, provider: WebhookProvider) -> None:
    request = push_request(kind=PushKind.TEXT, message="hello", voip=True, ttl=30.7)
    outcome = await provider.send(request)

    assert outcome.verdict is Verdict.ACCEPTED and outcome.provider_code == 200
    assert outcome.latency_ms is not None and outcome.latency_ms > 0
    [received] = hook.requests
    assert received.path == "/push"
    assert received.headers["authorization"] == SECRET and received.headers["x-tenant"] == "acme"
    assert received.headers["content-type"] == "application/json"
    assert received.json == {**request.payload_fields(), "app_id": "com.example.phone", "token": DEVICE_TOKEN,
                             "voip": True, "ttl": 30}
    assert received.json["type"] == "text" and received.json["message"] == "hello"


async def test_summary_has_no_secrets(hook: WebhookServer, provider: WebhookProvider) -> None:
    outcome = await provider.send(push_request())
    summary = outcome.request_summary
    text = json.dumps(summary) + repr(provider)
    for secret in (DEVICE_TOKEN, SECRET, "hook-secret", "query-secret"):
        assert secret not in text
    assert summary["headers"] == ["Authorization", "X-Tenant"]
    assert summary["body"]["token"] == "dEvI…tail"
    assert summary["url"] == f"{hook.url}/push"
    assert summary["response"] == {"status": 200, "body": {"status": "ok"}}


@pytest.mark.parametrize(("status", "dead"), [(404, True), (410, True), (400, False), (401, False),
                                              (403, False), (422, False)])
async def test_4xx_are_permanent(hook: WebhookServer, provider: WebhookProvider, status: int, dead: bool) -> None:
    hook.script(DEVICE_TOKEN, [Reply(status)])
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_PERMANENT
    assert outcome.provider_code == status and outcome.token_dead is dead


async def test_dead_token_set_on_the_server(hook: WebhookServer, provider: WebhookProvider) -> None:
    hook.dead_tokens.add(DEVICE_TOKEN)
    outcome = await provider.send(push_request())
    assert (outcome.verdict, outcome.provider_code, outcome.token_dead) == (Verdict.REJECTED_PERMANENT, 410, True)
    assert outcome.provider_reason == "Gone"


@pytest.mark.parametrize(("reply", "retry_after"), [
    (Reply(429, retry_after=30), 30.0),
    (Reply(503, retry_after=2), 2.0),
    (Reply(500), None),
    (Reply(502, body="<html>bad gateway</html>"), None),
])
async def test_429_and_5xx_are_transient(hook: WebhookServer, provider: WebhookProvider, reply: Reply,
                                         retry_after: float | None) -> None:
    hook.script(DEVICE_TOKEN, [reply])
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT and not outcome.token_dead
    assert outcome.provider_code == reply.status and outcome.retry_after == retry_after
    assert f"HTTP {reply.status}" in (outcome.error or "")


async def test_retry_after_as_http_date(hook: WebhookServer, provider: WebhookProvider) -> None:
    when = email.utils.formatdate(time.time() + 40, usegmt=True)
    hook.script(DEVICE_TOKEN, [Reply(503, retry_after=when)])
    outcome = await provider.send(push_request())
    assert outcome.retry_after is not None and 37 <= outcome.retry_after <= 41


async def test_any_2xx_is_accepted_whatever_the_body(hook: WebhookServer, provider: WebhookProvider) -> None:
    hook.script(DEVICE_TOKEN, [Reply(202, body="queued"), Reply(204)])
    assert (await provider.send(push_request())).provider_code == 202
    assert (await provider.send(push_request())).accepted


async def test_connection_refused_is_transient(hook: WebhookServer, provider: WebhookProvider) -> None:
    assert (await provider.send(push_request())).accepted
    await hook.stop()
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT and outcome.provider_code is None
    assert outcome.error is not None and outcome.error.startswith(("connection failed", "network error"))


async def test_timeout_is_transient(hook: WebhookServer) -> None:
    provider = make_provider(hook, timeout=0.3)
    hook.script(DEVICE_TOKEN, [Reply(200, delay=5)])
    try:
        outcome = await provider.send(push_request())
    finally:
        await provider.close()
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.error is not None and outcome.error.startswith("read timeout")


async def test_untrusted_certificate_is_transient_with_error(hook: WebhookServer, tmp_path: Path) -> None:
    config = WebhookPush(name="hook", url=f"{hook.url}/push", timeout=2.0)  # system trust store only
    provider = WebhookProvider(config)
    try:
        outcome = await provider.send(push_request())
    finally:
        await provider.close()
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.error is not None and "CERTIFICATE_VERIFY_FAILED" in outcome.error
    assert hook.requests == []


async def test_verify_off_reaches_a_self_signed_server(hook: WebhookServer) -> None:
    provider = WebhookProvider(WebhookPush(name="lab", url=f"{hook.url}/push", verify=False))
    try:
        assert (await provider.send(push_request())).accepted
    finally:
        await provider.close()


# ---------------------------------------------------------------- shared helpers (sipis.push.http)


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("1.5", now) == 1.5
    assert parse_retry_after(email.utils.formatdate(now + 90, usegmt=True), now) == 90.0
    assert parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now) == 0.0  # in the past
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0 - 10) == 10.0  # RFC 9110's example
    for bad in (None, "", "soon", "-5", "nan", "inf"):
        assert parse_retry_after(bad, now) is None


def test_mask_token_and_safe_url() -> None:
    assert mask_token(DEVICE_TOKEN) == "dEvI…tail"
    assert mask_token("short") == "…" and mask_token("") == "" and mask_token(None) == ""
    assert safe_url("https://user:pw@hooks.example:8443/push?key=s3cret#frag") == "https://hooks.example:8443/push"
    assert safe_url("https://[::1]/x") == "https://[::1]/x"


def test_describe_error() -> None:
    assert describe_error(httpx.ConnectError("[Errno 111] Connection refused")) == \
        "connection failed: [Errno 111] Connection refused"
    assert describe_error(httpx.ReadTimeout("")) == "read timeout: ReadTimeout"
    assert describe_error(httpx.ConnectTimeout("x")).startswith("connect timeout")
    assert describe_error(httpx.RemoteProtocolError("peer closed")).startswith("protocol error")
    assert len(describe_error(httpx.ReadError("e" * 1000))) <= 300


async def test_build_client_settings(tmp_path: Path) -> None:
    config = WebhookPush(name="h", url="https://127.0.0.1:1/", timeout=1.5)
    client = build_client(config, http2=True)
    try:
        assert client.timeout == httpx.Timeout(1.5)
        assert client.follow_redirects is False
    finally:
        await client.aclose()
