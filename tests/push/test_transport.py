"""The push providers' HTTP/1.1 transport (``sipis.push.transport``): on the wire before the first
await, one write per request, a bounded and warm pool, httpx's errors and semantics — against a raw
loopback HTTP server (exact bytes) and the lab's HTTPS mediator (TLS)."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from lab.push_servers import MediatorServer
from sipis.config import AcrobitsPush, WebhookPush
from sipis.push.acrobits import AcrobitsProvider
from sipis.push.eager import start_eagerly
from sipis.push.http import build_client, fast_transport, post
from sipis.push.transport import Http11Transport
from tests.push import push_request


class RawServer:
    """Plain HTTP on loopback; ``answer(request_bytes) -> response bytes | None`` (None: close)."""

    def __init__(self, answer: Callable[[bytes], bytes | None] | None = None) -> None:
        self.answer = answer or (lambda _: OK_RESPONSE)
        self.requests: list[bytes] = []
        self.reads: list[bytes] = []  # every chunk as read: one request should arrive in one chunk
        self.connections = 0
        self.peers: list[object] = []  # the client's address per request: which connection carried it
        self.delay = 0.0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}/push?x=1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        buffer = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                self.reads.append(chunk)
                buffer += chunk
                while b"\r\n\r\n" in buffer:
                    head, _, rest = buffer.partition(b"\r\n\r\n")
                    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    if len(rest) < length:
                        break
                    request, buffer = head + b"\r\n\r\n" + rest[:length], rest[length:]
                    self.requests.append(request)
                    self.peers.append(writer.get_extra_info("peername"))
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    response = self.answer(request)
                    if response is None:
                        writer.close()
                        return
                    writer.write(response)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def close_connections(self) -> None:
        for writer in self._writers:
            writer.close()
        await asyncio.sleep(0.05)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


OK_RESPONSE = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    server = RawServer()
    await server.start()
    yield server
    await server.stop()


def client_for(limits: httpx.Limits | None = None, timeout: float = 2.0,
               ssl_context: ssl.SSLContext | None = None) -> httpx.AsyncClient:
    transport = Http11Transport(ssl_context=ssl_context, limits=limits or httpx.Limits(max_connections=8))
    return httpx.AsyncClient(transport=transport, timeout=timeout)


def pool(client: httpx.AsyncClient) -> Http11Transport:
    transport = client._transport
    assert isinstance(transport, Http11Transport)
    return transport


async def test_request_is_one_write_and_the_connection_is_reused(raw: RawServer) -> None:
    async with client_for() as client:
        for n in range(3):
            response = await client.post(raw.url, json={"n": n}, headers={"X-Tenant": "acme"})
            assert response.status_code == 200 and response.json() == {"ok": True}
            assert response.http_version == "HTTP/1.1" and response.reason_phrase == "OK"
        assert raw.connections == 1 and pool(client).connects == 1 and pool(client).idle_connections() == 1
    assert raw.reads == raw.requests  # head and body arrived together, each request in one segment
    head, _, body = raw.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /push?x=1 HTTP/1.1\r\n")
    assert b"\r\nX-Tenant: acme" in head and b"\r\nContent-Length: 7" in head and body == b'{"n":0}'


async def test_on_the_wire_before_the_first_await(raw: RawServer) -> None:
    seen: list[str] = []

    async def trace(name: str, info: dict[str, Any]) -> None:
        seen.append(name)

    async with client_for() as client:
        await client.get(raw.url)  # a warm, idle connection
        started = start_eagerly(client.post(raw.url, content=b"x", extensions={"trace": trace}))
        # nothing ran on the loop yet, and the whole request has been written
        assert seen == ["http11.send_request_headers.started", "http11.send_request_headers.complete",
                        "http11.send_request_body.started", "http11.send_request_body.complete",
                        "http11.receive_response_headers.started"]
        response = await started
        assert response.status_code == 200 and seen[-1] == "http11.receive_response_headers.complete"
        seen.clear()
        cold = Http11Transport()
        async with httpx.AsyncClient(transport=cold) as fresh:
            await fresh.get(raw.url, extensions={"trace": trace})
        assert seen[:2] == ["connection.connect_tcp.started", "connection.connect_tcp.complete"]


async def test_started_eagerly_outside_any_task_with_a_cold_pool(raw: RawServer) -> None:
    loop = asyncio.get_running_loop()
    async with client_for() as client:
        started: asyncio.Future[asyncio.Future[httpx.Response]] = loop.create_future()
        # as the INVITE handler does it: from a protocol callback, where no task is running
        loop.call_soon(lambda: started.set_result(start_eagerly(client.get(raw.url))))
        response = await (await started)
        assert response.status_code == 200 and pool(client).connects == 1


async def test_pool_is_bounded_and_takes_turns(raw: RawServer) -> None:
    raw.delay = 0.05
    async with client_for(httpx.Limits(max_connections=2)) as client:
        answers = await asyncio.gather(*(client.get(raw.url) for _ in range(6)))
        assert all(a.status_code == 200 for a in answers)
        assert raw.connections == 2 and pool(client).connections == 2 and pool(client).waits == 4
        raw.delay = 0.0
        await client.get(raw.url)
        await client.get(raw.url)
        # least recently used first: both connections stay in use (and warm), none is opened anew
        assert raw.connections == 2 and raw.peers[-1] != raw.peers[-2]


async def test_pool_timeout_when_every_connection_is_busy(raw: RawServer) -> None:
    raw.delay = 0.5
    async with client_for(httpx.Limits(max_connections=1)) as client:
        first = asyncio.ensure_future(client.get(raw.url))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await client.get(raw.url, timeout=httpx.Timeout(2.0, pool=0.05))
        assert (await first).status_code == 200
        assert (await client.get(raw.url)).status_code == 200  # the waiter that gave up left no trace
        assert pool(client).connections == 1


async def test_expired_and_server_closed_connections_are_replaced(raw: RawServer) -> None:
    async with client_for(httpx.Limits(keepalive_expiry=0.05)) as client:
        await client.get(raw.url)
        await asyncio.sleep(0.1)
        await client.get(raw.url)  # the idle one expired
        assert raw.connections == 2
        await raw.close_connections()  # the server drops the idle connection
        assert pool(client).idle_connections() == 0
        assert (await client.get(raw.url)).status_code == 200
        assert raw.connections == 3


async def test_connection_close_chunked_and_gzip_answers() -> None:
    body = gzip.compress(b'{"code":200}')
    answers = iter([
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
    ])
    server = RawServer(lambda _: next(answers))
    await server.start()
    try:
        async with client_for() as client:
            assert (await client.get(server.url)).text == "hi"
            assert (await client.get(server.url)).text == "abcde"
            assert (await client.get(server.url)).json() == {"code": 200}
            assert server.connections == 2  # the first connection was closed as the server asked
    finally:
        await server.stop()


async def test_errors_are_httpx_errors(raw: RawServer) -> None:
    async with client_for(timeout=0.2) as client:
        raw.delay = 1.0
        with pytest.raises(httpx.ReadTimeout):
            await client.get(raw.url)
        raw.delay = 0.0
        raw.answer = lambda _: None  # hang up instead of answering
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(raw.url)
        raw.answer = lambda _: b"NOT HTTP\r\n\r\n"
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(raw.url)
        url = raw.url
        await raw.stop()
        await asyncio.sleep(0.05)  # the client sees its idle connection closed
        with pytest.raises(httpx.ConnectError):
            await client.get(url)
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.get("ftp://127.0.0.1/")
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(url, headers={"X-Bad": "a\r\nInjected: 1"})


async def test_a_cancelled_request_does_not_leak_its_connection(raw: RawServer) -> None:
    raw.delay = 0.5
    async with client_for(httpx.Limits(max_connections=1)) as client:
        request = asyncio.ensure_future(client.get(raw.url))
        await asyncio.sleep(0.05)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        raw.delay = 0.0
        assert (await client.get(raw.url, timeout=1.0)).status_code == 200


async def test_tls_to_the_mediator_and_the_response_cycle_is_broken(tmp_path: Path) -> None:
    async with MediatorServer(tmp_path) as mediator:
        provider = AcrobitsProvider(AcrobitsPush(name="pnm", url=mediator.send_url, ca_file=mediator.ca_file,
                                                 timeout=2.0))
        try:
            assert provider.eager_send and fast_transport(provider.client)
            assert (await provider.send(push_request())).accepted
            exchange = await post(provider.client, mediator.send_url, json_body={"verb": "x"})
            assert exchange.response is not None
            assert isinstance(exchange.response.stream, httpx.ByteStream)  # no response ↔ stream cycle left
        finally:
            await provider.close()
        untrusted = AcrobitsProvider(AcrobitsPush(name="pnm", url=mediator.send_url, timeout=2.0))
        try:
            outcome = await untrusted.send(push_request())  # self-signed: refused by the default store
            assert outcome.error is not None and outcome.error.startswith("connection failed")
        finally:
            await untrusted.close()


async def test_http2_and_proxies_keep_httpx_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    config = WebhookPush(name="h", url="https://127.0.0.1:1/", timeout=1.5)
    for http2, proxy, fast in ((False, None, True), (True, None, False), (False, "http://proxy:3128", False)):
        if proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy)
        client = build_client(config, http2=http2)
        try:
            assert fast_transport(client) is fast
        finally:
            await client.aclose()


async def test_connect_timeout_cancels_the_attempt() -> None:
    from sipis.push.transport import _finished

    slow = asyncio.ensure_future(asyncio.sleep(10))
    with pytest.raises(TimeoutError):
        await _finished(slow, 0.05)
    assert slow.cancelled()
    quick = asyncio.ensure_future(asyncio.sleep(0, result="ok"))
    assert await _finished(quick, 1.0) == "ok"
