"""One REGISTER exchange (RFC 3261 §10, RFC 5626 §4.2), digest and 423 included, sans-I/O.

Shape
-----
:class:`RegisterExchange` is a plain state machine like those of :mod:`sipis.sip.transaction`: every
input is a method call that takes the current monotonic time ``now``; nothing in it sleeps, reads a
clock or touches a socket, so every protocol path is testable without an event loop.

Inputs
    ``start(now)`` once; ``on_response(response, now)`` with the final response to the REGISTER
    it gave last (a local ``408``/``503`` from the transaction layer included);
    ``on_error(detail)`` when that REGISTER's transaction ended without a final response.

Outputs
    The next REGISTER to send as a new client transaction (a new branch, CSeq + 1), or the
    :class:`RegisterResult`: the exchange is over.

Protocol
    401/407 are answered with the strongest challenge we can answer (never copying a To-tag); a
    challenge repeated for the same credentials (not ``stale``), a nonce answered before or more
    than :data:`MAX_AUTH_ROUNDS` rounds end in ``unauthorized`` instead of a loop. 423 is retried
    once with its Min-Expires (the same credentials with the next nc). A refresh carries the
    credentials the registrar accepted last time (same nonce, next nc, only to the same remote
    address) so it takes one transaction instead of two; a challenge to them is answered as usual.
    Scheduling refreshes and backing off is the caller's job (the registration engine); this
    module only says what happened.

Failures
    A digest that cannot go on (nonce count used up) raises :class:`~sipis.sip.digest.DigestError`
    from the input that needed it.

:func:`register` is the asyncio shell: it sends each REGISTER through
:meth:`SipEndpoint.send_request <sipis.sip.endpoint.SipEndpoint.send_request>` and feeds the final
response back, straight from the endpoint (a 401 is answered without a trip through the event loop).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from enum import Enum

from sipis.sip.digest import (
    Challenge,
    Credentials,
    DigestSession,
    choose_challenge,
    header_names,
    parse_challenges,
)
from sipis.sip.endpoint import ResponseCallback, SipEndpoint
from sipis.sip.message import (
    Headers,
    NameAddr,
    Request,
    Response,
    SipURI,
    _parse_generic_params,
    canonical_name,
    format_address,
    format_params,
    header_key,
    is_token,
    make_via,
    new_call_id,
    new_tag,
)
from sipis.sip.transport import Flow, TransportError

log = logging.getLogger(__name__)

#: How many 401/407 rounds one exchange may take (a stale nonce costs one extra).
MAX_AUTH_ROUNDS = 3

#: Fencing (RFC 3261 §10.3): with a Call-ID derived from the instance, CSeq = epoch << EPOCH_SHIFT | n,
#: so every REGISTER of a newer owner (a higher epoch) outnumbers every one of an older owner.
EPOCH_SHIFT = 16
#: REGISTERs one exchange may send at most (the auth rounds, a stale nonce and a 423 retry)
EXCHANGE_MAX_REQUESTS = MAX_AUTH_ROUNDS + 2
_EPOCH_MASK = (1 << EPOCH_SHIFT) - 1


class Outcome(Enum):
    REGISTERED = "registered"      # 2xx with our contact bound (or removed, for expires=0)
    UNAUTHORIZED = "unauthorized"  # 403, or credentials rejected / challenge we cannot answer
    REJECTED = "rejected"          # another 4xx/6xx: configuration problem, do not hammer
    FAILED = "failed"              # 5xx, timeout (408), transport failure (503): retry with backoff
    FENCED = "fenced"              # not sent: this node's lease on the binding is gone (sipis.cluster)


@dataclass(slots=True)
class Binding:
    """Everything needed to register one contact for one AOR. Call-ID and CSeq persist across refreshes."""

    aor: SipURI
    registrar: SipURI
    credentials: Credentials
    contact_params: dict[str, str | None] = field(default_factory=dict)
    display_name: str | None = None
    user_agent: str | None = None
    call_id: str = field(default_factory=new_call_id)
    from_tag: str = field(default_factory=new_tag)
    cseq: int = 0
    digest: DigestSession | None = None
    #: user part of our Contact; unique per instance so an INVITE's Request-URI names the instance
    contact_user: str | None = None
    #: the contact URI sent last time (to remove exactly it on unREGISTER)
    contact_uri: str | None = None
    #: the owner's epoch the CSeq counts in (0: unfenced, a random Call-ID counting from 1)
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.digest is None:
            self.digest = DigestSession(self.credentials)

    def begin_epoch(self, epoch: int, call_id: str) -> None:
        """Count CSeqs in ``epoch`` under ``call_id`` (the same on every node for this binding)."""
        self.epoch, self.call_id, self.cseq = epoch, call_id, epoch << EPOCH_SHIFT

    @property
    def epoch_used_up(self) -> bool:
        """Would one more exchange overflow the CSeqs of this epoch into the next one's?"""
        return self.epoch > 0 and (self.cseq & _EPOCH_MASK) > _EPOCH_MASK - EXCHANGE_MAX_REQUESTS

    @property
    def request_uri(self) -> str:
        """RFC 3261 §10.2: the Request-URI names the registrar's domain, no userinfo."""
        aor, registrar = self.aor, self.registrar
        if registrar.host == aor.host and registrar.port:
            return f"{aor.scheme}:{aor.host}:{registrar.port}"
        return f"{aor.scheme}:{aor.host}"


