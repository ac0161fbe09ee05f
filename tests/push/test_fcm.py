"""The FCM HTTP v1 provider against a loopback Google: an OAuth token endpoint that verifies the
RS256 service-account assertion, and ``messages:send`` that checks bearer token and message."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from lab.push_servers import FcmServer, Reply, make_service_account
from sipis.config import FcmPush
from sipis.push.base import PushKind, Verdict
from sipis.push.fcm import ALARM_REASONS, GRANT_TYPE, SCOPE, FcmProvider, ServiceAccountError
from tests.push import DEVICE_TOKEN, push_request


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fcm(tmp_path: Path) -> AsyncIterator[FcmServer]:
    async with FcmServer(tmp_path) as server:
        yield server


@pytest.fixture
def account(fcm: FcmServer, tmp_path: Path) -> dict[str, str]:
    info = make_service_account(tmp_path / "sa.json", fcm.token_uri)
    fcm.add_service_account(info)
    return info


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_provider(server: FcmServer, sa_file: Path, *, clock: FakeClock | None = None, timeout: float = 2.0,
                  **overrides: Any) -> FcmProvider:
    config = FcmPush(name="fcm-main", url=server.url, ca_file=server.ca_file, timeout=timeout,
                     service_account_file=sa_file, **overrides)
    return FcmProvider(config, clock=clock) if clock else FcmProvider(config)


@pytest.fixture
async def provider(fcm: FcmServer, account: dict[str, str], tmp_path: Path,
                   clock: FakeClock) -> AsyncIterator[FcmProvider]:
    provider = make_provider(fcm, tmp_path / "sa.json", clock=clock)
    yield provider
    await provider.close()


async def test_accepted_data_message(fcm: FcmServer, account: dict[str, str], provider: FcmProvider) -> None:
    request = push_request(ttl=29.9, extra={"x_tenant": "acme"})
    outcome = await provider.send(request)

    assert outcome.verdict is Verdict.ACCEPTED, outcome
    assert outcome.provider_code == 200
    assert outcome.provider_reason is not None
    assert outcome.provider_reason.startswith("projects/sipis-lab/messages/0:")
    assert outcome.latency_ms is not None and outcome.latency_ms > 0
    # the token request: RFC 7523 grant with an assertion the server verified with the public key
    [token_request] = fcm.token_requests
    assert token_request.status == 200
    assert token_request.form is not None and token_request.form["grant_type"] == GRANT_TYPE
    claims = jwt.decode(token_request.form["assertion"], options={"verify_signature": False})
    assert claims["iss"] == account["client_email"] and claims["aud"] == fcm.token_uri
    assert claims["scope"] == SCOPE and claims["exp"] - claims["iat"] == 3600
    assert jwt.get_unverified_header(token_request.form["assertion"])["kid"] == account["private_key_id"]
    # the push itself
    [send] = fcm.requests
    assert send.path == "/v1/projects/sipis-lab/messages:send" and send.status == 200
    assert send.headers["authorization"].removeprefix("Bearer ") in fcm.issued
    message = send.json["message"]
    assert message["token"] == DEVICE_TOKEN
    assert message["data"] == request.payload_fields()
    assert all(isinstance(v, str) for v in message["data"].values())
    assert message["data"]["call_id"] == "a84b4c76e66710@pbx" and message["data"]["type"] == "call"
    assert message["data"]["sent_at_ms"] == str(int(request.sent_at * 1000))
    assert message["android"] == {"priority": "HIGH", "ttl": "29s"}
    assert "notification" not in message


@pytest.mark.parametrize(("ttl", "sent"), [(0.4, "0s"), (120.0, "120s"), (-3.0, "0s"), (9e9, "2419200s")])
async def test_ttl_whole_seconds_never_above_the_request(fcm: FcmServer, provider: FcmProvider, ttl: float,
                                                         sent: str) -> None:
    assert (await provider.send(push_request(ttl=ttl))).accepted
    assert fcm.requests[0].json["message"]["android"]["ttl"] == sent


async def test_project_and_token_uri_from_config_override_the_file(fcm: FcmServer, account: dict[str, str],
                                                                   tmp_path: Path) -> None:
    sa_file = tmp_path / "other.json"
    info = make_service_account(sa_file, "https://oauth2.invalid/token", project_id="other-project")
    fcm.add_service_account(info)
    provider = make_provider(fcm, sa_file, project_id="sipis-lab", token_uri=fcm.token_uri)
    try:
        outcome = await provider.send(push_request())
    finally:
        await provider.close()
    assert outcome.accepted
    assert fcm.requests[0].path == "/v1/projects/sipis-lab/messages:send"


async def test_access_token_is_cached_and_refreshed_before_expiry(fcm: FcmServer, provider: FcmProvider,
                                                                  clock: FakeClock) -> None:
    assert (await provider.send(push_request())).accepted
    assert (await provider.send(push_request())).accepted
    assert len(fcm.token_requests) == 1 and provider.token_fetches == 1
    clock.now += 3599 - 300 - 1  # still inside the cache window (refresh ~5 min before expiry)
    assert (await provider.send(push_request())).accepted
    assert len(fcm.token_requests) == 1
    clock.now += 2
    assert (await provider.send(push_request())).accepted
    assert len(fcm.token_requests) == 2
    bearers = [r.headers["authorization"] for r in fcm.requests]
    assert bearers[0] == bearers[1] == bearers[2] != bearers[3]
    # the token requests and the sends all went over one warm connection (same host here)
    assert len({r.peer for r in [*fcm.token_requests, *fcm.requests]}) == 1


async def test_one_token_fetch_for_concurrent_sends(fcm: FcmServer, provider: FcmProvider) -> None:
    fcm.script_token([Reply(200, delay=0.2)])  # a slow token endpoint makes the race likely
    outcomes = await asyncio.gather(*(provider.send(push_request(push_id=f"p{i}")) for i in range(8)))
    assert all(o.accepted for o in outcomes)
    assert len(fcm.token_requests) == 1 and len(fcm.requests) == 8


async def test_refused_access_token_is_refreshed_and_retried_once(fcm: FcmServer, provider: FcmProvider) -> None:
    assert (await provider.send(push_request())).accepted
    fcm.revoke_tokens()  # the cached token is no longer valid at Google
    outcome = await provider.send(push_request())
    assert outcome.accepted
    assert outcome.request_summary["attempts"] == 2
    assert [r.status for r in fcm.requests] == [200, 401, 200]
    assert len(fcm.token_requests) == 2


async def test_persistent_401_is_permanent_and_alarm_worthy(fcm: FcmServer, provider: FcmProvider) -> None:
    fcm.reject_access_tokens = True
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_PERMANENT and not outcome.token_dead
    assert outcome.provider_code == 401 and outcome.provider_reason == "UNAUTHENTICATED"
    assert outcome.provider_reason in ALARM_REASONS
    assert len(fcm.requests) == 2 and len(fcm.token_requests) == 2  # exactly one retry


@pytest.mark.parametrize(("reply", "reason", "dead", "alarm"), [
    (Reply(404), "UNREGISTERED", True, False),
    (Reply(400), "INVALID_ARGUMENT", False, False),
    (Reply(403), "SENDER_ID_MISMATCH", False, True),
    (Reply(401), "THIRD_PARTY_AUTH_ERROR", False, True),
])
async def test_permanent_errors(fcm: FcmServer, provider: FcmProvider, reply: Reply, reason: str, dead: bool,
                                alarm: bool) -> None:
    fcm.script(DEVICE_TOKEN, [reply])
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_PERMANENT
    assert outcome.provider_code == reply.status and outcome.provider_reason == reason
    assert outcome.token_dead is dead
    assert (outcome.provider_reason in ALARM_REASONS) is alarm
    assert outcome.retry_after is None
    assert len(fcm.requests) == 1  # no retry, not even for THIRD_PARTY_AUTH_ERROR's 401
    assert outcome.request_summary["response"]["error_code"] == reason


async def test_invalid_data_key_rejected_by_fcm_validation(fcm: FcmServer, provider: FcmProvider) -> None:
    outcome = await provider.send(push_request(extra={"from": "reserved"}))
    assert outcome.verdict is Verdict.REJECTED_PERMANENT and not outcome.token_dead
    assert outcome.provider_reason == "INVALID_ARGUMENT"
    assert "from" in outcome.request_summary["response"]["message"]


async def test_wrong_project_is_permanent(fcm: FcmServer, account: dict[str, str], tmp_path: Path) -> None:
    provider = make_provider(fcm, tmp_path / "sa.json", project_id="someone-elses")
    try:
        outcome = await provider.send(push_request())
    finally:
        await provider.close()
    assert outcome.verdict is Verdict.REJECTED_PERMANENT and not outcome.token_dead
    assert outcome.provider_code == 403 and outcome.provider_reason == "PERMISSION_DENIED"


@pytest.mark.parametrize(("reply", "reason", "retry_after"), [
    (Reply(429, retry_after=120), "QUOTA_EXCEEDED", 120.0),
    (Reply(429), "QUOTA_EXCEEDED", 60.0),  # no Retry-After: back off at least a minute
    (Reply(503, retry_after=2), "UNAVAILABLE", 2.0),
    (Reply(503), "UNAVAILABLE", None),
    (Reply(500, retry_after=3), "INTERNAL", 3.0),
    (Reply(500), "INTERNAL", None),
])
async def test_transient_errors(fcm: FcmServer, provider: FcmProvider, reply: Reply, reason: str,
                                retry_after: float | None) -> None:
    fcm.script(DEVICE_TOKEN, [reply])
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT and not outcome.token_dead
    assert outcome.provider_code == reply.status and outcome.provider_reason == reason
    assert outcome.retry_after == retry_after


@pytest.mark.parametrize(("status", "verdict"), [(502, Verdict.REJECTED_TRANSIENT), (200, Verdict.REJECTED_TRANSIENT),
                                                 (418, Verdict.REJECTED_PERMANENT)])
async def test_non_json_answers(fcm: FcmServer, provider: FcmProvider, status: int, verdict: Verdict) -> None:
    fcm.script(DEVICE_TOKEN, [Reply(status, body="<html><title>Error</title></html>")])
    outcome = await provider.send(push_request())
    assert outcome.verdict is verdict and not outcome.token_dead
    assert outcome.error is not None and "unparsable FCM answer" in outcome.error


async def test_token_endpoint_failure_is_transient_and_names_it(fcm: FcmServer, provider: FcmProvider) -> None:
    fcm.script_token([Reply(500)])
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.error is not None
    assert outcome.error.startswith(f"token endpoint {fcm.token_uri}: HTTP 500")
    assert fcm.requests == []  # nothing was sent without a token
    assert (await provider.send(push_request())).accepted  # the next send fetches again


async def test_assertion_signed_with_a_foreign_key_is_refused(fcm: FcmServer, account: dict[str, str],
                                                              tmp_path: Path) -> None:
    # same client_email and key id, but a key the server does not know: the signature check fails
    forged = make_service_account(tmp_path / "forged.json", fcm.token_uri)
    forged.update(client_email=account["client_email"], private_key_id=account["private_key_id"])
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    provider = make_provider(fcm, tmp_path / "forged.json")
    try:
        outcome = await provider.send(push_request())
    finally:
        await provider.close()
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.error is not None and "invalid_grant (Invalid JWT Signature.)" in outcome.error
    assert fcm.token_requests[0].status == 400 and fcm.requests == []


async def test_token_endpoint_unreachable(fcm: FcmServer, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sa_file = tmp_path / "dead-endpoint.json"
    make_service_account(sa_file, f"https://127.0.0.1:{port}/token")
    provider = make_provider(fcm, sa_file)
    try:
        outcome = await provider.send(push_request())
    finally:
        await provider.close()
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.error is not None
    assert outcome.error.startswith(f"token endpoint https://127.0.0.1:{port}/token: connection failed")


async def test_connection_refused_is_transient(fcm: FcmServer, provider: FcmProvider) -> None:
    assert (await provider.send(push_request())).accepted  # token cached
    await fcm.stop()
    outcome = await provider.send(push_request())
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT and outcome.provider_code is None
    assert outcome.error is not None and outcome.error.startswith(("connection failed", "network error"))


async def test_timeout_is_transient(fcm: FcmServer, account: dict[str, str], tmp_path: Path) -> None:
    provider = make_provider(fcm, tmp_path / "sa.json", timeout=0.3)
    fcm.script(DEVICE_TOKEN, [Reply(200, delay=5)])
    try:
        outcome = await provider.send(push_request())
    finally:
        await provider.close()
    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.error is not None and "timeout" in outcome.error


async def test_no_secrets_in_summary_or_logs(fcm: FcmServer, account: dict[str, str], provider: FcmProvider,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fcm.script(DEVICE_TOKEN, [Reply(404)])
    outcomes = [await provider.send(push_request()), await provider.send(push_request(kind=PushKind.TEST))]
    fcm.revoke_tokens()
    outcomes.append(await provider.send(push_request()))
    secrets = [DEVICE_TOKEN, *{r.headers["authorization"].removeprefix("Bearer ") for r in fcm.requests}]
    key_body = account["private_key"].splitlines()[1]
    text = json.dumps([o.request_summary for o in outcomes]) + repr(outcomes) + caplog.text + repr(provider)
    for secret in [*secrets, key_body]:
        assert secret not in text
    summary = outcomes[0].request_summary
    assert summary["token"] == "dEvI…tail" and summary["message"]["token"] == "dEvI…tail"
    assert summary["project_id"] == "sipis-lab" and summary["provider"] == "fcm-main"
    assert "private_key=" not in repr(provider.account)


def test_service_account_problems(tmp_path: Path) -> None:
    config = FcmPush(name="f", url="https://127.0.0.1:1", service_account_file=tmp_path / "missing.json")
    with pytest.raises(ServiceAccountError, match="cannot read the service account file"):
        FcmProvider(config)
    (tmp_path / "missing.json").write_text('{"client_email": "a@b", "private_key": "nope"}')
    with pytest.raises(ServiceAccountError, match="not an unencrypted PEM key"):
        FcmProvider(config)
    info = make_service_account(tmp_path / "missing.json", "https://127.0.0.1:1/token")
    del info["project_id"]
    (tmp_path / "missing.json").write_text(json.dumps(info))
    with pytest.raises(ServiceAccountError, match="no project_id"):
        FcmProvider(config)
