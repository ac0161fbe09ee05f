"""SIP transactions (RFC 3261 §17, with the RFC 6026 correction for 2xx to INVITE), sans-I/O.

Shape
-----
A transaction is a plain state machine in the style of h11/h2: every input is a method call that
takes the current monotonic time ``now`` and returns a list of :data:`Action`. Nothing here sleeps,
reads a clock or touches a socket, so every RFC timer is testable in microseconds.

Inputs
    client transactions: ``start(now)``, ``on_response(response, now)``;
    server transactions: ``start(now)``, ``on_request(request, now)`` (retransmissions and ACK),
    ``respond(response, now)`` (the transaction user, TU, answering);
    all: ``on_timer(now)`` once ``now >= next_deadline``, ``on_transport_error(now)``.

Actions, to be executed in list order by the asyncio layer
    :class:`Transmit` -- send the message on this transaction's flow/destination;
    :class:`PassResponse` -- hand a received response to the TU (client side);
    :class:`PassRequest` -- hand a request to the TU. Only the ACK to a 2xx that arrives while an
    INVITE server transaction is Accepted; the request that *creates* a server transaction is given
    to the TU by the caller, never through an action;
    :class:`TransactionFailed` -- the transaction gave up (see below);
    :class:`Terminate` -- the transaction is finished: forget it.

Failures (one way only)
    A client transaction that times out (Timer B or F) or meets a transport error emits exactly one
    ``TransactionFailed(408 | 503, why, response)`` and never a PassResponse for it. ``response`` is
    a locally built response (:func:`synthetic_response`: the request's Via/From/To/Call-ID/CSeq) that
    the TU may push through its ordinary final-response path, as §8.1.3.1 asks. A server
    transaction reports Timer H (no ACK came) as 408 and a transport error as 503, with no response.

Timers
    Retransmission timers (A, E, G) exist on unreliable transports only and are re-armed from the
    moment they fire, as the RFC words it. Zero-length timers (D, I, J, K on reliable transports)
    are never armed: the transaction terminates within the same call. RFC 6026: a 2xx to INVITE moves
    the client transaction to Accepted for Timer M and the server transaction to Accepted for
    Timer L (both 64*T1) instead of terminating at once, so 2xx retransmissions and forks still reach
    the TU and retransmitted INVITEs are not mistaken for new requests.

Bookkeeping
    :class:`TransactionTable` matches responses (§17.1.3) and requests (§17.2.3, pre-3261 fallback
    included, CANCEL per §9.2) and is the one schedule of every transaction's deadlines (a lazily
    invalidated heap). Route every event through it: ``actions = table.update(tx, tx.respond(resp,
    now))`` re-arms the heap and drops the transaction once terminated; ``table.next_deadline()``
    tells the loop when to wake and ``table.on_timer(now)`` fires whatever is due. The asyncio
    layer (:mod:`sipis.sip.endpoint`) keeps one loop timer armed at ``next_deadline()``, nothing more.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import NamedTuple, TypeAlias

from sipis.sip.message import Headers, Request, Response, make_response

MAGIC_COOKIE = "z9hG4bK"


@dataclass(frozen=True)
class TimerSettings:
    """RFC 3261 §17.1.1.1 / Table 4 base values, in seconds."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    #: Timer D is "at least 32 s" on unreliable transports, independent of T1.
    timer_d: float = 32.0

    def __post_init__(self) -> None:
        if self.t1 <= 0 or self.t2 < self.t1 or self.t4 < 0 or self.timer_d < 0:
            raise ValueError(f"invalid timer settings {self}")

    @property
    def timeout(self) -> float:
        """64*T1: Timers B, F, H, J (unreliable), L and M."""
        return 64 * self.t1


DEFAULT_TIMERS = TimerSettings()


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send ``message`` on this transaction's flow/destination."""

    message: Request | Response


@dataclass(frozen=True, slots=True)
class PassResponse:
    """Client transaction → TU: a received provisional or final response."""

    response: Response


@dataclass(frozen=True, slots=True)
class PassRequest:
    """Server transaction → TU: a request the TU must see (the ACK to a 2xx while Accepted)."""

    request: Request


@dataclass(frozen=True, slots=True)
class TransactionFailed:
    """The transaction gave up: 408 when a timer ran out, 503 on a transport error.

    ``response`` is the synthetic response for client transactions, ``None`` for server ones.
    """

    status: int
    reason: str
    response: Response | None = None


