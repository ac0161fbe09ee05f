"""Apple Push Notification service, HTTP/2 provider API with token (JWT) authentication.

One long-lived :class:`httpx.AsyncClient` with ``http2=True`` per provider: all pushes are
multiplexed as streams on one warm TLS connection (Apple treats connection churn as abuse).

* **Provider token**: a JWT (ES256, header ``{alg, kid}``, claims ``{iss: team, iat}``) signed with
  the team's ``.p8`` key, minted once and reused for :data:`TOKEN_LIFETIME` (40 min; Apple wants a
  refresh no more often than every 20 min and no less than every 60 min). ``403
  ExpiredProviderToken`` mints a fresh one and retries that push once.
* **VoIP vs alert**: a call push to a PushKit token goes out as ``apns-push-type: voip`` to topic
  ``<bundle>.voip`` with an empty ``aps`` (the app must report it to CallKit). Everything else
  (missed call, answered elsewhere, text, test, or a call for an app without a VoIP token) is an
  ``alert`` push to the plain bundle topic — iOS punishes VoIP pushes that are not real calls.
* **Connections**: GOAWAY, a connection dropped mid-flight (``RemoteProtocolError``, read/write
  errors) or a stalled connection (read/write timeout) retires the client: a fresh one takes the
  next pushes, the old one is closed as soon as its in-flight requests are done. After GOAWAY or a
  drop the same push is retried once on the fresh connection; a timed-out push is not retried here
  (it may have been delivered; the delivery layer decides).

Response classification (Apple's reason strings, ``handling-error-responses-from-apns``):

* 200 → accepted; ``provider_reason`` is the ``apns-id`` Apple echoed.
* 410 ``Unregistered`` → permanent, ``token_dead``; Apple's ``timestamp`` (ms, when the token was
  last known invalid) goes to ``request_summary["response"]["timestamp"]`` so the caller can keep a
  token that was re-registered after it.
* 400 ``BadDeviceToken`` → permanent, ``token_dead`` — Apple also answers this when the token
  belongs to the other environment (sandbox vs production): the operator should check ``url``
  before concluding that many devices died at once.
* other 400, 403, 404, 405, 413 → permanent, token kept (configuration or payload problem; 403
  ``InvalidProviderToken`` means wrong key/key id/team id — alarm-worthy).
* 429 (``TooManyRequests``, ``TooManyProviderTokenUpdates``) → transient, ``retry_after`` from
  the header or :data:`TOO_MANY_REQUESTS_BACKOFF`.
* 5xx → transient, ``Retry-After`` honoured when present.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sipis.clock import Clock, SystemClock
from sipis.config import ApnsPush
from sipis.push.base import PushKind, PushOutcome, PushRequest, Verdict
from sipis.push.http import mask_token, parse_retry_after  # shared with the other providers

TOKEN_LIFETIME: Final = 40 * 60.0  # reuse one provider JWT this long (Apple: 20–60 min)
TOO_MANY_REQUESTS_BACKOFF: Final = 60.0  # retry_after for a 429 without Retry-After
KEEPALIVE_EXPIRY: Final = 15 * 60.0  # keep an idle connection this long (Apple: keep it open)
MAX_PAYLOAD: Final = 4096  # bytes, alert/background pushes
MAX_VOIP_PAYLOAD: Final = 5120  # bytes, VoIP pushes
MAX_COLLAPSE_ID: Final = 64  # bytes
PRIORITY_IMMEDIATE: Final = "10"
MAX_REASON: Final = 200  # longest error text kept from an unexpected answer

#: Namespace for apns-id values derived from push ids that are not UUIDs themselves.
APNS_ID_NAMESPACE: Final = uuid.UUID("5b0b7a52-6a4e-4f43-9d2c-1f0c7e1a5a51")

#: Call-related kinds carry the SIP Call-ID as apns-collapse-id.
CALL_KINDS: Final = frozenset({PushKind.CALL, PushKind.MISSED, PushKind.ANSWERED_ELSEWHERE})

#: 400 reasons that mean the device token itself is unusable.
DEAD_TOKEN_REASONS: Final = frozenset({"BadDeviceToken"})

#: Transport failures after which the connection is gone but the push may be retried on a new one.
_RECONNECT_ERRORS: Final = (httpx.ProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError)
#: Timeouts that leave the connection unusable (httpcore marks it errored) — recycle, don't retry.
_STALL_ERRORS: Final = (httpx.ReadTimeout, httpx.WriteTimeout)


def load_signing_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """The ``.p8`` file Apple hands out: a PKCS#8 PEM EC P-256 private key."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("an APNs auth key must be an EC P-256 private key (.p8)")
    return key