@dataclass(slots=True)
class RegisterResult:
    outcome: Outcome
    status: int
    reason: str
    expires: int = 0
    retry_after: float | None = None
    response: Response | None = None
    #: the flow the exchange ran on (set by :func:`register`)
    flow: Flow | None = None
    detail: str = ""
    #: REGISTER transactions the exchange used (a challenged REGISTER and its retry: 2); what the
    #: engine's pacing charges
    transactions: int = 1
    #: the registrar target (``transport:host:port``) that gave this result ("" when none was tried)
    target: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.REGISTERED


# --------------------------------------------------------------------------- the exchange


class RegisterExchange:
    """One exchange for ``binding`` from ``local`` over ``transport`` to the registrar at
    ``remote`` (the address credentials are offered again to; compared by equality), asking for
    ``expires`` (0: remove our contact). ``user_agent`` goes into each REGISTER unless the binding
    names its own. The binding is updated as the exchange goes (CSeq, Contact, digest state)."""

    __slots__ = ("answered", "answered_nonces", "authorization", "binding", "expires", "local",
                 "min_expires_tried", "remote", "result", "reused", "rounds", "transport", "user_agent")

    def __init__(self, binding: Binding, expires: int, *, transport: str, local: tuple[str, int],
                 remote: object, user_agent: str | None = None) -> None:
        self.binding = binding
        self.expires = expires
        self.transport = transport
        self.local = local
        self.remote = remote
        self.user_agent = user_agent
        #: the credentials header (name, value) the next REGISTER carries
        self.authorization: tuple[str, str] | None = None
        self.reused = False  # the credentials in flight were offered unasked (DigestSession.reuse)
        #: (challenge, header, when) our credentials in flight answer, if asked for in this exchange
        self.answered: tuple[Challenge, str, float] | None = None
        self.answered_nonces: list[str] = []
        self.min_expires_tried = False
        self.rounds = 0
        #: the verdict, once there is one
        self.result: RegisterResult | None = None

    def start(self, now: float) -> Request:
        """The first REGISTER: with the credentials accepted last time, where the digest session
        offers them again for this registrar."""
        if self.rounds:
            raise RuntimeError("the exchange has started already")
        self.authorization = self._digest().reuse("REGISTER", self.binding.request_uri, now, self.remote)
        self.reused = self.authorization is not None
        return self._next_request()

    def on_response(self, response: Response, now: float) -> Request | RegisterResult:
        """The final response to the last REGISTER: the next REGISTER, or the verdict."""
        if self.result is not None:
            raise RuntimeError("the exchange is over")
        result = self._verdict(response, now)
        if result is None and self.rounds >= EXCHANGE_MAX_REQUESTS:
            result = RegisterResult(Outcome.UNAUTHORIZED, 401, "Unauthorized", detail="too many rounds")
        if result is None:
            return self._next_request()
        self.result = result
        return result

    def on_error(self, detail: str) -> RegisterResult:
        """The last REGISTER's transaction ended without a final response."""
        self.result = RegisterResult(Outcome.FAILED, 503, "Service Unavailable", detail=detail)
        return self.result

    def _digest(self) -> DigestSession:
        digest = self.binding.digest
        assert digest is not None  # Binding.__post_init__
        return digest

    def _next_request(self) -> Request:
        self.rounds += 1
        return build_register(self.binding, self.expires, self.authorization, transport=self.transport,
                              local=self.local, user_agent=self.user_agent)

    def _verdict(self, response: Response, now: float) -> RegisterResult | None:
        """The verdict on this final response, or None when another round is due (its credentials
        in :attr:`authorization`, its Expires in :attr:`expires`)."""
        status, binding, digest = response.status, self.binding, self._digest()
        if self.reused and (status == 401 or status == 407 or status == 403):
            self.reused = False  # not taken: no more offering of that nonce
            if status == 403:
                digest.forget_reuse()
            else:
                digest.reuse_refused(now)
        if status == 401 or status == 407:
            challenge_header, auth_header = header_names(status)
            challenge = _best_challenge(tuple(response.headers.get_all(challenge_header)))
            if challenge is None:
                return _result(Outcome.UNAUTHORIZED, response, "no digest challenge we can answer")
            answered = self.answered_nonces
            if answered and not challenge.stale:
                return _result(Outcome.UNAUTHORIZED, response, "credentials rejected")
            if challenge.nonce in answered or len(answered) >= MAX_AUTH_ROUNDS:
                return _result(Outcome.UNAUTHORIZED, response, "challenge loop")
            answered.append(challenge.nonce)
            self.authorization = (auth_header, digest.authorize(challenge, "REGISTER", binding.request_uri))
            self.answered = (challenge, auth_header, now)
            return None
        if status == 423 and not self.min_expires_tried:
            min_expires = _int_header(response, "Min-Expires")
            if min_expires is None or min_expires <= self.expires:
                return _result(Outcome.REJECTED, response, "423 without a usable Min-Expires")
            self.expires, self.min_expires_tried = min_expires, True
            self._renew_authorization(now)
            return None
        if 200 <= status < 300 and self.answered is not None:
            digest.accepted(*self.answered, self.remote)  # offer them again next time
        return _classify(response, self.expires, binding)

    def _renew_authorization(self, now: float) -> None:
        """The credentials for a retry of the same REGISTER: the same answer, with the next nc
        (a server that counts would take a repeated one for a replay)."""
        binding, digest = self.binding, self._digest()
        if self.answered is not None:
            challenge, header, _ = self.answered
            self.authorization = (header, digest.authorize(challenge, "REGISTER", binding.request_uri))
        elif self.reused:
            self.authorization = digest.reuse("REGISTER", binding.request_uri, now, self.remote)
            self.reused = self.authorization is not None