@dataclass(frozen=True, slots=True)
class Terminate:
    """The transaction reached Terminated: remove it from every table."""


_TERMINATE = Terminate()  # immutable and without fields: one instance serves every transaction


Action: TypeAlias = Transmit | PassResponse | PassRequest | TransactionFailed | Terminate


class State(Enum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


class Timer(StrEnum):
    """RFC 3261 timer names (L and M from RFC 6026)."""

    A = "A"
    B = "B"
    D = "D"
    E = "E"
    F = "F"
    G = "G"
    H = "H"
    I = "I"  # noqa: E741 - the RFC's name
    J = "J"
    K = "K"
    L = "L"
    M = "M"



# --------------------------------------------------------------------------- keys


class ClientKey(NamedTuple):
    """§17.1.3: the top Via branch plus the CSeq method (a CANCEL shares the INVITE's branch).

    A named tuple rather than a frozen dataclass: it is built, hashed and compared for every
    message of every client transaction, and a tuple does all three in C.
    """

    branch: str
    method: str


@dataclass(frozen=True)
class ServerKey:
    """§17.2.3 for magic-cookie branches: branch, sent-by and method (ACK counts as INVITE)."""

    branch: str
    sent_by: str
    method: str


@dataclass(frozen=True)
class LegacyServerKey:
    """§17.2.3 for RFC 2543 requests (no magic cookie).

    ``to_tag`` is ``None`` for the INVITE family: the ACK carries the tag of *our* response, not
    the INVITE's, so the table compares To tags apart for INVITE, ACK and CANCEL targets.
    """

    request_uri: str
    from_tag: str | None
    call_id: str
    cseq_number: int
    top_via: str
    method: str
    to_tag: str | None


ServerTransactionKey: TypeAlias = ServerKey | LegacyServerKey


def client_key(message: Request | Response) -> ClientKey:
    """The client-transaction key of our request or of a response to it; ValueError without branch."""
    branch = message.branch
    if not branch:
        raise ValueError("top Via has no branch")
    return ClientKey(branch, message.cseq[1])


def server_key(request: Request, method: str | None = None) -> ServerTransactionKey:
    """The server-transaction key of ``request``; ``method`` overrides the matched method (§9.2)."""
    via = request.shared_top_via()
    if method is None:
        method = "INVITE" if request.method == "ACK" else request.method
    if via.branch and via.branch.startswith(MAGIC_COOKIE):
        return ServerKey(via.branch, via.sent_by.lower(), method)
    return LegacyServerKey(
        request_uri=request.uri,
        from_tag=request.from_.tag,
        call_id=request.call_id,
        cseq_number=request.cseq[0],
        top_via=str(via),
        method=method,
        to_tag=None if method == "INVITE" else request.to.tag,
    )


# --------------------------------------------------------------------------- message helpers


def synthetic_response(request: Request, status: int, reason: str | None = None) -> Response:
    """A locally generated response to ``request`` (Via, From, To, Call-ID, CSeq copied) for the TU."""
    return make_response(request, status, reason)


def build_ack(invite: Request, response: Response) -> Request:
    """The ACK for a 3xx–6xx response (§17.1.1.3); the ACK for a 2xx is the dialog's business."""
    return _request_like(invite, "ACK", to=response.headers.get("To") or "")


def build_cancel(invite: Request) -> Request:
    """A CANCEL for ``invite`` (§9.1): same Request-URI, Call-ID, From, To, CSeq number, top Via, Route."""
    return _request_like(invite, "CANCEL", to=invite.headers.get("To") or "")


def _request_like(invite: Request, method: str, *, to: str) -> Request:
    if invite.method != "INVITE":
        raise ValueError(f"{method} can only be built for an INVITE, not {invite.method}")
    top_via = invite.headers.get("Via")
    if top_via is None:
        raise ValueError("INVITE has no Via")
    headers = Headers([("Via", top_via), ("Max-Forwards", invite.headers.get("Max-Forwards") or "70")])
    for route in invite.headers.raw_values("Route"):
        headers.add("Route", route)
    headers.add("From", invite.headers.get("From") or "")
    headers.add("To", to)
    headers.add("Call-ID", invite.call_id)
    headers.add("CSeq", f"{invite.cseq[0]} {method}")
    return Request(method, invite.uri, headers)


# --------------------------------------------------------------------------- transactions


class Transaction:
    """What all four machines share: the request, the state and a set of named deadlines.

    Client transactions have ``__slots__`` (many of them are alive at once under load); server
    transactions keep a ``__dict__``.
    """

    # ``key`` is declared by the client and server subclasses, each with its own type (mypyc, which
    # compiles this module, does not let a subclass narrow an attribute's type)
    __slots__ = ("_deadlines", "_interval", "key", "reliable", "request", "state", "timers")

    def __init__(self, request: Request, *, reliable: bool, timers: TimerSettings, state: State) -> None:
        self.request = request
        self.reliable = reliable
        self.timers = timers
        self.state = state
        self._deadlines: dict[Timer, float] = {}
        self._interval = timers.t1  # current retransmission interval (A, E, G)

    @property
    def next_deadline(self) -> float | None:
        """When ``on_timer`` must next be called; ``None`` when no timer is armed."""
        earliest: float | None = None
        for deadline in self._deadlines.values():
            if earliest is None or deadline < earliest:
                earliest = deadline
        return earliest

    @property
    def armed_timers(self) -> dict[Timer, float]:
        """Armed timers and their absolute deadlines (for traces and the console)."""
        return dict(self._deadlines)

    def on_timer(self, now: float) -> list[Action]:
        """Fire every timer due at ``now``, earliest first; afterwards next_deadline > now or None."""
        actions: list[Action] = []
        while self.state is not State.TERMINATED:
            due = [(deadline, timer) for timer, deadline in self._deadlines.items() if deadline <= now]
            if not due:
                break
            _, timer = min(due)
            del self._deadlines[timer]
            actions += self._fire(timer, now)
        return actions

    def on_transport_error(self, now: float) -> list[Action]:
        raise NotImplementedError

    def _fire(self, timer: Timer, now: float) -> list[Action]:
        raise NotImplementedError

    def _arm(self, timer: Timer, now: float, delay: float) -> None:
        self._deadlines[timer] = now + delay

    def _start_retransmitting(self, timer: Timer, now: float) -> None:
        if not self.reliable:  # reliable transports retransmit for us (§17.1.1.2, §17.1.2.2, §17.2.1)
            self._interval = self.timers.t1
            self._arm(timer, now, self._interval)

    def _terminate(self) -> list[Action]:
        self.state = State.TERMINATED
        self._deadlines.clear()
        return [_TERMINATE]

    def _linger(self, state: State, timer: Timer, now: float, delay: float) -> list[Action]:
        """Enter a state that only absorbs stragglers; with nothing to wait for, terminate at once."""
        self._deadlines.clear()
        if delay <= 0:
            return self._terminate()
        self.state = state
        self._arm(timer, now, delay)
        return []

    def _unreliable(self, delay: float) -> float:
        """``delay`` on unreliable transports, zero on reliable ones (Timers D, I, J, K)."""
        return 0.0 if self.reliable else delay

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'key', None)} {self.state.value}>"


