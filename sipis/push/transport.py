"""A lean HTTP/1.1 transport for the push providers' :class:`httpx.AsyncClient`.

Why not httpx's own (httpcore over anyio): a push has to be on the wire within milliseconds of the
INVITE (issue 4: p99 ≤ 5 ms at 100 calls/s), and httpcore's asyncio path yields to the event loop
four times before the last byte of a request is written (pool event, connection lock, one
checkpoint per socket write) and writes headers and body with two separate ``send`` calls, each of
which may wake the provider's server. Under load every yield waits behind whatever else the loop
has queued. This transport:

* writes the whole request (head and body, serialised by h11) with **one** ``transport.write`` on
  asyncio's own (SSL) transport, **without awaiting anything** first when a pooled connection is
  idle: the request is on the wire by the time the caller's coroutine first suspends, so a push
  started eagerly (:mod:`sipis.push.eager`) goes out inside the INVITE handler;
* keeps httpx's semantics otherwise: a bounded pool (``max_connections`` over all origins,
  ``max_keepalive_connections`` idle, ``keepalive_expiry``), the connect/read/write/pool timeouts
  from the request's ``timeout`` extension, httpx's exceptions (``ConnectError``, ``ReadTimeout``,
  ``RemoteProtocolError`` …), the response streamed through h11 (httpx decodes ``Content-Encoding``
  as usual), ``sni_hostname``, and httpcore's ``trace`` extension events
  (``connection.connect_tcp.*``, ``http11.send_request_headers.*``, ``http11.send_request_body.*``,
  ``http11.receive_response_headers.*``) for whoever measures.

HTTP/1.1 only; no proxies (:func:`sipis.push.http.build_client` falls back to httpx's transport
when a proxy is configured in the environment, and for HTTP/2).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import h11
import httpx

T = TypeVar("T")
Origin = tuple[str, str, int]  # scheme, host, port
Trace = Callable[[str, dict[str, Any]], Awaitable[None]]

DEFAULT_PORTS = {"http": 80, "https": 443}
_CLOSED_MESSAGE = "Server disconnected without sending a response."


class _Connection(asyncio.Protocol):
    """One TCP (TLS) connection to one origin and its h11 state."""

    def __init__(self, pool: Http11Transport, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.h11 = h11.Connection(h11.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.in_use = True  # a new connection is opened for the request that asked for it
        self.idle_since = 0.0
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.in_use:  # bytes on an idle connection: nothing to pair them with, drop it
            self.close()
            return
        self.h11.receive_data(data)
        self._wake()

    def eof_received(self) -> bool | None:
        if self.in_use:
            self.h11.receive_data(b"")
        self._lost(None)
        return False  # let asyncio close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # ------------------------------------------------------------------ used by the transport

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise httpx.WriteError("connection closed")
        self.transport.write(data)

    async def drain(self, timeout: float | None) -> None:
        if not self._writing_paused:
            return
        self._drain = drain = asyncio.get_running_loop().create_future()
        try:
            await _wait(drain, timeout, httpx.WriteTimeout)
        finally:
            self._drain = None
        if self.closed:
            raise httpx.WriteError("connection closed")

    async def next_event(self, timeout: float | None) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event of the response, waiting for data as needed."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]  # mypy does not narrow sentinel types
            if self.closed:  # closed without an EOF h11 could read (reset, or closed by us)
                if self.error is not None:
                    raise httpx.ReadError(str(self.error) or type(self.error).__name__)
                raise httpx.RemoteProtocolError(_CLOSED_MESSAGE)
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await _wait(waiter, timeout, httpx.ReadTimeout)
            finally:
                self._waiter = None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._lost(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._lost(None)

    # ------------------------------------------------------------------ internals

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _lost(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = exc
        self._wake()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        self.pool._connection_closed(self)


class _ResponseStream(httpx.AsyncByteStream):
    """The body of one response, read through h11; gives the connection back when closed."""

    def __init__(self, pool: Http11Transport, connection: _Connection, timeout: float | None) -> None:
        self._pool = pool
        self._connection = connection
        self._timeout = timeout
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._done:
            return
        try:
            while True:
                event = await self._connection.next_event(self._timeout)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError("connection closed in the middle of the response")
        except BaseException:
            self._finish(reusable=False)
            raise

    async def aclose(self) -> None:
        self._finish(reusable=True)

    def _finish(self, *, reusable: bool) -> None:
        if not self._done:
            self._done = True
            self._pool._release(self._connection, reusable=reusable)


class Http11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio's transports; see the module docstring."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits()
        self.ssl_context = ssl_context if ssl_context is not None else httpx.create_ssl_context()
        self.ssl_context.set_alpn_protocols(["http/1.1"])
        self.max_connections = limits.max_connections
        self.max_keepalive = limits.max_keepalive_connections
        self.keepalive_expiry = limits.keepalive_expiry
        #: idle connections per origin, least recently used first
        self._idle: dict[Origin, list[_Connection]] = {}
        self._connections: set[_Connection] = set()
        self._opening = 0
        #: requests waiting for a connection (pool full): a future per request, FIFO
        self._waiting: deque[tuple[Origin, asyncio.Future[_Connection | None]]] = deque()
        self._closed = False
        #: new connections opened (TCP + TLS), and requests that had to wait for a connection
        #: (every one busy, the pool full): for the console, benchmarks and tests
        self.connects = 0
        self.waits = 0

    # ------------------------------------------------------------------ httpx interface

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        if not url.raw_host:
            raise httpx.UnsupportedProtocol("request URL has no host", request=request)
        # the ASCII (IDNA-encoded) host, as httpcore connects and sends SNI
        origin: Origin = (scheme, url.raw_host.decode("ascii"), url.port or DEFAULT_PORTS[scheme])
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        trace: Trace | None = request.extensions.get("trace")
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        try:
            head = h11.Request(method=request.method, target=url.raw_path, headers=request.headers.raw)
        except h11.LocalProtocolError as exc:  # e.g. a CR/LF in a header value
            raise httpx.LocalProtocolError(str(exc), request=request) from exc

        connection = await self._acquire(origin, timeouts, request, trace)
        try:
            try:
                data = connection.h11.send(head) or b""
                if body:
                    data += connection.h11.send(h11.Data(data=body)) or b""
                data += connection.h11.send(h11.EndOfMessage()) or b""
            except h11.LocalProtocolError as exc:
                raise httpx.LocalProtocolError(str(exc), request=request) from exc
            if trace is not None:
                await trace("http11.send_request_headers.started", {"request": request})
            connection.write(data)  # head and body in one write: one segment, one wake-up of the server
            if trace is not None:
                await trace("http11.send_request_headers.complete", {})
                await trace("http11.send_request_body.started", {"request": request})
            await connection.drain(timeouts.get("write"))
            if trace is not None:
                await trace("http11.send_request_body.complete", {})
                await trace("http11.receive_response_headers.started", {"request": request})
            read_timeout = timeouts.get("read")
            while True:
                event = await connection.next_event(read_timeout)
                if isinstance(event, h11.Response):
                    break
                if isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError(_CLOSED_MESSAGE)
                if not isinstance(event, h11.InformationalResponse):  # pragma: no cover - h11 guarantees
                    raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} before the response")
            if trace is not None:
                await trace("http11.receive_response_headers.complete",
                            {"return_value": (event.http_version, event.status_code, event.reason)})
        except BaseException:
            self._release(connection, reusable=False)
            raise
        return httpx.Response(
            status_code=event.status_code, headers=event.headers.raw_items(),
            stream=_ResponseStream(self, connection, read_timeout),
            extensions={"http_version": b"HTTP/" + event.http_version, "reason_phrase": event.reason},
        )

    async def aclose(self) -> None:
        self._closed = True
        while self._waiting:
            _, waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(httpx.PoolTimeout("the client was closed"))
        for connection in list(self._connections):
            connection.close()
        self._idle.clear()

    # ------------------------------------------------------------------ the pool

    @property
    def connections(self) -> int:
        """Open (or opening) connections."""
        return len(self._connections) + self._opening

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def _acquire(self, origin: Origin, timeouts: dict[str, float | None], request: httpx.Request,
                       trace: Trace | None) -> _Connection:
        """A connection for one request: an idle one at once (no await), else a new one, else the
        first one given back (``pool`` timeout)."""
        if self._closed:
            raise httpx.PoolTimeout("the client was closed")
        connection = self._take_idle(origin)
        if connection is not None:
            return connection
        if self.max_connections is not None and self.connections >= self.max_connections:
            self._close_one_idle()  # an idle connection to another origin makes room
        if self.max_connections is None or self.connections < self.max_connections:
            return await self._connect(origin, timeouts, request, trace)
        self.waits += 1
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        entry = (origin, waiter)
        self._waiting.append(entry)
        try:
            await _wait(waiter, timeouts.get("pool"), httpx.PoolTimeout)
        except BaseException:
            with contextlib.suppress(ValueError):
                self._waiting.remove(entry)
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                given = waiter.result()  # handed over just as we gave up: pass it on
                if given is not None:
                    self._release(given, reusable=True)
                else:
                    self._slot_freed()
            raise
        given = waiter.result()
        if given is not None:
            return given
        return await self._connect(origin, timeouts, request, trace)  # a slot was freed for us

    def _take_idle(self, origin: Origin) -> _Connection | None:
        """The idle connection used least recently: taking turns keeps every connection a burst
        opened warm (a new one costs a TCP + TLS handshake), instead of letting all but the most
        recent one expire."""
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop(0)
            if connection.closed:
                continue
            if self.keepalive_expiry is not None and now - connection.idle_since > self.keepalive_expiry:
                connection.close()
                continue
            connection.in_use = True
            return connection
        return None

    def _close_one_idle(self) -> None:
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is not None:
            oldest.close()

    async def _connect(self, origin: Origin, timeouts: dict[str, float | None], request: httpx.Request,
                       trace: Trace | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        timeout = timeouts.get("connect")
        tls = scheme == "https"
        sni = request.extensions.get("sni_hostname")
        server_hostname = (sni.decode("ascii") if isinstance(sni, bytes) else sni) or host
        self._opening += 1
        try:
            if trace is not None:
                await trace("connection.connect_tcp.started", {"host": host, "port": port})
            # A task of its own and a plain timer, not asyncio.wait_for/timeout: those need to run
            # inside a task (3.12+), and this may run eagerly, outside of any (sipis.push.eager).
            connecting = asyncio.ensure_future(loop.create_connection(
                lambda: _Connection(self, origin), host, port, ssl=self.ssl_context if tls else None,
                server_hostname=server_hostname if tls else None,
                ssl_handshake_timeout=timeout if tls and timeout else None))
            try:
                _, connection = await _finished(connecting, timeout)
            except TimeoutError as exc:
                raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
            except (OSError, ssl.SSLError) as exc:  # SSLError is an OSError; kept for clarity
                raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
            except BaseException:  # cancelled: a connection made just then must not linger
                if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
                    connecting.result()[0].close()
                raise
        finally:
            self._opening -= 1
        if self._closed:
            connection.abort()
            raise httpx.PoolTimeout("the client was closed")
        self._connections.add(connection)
        self.connects += 1
        if trace is not None:
            await trace("connection.connect_tcp.complete", {"return_value": None})
        return connection

    def _release(self, connection: _Connection, *, reusable: bool) -> None:
        """The request on ``connection`` is over: keep it for the next one or close it."""
        if not connection.in_use:
            return
        connection.in_use = False
        h = connection.h11
        if reusable and not connection.closed and not self._closed \
                and h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            for index, (origin, waiter) in enumerate(self._waiting):
                if origin == connection.origin and not waiter.done():
                    del self._waiting[index]
                    connection.in_use = True
                    waiter.set_result(connection)
                    return
            idle = self._idle.setdefault(connection.origin, [])
            connection.idle_since = time.monotonic()
            idle.append(connection)
            if self.max_keepalive is not None and self.idle_connections() > self.max_keepalive:
                self._close_one_idle()
            if self._waiting:  # someone waits for another origin: our idle one has to make room
                self._close_one_idle()
            return
        connection.close()

    def _connection_closed(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.origin)
        if idle is not None and connection in idle:
            idle.remove(connection)
        if connection in self._connections:
            self._connections.discard(connection)
            self._slot_freed()

    def _slot_freed(self) -> None:
        """A connection went away: the first waiting request may open its own."""
        while self._waiting:
            _, waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


async def _finished(task: asyncio.Future[T], timeout: float | None) -> T:
    """The result of ``task``; after ``timeout`` seconds it is cancelled and TimeoutError raised.
    Cancelling the caller cancels the task too."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    task.add_done_callback(wake)
    handle = loop.call_later(timeout, wake) if timeout is not None else None
    try:
        await waiter
    except BaseException:
        task.cancel()
        raise
    finally:
        if handle is not None:
            handle.cancel()
        task.remove_done_callback(wake)
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task  # let it close what it opened
        raise TimeoutError
    return task.result()


def _timed_out(future: asyncio.Future[Any], error: type[httpx.TimeoutException]) -> None:
    if not future.done():
        future.set_exception(error("timed out"))


async def _wait(future: asyncio.Future[Any], timeout: float | None, error: type[httpx.TimeoutException]) -> None:
    """Wait for ``future``; after ``timeout`` seconds it fails with ``error``."""
    if timeout is None:
        await future
        return
    handle = asyncio.get_running_loop().call_later(timeout, _timed_out, future, error)
    try:
        await future
    finally:
        handle.cancel()