@functools.lru_cache(maxsize=64)
def _best_challenge(values: tuple[str, ...]) -> Challenge | None:
    """The challenge to answer among these header values (None: none we can answer).

    A pure function of the text, so it is cached: registrars that derive the nonce from the time
    (Kamailio, OpenSIPS) give every REGISTER of the same second the same challenge, and parsing
    it costs as much as the rest of the 401. Registrars with a fresh nonce per challenge
    (Asterisk, FreeSWITCH) just miss the cache.
    """
    return choose_challenge(parse_challenges(values))


# --------------------------------------------------------------------------- the asyncio shell


async def register(endpoint: SipEndpoint, binding: Binding, flow: Flow, expires: int) -> RegisterResult:
    """Register (or, with ``expires=0``, remove) our contact over ``flow``."""
    shell = _Shell(endpoint, flow, RegisterExchange(
        binding, expires, transport=flow.transport, local=flow.local, remote=flow.remote,
        user_agent=endpoint.user_agent))
    shell.send(shell.exchange.start(endpoint.now()))
    return await shell.future


class _Shell(ResponseCallback):
    """Runs one :class:`RegisterExchange` on the endpoint: each REGISTER's final response comes
    to :meth:`__call__` straight from the endpoint, which sends the next REGISTER from there; the
    verdict resolves :attr:`future`, which register() awaits. A caller that gives up cancels the
    future: the round in flight runs to its end, and no other follows it."""

    __slots__ = ("endpoint", "exchange", "flow", "future")

    def __init__(self, endpoint: SipEndpoint, flow: Flow, exchange: RegisterExchange) -> None:
        self.endpoint = endpoint
        self.flow = flow
        self.exchange = exchange
        self.future: asyncio.Future[RegisterResult] = endpoint.loop.create_future()

    def send(self, request: Request) -> None:
        self.endpoint.send_request(request, self.flow, self, branch=request.branch)

    def __call__(self, response: Response) -> None:
        if self.future.done():
            return  # the caller gave up
        try:
            step = self.exchange.on_response(response, self.endpoint.now())
        except Exception as exc:  # e.g. the next REGISTER could not be built: register() raises it
            self.future.set_exception(exc)
            return
        if isinstance(step, Request):
            self.send(step)
        else:
            self._resolve(step)

    def error(self, exc: TransportError) -> None:
        if not self.future.done():
            self._resolve(self.exchange.on_error(str(exc)))

    def cancel(self) -> None:
        self.future.cancel()

    def _resolve(self, result: RegisterResult) -> None:
        result.flow = self.flow
        result.transactions = self.exchange.rounds
        self.future.set_result(result)