class ClientTransaction(Transaction):
    __slots__ = ("_started",)

    key: ClientKey

    def __init__(self, request: Request, *, reliable: bool, timers: TimerSettings, state: State,
                 key: ClientKey | None = None) -> None:
        """``key`` is ``client_key(request)`` when the caller knows it already (it put the Via on)."""
        super().__init__(request, reliable=reliable, timers=timers, state=state)
        self.key = key if key is not None else client_key(request)
        self._started = False

    def start(self, now: float) -> list[Action]:
        """Send the request and arm the timers; call exactly once."""
        if self._started:
            raise RuntimeError(f"{self!r} already started")
        self._started = True
        self._arm_initial(now)
        return [Transmit(self.request)]

    def on_response(self, response: Response, now: float) -> list[Action]:
        raise NotImplementedError

    def on_transport_error(self, now: float) -> list[Action]:
        if self.state in (State.CALLING, State.TRYING, State.PROCEEDING):
            return self._fail(503, "transport error")
        if self.state is State.TERMINATED:
            return []
        return self._terminate()  # the TU already has its final response

    def _arm_initial(self, now: float) -> None:
        raise NotImplementedError

    def _fail(self, status: int, why: str) -> list[Action]:
        failed = TransactionFailed(status, why, synthetic_response(self.request, status))
        return [failed, *self._terminate()]


