"""Request limits of the app API: a token bucket per source address and one per instance token.

:class:`RateLimits` is sans-I/O: it decides from the time it is given, so tests drive it with a fake
clock. :class:`RateLimitMiddleware` applies it to every request before anything else is done with
it (no body read, no token checked) and answers ``429`` with ``Retry-After`` when a bucket is empty.

Instance tokens are limited per token on the routes that take one (``/v1/instances/{selector}…``).
Enrolment tokens are shared by every app of a deployment, so enrolments are limited per source
address only; the registration engine paces whatever they set off (``register_rate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sipis.api.models import error_body
from sipis.clock import Clock, SystemClock
from sipis.config import ApiConfig

#: Buckets kept per kind at most; beyond it the least recently used is forgotten (its owner starts
#: again with a full burst, which is all a stranger gets anyway).
MAX_KEYS = 65536

#: Bearer tokens longer than this are malformed (the API answers 401): not worth a bucket.
MAX_TOKEN_KEY = 1024

_INSTANCE_ROUTES = "/v1/instances/"


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``."""

    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, now: float) -> float:
        """Take one token: 0 when there was one, else the seconds until there is."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Buckets:
    """One :class:`TokenBucket` per key, each starting full; ``rate`` 0: no limit."""

    def __init__(self, rate: float, burst: float, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, self.burst, now)
            if len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]  # the least recently used
        self._buckets[key] = bucket  # dicts keep insertion order: the most recent goes last
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimits:
    """The app API's limits (section ``[api]``)."""

    def __init__(self, settings: ApiConfig, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self.per_source = Buckets(settings.rate_per_source, settings.burst_per_source)
        self.per_token = Buckets(settings.rate_per_token, settings.burst_per_token)
        self.refused = 0

    def check(self, source: str, token: str | None, now: float) -> float:
        """Seconds the request must wait (0: go ahead). A request refused by its source's bucket
        takes nothing from its token's."""
        wait = self.per_source.take(source, now)
        if not wait and token is not None:
            wait = self.per_token.take(token, now)
        if wait:
            self.refused += 1
        return wait


def instance_token(scope: Scope) -> str | None:
    """The bearer token of a request to an instance route (None: another route, or no token)."""
    if not str(scope.get("path", "")).startswith(_INSTANCE_ROUTES):
        return None
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_KEY:
        return None
    return token.strip()


class RateLimitMiddleware:
    """Outermost: a request over its limits costs one dictionary look-up and a small answer."""

    def __init__(self, app: ASGIApp, limits: RateLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            source = client[0] if client else ""
            wait = self.limits.check(source, instance_token(scope), self.limits.clock.monotonic())
            if wait:
                answer = JSONResponse(error_body("too_many_requests", f"too many requests; retry in {wait:.1f} s"),
                                      status_code=429, headers={"Retry-After": str(math.ceil(wait))})
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)