def apns_id_for(push_id: str) -> str:
    """``push_id`` itself when it is a UUID, else a UUID derived from it (same id → same UUID)."""
    try:
        return str(uuid.UUID(push_id))
    except ValueError:
        return str(uuid.uuid5(APNS_ID_NAMESPACE, push_id))


def collapse_id_for(call_id: str) -> str:
    """The Call-ID when it fits APNs' 64 bytes, else its SHA-256 in hex (64 characters): unlike
    truncation, two long Call-IDs with a common prefix never collapse into one notification."""
    if len(call_id.encode()) <= MAX_COLLAPSE_ID and call_id.isascii() and call_id.isprintable():
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()


class ProviderToken:
    """The provider authentication JWT, minted at most once per ``lifetime`` (monotonic clock)."""

    def __init__(self, *, team_id: str, key_id: str, key: ec.EllipticCurvePrivateKey, clock: Clock,
                 lifetime: float = TOKEN_LIFETIME) -> None:
        self._team_id = team_id
        self._key_id = key_id
        self._key = key
        self._clock = clock
        self._lifetime = lifetime
        self._token: str | None = None
        self._minted_at = 0.0
        self.minted = 0  # how many tokens this provider has made (stats, tests)

    def current(self) -> str:
        if self._token is None or self._clock.monotonic() - self._minted_at >= self._lifetime:
            self._token = jwt.encode({"iss": self._team_id, "iat": int(self._clock.wall())}, self._key,
                                     algorithm="ES256", headers={"kid": self._key_id, "typ": None})
            self._minted_at = self._clock.monotonic()
            self.minted += 1
        return self._token

    def invalidate(self, token: str) -> None:
        """Apple called ``token`` expired: drop it unless a concurrent push already replaced it
        (one fresh token for a burst of rejections, not one per rejected push)."""
        if self._token == token:
            self._token = None

    def __repr__(self) -> str:  # never show the token
        return f"ProviderToken(team_id={self._team_id!r}, key_id={self._key_id!r}, minted={self.minted})"


@dataclass(eq=False)
class _Session:
    """One httpx client (one HTTP/2 connection per origin) and the pushes in flight on it."""

    client: httpx.AsyncClient
    inflight: int = 0
    retired: bool = False
    closing: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass
class _Attempt:
    status: int | None = None
    headers: httpx.Headers | None = None
    body: bytes = b""
    error: str | None = None