class ClientNonInviteTransaction(ClientTransaction):
    """§17.1.2: Trying → Proceeding → Completed → Terminated; Timers E, F, K."""

    __slots__ = ()

    def __init__(self, request: Request, *, reliable: bool, timers: TimerSettings = DEFAULT_TIMERS,
                 key: ClientKey | None = None) -> None:
        super().__init__(request, reliable=reliable, timers=timers, state=State.TRYING, key=key)

    def _arm_initial(self, now: float) -> None:
        self._start_retransmitting(Timer.E, now)
        self._arm(Timer.F, now, self.timers.timeout)

    def on_response(self, response: Response, now: float) -> list[Action]:
        if self.state not in (State.TRYING, State.PROCEEDING):
            return []  # Completed absorbs retransmitted finals
        if response.status < 200:
            self.state = State.PROCEEDING
            return [PassResponse(response)]
        return [PassResponse(response),
                *self._linger(State.COMPLETED, Timer.K, now, self._unreliable(self.timers.t4))]

    def _fire(self, timer: Timer, now: float) -> list[Action]:
        if timer is Timer.E:
            # Trying doubles up to T2; once a provisional came, the peer is alive: every T2.
            t2 = self.timers.t2
            self._interval = t2 if self.state is State.PROCEEDING else min(2 * self._interval, t2)
            self._arm(Timer.E, now, self._interval)
            return [Transmit(self.request)]
        if timer is Timer.F:
            return self._fail(408, "no final response (Timer F)")
        if timer is Timer.K:
            return self._terminate()
        raise AssertionError(f"unexpected timer {timer}")


class ClientInviteTransaction(ClientTransaction):
    """§17.1.1 (+ RFC 6026): Calling → Proceeding → Completed | Accepted → Terminated; A, B, D, M.

    Like the RFC, Proceeding has no timer: the TU bounds a ringing INVITE itself (CANCEL, §9.1).
    """

    __slots__ = ("ack",)

    def __init__(self, request: Request, *, reliable: bool, timers: TimerSettings = DEFAULT_TIMERS,
                 key: ClientKey | None = None) -> None:
        super().__init__(request, reliable=reliable, timers=timers, state=State.CALLING, key=key)
        self.ack: Request | None = None  # built on the first 3xx–6xx, re-sent on its retransmissions

    def _arm_initial(self, now: float) -> None:
        self._start_retransmitting(Timer.A, now)
        self._arm(Timer.B, now, self.timers.timeout)

    def on_response(self, response: Response, now: float) -> list[Action]:
        status = response.status
        if self.state in (State.CALLING, State.PROCEEDING):
            if status < 200:
                self.state = State.PROCEEDING
                self._deadlines.clear()  # no more A, and B only guards Calling
                return [PassResponse(response)]
            if status < 300:
                return [PassResponse(response),
                        *self._linger(State.ACCEPTED, Timer.M, now, self.timers.timeout)]
            self.ack = build_ack(self.request, response)
            return [Transmit(self.ack), PassResponse(response),
                    *self._linger(State.COMPLETED, Timer.D, now, self._unreliable(self.timers.timer_d))]
        if self.state is State.ACCEPTED and 200 <= status < 300:
            return [PassResponse(response)]  # retransmission or fork: the TU ACKs each 2xx
        if self.state is State.COMPLETED and status >= 300 and self.ack is not None:
            return [Transmit(self.ack)]  # our ACK was lost
        return []

    def _fire(self, timer: Timer, now: float) -> list[Action]:
        if timer is Timer.A:
            self._interval *= 2  # no T2 cap for INVITE (§17.1.1.2)
            self._arm(Timer.A, now, self._interval)
            return [Transmit(self.request)]
        if timer is Timer.B:
            return self._fail(408, "no response (Timer B)")
        if timer in (Timer.D, Timer.M):
            return self._terminate()
        raise AssertionError(f"unexpected timer {timer}")


