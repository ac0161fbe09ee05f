"""Serve the app API with uvicorn inside the core's own event loop (no thread, no process).

We bind the listening socket ourselves and hand it to uvicorn, so port 0 works and the real port
is known before the first request. uvicorn's signal handling is switched off: SIGTERM belongs to
the core, which stops this server as part of its own orderly shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from sipis.tls_certs import certificate_fingerprint, ensure_self_signed

log = logging.getLogger(__name__)

DEFAULT_PORT = 24998
SELF_SIGNED_CERT = "app-api-cert.pem"
SELF_SIGNED_KEY = "app-api-key.pem"
GRACEFUL_TIMEOUT = 1  # seconds in-flight requests get on stop() before they are cancelled
START_TIMEOUT = 10.0


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:  # uvicorn >= 0.29
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        return None


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket we bound ourselves, so port 0 works and the real port is known."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ApiServer:
    """The app API listener. TLS is on unless ``tls=False``; without a configured certificate a
    self-signed one is created in ``state_dir`` (kept across restarts so apps can pin it)."""

    def __init__(self, app: ASGIApp, host: str = "0.0.0.0", port: int = DEFAULT_PORT, *,
                 tls: bool = True, certfile: str | Path | None = None,
                 keyfile: str | Path | None = None, state_dir: str | Path | None = None,
                 hostnames: list[str] | None = None, name: str = "app API") -> None:
        self.app = app
        self.name = name  # in log lines and the server task's name
        self.host = host
        self.port = port  # replaced by the bound port once started
        self.tls = tls
        self.certfile = Path(certfile) if certfile else None
        self.keyfile = Path(keyfile) if keyfile else None
        self.state_dir = Path(state_dir) if state_dir else None
        self.hostnames = hostnames
        self.fingerprint: str | None = None
        self._server: EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _tls_files(self) -> tuple[Path, Path]:
        if self.certfile and self.keyfile:
            return self.certfile, self.keyfile
        if self.certfile or self.keyfile:
            raise ValueError("configure both the certificate and the key file, or neither")
        if self.state_dir is None:
            raise ValueError("TLS without a certificate needs a state_dir for a self-signed one")
        cert, key = self.state_dir / SELF_SIGNED_CERT, self.state_dir / SELF_SIGNED_KEY
        ensure_self_signed(cert, key, self.hostnames or _default_hostnames(self.host))
        return cert, key

    def _bind(self) -> socket.socket:
        return bind_tcp(self.host, self.port)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("ApiServer already started")
        cert = key = None
        if self.tls:
            cert, key = self._tls_files()
            self.fingerprint = certificate_fingerprint(cert)
        config = uvicorn.Config(
            self.app, host=self.host, port=self.port, log_level="warning", log_config=None,
            lifespan="off", access_log=False, proxy_headers=False, server_header=False,
            timeout_graceful_shutdown=GRACEFUL_TIMEOUT,
            ssl_certfile=str(cert) if cert else None, ssl_keyfile=str(key) if key else None,
        )
        config.load()  # here, so a bad certificate fails start() instead of a background task
        if config.ssl is not None:
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        sock = self._bind()
        self.port = sock.getsockname()[1]
        self._server = EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=self.name.replace(" ", "-").lower())
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not self._server.started:
                    if self._task.done():
                        break
                    await asyncio.sleep(0.01)
        except TimeoutError:
            await self.stop()
            raise
        if not self._server.started:
            task, self._task, self._server = self._task, None, None
            sock.close()
            await task  # re-raises the startup failure
            raise RuntimeError(f"{self.name} server exited during startup")
        log.info("%s listening on %s%s", self.name, self.url,
                 f" (certificate SHA-256 {self.fingerprint})" if self.fingerprint else "")

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close the socket."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        await task


def _default_hostnames(host: str) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    wildcard = host in ("", "0.0.0.0", "::")
    for extra in ([] if wildcard else [host]) + [socket.gethostname()]:
        if extra and extra not in names:
            names.append(extra)
    return names
