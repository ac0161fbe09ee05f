"""A loopback APNs: the HTTP/2 provider API over TLS (ALPN ``h2`` only), built on ``h2`` + asyncio.

It checks what Apple checks — the ``authorization: bearer`` provider JWT against the team's
*public* key (ES256, ``kid``, ``iss``, ``iat`` younger than ``max_token_age``), the path
``/3/device/<hex token>``, ``apns-topic``/``apns-push-type`` and the payload size — and answers
like Apple: ``200`` with ``apns-id``, or a status with ``{"reason": ...}``.

Failures are scripted per device token (:meth:`ApnsServer.script`), consumed one per request:
:class:`Reply` (any status/reason/headers, optionally late), :class:`Delay` (late but otherwise
normal), :class:`GoAway` (no answer: GOAWAY, then the connection is closed) and :class:`Drop`
(the TCP connection just goes). ``goaway_after_streams`` makes every connection say GOAWAY after
that many answers, the way APNs retires connections. :meth:`ApnsServer.unregister` makes a token
answer ``410 Unregistered`` with a timestamp.

:meth:`ApnsServer.answered` is called once per request with its outcome (a hook for subclasses).

Everything is recorded: each request (:class:`ApnsRequest`: headers, JSON body, the JWT, which
connection), the number of connections, and the distinct JWTs seen (proves token reuse).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sipis.tls_certs import ensure_self_signed

MAX_PAYLOAD = 4096
MAX_VOIP_PAYLOAD = 5120
MAX_TOKEN_AGE = 3600.0  # Apple rejects provider tokens older than an hour
PUSH_TYPES = frozenset({"alert", "background", "voip", "complication", "fileprovider", "mdm",
                        "location", "liveactivity", "pushtotalk"})
_PATH = re.compile(r"^/3/device/([^/]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{16,400}$")


def write_apns_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Write an auth key the way Apple hands it out (``AuthKey_XXXX.p8``: PKCS#8 PEM, EC P-256,
    mode 0600) and return its public key, which is what APNs holds."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    return key.public_key()


# -- scripted behaviour -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Answer with this status (no checks); ``reason`` goes into the JSON body."""

    status: int
    reason: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timestamp: int | None = None  # for 410: ms since the epoch
    delay: float = 0.0