class ServerTransaction(Transaction):
    key: ServerTransactionKey

    def __init__(self, request: Request, *, reliable: bool, timers: TimerSettings, state: State) -> None:
        super().__init__(request, reliable=reliable, timers=timers, state=state)
        self.key = server_key(request)
        self.last_response: Response | None = None

    def start(self, now: float) -> list[Action]:
        """Actions due when the transaction is created (the caller hands the request to the TU)."""
        return []

    def on_request(self, request: Request, now: float) -> list[Action]:
        """A matched request: a retransmission, or the ACK of an INVITE transaction."""
        raise NotImplementedError

    def respond(self, response: Response, now: float) -> list[Action]:
        """The TU's response; responses the state does not allow are discarded (§17.2.2)."""
        raise NotImplementedError

    def on_transport_error(self, now: float) -> list[Action]:
        if self.state is State.TERMINATED:
            return []
        return [TransactionFailed(503, "transport error"), *self._terminate()]

    def _send(self, response: Response) -> list[Action]:
        self.last_response = response
        return [Transmit(response)]


class ServerInviteTransaction(ServerTransaction):
    """§17.2.1 (+ RFC 6026): Proceeding → Completed → Confirmed | Accepted → Terminated; G, H, I, L."""

    def __init__(self, request: Request, *, reliable: bool, timers: TimerSettings = DEFAULT_TIMERS) -> None:
        super().__init__(request, reliable=reliable, timers=timers, state=State.PROCEEDING)

    def start(self, now: float) -> list[Action]:
        """Send 100 Trying at once: it stops the caller's Timer A retransmissions (§17.2.1)."""
        timestamp = self.request.headers.get("Timestamp")  # §8.2.6.1: echoed in 100
        extra = [("Timestamp", timestamp)] if timestamp is not None else []
        return self._send(make_response(self.request, 100, headers=extra))

    def on_request(self, request: Request, now: float) -> list[Action]:
        if request.method == "ACK":
            if self.state is State.COMPLETED:
                return self._linger(State.CONFIRMED, Timer.I, now, self._unreliable(self.timers.t4))
            if self.state is State.ACCEPTED:
                return [PassRequest(request)]
            return []  # Confirmed absorbs ACK retransmissions
        if self.state in (State.PROCEEDING, State.COMPLETED) and self.last_response is not None:
            return [Transmit(self.last_response)]
        return []  # Confirmed and Accepted absorb INVITE retransmissions

    def respond(self, response: Response, now: float) -> list[Action]:
        status = response.status
        if self.state is State.PROCEEDING:
            if status < 200:
                return self._send(response)
            if status < 300:
                return [*self._send(response),
                        *self._linger(State.ACCEPTED, Timer.L, now, self.timers.timeout)]
            actions = self._send(response)
            self.state = State.COMPLETED
            self._start_retransmitting(Timer.G, now)
            self._arm(Timer.H, now, self.timers.timeout)
            return actions
        if self.state is State.ACCEPTED and 200 <= status < 300:
            return self._send(response)  # the TU's own 2xx retransmission
        return []

    def _fire(self, timer: Timer, now: float) -> list[Action]:
        if timer is Timer.G and self.last_response is not None:
            self._interval = min(2 * self._interval, self.timers.t2)
            self._arm(Timer.G, now, self._interval)
            return [Transmit(self.last_response)]
        if timer is Timer.H:
            return [TransactionFailed(408, "no ACK for the final response (Timer H)"), *self._terminate()]
        if timer in (Timer.I, Timer.L):
            return self._terminate()
        raise AssertionError(f"unexpected timer {timer}")


class ServerNonInviteTransaction(ServerTransaction):
    """§17.2.2: Trying → Proceeding → Completed → Terminated; Timer J."""

    def __init__(self, request: Request, *, reliable: bool, timers: TimerSettings = DEFAULT_TIMERS) -> None:
        super().__init__(request, reliable=reliable, timers=timers, state=State.TRYING)

    def on_request(self, request: Request, now: float) -> list[Action]:
        if self.last_response is not None and self.state in (State.PROCEEDING, State.COMPLETED):
            return [Transmit(self.last_response)]
        return []  # Trying: the TU has not answered yet, nothing to repeat

    def respond(self, response: Response, now: float) -> list[Action]:
        if self.state not in (State.TRYING, State.PROCEEDING):
            return []
        actions = self._send(response)
        if response.status < 200:
            self.state = State.PROCEEDING
            return actions
        return [*actions, *self._linger(State.COMPLETED, Timer.J, now,
                                        self._unreliable(self.timers.timeout))]

    def _fire(self, timer: Timer, now: float) -> list[Action]:
        if timer is Timer.J:
            return self._terminate()
        raise AssertionError(f"unexpected timer {timer}")


