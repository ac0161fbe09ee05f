"""The APNs provider against the loopback APNs (real HTTP/2 over TLS with ALPN h2, JWTs checked
with the team's public key): headers and payloads as Apple wants them, provider-token reuse and
regeneration, the error map, and recovery from GOAWAY / dropped / stalled connections."""

from __future__ import annotations

import asyncio
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jwt
import pytest

from lab.apns_server import ApnsServer, Delay, Drop, GoAway, Reply, write_apns_key
from sipis.clock import FakeClock
from sipis.config import ApnsPush
from sipis.push.apns import (
    TOO_MANY_REQUESTS_BACKOFF,
    ApnsProvider,
    apns_id_for,
    collapse_id_for,
    mask_token,
)
from sipis.push.base import PushKind, PushOutcome, PushRequest, Verdict

TEAM = "TEAM123456"
KEY_ID = "KEY7654321"
BUNDLE = "com.example.softphone"
TOKEN = "a1b2c3d4" * 8  # 64 hex digits, like a real device token
CALL_ID = "3848276298220188511@pbx.example.com"


@dataclass
class Lab:
    tmp: Path
    clock: FakeClock
    server: ApnsServer
    key_file: Path
    providers: list[ApnsProvider] = field(default_factory=list)

    def config(self, **overrides: Any) -> ApnsPush:
        config = ApnsPush(name="ios", url=self.server.url, ca_file=self.server.ca_file, timeout=2.0,
                          team_id=TEAM, key_id=KEY_ID, key_file=self.key_file, topic=BUNDLE)
        return replace(config, **overrides)

    def provider(self, **overrides: Any) -> ApnsProvider:
        provider = ApnsProvider(self.config(**overrides), clock=self.clock)
        self.providers.append(provider)
        return provider

    def request(self, kind: PushKind = PushKind.CALL, *, voip: bool = True, token: str = TOKEN,
                push_id: str | None = None, ttl: float = 30.0, **fields: Any) -> PushRequest:
        defaults: dict[str, Any] = {"call_id": CALL_ID, "caller": "sip:alice@pbx.example.com",
                                    "caller_display_name": "Alice", "user_name": "bob"}
        return PushRequest(push_id=push_id or str(uuid.uuid4()), kind=kind, selector="sel-1",
                           app_id=BUNDLE, token=token, voip=voip, sent_at=self.clock.wall(), ttl=ttl,
                           **{**defaults, **fields})


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    key_file = tmp_path / "AuthKey_KEY7654321.p8"
    public_key = write_apns_key(key_file)
    clock = FakeClock(start=0.0, wall_offset=time.time())
    server = ApnsServer(tmp_path, team_id=TEAM, key_id=KEY_ID, public_key=public_key, topic=BUNDLE,
                        now=clock.wall)
    lab = Lab(tmp_path, clock, server, key_file)
    async with server:
        try:
            yield lab
        finally:
            for provider in lab.providers:
                await provider.close()


def assert_accepted(outcome: PushOutcome) -> None:
    assert outcome.verdict is Verdict.ACCEPTED, outcome
    assert outcome.provider_code == 200


# -- what goes over the wire ---------------------------------------------------------------------


async def test_voip_call_push_headers_payload_and_jwt(lab: Lab) -> None:
    provider = lab.provider()
    request = lab.request(ttl=45.0)
    outcome = await provider.send(request)

    assert_accepted(outcome)
    assert outcome.provider_reason == request.push_id  # the apns-id Apple echoes
    assert outcome.latency_ms is not None and outcome.latency_ms > 0
    [seen] = lab.server.requests
    assert seen.method == "POST" and seen.path == f"/3/device/{TOKEN}"
    assert seen.headers["apns-push-type"] == "voip"
    assert seen.headers["apns-topic"] == f"{BUNDLE}.voip"
    assert seen.headers["apns-priority"] == "10"
    assert seen.headers["apns-expiration"] == str(math.ceil(lab.clock.wall() + 45.0))
    assert seen.headers["apns-collapse-id"] == CALL_ID
    assert seen.headers["apns-id"] == request.push_id
    assert seen.payload == {"aps": {}, **request.payload_fields()}
    assert seen.payload["call_id"] == CALL_ID and seen.payload["type"] == "call"
    # the provider token: ES256 with the key id, issued by the team, now
    assert seen.jwt is not None
    assert jwt.get_unverified_header(seen.jwt) == {"alg": "ES256", "kid": KEY_ID}
    claims = jwt.decode(seen.jwt, lab.server.public_key, algorithms=["ES256"], options={"verify_iat": False})
    assert claims == {"iss": TEAM, "iat": int(lab.clock.wall())}
    # nothing secret in the outcome, the device token masked
    summary = outcome.request_summary
    assert "authorization" not in summary["headers"]
    assert seen.jwt not in repr(outcome) and TOKEN not in repr(outcome)
    assert summary["url"].endswith(f"/3/device/{mask_token(TOKEN)}")
    assert summary["attempts"] == 1 and summary["reconnected"] is False
    assert lab.key_file.read_text() not in repr(provider.__dict__)


