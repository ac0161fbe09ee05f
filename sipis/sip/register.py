"""One REGISTER exchange (RFC 3261 §10, RFC 5626 §4.2), digest and 423 included.

:func:`register` sends a REGISTER for a :class:`Binding` and follows the protocol to a verdict:
answers 401/407 challenges (a new branch and CSeq+1 per retry, never a To-tag), retries once with
Min-Expires after 423, and turns a challenge repeated for the same credentials into
``unauthorized`` instead of looping. Scheduling refreshes and backing off is the caller's job
(the registration engine); this module only says what happened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum

from sipis.sip.digest import Credentials, DigestSession, choose_challenge, header_names, parse_challenges
from sipis.sip.endpoint import SipEndpoint
from sipis.sip.message import Headers, NameAddr, Request, Response, SipURI, new_call_id, new_tag
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
        uri = SipURI(host=self.aor.host, port=None, scheme=self.aor.scheme)
        if self.registrar.host == self.aor.host and self.registrar.port:
            uri.port = self.registrar.port
        return str(uri)


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
        endpoint.add_via(request, flow)
        try:
            response = await endpoint.request(request, flow)
        except TransportError as exc:
            return RegisterResult(Outcome.FAILED, 503, "Service Unavailable", flow=flow, detail=str(exc))
        status = response.status
        if status in (401, 407):
            challenge_header, auth_header = header_names(status)
            challenge = choose_challenge(parse_challenges(response.headers.get_all(challenge_header)))
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


def build_register(binding: Binding, flow: Flow, expires: int,
                   authorization: tuple[str, str] | None) -> Request:
    binding.cseq += 1
    aor = NameAddr(uri=SipURI(host=binding.aor.host, user=binding.aor.user, port=binding.aor.port,
                              scheme=binding.aor.scheme), display_name=binding.display_name)
    from_ = NameAddr(uri=aor.uri, display_name=binding.display_name, params={"tag": binding.from_tag})
    contact_uri = binding.contact_uri or _contact_uri(binding, flow)
    binding.contact_uri = contact_uri
    contact = f"<{contact_uri}>" + "".join(
        f";{k}" if v is None else f";{k}={v}" for k, v in binding.contact_params.items()
    )
    headers = Headers([
        ("From", str(from_)),
        ("To", str(NameAddr(uri=aor.uri, display_name=binding.display_name))),
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
    """The expiry the registrar gave *our* contact: its ``expires`` param, else the Expires header."""
    ours = binding.contact_uri
    instance = binding.contact_params.get("+sip.instance")
    for contact in response.contacts:
        same_uri = ours is not None and _same_contact(str(contact.uri), ours)
        same_instance = instance is not None and contact.params.get("+sip.instance") == instance
        if same_uri or same_instance:
            value = contact.params.get("expires")
            if value is not None and value.isdigit():
                return int(value)
    header = _int_header(response, "Expires")
    if header is not None:
        return header
    return requested if not response.contacts else 0


def _same_contact(a: str, b: str) -> bool:
    try:
        ua, ub = SipURI.parse(a), SipURI.parse(b)
    except ValueError:
        return a == b
    return (ua.user, ua.host.lower(), ua.port) == (ub.user, ub.host.lower(), ub.port)


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
