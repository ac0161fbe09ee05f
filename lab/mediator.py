"""The lab push mediator: push endpoints that fail like real ones and deliver to the simulated phones.

:class:`LabMediator` wraps :class:`lab.push_servers.MediatorServer` (the Acrobits wire format at
``/pnm2/send`` over HTTPS, with its scripting and request log) and, when asked for them
(``fcm=True``, ``apns=True``), the provider-shaped servers the core's ``fcm`` and ``apns``
providers talk to: :class:`lab.push_servers.FcmServer` (OAuth token endpoint + FCM HTTP v1
``messages:send``; the mediator writes a service-account JSON with a fresh RSA key for it) and
:class:`lab.apns_server.ApnsServer` (HTTP/2 over TLS, ES256 provider JWTs checked against the
public half of an ``AuthKey_*.p8`` the mediator writes). :meth:`LabMediator.push_tables` gives the
core's ``[push.NAME]`` tables for all of them (``mediator``, ``fcm``, ``apns``), with their CA files.
On every endpoint the mediator adds what a lab needs:

* **Latency** — every answer is held back by a sample of :attr:`MediatorPolicy.latency`.
* **Transient failures** — a fraction :attr:`MediatorPolicy.transient_rate` of requests is answered
  HTTP ``503`` (``{"code": 503, ...}``; FCM ``UNAVAILABLE``; APNs ``ServiceUnavailable``) — on FCM
  and APNs a share :attr:`MediatorPolicy.throttle_share` of them ``429`` instead (FCM
  ``QUOTA_EXCEEDED``, APNs ``TooManyRequests``) — with a ``Retry-After`` drawn from
  :attr:`MediatorPolicy.retry_after` (``None`` = no header). A Retry-After beyond the call's
  remaining wake timer makes the core give up: the push ends ``rejected-transient``. (FCM fails
  only requests that pass its auth and message checks; APNs fails before its checks, like an
  overloaded front end.)
* **Dead tokens** — tokens in :attr:`LabMediator.dead_tokens` get ``{"code": 404}`` from the
  mediator, ``404 UNREGISTERED`` from FCM and ``410 Unregistered`` from APNs (the core marks the
  device unreachable). FCM and APNs check credentials and message shape first, as the real ones do.
* **Delivery** — an accepted push reaches the phone holding that token (``DeviceToken``, the FCM
  ``message.token``, the APNs device token in the path): the callback given to
  :meth:`LabMediator.attach` is called with a :class:`LabPush` after a sample of
  :attr:`MediatorPolicy.delivery_latency` (the time the platform takes to get it to the device).
  That is how a simulated phone "receives" a push, whichever provider carried it.

Scripted replies still come first: :meth:`LabMediator.script` (the mediator),
``mediator.fcm.script`` and ``mediator.apns.script`` (the servers' own scripting). What each
endpoint answered is counted in :attr:`LabMediator.answers` and, per provider type,
:attr:`LabMediator.answers_by_provider`.

:class:`Distribution` (fixed, uniform, exponential, lognormal, choice) is the one way the lab
describes a random duration; phones and callers use it too. ``Distribution.parse("lognormal:1.5,0.6")``
reads the command-line form.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # imported when a mediator is built: ``Distribution`` alone stays cheap to import
    from cryptography.hazmat.primitives.asymmetric import ec
    from fastapi.responses import Response

    from lab.apns_server import ApnsRequest, ApnsServer
    from lab.push_servers import FcmServer, MediatorServer, Received, Reply

log = logging.getLogger(__name__)

DistributionKind = Literal["fixed", "uniform", "exponential", "lognormal", "choice"]

#: accepted / rejected-transient / rejected-permanent, the names the core's outcome model uses
ACCEPTED, TRANSIENT, PERMANENT = "accepted", "rejected-transient", "rejected-permanent"

#: the lab's endpoints by provider type, and the ``[push.NAME]`` each gets in :meth:`LabMediator.push_tables`
PROVIDER_TYPES = ("acrobits", "fcm", "apns")
PROVIDER_NAMES: dict[str, str] = {"acrobits": "mediator", "fcm": "fcm", "apns": "apns"}
#: the lab app: its id is also the APNs topic (bundle id) the lab APNs accepts
LAB_APP_ID = "com.example.labphone"
FCM_PROJECT = "sipis-lab"
APNS_TEAM_ID = "LABTEAM001"
APNS_KEY_ID = "LABKEY0001"


@dataclass(frozen=True)
class Distribution:
    """A random non-negative number of seconds (or any quantity).

    ``fixed(v)``; ``uniform(low, high)``; ``exponential(mean)``; ``lognormal(median, sigma)`` (the
    median is ``exp(mu)``, so ``lognormal(1.5, 0.5)`` puts half the samples below 1.5);
    ``choice(v1, v2, ...)`` (each equally likely; repeat a value to weight it). ``cap`` bounds
    every sample from above.
    """

    kind: DistributionKind
    a: float = 0.0
    b: float = 0.0
    values: tuple[float | None, ...] = ()
    cap: float | None = None

    @classmethod
    def fixed(cls, value: float) -> Distribution:
        return cls("fixed", value)

    @classmethod
    def uniform(cls, low: float, high: float) -> Distribution:
        if high < low:
            raise ValueError(f"uniform: high {high} < low {low}")
        return cls("uniform", low, high)

    @classmethod
    def exponential(cls, mean: float, cap: float | None = None) -> Distribution:
        if mean <= 0:
            raise ValueError(f"exponential: mean must be > 0, got {mean}")
        return cls("exponential", mean, cap=cap)

    @classmethod
    def lognormal(cls, median: float, sigma: float, cap: float | None = None) -> Distribution:
        if median <= 0 or sigma < 0:
            raise ValueError(f"lognormal: median must be > 0 and sigma >= 0, got {median}, {sigma}")
        return cls("lognormal", median, sigma, cap=cap)

    @classmethod
    def choice(cls, *values: float | None) -> Distribution:
        if not values:
            raise ValueError("choice: at least one value")
        return cls("choice", values=tuple(values))

    @classmethod
    def parse(cls, text: str) -> Distribution:
        """``1.5`` (fixed), ``fixed:1.5``, ``uniform:0.5,3``, ``exponential:20``,
        ``lognormal:1.5,0.6``, ``choice:1,1,30`` (``none`` allowed in choices)."""
        kind, _, args = text.strip().partition(":")
        try:
            if not args:
                return cls.fixed(float(kind))
            numbers = [a.strip() for a in args.split(",")]
            if kind == "choice":
                return cls.choice(*(None if n.lower() == "none" else float(n) for n in numbers))
            values = [float(n) for n in numbers]
            if kind == "fixed" and len(values) == 1:
                return cls.fixed(values[0])
            if kind == "uniform" and len(values) == 2:
                return cls.uniform(values[0], values[1])
            if kind == "exponential" and len(values) in (1, 2):
                return cls.exponential(values[0], values[1] if len(values) == 2 else None)
            if kind == "lognormal" and len(values) in (2, 3):
                return cls.lognormal(values[0], values[1], values[2] if len(values) == 3 else None)
        except ValueError as exc:
            raise ValueError(f"bad distribution {text!r}: {exc}") from None
        raise ValueError(f"bad distribution {text!r} (fixed:V, uniform:LO,HI, exponential:MEAN, "
                         "lognormal:MEDIAN,SIGMA, choice:V1,V2,...)")

    def sample(self, rng: random.Random) -> float:
        value = self.sample_optional(rng)
        return 0.0 if value is None else value

    def sample_optional(self, rng: random.Random) -> float | None:
        """Like :meth:`sample`, but a ``choice`` may yield ``None``."""
        value: float | None
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.uniform(self.a, self.b)
        elif self.kind == "exponential":
            value = rng.expovariate(1.0 / self.a)
        elif self.kind == "lognormal":
            value = rng.lognormvariate(math.log(self.a), self.b)
        else:
            value = rng.choice(self.values)
        if value is not None and self.cap is not None:
            value = min(value, self.cap)
        return value

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        if self.kind == "choice":
            return "choice:" + ",".join("none" if v is None else f"{v:g}" for v in self.values)
        args = f"{self.a:g}" if self.kind == "exponential" else f"{self.a:g},{self.b:g}"
        return f"{self.kind}:{args}" + (f",{self.cap:g}" if self.cap is not None else "")


@dataclass(frozen=True)
class MediatorPolicy:
    """How the lab mediator behaves (every rate is per request)."""

    #: time to answer the HTTP request
    latency: Distribution = field(default_factory=lambda: Distribution.lognormal(0.06, 0.5, cap=1.0))
    #: fraction of requests answered HTTP 503
    transient_rate: float = 0.05
    #: Retry-After of those 503s in seconds (None = no header)
    retry_after: Distribution = field(default_factory=lambda: Distribution.choice(None, 1, 1, 60))
    #: from "accepted" to the push arriving on the device
    delivery_latency: Distribution = field(default_factory=lambda: Distribution.lognormal(0.25, 0.5, cap=3.0))
    #: FCM and APNs: the share of the transient failures answered 429 (quota) instead of 503
    throttle_share: float = 0.25

    def __post_init__(self) -> None:
        for name in ("transient_rate", "throttle_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value}")


@dataclass(frozen=True)
class LabPush:
    """A push as the device sees it, whichever provider carried it: the mediator's JSON attributes
    or the FCM data / APNs custom keys (``PushRequest.payload_fields``), typed the same way
    (``verb`` is the mediator's verb for the push kind)."""

    verb: str
    token: str
    push_id: str
    selector: str
    call_id: str | None
    caller: str | None
    sent_at_ms: int | None
    received_at: float  # monotonic, when the device got it
    body: dict[str, Any]  # the mediator's JSON, the FCM ``data`` or the APNs payload without ``aps``
    provider: str = "acrobits"  # the provider type that carried it

    @property
    def is_call(self) -> bool:
        return self.verb == "NotifyIncomingCall"

    @property
    def is_missed(self) -> bool:
        return self.verb in ("NotifyIncomingCallMissed", "NotifyIncomingCallAnsweredElsewhere")


PushCallback = Callable[[LabPush], None]


def _policy_server(owner: LabMediator, state_dir: Path, host: str) -> MediatorServer:
    """A ``MediatorServer`` whose ``/pnm2/send`` answers come from ``owner`` (:meth:`LabMediator._answer`)."""
    from lab.push_servers import MediatorServer

    class PolicyMediatorServer(MediatorServer):
        def _routes(self) -> None:
            async def send(request: Any) -> Response:  # a plain Starlette endpoint: no annotation magic
                received = await self._record(request)
                return await owner._answer(self, received)

            self.app.add_route("/pnm2/send", send, methods=["POST"])

    return PolicyMediatorServer(state_dir, host)


def _policy_fcm(owner: LabMediator, state_dir: Path, host: str) -> FcmServer:
    """An ``FcmServer`` (token endpoint and ``messages:send`` checks unchanged) whose verdict for a
    well-formed, authorised push comes from ``owner``'s policy when no reply is scripted."""
    from lab.push_servers import FcmServer

    class PolicyFcmServer(FcmServer):
        def _next_reply(self, token: str | None) -> Reply | None:
            reply = super()._next_reply(token)
            if reply is not None or token is None:
                return reply
            return owner._fcm_reply(token)

        async def _send(self, project: str, received: Received) -> Response:
            token = _fcm_token(received.json)
            if token is None or not self._scripts.get(token):  # scripted replies bring their own delay
                await self._pause(owner.policy.latency.sample(owner.rng))
            response = await super()._send(project, received)
            owner._fcm_answered(received)
            return response

    return PolicyFcmServer(state_dir, host)


def _policy_apns(owner: LabMediator, directory: Path, public_key: ec.EllipticCurvePublicKey) -> ApnsServer:
    """An ``ApnsServer`` (JWT, topic, token and payload checks unchanged) with ``owner``'s latency,
    transient failures and dead tokens; every answer goes back to ``owner``."""
    from lab.apns_server import Action, ApnsServer, Delay
    from lab.apns_server import Reply as ApnsReply

    class PolicyApnsServer(ApnsServer):
        def _next_action(self, device_token: str | None) -> Action | None:
            action = super()._next_action(device_token)
            if action is not None:
                return action
            latency = owner.policy.latency.sample(owner.rng)
            transient = owner._transient()
            if transient is None:
                return Delay(latency)  # then Apple's checks (and dead tokens, below) decide
            status, retry = transient
            return ApnsReply(status, "TooManyRequests" if status == 429 else "ServiceUnavailable",
                             headers={} if retry is None else {"retry-after": str(int(retry))}, delay=latency)

        def check(self, request: ApnsRequest) -> tuple[int, str | None, dict[str, Any]]:
            status, reason, extra = super().check(request)
            if status == 200 and request.device_token in owner.dead_tokens:
                return 410, "Unregistered", {"timestamp": int(self.now() * 1000)}
            return status, reason, extra

        def answered(self, request: ApnsRequest) -> None:
            owner._apns_answered(request)

    return PolicyApnsServer(directory, team_id=APNS_TEAM_ID, key_id=APNS_KEY_ID, public_key=public_key,
                            topic=LAB_APP_ID)


class LabMediator:
    """The lab's push endpoints. ``await start()``, give the core :meth:`push_tables` (or point a
    ``[push.NAME]`` of type ``acrobits`` at :attr:`send_url` with :attr:`ca_file`), and
    :meth:`attach` each phone's token(s).

    ``fcm`` / ``apns``: also run the FCM-shaped (:attr:`fcm`) / APNs-shaped (:attr:`apns`) endpoint,
    with credentials written into ``state_dir`` (:attr:`fcm_account_file`, :attr:`apns_key_file`).
    """

    def __init__(self, state_dir: str | Path, *, policy: MediatorPolicy | None = None,
                 rng: random.Random | None = None, host: str = "127.0.0.1", fcm: bool = False,
                 apns: bool = False) -> None:
        self.policy = policy or MediatorPolicy()
        self.rng = rng or random.Random()
        self.state_dir = Path(state_dir)
        self.server = _policy_server(self, self.state_dir, host)
        self.fcm: FcmServer | None = _policy_fcm(self, self.state_dir, host) if fcm else None
        self.fcm_account_file = self.state_dir / "fcm-service-account.json"
        self.apns_key_file = self.state_dir / f"AuthKey_{APNS_KEY_ID}.p8"
        self.apns: ApnsServer | None = None
        if apns:
            from lab.apns_server import write_apns_key

            self.apns = _policy_apns(self, self.state_dir, write_apns_key(self.apns_key_file))
        #: what the endpoints answered, per request: accepted / rejected-transient / rejected-permanent
        self.answers: Counter[str] = Counter()
        #: the same, per provider type (acrobits, fcm, apns)
        self.answers_by_provider: dict[str, Counter[str]] = {kind: Counter() for kind in self.provider_types}
        #: accepted pushes handed to a device / for tokens nobody attached
        self.delivered = 0
        self.undelivered = 0
        #: pushes handed to a device, per provider type
        self.delivered_by_provider: Counter[str] = Counter()
        self._devices: dict[str, PushCallback] = {}
        self._pending: set[asyncio.TimerHandle] = set()

    # ------------------------------------------------------------------ lifecycle and wiring

    @property
    def provider_types(self) -> tuple[str, ...]:
        """The provider types this mediator has endpoints for (``acrobits`` always)."""
        return tuple(kind for kind, on in (("acrobits", True), ("fcm", self.fcm is not None),
                                           ("apns", self.apns is not None)) if on)

    @property
    def dead_tokens(self) -> set[str]:
        """Tokens every endpoint calls dead (one set for all providers)."""
        return self.server.dead_tokens

    @property
    def requests(self) -> list[Received]:
        """The mediator's requests (FCM: ``fcm.requests``; APNs: ``apns.requests``)."""
        return self.server.requests

    @property
    def send_url(self) -> str:
        return self.server.send_url

    @property
    def ca_file(self) -> Path:
        return self.server.ca_file

    def push_tables(self, *, timeout: float = 3.0) -> dict[str, dict[str, Any]]:
        """The core's ``[push.NAME]`` tables for every endpoint that runs (names from
        :data:`PROVIDER_NAMES`), each trusting only that endpoint's certificate. After :meth:`start`."""
        tables: dict[str, dict[str, Any]] = {PROVIDER_NAMES["acrobits"]: {
            "type": "acrobits", "url": self.send_url, "ca_file": str(self.ca_file), "timeout": timeout}}
        if self.fcm is not None:
            tables[PROVIDER_NAMES["fcm"]] = {
                "type": "fcm", "url": self.fcm.url, "ca_file": str(self.fcm.ca_file), "timeout": timeout,
                "service_account_file": str(self.fcm_account_file)}
        if self.apns is not None:
            tables[PROVIDER_NAMES["apns"]] = {
                "type": "apns", "url": self.apns.url, "ca_file": str(self.apns.ca_file), "timeout": timeout,
                "team_id": APNS_TEAM_ID, "key_id": APNS_KEY_ID, "key_file": str(self.apns_key_file),
                "topic": LAB_APP_ID}
        return tables

    async def start(self) -> None:
        await self.server.start()
        if self.fcm is not None:
            from lab.push_servers import make_service_account

            await self.fcm.start()  # first: the account's token_uri names this server
            self.fcm.add_service_account(make_service_account(self.fcm_account_file, self.fcm.token_uri,
                                                              project_id=FCM_PROJECT))
        if self.apns is not None:
            await self.apns.start()

    async def stop(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        await self.server.stop()
        if self.fcm is not None:
            await self.fcm.stop()
        if self.apns is not None:
            await self.apns.stop()

    async def __aenter__(self) -> LabMediator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def attach(self, token: str, callback: PushCallback) -> None:
        """Deliver accepted pushes for ``token`` to ``callback`` (the phone holding that token)."""
        self._devices[token] = callback

    def detach(self, token: str) -> None:
        self._devices.pop(token, None)

    def kill(self, token: str) -> None:
        """From now on every endpoint says this token is dead (mediator code 404, FCM 404
        UNREGISTERED, APNs 410 Unregistered)."""
        self.dead_tokens.add(token)

    def script(self, token: str, replies: Iterable[Reply]) -> None:
        """Script the mediator's answers for ``token`` (FCM: ``fcm.script``; APNs: ``apns.script``)."""
        self.server.script(token, replies)

    # ------------------------------------------------------------------ answering: the mediator

    async def _answer(self, server: MediatorServer, received: Received) -> Response:
        from lab.push_servers import Reply

        body = received.json
        token = body.get("DeviceToken") if isinstance(body, dict) else None
        token = token if isinstance(token, str) else None
        reply = server._next_reply(token)
        if reply is not None:  # scripted: exactly what the test asked for
            await server._pause(reply.delay)
            status, answer = _scripted(reply)
            if answer is not None:
                self._count(status, answer, received)
                return server._response(received, status, answer, reply)
        await server._pause(self.policy.latency.sample(self.rng))
        problem = server._check(body)
        if problem:
            self._tally("acrobits", PERMANENT)
            return server._response(received, 400, {"code": 400, "response": problem})
        assert isinstance(body, dict) and token is not None
        if self.rng.random() < self.policy.transient_rate:
            self._tally("acrobits", TRANSIENT)
            retry = self.policy.retry_after.sample_optional(self.rng)
            transient = Reply(503, retry_after=None if retry is None else float(max(1, round(retry))))
            return server._response(received, 503, {"code": 503, "response": "Service Unavailable"}, transient)
        if token in self.dead_tokens:
            self._tally("acrobits", PERMANENT)
            return server._response(received, 200, {"code": 404, "response": "Device token not found"})
        self._tally("acrobits", ACCEPTED)
        self._deliver_mediator(token, body)
        return server._response(received, 200, {"code": 200, "response": "OK"})

    def _count(self, status: int, answer: Any, received: Received) -> None:
        code = answer.get("code") if isinstance(answer, dict) else None
        if status == 429 or status >= 500 or (isinstance(code, int) and (code >= 500 or code == 429)):
            self._tally("acrobits", TRANSIENT)
        elif 200 <= status < 300 and code == 200:
            self._tally("acrobits", ACCEPTED)
            body = received.json
            token = body.get("DeviceToken") if isinstance(body, dict) else None
            if isinstance(body, dict) and isinstance(token, str):
                self._deliver_mediator(token, body)
        else:
            self._tally("acrobits", PERMANENT)

    def _deliver_mediator(self, token: str, body: dict[str, Any]) -> None:
        self._deliver(token, "acrobits", lambda: _lab_push(token, body))

    # ------------------------------------------------------------------ answering: FCM and APNs

    def _transient(self) -> tuple[int, float | None] | None:
        """``(status, Retry-After)`` when this FCM/APNs request is to fail for now, else None."""
        if self.rng.random() >= self.policy.transient_rate:
            return None
        status = 429 if self.rng.random() < self.policy.throttle_share else 503
        retry = self.policy.retry_after.sample_optional(self.rng)
        return status, None if retry is None else float(max(1, round(retry)))

    def _fcm_reply(self, token: str) -> Reply | None:
        """The policy's answer to a valid FCM push: a failure as a ``Reply``, None = accept."""
        from lab.push_servers import Reply

        transient = self._transient()
        if transient is not None:
            status, retry = transient
            return Reply(status, retry_after=retry)  # 503 UNAVAILABLE / 429 QUOTA_EXCEEDED
        if token in self.dead_tokens:
            return Reply(404)  # UNREGISTERED
        return None

    def _fcm_answered(self, received: Received) -> None:
        status = received.status
        verdict = TRANSIENT if status is None else _verdict(status)
        self._tally("fcm", verdict)
        token = _fcm_token(received.json)
        if verdict == ACCEPTED and token is not None:
            message = received.json["message"]
            data = message.get("data") if isinstance(message.get("data"), dict) else {}
            self._deliver(token, "fcm", lambda: _lab_push_from_fields("fcm", token, data))

    def _apns_answered(self, request: ApnsRequest) -> None:
        verdict = TRANSIENT if request.status is None else _verdict(request.status)
        self._tally("apns", verdict)
        token = request.device_token
        if verdict == ACCEPTED and token is not None and isinstance(request.payload, dict):
            fields = {key: value for key, value in request.payload.items() if key != "aps"}
            self._deliver(token, "apns", lambda: _lab_push_from_fields("apns", token, fields))

    # ------------------------------------------------------------------ counting and delivery

    def _tally(self, provider: str, verdict: str) -> None:
        self.answers[verdict] += 1
        self.answers_by_provider.setdefault(provider, Counter())[verdict] += 1

    def _deliver(self, token: str, provider: str, make: Callable[[], LabPush]) -> None:
        loop = asyncio.get_running_loop()
        delay = self.policy.delivery_latency.sample(self.rng)

        def arrive() -> None:
            self._pending.discard(handle)
            callback = self._devices.get(token)
            if callback is None:
                self.undelivered += 1
                return
            self.delivered += 1
            self.delivered_by_provider[provider] += 1
            try:
                callback(make())
            except Exception:  # a broken phone must not break the mediator
                log.exception("push delivery callback failed")

        handle = loop.call_later(delay, arrive)
        self._pending.add(handle)


def _verdict(status: int) -> str:
    """What an HTTP status from FCM or APNs means to the core."""
    if 200 <= status < 300:
        return ACCEPTED
    if status in (408, 429) or status >= 500:
        return TRANSIENT
    return PERMANENT


def _fcm_token(body: Any) -> str | None:
    message = body.get("message") if isinstance(body, dict) else None
    token = message.get("token") if isinstance(message, dict) else None
    return token if isinstance(token, str) and token else None


def _scripted(reply: Reply) -> tuple[int, Any]:
    """The (status, body) a scripted reply stands for; body None = behave normally."""
    if reply.body is not None:
        return reply.status, reply.body
    if reply.code is not None:
        return reply.status, {"code": reply.code, "response": "OK" if reply.code == 200 else "Error"}
    if reply.status != 200:
        return reply.status, {"code": reply.status, "response": "Error"}
    return reply.status, None


def _lab_push(token: str, body: dict[str, Any]) -> LabPush:
    sent_at = body.get("SentAt")
    return LabPush(
        verb=str(body.get("verb", "")), token=token, push_id=str(body.get("Id", "")),
        selector=str(body.get("Selector", "")), call_id=body.get("CallId"), caller=body.get("Caller"),
        sent_at_ms=int(sent_at) if isinstance(sent_at, str) and sent_at.isdigit() else None,
        received_at=time.monotonic(), body=dict(body),
    )


def _lab_push_from_fields(provider: str, token: str, fields: dict[str, Any]) -> LabPush:
    """A push from the provider-neutral fields (``PushRequest.payload_fields``) in FCM data or
    APNs custom keys; ``type`` (call, missed, ...) becomes the mediator's verb for that kind."""
    from sipis.push.acrobits import VERBS
    from sipis.push.base import PushKind

    def text(key: str) -> str | None:
        value = fields.get(key)
        return value if isinstance(value, str) else None

    kind = text("type") or ""
    try:
        verb = VERBS[PushKind(kind)]
    except ValueError:
        verb = kind
    sent_at = text("sent_at_ms")
    return LabPush(
        verb=verb, token=token, push_id=text("push_id") or "", selector=text("selector") or "",
        call_id=text("call_id"), caller=text("caller"),
        sent_at_ms=int(sent_at) if sent_at is not None and sent_at.isdigit() else None,
        received_at=time.monotonic(), body=dict(fields), provider=provider,
    )


__all__ = ["ACCEPTED", "APNS_KEY_ID", "APNS_TEAM_ID", "FCM_PROJECT", "LAB_APP_ID", "PERMANENT", "PROVIDER_NAMES",
           "PROVIDER_TYPES", "TRANSIENT", "Distribution", "LabMediator", "LabPush", "MediatorPolicy",
           "PushCallback"]