@pytest.mark.parametrize("voip", [False, True])
async def test_missed_call_is_an_alert_push_on_the_plain_topic(lab: Lab, voip: bool) -> None:
    """Never a VoIP push for something that is not a ringing call (iOS kills apps for that)."""
    provider = lab.provider()
    request = lab.request(PushKind.MISSED, voip=voip, token="0f" * 32)
    outcome = await provider.send(request)

    if voip:  # a PushKit token on the alert topic: Apple would say DeviceTokenNotForTopic
        assert lab.server.requests[0].headers["apns-topic"] == BUNDLE
        return
    assert_accepted(outcome)
    [seen] = lab.server.requests
    assert seen.headers["apns-push-type"] == "alert"
    assert seen.headers["apns-topic"] == BUNDLE
    assert seen.headers["apns-collapse-id"] == CALL_ID
    assert seen.payload["aps"]["alert"] == {"title": "Missed call", "body": "Alice"}
    assert seen.payload["type"] == "missed" and seen.payload["push_id"] == request.push_id


async def test_call_push_without_voip_token_and_text_push(lab: Lab) -> None:
    provider = lab.provider()
    call = await provider.send(lab.request(PushKind.CALL, voip=False))
    text = await provider.send(lab.request(PushKind.TEXT, voip=False, message="see you at 5"))

    assert_accepted(call)
    assert_accepted(text)
    call_seen, text_seen = lab.server.requests
    assert call_seen.headers["apns-push-type"] == "alert" and call_seen.headers["apns-topic"] == BUNDLE
    assert call_seen.payload["aps"]["alert"]["title"] == "Incoming call"
    assert "apns-collapse-id" not in text_seen.headers  # not call-related
    assert text_seen.payload["aps"]["alert"] == {"title": "Alice", "body": "see you at 5"}
    assert text_seen.payload["message"] == "see you at 5"


async def test_ids_derived_and_long_texts_fit_apple_limits(lab: Lab) -> None:
    provider = lab.provider()
    long_call_id = "x" * 100 + "@pbx.example.com"
    outcome = await provider.send(lab.request(push_id="push-42", call_id=long_call_id))
    text = await provider.send(lab.request(PushKind.TEXT, voip=False, message="ü" * 20_000))

    assert_accepted(outcome)  # the server rejects collapse ids > 64 bytes and non-UUID apns-ids
    assert_accepted(text)  # ... and payloads > 4 KB
    call_seen, text_seen = lab.server.requests
    assert call_seen.headers["apns-id"] == apns_id_for("push-42") == apns_id_for("push-42")
    assert uuid.UUID(call_seen.headers["apns-id"]).version == 5
    assert call_seen.headers["apns-collapse-id"] == collapse_id_for(long_call_id)
    assert len(call_seen.headers["apns-collapse-id"]) == 64
    assert call_seen.payload["call_id"] == long_call_id
    assert 3500 < len(text_seen.body) <= 4096
    assert text_seen.payload["message"].endswith("…")


# -- the provider token ------------------------------------------------------------------------------


async def test_jwt_reused_on_one_connection_and_regenerated_after_40_minutes(lab: Lab) -> None:
    provider = lab.provider()
    outcomes = list(await asyncio.gather(*(provider.send(lab.request()) for _ in range(20))))
    for _ in range(5):
        outcomes.append(await provider.send(lab.request()))
    lab.clock.advance(39 * 60)
    outcomes.append(await provider.send(lab.request()))

    assert all(o.accepted for o in outcomes)
    assert len(lab.server.requests) == 26
    assert lab.server.connections == 1  # all multiplexed on one warm HTTP/2 connection
    assert len(lab.server.jwts) == 1 and provider.token.minted == 1

    lab.clock.advance(2 * 60)  # 41 minutes after minting
    for _ in range(3):
        assert_accepted(await provider.send(lab.request()))
    assert len(lab.server.jwts) == 2 and provider.token.minted == 2
    assert lab.server.requests[-1].jwt == lab.server.jwts[1]
    assert lab.server.connections == 1


