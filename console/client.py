"""The operator API client: what the console (and automation) uses to talk to the core.

UI-free, async, on httpx. Over the core's unix socket (``OperatorClient(socket_path=...)``; without a
token that is the local administrator, named by ``operator_name`` → ``X-Operator``) or over TCP
(``OperatorClient(url=..., token=...)``). A console started by the SSH server gets its session token
in ``SIPIS_OPERATOR_TOKEN`` (see :meth:`OperatorClient.from_environment`).

Every route of ``docs/operator-api.md`` has a typed method; answers are the JSON documents
described there (``TypedDict``s below, for editors and mypy). Errors raise :class:`OperatorApiError`
(``status``, ``code``, ``detail``) or one of its subclasses. :meth:`OperatorClient.events` is an
async iterator over the live event stream that reconnects with backoff and resumes with ``since``.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import random
import ssl
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Any, Literal, TypedDict, cast
from urllib.parse import quote

import httpx

DEFAULT_TIMEOUT = 10.0
#: test pushes and replays wait for the provider (with retries) before answering
ACTION_TIMEOUT = 60.0
TOKEN_ENV = "SIPIS_OPERATOR_TOKEN"
SOCKET_ENV = "SIPIS_OPERATOR_SOCKET"
URL_ENV = "SIPIS_OPERATOR_URL"
#: the stream sends a heartbeat every 15 s; silence for this long means the connection is dead
STREAM_READ_TIMEOUT = 45.0


InstanceAction = Literal["take-over", "hand-back", "re-register", "test-push", "disable"]
INSTANCE_ACTIONS: tuple[InstanceAction, ...] = ("take-over", "hand-back", "re-register", "test-push", "disable")


# --------------------------------------------------------------------------- documents


class Whoami(TypedDict):
    name: str
    role: Literal["viewer", "operator", "admin"]


class PushStats(TypedDict):
    accepted: int
    rejected: int
    transient: int
    success_rate: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None


class PbxStatus(TypedDict):
    reachable: bool
    last_error: str | None


class WriterSummary(TypedDict):
    pending: int
    last_error: str | None


class Summary(TypedDict):
    node: str
    version: str
    started_at: float
    now: float
    counts: dict[str, int]
    reg_status: dict[str, int]
    held_calls: int
    calls_per_min: int
    outcomes: dict[str, int]
    push: PushStats
    pbx: PbxStatus
    writer: WriterSummary
    alarms: int


class InstanceRow(TypedDict):
    selector: str
    aor: str
    user: str
    registrar: str | None
    state: str
    reg_status: str
    last_code: int | None
    last_reason: str | None
    expires_at: float | None
    next_refresh_at: float | None
    failure_count: int
    backoff_until: float | None
    push_provider: str
    push_unreachable: bool
    last_push_outcome: str | None
    last_push_at: float | None
    app_last_seen: float


class InstancePage(TypedDict):
    total: int
    matched: int
    counts: dict[str, int]
    items: list[InstanceRow]


class Event(TypedDict, total=False):
    seq: int
    at: float
    kind: str  # also "heartbeat", "gap", "overflow" (see docs/operator-api.md)
    selector: str | None
    data: dict[str, Any]
    dropped: int
    since: int
    first_available: int | None


class Push(TypedDict):
    push_id: str
    selector: str
    kind: str
    provider: str
    call_id: str | None
    attempt: int
    outcome: str
    provider_code: int | None
    provider_reason: str | None
    latency_ms: float | None
    error: str | None
    replay_of: str | None
    stages: dict[str, float]
    request_summary: dict[str, Any]


class SipMessage(TypedDict):
    at: float
    direction: Literal["in", "out"]
    transport: str
    local: str
    remote: str
    first_line: str
    call_id: str
    cseq: int | None
    method: str | None
    status: int | None
    selector: str | None
    raw: str


class InstanceDetail(TypedDict):
    instance: dict[str, Any]  # the instance's public view (no secrets)
    row: InstanceRow
    timeline: list[Event]
    pushes: list[Push]
    sip: list[SipMessage]


class Call(TypedDict):
    call_id: str
    push_id: str
    selector: str
    caller: str | None
    stage: str
    received_at: float
    outcome: str | None
    final_status: int | None
    t1_remaining: float | None
    t2_remaining: float | None


class Calls(TypedDict):
    held: list[Call]
    recent: list[Call]


class CallTrace(TypedDict):
    call_id: str
    selector: str | None
    messages: list[SipMessage]
    pushes: list[Push]


class AuditRow(TypedDict):
    id: str
    at: float
    operator: str
    role: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any]


class ActionResult(TypedDict):
    instance: dict[str, Any]
    row: InstanceRow


class PushResult(TypedDict):
    push: Push


# --------------------------------------------------------------------------- errors


class OperatorApiError(Exception):
    """The core answered with an error (``status`` 0: it could not be reached)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}" if status else f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class Unauthorized(OperatorApiError):
    """401: no token, or a wrong, expired or revoked one."""


