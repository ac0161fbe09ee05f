"""The lab push mediator: an Acrobits-shaped PN mediator that fails like a real one and delivers.

:class:`LabMediator` wraps :class:`lab.push_servers.MediatorServer` (the real wire format at
``/pnm2/send`` over HTTPS, with its scripting and request log) and adds what a lab needs:

* **Latency** — every answer is held back by a sample of :attr:`MediatorPolicy.latency`.
* **Transient failures** — a fraction :attr:`MediatorPolicy.transient_rate` of requests is answered
  HTTP ``503`` (``{"code": 503, ...}``), with a ``Retry-After`` drawn from
  :attr:`MediatorPolicy.retry_after` (``None`` = no header). A Retry-After beyond the call's
  remaining wake timer makes the core give up: the push ends ``rejected-transient``.
* **Dead tokens** — tokens in :attr:`LabMediator.dead_tokens` get ``{"code": 404}`` (the core marks
  the device unreachable).
* **Delivery** — an accepted push reaches the phone holding that ``DeviceToken``: the callback
  given to :meth:`LabMediator.attach` is called with a :class:`LabPush` after a sample of
  :attr:`MediatorPolicy.delivery_latency` (the time the platform takes to get it to the device).
  That is how a simulated phone "receives" a push.

Scripted replies (:meth:`LabMediator.script`) still come first, as in ``MediatorServer``.

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
    from fastapi.responses import Response

    from lab.push_servers import MediatorServer, Received, Reply

log = logging.getLogger(__name__)

DistributionKind = Literal["fixed", "uniform", "exponential", "lognormal", "choice"]

#: accepted / rejected-transient / rejected-permanent, the names the core's outcome model uses
ACCEPTED, TRANSIENT, PERMANENT = "accepted", "rejected-transient", "rejected-permanent"


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

    def __post_init__(self) -> None:
        if not 0.0 <= self.transient_rate <= 1.0:
            raise ValueError(f"transient_rate must be within 0..1, got {self.transient_rate}")


@dataclass(frozen=True)
class LabPush:
    """A push as the device sees it (the mediator's JSON attributes, typed)."""

    verb: str
    token: str
    push_id: str
    selector: str
    call_id: str | None
    caller: str | None
    sent_at_ms: int | None
    received_at: float  # monotonic, when the device got it
    body: dict[str, Any]

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


class LabMediator:
    """The lab's push mediator. ``await start()``, point ``[push.NAME]`` (type ``acrobits``) at
    :attr:`send_url` with :attr:`ca_file`, and :meth:`attach` each phone's token."""

    def __init__(self, state_dir: str | Path, *, policy: MediatorPolicy | None = None,
                 rng: random.Random | None = None, host: str = "127.0.0.1") -> None:
        self.policy = policy or MediatorPolicy()
        self.rng = rng or random.Random()
        self.server = _policy_server(self, Path(state_dir), host)
        #: what the mediator answered, per request: accepted / rejected-transient / rejected-permanent
        self.answers: Counter[str] = Counter()
        #: accepted pushes handed to a device / for tokens nobody attached
        self.delivered = 0
        self.undelivered = 0
        self._devices: dict[str, PushCallback] = {}
        self._pending: set[asyncio.TimerHandle] = set()

    # ------------------------------------------------------------------ lifecycle and wiring

    @property
    def dead_tokens(self) -> set[str]:
        return self.server.dead_tokens

    @property
    def requests(self) -> list[Received]:
        return self.server.requests

    @property
    def send_url(self) -> str:
        return self.server.send_url

    @property
    def ca_file(self) -> Path:
        return self.server.ca_file

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        await self.server.stop()

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
        """From now on the mediator says this token is dead (code 404)."""
        self.dead_tokens.add(token)

    def script(self, token: str, replies: Iterable[Reply]) -> None:
        self.server.script(token, replies)

    # ------------------------------------------------------------------ answering

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
            self.answers[PERMANENT] += 1
            return server._response(received, 400, {"code": 400, "response": problem})
        assert isinstance(body, dict) and token is not None
        if self.rng.random() < self.policy.transient_rate:
            self.answers[TRANSIENT] += 1
            retry = self.policy.retry_after.sample_optional(self.rng)
            transient = Reply(503, retry_after=None if retry is None else float(max(1, round(retry))))
            return server._response(received, 503, {"code": 503, "response": "Service Unavailable"}, transient)
        if token in self.dead_tokens:
            self.answers[PERMANENT] += 1
            return server._response(received, 200, {"code": 404, "response": "Device token not found"})
        self.answers[ACCEPTED] += 1
        self._deliver(token, body)
        return server._response(received, 200, {"code": 200, "response": "OK"})

    def _count(self, status: int, answer: Any, received: Received) -> None:
        code = answer.get("code") if isinstance(answer, dict) else None
        if status == 429 or status >= 500 or (isinstance(code, int) and (code >= 500 or code == 429)):
            self.answers[TRANSIENT] += 1
        elif 200 <= status < 300 and code == 200:
            self.answers[ACCEPTED] += 1
            body = received.json
            token = body.get("DeviceToken") if isinstance(body, dict) else None
            if isinstance(body, dict) and isinstance(token, str):
                self._deliver(token, body)
        else:
            self.answers[PERMANENT] += 1

    def _deliver(self, token: str, body: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        delay = self.policy.delivery_latency.sample(self.rng)

        def arrive() -> None:
            self._pending.discard(handle)
            callback = self._devices.get(token)
            if callback is None:
                self.undelivered += 1
                return
            self.delivered += 1
            try:
                callback(_lab_push(token, body))
            except Exception:  # a broken phone must not break the mediator
                log.exception("push delivery callback failed")

        handle = loop.call_later(delay, arrive)
        self._pending.add(handle)


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


__all__ = ["ACCEPTED", "PERMANENT", "TRANSIENT", "Distribution", "LabMediator", "LabPush", "MediatorPolicy",
           "PushCallback"]