async def test_expired_provider_token_is_regenerated_and_the_push_retried_once(lab: Lab) -> None:
    provider = lab.provider()
    assert_accepted(await provider.send(lab.request()))
    lab.clock.advance(30)
    lab.server.max_token_age = 10  # the server now considers our 30 s old token expired

    outcome = await provider.send(lab.request())

    assert_accepted(outcome)
    first, expired, retried = lab.server.requests
    assert (expired.status, expired.reason) == (403, "ExpiredProviderToken")
    assert retried.status == 200 and retried.jwt != expired.jwt == first.jwt
    assert retried.headers["apns-id"] == expired.headers["apns-id"]
    assert provider.token.minted == 2
    assert outcome.request_summary["token_regenerated"] is True
    assert outcome.request_summary["attempts"] == 2


async def test_expired_provider_token_twice_is_permanent(lab: Lab) -> None:
    provider = lab.provider()
    lab.server.script(TOKEN, Reply(403, "ExpiredProviderToken"), Reply(403, "ExpiredProviderToken"))
    outcome = await provider.send(lab.request())

    assert outcome.verdict is Verdict.REJECTED_PERMANENT
    assert (outcome.provider_code, outcome.provider_reason) == (403, "ExpiredProviderToken")
    assert len(lab.server.requests) == 2 and provider.token.minted == 2


async def test_invalid_provider_token_is_permanent(lab: Lab) -> None:
    other_key = lab.tmp / "AuthKey_other.p8"
    write_apns_key(other_key)  # a key APNs does not know for this key id
    provider = lab.provider(key_file=other_key)
    outcome = await provider.send(lab.request())

    assert outcome.verdict is Verdict.REJECTED_PERMANENT
    assert (outcome.provider_code, outcome.provider_reason) == (403, "InvalidProviderToken")
    assert outcome.token_dead is False
    assert len(lab.server.requests) == 1  # no retry, no token churn
    wrong_team = lab.provider(team_id="OTHERTEAM1")
    assert (await wrong_team.send(lab.request())).provider_reason == "InvalidProviderToken"


# -- error map -----------------------------------------------------------------------------------------


async def test_unregistered_token_is_dead_with_apple_timestamp(lab: Lab) -> None:
    stamp = lab.server.unregister(TOKEN)
    outcome = await lab.provider().send(lab.request())

    assert outcome.verdict is Verdict.REJECTED_PERMANENT
    assert (outcome.provider_code, outcome.provider_reason) == (410, "Unregistered")
    assert outcome.token_dead is True
    assert outcome.request_summary["response"]["timestamp"] == stamp


async def test_bad_device_token_is_dead_other_400s_are_not(lab: Lab) -> None:
    bad = await lab.provider().send(lab.request(token="not/a+device token"))
    assert bad.verdict is Verdict.REJECTED_PERMANENT
    assert (bad.provider_code, bad.provider_reason, bad.token_dead) == (400, "BadDeviceToken", True)
    assert lab.server.requests[0].path == "/3/device/not%2Fa%2Bdevice%20token"

    wrong_topic = await lab.provider(topic="com.example.other").send(lab.request())
    assert wrong_topic.verdict is Verdict.REJECTED_PERMANENT
    assert (wrong_topic.provider_code, wrong_topic.provider_reason) == (400, "TopicDisallowed")
    assert wrong_topic.token_dead is False


async def test_too_many_requests_is_transient_with_retry_after(lab: Lab) -> None:
    provider = lab.provider()
    lab.server.script(TOKEN, Reply(429, "TooManyRequests", headers={"retry-after": "7"}),
                      Reply(429, "TooManyProviderTokenUpdates"))
    with_header = await provider.send(lab.request())
    without = await provider.send(lab.request())

    assert with_header.verdict is Verdict.REJECTED_TRANSIENT
    assert (with_header.provider_code, with_header.provider_reason) == (429, "TooManyRequests")
    assert with_header.retry_after == 7.0
    assert without.verdict is Verdict.REJECTED_TRANSIENT
    assert without.provider_reason == "TooManyProviderTokenUpdates"
    assert without.retry_after == TOO_MANY_REQUESTS_BACKOFF
    assert len(lab.server.requests) == 2  # providers do not retry these themselves


async def test_server_errors_are_transient_and_honour_retry_after(lab: Lab) -> None:
    provider = lab.provider()
    lab.server.script(TOKEN, Reply(503, "ServiceUnavailable", headers={"retry-after": "3"}),
                      Reply(500, "InternalServerError"))
    unavailable = await provider.send(lab.request())
    internal = await provider.send(lab.request())

    assert unavailable.verdict is Verdict.REJECTED_TRANSIENT
    assert (unavailable.provider_code, unavailable.provider_reason) == (503, "ServiceUnavailable")
    assert unavailable.retry_after == 3.0
    assert internal.verdict is Verdict.REJECTED_TRANSIENT and internal.provider_code == 500
    assert internal.retry_after is None
    assert_accepted(await provider.send(lab.request()))
    assert lab.server.connections == 1


