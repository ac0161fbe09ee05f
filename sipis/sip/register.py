"""One REGISTER exchange (RFC 3261 §10, RFC 5626 §4.2), digest and 423 included.

:func:`register` sends a REGISTER for a :class:`Binding` and follows the protocol to a verdict:
answers 401/407 challenges (a new branch and CSeq+1 per retry, never a To-tag), retries once with
Min-Expires after 423, and turns a challenge repeated for the same credentials into
``unauthorized`` instead of looping. A refresh sends the credentials the registrar accepted last
time again (same nonce, next nc) so it takes one transaction instead of two; a registrar that no
longer takes them challenges, and that challenge is answered as usual. Scheduling refreshes and
backing off is the caller's job (the registration engine); this module only says what happened.
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
    new_call_id,
    new_tag,
)
from sipis.sip.transport import Flow, TransportError

log = logging.getLogger(__name__)

#: How many 401/407 rounds one exchange may take (a stale nonce costs one extra).
MAX_AUTH_ROUNDS = 3


class Outcome(Enum):
    REGISTERED = "registered"      # 2xx with our contact bound (or removed, for expires=0)
    UNAUTHORIZED = "unauthorized"  # 403, or credentials rejected / challenge we cannot answer
    REJECTED = "rejected"          # another 4xx/6xx: configuration problem, do not hammer
    FAILED = "failed"              # 5xx, timeout (408), transport failure (503): retry with backoff


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

    def __post_init__(self) -> None:
        if self.digest is None:
            self.digest = DigestSession(self.credentials)

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
    flow: Flow | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.REGISTERED


async def register(endpoint: SipEndpoint, binding: Binding, flow: Flow, expires: int) -> RegisterResult:
    """Register (or, with ``expires=0``, remove) our contact over ``flow``."""
    exchange = _Exchange(endpoint, binding, flow, expires)
    exchange.send()
    return await exchange.future


class _Exchange(ResponseCallback):
    """One :func:`register` call. Each round's final response comes to :meth:`__call__` straight
    from the endpoint, which sends the next round from there (a 401 is answered without a trip
    through the event loop); the verdict resolves :attr:`future`, which register() awaits.

    The first REGISTER carries the binding's last accepted credentials again where the digest
    session offers them (:meth:`DigestSession.reuse`): a refresh is then one transaction, not two.
    A challenge to it is answered like any first challenge.

    A caller that gives up cancels the future: the round in flight runs to its end, and no other
    follows it.
    """

    __slots__ = ("answered", "answered_nonces", "authorization", "binding", "endpoint", "expires",
                 "flow", "future", "min_expires_tried", "reused", "rounds", "template", "template_expires")

    def __init__(self, endpoint: SipEndpoint, binding: Binding, flow: Flow, expires: int) -> None:
        digest = binding.digest
        assert digest is not None
        self.endpoint = endpoint
        self.binding = binding
        self.flow = flow
        self.expires = expires
        self.future: asyncio.Future[RegisterResult] = endpoint.loop.create_future()
        # credentials are offered again only to the server (address) that took them
        self.authorization = None if digest._reusable is None else \
            digest.reuse("REGISTER", binding.request_uri, endpoint.now(), flow.remote)
        self.reused = self.authorization is not None  # the credentials in flight were not asked for
        #: (challenge, header, when) our credentials in flight answer, if asked for in this exchange
        self.answered: tuple[Challenge, str, float] | None = None
        self.answered_nonces: list[str] = []
        self.min_expires_tried = False
        self.rounds = 0
        self.template: _Template | None = None  # what this exchange's REGISTERs share
        self.template_expires = expires

    def send(self) -> None:
        """Send this round's REGISTER (a new branch, CSeq + 1)."""
        self.rounds += 1
        if self.template_expires != self.expires:  # 423: another Expires
            self.template, self.template_expires = None, self.expires
        request, branch, self.template = _register_request(
            self.endpoint, self.binding, self.flow, self.expires, self.authorization, self.template)
        self.endpoint.send_request(request, self.flow, self, branch=branch)

    def __call__(self, response: Response) -> None:
        if self.future.done():
            return  # the caller gave up
        try:
            result = self._answer(response)
        except Exception as exc:  # e.g. the next REGISTER could not be built: register() raises it
            self.future.set_exception(exc)
            return
        if result is not None:
            self.future.set_result(result)

    def error(self, exc: TransportError) -> None:
        if not self.future.done():
            self.future.set_result(RegisterResult(Outcome.FAILED, 503, "Service Unavailable",
                                                  flow=self.flow, detail=str(exc)))

    def cancel(self) -> None:
        self.future.cancel()

    def _renew_authorization(self) -> None:
        """The credentials for a retry of the same REGISTER: the same answer, with the next nc
        (a server that counts would take a repeated one for a replay)."""
        digest, binding = self.binding.digest, self.binding
        assert digest is not None
        if self.answered is not None:
            challenge, header, _ = self.answered
            self.authorization = (header, digest.authorize(challenge, "REGISTER", binding.request_uri))
        elif self.reused:
            self.authorization = digest.reuse("REGISTER", binding.request_uri, self.endpoint.now(),
                                              self.flow.remote)
            self.reused = self.authorization is not None

    def _answer(self, response: Response) -> RegisterResult | None:
        """The verdict on this final response, or None when another round has been sent."""
        status, flow, binding = response.status, self.flow, self.binding
        digest = binding.digest
        assert digest is not None
        if self.reused and (status == 401 or status == 407 or status == 403):
            self.reused = False  # not taken: no more offering of that nonce
            if status == 403:
                digest.forget_reuse()
            else:
                digest.reuse_refused(self.endpoint.now())
        if status == 401 or status == 407:
            challenge_header, auth_header = header_names(status)
            challenge = _best_challenge(tuple(response.headers.get_all(challenge_header)))
            if challenge is None:
                return _result(Outcome.UNAUTHORIZED, response, flow, "no digest challenge we can answer")
            answered = self.answered_nonces
            if answered and not challenge.stale:
                return _result(Outcome.UNAUTHORIZED, response, flow, "credentials rejected")
            if challenge.nonce in answered or len(answered) >= MAX_AUTH_ROUNDS:
                return _result(Outcome.UNAUTHORIZED, response, flow, "challenge loop")
            answered.append(challenge.nonce)
            value = digest.authorize(challenge, "REGISTER", binding.request_uri)
            self.authorization = (auth_header, value)
            self.answered = (challenge, auth_header, self.endpoint.now())
        elif status == 423 and not self.min_expires_tried:
            min_expires = _int_header(response, "Min-Expires")
            if min_expires is None or min_expires <= self.expires:
                return _result(Outcome.REJECTED, response, flow, "423 without a usable Min-Expires")
            self.expires, self.min_expires_tried = min_expires, True
            self._renew_authorization()
        else:
            if 200 <= status < 300 and self.answered is not None:
                digest.accepted(*self.answered, flow.remote)  # offer them again next time
            return _classify(response, flow, self.expires, binding)
        if self.rounds >= MAX_AUTH_ROUNDS + 2:
            return RegisterResult(Outcome.UNAUTHORIZED, 401, "Unauthorized", flow=flow,
                                  detail="too many rounds")
        self.send()
        return None