class ApnsProvider:
    type = "apns"

    def __init__(self, config: ApnsPush, *, clock: Clock | None = None,
                 token_lifetime: float = TOKEN_LIFETIME) -> None:
        self.name = config.name
        self.config = config
        self._clock: Clock = clock or SystemClock()
        self._base = config.url.rstrip("/")
        self._verify = _verify_setting(config)
        try:
            key = load_signing_key(config.key_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"push.{config.name}: cannot load the APNs auth key {config.key_file}: "
                             f"{exc}") from exc
        self.token = ProviderToken(team_id=config.team_id, key_id=config.key_id, key=key,
                                   clock=self._clock, lifetime=token_lifetime)
        self._session = self._new_session()
        self._old: set[_Session] = set()  # retired sessions whose pushes are still in flight
        self.reconnects = 0  # clients recycled after GOAWAY / drops / stalls
        self._closed = False

    def __repr__(self) -> str:
        return f"ApnsProvider(name={self.name!r}, url={self._base!r}, topic={self.config.topic!r})"

    # -- the PushProvider interface ---------------------------------------------------------

    async def send(self, request: PushRequest) -> PushOutcome:
        headers, payload, body = self.build(request)
        url = f"{self._base}/3/device/{quote(request.token, safe='')}"
        summary: dict[str, Any] = {
            "method": "POST", "url": f"{self._base}/3/device/{mask_token(request.token)}",
            "headers": dict(headers), "payload": payload, "bytes": len(body),
        }
        if self._closed:
            return PushOutcome(Verdict.REJECTED_TRANSIENT, error="provider closed", request_summary=summary)
        started = time.perf_counter()
        attempts = 0
        reconnected = regenerated = False
        while True:
            attempts += 1
            jwt_token = self.token.current()
            attempt, retry_on_new_connection = await self._post(url, headers, body, jwt_token)
            if retry_on_new_connection and not reconnected:
                reconnected = True
                continue
            reason, extra = _reason(attempt)
            if attempt.status == 403 and reason == "ExpiredProviderToken" and not regenerated:
                self.token.invalidate(jwt_token)
                regenerated = True
                continue
            break
        summary.update(attempts=attempts, reconnected=reconnected, token_regenerated=regenerated)
        latency_ms = (time.perf_counter() - started) * 1000.0
        return self._classify(attempt, reason, extra, latency_ms, summary)

    async def close(self) -> None:
        self._closed = True
        sessions = [self._session, *self._old]
        self._old.clear()
        for session in sessions:
            session.retired = True
            if session.closing is not None:
                await session.closing
            else:
                await session.client.aclose()

    # -- request building (pure) ------------------------------------------------------------

    def build(self, request: PushRequest) -> tuple[dict[str, str], dict[str, Any], bytes]:
        """Headers (without ``authorization``), payload and encoded body for ``request``."""
        voip = request.voip and request.kind is PushKind.CALL
        now = self._clock.wall()
        headers = {
            "apns-push-type": "voip" if voip else "alert",
            "apns-topic": self.config.voip_topic if voip else self.config.topic,
            "apns-priority": PRIORITY_IMMEDIATE,
            "apns-expiration": str(math.ceil(now + request.ttl)) if request.ttl > 0 else "0",
            "apns-id": apns_id_for(request.push_id),
        }
        if request.kind in CALL_KINDS and request.call_id:
            headers["apns-collapse-id"] = collapse_id_for(request.call_id)
        payload, body = _fit_payload(request, voip, MAX_VOIP_PAYLOAD if voip else MAX_PAYLOAD)
        return headers, payload, body

    # -- transport ---------------------------------------------------------------------------

    async def _post(self, url: str, headers: dict[str, str], body: bytes,
                    jwt_token: str) -> tuple[_Attempt, bool]:
        """One HTTP exchange. Returns the attempt and whether the connection died under it in a
        way that makes a retry on a fresh connection worthwhile."""
        session = self._session
        session.inflight += 1
        try:
            response = await session.client.post(
                url, content=body,
                headers={**headers, "authorization": f"bearer {jwt_token}",
                         "content-type": "application/json"},
            )
            return _Attempt(response.status_code, response.headers, response.content), False
        except _RECONNECT_ERRORS as exc:
            self._retire(session)
            return _Attempt(error=_describe(exc)), True
        except _STALL_ERRORS as exc:
            self._retire(session)
            return _Attempt(error=_describe(exc)), False
        except httpx.HTTPError as exc:  # connect errors, pool timeouts, bad URL ...
            return _Attempt(error=_describe(exc)), False
        except Exception as exc:  # providers never raise for the peer's doing; state unknown: recycle
            self._retire(session)
            return _Attempt(error=_describe(exc)), False
        finally:
            session.inflight -= 1
            if session.retired and session.inflight == 0:
                self._close_later(session)

    def _new_session(self) -> _Session:
        client = httpx.AsyncClient(
            http2=True, verify=self._verify, timeout=httpx.Timeout(self.config.timeout),
            follow_redirects=False,
            limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=KEEPALIVE_EXPIRY),
        )
        return _Session(client)

    def _retire(self, session: _Session) -> None:
        """Replace ``session`` (once, however many of its pushes failed) by a fresh client."""
        if session is not self._session or self._closed:
            return
        self.reconnects += 1
        session.retired = True
        self._old.add(session)
        self._session = self._new_session()

    def _close_later(self, session: _Session) -> None:
        if session.closing is None and not self._closed:
            session.closing = asyncio.get_running_loop().create_task(self._close_session(session))

    async def _close_session(self, session: _Session) -> None:
        try:
            await session.client.aclose()
        except Exception:  # a broken connection may fail to close cleanly; it is gone either way
            pass
        finally:
            self._old.discard(session)

    # -- classification ----------------------------------------------------------------------

    def _classify(self, attempt: _Attempt, reason: str | None, extra: dict[str, Any],
                  latency_ms: float, summary: dict[str, Any]) -> PushOutcome:
        status = attempt.status
        if status is None:
            return PushOutcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency_ms, error=attempt.error,
                               request_summary=summary)
        headers = attempt.headers or httpx.Headers()
        apns_id = headers.get("apns-id")
        summary["response"] = {"status": status, "apns-id": apns_id, **extra}
        if reason is not None:
            summary["response"]["reason"] = reason
        if status == 200:
            return PushOutcome(Verdict.ACCEPTED, provider_code=200, provider_reason=apns_id,
                               latency_ms=latency_ms, request_summary=summary)
        retry_after = parse_retry_after(headers.get("retry-after"), self._clock.wall())
        if status == 429:
            return PushOutcome(Verdict.REJECTED_TRANSIENT, provider_code=status, provider_reason=reason,
                               latency_ms=latency_ms, request_summary=summary,
                               retry_after=TOO_MANY_REQUESTS_BACKOFF if retry_after is None else retry_after)
        if status >= 500 or status == 408:
            return PushOutcome(Verdict.REJECTED_TRANSIENT, provider_code=status, provider_reason=reason,
                               latency_ms=latency_ms, retry_after=retry_after, request_summary=summary)
        token_dead = status == 410 or (status == 400 and reason in DEAD_TOKEN_REASONS)
        return PushOutcome(Verdict.REJECTED_PERMANENT, provider_code=status, provider_reason=reason,
                           latency_ms=latency_ms, token_dead=token_dead, request_summary=summary)