async def test_timeout_is_transient_and_the_stalled_connection_is_replaced(lab: Lab) -> None:
    provider = lab.provider(timeout=0.3)
    lab.server.script(TOKEN, Delay(2.0))
    outcome = await provider.send(lab.request())

    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.provider_code is None
    assert outcome.error is not None and "Timeout" in outcome.error
    assert len(lab.server.requests) == 1  # a timed-out push may have gone out: not retried here
    assert_accepted(await provider.send(lab.request()))
    assert lab.server.connections == 2 and provider.reconnects == 1


async def test_connection_refused_is_transient(lab: Lab) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the push: nothing listens there
    outcome = await lab.provider(url=f"https://127.0.0.1:{port}").send(lab.request())

    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.error is not None and "ConnectError" in outcome.error


# -- GOAWAY and dropped connections ---------------------------------------------------------------


async def test_goaway_mid_flight_recycles_the_client_and_retries_once(lab: Lab) -> None:
    provider = lab.provider()
    assert_accepted(await provider.send(lab.request()))
    lab.server.script(TOKEN, GoAway())
    outcome = await provider.send(lab.request())

    assert_accepted(outcome)
    assert lab.server.connections == 2 and provider.reconnects == 1
    _, goaway, retried = lab.server.requests
    assert (goaway.action, goaway.connection) == ("goaway", 1)
    assert (retried.status, retried.connection) == (200, 2)
    assert retried.headers["apns-id"] == goaway.headers["apns-id"]
    assert retried.jwt == goaway.jwt  # a new connection does not need a new provider token
    assert outcome.request_summary["reconnected"] is True
    assert_accepted(await provider.send(lab.request()))
    assert lab.server.connections == 2  # the new connection stays in use


async def test_goaway_with_many_pushes_in_flight(lab: Lab) -> None:
    provider = lab.provider()
    assert_accepted(await provider.send(lab.request()))
    tokens = [f"{n:064x}" for n in range(20)]
    lab.server.script(tokens[7], GoAway())
    outcomes = await asyncio.gather(*(provider.send(lab.request(token=t)) for t in tokens))

    assert all(o.accepted for o in outcomes), [o for o in outcomes if not o.accepted]
    assert provider.reconnects == 1  # one recycle however many streams died with the connection
    assert {r.device_token for r in lab.server.accepted()} >= set(tokens)


async def test_server_retiring_connections_with_goaway(lab: Lab) -> None:
    lab.server.goaway_after_streams = 2
    provider = lab.provider()
    for _ in range(6):
        assert_accepted(await provider.send(lab.request()))
    assert lab.server.connections >= 3
    assert len(lab.server.jwts) == 1


async def test_dropped_connection_is_retried_on_a_new_one(lab: Lab) -> None:
    provider = lab.provider()
    lab.server.script(TOKEN, Drop())
    outcome = await provider.send(lab.request())

    assert_accepted(outcome)
    assert lab.server.connections == 2 and provider.reconnects == 1
    assert [r.action for r in lab.server.requests] == ["drop", "reply"]


async def test_a_second_goaway_for_the_same_push_is_transient(lab: Lab) -> None:
    provider = lab.provider()
    lab.server.script(TOKEN, GoAway(), GoAway())
    outcome = await provider.send(lab.request())

    assert outcome.verdict is Verdict.REJECTED_TRANSIENT
    assert outcome.error is not None and "RemoteProtocolError" in outcome.error
    assert len(lab.server.requests) == 2  # retried exactly once
    assert_accepted(await provider.send(lab.request()))


async def test_goaway_but_connection_left_open_mid_flight(lab: Lab) -> None:
    """The field failure: after GOAWAY the socket stays up and swallows every later push."""
    provider = lab.provider()
    lab.server.script(TOKEN, GoAway(keep_open=True))
    outcome = await provider.send(lab.request())

    assert_accepted(outcome)
    assert lab.server.connections == 2 and provider.reconnects == 1
    assert [(r.connection, r.action) for r in lab.server.requests] == [(1, "goaway"), (2, "reply")]


@pytest.mark.parametrize("keep_open", [False, True])
async def test_goaway_on_an_idle_connection(lab: Lab, keep_open: bool) -> None:
    provider = lab.provider()
    assert_accepted(await provider.send(lab.request()))
    assert lab.server.goaway(keep_open=keep_open) == 1
    await asyncio.sleep(0.05)  # the GOAWAY (and the close) reach the client while it is idle
    outcomes = await asyncio.gather(*(provider.send(lab.request()) for _ in range(5)))

    assert all(o.accepted for o in outcomes), outcomes
    assert {r.connection for r in lab.server.requests[1:]} == {2}
    assert lab.server.connections == 2
