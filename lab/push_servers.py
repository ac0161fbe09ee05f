"""Push providers on loopback, speaking their real wire formats over HTTPS.

* :class:`MediatorServer` — Acrobits PN Mediator JSON API (``POST /pnm2/send``).
* :class:`FcmServer` — Google's OAuth token endpoint (``POST /token``, verifies the RS256 JWT
  assertion against the service account's public key) and FCM HTTP v1
  (``POST /v1/projects/{project}/messages:send``, checks the bearer token and the message shape).
* :class:`WebhookServer` — a customer pusher: any ``POST`` path, JSON in, 2xx out.

Each server runs in the current event loop (:class:`~sipis.api.server.ApiServer`, port 0) with a
self-signed certificate written into the given folder; clients trust :attr:`ca_file`. Every
request is recorded in :attr:`requests` (parsed JSON/form, headers, the status answered), and the
answers can be scripted per device token::

    server.script(token, [Reply(503, retry_after=1), Reply(200)])

Scripted replies are used in order, one per request for that token; afterwards (and for tokens
without a script) the server behaves like the real service. ``Reply.delay`` holds the answer back
(for client timeouts); a delayed answer is released early when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sipis.api.server import ApiServer
from sipis.tls_certs import ensure_self_signed

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPES = ("https://www.googleapis.com/auth/firebase.messaging",
              "https://www.googleapis.com/auth/cloud-platform")
FCM_RESERVED_DATA = ("from", "notification", "message_type")
FCM_MAX_TTL = 28 * 24 * 3600
FCM_MAX_PAYLOAD = 4096
_TTL = re.compile(r"^(\d+)(\.\d{1,9})?s$")


@dataclass
class Reply:
    """One scripted answer.

    ``status`` is the HTTP status. ``body``: a dict/list is sent as JSON, str/bytes as they are
    (``text/plain``, e.g. for "not JSON"), None = the server's realistic default for ``status``.
    ``retry_after``: seconds or an HTTP date for the ``Retry-After`` header. ``delay``: seconds
    to wait before answering. ``code``: the mediator's JSON ``code`` (HTTP stays ``status``).
    ``error_code``: FCM's ``details[].errorCode``; None = the usual one for ``status``, "" = none.
    """

    status: int = 200
    body: Any = None
    retry_after: float | str | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    code: int | None = None
    error_code: str | None = None


@dataclass
class Received:
    """One request as the server saw it."""

    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any = None
    form: dict[str, str] | None = None
    status: int | None = None  # what the server answered (None while pending)
    peer: tuple[str, int] | None = None  # the client's address: same port = same (warm) connection
    at: float = field(default_factory=time.time)


class _PushServer:
    """The shared machinery: TLS, start/stop, recording, scripts and delays."""

    kind = "push"

    def __init__(self, state_dir: str | Path, host: str = "127.0.0.1") -> None:
        self.state_dir = Path(state_dir)
        self.host = host
        self.cert_file = self.state_dir / f"{self.kind}-server-cert.pem"
        self.key_file = self.state_dir / f"{self.kind}-server-key.pem"
        ensure_self_signed(self.cert_file, self.key_file, [host, "localhost"])
        self.requests: list[Received] = []
        self._scripts: dict[str, deque[Reply]] = {}
        self._stopping = asyncio.Event()
        self.app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        self._routes()
        self._server: ApiServer | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def ca_file(self) -> Path:
        return self.cert_file

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._server.url

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        self._server = ApiServer(self.app, host=self.host, port=0, certfile=self.cert_file,
                                 keyfile=self.key_file)
        await self._server.start()

    async def stop(self) -> None:
        """Stop like a crashed provider: delayed answers are released, and TLS connections that a
        client keeps idle in its pool are aborted instead of waiting for the client's close_notify
        (which an idle pool never sends, so uvicorn would wait its whole graceful timeout)."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is None:
            return
        uvicorn_server = getattr(server, "_server", None)  # ApiServer.stop() forgets it at once
        stopping = asyncio.create_task(server.stop())
        done, _ = await asyncio.wait({stopping}, timeout=0.3)
        if not done:
            _abort_connections(uvicorn_server)
        await stopping

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # ------------------------------------------------------------------ scripting

    def script(self, token: str, replies: Iterable[Reply]) -> None:
        """Answer the next requests for ``token`` with ``replies``, in order."""
        self._scripts.setdefault(token, deque()).extend(replies)

    def _next_reply(self, token: str | None) -> Reply | None:
        queue = self._scripts.get(token) if token is not None else None
        return queue.popleft() if queue else None

    async def _pause(self, delay: float) -> None:
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    # ------------------------------------------------------------------ helpers for handlers

    async def _record(self, request: Request, *, form: bool = False) -> Received:
        raw = await request.body()
        received = Received(path=request.url.path, body=raw, peer=_peer(request),
                            headers={k.lower(): v for k, v in request.headers.items()})
        if form:
            received.form = {k: v[0] for k, v in parse_qs(raw.decode("latin-1")).items()}
        else:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                received.json = json.loads(raw)
        self.requests.append(received)
        return received

    @staticmethod
    def _response(received: Received, status: int, body: Any, reply: Reply | None = None) -> Response:
        headers = dict(reply.headers) if reply else {}
        if reply is not None and reply.retry_after is not None:
            value = reply.retry_after
            headers["Retry-After"] = (str(int(value)) if isinstance(value, float | int) and value == int(value)
                                      else str(value))
        received.status = status
        if isinstance(body, str | bytes):
            return Response(body, status_code=status, headers=headers, media_type="text/plain")
        if body is None:
            return Response(status_code=status, headers=headers)
        return JSONResponse(body, status_code=status, headers=headers)

    def _routes(self) -> None:
        raise NotImplementedError