# -- helpers ---------------------------------------------------------------------------------


def _verify_setting(config: ApnsPush) -> ssl.SSLContext | bool:
    if not config.verify:
        return False
    if config.ca_file is not None:
        return ssl.create_default_context(cafile=str(config.ca_file))
    return True


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:MAX_REASON] if text else type(exc).__name__


def _reason(attempt: _Attempt) -> tuple[str | None, dict[str, Any]]:
    """Apple's ``reason`` and the other fields of an error body (``timestamp`` on 410)."""
    if attempt.status in (None, 200) or not attempt.body:
        return None, {}
    try:
        data = json.loads(attempt.body)
    except ValueError:
        return attempt.body[:MAX_REASON].decode(errors="replace"), {}
    if not isinstance(data, dict):
        return None, {}
    reason = data.get("reason")
    extra = {key: value for key, value in data.items() if key != "reason"}
    return (str(reason)[:MAX_REASON] if reason is not None else None), extra


def _aps(request: PushRequest, message: str | None) -> dict[str, Any]:
    who = request.caller_display_name or request.caller or "Unknown caller"
    if request.kind is PushKind.CALL:
        return {"alert": {"title": "Incoming call", "body": who}, "sound": "default",
                "interruption-level": "time-sensitive"}
    if request.kind is PushKind.MISSED:
        return {"alert": {"title": "Missed call", "body": who}, "sound": "default"}
    if request.kind is PushKind.ANSWERED_ELSEWHERE:
        return {"alert": {"title": "Call answered elsewhere", "body": who}}
    if request.kind is PushKind.TEXT:
        return {"alert": {"title": who, "body": message or ""}, "sound": "default"}
    return {"alert": {"title": "Test push", "body": message or "SIPIS test push"}}


def _payload(request: PushRequest, voip: bool, message: str | None) -> dict[str, Any]:
    fields = request.payload_fields()
    if message is not None:
        fields["message"] = message
    fields.pop("aps", None)
    return {"aps": {} if voip else _aps(request, message), **fields}


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _fit_payload(request: PushRequest, voip: bool, limit: int) -> tuple[dict[str, Any], bytes]:
    """The payload, with the text message shortened (binary search, marked ``…``) when it would
    exceed Apple's size limit. Anything else that is too large is sent as is and APNs answers
    ``413 PayloadTooLarge``."""
    payload = _payload(request, voip, request.message)
    body = _encode(payload)
    message = request.message
    if len(body) <= limit or not message:
        return payload, body
    low, high = 0, len(message) - 1  # the longest prefix that fits is in [low, high]
    best = _payload(request, voip, "…")
    while low <= high:
        middle = (low + high) // 2
        candidate = _payload(request, voip, message[:middle] + "…")
        if len(_encode(candidate)) <= limit:
            best, low = candidate, middle + 1
        else:
            high = middle - 1
    return best, _encode(best)
