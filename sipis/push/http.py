"""What every HTTP push provider shares: one warm client, timed requests, transport errors as
transient outcomes, ``Retry-After`` parsing and token masking.

Each provider owns one :class:`httpx.AsyncClient` for its whole life (connections stay warm, TLS
handshakes are paid once). :func:`post` never raises for a transport problem: it returns an
:class:`Exchange` with either a response or an ``error`` text, plus the measured latency, so a
provider can always turn the result into a :class:`~sipis.push.base.PushOutcome`.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import json
import math
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from urllib.request import getproxies

import httpx

from sipis.config import PushProviderBase
from sipis.instance import mask
from sipis.push.base import PushOutcome, PushRequest, Verdict
from sipis.push.transport import Http11Transport

#: Longest error/reason text kept in an outcome (answers can be whole HTML pages).
MAX_TEXT = 300


def build_client(config: PushProviderBase, *, http2: bool = False,
                 headers: Mapping[str, str] | None = None) -> httpx.AsyncClient:
    """The provider's long-lived client: TLS per ``verify``/``ca_file``, ``timeout`` for every
    phase (connect, write, read, pool), no redirects (a push endpoint that redirects is
    misconfigured, and following it could leak a bearer token to another host)."""
    verify: ssl.SSLContext | bool
    if not config.verify:
        verify = False
    elif config.ca_file is not None:
        verify = ssl.create_default_context(cafile=str(config.ca_file))
    else:
        verify = True  # httpx's default trust store
    # A small, bounded pool: after a stall, queued pushes wait for a warm connection instead of
    # each opening its own TLS connection; idle connections are dropped before providers'
    # typical 5 s server-side idle timeout so we never write into a closed one.
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8, keepalive_expiry=4.0)
    transport: httpx.AsyncBaseTransport | None = None
    if not http2 and not environment_proxies():
        # HTTP/1.1 without a proxy: our transport writes a request in one go, without yielding
        # to the event loop first (sipis.push.transport); otherwise httpx's own.
        transport = Http11Transport(ssl_context=httpx.create_ssl_context(verify=verify), limits=limits)
    return httpx.AsyncClient(
        verify=verify, http2=http2, timeout=httpx.Timeout(config.timeout),
        follow_redirects=False, headers=dict(headers or {}), limits=limits, transport=transport,
    )


def environment_proxies() -> bool:
    """True when the environment names an HTTP(S) proxy, which httpx's own transport honours."""
    proxies = getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def fast_transport(client: httpx.AsyncClient) -> bool:
    """True when ``client`` sends through :class:`Http11Transport`: nothing on its way to the wire
    awaits (or needs a task of its own) while a pooled connection is idle."""
    return isinstance(getattr(client, "_transport", None), Http11Transport)


@dataclass(frozen=True)
class Exchange:
    """One timed HTTP request: exactly one of ``response`` and ``error`` is set."""

    response: httpx.Response | None
    latency_ms: float
    error: str | None = None


def parsed_url(url: str) -> httpx.URL | str:
    """``url`` parsed once (httpx then skips parsing it for every request); left as text when it
    does not parse, so that each push fails with the parser's message as before."""
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return url


async def post(client: httpx.AsyncClient, url: str | httpx.URL, *, json_body: Any = None,
               form: Mapping[str, str] | None = None,
               headers: Mapping[str, str] | None = None) -> Exchange:
    """POST and read the whole answer; transport problems come back as ``error`` text."""
    start = time.perf_counter()
    try:
        response = await client.post(url, json=json_body, data=form, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL, ssl.SSLError, OSError) as exc:
        return Exchange(None, elapsed_ms(start), describe_error(exc))
    # The body is read and the stream closed. httpx's client left the response in a reference
    # cycle with its stream wrapper (response.stream._response is the response): only the cyclic
    # garbage collector could free it, with its request, headers and URL, ~25 objects per push.
    # A spent stream in its place lets reference counting free it all at once.
    response.stream = httpx.ByteStream(b"")
    return Exchange(response, elapsed_ms(start))


