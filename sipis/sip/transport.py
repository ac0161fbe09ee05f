"""SIP transports on asyncio: UDP, TCP and TLS, as client and listener.

A *flow* is one path to one peer (RFC 5626 §3): a UDP (local socket, remote address) pair or one
TCP/TLS connection. The :class:`TransportLayer` keeps a flow table keyed by (transport, remote
address), so a request arriving on a connection our REGISTER opened is answered on that same
connection, and a REGISTER refresh reuses it. Stream framing is done by :class:`StreamFramer`; a
framing error closes only the connection it happened on. Malformed requests get ``400`` where a
response can be built; nothing a peer sends can raise out of a protocol callback.

Inbound TCP/TLS connections are capped per source address and in total (refusals are counted), and
one that completes no message within ``idle_timeout`` is closed; the flows we open (to our
registrars) never are.

Flows we opened send RFC 5626 CRLF keep-alives and expect the single-CRLF pong; a flow that stops
answering, or that closes, is reported to the layer above through ``on_flow_closed`` so it can
re-register (which reconnects, with a per-destination backoff on connect failures).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

from sipis.sip.framing import Frame, FramingError, KeepAlivePing, StreamFramer
from sipis.sip.message import (
    DEFAULT_LIMITS,
    Headers,
    Limits,
    Message,
    Request,
    SipParseError,
    make_response,
    parse_message,
    split_list,
)

log = logging.getLogger(__name__)

TransportName = Literal["udp", "tcp", "tls"]
TRANSPORTS: tuple[TransportName, ...] = ("udp", "tcp", "tls")
DEFAULT_PORTS: dict[str, int] = {"udp": 5060, "tcp": 5060, "tls": 5061}
#: RFC 5626 §4.4.1: a pong must come within 10 s of a ping or the flow has failed.
PONG_TIMEOUT = 10.0
#: Junk (malformed messages, framing errors) is logged once per source address per this many seconds.
JUNK_LOG_INTERVAL = 60.0
#: Sources tracked for that at most; beyond them, the rest share one line per interval.
JUNK_LOG_SOURCES = 256


class TransportError(OSError):
    """Sending or connecting failed; the transaction layer maps it to ``503``."""


Address = tuple[str, int]


@dataclass(frozen=True)
class ListenSpec:
    transport: TransportName
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenSpec:
        """``udp:127.0.0.1:5070`` or ``tls:[::1]:5071``."""
        transport, _, hostport = text.partition(":")
        transport = transport.lower()
        if transport not in TRANSPORTS:
            raise ValueError(f"listen spec {text!r}: transport must be udp, tcp or tls")
        host, sep, port = hostport.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"listen spec {text!r}: expected transport:host:port")
        return cls(transport, host, int(port))  # type: ignore[arg-type]

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


@dataclass(frozen=True)
class TlsSettings:
    """TLS for client connections (towards the PBX) and the TLS listener."""

    ca_file: str | None = None
    verify: bool = True
    client_cert: str | None = None
    client_key: str | None = None
    server_cert: str | None = None
    server_key: str | None = None

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        if not self.server_cert:
            raise ValueError("a TLS listener needs a certificate and key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server_cert, self.server_key)
        return ctx


@dataclass(eq=False)
class Flow:
    """One path to a peer. ``send`` never blocks; it raises :class:`TransportError` on a dead flow."""

    transport: TransportName
    local: Address
    remote: Address
    outbound: bool
    _write: Callable[[bytes], None] = field(repr=False)
    _close: Callable[[], None] = field(repr=False)
    alive: bool = True
    #: since when we wait for traffic on this flow, None when something came since: the last ping's
    #: time on flows we opened (its pong is due), the idle watch's start on inbound connections
    #: (a complete message is due). Every message clears it, so watching costs no work per message.
    ping_sent_at: float | None = None
    last_ping_at: float = 0.0

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.transport, self.remote[0], self.remote[1])

    @property
    def via_transport(self) -> str:
        return self.transport.upper()

    def send(self, data: bytes) -> None:
        if not self.alive:
            raise TransportError(f"{self} is closed")
        try:
            self._write(data)
        except (OSError, RuntimeError) as exc:
            raise TransportError(f"send on {self} failed: {exc}") from exc

    def close(self) -> None:
        if self.alive:
            self._close()

    def __str__(self) -> str:
        return f"{self.transport}:{self.local[0]}:{self.local[1]}->{self.remote[0]}:{self.remote[1]}"


class JunkLog:
    """Log lines about junk, at most one per source address per interval, each saying how many
    like it were held back since the last one: a flood costs a bounded amount of log."""

    def __init__(self, now: Callable[[], float], interval: float = JUNK_LOG_INTERVAL,
                 max_sources: int = JUNK_LOG_SOURCES) -> None:
        self._now = now
        self.interval = interval
        self.max_sources = max_sources
        #: source → [start of its interval, lines held back in it]
        self._sources: dict[str, list[float]] = {}

    def info(self, source: str, message: str, *args: object) -> None:
        now = self._now()
        entry = self._sources.get(source)
        if entry is None:
            if len(self._sources) >= self.max_sources:
                self._expire(now)
                if len(self._sources) >= self.max_sources:
                    source = "other sources"
                    entry = self._sources.get(source)
            if entry is None:
                entry = self._sources[source] = [now, 0.0]
                log.info(message, *args)
                return
        if now - entry[0] < self.interval:
            entry[1] += 1
            return
        held_back = int(entry[1])
        entry[0], entry[1] = now, 0.0
        if held_back:
            log.info(message + " (and %d more from %s in the last %.0f s)", *args, held_back, source,
                     self.interval)
        else:
            log.info(message, *args)

    def _expire(self, now: float) -> None:
        """Forget the sources whose interval is over (saying what each held back)."""
        for source, (start, held_back) in list(self._sources.items()):
            if now - start >= self.interval:
                del self._sources[source]
                if held_back:
                    log.info("%d more junk log lines from %s held back in %.0f s", held_back, source,
                             self.interval)


MessageHandler = Callable[[Message, Flow], None]
FlowClosedHandler = Callable[[Flow, str], None]


class TransportLayer:
    """Listeners, outbound connections and the flow table."""

    def __init__(
        self,
        on_message: MessageHandler,
        on_flow_closed: FlowClosedHandler | None = None,
        *,
        tls: TlsSettings | None = None,
        limits: Limits = DEFAULT_LIMITS,
        keepalive_interval: float = 30.0,
        connect_timeout: float = 5.0,
        backoff_base: float = 1.0,
        # at most the registration engine's probe interval (sipis/engine.py PROBE_INTERVAL): a
        # longer wait would fail the probes of a dead registrar without trying, and its return
        # would go unnoticed for up to that long
        backoff_max: float = 5.0,
        pong_timeout: float = PONG_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        idle_timeout: float = 30.0,
        max_connections: int = 10000,
        max_connections_per_source: int = 100,
    ) -> None:
        self._on_message = on_message
        self._on_flow_closed = on_flow_closed
        self.tls = tls or TlsSettings()
        self.limits = limits
        self.keepalive_interval = keepalive_interval
        self.connect_timeout = connect_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.pong_timeout = pong_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        #: inbound TCP/TLS connections, and how many come from each source address
        self._inbound: set[_StreamProtocol] = set()
        self._inbound_per_source: dict[str, int] = {}
        self._flows: dict[tuple[str, str, int], Flow] = {}
        self._udp_sockets: list[_UdpProtocol] = []
        self._servers: list[asyncio.Server] = []
        self._connecting: dict[tuple[str, str, int], asyncio.Future[Flow]] = {}
        self._connect_failures: dict[tuple[str, str, int], tuple[int, float]] = {}
        self._client_ctx: ssl.SSLContext | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self.listening: list[ListenSpec] = []
        self.stats = {"received": 0, "sent": 0, "parse_errors": 0, "framing_errors": 0,
                      "connections_refused": 0, "idle_closed": 0}
        self.junk_log = JunkLog(clock)

    # ------------------------------------------------------------------ lifecycle

    async def listen(self, spec: ListenSpec) -> ListenSpec:
        """Open a listener; returns the spec with the real port (port 0 = any free port)."""
        loop = asyncio.get_running_loop()
        if spec.transport == "udp":
            protocol = await self._open_udp(spec.host, spec.port)
            port = protocol.local[1]
        else:
            ctx = self.tls.server_context() if spec.transport == "tls" else None
            server = await loop.create_server(
                lambda: _StreamProtocol(self, spec.transport, outbound=False),
                spec.host, spec.port, ssl=ctx, reuse_address=True,
            )
            self._servers.append(server)
            port = server.sockets[0].getsockname()[1]
        real = ListenSpec(spec.transport, spec.host, port)
        self.listening.append(real)
        self._start_keepalive()
        return real

    def _start_keepalive(self) -> None:
        if self._keepalive_task is None and (self.keepalive_interval > 0 or self.idle_timeout > 0):
            self._keepalive_task = asyncio.create_task(self._keepalive_loop(), name="sip-keepalive")

    async def close(self) -> None:
        if self._keepalive_task:
            self._keepalive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive_task
            self._keepalive_task = None
        for server in self._servers:
            server.close()
        for flow in list(self._flows.values()):
            flow.close()
        for udp in self._udp_sockets:
            udp.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
        self._udp_sockets.clear()
        self._flows.clear()

    # ------------------------------------------------------------------ outbound

    def local_address(self, transport: TransportName) -> Address | None:
        """Where we listen for this transport (for Contact/Via), if we do."""
        for spec in self.listening:
            if spec.transport == transport:
                return (spec.host, spec.port)
        return None

    def find_flow(self, transport: str, host: str, port: int) -> Flow | None:
        flow = self._flows.get((transport, host, port))
        return flow if flow is not None and flow.alive else None

    async def flow_to(self, transport: TransportName, host: str, port: int | None = None, *,
                      server_name: str | None = None) -> Flow:
        """An alive flow to this peer: the existing one, or a new connection (UDP: our socket)."""
        port = port or DEFAULT_PORTS[transport]
        host = await _resolve_literal(host)
        key = (transport, host, port)
        existing = self.find_flow(transport, host, port)
        if existing is not None:
            return existing
        if transport == "udp":
            return await self._udp_flow(host, port)
        pending = self._connecting.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        self._check_backoff(key)
        future: asyncio.Future[Flow] = asyncio.get_running_loop().create_future()
        self._connecting[key] = future
        try:
            flow = await self._connect(transport, host, port, server_name)
        except asyncio.CancelledError:
            if not future.done():  # others waiting on this attempt fail; the peer is not to blame
                future.set_exception(TransportError(f"connect {transport}:{host}:{port} cancelled"))
                future.exception()
            raise
        except BaseException as exc:
            self._record_connect_failure(key)
            error = exc if isinstance(exc, TransportError) else TransportError(
                f"connect {transport}:{host}:{port} failed: {exc or type(exc).__name__}")
            if not future.done():
                future.set_exception(error)
                future.exception()  # mark retrieved: nobody else may be waiting
            raise error from exc
        finally:
            self._connecting.pop(key, None)
        self._connect_failures.pop(key, None)
        future.set_result(flow)
        self._start_keepalive()  # flows we open are pinged even without a listener
        return flow

    def _check_backoff(self, key: tuple[str, str, int]) -> None:
        failures = self._connect_failures.get(key)
        if failures is None:
            return
        _count, not_before = failures
        wait = not_before - asyncio.get_running_loop().time()
        if wait > 0:
            raise TransportError(f"{key[0]}:{key[1]}:{key[2]} unreachable, next connect in {wait:.1f} s")

    def _record_connect_failure(self, key: tuple[str, str, int]) -> None:
        count = self._connect_failures.get(key, (0, 0.0))[0] + 1
        delay = min(self.backoff_max, self.backoff_base * 2 ** (count - 1)) * random.uniform(0.5, 1.0)
        self._connect_failures[key] = (count, asyncio.get_running_loop().time() + delay)

    async def _connect(self, transport: TransportName, host: str, port: int,
                       server_name: str | None) -> Flow:
        loop = asyncio.get_running_loop()
        ctx = None
        if transport == "tls":
            if self._client_ctx is None:
                self._client_ctx = self.tls.client_context()
            ctx = self._client_ctx
        sni = server_name or (None if _is_ip(host) else host)
        local_host = self._local_bind_host(transport, host)
        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: _StreamProtocol(self, transport, outbound=True), host, port, ssl=ctx,
                server_hostname=(sni or host) if ctx else None,
                local_addr=(local_host, 0) if local_host else None,
            ),
            self.connect_timeout,
        )
        assert protocol.flow is not None
        return protocol.flow

    def _local_bind_host(self, transport: str, remote_host: str) -> str | None:
        """Bind outgoing connections to the listening address of the same family, if any."""
        for spec in self.listening:
            if spec.host not in ("0.0.0.0", "::") and _same_family(spec.host, remote_host):
                return spec.host
        return None

    async def _udp_flow(self, host: str, port: int) -> Flow:
        sock = next((s for s in self._udp_sockets if _same_family(s.local[0], host)), None)
        if sock is None:
            bind = "::" if ":" in host else "0.0.0.0"
            if _is_loopback(host):
                bind = "::1" if ":" in host else "127.0.0.1"
            sock = await self._open_udp(bind, 0)
        return sock.flow_for((host, port))

    async def _open_udp(self, host: str, port: int) -> _UdpProtocol:
        """A UDP socket bound to (host, port) under a _UdpProtocol that also gets the socket
        itself, to read every queued datagram when woken (see _UdpProtocol.datagram_received)."""
        loop = asyncio.get_running_loop()
        sock = await _bound_udp_socket(host, port)
        try:
            _, protocol = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self, sock), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._udp_sockets.append(protocol)
        return protocol

    # ------------------------------------------------------------------ inbound

    def _register_flow(self, flow: Flow) -> None:
        old = self._flows.get(flow.key)
        if old is not None and old.alive and old is not flow and old.outbound and not flow.outbound:
            return  # keep using the connection we opened; the new inbound one still works for replies
        self._flows[flow.key] = flow

    def _flow_closed(self, flow: Flow, reason: str) -> None:
        if not flow.alive:
            return
        flow.alive = False
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]
        # inbound connections come and go at a peer's will (junk among them): not worth a line each
        log.log(logging.INFO if flow.outbound else logging.DEBUG, "flow %s closed: %s", flow, reason)
        if self._on_flow_closed is not None:
            try:
                self._on_flow_closed(flow, reason)
            except Exception:
                log.exception("flow-closed handler failed for %s", flow)

    def _deliver(self, data: bytes, flow: Flow, *, stream: bool) -> None:
        """Parse one message and hand it up; answer 400 to a malformed request where possible."""
        self.stats["received"] += 1
        try:
            message = parse_message(data, self.limits, stream=stream)
        except SipParseError as exc:
            self.stats["parse_errors"] += 1
            self.junk_log.info(flow.remote[0], "malformed message from %s: %s", flow, exc.reason)
            if exc.partial is not None:
                reply = make_response(exc.partial, 400, f"Bad Request ({exc.reason[:60]})")
                with contextlib.suppress(TransportError):
                    flow.send(reply.to_bytes())
            return
        if isinstance(message, Request):
            _stamp_received(message, flow)
        try:
            self._on_message(message, flow)
        except Exception:
            log.exception("handler failed for %s from %s", message, flow)

    async def _keepalive_loop(self) -> None:
        """Ping outbound stream flows every interval; close those whose pong is overdue, and the
        inbound connections that stay idle too long."""
        loop = asyncio.get_running_loop()
        periods = [t for t in (self.keepalive_interval, self.idle_timeout) if t > 0]
        if self.keepalive_interval > 0:
            periods.append(self.pong_timeout)
        while True:
            await asyncio.sleep(min(periods) / 2)
            now = loop.time()
            if self.idle_timeout > 0:
                self.close_idle(now)
            if self.keepalive_interval <= 0:
                continue
            for flow in list(self._flows.values()):
                if not (flow.alive and flow.outbound and flow.reliable):
                    continue
                if flow.ping_sent_at is not None:
                    if now - flow.ping_sent_at > self.pong_timeout:
                        flow.close()
                        self._flow_closed(flow, "keep-alive pong overdue")
                    continue
                if now - flow.last_ping_at >= self.keepalive_interval:
                    flow.last_ping_at = flow.ping_sent_at = now
                    with contextlib.suppress(TransportError):
                        flow.send(b"\r\n\r\n")


    def close_idle(self, now: float) -> None:
        """Close the inbound connections that completed no message for ``idle_timeout`` (called
        every ``idle_timeout / 2`` or sooner: a connection goes between 1 and 1.5 limits idle)."""
        for protocol in list(self._inbound):
            flow = protocol.flow
            if flow is None or not flow.alive:
                continue
            if flow.ping_sent_at is None:
                flow.ping_sent_at = now  # watch from now: any message clears it
            elif now - flow.ping_sent_at >= self.idle_timeout:
                self.stats["idle_closed"] += 1
                flow.close()
                self._flow_closed(flow, f"no complete message for {self.idle_timeout:g} s")

    def _admit(self, protocol: _StreamProtocol, source: str) -> bool:
        """Take an inbound connection while under both caps; count it (see _release)."""
        per_source = self._inbound_per_source.get(source, 0)
        if len(self._inbound) >= self.max_connections or per_source >= self.max_connections_per_source:
            self.stats["connections_refused"] += 1
            self.junk_log.info(source, "refused a connection from %s: %d from it, %d in all", source, per_source,
                               len(self._inbound))
            return False
        self._inbound.add(protocol)
        self._inbound_per_source[source] = per_source + 1
        return True

    def _release(self, protocol: _StreamProtocol, source: str) -> None:
        if protocol not in self._inbound:
            return
        self._inbound.discard(protocol)
        left = self._inbound_per_source.get(source, 1) - 1
        if left > 0:
            self._inbound_per_source[source] = left
        else:
            self._inbound_per_source.pop(source, None)

    @property
    def inbound_connections(self) -> int:
        return len(self._inbound)


def _stamp_received(request: Request, flow: Flow) -> None:
    """RFC 3261 §18.2.1 ``received`` and RFC 3581 ``rport`` on the top Via of an incoming request."""
    if "Via" not in request.headers:
        return
    try:
        via = request.top_via
    except SipParseError:
        return
    host, port = flow.remote
    changed = False
    if via.host.strip("[]") != host:
        via.params["received"] = host
        changed = True
    if "rport" in via.params and via.params["rport"] is None:
        via.params["rport"] = str(port)
        via.params.setdefault("received", host)
        changed = True
    if not changed:
        return
    # The top Via may be the first element of a comma-joined line: rewrite only that element.
    items: list[tuple[str, str]] = []
    done = False
    for name, value in request.headers:
        if not done and name.lower() == "via":
            parts = split_list(value)
            parts[0] = str(via)
            value, done = ", ".join(parts), True
        items.append((name, value))
    request.headers = Headers(items)


#: the largest UDP payload there is (asyncio reads 256 KiB at a time, and allocates as much)
_UDP_READ_SIZE = 65536
#: how many queued datagrams one wake-up reads at most, so other work is not starved
_UDP_DRAIN_MAX = 64


async def _bound_udp_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port), tried in getaddrinfo order like
    ``create_datagram_endpoint(local_addr=...)`` does."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    error: OSError = OSError(f"cannot resolve {host!r}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, layer: TransportLayer, sock: socket.socket | None = None) -> None:
        self.layer = layer
        self._sock = sock  # the transport's socket, for reading what else is queued
        self.transport: asyncio.DatagramTransport | None = None
        self.local: Address = ("0.0.0.0", 0)
        self._flows: dict[Address, Flow] = {}
        self._handed = False  # a datagram was given to the transport to queue (see _send)
        #: datagrams written in this pass of the event loop, sent together at its end (_send_all)
        self._out: list[tuple[bytes, Address]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport by construction
        sockname = transport.get_extra_info("sockname")
        self.local = (sockname[0], sockname[1])
        self._loop = asyncio.get_running_loop()

    def flow_for(self, remote: Address) -> Flow:
        flow = self._flows.get(remote)
        if flow is None or not flow.alive:
            transport = self.transport
            if transport is None or transport.is_closing():
                raise TransportError("UDP socket closed")
            out = self._out

            def write(data: bytes, remote: Address = remote) -> None:
                if data.startswith(b"SIP/") or self._loop is None:
                    # A response goes out at once (after what is waiting, so order is kept): a
                    # provisional and the final right behind it, sent together, could reach a
                    # proxy's parallel workers together and be relayed the wrong way round.
                    if out:
                        self._send_all()
                    self._send(data, remote)
                    return
                if not out:
                    self._loop.call_soon(self._send_all)
                out.append((data, remote))

            flow = Flow("udp", self.local, remote, outbound=False, _write=write, _close=lambda: None)
            if len(self._flows) > 100_000:
                self._flows.clear()  # UDP flows are cheap views; bound the cache
            self._flows[remote] = flow
            self.layer._register_flow(flow)
        return flow

    def _send_all(self) -> None:
        """Send the requests written in this pass of the loop, in order.

        Under load many client transactions send in the same pass (the responses that woke them
        arrived together): sent back to back, the peer's workers find them queued and take them
        in one go, instead of being woken for each one while we work on the next. (Requests of
        different transactions only: see the responses in flow_for's ``write``.)
        """
        out = self._out
        batch = out.copy()
        out.clear()
        for data, remote in batch:
            try:
                self._send(data, remote)
            except Exception:  # lost like a dropped datagram; its transaction retransmits
                log.exception("UDP send to %s failed", remote)

    def _send(self, data: bytes, remote: Address) -> None:
        """Straight to the socket while the transport has nothing queued (what its sendto does
        first, minus its checks); when the socket is full, the transport queues the datagram and
        sends it once writable, after whatever it holds already. Only this protocol writes to the
        transport, so until it has handed it a datagram (``_handed``) its queue is known empty."""
        transport, sock = self.transport, self._sock
        if transport is None:
            return
        if sock is not None and (not self._handed or not _write_buffer_size(transport)):
            self._handed = False
            try:
                sock.sendto(data, remote)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:  # as the transport reports it: the datagram is lost
                self.error_received(exc)
                return
        self._handed = True
        transport.sendto(data, remote)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._handle(data, addr)
        self._drain()

    def _drain(self) -> None:
        """Read the datagrams already waiting on the socket.

        asyncio reads one datagram per wake-up of the loop; under load several are queued, and
        each wake-up costs a poll system call and a pass through the loop.
        """
        sock, transport = self._sock, self.transport
        if sock is None or transport is None:
            return
        for n in range(_UDP_DRAIN_MAX):
            # A handler cannot close the transport under us (closing the layer is a coroutine),
            # so one look per few datagrams is enough; a socket closed since fails recvfrom.
            if not n & 7 and transport.is_closing():
                return
            try:
                data, addr = sock.recvfrom(_UDP_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error_received(exc)
                return
            self._handle(data, addr)

    def _handle(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if data[:1] in b"\r\n\x00" and not data.strip(b"\r\n\x00"):
            return  # keep-alive datagram (or an empty one)
        flow = self._flows.get(addr)  # type: ignore[arg-type]  # an IPv4 (host, port) is a key as it is
        if flow is None or not flow.alive:
            try:
                flow = self.flow_for((str(addr[0]), int(addr[1])))
            except TransportError:
                return
        self.layer._deliver(data, flow, stream=False)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error on %s: %s", self.local, exc)

    def close(self) -> None:
        if self._out:
            self._send_all()  # what was written before the close still goes out
        if self.transport is not None:
            self.transport.close()
        for flow in self._flows.values():
            flow.alive = False


class _StreamProtocol(asyncio.Protocol):
    """One TCP/TLS connection: frames what arrives, and coalesces what is sent.

    Writes are queued and handed to the transport once per pass of the event loop: under load
    many transactions send in the same pass (their responses arrived together), and one system
    call and TCP segment for all of them costs far less than one each. Order is kept, and the
    queue is flushed before the connection is closed.
    """

    def __init__(self, layer: TransportLayer, transport_name: TransportName, *, outbound: bool) -> None:
        self.layer = layer
        self.name: TransportName = transport_name
        self.outbound = outbound
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None
        self._pending: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.framer = StreamFramer(
            max_header_bytes=layer.limits.max_header_bytes,
            max_message_bytes=layer.limits.max_message_bytes,
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # create_server/create_connection give streams
        self.transport = stream
        local = stream.get_extra_info("sockname")
        remote = stream.get_extra_info("peername")
        self._loop = asyncio.get_running_loop()
        if not self.outbound and not self.layer._admit(self, remote[0]):
            stream.abort()  # over a cap: no flow, nothing read
            return
        self.flow = Flow(
            self.name, (local[0], local[1]), (remote[0], remote[1]), self.outbound,
            _write=self._write, _close=self._close,
        )
        self.layer._register_flow(self.flow)

    def _write(self, data: bytes) -> None:
        if not self._pending and self._loop is not None:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if not self._pending or self.transport is None:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        try:
            self.transport.write(data)
        except RuntimeError as exc:  # a transport that cannot write any more; connection_lost follows
            log.info("write on %s failed: %s", self.flow, exc)

    def _close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.flow is None or self.transport is None:
            return  # a refused connection
        try:
            frames = self.framer.feed(data)
        except FramingError as exc:
            self._handle(exc.frames)  # the messages completed before the error are intact
            self.layer.stats["framing_errors"] += 1
            self.layer.junk_log.info(self.flow.remote[0], "framing error on %s: %s; closing this connection only",
                                     self.flow, exc)
            self._close()
            self.layer._flow_closed(self.flow, f"framing error: {exc}")
            return
        self._handle(frames)

    def _handle(self, frames: list[Frame]) -> None:
        assert self.flow is not None
        for frame in frames:
            if type(frame) is bytes:
                # Any message proves the flow alive: under load the peer's pong queues behind the
                # responses it owes us, and dropping a busy flow would re-register everyone on it.
                self.flow.ping_sent_at = None
                self.layer._deliver(frame, self.flow, stream=True)
            elif isinstance(frame, KeepAlivePing):
                with contextlib.suppress(TransportError):
                    self.flow.send(b"\r\n")
            elif self.outbound:  # KeepAlivePong; on an inbound connection it does not count as a message
                self.flow.ping_sent_at = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._pending.clear()  # nowhere to send it any more
        if self.flow is not None:
            if not self.outbound:
                self.layer._release(self, self.flow.remote[0])
            self.layer._flow_closed(self.flow, f"connection lost: {exc}" if exc else "closed by peer")


def _write_buffer_size(transport: asyncio.DatagramTransport) -> int:
    """What the transport holds unsent (event loops' datagram transports tell; if one does not,
    assume something, so the datagram goes through the transport)."""
    size: Callable[[], int] | None = getattr(transport, "get_write_buffer_size", None)
    return size() if size is not None else 1


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _same_family(a: str, b: str) -> bool:
    return (":" in a.strip("[]")) == (":" in b.strip("[]"))


async def _resolve_literal(host: str) -> str:
    """IP literals as they are; names through getaddrinfo (first address). SRV lives in the resolver."""
    host = host.strip("[]")
    if _is_ip(host):
        return host
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=0)
    except OSError as exc:
        raise TransportError(f"cannot resolve {host}: {exc}") from exc
    return str(infos[0][4][0])