@dataclass(frozen=True)
class Delay:
    """Handle the request normally, but only after ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class GoAway:
    """Do not answer: send GOAWAY and close the connection. ``last_stream_id`` None means the
    triggering stream (the client cannot tell whether it was processed, so it must retry).
    ``keep_open`` leaves the TCP connection up but dead — every later frame is ignored — which is
    the field failure of a cached APNs connection that silently swallows all pushes."""

    last_stream_id: int | None = None
    reason: str = "Shutdown"
    keep_open: bool = False


@dataclass(frozen=True)
class Drop:
    """Do not answer: close the TCP connection without GOAWAY."""


Action = Reply | Delay | GoAway | Drop


@dataclass
class ApnsRequest:
    connection: int  # 1-based number of the connection it came in on
    stream_id: int
    method: str
    path: str
    device_token: str | None
    headers: dict[str, str]  # lower-case names; ``authorization`` included
    body: bytes
    payload: Any  # parsed JSON body, None when it was not JSON
    jwt: str | None
    received_at: float  # the server's ``now()``
    status: int | None = None  # None: answered with GOAWAY or a dropped connection
    reason: str | None = None
    apns_id: str | None = None
    action: str = "reply"  # reply | goaway | drop


# -- the server -----------------------------------------------------------------------------------


class ApnsServer:
    def __init__(self, directory: Path, *, team_id: str, key_id: str,
                 public_key: ec.EllipticCurvePublicKey, topic: str,
                 now: Callable[[], float] = time.time, max_token_age: float = MAX_TOKEN_AGE,
                 goaway_after_streams: int | None = None, max_concurrent_streams: int = 1000) -> None:
        self.directory = directory
        self.team_id = team_id
        self.key_id = key_id
        self.public_key = public_key
        self.topics = frozenset({topic, f"{topic}.voip"})
        self.now = now
        self.max_token_age = max_token_age
        self.goaway_after_streams = goaway_after_streams
        self.max_concurrent_streams = max_concurrent_streams
        self.cert_file = directory / "apns-cert.pem"
        self.key_file = directory / "apns-key.pem"
        self.requests: list[ApnsRequest] = []
        self.connections = 0
        self.jwts: list[str] = []  # distinct bearer tokens, in order of first use
        self.unregistered: dict[str, int] = {}  # device token → timestamp (ms)
        self._scripts: defaultdict[str, deque[Action]] = defaultdict(deque)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._live: set[_Connection] = set()
        self.port = 0

    # scripting ----------------------------------------------------------------------------------

    def script(self, device_token: str, *actions: Action) -> None:
        """Queue behaviours for the next requests to ``device_token`` (then normal handling)."""
        self._scripts[device_token].extend(actions)

    def goaway(self, *, keep_open: bool = False, reason: str = "Shutdown") -> int:
        """GOAWAY on every open connection now (as APNs does to idle or old connections); with
        ``keep_open`` the sockets stay up but answer nothing more. Returns how many were hit."""
        live = [conn for conn in self._live if not conn.closed and not conn.zombie]
        for conn in live:
            conn._goaway(None, reason, keep_open=keep_open)
        return len(live)

    def unregister(self, device_token: str, timestamp_ms: int | None = None) -> int:
        """From now on ``device_token`` answers 410 Unregistered (like an uninstalled app)."""
        stamp = int(self.now() * 1000) if timestamp_ms is None else timestamp_ms
        self.unregistered[device_token] = stamp
        return stamp

    # observation --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.cert_file

    def accepted(self) -> list[ApnsRequest]:
        return [r for r in self.requests if r.status == 200]

    # lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        ensure_self_signed(self.cert_file, self.key_file, ["127.0.0.1"])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["h2"])
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> ApnsServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                return  # APNs speaks HTTP/2 only
            self.connections += 1
            connection = _Connection(self, self.connections, reader, writer)
            self._live.add(connection)
            try:
                await connection.run()
            finally:
                self._live.discard(connection)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    # request handling ---------------------------------------------------------------------------

    def answered(self, request: ApnsRequest) -> None:
        """Called once per request when it has been answered (``status`` set) or was not (``status``
        None: GOAWAY, a dropped or closed connection). Does nothing here; a hook for subclasses (the
        lab mediator counts answers and delivers accepted pushes to its simulated phones)."""

    def _next_action(self, device_token: str | None) -> Action | None:
        queue = self._scripts.get(device_token or "")
        return queue.popleft() if queue else None

    def _record_jwt(self, token: str | None) -> None:
        if token and token not in self.jwts:
            self.jwts.append(token)

    def check(self, request: ApnsRequest) -> tuple[int, str | None, dict[str, Any]]:
        """Apple's checks, in Apple's spirit: (status, reason, extra body fields)."""
        if request.method != "POST":
            return 405, "MethodNotAllowed", {}
        if request.device_token is None:
            return 404, "BadPath", {}
        auth = self._check_jwt(request.jwt)
        if auth is not None:
            return 403, auth, {}
        headers = request.headers
        topic = headers.get("apns-topic")
        if not topic:
            return 400, "MissingTopic", {}
        if topic not in self.topics:
            return 400, "TopicDisallowed", {}
        push_type = headers.get("apns-push-type")
        if push_type not in PUSH_TYPES:
            return 400, "InvalidPushType", {}
        if (push_type == "voip") != topic.endswith(".voip"):
            return 400, "BadTopic", {}
        if headers.get("apns-priority", "10") not in ("1", "5", "10"):
            return 400, "BadPriority", {}
        if not headers.get("apns-expiration", "0").isdigit():
            return 400, "BadExpirationDate", {}
        if "apns-id" in headers:
            try:
                uuid.UUID(headers["apns-id"])
            except ValueError:
                return 400, "BadMessageId", {}
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return 400, "BadCollapseId", {}
        if not _HEX.match(request.device_token):
            return 400, "BadDeviceToken", {}
        if request.device_token in self.unregistered:
            return 410, "Unregistered", {"timestamp": self.unregistered[request.device_token]}
        if not request.body:
            return 400, "PayloadEmpty", {}
        if len(request.body) > (MAX_VOIP_PAYLOAD if push_type == "voip" else MAX_PAYLOAD):
            return 413, "PayloadTooLarge", {}
        if not isinstance(request.payload, dict) or not isinstance(request.payload.get("aps"), dict):
            return 400, "BadPayload", {}  # the lab's own reason: Apple's list has none for bad JSON
        return 200, None, {}

    def _check_jwt(self, token: str | None) -> str | None:
        if token is None:
            return "MissingProviderToken"
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, self.public_key, algorithms=["ES256"],
                                options={"verify_iat": False, "verify_exp": False,
                                         "verify_nbf": False, "require": ["iss", "iat"]})
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        if header.get("alg") != "ES256" or header.get("kid") != self.key_id:
            return "InvalidProviderToken"
        if claims.get("iss") != self.team_id or not isinstance(claims.get("iat"), int):
            return "InvalidProviderToken"
        age = self.now() - claims["iat"]
        if age > self.max_token_age:
            return "ExpiredProviderToken"
        if age < -60:  # from the future: someone's clock is wrong
            return "InvalidProviderToken"
        return None


@dataclass
class _Stream:
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)


class _Connection:
    """One client connection: reads frames, answers each finished request in a task of its own
    (so a delayed answer does not hold up other streams)."""

    def __init__(self, server: ApnsServer, number: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.number = number
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                       header_encoding="utf-8"))
        self.streams: dict[int, _Stream] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.answered = 0
        self.draining = False  # goaway_after_streams reached: GOAWAY once nothing is in flight
        self.zombie = False  # GOAWAY sent but the socket kept open: read and ignore everything
        self.closed = False

    def flush(self) -> None:
        if not self.closed:
            data = self.h2.data_to_send()
            if data:
                self.writer.write(data)

    async def run(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                                 self.server.max_concurrent_streams})
        self.flush()
        try:
            while not self.closed:
                data = await self.reader.read(65536)
                if not data:
                    break
                if self.zombie:
                    continue
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break  # e.g. frames after our GOAWAY
                for event in events:
                    self._on_event(event)
                self.flush()
        finally:
            self.closed = True
            for task in self.tasks.values():
                task.cancel()

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            headers = {_text(name).lower(): _text(value) for name, value in event.headers or []}
            self.streams[event.stream_id or 0] = _Stream(headers)
        elif isinstance(event, h2.events.DataReceived):
            stream_id = event.stream_id or 0
            if stream_id in self.streams and event.data:
                self.streams[stream_id].body += event.data
            self.h2.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream_id = event.stream_id or 0
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                task = asyncio.get_running_loop().create_task(self._handle(stream_id, stream))
                self.tasks[stream_id] = task
        elif isinstance(event, h2.events.StreamReset):
            stream_id = event.stream_id or 0
            self.streams.pop(stream_id, None)
            pending = self.tasks.pop(stream_id, None)
            if pending is not None:
                pending.cancel()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    async def _handle(self, stream_id: int, stream: _Stream) -> None:
        try:
            await self._answer(stream_id, stream)
        except (h2.exceptions.H2Error, ConnectionError):
            pass  # the client reset the stream or went away meanwhile
        finally:
            if stream_id in self.tasks:
                del self.tasks[stream_id]
            if self.draining and not self.tasks:
                self._goaway(None, "Shutdown")

    async def _answer(self, stream_id: int, stream: _Stream) -> None:
        server = self.server
        headers = stream.headers
        path = headers.get(":path", "")
        match = _PATH.match(path)
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        body = bytes(stream.body)
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        request = ApnsRequest(
            connection=self.number, stream_id=stream_id, method=headers.get(":method", ""), path=path,
            device_token=match.group(1) if match else None, headers=headers, body=body,
            payload=payload, jwt=token, received_at=server.now(),
        )
        server.requests.append(request)
        server._record_jwt(token)
        action = server._next_action(request.device_token)
        if isinstance(action, GoAway):
            request.action = "goaway"
            self._goaway(stream_id if action.last_stream_id is None else action.last_stream_id,
                         action.reason, keep_open=action.keep_open)
            server.answered(request)
            return
        if isinstance(action, Drop):
            request.action = "drop"
            self.closed = True
            self.writer.transport.abort()
            server.answered(request)
            return
        extra: dict[str, Any] = {}
        response_headers: dict[str, str] = {}
        if isinstance(action, Reply):
            if action.delay:
                await asyncio.sleep(action.delay)
            status, reason = action.status, action.reason
            response_headers.update(action.headers)
            if action.timestamp is not None:
                extra["timestamp"] = action.timestamp
        else:
            if isinstance(action, Delay):
                await asyncio.sleep(action.seconds)
            status, reason, extra = server.check(request)
        if self.closed or self.zombie:
            server.answered(request)  # never answered: the connection went meanwhile
            return
        apns_id = headers.get("apns-id") or str(uuid.uuid4())
        request.status, request.reason, request.apns_id = status, reason, apns_id
        body_out = b"" if status == 200 else json.dumps({"reason": reason, **extra}).encode()
        self.h2.send_headers(stream_id, [(":status", str(status)), ("apns-id", apns_id),
                                         *response_headers.items(),
                                         *([("content-type", "application/json"),
                                            ("content-length", str(len(body_out)))] if body_out else [])],
                             end_stream=not body_out)
        if body_out:
            self.h2.send_data(stream_id, body_out, end_stream=True)
        self.flush()
        self.answered += 1
        server.answered(request)
        limit = server.goaway_after_streams
        if limit is not None and self.answered >= limit:
            self.draining = True

    def _goaway(self, last_stream_id: int | None, reason: str, *, keep_open: bool = False) -> None:
        """GOAWAY, then close. h2 refuses to send anything after GOAWAY, so a draining connection
        only says it once every stream in flight has been answered."""
        if self.closed or self.zombie:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(error_code=0, additional_data=json.dumps({"reason": reason}).encode(),
                                     last_stream_id=last_stream_id)
            self.flush()
        if keep_open:
            self.zombie = True
            for stream_id, task in list(self.tasks.items()):
                if task is not asyncio.current_task():
                    task.cancel()
                    del self.tasks[stream_id]
            return
        self.closed = True
        self.writer.close()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