# --------------------------------------------------------------------------- table


class TransactionTable:
    """Live transactions: matching (§17.1.3, §17.2.3, §9.2) and the one schedule of their deadlines.

    The heap is lazily invalidated: an entry counts only while it equals the deadline last recorded
    for its transaction by :meth:`update`, so re-arming and removal never search the heap. Stale
    entries are skipped when they reach the top and dropped in bulk once they outnumber the live
    ones, so an ended transaction is not kept alive (with its request) until its longest timer
    would have run out.

    A non-INVITE client transaction in Completed (Timer K, unreliable transports) has nothing left
    to do but absorb retransmissions of its final response and end without a word: the table keeps
    only its key and the end of its Timer K (:meth:`absorbs`), not the transaction and its request.
    """

    def __init__(self) -> None:
        self._clients: dict[ClientKey, ClientTransaction] = {}
        self._servers: dict[ServerTransactionKey, ServerTransaction] = {}
        self._heap: list[tuple[float, int, Transaction]] = []
        self._armed: dict[Transaction, float] = {}
        self._order = itertools.count()  # heap tie-breaker: transactions do not compare
        #: keys of non-INVITE client transactions in Completed -> the end of their Timer K
        self._completed: dict[ClientKey, float] = {}
        #: the same in the order they came; with one T4 for all of them that is expiry order (a
        #: key found out of order is only forgotten later: absorbs() compares its own deadline)
        self._completed_order: collections.deque[tuple[float, ClientKey]] = collections.deque()

    def __len__(self) -> int:
        return len(self._clients) + len(self._servers)

    @property
    def pending(self) -> int:
        """Transactions not yet terminated, those in Completed kept as their key included."""
        return len(self._clients) + len(self._servers) + len(self._completed)

    def __iter__(self) -> Iterator[Transaction]:
        yield from list(self._clients.values())
        yield from list(self._servers.values())

    def __contains__(self, tx: object) -> bool:
        if isinstance(tx, ClientTransaction):
            return self._clients.get(tx.key) is tx
        if isinstance(tx, ServerTransaction):
            return self._servers.get(tx.key) is tx
        return False

    def contains(self, tx: Transaction) -> bool:
        """``tx in table``, spelled as a method."""
        return tx in self

    def add(self, tx: Transaction) -> None:
        """Register ``tx``; ValueError if its key is taken (a branch reuse or a missed match)."""
        if isinstance(tx, ClientTransaction):
            if tx.key in self._clients:
                raise ValueError(f"duplicate client transaction {tx.key}")
            self._clients[tx.key] = tx
            if not tx._deadlines:
                return  # not armed (not started yet), nor in _armed: nothing to record
        elif isinstance(tx, ServerTransaction):
            if tx.key in self._servers:
                raise ValueError(f"duplicate server transaction {tx.key}")
            self._servers[tx.key] = tx
        else:
            raise TypeError(f"not a transaction: {tx!r}")
        self._rearm(tx)

    def remove(self, tx: Transaction) -> None:
        """Forget ``tx`` (idempotent)."""
        if isinstance(tx, ClientTransaction) and self._clients.get(tx.key) is tx:
            del self._clients[tx.key]
        elif isinstance(tx, ServerTransaction) and self._servers.get(tx.key) is tx:
            del self._servers[tx.key]
        self._armed.pop(tx, None)

    def start(self, tx: ClientTransaction | ServerTransaction, now: float) -> list[Action]:
        """Add ``tx`` and start it: the usual way to create a transaction."""
        self.add(tx)
        return self.update(tx, tx.start(now))

    def update(self, tx: Transaction, actions: list[Action]) -> list[Action]:
        """Record the outcome of any event on ``tx``: re-arm its deadline, drop it once terminated
        (or keep only its key, in Completed: see the class).

        Returns ``actions`` unchanged, so calls wrap: ``table.update(tx, tx.respond(r, now))``.
        """
        state = tx.state
        if state is State.TERMINATED:
            self.remove(tx)
        elif state is State.COMPLETED and isinstance(tx, ClientNonInviteTransaction):
            self._retire(tx)
        else:
            self._rearm(tx)
        return actions

    def next_deadline(self) -> float | None:
        """The earliest deadline of any transaction, or ``None``."""
        heap, armed = self._heap, self._armed
        deadline: float | None = None
        while heap:
            first = heap[0]
            if armed.get(first[2]) == first[0]:
                deadline = first[0]
                break
            heapq.heappop(heap)  # stale: re-armed, disarmed or removed since
        order = self._completed_order
        if order and (deadline is None or order[0][0] < deadline):
            return order[0][0]
        return deadline

    def on_timer(self, now: float) -> list[tuple[Transaction, list[Action]]]:
        """Fire every transaction due at ``now``; terminated ones are removed already."""
        heap, armed = self._heap, self._armed
        due: list[Transaction] = []
        while heap and heap[0][0] <= now:
            deadline, _, tx = heapq.heappop(heap)
            if armed.get(tx) == deadline:
                del armed[tx]
                due.append(tx)
        order, completed = self._completed_order, self._completed
        while order and order[0][0] <= now:
            deadline, key = order.popleft()
            if completed.get(key) == deadline:
                del completed[key]
        return [(tx, self.update(tx, tx.on_timer(now))) for tx in due]

    def absorbs(self, response: Response, now: float) -> bool:
        """Whether ``response`` is for a transaction in Completed, kept as its key: a retransmission
        of its final response, which the transaction would absorb (§17.1.2.2)."""
        if not self._completed:
            return False
        try:
            deadline = self._completed.get(client_key(response))
        except ValueError:
            return False
        return deadline is not None and deadline > now

    def match_response(self, response: Response) -> ClientTransaction | None:
        """The client transaction ``response`` belongs to, or ``None`` (§17.1.3)."""
        try:
            branch = response.branch
            # client_key(response), as the plain tuple it equals and hashes like: ClientKey's
            # __new__ is Python code, and building the key cost 2.2 % of a registration's
            # instructions (register_rate under callgrind, UDP: 9k of 415k)
            return self._clients.get((branch, response.cseq[1])) if branch else None  # type: ignore[call-overload]
        except ValueError:  # SipParseError included: no Via, CSeq or branch
            return None

    def match_request(self, request: Request) -> ServerTransaction | None:
        """The server transaction ``request`` belongs to (a retransmission or ACK), or ``None``.

        ``None`` means a new request; an unmatched ACK (to a 2xx) never creates a transaction.
        """
        try:
            key = server_key(request)
            tx = self._servers.get(key)
            if tx is None or not _legacy_invite(key):
                return tx
            if request.method == "ACK":
                final = tx.last_response
                if final is None or final.status < 200:
                    return None
                expected = final.to.tag
            else:
                expected = tx.request.to.tag
            return tx if request.to.tag == expected else None
        except ValueError:
            return None

    def find_cancel_target(self, cancel: Request) -> ServerInviteTransaction | None:
        """The INVITE server transaction a CANCEL refers to (§9.2), or ``None``."""
        try:
            key = server_key(cancel, method="INVITE")
            tx = self._servers.get(key)
            if not isinstance(tx, ServerInviteTransaction):
                return None
            if _legacy_invite(key) and cancel.to.tag != tx.request.to.tag:
                return None
            return tx
        except ValueError:
            return None

    def _rearm(self, tx: Transaction) -> None:
        deadline = tx.next_deadline
        armed = self._armed
        if deadline is None:
            armed.pop(tx, None)
        elif armed.get(tx) != deadline:
            armed[tx] = deadline
            heap = self._heap
            heapq.heappush(heap, (deadline, next(self._order), tx))
            if len(heap) > 2 * len(armed) + 64:  # mostly stale: keep the live entries only
                self._heap = [entry for entry in heap if armed.get(entry[2]) == entry[0]]
                heapq.heapify(self._heap)

    def _retire(self, tx: ClientNonInviteTransaction) -> None:
        """Keep only the key of ``tx``, which entered Completed, until its Timer K ends."""
        deadline = tx._deadlines.get(Timer.K)  # its only timer in Completed
        self.remove(tx)
        if deadline is not None:
            self._completed[tx.key] = deadline
            self._completed_order.append((deadline, tx.key))


def _legacy_invite(key: ServerTransactionKey) -> bool:
    """Whether the To tag still has to be compared by hand (pre-3261 INVITE family)."""
    return isinstance(key, LegacyServerKey) and key.method == "INVITE"
