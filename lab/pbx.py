"""A small registrar and stateful proxy built on our own SIP layer: the lab PBX.

It behaves like ``tests/kamailio/kamailio.cfg`` for everything our tests and the demo need, on
loopback, in the test's own event loop (no process to spawn, starts in milliseconds):

* **Registrar.** Digest challenge (MD5 or SHA-256, ``qop=auth``, realm = the To domain) with a
  fresh nonce per challenge; nonces are remembered for ``nonce_lifetime`` seconds (an old or
  unknown nonce with right credentials gets ``stale=true``) and may be reused with any ``nc``.
  ``423`` + ``Min-Expires`` for 0 < expires < ``min_expires`` (checked before authentication, as
  the Kamailio config does), expiries above ``max_expires`` are lowered, ``403`` when the
  authentication user is not the To user, ``Contact: *`` + ``Expires: 0`` removes every binding.
  Bindings are keyed by AOR user; within an AOR a contact with ``+sip.instance`` (+ ``reg-id``)
  replaces the binding with the same instance and reg-id, other contacts are matched by URI
  (:mod:`lab.pbx_location`). A binding made over TCP/TLS remembers that connection
  (``fix_nated_register``) so requests for it go back over it; UDP bindings are reached at their
  contact address. Bindings expire on a timer.
* **Proxy** (transaction stateful, no Record-Route). A request for one of our users is forked in
  parallel to every binding of the user, each branch a client transaction of our endpoint;
  provisional responses (except 100) and the final response are relayed back through the server
  transaction with every header of the branch's response (``X-*`` included) and its To-tag. A
  2xx wins at once and cancels the other branches; otherwise the best final (6xx, else the lowest
  class) is relayed when every branch has answered. **Retarget:** if that best final is a 3xx,
  the AOR is looked up again and the request relayed to the bindings not tried yet, once (a 3xx
  of that second round goes to the caller); nobody new registered gives ``480``. A caller's
  CANCEL (the endpoint answers it 200 and the INVITE 487) cancels every branch with
  ``build_cancel`` (after the branch's first provisional, RFC 3261 §9.1). ``invite_timeout``
  bounds a ringing INVITE (Kamailio's ``fr_inv_timer``): branches are cancelled, the caller gets
  408. Unknown users get ``404``, known users without bindings ``480``.
* Requests not addressed to us (in-dialog BYE/ACK sent to the callee's Contact through us, as sipp
  does) are forwarded to their Request-URI: over a binding's connection when the URI is a
  registered contact, else to the URI's address. ACK for a 2xx is forwarded statelessly.
  ``OPTIONS`` to the PBX itself gets ``200``; MESSAGE and other non-INVITE requests for a user are
  forked like INVITE (first 2xx wins).

``LabPbx`` mirrors the inspection API of :class:`lab.kamailio.Kamailio` (``domain``, ``udp_port``,
``tls_port``, ``target()``, ``uri()``, ``aor()``, ``ca_file``, ``ul_dump()``,
``registered_contacts()``), so tests written for one run against the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from lab.digest_server import AuthorizationParams, make_challenge, verify_authorization
from lab.kamailio import LOAD_PASSWORD, USERS, KamailioError, UlContact, free_port, make_self_signed_cert
from lab.pbx_location import (
    ContactUpdate,
    LocationTable,
    NonceBook,
    OutOfOrder,
    PbxBinding,
    unquote,
)
from sipis.sip.digest import DigestError
from sipis.sip.endpoint import EndpointSettings, IncomingRequest, SipEndpoint
from sipis.sip.message import NameAddr, Request, Response, SipParseError, SipURI, header_key
from sipis.sip.transaction import build_cancel, synthetic_response
from sipis.sip.transport import Flow, ListenSpec, TlsSettings, TransportError, TransportName

log = logging.getLogger(__name__)

SERVER = "sipis-lab-pbx"
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, INFO, UPDATE, PRACK, REFER, NOTIFY, SUBSCRIBE, REGISTER"
#: non-INVITE methods we proxy (REGISTER is ours, CANCEL and ACK are special)
PROXIED_METHODS = ("BYE", "MESSAGE", "OPTIONS", "INFO", "UPDATE", "PRACK", "REFER", "NOTIFY", "SUBSCRIBE",
                   "PUBLISH")
_LOAD_USER = re.compile(r"load[0-9]+")
#: headers of a branch's response that the relayed response takes from the caller's request instead
_NOT_RELAYED = frozenset({"via", "from", "to", "call-id", "cseq", "content-length", "record-route"})


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.split(";")[0].strip()
    return int(value) if value.isdigit() else None


@dataclass(eq=False)
class _Target:
    uri: str  # Request-URI of the forwarded request
    binding: PbxBinding | None = None


@dataclass(eq=False)
class _Branch:
    target: _Target
    generation: int
    request: Request | None = None
    flow: Flow | None = None
    provisional: bool = False
    final: Response | None = None
    cancel_wanted: bool = False
    cancel_sent: bool = False


class LabPbx:
    """The lab registrar/proxy; ``await start()`` gives the ports, ``await stop()`` ends it."""

    def __init__(
        self,
        users: dict[str, str] | None = None,
        *,
        algorithm: str = "MD5",
        host: str = "127.0.0.1",
        transports: Sequence[str] = ("udp", "tcp", "tls"),
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        load_password: str | None = LOAD_PASSWORD,
        qop: str | None = "auth",
        retarget: bool = True,
        invite_timeout: float = 120.0,
        nonce_lifetime: float = 300.0,
        workdir: Path | None = None,
    ) -> None:
        unknown = [t for t in transports if t not in ("udp", "tcp", "tls")]
        if unknown or not transports:
            raise ValueError(f"transports must be a non-empty choice of udp, tcp, tls (got {list(transports)})")
        if algorithm.upper() not in ("MD5", "SHA-256"):
            raise ValueError(f"algorithm must be MD5 or SHA-256, not {algorithm!r}")
        self.users = dict(USERS if users is None else users)
        self.algorithm = algorithm.upper()
        self.host = host
        self.domain = host  # like the Kamailio config: AORs and the realm are the To host
        self.transports: tuple[TransportName, ...] = tuple(cast(TransportName, t) for t in transports)
        self.min_expires, self.max_expires = min_expires, max_expires
        self.default_expires = default_expires
        self.load_password = load_password
        self.qop = qop
        self.retarget = retarget
        self.invite_timeout = invite_timeout
        self.location = LocationTable()
        self.nonces = NonceBook(nonce_lifetime)
        self.stats: dict[str, int] = {
            "register": 0, "challenged": 0, "registered": 0, "invite": 0, "forwarded": 0, "retarget": 0,
            "ack_forwarded": 0, "cancelled": 0,
        }
        self.udp_port = self.tcp_port = self.tls_port = 0
        self._own_workdir = workdir is None
        self._workdir = workdir
        self._endpoint: SipEndpoint | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._calls: set[_InviteProxy] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self.location.listeners.append(lambda _kind, _binding: self._arm_expiry())

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> dict[str, int]:
        """Listen on free loopback ports (UDP and TCP share one number, like Kamailio); returns them."""
        if self._endpoint is not None:
            return self.ports
        tls = TlsSettings(verify=False)  # client side: bindings' TLS contacts are self-signed lab peers
        if "tls" in self.transports:
            if self._workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix="labpbx-"))
            self._workdir.mkdir(parents=True, exist_ok=True)
            if not self.cert_file.exists():
                make_self_signed_cert(self.cert_file, self.key_file, self.host)
            tls = TlsSettings(verify=False, server_cert=str(self.cert_file), server_key=str(self.key_file))
        error: Exception | None = None
        for _attempt in range(10):
            specs: list[ListenSpec] = []
            plain = [t for t in self.transports if t != "tls"]
            if plain:
                port = free_port(self.host, udp="udp" in plain, tcp="tcp" in plain)
                specs += [ListenSpec(t, self.host, port) for t in plain]
            if "tls" in self.transports:
                specs.append(ListenSpec("tls", self.host, 0))
            endpoint = SipEndpoint(EndpointSettings(listen=specs, tls=tls, user_agent=""))
            try:
                listening = await endpoint.start()
            except OSError as exc:  # somebody took the port since free_port probed it
                error = exc
                await endpoint.close()
                continue
            break
        else:
            raise KamailioError(f"lab PBX: no free ports on {self.host}: {error}")
        for spec in listening:
            setattr(self, f"{spec.transport}_port", spec.port)
        endpoint.handlers["REGISTER"] = self._on_register
        endpoint.handlers["INVITE"] = self._on_invite
        for method in PROXIED_METHODS:
            endpoint.handlers[method] = self._on_request
        endpoint.unmatched_ack = self._on_unmatched_ack
        self._endpoint = endpoint
        log.info("lab PBX listening on %s", ", ".join(map(str, listening)))
        return self.ports

    async def stop(self) -> None:
        """Stop listening, drop every call in progress and every binding (memory only, like usrloc)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for call in list(self._calls):
            call.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._endpoint is not None:
            await self._endpoint.close()
            self._endpoint = None
        self.location.clear()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    async def __aenter__(self) -> LabPbx:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def endpoint(self) -> SipEndpoint:
        if self._endpoint is None:
            raise RuntimeError("lab PBX not started")
        return self._endpoint

    @property
    def running(self) -> bool:
        return self._endpoint is not None

    # ------------------------------------------------------------------ addresses (as lab.kamailio)

    @property
    def cert_file(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("the lab PBX has no TLS certificate (tls not enabled, or not started)")
        return self._workdir / "cert.pem"

    @property
    def key_file(self) -> Path:
        return self.cert_file.with_name("key.pem")

    @property
    def ca_file(self) -> Path:
        """The self-signed certificate doubles as the clients' trust anchor."""
        return self.cert_file

    @property
    def ports(self) -> dict[str, int]:
        return {t: self.port(t) for t in self.transports}

    def port(self, transport: str = "udp") -> int:
        return int(getattr(self, f"{transport.lower()}_port"))

    def target(self, transport: str = "udp") -> str:
        """``host:port`` for sipp and socket code."""
        return f"{self.host}:{self.port(transport)}"

    def uri(self, transport: str = "udp") -> str:
        """Our SIP URI for ``transport`` (usable as registrar/outbound proxy URI)."""
        t = transport.lower()
        return f"sip:{self.host}:{self.port(t)}" + ("" if t == "udp" else f";transport={t}")

    def aor(self, user: str) -> str:
        return f"sip:{user}@{self.domain}"

    def is_local(self, uri: SipURI) -> bool:
        """A URI naming us: our host with no port or one of our ports."""
        if uri.scheme not in ("sip", "sips") or uri.host.strip("[]").lower() != self.host.lower():
            return False
        return uri.port is None or uri.port in {p for p in self.ports.values() if p}

    # ------------------------------------------------------------------ accounts and bindings

    def password_for(self, user: str) -> str | None:
        if user in self.users:
            return self.users[user]
        if self.load_password is not None and _LOAD_USER.fullmatch(user):
            return self.load_password
        return None

    def known_user(self, user: str) -> bool:
        return self.password_for(user) is not None

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def bindings(self, user: str) -> list[PbxBinding]:
        """The live bindings of an AOR user, newest first."""
        return self.location.lookup(user, self.now())

    def registered_contacts(self, user: str) -> list[str]:
        return [b.contact for b in self.bindings(user)]

    def contact_count(self) -> int:
        self.location.expire(self.now())
        return len(self.location)

    def ul_dump(self) -> list[UlContact]:
        """Every binding in the shape of :func:`lab.kamailio.parse_ul_dump` (Kamailio's ``ul.dump``)."""
        now = self.now()
        return [self._ul_contact(b, now) for b in self.location.all(now)]

    def ul_lookup(self, user: str) -> list[UlContact]:
        now = self.now()
        return [self._ul_contact(b, now) for b in self.location.lookup(user, now)]

    def ul_remove(self, user: str) -> None:
        self.location.remove_all(user)

    @staticmethod
    def _ul_contact(binding: PbxBinding, now: float) -> UlContact:
        flow = binding.flow
        socket = f"{binding.transport}:{flow.local[0]}:{flow.local[1]}" if flow is not None else None
        return UlContact(
            aor=binding.user, contact=binding.contact, expires=binding.expires_in(now), received=binding.received,
            instance=binding.instance, reg_id=binding.reg_id, call_id=binding.call_id, cseq=binding.cseq,
            user_agent=binding.user_agent, socket=socket, tcpconn_id=None, ruid=f"labpbx-{binding.id}", raw={},
        )

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        when = self.location.next_expiry()
        if when is None or self._endpoint is None:
            return
        self._expiry = self._endpoint.loop.call_later(max(0.0, when - self.now()) + 0.01, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self.location.expire(self.now())  # emits "expired", which re-arms
        if self._expiry is None:
            self._arm_expiry()

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("lab PBX task failed", exc_info=task.exception())

    @staticmethod
    def _reply(incoming: IncomingRequest, status: int, reason: str | None = None,
               headers: Iterable[tuple[str, str]] = ()) -> None:
        incoming.respond(status, reason, headers=[*headers, ("Server", SERVER)])

    @staticmethod
    def _max_forwards_exhausted(request: Request) -> bool:
        value = _int(request.headers.get("Max-Forwards"))
        return value is not None and value <= 0

    @staticmethod
    def _forward_copy(request: Request, uri: str) -> Request:
        """The request as we pass it on: new Request-URI, Max-Forwards one lower (our Via comes later)."""
        headers = request.headers.copy()
        hops = _int(headers.get("Max-Forwards"))
        headers.set("Max-Forwards", str((70 if hops is None else hops) - 1))
        return Request(request.method, uri, headers, request.body)

    async def _flow_for(self, target: _Target) -> Flow:
        """How to reach a target: a TCP/TLS binding's own connection, else the URI's address."""
        binding = target.binding
        if binding is not None and binding.transport != "udp" and binding.flow is not None and binding.flow.alive:
            return binding.flow
        try:
            uri = SipURI.parse(target.uri)
        except SipParseError as exc:
            raise TransportError(f"cannot route to {target.uri!r}: {exc}") from exc
        transport = uri.transport
        if transport not in ("udp", "tcp", "tls"):
            raise TransportError(f"unsupported transport {transport!r} in {target.uri!r}")
        try:
            return await self.endpoint.transport.flow_to(cast(TransportName, transport), uri.host, uri.port)
        except TransportError:
            if binding is not None and binding.flow is not None and binding.flow.alive:
                return binding.flow  # e.g. a contact with an unresolvable host: where it registered from
            raise

    def _targets_for(self, incoming: IncomingRequest) -> tuple[list[_Target], str | None] | None:
        """Where a request goes: (targets, AOR user or None); None when a final answer was sent."""
        request = incoming.request
        if self._max_forwards_exhausted(request):
            self._reply(incoming, 483, "Too Many Hops")
            return None
        try:
            uri = request.request_uri
            in_dialog = request.to.tag is not None
        except SipParseError:
            self._reply(incoming, 416, "Unsupported URI Scheme")
            return None
        if not self.is_local(uri):
            return [_Target(request.uri, self.location.find_contact(request.uri, self.now()))], None
        if in_dialog:
            self._reply(incoming, 404, "Not here")  # we keep no dialogs (no Record-Route)
            return None
        user = uri.user
        if not user or not self.known_user(user):
            self._reply(incoming, 404, "Not Found")
            return None
        bindings = self.bindings(user)
        if not bindings:
            self._reply(incoming, 480, "Temporarily Unavailable")
            return None
        return [_Target(b.contact, b) for b in bindings], user

    # ------------------------------------------------------------------ registrar

    def _on_register(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        self.stats["register"] += 1
        try:
            to_uri = request.to.uri
            user, realm = to_uri.user, to_uri.host.strip("[]")
            values = request.headers.get_all("Contact")
            star = any(v.strip() == "*" for v in values)
            contacts = [NameAddr.parse(v) for v in values if v.strip() != "*"]
            call_id, cseq = request.call_id, request.cseq[0]
        except (SipParseError, ValueError) as exc:
            self._reply(incoming, 400, f"Bad Request ({str(exc)[:60]})")
            return
        if not user:
            self._reply(incoming, 404, "Not Found")
            return
        header_expires = _int(request.headers.get("Expires"))
        updates: list[ContactUpdate] = []
        for contact in contacts:
            expires = _int(contact.params.get("expires"))
            if expires is None:
                expires = header_expires if header_expires is not None else self.default_expires
            if 0 < expires < self.min_expires:
                self._reply(incoming, 423, "Interval Too Brief", [("Min-Expires", str(self.min_expires))])
                return
            updates.append(ContactUpdate(
                contact=str(contact.uri), expires=min(expires, self.max_expires),
                instance=unquote(contact.params.get("+sip.instance")), reg_id=_int(contact.params.get("reg-id")),
            ))
        account = self._authenticate(incoming, realm)
        if account is None:
            return
        if account != user:
            self._reply(incoming, 403, "Auth user mismatch")
            return
        now = self.now()
        if star:
            if contacts or header_expires != 0:
                self._reply(incoming, 400, "Bad Request (Contact: * needs Expires: 0 and no other contact)")
                return
            self.location.remove_all(user)
        elif updates:
            try:
                self.location.save(user, updates, call_id=call_id, cseq=cseq, transport=incoming.flow.transport,
                                   source=incoming.flow.remote, flow=incoming.flow,
                                   user_agent=request.headers.get("User-Agent"), now=now)
            except OutOfOrder as exc:
                self._reply(incoming, 500, f"Server Internal Error ({exc})"[:100])
                return
        self.stats["registered"] += 1
        headers = [("Contact", b.contact_header(now)) for b in self.location.lookup(user, now)]
        headers.append(("Date", email.utils.formatdate(usegmt=True)))
        self._reply(incoming, 200, "OK", headers)

    def _authenticate(self, incoming: IncomingRequest, realm: str) -> str | None:
        """The authenticated account name, or None after sending a 401 challenge."""
        request = incoming.request
        now = self.now()
        stale = False
        for value in request.headers.raw_values("Authorization"):
            try:
                params = AuthorizationParams.parse(value)
            except DigestError:
                continue
            if params.realm != realm:
                continue
            password = self.password_for(params.username)
            if (password is None or params.algorithm.upper() != self.algorithm
                    or (self.qop is not None and params.qop is None)
                    or not verify_authorization(params, request.method, password, request.body)):
                break
            if self.nonces.state(params.nonce, now) != "fresh":
                stale = True  # right credentials, but not a nonce we (still) stand by
                break
            self.nonces.used(params.nonce, params.nc_value)
            return params.username
        self.stats["challenged"] += 1
        challenge = make_challenge(realm, self.algorithm, qop=self.qop, nonce=self.nonces.issue(now), stale=stale)
        self._reply(incoming, 401, "Unauthorized", [("WWW-Authenticate", challenge)])
        return None

    # ------------------------------------------------------------------ proxy

    def _on_invite(self, incoming: IncomingRequest) -> None:
        self.stats["invite"] += 1
        routed = self._targets_for(incoming)
        if routed is None:
            return
        targets, user = routed
        call = _InviteProxy(self, incoming, user)
        self._calls.add(call)
        call.fork(targets)

    def _on_request(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        if request.method == "OPTIONS":
            try:
                uri = request.request_uri
                to_us = self.is_local(uri) and not uri.user
            except SipParseError:
                to_us = False
            if to_us:
                self._reply(incoming, 200, "OK", [("Allow", ALLOW), ("Accept", "application/sdp")])
                return
        routed = self._targets_for(incoming)
        if routed is not None:
            self._spawn(self._proxy_non_invite(incoming, routed[0]))

    async def _proxy_non_invite(self, incoming: IncomingRequest, targets: list[_Target]) -> None:
        pending = {asyncio.ensure_future(self._send_branch(incoming.request, t)) for t in targets}
        finals: list[Response] = []
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    response = task.result()
                    if 200 <= response.status < 300 and incoming.final_status is None:
                        self._relay(incoming, response)  # first 2xx wins; the rest finish unheard
                    finals.append(response)
            if incoming.final_status is None:
                self._relay(incoming, best_response(finals))
        finally:
            for task in pending:
                task.cancel()

    async def _send_branch(self, original: Request, target: _Target) -> Response:
        try:
            flow = await self._flow_for(target)
        except TransportError as exc:
            log.info("lab PBX: cannot reach %s: %s", target.uri, exc)
            return synthetic_response(original, 503, "Service Unavailable")
        request = self._forward_copy(original, target.uri)
        self.endpoint.add_via(request, flow)
        self.stats["forwarded"] += 1
        try:
            return await self.endpoint.request(request, flow)
        except TransportError:
            return synthetic_response(request, 503, "Service Unavailable")

    def _relay(self, incoming: IncomingRequest, response: Response) -> None:
        """Answer ``incoming`` with a branch's response: its status, headers, body and To-tag."""
        headers = [(name, value) for name, value in response.headers if header_key(name) not in _NOT_RELAYED]
        try:
            tag = response.to.tag
        except SipParseError:
            tag = None
        own = incoming.to_tag
        if tag:
            incoming.to_tag = tag
        try:
            incoming.respond(response.status, response.reason, headers=headers, body=response.body)
        finally:
            incoming.to_tag = own

    def _on_unmatched_ack(self, request: Request, flow: Flow) -> None:
        """An ACK for a 2xx: pass it on towards its Request-URI (the callee's Contact)."""
        try:
            uri = request.request_uri
        except SipParseError:
            return
        if self.is_local(uri) or self._max_forwards_exhausted(request):
            return  # nowhere to go: we keep no dialogs
        self._spawn(self._forward_ack(request))

    async def _forward_ack(self, request: Request) -> None:
        target = _Target(request.uri, self.location.find_contact(request.uri, self.now()))
        try:
            flow = await self._flow_for(target)
            ack = self._forward_copy(request, request.uri)
            self.endpoint.add_via(ack, flow)
            flow.send(ack.to_bytes())
        except TransportError as exc:
            log.info("lab PBX: ACK to %s not forwarded: %s", request.uri, exc)
            return
        self.stats["ack_forwarded"] += 1


def best_response(responses: Sequence[Response]) -> Response:
    """RFC 3261 §16.7 step 6, simplified: a 6xx if any, else the lowest class (first of it)."""
    if not responses:
        raise ValueError("no responses to choose from")
    six = [r for r in responses if r.status >= 600]
    if six:
        return six[0]
    return min(responses, key=lambda r: r.status // 100)


class _InviteProxy:
    """One proxied INVITE: its branches, the relayed responses, cancel, timeout and retarget."""

    def __init__(self, pbx: LabPbx, incoming: IncomingRequest, user: str | None) -> None:
        self.pbx = pbx
        self.incoming = incoming
        self.user = user
        self.branches: list[_Branch] = []
        self.generation = 0
        self.tried: set[int] = set()  # binding ids already rung: a retarget never rings them again
        self.retargeted = False
        self.cancelled = False
        self._timer: asyncio.TimerHandle | None = pbx.endpoint.loop.call_later(pbx.invite_timeout, self._timeout)
        incoming.on_cancel(self._caller_cancelled)

    @property
    def answered(self) -> bool:
        return self.incoming.final_status is not None

    def fork(self, targets: Iterable[_Target]) -> None:
        for target in targets:
            if target.binding is not None:
                self.tried.add(target.binding.id)
            branch = _Branch(target, self.generation)
            self.branches.append(branch)
            self.pbx._spawn(self._run(branch))

    async def _run(self, branch: _Branch) -> None:
        original = self.incoming.request
        try:
            flow = await self.pbx._flow_for(branch.target)
        except TransportError as exc:
            log.info("lab PBX: cannot reach %s: %s", branch.target.uri, exc)
            self._final(branch, synthetic_response(original, 503, "Service Unavailable"))
            return
        if branch.cancel_wanted:
            self._final(branch, synthetic_response(original, 487, "Request Terminated"))
            return
        request = self.pbx._forward_copy(original, branch.target.uri)
        self.pbx.endpoint.add_via(request, flow)
        branch.request, branch.flow = request, flow
        self.pbx.stats["forwarded"] += 1
        try:
            response = await self.pbx.endpoint.request(
                request, flow, on_provisional=lambda r: self._provisional(branch, r))
        except TransportError:
            response = synthetic_response(request, 503, "Service Unavailable")
        self._final(branch, response)

    def _provisional(self, branch: _Branch, response: Response) -> None:
        branch.provisional = True
        if branch.cancel_wanted and not branch.cancel_sent:
            self._send_cancel(branch)
            return
        if response.status > 100 and not self.answered:
            self.pbx._relay(self.incoming, response)

    def _final(self, branch: _Branch, response: Response) -> None:
        branch.final = response
        if self.answered:
            if 200 <= response.status < 300:
                log.warning("lab PBX: 2xx from %s after the caller was answered; not relayed", branch.target.uri)
            self._maybe_done()
            return
        if 200 <= response.status < 300:
            self.pbx._relay(self.incoming, response)
            self._cancel_branches(except_for=branch)
            self._maybe_done()
            return
        if response.status >= 600:
            self._cancel_branches(except_for=branch)
        current = [b for b in self.branches if b.generation == self.generation]
        if all(b.final is not None for b in current):
            self._complete([cast(Response, b.final) for b in current])

    def _complete(self, finals: list[Response]) -> None:
        best = best_response(finals)
        if (300 <= best.status < 400 and self.pbx.retarget and not self.retargeted and not self.cancelled
                and self.user is not None):
            # Kamailio's failure_route[RETARGET]: look the AOR up again, relay once
            self.retargeted = True
            self.pbx.stats["retarget"] += 1
            fresh = [b for b in self.pbx.bindings(self.user) if b.id not in self.tried]
            log.info("lab PBX: %d from a binding of %s, retarget to %d new binding(s)", best.status, self.user,
                     len(fresh))
            if fresh:
                self.generation += 1
                self.fork(_Target(b.contact, b) for b in fresh)
                return
            LabPbx._reply(self.incoming, 480, "Temporarily Unavailable")
        else:
            self.pbx._relay(self.incoming, best)
        self._maybe_done()

    def _cancel_branches(self, except_for: _Branch | None = None) -> None:
        for branch in self.branches:
            if branch is except_for or branch.final is not None or branch.cancel_wanted:
                continue
            branch.cancel_wanted = True
            if branch.request is not None and branch.provisional:
                self._send_cancel(branch)
            # else: sent on the branch's first provisional (RFC 3261 §9.1), or the branch never starts

    def _send_cancel(self, branch: _Branch) -> None:
        assert branch.request is not None and branch.flow is not None
        branch.cancel_sent = True
        self.pbx.stats["cancelled"] += 1
        cancel = build_cancel(branch.request)
        flow = branch.flow

        async def send() -> None:
            with contextlib.suppress(TransportError):
                await self.pbx.endpoint.request(cancel, flow)

        self.pbx._spawn(send())

    def _caller_cancelled(self, _cancel: Request) -> None:
        self.cancelled = True  # the endpoint already answered 200 to the CANCEL and 487 to the INVITE
        self._cancel_branches()
        self._maybe_done()

    def _timeout(self) -> None:
        self._timer = None
        if not self.answered:
            self._cancel_branches()
            LabPbx._reply(self.incoming, 408, "Request Timeout")
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.answered and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.answered and all(b.final is not None for b in self.branches):
            self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pbx._calls.discard(self)