# --------------------------------------------------------------------------- the REGISTER


def build_register(binding: Binding, expires: int, authorization: tuple[str, str] | None, *,
                   transport: str, local: tuple[str, int], user_agent: str | None = None) -> Request:
    """The next REGISTER for ``binding`` (CSeq + 1) sent from ``local`` over ``transport``: our Via
    with a new branch on top, then From, To, Call-ID, CSeq, Contact, Expires, Supported, the
    binding's User-Agent, the credentials (``authorization``: header name and value), Max-Forwards
    and ``user_agent`` when the binding has none (what SipEndpoint.add_via adds to a request).

    The request comes with its bytes written along (Request._prepared), as to_bytes() would write
    them: serialising the fields instead cost 3 % of a registration's instructions (register_rate
    under callgrind, UDP: 2 x 7k of 440k), and tests/sip/test_register.py holds the two equal."""
    binding.cseq += 1
    branch, via = make_via(transport, local)
    aor = binding.aor
    # From and To name the AOR without its password, parameters and headers, written as
    # str(NameAddr(...)) would: building the objects to print them cost 6 % of a registration's
    # instructions (register_rate under callgrind, UDP: 25k of 415k)
    hostport = aor.host if aor.port is None else f"{aor.host}:{aor.port}"
    aor_uri = f"{aor.scheme}:{aor.user}@{hostport}" if aor.user is not None else f"{aor.scheme}:{hostport}"
    contact_uri = binding.contact_uri or _contact_uri(binding, transport, local)
    binding.contact_uri = contact_uri
    params = format_params(binding.contact_params) if binding.contact_params else ""
    display = binding.display_name
    cseq = binding.cseq
    names = ["Via", "From", "To", "Call-ID", "CSeq", "Contact", "Expires", "Supported"]
    keys = ["via", "from", "to", "call-id", "cseq", "contact", "expires", "supported"]
    values = [
        via,
        format_address(aor_uri, display, f";tag={binding.from_tag}"),
        format_address(aor_uri, display),
        binding.call_id,
        f"{cseq} REGISTER",
        f"<{contact_uri}>{params};expires={expires}",
        str(expires),
        "path, outbound",
    ]
    own_agent = credentials = their_agent = ""  # the optional lines, for the bytes
    agent = binding.user_agent or None
    if agent is not None:
        names.append("User-Agent")
        keys.append("user-agent")
        values.append(agent)
        own_agent = f"User-Agent: {agent}\r\n"
    if authorization is not None:
        name, key = _credentials_field(authorization[0])
        names.append(name)
        keys.append(key)
        values.append(authorization[1])
        credentials = f"{name}: {authorization[1]}\r\n"
    names.append("Max-Forwards")
    keys.append("max-forwards")
    values.append("70")
    if agent is None and user_agent:
        names.append("User-Agent")
        keys.append("user-agent")
        values.append(user_agent)
        their_agent = f"User-Agent: {user_agent}\r\n"
    uri = binding.request_uri
    request = Request("REGISTER", uri, Headers.from_canonical(names, keys, values))
    request._known_cseq(cseq, "REGISTER")  # as written above
    request._known_branch(branch)
    request._prepared(
        f"REGISTER {uri} SIP/2.0\r\nVia: {via}\r\nFrom: {values[1]}\r\nTo: {values[2]}\r\n"
        f"Call-ID: {values[3]}\r\nCSeq: {values[4]}\r\nContact: {values[5]}\r\nExpires: {values[6]}\r\n"
        f"Supported: {values[7]}\r\n{own_agent}{credentials}Max-Forwards: 70\r\n{their_agent}"
        "Content-Length: 0\r\n\r\n".encode("utf-8", "surrogateescape"))
    return request


_AUTH_FIELDS = {"Authorization": ("Authorization", "authorization"),
                "Proxy-Authorization": ("Proxy-Authorization", "proxy-authorization")}


def _credentials_field(name: str) -> tuple[str, str]:
    """(canonical name, key) of the credentials header ``name``, checked as Headers.add would."""
    known = _AUTH_FIELDS.get(name)
    if known is not None:
        return known
    canonical = canonical_name(name)  # some other spelling
    if not is_token(canonical):
        raise ValueError(f"refusing header {canonical[:40]!r}")
    return canonical, header_key(canonical)


def _contact_uri(binding: Binding, transport: str, local: tuple[str, int]) -> str:
    host, port = local
    host = f"[{host}]" if ":" in host else host
    params = "" if transport == "udp" else f";transport={transport}"
    user = binding.contact_user or binding.aor.user or "sipis"
    return f"sip:{user}@{host}:{port}{params}"