class Forbidden(OperatorApiError):
    """403: the operator's role does not allow this (the refusal is in the audit log)."""


class NotFound(OperatorApiError):
    """404: no such instance, push or route."""


class Conflict(OperatorApiError):
    """409: the instance's state does not allow the action (e.g. it is off)."""


class Unreachable(OperatorApiError):
    """The core did not answer (socket missing, connection refused, timeout)."""


_ERRORS: dict[int, type[OperatorApiError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict}


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        code, detail = str(body.get("error", "error")), str(body.get("detail", ""))
    except (ValueError, AttributeError):
        code, detail = "error", response.text[:200]
    raise _ERRORS.get(response.status_code, OperatorApiError)(response.status_code, code, detail)


# --------------------------------------------------------------------------- the client


class OperatorClient:
    def __init__(self, *, socket_path: str | os.PathLike[str] | None = None, url: str | None = None,
                 token: str | None = None, operator_name: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 verify: bool | str = True, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``socket_path`` (unix socket) or ``url`` (``http(s)://host:port``); ``transport`` overrides
        both (tests: ``httpx.ASGITransport``). ``verify``: TLS verification for an https URL —
        ``True``, ``False`` or a CA file."""
        if transport is None and socket_path is None and url is None:
            raise ValueError("give socket_path or url")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if operator_name:
            headers["X-Operator"] = operator_name
        if transport is None and socket_path is not None:
            # Plain HTTP over a unix socket: TLS never happens here, so no CA bundle needs loading (the
            # default context costs ~50-80 ms of every console's start). A context without any CA
            # would fail any handshake anyway.
            transport = httpx.AsyncHTTPTransport(uds=os.fspath(socket_path),
                                                 verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
            base_url = "http://sipis"
        else:
            base_url = url or "http://sipis"
        self.token = token
        self.operator_name = operator_name
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, transport=transport,
                                       verify=verify if isinstance(verify, bool) else _ssl_context(verify))

    @classmethod
    def from_environment(cls, *, socket_path: str | os.PathLike[str] | None = None,
                         operator_name: str | None = None) -> OperatorClient:
        """``SIPIS_OPERATOR_TOKEN`` (session token from the SSH server), ``SIPIS_OPERATOR_SOCKET`` or
        ``SIPIS_OPERATOR_URL``; the arguments are the fallbacks."""
        token = os.environ.get(TOKEN_ENV) or None
        url = os.environ.get(URL_ENV) or None
        sock = os.environ.get(SOCKET_ENV) or (os.fspath(socket_path) if socket_path is not None else None)
        if url is not None:
            return cls(url=url, token=token)
        name = operator_name or os.environ.get("USER") or None
        return cls(socket_path=sock, token=token, operator_name=name)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> OperatorClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ plumbing

    async def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                       timeout: float | None = None) -> httpx.Response:
        try:
            response = await self._http.request(method, path, params=_clean(params),
                                                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.TimeoutException as exc:
            raise Unreachable(0, "timeout", f"{method} {path}: {exc!r}") from exc
        except (httpx.TransportError, OSError) as exc:
            raise Unreachable(0, "unreachable", f"{method} {path}: {exc!r}") from exc
        _raise_for(response)
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self._request(method, path, **kwargs)).json()

    # ------------------------------------------------------------------ reads

    async def whoami(self) -> Whoami:
        return cast(Whoami, await self._json("GET", "/v1/whoami"))

    async def summary(self) -> Summary:
        return cast(Summary, await self._json("GET", "/v1/summary"))

    async def instances(self, *, offset: int = 0, limit: int = 200, q: str = "", state: str = "",
                        sort: str = "aor", desc: bool = False) -> InstancePage:
        """A page of the instance list; ``limit=0`` = everything; ``q`` matches selector, aor, user and
        registrar (case-insensitive substring); ``state`` one of active/inactive/proxied/off."""
        params = {"offset": offset, "limit": limit, "q": q, "state": state, "sort": sort,
                  "desc": "true" if desc else "false"}
        return cast(InstancePage, await self._json("GET", "/v1/instances", params=params))

    async def stream_instances(self, on_items: Callable[[list[InstanceRow]], None], *, offset: int = 0,
                               limit: int = 0, q: str = "", state: str = "", sort: str = "aor",
                               desc: bool = False) -> InstancePage:
        """Like :meth:`instances` (default: everything), but the rows are decoded as they arrive and
        handed to ``on_items`` in batches, in order; returns the page without its items. 100k rows are
        ~50 MB of JSON: decoded in one piece that blocks the caller's loop for a good part of a second,
        and only after the last byte; this way the decoding overlaps the transfer."""
        params = {"offset": offset, "limit": limit, "q": q, "state": state, "sort": sort,
                  "desc": "true" if desc else "false"}
        path = "/v1/instances"
        parser = ItemsParser(on_items)
        try:
            async with self._http.stream("GET", path, params=_clean(params)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                async for chunk in response.aiter_bytes():
                    parser.feed(chunk)
        except httpx.TimeoutException as exc:
            raise Unreachable(0, "timeout", f"GET {path}: {exc!r}") from exc
        except (httpx.TransportError, OSError) as exc:
            raise Unreachable(0, "unreachable", f"GET {path}: {exc!r}") from exc
        try:
            head = parser.close()
        except ValueError as exc:
            raise OperatorApiError(200, "bad_response", f"GET {path}: {exc}") from exc
        return cast(InstancePage, {**head, "items": []})

    async def instance(self, selector: str) -> InstanceDetail:
        return cast(InstanceDetail, await self._json("GET", f"/v1/instances/{_seg(selector)}"))

    async def calls(self) -> Calls:
        return cast(Calls, await self._json("GET", "/v1/calls"))

    async def call_trace(self, call_id: str) -> CallTrace:
        return cast(CallTrace, await self._json("GET", f"/v1/calls/{_seg(call_id)}/trace"))

    async def call_trace_text(self, call_id: str) -> str:
        return (await self._request("GET", f"/v1/calls/{_seg(call_id)}/trace.txt")).text

    async def call_trace_pcap(self, call_id: str) -> bytes:
        return (await self._request("GET", f"/v1/calls/{_seg(call_id)}/trace.pcap")).content

    async def pushes(self, *, limit: int = 200, selector: str | None = None) -> list[Push]:
        """Recent pushes, newest last."""
        return cast(list[Push], await self._json("GET", "/v1/pushes",
                                                 params={"limit": limit, "selector": selector}))

    async def audit(self, *, limit: int = 200) -> list[AuditRow]:
        """Recent audit rows, newest last."""
        return cast(list[AuditRow], await self._json("GET", "/v1/audit", params={"limit": limit}))

    # ------------------------------------------------------------------ actions

    async def _action(self, selector: str, action: str) -> Any:
        return await self._json("POST", f"/v1/instances/{_seg(selector)}/actions/{action}", timeout=ACTION_TIMEOUT)

    async def action(self, selector: str, name: InstanceAction) -> dict[str, Any]:
        """Any instance action by its path name: ``take-over``, ``hand-back``, ``re-register``,
        ``test-push`` (→ ``{"push"}``), ``disable`` (→ ``{"instance", "row"}`` for the others)."""
        if name not in INSTANCE_ACTIONS:
            raise ValueError(f"unknown action {name!r}; one of {', '.join(INSTANCE_ACTIONS)}")
        return cast(dict[str, Any], await self._action(selector, name))

    async def take_over(self, selector: str) -> ActionResult:
        return cast(ActionResult, await self._action(selector, "take-over"))

    async def hand_back(self, selector: str) -> ActionResult:
        return cast(ActionResult, await self._action(selector, "hand-back"))

    async def re_register(self, selector: str) -> ActionResult:
        return cast(ActionResult, await self._action(selector, "re-register"))

    async def disable(self, selector: str) -> ActionResult:
        return cast(ActionResult, await self._action(selector, "disable"))

    async def test_push(self, selector: str) -> PushResult:
        return cast(PushResult, await self._action(selector, "test-push"))

    async def replay_push(self, push_id: str) -> PushResult:
        return cast(PushResult, await self._json("POST", f"/v1/pushes/{_seg(push_id)}/replay",
                                                 timeout=ACTION_TIMEOUT))

    # ------------------------------------------------------------------ the event stream

    async def events(self, since: int | None = None, *, heartbeats: bool = False, reconnect: bool = True,
                     backoff_initial: float = 0.5, backoff_max: float = 10.0) -> AsyncGenerator[Event, None]:
        """Live events, oldest first. After a dropped connection it reconnects (exponential backoff
        with jitter) with ``since`` = the last seq seen, so nothing in the core's ring is missed.
        Lines of kind ``gap`` (events lost: reload snapshots) and ``overflow`` are passed through;
        heartbeats only with ``heartbeats=True``. 401/403 are not retried."""
        last = since
        delay = backoff_initial
        timeout = httpx.Timeout(DEFAULT_TIMEOUT, read=STREAM_READ_TIMEOUT)
        while True:
            params = {"since": last} if last is not None else None
            try:
                async with self._http.stream("GET", "/v1/events", params=params, timeout=timeout) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _raise_for(response)
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        try:
                            event = cast(Event, json.loads(line))
                        except ValueError:
                            continue
                        delay = backoff_initial
                        seq = event.get("seq")
                        kind = event.get("kind")
                        if kind == "heartbeat":
                            if last is None and isinstance(seq, int):
                                last = seq  # resume from here if the connection drops before any event
                            if heartbeats:
                                yield event
                            continue
                        if isinstance(seq, int) and kind not in ("gap", "overflow"):
                            last = seq
                        yield event
            except (Unauthorized, Forbidden):
                raise
            except (httpx.TransportError, OSError, OperatorApiError) as exc:
                if not reconnect:
                    raise Unreachable(0, "unreachable", f"event stream: {exc!r}") from exc
            if not reconnect:
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(backoff_max, delay * 2)


class ItemsParser:
    """Decodes one JSON object whose ``items`` member is a long array, as its bytes arrive.

    The array's elements go to ``on_items`` in batches, in order, as soon as they are complete; the
    object's other members are returned by :meth:`close`. Whatever arrives up to the last ``}`` is
    decoded with one ``json.loads`` (C speed); when that cut is not between two elements (a ``}``
    inside a string) it falls back to one element at a time. Malformed input raises ``ValueError``
    at the latest in :meth:`close`.
    """

    _WS = " \t\n\r"

    def __init__(self, on_items: Callable[[list[Any]], None], member: str = "items") -> None:
        self.on_items = on_items
        self.member = member
        self.head: dict[str, Any] = {}
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._json = json.JSONDecoder()
        self._buf = ""
        self._pos = 0
        self._key = ""
        self._state = "start"  # start, key, colon, value, comma, open, items, items_comma, done

    def feed(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self._buf = self._buf[self._pos:] + text
            self._pos = 0
            self._run(final=False)

    def close(self) -> dict[str, Any]:
        text = self._decoder.decode(b"", final=True)
        self._buf = self._buf[self._pos:] + text
        self._pos = 0
        self._run(final=True)
        if self._state != "done":
            raise ValueError(f"the JSON document ended early (in {self._state})")
        if self._buf[self._pos:].strip(self._WS):
            raise ValueError("extra data after the JSON document")
        return self.head

    def _skip(self) -> bool:
        """Skip whitespace; whether a character follows."""
        buf, pos, n = self._buf, self._pos, len(self._buf)
        while pos < n and buf[pos] in self._WS:
            pos += 1
        self._pos = pos
        return pos < n

    def _expect(self, chars: str) -> str | None:
        if not self._skip():
            return None
        char = self._buf[self._pos]
        if char not in chars:
            raise ValueError(f"expected one of {chars!r} at {self._pos}, got {char!r}")
        self._pos += 1
        return char

    def _value(self, final: bool) -> tuple[bool, Any]:
        if not self._skip():
            return False, None
        try:
            value, end = self._json.raw_decode(self._buf, self._pos)
        except json.JSONDecodeError:
            if final:
                raise
            return False, None  # not complete yet
        if end >= len(self._buf) and not final and isinstance(value, int | float):
            return False, None  # a number may go on in the next chunk
        self._pos = end
        return True, value

    def _run(self, final: bool) -> None:
        while True:
            state = self._state
            if state == "start":
                if self._expect("{") is None:
                    return
                self._state = "key"
            elif state == "key":
                if not self._skip():
                    return
                if self._buf[self._pos] == "}" and not self.head:
                    self._pos += 1
                    self._state = "done"
                    continue
                done, value = self._value(final)
                if not done:
                    return
                if not isinstance(value, str):
                    raise ValueError("expected a member name")
                self._key = value
                self._state = "colon"
            elif state == "colon":
                if self._expect(":") is None:
                    return
                self._state = "open" if self._key == self.member else "value"
            elif state == "open":
                if self._expect("[") is None:
                    return
                self._state = "items"
            elif state == "value":
                done, value = self._value(final)
                if not done:
                    return
                self.head[self._key] = value
                self._state = "comma"
            elif state == "comma":
                char = self._expect(",}")
                if char is None:
                    return
                self._state = "key" if char == "," else "done"
            elif state == "items":
                if not self._skip():
                    return
                if self._buf[self._pos] == "]":
                    self._pos += 1
                    self._state = "comma"
                    continue
                following = self._items(final)
                if following is None:
                    return
                self._state = following
            elif state == "items_comma":
                char = self._expect(",]")
                if char is None:
                    return
                self._state = "items" if char == "," else "comma"
            else:  # done
                return

    def _items(self, final: bool) -> str | None:
        """Decode the complete elements from here on; the next state, or None: wait for more bytes."""
        buf, pos = self._buf, self._pos
        cut = buf.rfind("}")
        if cut >= pos:
            try:
                items = json.loads("[" + buf[pos:cut + 1] + "]")
            except ValueError:
                items = None  # the cut is inside a string, or an element is not an object
            if items is not None:
                self._pos = cut + 1
                if items:
                    self.on_items(items)
                return "items_comma"
        items, state = [], None
        while True:  # one element at a time, up to the first incomplete one
            done, value = self._value(final)
            if not done:
                break
            items.append(value)
            state = "items_comma"
            if not self._skip() or self._buf[self._pos] != ",":
                break
            self._pos += 1
            state = "items"
        if items:
            self.on_items(items)
        return state

def _seg(value: str) -> str:
    """One path segment, percent-encoded (Call-IDs may contain '@', '/', '%' ...)."""
    return quote(value, safe="")


def _clean(params: dict[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    return {k: v for k, v in params.items() if v is not None}


def _ssl_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)