def _abort_connections(uvicorn_server: Any) -> None:
    state = getattr(uvicorn_server, "server_state", None)
    for connection in list(getattr(state, "connections", ())):
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.abort()


def _peer(request: Request) -> tuple[str, int] | None:
    return (request.client.host, request.client.port) if request.client else None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# ====================================================================== Acrobits mediator


MEDIATOR_VERBS = ("NotifyIncomingCall", "NotifyIncomingCallMissed", "NotifyIncomingCallAnsweredElsewhere",
                  "NotifyTextMessage", "NotifyGenericTextMessage", "NotifyReprovision")


class MediatorServer(_PushServer):
    """The Acrobits PN Mediator JSON API at ``{url}/pnm2/send``.

    Without a script: missing ``verb``/``AppId``/``DeviceToken`` (or ``Selector`` for verbs other
    than ``NotifyGenericTextMessage``) or an unknown verb → HTTP 400 with code 400; tokens in
    :attr:`dead_tokens` → code 404; everything else → ``{"code": 200, "response": "OK"}``.
    """

    kind = "mediator"

    def __init__(self, state_dir: str | Path, host: str = "127.0.0.1") -> None:
        self.dead_tokens: set[str] = set()
        super().__init__(state_dir, host)

    @property
    def send_url(self) -> str:
        return f"{self.url}/pnm2/send"

    def _routes(self) -> None:
        @self.app.post("/pnm2/send")
        async def send(request: Request) -> Response:
            received = await self._record(request)
            body = received.json
            token = body.get("DeviceToken") if isinstance(body, dict) else None
            reply = self._next_reply(token if isinstance(token, str) else None)
            if reply is not None:
                await self._pause(reply.delay)
                if reply.body is not None:
                    return self._response(received, reply.status, reply.body, reply)
                if reply.code is not None:
                    text = "OK" if reply.code == 200 else _phrase(reply.code)
                    return self._response(received, reply.status, {"code": reply.code, "response": text}, reply)
                if reply.status != 200:
                    return self._response(received, reply.status,
                                          {"code": reply.status, "response": _phrase(reply.status)}, reply)
            problem = self._check(body)
            if problem:
                return self._response(received, 400, {"code": 400, "response": problem}, reply)
            if token in self.dead_tokens:
                return self._response(received, 200, {"code": 404, "response": "Device token not found"}, reply)
            return self._response(received, 200, {"code": 200, "response": "OK"}, reply)

    @staticmethod
    def _check(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "expected a JSON object"
        missing = [key for key in ("verb", "AppId", "DeviceToken")
                   if not isinstance(body.get(key), str) or not body[key]]
        if body.get("verb") != "NotifyGenericTextMessage" and not body.get("Selector"):
            missing.append("Selector")
        if missing:
            return f"missing {', '.join(missing)}"
        if body["verb"] not in MEDIATOR_VERBS:
            return f"unknown verb {body['verb']}"
        if any(not isinstance(value, str) for value in body.values()):
            return "attribute values must be strings"
        return None


# ====================================================================== FCM HTTP v1 + OAuth


_FCM_ERRORS: dict[int, tuple[str, str, str]] = {  # HTTP → (error.status, errorCode, message)
    400: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR", "Auth error from APNS or Web Push Service"),
    403: ("PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"),
    404: ("NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "Quota exceeded for quota metric 'Send messages'."),
    500: ("INTERNAL", "INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable."),
}


def fcm_error_body(status: int, error_code: str | None = None, message: str | None = None) -> dict[str, Any]:
    """Google's error JSON for an FCM v1 failure (``error_code`` "" = no FcmError detail)."""
    canonical, default_code, default_message = _FCM_ERRORS.get(status, ("UNKNOWN", "", _phrase(status)))
    code = default_code if error_code is None else error_code
    error: dict[str, Any] = {"code": status, "message": message or default_message, "status": canonical}
    if code:
        error["details"] = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]
    return {"error": error}


def make_service_account(path: str | Path, token_uri: str, project_id: str = "sipis-lab") -> dict[str, str]:
    """Write a realistic Google service-account JSON (fresh RSA-2048 key) with mode 0600."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    client_email = f"firebase-adminsdk-{secrets.token_hex(3)[:5]}@{project_id}.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": client_email,
        "client_id": str(secrets.randbelow(10**21)).zfill(21),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
                                + client_email.replace("@", "%40"),
        "universe_domain": "googleapis.com",
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch(mode=0o600)
    target.chmod(0o600)
    target.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


@dataclass
class _Account:
    client_email: str
    private_key_id: str
    project_id: str
    public_key: Any


class FcmServer(_PushServer):
    """OAuth token endpoint at :attr:`token_uri` plus FCM HTTP v1 at :attr:`url`.

    ``messages:send`` requests go to :attr:`requests`, token requests to :attr:`token_requests`.

    Register service accounts with :meth:`add_service_account` (after :meth:`start`, since the
    account's ``token_uri`` must name this server). Pushes are accepted only for the projects of
    registered accounts and with a bearer token this server issued and has not revoked.
    """

    kind = "fcm"

    def __init__(self, state_dir: str | Path, host: str = "127.0.0.1", *, token_lifetime: int = 3599) -> None:
        self.token_lifetime = token_lifetime
        self.token_requests: list[Received] = []
        self.accounts: dict[str, _Account] = {}  # by client_email
        self.issued: set[str] = set()
        self.reject_access_tokens = False  # answer 401 UNAUTHENTICATED to every push
        self._token_script: deque[Reply] = deque()
        super().__init__(state_dir, host)

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def add_service_account(self, source: str | Path | dict[str, Any]) -> None:
        info = source if isinstance(source, dict) else json.loads(Path(source).read_text(encoding="utf-8"))
        key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
        self.accounts[info["client_email"]] = _Account(info["client_email"], info["private_key_id"],
                                                       info["project_id"], key.public_key())

    def script_token(self, replies: Iterable[Reply]) -> None:
        """Answer the next token requests with ``replies`` (status 200 without body = issue normally)."""
        self._token_script.extend(replies)

    def revoke_tokens(self) -> None:
        """Forget every issued access token (as if they expired server-side)."""
        self.issued.clear()

    def _routes(self) -> None:
        @self.app.post("/token")
        async def token(request: Request) -> Response:
            raw = await request.body()
            received = Received(path=request.url.path, body=raw, peer=_peer(request),
                                headers={k.lower(): v for k, v in request.headers.items()},
                                form={k: v[0] for k, v in parse_qs(raw.decode("latin-1")).items()})
            self.token_requests.append(received)
            reply = self._token_script.popleft() if self._token_script else None
            if reply is not None:
                await self._pause(reply.delay)
                if reply.status != 200 or reply.body is not None:
                    body = reply.body if reply.body is not None else {
                        "error": "internal_failure" if reply.status >= 500 else "invalid_request",
                        "error_description": _phrase(reply.status)}
                    return self._response(received, reply.status, body, reply)
            return self._issue(received)

        @self.app.post("/v1/projects/{project}/messages:send")
        async def send(project: str, request: Request) -> Response:
            received = await self._record(request)
            return await self._send(project, received)

    def _issue(self, received: Received) -> Response:
        form = received.form or {}
        if received.headers.get("content-type", "").split(";")[0] != "application/x-www-form-urlencoded":
            return self._response(received, 400, {"error": "invalid_request",
                                                  "error_description": "expected a form body"})
        if form.get("grant_type") != JWT_BEARER:
            return self._response(received, 400, {"error": "unsupported_grant_type",
                                                  "error_description": f"Invalid grant_type: {form.get('grant_type')}"})
        problem = self._check_assertion(form.get("assertion", ""))
        if problem:
            return self._response(received, 400, {"error": "invalid_grant", "error_description": problem})
        access_token = "ya29.lab-" + secrets.token_urlsafe(48)
        self.issued.add(access_token)
        return self._response(received, 200, {"access_token": access_token, "expires_in": self.token_lifetime,
                                              "token_type": "Bearer"})

    def _check_assertion(self, assertion: str) -> str | None:
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return "Invalid JWT: malformed assertion."
        account = self.accounts.get(str(unverified.get("iss")))
        if account is None:
            return "Invalid grant: account not found"
        if header.get("alg") != "RS256":
            return "Invalid JWT: expected RS256"
        if header.get("kid") not in (None, account.private_key_id):
            return "Invalid JWT Signature."
        try:
            claims = jwt.decode(assertion, account.public_key, algorithms=["RS256"], audience=self.token_uri,
                                issuer=account.client_email, leeway=5,
                                options={"require": ["iss", "aud", "iat", "exp", "scope"]})
        except jwt.InvalidSignatureError:
            return "Invalid JWT Signature."
        except jwt.InvalidAudienceError:
            return "Invalid JWT: Failed audience check."
        except jwt.PyJWTError as exc:
            return f"Invalid JWT: {exc}"
        if not isinstance(claims["iat"], int) or not isinstance(claims["exp"], int):
            return "Invalid JWT: iat and exp must be integers"
        if claims["exp"] - claims["iat"] > 3600:
            return "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
        scopes = str(claims["scope"]).split()
        if not any(scope in FCM_SCOPES for scope in scopes):
            return "Invalid OAuth scope or ID token audience provided."
        return None

    async def _send(self, project: str, received: Received) -> Response:
        auth = received.headers.get("authorization", "")
        bearer = auth[7:] if auth.startswith("Bearer ") else None
        if self.reject_access_tokens or bearer not in self.issued:
            return self._response(received, 401, fcm_error_body(
                401, "", "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                         "login cookie or other valid authentication credential."))
        if project not in {a.project_id for a in self.accounts.values()}:
            return self._response(received, 403, fcm_error_body(
                403, "", f"Permission 'cloudmessaging.messages.create' denied on resource "
                         f"'//cloudresourcemanager.googleapis.com/projects/{project}'"))
        body = received.json
        problem = _check_message(body, len(received.body))
        if problem:
            return self._response(received, 400, fcm_error_body(400, "INVALID_ARGUMENT", problem))
        token = body["message"].get("token")
        reply = self._next_reply(token if isinstance(token, str) else None)
        if reply is not None:
            await self._pause(reply.delay)
            if reply.status != 200 or reply.body is not None:
                error = reply.body if reply.body is not None else fcm_error_body(reply.status, reply.error_code)
                return self._response(received, reply.status, error, reply)
        name = f"projects/{project}/messages/0:{time.time_ns() // 1000}%{secrets.token_hex(8)}"
        return self._response(received, 200, {"name": name}, reply)


def _check_message(body: Any, size: int) -> str | None:
    """FCM v1's validation of what we send (a subset: the fields our providers use)."""
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        return "Invalid JSON payload received. Expected an object with a 'message' field."
    unknown = set(body) - {"message", "validate_only"}
    if unknown:
        return f"Invalid JSON payload received. Unknown name \"{sorted(unknown)[0]}\": Cannot find field."
    message = body["message"]
    targets = [key for key in ("token", "topic", "condition") if key in message]
    if len(targets) != 1:
        return "Exactly one of token, topic or condition must be specified."
    if not isinstance(message.get("token"), str) or not message["token"]:
        return "The registration token is not a valid FCM registration token"
    data = message.get("data", {})
    if not isinstance(data, dict):
        return "Invalid value at 'message.data' (type.googleapis.com/google.firebase.fcm.v1.Message.DataEntry)"
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            return f"Invalid value at 'message.data[{index}].value' (TYPE_STRING), {json.dumps(value)}"
        if key in FCM_RESERVED_DATA or key.startswith(("google", "gcm")):
            return f"Invalid data payload key: {key}"
    android = message.get("android", {})
    if not isinstance(android, dict):
        return "Invalid value at 'message.android'"
    priority = android.get("priority", "NORMAL")
    if priority not in ("NORMAL", "HIGH"):
        return f"Invalid value at 'message.android.priority' (type.googleapis.com/" \
               f"google.firebase.fcm.v1.AndroidMessagePriority), \"{priority}\""
    if "ttl" in android:
        ttl = android["ttl"]
        match = _TTL.match(ttl) if isinstance(ttl, str) else None
        if match is None:
            return f"Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), {ttl!r}"
        if int(match.group(1)) > FCM_MAX_TTL:
            return "Invalid value at 'message.android.ttl': TTL must be at most 4 weeks"
    if size > FCM_MAX_PAYLOAD:
        return "Message is too big"
    return None


# ====================================================================== webhook


class WebhookServer(_PushServer):
    """A customer's pusher: records every ``POST`` (any path) and answers 200 ``{"status": "ok"}``
    unless scripted; tokens in :attr:`dead_tokens` get 410. Token = the JSON body's ``token``."""

    kind = "webhook"

    def __init__(self, state_dir: str | Path, host: str = "127.0.0.1") -> None:
        self.dead_tokens: set[str] = set()
        super().__init__(state_dir, host)

    def _routes(self) -> None:
        @self.app.post("/{path:path}")
        async def push(path: str, request: Request) -> Response:
            received = await self._record(request)
            body = received.json
            token = body.get("token") if isinstance(body, dict) else None
            reply = self._next_reply(token if isinstance(token, str) else None)
            if reply is not None:
                await self._pause(reply.delay)
                default = {"status": "ok"} if 200 <= reply.status < 300 else {"error": _phrase(reply.status)}
                return self._response(received, reply.status, default if reply.body is None else reply.body,
                                      reply)
            if not isinstance(body, dict):
                return self._response(received, 400, {"error": "expected a JSON object"})
            if token in self.dead_tokens:
                return self._response(received, 410, {"error": "token unregistered"})
            return self._response(received, 200, {"status": "ok"})


__all__ = [
    "FcmServer", "MediatorServer", "Received", "Reply", "WebhookServer", "fcm_error_body",
    "make_service_account",
]