# --------------------------------------------------------------------------- the verdict


def _classify(response: Response, expires: int, binding: Binding) -> RegisterResult:
    status = response.status
    if 200 <= status < 300:
        granted = 0 if expires == 0 else _granted_expires(response, binding, expires)
        if expires > 0 and granted <= 0:
            return _result(Outcome.FAILED, response, "registrar did not bind our contact")
        return RegisterResult(Outcome.REGISTERED, status, response.reason, granted, response=response)
    if status == 403:
        return _result(Outcome.UNAUTHORIZED, response, "forbidden")
    if status in (408, 480) or 500 <= status < 600:
        result = _result(Outcome.FAILED, response, "")
        result.retry_after = _retry_after(response)
        return result
    return _result(Outcome.REJECTED, response, "")


def _granted_expires(response: Response, binding: Binding, requested: int) -> int:
    """The expiry the registrar gave *our* contact: its ``expires`` param, else the Expires header.

    A registrar lists every binding of the AOR; only those that can be ours are parsed (see
    :meth:`_OwnContact.may_match`), so a malformed foreign binding does not spoil our answer.
    """
    values = [value for value in response.headers.get_all("Contact") if value.strip() != "*"]
    ours: _OwnContact | None = None
    # The usual answer lists our URI as we wrote it, in <>: that one is ours (NameAddr.parse would
    # find this URI text, and it matches), and only its parameters need reading.
    echoed = f"<{binding.contact_uri}>" if binding.contact_uri is not None else None
    for value in values:
        if echoed is not None and value.startswith(echoed):
            params = value[len(echoed):]
            if params.startswith(";expires=") and params[9:].isdigit() and params[9:].isascii():
                # just ";expires=N": what _parse_generic_params reads (reading it cost 1.2 % of a
                # registration's instructions: register_rate under callgrind, UDP: 5.6k of 452k)
                return int(params[9:])
            expires = _parse_generic_params(params).get("expires")
        else:
            if ours is None:
                ours = _OwnContact(binding)
            if not ours.may_match(value):
                continue
            contact = NameAddr.parse(value)
            if not ours.matches(contact):
                continue
            expires = contact.params.get("expires")
        if expires is not None and expires.isdigit():
            return int(expires)
    header = _int_header(response, "Expires")
    if header is not None:
        return header
    return requested if not values else 0


class _OwnContact:
    """What identifies our binding in a registrar's Contact list: the same URI (user, host in any
    case, port) as the one we sent, or our ``+sip.instance``.

    Registrars usually echo our URI as we wrote it; then it is recognised by its text and never
    parsed. Parsed parts of a URI are slices of its text, so equal text means equal parts.
    """

    def __init__(self, binding: Binding) -> None:
        self.text = binding.contact_uri
        self.instance = binding.contact_params.get("+sip.instance")
        self._key: tuple[str | None, str, int | None] | None = None
        self._parsed = False

    def key(self) -> tuple[str | None, str, int | None] | None:
        """(user, lower-cased host, port) of our URI; None when it does not parse (then it is
        compared as text)."""
        if not self._parsed and self.text is not None:
            self._parsed = True
            try:
                uri = SipURI.parse(self.text)
            except ValueError:
                return None
            self._key = (uri.user, uri.host.lower(), uri.port)
        return self._key

    def may_match(self, value: str) -> bool:
        """Cheap and never wrong when it says no: a matching URI's user and host are in the text."""
        if self.instance is not None and self.instance in value:
            return True
        if self.text is None:
            return False
        if self.text in value:
            return True
        key = self.key()
        if key is None:
            return True  # compared as text after parsing: no shortcut
        user, host, _ = key
        return (user is None or user in value) and host in value.lower()

    def matches(self, contact: NameAddr) -> bool:
        if self.instance is not None and contact.params.get("+sip.instance") == self.instance:
            return True
        if self.text is None:
            return False
        uri = contact.uri
        if str(uri) == self.text:
            return True
        key = self.key()
        return key is not None and uri.scheme in ("sip", "sips") and (uri.user, uri.host.lower(), uri.port) == key


def _int_header(response: Response, name: str) -> int | None:
    value = response.headers.get(name)
    if value is None:
        return None
    value = value.split(";")[0].strip()
    return int(value) if value.isdigit() else None


def _retry_after(response: Response) -> float | None:
    value = _int_header(response, "Retry-After")
    return float(value) if value is not None else None


def _result(outcome: Outcome, response: Response, detail: str) -> RegisterResult:
    return RegisterResult(outcome, response.status, response.reason, response=response, detail=detail)