def elapsed_ms(start: float) -> float:
    """Milliseconds since ``start`` (a :func:`time.perf_counter` value)."""
    return round((time.perf_counter() - start) * 1000.0, 3)


def describe_error(exc: BaseException) -> str:
    """A short, secret-free text for a transport failure: ``"<kind>: <detail>"``."""
    if isinstance(exc, httpx.ConnectTimeout):
        kind = "connect timeout"
    elif isinstance(exc, httpx.ReadTimeout):
        kind = "read timeout"
    elif isinstance(exc, httpx.WriteTimeout):
        kind = "write timeout"
    elif isinstance(exc, httpx.TimeoutException):
        kind = "timeout"
    elif isinstance(exc, httpx.ConnectError):
        kind = "connection failed"
    elif isinstance(exc, httpx.RemoteProtocolError):
        kind = "protocol error"
    elif isinstance(exc, httpx.NetworkError | OSError):
        kind = "network error"
    else:
        kind = "request failed"
    detail = str(exc).strip() or type(exc).__name__
    return clip(f"{kind}: {detail}")


def clip(text: str, limit: int = MAX_TEXT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP date (RFC 9110 §10.2.3).

    A date in the past gives 0; anything unparsable gives None. ``now`` is epoch seconds.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses as naive; HTTP dates are always GMT
        when = when.replace(tzinfo=datetime.UTC)
    current = time.time() if now is None else now
    return max(0.0, round(when.timestamp() - current, 3))


def retry_after(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))


def mask_token(token: str | None) -> str:
    """Show a device token the way the console does: ``abcd…wxyz``; short tokens fully hidden."""
    if not token:
        return ""
    return mask(token) or ""


@functools.lru_cache(maxsize=64)
def safe_url(url: str) -> str:
    """The URL without user info, query or fragment (they can carry secrets)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def json_or_none(response: httpx.Response) -> Any:
    """The parsed JSON answer, or None when the body is not JSON."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None


def body_excerpt(response: httpx.Response) -> str:
    try:
        return clip(response.text) if response.content else ""
    except (UnicodeDecodeError, LookupError):
        return f"<{len(response.content)} bytes>"


def base_summary(provider: str, provider_type: str, url: str, request: PushRequest) -> dict[str, Any]:
    """The part of ``request_summary`` every provider shares; the token is masked."""
    return {
        "provider": provider, "type": provider_type, "url": safe_url(url), "kind": request.kind.value,
        "push_id": request.push_id, "selector": request.selector, "app_id": request.app_id,
        "token": mask_token(request.token), "voip": request.voip,
    }


def outcome(verdict: Verdict, *, latency_ms: float | None, summary: dict[str, Any],
            code: int | None = None, reason: str | None = None, retry: float | None = None,
            token_dead: bool = False, error: str | None = None) -> PushOutcome:
    return PushOutcome(verdict=verdict, provider_code=code,
                       provider_reason=clip(reason) if reason else reason, latency_ms=latency_ms,
                       retry_after=retry, token_dead=token_dead,
                       error=clip(error) if error else error, request_summary=summary)


class HttpPushProvider:
    """Base for providers that POST over one warm :class:`httpx.AsyncClient`."""

    type: str = "http"

    def __init__(self, config: PushProviderBase, *, http2: bool = False,
                 client: httpx.AsyncClient | None = None) -> None:
        self.name: str = config.name
        self.config = config
        self.client = client if client is not None else build_client(config, http2=http2)
        #: ``send`` may be started eagerly (sipis.push.eager): nothing before the request is written
        #: awaits or needs a task of its own (see :func:`fast_transport`)
        self.eager_send = fast_transport(self.client)

    async def close(self) -> None:
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {safe_url(self.config.url)}>"