@functools.lru_cache(maxsize=64)
def _best_challenge(values: tuple[str, ...]) -> Challenge | None:
    """The challenge to answer among these header values (None: none we can answer).

    A pure function of the text, so it is cached: registrars that derive the nonce from the time
    (Kamailio, OpenSIPS) give every REGISTER of the same second the same challenge, and parsing
    it costs as much as the rest of the 401. Registrars with a fresh nonce per challenge
    (Asterisk, FreeSWITCH) just miss the cache.
    """
    return choose_challenge(parse_challenges(values))


def build_register(binding: Binding, flow: Flow, expires: int,
                   authorization: tuple[str, str] | None) -> Request:
    """The next REGISTER for ``binding`` (CSeq + 1), without a Via: see SipEndpoint.add_via."""
    binding.cseq += 1
    names, keys, values = _register_fields(binding, flow, expires)
    del names[0], keys[0], values[0]  # no Via
    if authorization is not None:
        name, key = _credentials_field(authorization[0])
        names.append(name)
        keys.append(key)
        values.append(authorization[1])
    return Request("REGISTER", binding.request_uri, Headers.from_canonical(names, keys, values))


class _Template:
    """What every REGISTER of one exchange shares: (names, keys, values) of the fields before the
    credentials, Via first and CSeq fifth (values to fill in), and of those after them; and the
    same serialised as "Name: value" lines (Via and CSeq left out) for writing the bytes."""

    __slots__ = ("after", "before", "head", "head_keys", "head_names", "head_values", "tail",
                 "tail_keys", "tail_names", "tail_values")

    def __init__(self, endpoint: SipEndpoint, binding: Binding, flow: Flow, expires: int) -> None:
        self.head_names, self.head_keys, self.head_values = head = _register_fields(binding, flow, expires)
        if not binding.user_agent and endpoint.user_agent:
            self.tail_names, self.tail_keys = ["Max-Forwards", "User-Agent"], ["max-forwards", "user-agent"]
            self.tail_values = ["70", endpoint.user_agent]
            self.after = f"Max-Forwards: 70\r\nUser-Agent: {endpoint.user_agent}\r\n"
        else:
            self.tail_names, self.tail_keys, self.tail_values = ["Max-Forwards"], ["max-forwards"], ["70"]
            self.after = "Max-Forwards: 70\r\n"
        values = head[2]
        self.head = f"From: {values[1]}\r\nTo: {values[2]}\r\nCall-ID: {values[3]}\r\n"
        # Contact, Expires, Supported and the binding's User-Agent: between CSeq and credentials
        self.before = f"Contact: {values[5]}\r\nExpires: {values[6]}\r\nSupported: {values[7]}\r\n"
        if len(values) > 8:
            self.before += f"User-Agent: {values[8]}\r\n"


