"""One REGISTER exchange (RFC 3261 §10, RFC 5626 §4.2), digest and 423 included.

:func:`register` sends a REGISTER for a :class:`Binding` and follows the protocol to a verdict:
answers 401/407 challenges (a new branch and CSeq+1 per retry, never a To-tag), retries once with
Min-Expires after 423, and turns a challenge repeated for the same credentials into
``unauthorized`` instead of looping. Scheduling refreshes and backing off is the caller's job
(the registration engine); this module only says what happened.
"""

from __future__ import annotations

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
from sipis.sip.endpoint import SipEndpoint
from sipis.sip.message import (
    Headers,
    NameAddr,
    Request,
    Response,
    SipURI,
    format_address,
    format_params,
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


@dataclass
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


@dataclass
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
    assert binding.digest is not None
    authorization: tuple[str, str] | None = None
    answered_nonces: set[str] = set()
    min_expires_tried = False
    for _round in range(MAX_AUTH_ROUNDS + 2):
        request = build_register(binding, flow, expires, authorization)
        branch = endpoint.add_via(request, flow)
        try:
            response = await endpoint.request(request, flow, branch=branch)
        except TransportError as exc:
            return RegisterResult(Outcome.FAILED, 503, "Service Unavailable", flow=flow, detail=str(exc))
        status = response.status
        if status in (401, 407):
            challenge_header, auth_header = header_names(status)
            challenge = _best_challenge(tuple(response.headers.get_all(challenge_header)))
            if challenge is None:
                return _result(Outcome.UNAUTHORIZED, response, flow, "no digest challenge we can answer")
            if answered_nonces and not challenge.stale:
                return _result(Outcome.UNAUTHORIZED, response, flow, "credentials rejected")
            if challenge.nonce in answered_nonces or len(answered_nonces) >= MAX_AUTH_ROUNDS:
                return _result(Outcome.UNAUTHORIZED, response, flow, "challenge loop")
            answered_nonces.add(challenge.nonce)
            value = binding.digest.authorize(challenge, "REGISTER", binding.request_uri)
            authorization = (auth_header, value)
            continue
        if status == 423 and not min_expires_tried:
            min_expires = _int_header(response, "Min-Expires")
            if min_expires is None or min_expires <= expires:
                return _result(Outcome.REJECTED, response, flow, "423 without a usable Min-Expires")
            expires, min_expires_tried = min_expires, True
            continue
        return _classify(response, flow, expires, binding)
    return RegisterResult(Outcome.UNAUTHORIZED, 401, "Unauthorized", flow=flow, detail="too many rounds")


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
    binding.cseq += 1
    aor = binding.aor
    # From and To name the AOR without its password, parameters and headers (written as
    # str(NameAddr(...)) would, without building the objects: this runs for every REGISTER).
    hostport = aor.host if aor.port is None else f"{aor.host}:{aor.port}"
    aor_uri = f"{aor.scheme}:{aor.user}@{hostport}" if aor.user is not None else f"{aor.scheme}:{hostport}"
    contact_uri = binding.contact_uri or _contact_uri(binding, flow)
    binding.contact_uri = contact_uri
    contact = f"<{contact_uri}>{format_params(binding.contact_params)}"
    headers = Headers([
        ("From", format_address(aor_uri, binding.display_name, f";tag={binding.from_tag}")),
        ("To", format_address(aor_uri, binding.display_name)),
        ("Call-ID", binding.call_id),
        ("CSeq", f"{binding.cseq} REGISTER"),
        ("Contact", f"{contact};expires={expires}"),
        ("Expires", str(expires)),
        ("Supported", "path, outbound"),
    ])
    if binding.user_agent:
        headers.add("User-Agent", binding.user_agent)
    if authorization is not None:
        headers.add(*authorization)
    return Request("REGISTER", binding.request_uri, headers)


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
    ours = _OwnContact(binding)
    values = [value for value in response.headers.get_all("Contact") if value.strip() != "*"]
    for value in values:
        if not ours.may_match(value):
            continue
        contact = NameAddr.parse(value)
        if ours.matches(contact):
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
