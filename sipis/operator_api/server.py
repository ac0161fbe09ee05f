"""Serving the operator API in the core's loop: the unix socket (mode 0600, set before it accepts
anything) always, TCP when configured — plain HTTP on a loopback address, TLS with the app API's
certificate on any other. :func:`listener_app` tags each request with the listener it came in on
(session tokens and the local administrator are unix-socket only)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

import fastapi.routing
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from sipis.api.server import EmbeddedServer, bind_tcp
from sipis.config import Config
from sipis.listeners import opening
from sipis.operator_api import pages
from sipis.operator_api.auth import LISTENER_KEY
from sipis.operator_api.context import OperatorContext
from sipis.operator_api.routes import create_operator_app
from sipis.tls_certs import ensure_self_signed

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
GRACEFUL_TIMEOUT = 1


def listener_app(app: ASGIApp, listener: str) -> ASGIApp:
    """Wrap ``app`` so every request carries the listener it came in on (``unix`` or ``tcp``)."""

    async def tagged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, LISTENER_KEY: listener}
        await app(scope, receive, send)

    return tagged


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_unix_socket(path: Path) -> socket.socket:
    """Bind ``path`` (mode 0600 before anyone can connect); a stale socket file is replaced, a live
    one (another core) or a file that is not a socket is an error."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise OSError(f"{path} is in use by another process")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)  # before listen(): until then nobody can connect
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _local_get(app: ASGIApp, path: str, query: bytes) -> int:
    """GET ``path`` from ``app`` in process as the local administrator; the status (body dropped)."""
    status = 0
    done = asyncio.Event()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": [(b"host", b"localhost"), (b"x-operator", b"warm-up")], "client": None, "server": None}
    try:
        await app(scope, receive, send)  # type: ignore[arg-type]
    finally:
        done.set()
    return status


class OperatorServer:
    """Serves the operator API in the running loop: unix socket always, TCP when configured."""

    def __init__(self, ctx: OperatorContext, *, socket_path: Path | None, tcp_host: str | None = None,
                 tcp_port: int = 0, tls_files: tuple[Path, Path] | None = None,
                 app: FastAPI | None = None) -> None:
        self.ctx = ctx
        self.app = app or create_operator_app(ctx)
        self.socket_path = socket_path
        self.tcp_host = tcp_host
        self.tcp_port = tcp_port
        self.tls_files = tls_files
        self._servers: list[tuple[EmbeddedServer, asyncio.Task[None]]] = []

    @classmethod
    def from_config(cls, ctx: OperatorContext, config: Config) -> OperatorServer:
        """Unix socket always; TCP when configured — plain HTTP on a loopback address, TLS with the
        app API's certificate (generated in ``state_dir`` when none is configured) on any other."""
        operator, tcp = config.operator, config.operator.tcp_listen
        tls_files = None
        if tcp is not None and not is_loopback(tcp.host):
            api = config.api
            if api.tls_generate:
                ensure_self_signed(api.tls_cert, api.tls_key, [tcp.host, "localhost"])
            tls_files = (api.tls_cert, api.tls_key)
        return cls(ctx, socket_path=operator.socket, tcp_host=tcp.host if tcp is not None else None,
                   tcp_port=tcp.port if tcp is not None else 0, tls_files=tls_files)

    @property
    def tcp_url(self) -> str | None:
        if self.tcp_host is None:
            return None
        host = f"[{self.tcp_host}]" if ":" in self.tcp_host else self.tcp_host
        return f"{'https' if self.tls_files else 'http'}://{host}:{self.tcp_port}"

    async def start(self) -> None:
        try:
            if self.socket_path is not None:
                with opening("operator API", f"unix:{self.socket_path}"):
                    sock = bind_unix_socket(self.socket_path)
                await self._serve(listener_app(self.app, "unix"), sock, None, "unix")
                log.info("operator API on unix socket %s", self.socket_path)
            if self.tcp_host is not None:
                with opening("operator API", f"{self.tcp_host}:{self.tcp_port}"):
                    sock = bind_tcp(self.tcp_host, self.tcp_port)
                self.tcp_port = sock.getsockname()[1]
                await self._serve(listener_app(self.app, "tcp"), sock, self.tls_files, "tcp")
                log.info("operator API on %s", self.tcp_url)
            await self.warm_up()
        except BaseException:
            await self.stop()
            raise

    async def warm_up(self) -> None:
        """Do now, at start-up, what the first console's requests would otherwise do inside the
        loop (measured 5–10 ms stalls on the first login): FastAPI reads each endpoint's source
        location once (``inspect.getsourcelines``), anyio imports its asyncio backend for the first
        streamed response. One summary and one streamed instance page, in process, answers dropped."""
        extract = getattr(fastapi.routing, "_extract_endpoint_context", None)  # private: only if there
        for route in self.app.routes:
            endpoint = getattr(route, "endpoint", None)
            if callable(extract) and endpoint is not None:
                with contextlib.suppress(Exception):
                    extract(endpoint)
        for path, query in (("/v1/summary", b""), ("/v1/instances", b"limit=%d" % (pages.STREAM_ROWS_OVER + 1))):
            with contextlib.suppress(Exception):
                await _local_get(listener_app(self.app, "unix"), path, query)

    async def _serve(self, app: ASGIApp, sock: socket.socket, tls: tuple[Path, Path] | None, name: str) -> None:
        config = uvicorn.Config(
            app, log_level="warning", log_config=None, lifespan="off", access_log=False, proxy_headers=False,
            server_header=False, timeout_graceful_shutdown=GRACEFUL_TIMEOUT,
            ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None,
        )
        try:
            config.load()
        except BaseException:
            sock.close()
            raise
        if config.ssl is not None:
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        server = EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"operator-api-{name}")
        self._servers.append((server, task))
        async with asyncio.timeout(START_TIMEOUT):
            while not server.started:
                if task.done():
                    sock.close()
                    await task
                    raise RuntimeError(f"operator API ({name}) exited during start-up")
                await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self.ctx.close_streams()
        servers, self._servers = self._servers, []
        for server, _ in servers:
            server.should_exit = True
        for _, task in servers:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        if self.socket_path is not None and servers:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                    self.socket_path.unlink()