def _register_request(endpoint: SipEndpoint, binding: Binding, flow: Flow, expires: int,
                      authorization: tuple[str, str] | None,
                      template: _Template | None = None) -> tuple[Request, str, _Template]:
    """``build_register`` + ``endpoint.add_via`` in one go (the same fields in the same order);
    returns the request, its branch and the template to pass for the exchange's next REGISTER
    with the same ``expires`` (the binding must not have changed in between). The request comes
    with its bytes written along (Request._prepared), in the form to_bytes() gives."""
    binding.cseq += 1
    if template is None:
        template = _Template(endpoint, binding, flow, expires)
    branch, via = endpoint.new_via(flow)
    cseq = f"{binding.cseq} REGISTER"
    values = template.head_values.copy()
    values[0], values[4] = via, cseq
    if authorization is None:
        names = template.head_names + template.tail_names
        keys = template.head_keys + template.tail_keys
        credentials = ""
    else:
        name, key = _credentials_field(authorization[0])
        names = [*template.head_names, name, *template.tail_names]
        keys = [*template.head_keys, key, *template.tail_keys]
        values.append(authorization[1])
        credentials = f"{name}: {authorization[1]}\r\n"
    values += template.tail_values
    uri = binding.request_uri
    request = Request("REGISTER", uri, Headers.from_canonical(names, keys, values))
    request._known_cseq(binding.cseq, "REGISTER")  # as values[4] says
    request._prepared(  # what to_bytes() would write
        f"REGISTER {uri} SIP/2.0\r\nVia: {via}\r\n{template.head}CSeq: {cseq}\r\n{template.before}"
        f"{credentials}{template.after}Content-Length: 0\r\n\r\n".encode("utf-8", "surrogateescape"))
    return request, branch, template


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


def _register_fields(binding: Binding, flow: Flow, expires: int) -> tuple[list[str], list[str], list[str]]:
    """(names, keys, values) of a REGISTER's fields before the credentials: Via first (its value
    empty, to fill in), CSeq fifth; From, To, Call-ID, CSeq, Contact, Expires, Supported, and the
    binding's User-Agent if it has one (_Template relies on this order)."""
    aor = binding.aor
    # From and To name the AOR without its password, parameters and headers (written as
    # str(NameAddr(...)) would, without building the objects: this runs for every REGISTER).
    hostport = aor.host if aor.port is None else f"{aor.host}:{aor.port}"
    aor_uri = f"{aor.scheme}:{aor.user}@{hostport}" if aor.user is not None else f"{aor.scheme}:{hostport}"
    contact_uri = binding.contact_uri or _contact_uri(binding, flow)
    binding.contact_uri = contact_uri
    params = format_params(binding.contact_params) if binding.contact_params else ""
    display = binding.display_name
    names = ["Via", "From", "To", "Call-ID", "CSeq", "Contact", "Expires", "Supported"]
    keys = ["via", "from", "to", "call-id", "cseq", "contact", "expires", "supported"]
    values = [
        "",
        format_address(aor_uri, display, f";tag={binding.from_tag}"),
        format_address(aor_uri, display),
        binding.call_id,
        f"{binding.cseq} REGISTER",
        f"<{contact_uri}>{params};expires={expires}",
        str(expires),
        "path, outbound",
    ]
    if binding.user_agent:
        names.append("User-Agent")
        keys.append("user-agent")
        values.append(binding.user_agent)
    return names, keys, values


def _contact_uri(binding: Binding, flow: Flow) -> str:
    host, port = flow.local
    host = f"[{host}]" if ":" in host else host
    params = "" if flow.transport == "udp" else f";transport={flow.transport}"
    user = binding.contact_user or binding.aor.user or "sipis"
    return f"sip:{user}@{host}:{port}{params}"


def _classify(response: Response, flow: Flow, expires: int, binding: Binding) -> RegisterResult:
    status = response.status
    if 200 <= status < 300:
        granted = 0 if expires == 0 else _granted_expires(response, binding, expires)
        if expires > 0 and granted <= 0:
            return _result(Outcome.FAILED, response, flow, "registrar did not bind our contact")
        return RegisterResult(Outcome.REGISTERED, status, response.reason, granted, response=response,
                              flow=flow)
    if status == 403:
        return _result(Outcome.UNAUTHORIZED, response, flow, "forbidden")
    if status in (408, 480) or 500 <= status < 600:
        result = _result(Outcome.FAILED, response, flow, "")
        result.retry_after = _retry_after(response)
        return result
    return _result(Outcome.REJECTED, response, flow, "")


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
                return int(params[9:])  # just ";expires=N": what _parse_generic_params reads
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


def _result(outcome: Outcome, response: Response, flow: Flow, detail: str) -> RegisterResult:
    return RegisterResult(outcome, response.status, response.reason, response=response, flow=flow,
                          detail=detail)
