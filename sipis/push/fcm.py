"""Firebase Cloud Messaging, HTTP v1 API, with a service account.

Auth (RFC 7523 JWT bearer grant, the way Google's libraries do it): an RS256 JWT signed with the
service account's private key (``iss`` = ``client_email``, ``scope`` = firebase.messaging, ``aud``
= ``token_uri``, one hour) is POSTed as ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``
to ``token_uri``; the access token it returns is cached until about 5 minutes before
``expires_in`` runs out. Only one refresh runs at a time. When FCM answers 401 without an FCM
error code (our access token was refused), the token is dropped and the push is sent once more
with a fresh one.

Message: ``POST {url}/v1/projects/{project_id}/messages:send`` with a data-only message::

    {"message": {"token": ..., "data": {PushRequest.payload_fields()},
                 "android": {"priority": "HIGH", "ttl": "<whole seconds ≤ request.ttl>s"}}}

Errors (``error.details[].errorCode``, else ``error.status``):

===========================  ======================================================
UNREGISTERED (404)           permanent, ``token_dead``
INVALID_ARGUMENT (400)       permanent; the token is *not* declared dead (bad request or config)
SENDER_ID_MISMATCH (403)     permanent; credentials/project problem → alarm
THIRD_PARTY_AUTH_ERROR (401) permanent; APNs/web-push credentials in Firebase → alarm
UNAUTHENTICATED (401)        after the one retry with a fresh access token: permanent → alarm
QUOTA_EXCEEDED (429)         transient, ``retry_after`` from the header, else 60 s
UNAVAILABLE / INTERNAL (5xx) transient, honouring ``Retry-After``
token endpoint failure       transient, ``error`` names the token endpoint
===========================  ======================================================

:data:`ALARM_REASONS` lists the ``provider_reason`` values that mean "fix the credentials or the
project", for the delivery layer and the console. The private key and access tokens are never
logged, shown or put into ``request_summary``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from sipis.config import FcmPush
from sipis.push.base import PushOutcome, PushRequest, Verdict
from sipis.push.http import (
    HttpPushProvider,
    base_summary,
    body_excerpt,
    clip,
    elapsed_ms,
    json_or_none,
    mask_token,
    outcome,
    post,
    retry_after,
    safe_url,
)

log = logging.getLogger(__name__)

SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_TOKEN_URI: Final = "https://oauth2.googleapis.com/token"
ASSERTION_LIFETIME: Final = 3600  # Google accepts at most one hour
REFRESH_MARGIN: Final = 300.0  # refresh this long before the access token expires
QUOTA_BACKOFF: Final = 60.0  # minimum wait after QUOTA_EXCEEDED without a Retry-After
MAX_TTL: Final = 28 * 24 * 3600  # FCM's maximum android.ttl (4 weeks)

#: ``provider_reason`` values that point at credentials or project setup, not at one device.
ALARM_REASONS: Final = frozenset({
    "SENDER_ID_MISMATCH", "THIRD_PARTY_AUTH_ERROR", "UNAUTHENTICATED", "PERMISSION_DENIED",
    "QUOTA_EXCEEDED",
})


class ServiceAccountError(ValueError):
    """The service account file is missing, unreadable or incomplete."""


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    private_key_id: str | None
    project_id: str | None
    token_uri: str | None
    private_key: RSAPrivateKey = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> ServiceAccount:
        try:
            info = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ServiceAccountError(f"{path}: cannot read the service account file: {exc.strerror}") from None
        except (ValueError, UnicodeDecodeError):
            raise ServiceAccountError(f"{path}: the service account file is not JSON") from None
        return cls.from_info(info, str(path))

    @classmethod
    def from_info(cls, info: Any, where: str = "service account") -> ServiceAccount:
        if not isinstance(info, dict):
            raise ServiceAccountError(f"{where}: expected a JSON object")
        missing = [key for key in ("client_email", "private_key") if not isinstance(info.get(key), str)]
        if missing:
            raise ServiceAccountError(f"{where}: missing {', '.join(missing)}")
        try:
            key = load_pem_private_key(info["private_key"].encode(), password=None)
        except (ValueError, TypeError):
            raise ServiceAccountError(f"{where}: private_key is not an unencrypted PEM key") from None
        if not isinstance(key, RSAPrivateKey):
            raise ServiceAccountError(f"{where}: private_key is not an RSA key")

        def text(name: str) -> str | None:
            value = info.get(name)
            return value if isinstance(value, str) and value else None

        return cls(client_email=info["client_email"], private_key_id=text("private_key_id"),
                   project_id=text("project_id"), token_uri=text("token_uri"), private_key=key)


class TokenEndpointError(Exception):
    """Getting an access token failed; the text names the endpoint, never a secret."""


def fcm_message(request: PushRequest) -> dict[str, Any]:
    """The ``messages:send`` body for ``request``: data-only, high priority, ttl ≤ request.ttl."""
    ttl = min(MAX_TTL, max(0, int(request.ttl)))
    return {"message": {
        "token": request.token,
        "data": request.payload_fields(),
        "android": {"priority": "HIGH", "ttl": f"{ttl}s"},
    }}


class FcmProvider(HttpPushProvider):
    type: str = "fcm"

    def __init__(self, config: FcmPush, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, **kwargs: Any) -> None:
        account = ServiceAccount.load(config.service_account_file)  # before the client: fail early
        project_id = config.project_id or account.project_id
        if not project_id:
            raise ServiceAccountError(f"{config.service_account_file}: no project_id; set it in the config")
        super().__init__(config, **kwargs)
        self.account = account
        self.project_id: str = project_id
        self.token_uri: str = config.token_uri or account.token_uri or DEFAULT_TOKEN_URI
        self.send_url = f"{config.url.rstrip('/')}/v1/projects/{quote(project_id, safe='')}/messages:send"
        self.token_fetches = 0  # access tokens obtained so far (for metrics and tests)
        self._clock = clock
        self._wall_clock = wall_clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._token_lock = asyncio.Lock()

    # ------------------------------------------------------------------ access token

    def _cached_token(self) -> str | None:
        if self._token is not None and self._clock() < self._refresh_at:
            return self._token
        return None

    async def access_token(self) -> str:
        """A valid access token, fetching one if needed (one fetch at a time)."""
        token = self._cached_token()
        if token is not None:
            return token
        async with self._token_lock:
            token = self._cached_token()  # another send may have refreshed it meanwhile
            if token is not None:
                return token
            token, lifetime = await self._fetch_token()
            self._token = token
            self._refresh_at = self._clock() + lifetime
            self.token_fetches += 1
            log.info("push %s: FCM access token obtained from %s (refresh in %.0f s)",
                     self.name, safe_url(self.token_uri), lifetime)
            return token

    def drop_token(self, token: str) -> None:
        """Forget ``token`` if it is still the cached one (a refresh may have replaced it)."""
        if self._token == token:
            self._token = None

    def _assertion(self) -> str:
        issued = int(self._wall_clock())
        claims = {"iss": self.account.client_email, "scope": SCOPE, "aud": self.token_uri,
                  "iat": issued, "exp": issued + ASSERTION_LIFETIME}
        headers = {"kid": self.account.private_key_id} if self.account.private_key_id else None
        return jwt.encode(claims, self.account.private_key, algorithm="RS256", headers=headers)

    async def _fetch_token(self) -> tuple[str, float]:
        where = f"token endpoint {safe_url(self.token_uri)}"
        exchange = await post(self.client, self.token_uri,
                              form={"grant_type": GRANT_TYPE, "assertion": self._assertion()})
        if exchange.response is None:
            raise TokenEndpointError(f"{where}: {exchange.error}")
        response = exchange.response
        answer = json_or_none(response)
        if response.status_code != 200:
            detail = body_excerpt(response)
            if isinstance(answer, dict) and isinstance(answer.get("error"), str):
                detail = answer["error"]
                if isinstance(answer.get("error_description"), str):
                    detail += f" ({answer['error_description']})"
            raise TokenEndpointError(clip(f"{where}: HTTP {response.status_code} {detail}"))
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise TokenEndpointError(f"{where}: answer without an access_token")
        expires_in = answer.get("expires_in", 3600)
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
            expires_in = 3600
        lifetime = expires_in - REFRESH_MARGIN if expires_in > 2 * REFRESH_MARGIN else expires_in / 2
        return token, float(lifetime)

    # ------------------------------------------------------------------ sending

    async def send(self, request: PushRequest) -> PushOutcome:
        start = time.perf_counter()
        body = fcm_message(request)
        summary = base_summary(self.name, self.type, self.send_url, request)
        summary["project_id"] = self.project_id
        summary["message"] = {**body["message"], "token": mask_token(request.token)}
        for attempt in (1, 2):
            summary["attempts"] = attempt
            try:
                token = await self.access_token()
            except TokenEndpointError as exc:
                return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=elapsed_ms(start), summary=summary,
                               error=str(exc))
            exchange = await post(self.client, self.send_url, json_body=body,
                                  headers={"Authorization": f"Bearer {token}"})
            if exchange.response is None:
                return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=elapsed_ms(start), summary=summary,
                               error=exchange.error)
            response = exchange.response
            status_text, error_code, message = _fcm_error(response)
            if response.status_code == 401 and error_code is None and attempt == 1:
                log.info("push %s: FCM refused the access token; fetching a new one", self.name)
                self.drop_token(token)
                continue
            return _classify(response, status_text, error_code, message, elapsed_ms(start), summary)
        raise AssertionError("unreachable")


def _fcm_error(response: httpx.Response) -> tuple[str | None, str | None, str | None]:
    """``(error.status, details[].errorCode of the FcmError, error.message)`` of an answer."""
    answer = json_or_none(response)
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        return None, None, None
    status = error.get("status") if isinstance(error.get("status"), str) else None
    message = error.get("message") if isinstance(error.get("message"), str) else None
    code = None
    details = error.get("details")
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and isinstance(detail.get("errorCode"), str):
            code = detail["errorCode"]
            if str(detail.get("@type", "")).endswith("FcmError"):
                break  # prefer the FCM error over other detail types
    return status, code, message


def _classify(response: httpx.Response, status_text: str | None, error_code: str | None,
              message: str | None, latency: float, summary: dict[str, Any]) -> PushOutcome:
    http = response.status_code
    reason = error_code or status_text or response.reason_phrase or None
    answer: dict[str, Any] = {"status": http}
    if status_text:
        answer["error_status"] = status_text
    if error_code:
        answer["error_code"] = error_code
    if message:
        answer["message"] = clip(message)
    summary["response"] = answer
    if 200 <= http < 300:
        result = json_or_none(response)
        name = result.get("name") if isinstance(result, dict) else None
        if not isinstance(name, str):
            return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency, summary=summary, code=http,
                           error=f"unparsable FCM answer (HTTP {http}): {body_excerpt(response)!r}")
        answer["name"] = name
        return outcome(Verdict.ACCEPTED, latency_ms=latency, summary=summary, code=http, reason=name)
    if status_text is None and error_code is None:  # not Google's error JSON (a proxy, HTML ...)
        transient = http == 429 or http >= 500
        verdict = Verdict.REJECTED_TRANSIENT if transient else Verdict.REJECTED_PERMANENT
        return outcome(verdict, latency_ms=latency, summary=summary, code=http, reason=reason,
                       retry=_retry(response, http == 429),
                       error=f"unparsable FCM answer (HTTP {http}): {body_excerpt(response)!r}")
    if error_code == "UNREGISTERED":
        return outcome(Verdict.REJECTED_PERMANENT, latency_ms=latency, summary=summary, code=http,
                       reason=reason, token_dead=True)
    if error_code == "QUOTA_EXCEEDED" or status_text == "RESOURCE_EXHAUSTED" or http == 429:
        return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency, summary=summary, code=http,
                       reason=error_code or "QUOTA_EXCEEDED", retry=_retry(response, True))
    if error_code in ("UNAVAILABLE", "INTERNAL") or http >= 500:
        return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency, summary=summary, code=http,
                       reason=reason, retry=_retry(response, False))
    if 400 <= http < 500:
        return outcome(Verdict.REJECTED_PERMANENT, latency_ms=latency, summary=summary, code=http,
                       reason=reason)
    return outcome(Verdict.REJECTED_TRANSIENT, latency_ms=latency, summary=summary, code=http, reason=reason,
                   error=f"unexpected FCM answer HTTP {http}")


def _retry(response: httpx.Response, quota: bool) -> float | None:
    value = retry_after(response)
    if quota and value is None:
        return QUOTA_BACKOFF
    return value
