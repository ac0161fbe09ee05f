"""The operator API client: what the console (and automation) uses to talk to the core.

UI-free, async, on httpx. Over the core's unix socket (``OperatorClient(socket_path=...)``; without a
token that is the local administrator, named by ``operator_name`` → ``X-Operator``) or over TCP
(``OperatorClient(url=..., token=...)``). A console started by the SSH server gets its session token
in ``SIPIS_OPERATOR_TOKEN`` (see :meth:`OperatorClient.from_environment`).

Every route of ``docs/operator-api.md`` has a method; answers are its JSON documents, decoded
(dicts and lists), as scripts want them. The contract's types say what is in them:
``contract.codec.from_json(contract.documents.Summary, await client.summary())`` (the console's
feed, ``console/feed.py``, does exactly that). Errors raise :class:`OperatorApiError` (``status``,
``code``, ``detail``) or one of its subclasses. :meth:`OperatorClient.events` is an async iterator
over the live event stream that reconnects with backoff and resumes with ``since``;
:meth:`OperatorClient.stream_instances` reads the instance list as NDJSON, rows decoded while they
arrive.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Any, Literal, cast
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
NDJSON = "application/x-ndjson"


InstanceAction = Literal["take-over", "hand-back", "re-register", "test-push", "disable"]
INSTANCE_ACTIONS: tuple[InstanceAction, ...] = ("take-over", "hand-back", "re-register", "test-push", "disable")


#: a decoded JSON document of docs/operator-api.md
Json = dict[str, Any]


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
        #: where the core is, for messages: the socket's path or the URL
        self.address = os.fspath(socket_path) if socket_path is not None else (url or "the core")
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

    async def whoami(self) -> Json:
        return cast(Json, await self._json("GET", "/v1/whoami"))

    async def summary(self) -> Json:
        return cast(Json, await self._json("GET", "/v1/summary"))

    async def health_targets(self) -> Json:
        return cast(Json, await self._json("GET", "/v1/health/targets"))

    async def alarms(self) -> Json:
        return cast(Json, await self._json("GET", "/v1/alarms"))

    async def instances(self, *, offset: int = 0, limit: int = 200, q: str = "", state: str = "",
                        sort: str = "aor", desc: bool = False) -> Json:
        """A page of the instance list (``{"total", "matched", "counts", "items"}``); ``limit=0`` =
        everything; ``q`` is the instance query language (``contract/query.py``); ``state`` one of
        active/inactive/proxied/off."""
        params = {"offset": offset, "limit": limit, "q": q, "state": state, "sort": sort,
                  "desc": "true" if desc else "false"}
        return cast(Json, await self._json("GET", "/v1/instances", params=params))

    async def stream_instances(self, on_rows: Callable[[list[Json]], None], *, offset: int = 0,
                               limit: int = 0, q: str = "", state: str = "", sort: str = "aor",
                               desc: bool = False) -> Json:
        """Like :meth:`instances` (default: everything), as NDJSON (``Accept: application/x-ndjson``):
        the rows are decoded as they arrive and handed to ``on_rows`` in batches, in order; returns
        the first line, ``{"total", "matched", "counts"}``. 100k rows are ~50 MB of JSON: decoded in
        one piece that blocks the caller's loop for a good part of a second, and only after the last
        byte; this way the decoding overlaps the transfer. A core that answers with one JSON
        document (it predates the NDJSON list) is read whole."""
        params = {"offset": offset, "limit": limit, "q": q, "state": state, "sort": sort,
                  "desc": "true" if desc else "false"}
        path = "/v1/instances"
        lines = RowLines(on_rows)
        try:
            async with self._http.stream("GET", path, params=_clean(params), headers={"Accept": NDJSON}) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                if not response.headers.get("content-type", "").startswith(NDJSON):
                    document = json.loads(await response.aread())
                    on_rows(document.pop("items", []))
                    return cast(Json, document)
                async for chunk in response.aiter_bytes():
                    lines.feed(chunk)
        except httpx.TimeoutException as exc:
            raise Unreachable(0, "timeout", f"GET {path}: {exc!r}") from exc
        except (httpx.TransportError, OSError) as exc:
            raise Unreachable(0, "unreachable", f"GET {path}: {exc!r}") from exc
        try:
            return lines.close(offset, limit)
        except ValueError as exc:
            raise OperatorApiError(200, "bad_response", f"GET {path}: {exc}") from exc

    async def instance(self, selector: str) -> Json:
        return cast(Json, await self._json("GET", f"/v1/instances/{_seg(selector)}"))

    async def calls(self) -> Json:
        return cast(Json, await self._json("GET", "/v1/calls"))

    async def call_trace(self, call_id: str) -> Json:
        return cast(Json, await self._json("GET", f"/v1/calls/{_seg(call_id)}/trace"))

    async def call_trace_text(self, call_id: str) -> str:
        return (await self._request("GET", f"/v1/calls/{_seg(call_id)}/trace.txt")).text

    async def call_trace_pcap(self, call_id: str) -> bytes:
        return (await self._request("GET", f"/v1/calls/{_seg(call_id)}/trace.pcap")).content

    async def pushes(self, *, limit: int = 200, selector: str | None = None) -> list[Json]:
        """Recent pushes, newest last."""
        return cast(list[Json], await self._json("GET", "/v1/pushes", params={"limit": limit, "selector": selector}))

    async def audit(self, *, limit: int = 200) -> list[Json]:
        """Recent audit rows, newest last."""
        return cast(list[Json], await self._json("GET", "/v1/audit", params={"limit": limit}))

    # ------------------------------------------------------------------ actions

    async def _action(self, selector: str, action: str) -> Json:
        return cast(Json, await self._json("POST", f"/v1/instances/{_seg(selector)}/actions/{action}",
                                           timeout=ACTION_TIMEOUT))

    async def action(self, selector: str, name: InstanceAction) -> Json:
        """Any instance action by its path name: ``take-over``, ``hand-back``, ``re-register``,
        ``test-push`` (→ ``{"push"}``), ``disable`` (→ ``{"instance", "row"}`` for the others)."""
        if name not in INSTANCE_ACTIONS:
            raise ValueError(f"unknown action {name!r}; one of {', '.join(INSTANCE_ACTIONS)}")
        return await self._action(selector, name)

    async def take_over(self, selector: str) -> Json:
        return await self._action(selector, "take-over")

    async def hand_back(self, selector: str) -> Json:
        return await self._action(selector, "hand-back")

    async def re_register(self, selector: str) -> Json:
        return await self._action(selector, "re-register")

    async def disable(self, selector: str) -> Json:
        return await self._action(selector, "disable")

    async def test_push(self, selector: str) -> Json:
        return await self._action(selector, "test-push")

    async def nodes(self) -> Json:
        return cast(Json, await self._json("GET", "/v1/nodes"))

    async def drain(self, node: str) -> Json:
        """Have ``node`` hand its instances over to the other nodes; answers the node list."""
        return cast(Json, await self._json("POST", f"/v1/nodes/{_seg(node)}/drain", timeout=ACTION_TIMEOUT))

    async def replay_push(self, push_id: str) -> Json:
        return cast(Json, await self._json("POST", f"/v1/pushes/{_seg(push_id)}/replay", timeout=ACTION_TIMEOUT))

    async def acknowledge_alarm(self, alarm_id: str) -> Json:
        return cast(Json, await self._json("POST", f"/v1/alarms/{_seg(alarm_id)}/acknowledge"))

    # ------------------------------------------------------------------ the event stream

    async def events(self, since: int | None = None, *, heartbeats: bool = False, reconnect: bool = True,
                     backoff_initial: float = 0.5, backoff_max: float = 10.0) -> AsyncGenerator[Json, None]:
        """Live events, oldest first. After a dropped connection it reconnects (exponential backoff
        with jitter) with ``since`` = the last seq seen, so nothing in the core's ring is missed.
        Lines of kind ``gap`` (events lost: reload snapshots) and ``overflow`` are passed through;
        heartbeats only with ``heartbeats=True``. 401/403 are not retried. Each line is decoded JSON;
        ``contract.codec.decode_stream_line`` makes it an event or a notice."""
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
                            event = json.loads(line)
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


class RowLines:
    """Reads the NDJSON instance list as its bytes arrive: the first line is the head (``total``,
    ``matched``, ``counts``), every other line one row.

    JSON never has a raw newline inside a value, so whatever arrived up to the last newline is whole
    lines: they are decoded with one ``json.loads`` (C speed) and handed to ``on_rows`` together.
    Malformed input raises ``ValueError`` (at the latest in :meth:`close`).
    """

    def __init__(self, on_rows: Callable[[list[Json]], None]) -> None:
        self.on_rows = on_rows
        self.head: Json | None = None
        self.rows = 0
        self._rest = b""

    def feed(self, data: bytes) -> None:
        cut = data.rfind(b"\n")
        if cut < 0:
            self._rest += data
            return
        whole, self._rest = self._rest + data[:cut], data[cut + 1:]
        self._lines(whole)

    def close(self, offset: int = 0, limit: int = 0) -> Json:
        """The head, once the last line is in; ``offset``/``limit`` of the request check the count."""
        rest, self._rest = self._rest, b""
        self._lines(rest)
        if self.head is None:
            raise ValueError("no head line")
        expected = max(0, int(self.head.get("matched", 0)) - offset)
        if limit:
            expected = min(expected, limit)
        if self.rows != expected:
            raise ValueError(f"the list ended after {self.rows} of {expected} rows")
        return self.head

    def _lines(self, whole: bytes) -> None:
        if self.head is None:
            first, _, whole = whole.lstrip().partition(b"\n")
            if not first:
                return
            head = json.loads(first)
            if not isinstance(head, dict):
                raise ValueError("the head line is not a JSON object")
            self.head = head
        lines = [line for line in whole.split(b"\n") if line.strip()]
        if lines:
            rows = json.loads(b"[" + b",".join(lines) + b"]")
            if not all(isinstance(row, dict) for row in rows):
                raise ValueError("a row is not a JSON object")
            self.rows += len(rows)
            self.on_rows(rows)


def _seg(value: str) -> str:
    """One path segment, percent-encoded (Call-IDs may contain '@', '/', '%' ...)."""
    return quote(value, safe="")


def _clean(params: dict[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    return {k: v for k, v in params.items() if v is not None}


def _ssl_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)
