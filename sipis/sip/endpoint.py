"""The SIP endpoint: transports + the sans-I/O transaction layer, driven by asyncio.

It runs the transaction objects from :mod:`sipis.sip.transaction`: executes their actions (send,
pass up, terminate), keeps one heap of their deadlines and fires their timers. Above it, the
transaction user (registration engine, held calls) sees two things:

* :meth:`SipEndpoint.request` — send a request on a flow, await its final response (transport
  failures and timeouts come back as locally generated ``503``/``408``);
* handlers per method for incoming requests, each given an :class:`IncomingRequest` to answer.

The endpoint itself answers what needs no application: ``100 Trying`` for INVITE, ``200`` to
OPTIONS, ``200``/``487``/``481`` for CANCEL, ``405`` for methods nobody handles and ``481`` for
in-dialog requests (we never keep dialogs: calls are redirected or rejected).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sipis.sip.message import (
    Message,
    Request,
    Response,
    SipParseError,
    make_response,
    new_branch,
    new_tag,
)
from sipis.sip.transaction import (
    Action,
    ClientInviteTransaction,
    ClientKey,
    ClientNonInviteTransaction,
    PassResponse,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    Terminate,
    TimerSettings,
    Transaction,
    TransactionFailed,
    TransactionTable,
    Transmit,
)
from sipis.sip.transport import Flow, ListenSpec, TlsSettings, TransportError, TransportLayer

log = logging.getLogger(__name__)

ClientTransaction = ClientNonInviteTransaction | ClientInviteTransaction
ServerTransaction = ServerInviteTransaction | ServerNonInviteTransaction
RequestHandler = Callable[["IncomingRequest"], None]
ProvisionalHandler = Callable[[Response], None]


@dataclass(eq=False)
class _ClientContext:
    """What the endpoint keeps for a client transaction. Once the TU has its final response,
    only the flow is still needed (an INVITE's ACK may have to be re-sent): the future and the
    callback are dropped then, so a transaction lingering for its timers does not keep them (and
    through the future the response) alive."""

    flow: Flow
    future: asyncio.Future[Response] | None
    on_provisional: ProvisionalHandler | None


class IncomingRequest:
    """A request we are serving: answer it with :meth:`respond` (once finally; later calls are no-ops)."""

    def __init__(self, endpoint: SipEndpoint, request: Request, flow: Flow,
                 transaction: ServerTransaction) -> None:
        self.endpoint = endpoint
        self.request = request
        self.flow = flow
        self.transaction = transaction
        self.to_tag = new_tag()
        self.final_status: int | None = None
        self.cancel_request: Request | None = None
        self._cancel_callbacks: list[Callable[[Request], None]] = []

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def cancelled(self) -> bool:
        return self.cancel_request is not None

    def on_cancel(self, callback: Callable[[Request], None]) -> None:
        """Call ``callback(cancel_request)`` when the caller cancels (the 487 is already sent)."""
        self._cancel_callbacks.append(callback)

    def respond(self, status: int, reason: str | None = None, *,
                headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> bool:
        """Send a response; False (nothing sent) when a final response already went out."""
        if self.final_status is not None:
            return False
        response = make_response(self.request, status, reason, to_tag=self.to_tag, headers=headers,
                                 body=body)
        if "Server" not in response.headers and self.endpoint.user_agent:
            response.headers.add("Server", self.endpoint.user_agent)
        if status >= 200:
            self.final_status = status
        self.endpoint._respond(self, response)
        return True

    def _cancelled(self, cancel: Request) -> None:
        self.cancel_request = cancel
        for callback in self._cancel_callbacks:
            try:
                callback(cancel)
            except Exception:
                log.exception("cancel callback failed for %s", self.request)


@dataclass
class EndpointSettings:
    listen: list[ListenSpec] = field(default_factory=list)
    tls: TlsSettings = field(default_factory=TlsSettings)
    timers: TimerSettings = field(default_factory=TimerSettings)
    user_agent: str = "sipis-console"
    keepalive_interval: float = 30.0


class SipEndpoint:
    def __init__(self, settings: EndpointSettings | None = None) -> None:
        self.settings = settings or EndpointSettings()
        self.user_agent = self.settings.user_agent
        self.timers = self.settings.timers
        self.transport = TransportLayer(
            self._on_message, self._on_flow_closed, tls=self.settings.tls,
            keepalive_interval=self.settings.keepalive_interval,
        )
        self.table = TransactionTable()
        self.handlers: dict[str, RequestHandler] = {}
        self.flow_closed_listeners: list[Callable[[Flow, str], None]] = []
        #: see every message received ("in") or sent ("out"), e.g. the trace recorder; must not block
        self.observers: list[Callable[[str, Message, Flow], None]] = []
        self._clients: dict[int, _ClientContext] = {}
        self._servers: dict[int, IncomingRequest] = {}
        self._heap: list[tuple[float, int, Transaction]] = []
        self._seq = itertools.count()
        self._scheduled: dict[int, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> list[ListenSpec]:
        self._loop = asyncio.get_running_loop()
        return [await self.transport.listen(spec) for spec in self.settings.listen]

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ctx in self._clients.values():
            if ctx.future is not None and not ctx.future.done():
                ctx.future.cancel()
        # Drop every transaction now: the endpoint and its transport refer to each other, so
        # whatever it still holds would otherwise wait for the cyclic garbage collector.
        self._clients.clear()
        self._servers.clear()
        self._heap.clear()
        self._scheduled.clear()
        self.table = TransactionTable()
        await self.transport.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        return self.loop.time()

    # ------------------------------------------------------------------ client side

    def add_via(self, request: Request, flow: Flow) -> str:
        """Put our Via (new branch, ``rport``) on top; returns the branch."""
        branch = new_branch()
        host, port = flow.local
        host = f"[{host}]" if ":" in host else host
        headers = request.headers
        # str(Via(transport, host, port, {"rport": None, "branch": branch})), written directly
        headers.prepend("Via", f"SIP/2.0/{flow.via_transport} {host}:{port};rport;branch={branch}")
        if "Max-Forwards" not in headers:
            headers.add("Max-Forwards", "70")
        if "User-Agent" not in headers and self.user_agent:
            headers.add("User-Agent", self.user_agent)
        return branch

    async def request(self, request: Request, flow: Flow, *,
                      on_provisional: ProvisionalHandler | None = None,
                      branch: str | None = None) -> Response:
        """Run a client transaction on ``flow``; the request must already carry our top Via.

        ``branch`` is what :meth:`add_via` returned for this request: passing it spares reading
        the Via back. Without it the branch is taken from the request.
        """
        self.loop  # noqa: B018 - binds the loop
        key = ClientKey(branch, request.cseq[1]) if branch else None
        tx: ClientTransaction
        if request.method == "INVITE":
            tx = ClientInviteTransaction(request, reliable=flow.reliable, timers=self.timers, key=key)
        else:
            tx = ClientNonInviteTransaction(request, reliable=flow.reliable, timers=self.timers, key=key)
        future: asyncio.Future[Response] = self.loop.create_future()
        self._clients[id(tx)] = _ClientContext(flow, future, on_provisional)
        self.table.add(tx)
        self._run(tx, tx.start(self.now()))
        try:
            return await future
        finally:
            if not future.done():
                future.cancel()

    # ------------------------------------------------------------------ server side

    def _respond(self, incoming: IncomingRequest, response: Response) -> None:
        tx = incoming.transaction
        self._run(tx, tx.respond(response, self.now()))

    # ------------------------------------------------------------------ dispatch

    def _observe(self, direction: str, message: Message, flow: Flow) -> None:
        for observer in self.observers:
            try:
                observer(direction, message, flow)
            except Exception:
                log.exception("message observer failed")

    def _on_message(self, message: Message, flow: Flow) -> None:
        if self.observers:
            self._observe("in", message, flow)
        if isinstance(message, Response):
            tx = self.table.match_response(message)
            if tx is None:
                log.debug("stray response %s from %s", message, flow)
                return
            self._run(tx, tx.on_response(message, self.now()))
            return
        self._on_request(message, flow)

    def _on_request(self, request: Request, flow: Flow) -> None:
        existing = self.table.match_request(request)
        if existing is not None:
            # a retransmission, or the ACK for our non-2xx final response
            self._run(existing, existing.on_request(request, self.now()))
            return
        if request.method == "ACK":
            return  # ACK for a 2xx or for a transaction long gone: nothing to do
        if request.method == "CANCEL":
            self._on_cancel(request, flow)
            return
        tx: ServerTransaction
        if request.method == "INVITE":
            tx = ServerInviteTransaction(request, reliable=flow.reliable, timers=self.timers)
        else:
            tx = ServerNonInviteTransaction(request, reliable=flow.reliable, timers=self.timers)
        incoming = IncomingRequest(self, request, flow, tx)
        self._servers[id(tx)] = incoming
        self.table.add(tx)
        self._run(tx, tx.start(self.now()))
        self._dispatch(incoming)

    def _dispatch(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        try:
            in_dialog = request.to.tag is not None
        except SipParseError:
            in_dialog = False
        handler = self.handlers.get(request.method)
        if handler is not None and not (in_dialog and request.method == "INVITE"):
            try:
                handler(incoming)
            except Exception:
                log.exception("handler for %s failed", request)
                incoming.respond(500)
            return
        if in_dialog:
            incoming.respond(481)
        elif request.method == "OPTIONS":
            incoming.respond(200, headers=[("Allow", self.allow_header())])
        else:
            incoming.respond(405, headers=[("Allow", self.allow_header())])

    def allow_header(self) -> str:
        return ", ".join(sorted({"ACK", "CANCEL", "OPTIONS", *self.handlers}))

    def _on_cancel(self, cancel: Request, flow: Flow) -> None:
        target = self.table.find_cancel_target(cancel)
        tx = ServerNonInviteTransaction(cancel, reliable=flow.reliable, timers=self.timers)
        incoming = IncomingRequest(self, cancel, flow, tx)
        self._servers[id(tx)] = incoming
        self.table.add(tx)
        self._run(tx, tx.start(self.now()))
        invite = self._servers.get(id(target)) if target is not None else None
        if invite is None:
            incoming.respond(481)
            return
        incoming.to_tag = invite.to_tag
        incoming.respond(200)
        if invite.final_status is None and invite.respond(487):
            invite._cancelled(cancel)

    def _on_flow_closed(self, flow: Flow, reason: str) -> None:
        if flow.reliable:  # no response can arrive on a closed connection any more: 503 at once
            for tx in list(self.table):
                ctx = self._clients.get(id(tx))
                if ctx is not None and ctx.flow is flow:
                    self._run(tx, tx.on_transport_error(self.now()))
        for listener in list(self.flow_closed_listeners):
            try:
                listener(flow, reason)
            except Exception:
                log.exception("flow-closed listener failed")

    # ------------------------------------------------------------------ actions and timers

    def _run(self, tx: Transaction, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Transmit):
                self._transmit(tx, action.message)
            elif isinstance(action, PassResponse):
                self._pass_response(tx, action.response)
            elif isinstance(action, TransactionFailed):
                if action.response is not None:  # client side: a local 408/503 is the final answer
                    self._pass_response(tx, action.response)
                else:
                    log.info("server transaction %s failed: %d %s", tx, action.status, action.reason)
            elif isinstance(action, Terminate):
                self._terminate(tx)
        self._schedule(tx)

    def _transmit(self, tx: Transaction, message: Message) -> None:
        flow = self._flow_of(tx)
        try:
            if flow is None:
                raise TransportError("transaction has no flow")
            flow.send(message.to_bytes())
            self.transport.stats["sent"] += 1
            if self.observers:
                self._observe("out", message, flow)
        except TransportError as exc:
            log.info("transport error for %s: %s", tx, exc)
            self.loop.call_soon(lambda: self._run(tx, tx.on_transport_error(self.now())))

    def _flow_of(self, tx: Transaction) -> Flow | None:
        client = self._clients.get(id(tx))
        if client is not None:
            return client.flow
        server = self._servers.get(id(tx))
        return server.flow if server is not None else None

    def _pass_response(self, tx: Transaction, response: Response) -> None:
        ctx = self._clients.get(id(tx))
        if ctx is None or ctx.future is None:
            return  # unknown, or the TU has its final response already
        if response.status < 200:
            if ctx.on_provisional is not None:
                try:
                    ctx.on_provisional(response)
                except Exception:
                    log.exception("provisional-response callback failed")
            return
        if not ctx.future.done():
            ctx.future.set_result(response)
        ctx.future = ctx.on_provisional = None

    def _terminate(self, tx: Transaction) -> None:
        self.table.remove(tx)
        self._scheduled.pop(id(tx), None)
        ctx = self._clients.pop(id(tx), None)
        if ctx is not None and ctx.future is not None and not ctx.future.done():
            ctx.future.set_exception(TransportError("transaction ended without a final response"))
        self._servers.pop(id(tx), None)

    # The deadline heap is lazily invalidated: an entry counts only while ``_scheduled`` holds its
    # deadline for its transaction. Stale entries (re-armed or ended transactions) are skipped when
    # they reach the top, and dropped in bulk once they outnumber the live ones, so an ended
    # transaction is not kept alive (with its request) until its longest timer would have run out.

    def _schedule(self, tx: Transaction) -> None:
        deadline = tx.next_deadline
        if deadline is None:
            self._scheduled.pop(id(tx), None)
            return
        if self._scheduled.get(id(tx)) == deadline:
            return
        self._scheduled[id(tx)] = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), tx))
        if len(self._heap) > 2 * len(self._scheduled) + 64:
            self._drop_stale()
        if self._timer is None or deadline < self._timer.when():
            self._arm()

    def _is_live(self, entry: tuple[float, int, Transaction]) -> bool:
        return self._scheduled.get(id(entry[2])) == entry[0]

    def _drop_stale(self) -> None:
        self._heap = [entry for entry in self._heap if self._is_live(entry)]
        heapq.heapify(self._heap)

    def _arm(self) -> None:
        """Set the loop timer to the earliest live deadline (one TimerHandle at a time)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        heap = self._heap
        while heap and not self._is_live(heap[0]):
            heapq.heappop(heap)
        if heap:
            self._timer = self.loop.call_at(heap[0][0], self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self.now()
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if not self._is_live(entry):
                continue
            tx = entry[2]
            del self._scheduled[id(tx)]
            if tx.next_deadline is not None and tx.next_deadline <= now and self.table.contains(tx):
                self._run(tx, tx.on_timer(now))
        self._arm()

    @property
    def pending_transactions(self) -> int:
        return len(self._clients) + len(self._servers)
