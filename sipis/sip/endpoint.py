"""The SIP endpoint: transports + the sans-I/O transaction layer, driven by asyncio.

It runs the transaction objects from :mod:`sipis.sip.transaction`: executes their actions (send,
pass up, terminate) and keeps one timer armed at the transaction table's next deadline, the way
aioquic's asyncio protocol drives its connection: the table is the only schedule, the endpoint
asks it when to wake and has it fire what is due. Time comes from an injected
:class:`~sipis.clock.Clock` and the one wake-up from injected :class:`~sipis.timers.Timers` (the
running loop's by default), so tests drive every SIP timer with a fake clock. Above it, the
transaction user (registration engine, held calls) sees two things:

* :meth:`SipEndpoint.request` — send a request on a flow, await its final response (transport
  failures and timeouts come back as locally generated ``503``/``408``);
  :meth:`SipEndpoint.send_request` does the same for a :class:`ResponseCallback`, which gets the
  final response from the endpoint directly and may send the next request from there;
* handlers per method for incoming requests, each given an :class:`IncomingRequest` to answer;
* screens per method, asked before a server transaction exists: a request a screen refuses (junk:
  an unknown user, a source we do not take calls from) gets that one response statelessly — no
  transaction, no retransmissions, nothing kept (RFC 3261 §8.2.7 allows a stateless UAS).

The endpoint itself answers what needs no application: ``100 Trying`` for INVITE, ``200`` to
OPTIONS, ``200``/``487``/``481`` for CANCEL, ``405`` for methods nobody handles and ``481`` for
in-dialog requests (we never keep dialogs: calls are redirected or rejected). Of these, all but
what concerns a pending INVITE are sent statelessly: a request nobody handles keeps nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sipis.clock import Clock
from sipis.sip.message import (
    Message,
    Request,
    Response,
    SipParseError,
    make_response,
    make_via,
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
from sipis.timers import LoopTimers, TimerHandle, Timers

log = logging.getLogger(__name__)

ServerTransaction = ServerInviteTransaction | ServerNonInviteTransaction
RequestHandler = Callable[["IncomingRequest"], None]
#: a request's final status when it is refused before any transaction exists, None to serve it
Screen = Callable[[Request, Flow], int | None]
ProvisionalHandler = Callable[[Response], None]


class ResponseCallback:
    """Receives the outcome of a client transaction started with :meth:`SipEndpoint.send_request`,
    for transaction users that drive several transactions from callbacks instead of awaiting each
    one (a REGISTER answering its 401, for one). Exactly one of the three is called, once, from
    the event loop and never from within ``send_request`` itself."""

    __slots__ = ()

    def __call__(self, response: Response) -> None:
        """The final response: received, or a local 408 (timeout) / 503 (transport failure)."""
        raise NotImplementedError

    def error(self, exc: TransportError) -> None:
        """The transaction ended without a final response (``request`` raises ``exc``)."""
        raise NotImplementedError

    def cancel(self) -> None:
        """The endpoint closed first (``request`` is cancelled)."""
        raise NotImplementedError


Waiter = asyncio.Future[Response] | ResponseCallback


# What the endpoint keeps for a client transaction rides on the transaction itself: the flow,
# who waits for the final response (the future ``request`` awaits, or a ResponseCallback) and the
# provisional-response callback. Once the TU has its final response, only the flow is still
# needed (an INVITE's ACK may have to be re-sent): the waiter and the callback are dropped then,
# so a transaction lingering for its timers does not keep them (and what they hold) alive.


class _ClientNonInvite(ClientNonInviteTransaction):
    __slots__ = ("flow", "on_provisional", "waiter")

    flow: Flow
    waiter: Waiter | None
    on_provisional: ProvisionalHandler | None


class _ClientInvite(ClientInviteTransaction):
    __slots__ = ("flow", "on_provisional", "waiter")

    flow: Flow
    waiter: Waiter | None
    on_provisional: ProvisionalHandler | None


ClientTransaction = _ClientNonInvite | _ClientInvite
#: for isinstance: a tuple, which the compiled form checks directly (``A | B`` builds a union each time)
_CLIENT_TYPES = (_ClientNonInvite, _ClientInvite)


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
    idle_timeout: float = 30.0
    max_connections: int = 10000
    max_connections_per_source: int = 100


class SipEndpoint:
    def __init__(self, settings: EndpointSettings | None = None, *, clock: Clock | None = None,
                 scheduler: Timers | None = None) -> None:
        """``clock`` gives the time every SIP timer runs on and ``scheduler`` arms the endpoint's
        one wake-up; both default to the real ones (the running loop's)."""
        self.settings = settings or EndpointSettings()
        self.user_agent = self.settings.user_agent
        self.timers = self.settings.timers
        # read for every message: without a clock of its own, time.monotonic() (SystemClock's)
        # itself, not through SystemClock.monotonic (a Python frame per read)
        self._now: Callable[[], float] = time.monotonic if clock is None else clock.monotonic
        self.transport = TransportLayer(
            self._on_message, self._on_flow_closed, tls=self.settings.tls,
            keepalive_interval=self.settings.keepalive_interval, clock=self._now,
            idle_timeout=self.settings.idle_timeout, max_connections=self.settings.max_connections,
            max_connections_per_source=self.settings.max_connections_per_source,
        )
        self.table = TransactionTable()
        self.handlers: dict[str, RequestHandler] = {}
        #: method → screen (see the module's docstring); only new requests of that method are asked
        self.screens: dict[str, Screen] = {}
        #: responses sent statelessly for requests a screen refused
        self.refused = 0
        self.flow_closed_listeners: list[Callable[[Flow, str], None]] = []
        #: see every message received ("in") or sent ("out"), e.g. the trace recorder; must not block
        self.observers: list[Callable[[str, Message, Flow], None]] = []
        #: an ACK that matches no transaction (the ACK for a 2xx, RFC 3261 §17.2.1): dropped unless
        #: someone who keeps dialogs takes it here (a proxy passes it on, a callee ends its wait)
        self.unmatched_ack: Callable[[Request, Flow], None] | None = None
        self._servers: dict[int, IncomingRequest] = {}
        self._scheduler: Timers = scheduler or LoopTimers()
        self._timer: TimerHandle | None = None  # the one wake-up, armed at the table's next deadline
        self._timer_at = 0.0  # when self._timer fires
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> list[ListenSpec]:
        self._loop = asyncio.get_running_loop()
        return [await self.transport.listen(spec) for spec in self.settings.listen]

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for tx in self.table:
            if isinstance(tx, _CLIENT_TYPES):
                waiter, tx.waiter, tx.on_provisional = tx.waiter, None, None
                if isinstance(waiter, ResponseCallback):
                    _call(waiter.cancel)
                elif waiter is not None and not waiter.done():
                    waiter.cancel()
        # Drop every transaction now: the endpoint and its transport refer to each other, so
        # whatever it still holds would otherwise wait for the cyclic garbage collector.
        self._servers.clear()
        self.table = TransactionTable()
        await self.transport.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def now(self) -> float:
        """The clock's monotonic time, which every transaction deadline is in."""
        return self._now()

    # ------------------------------------------------------------------ client side

    def add_via(self, request: Request, flow: Flow) -> str:
        """Put our Via (new branch, ``rport``) on top; returns the branch."""
        branch, via = make_via(flow.transport, flow.local)
        headers = request.headers
        headers.prepend("Via", via)
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
        future: asyncio.Future[Response] = self.loop.create_future()
        self.send_request(request, flow, future, on_provisional=on_provisional, branch=branch)
        try:
            return await future
        finally:
            if not future.done():
                future.cancel()

    def send_request(self, request: Request, flow: Flow, waiter: Waiter, *,
                     on_provisional: ProvisionalHandler | None = None,
                     branch: str | None = None) -> None:
        """Start a client transaction on ``flow`` whose final response goes to ``waiter``: a
        future (what :meth:`request` awaits) or a :class:`ResponseCallback`."""
        key = ClientKey(branch, request.cseq[1]) if branch else None
        reliable = flow.reliable
        tx: ClientTransaction
        if request.method == "INVITE":
            tx = _ClientInvite(request, reliable=reliable, timers=self.timers, key=key)
        else:
            tx = _ClientNonInvite(request, reliable=reliable, timers=self.timers, key=key)
        tx.flow, tx.waiter, tx.on_provisional = flow, waiter, on_provisional
        self.table.add(tx)
        self._run(tx, tx.start(self.now()))

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
        if isinstance(message, Response):
            if self.observers:
                self._observe("in", message, flow)
            tx = self.table.match_response(message)
            if tx is None:
                if not self.table.absorbs(message, self._now()):
                    log.debug("stray response %s from %s", message, flow)
                return
            self._run(tx, tx.on_response(message, self._now()))
            return
        self._on_request(message, flow)

    def _on_request(self, request: Request, flow: Flow) -> None:
        existing = self.table.match_request(request)
        if existing is None and self.screens and self._refused(request, flow):
            return  # junk: not even observed (the trace recorder keeps nothing of it)
        if self.observers:
            self._observe("in", request, flow)
        if existing is not None:
            # a retransmission, or the ACK for our non-2xx final response
            self._run(existing, existing.on_request(request, self.now()))
            return
        if request.method == "ACK":
            if self.unmatched_ack is not None:  # ACK for a 2xx or for a transaction long gone
                _call(self.unmatched_ack, request, flow)
            return
        if request.method == "CANCEL":
            self._on_cancel(request, flow)
            return
        if request.method != "INVITE" and request.method not in self.handlers:
            # what the endpoint answers itself needs no transaction: junk of any method keeps nothing
            self._reply_statelessly(request, flow, *self._automatic_answer(request))
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

    def _refused(self, request: Request, flow: Flow) -> bool:
        """Ask the method's screen about a new request; a refusal gets one response, sent
        statelessly, and nothing is kept: a retransmitted request is simply refused again."""
        screen = self.screens.get(request.method)
        if screen is None:
            return False
        try:
            status = screen(request, flow)
        except Exception:
            log.exception("screen for %s failed", request)
            status = 500
        if status is None:
            return False
        self.refused += 1
        self._reply_statelessly(request, flow, status, observed=False)
        return True

    def _reply_statelessly(self, request: Request, flow: Flow, status: int,
                           headers: list[tuple[str, str]] | None = None, *, observed: bool = True) -> None:
        """A final response with nothing kept: a retransmitted request is simply answered again."""
        response = make_response(request, status, to_tag=new_tag(), headers=headers or ())
        if self.user_agent:
            response.headers.add("Server", self.user_agent)
        try:
            flow.send(response.to_bytes())
        except TransportError as exc:
            log.debug("stateless %d to %s not sent: %s", status, flow, exc)
            return
        self.transport.stats["sent"] += 1
        if observed and self.observers:
            self._observe("out", response, flow)

    def _automatic_answer(self, request: Request) -> tuple[int, list[tuple[str, str]]]:
        """What the endpoint answers a request no handler takes."""
        if _in_dialog(request):
            return 481, []
        allow = [("Allow", self.allow_header())]
        return (200, allow) if request.method == "OPTIONS" else (405, allow)

    def _dispatch(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        handler = self.handlers.get(request.method)
        if handler is not None and not (request.method == "INVITE" and _in_dialog(request)):
            try:
                handler(incoming)
            except Exception:
                log.exception("handler for %s failed", request)
                incoming.respond(500)
            return
        status, headers = self._automatic_answer(request)
        incoming.respond(status, headers=headers)

    def allow_header(self) -> str:
        return ", ".join(sorted({"ACK", "CANCEL", "OPTIONS", *self.handlers}))

    def _on_cancel(self, cancel: Request, flow: Flow) -> None:
        target = self.table.find_cancel_target(cancel)
        invite = self._servers.get(id(target)) if target is not None else None
        if invite is None:
            self._reply_statelessly(cancel, flow, 481)
            return
        tx = ServerNonInviteTransaction(cancel, reliable=flow.reliable, timers=self.timers)
        incoming = IncomingRequest(self, cancel, flow, tx)
        self._servers[id(tx)] = incoming
        self.table.add(tx)
        self._run(tx, tx.start(self.now()))
        incoming.to_tag = invite.to_tag
        incoming.respond(200)
        if invite.final_status is None and invite.respond(487):
            invite._cancelled(cancel)

    def _on_flow_closed(self, flow: Flow, reason: str) -> None:
        if flow.reliable:  # no response can arrive on a closed connection any more: 503 at once
            for tx in list(self.table):
                if isinstance(tx, _CLIENT_TYPES) and tx.flow is flow:
                    self._run(tx, tx.on_transport_error(self.now()))
        for listener in list(self.flow_closed_listeners):
            try:
                listener(flow, reason)
            except Exception:
                log.exception("flow-closed listener failed")

    # ------------------------------------------------------------------ actions and timers

    def _run(self, tx: Transaction, actions: list[Action]) -> None:
        """Execute what an event on ``tx`` produced, record it in the table and keep the wake-up
        in time for the table's next deadline: only ``tx`` can have moved that earlier."""
        self._execute(tx, actions)
        self.table.update(tx, actions)
        deadline = tx.next_deadline
        if deadline is not None and (self._timer is None or deadline < self._timer_at):
            self._arm(deadline)

    def _execute(self, tx: Transaction, actions: list[Action]) -> None:
        for action in actions:
            if type(action) is Transmit:
                self._transmit(tx, action.message)
            elif type(action) is PassResponse:
                self._pass_response(tx, action.response)
            elif type(action) is Terminate:
                self._terminate(tx)
            elif isinstance(action, TransactionFailed):
                if action.response is not None:  # client side: a local 408/503 is the final answer
                    self._pass_response(tx, action.response)
                else:
                    log.info("server transaction %s failed: %d %s", tx, action.status, action.reason)

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
        if isinstance(tx, _CLIENT_TYPES):
            return tx.flow
        server = self._servers.get(id(tx))
        return server.flow if server is not None else None

    def _pass_response(self, tx: Transaction, response: Response) -> None:
        if not isinstance(tx, _CLIENT_TYPES):
            return
        waiter = tx.waiter
        if waiter is None:
            return  # the TU has its final response already
        if response.status < 200:
            if tx.on_provisional is not None:
                try:
                    tx.on_provisional(response)
                except Exception:
                    log.exception("provisional-response callback failed")
            return
        tx.waiter = tx.on_provisional = None
        if isinstance(waiter, ResponseCallback):
            _call(waiter, response)  # may start the TU's next transaction right away
        elif not waiter.done():
            waiter.set_result(response)

    def _terminate(self, tx: Transaction) -> None:
        self.table.remove(tx)
        if isinstance(tx, _CLIENT_TYPES):
            waiter, tx.waiter, tx.on_provisional = tx.waiter, None, None
            error = TransportError("transaction ended without a final response")
            if isinstance(waiter, ResponseCallback):
                _call(waiter.error, error)
            elif waiter is not None and not waiter.done():
                waiter.set_exception(error)
        else:
            self._servers.pop(id(tx), None)

    def _arm(self, when: float) -> None:
        """The one wake-up, at ``when``. A deadline that moved later leaves it be: it fires early,
        finds nothing due and is armed again (:meth:`_fire`), cheaper than re-arming whenever the
        earliest transaction ends."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._scheduler.call_later(when - self._now(), self._fire)

    def _fire(self) -> None:
        self._timer = None
        # never before the deadline it was armed for (the loop may wake a hair early: aioquic's rule)
        now = max(self._timer_at, self._now())
        for tx, actions in self.table.on_timer(now):
            self._execute(tx, actions)
        when = self.table.next_deadline()
        if when is not None and (self._timer is None or when < self._timer_at):
            self._arm(when)

    @property
    def pending_transactions(self) -> int:
        """Transactions not yet terminated, those in Completed for Timer K included."""
        return self.table.pending


def _in_dialog(request: Request) -> bool:
    try:
        return request.to.tag is not None
    except SipParseError:
        return False


def _call(callback: Callable[..., None], *args: object) -> None:
    """Run a transaction user's callback; what it raises is logged, never the endpoint's problem."""
    try:
        callback(*args)
    except Exception:
        log.exception("response callback %r failed", callback)
