"""REGISTER exchanges on behalf of instances: the engine's link to the SIP layer.

For each instance it keeps a :class:`Binding` (Call-ID, CSeq, From-tag, digest state and a Contact
whose user part is unique to the instance, carrying ``+sip.instance`` and ``reg-id``), finds the
registrar through the resolver (failing over to the next target on transport errors, timeouts and
503), and remembers which flow each registration rides on so a lost flow re-registers exactly the
instances that used it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable

from sipis.health import target_name
from sipis.instance import Instance
from sipis.sip.digest import Credentials
from sipis.sip.endpoint import SipEndpoint
from sipis.sip.message import SipParseError, SipURI
from sipis.sip.register import Binding, Outcome, RegisterResult, register
from sipis.sip.resolver import ResolveError, Resolver
from sipis.sip.transport import Flow, TransportError

log = logging.getLogger(__name__)

#: Results after which the next registrar target is tried at once.
FAILOVER_STATUSES = frozenset({408, 503})


def contact_user(instance: Instance) -> str:
    """The Contact user part for an instance; incoming INVITEs are matched back by it.

    Interned: the service's routing table and the instance's :class:`Binding` hold one string.
    """
    return sys.intern("sipis-" + instance.instance_id.replace("-", ""))


#: Names the Call-IDs of fenced bindings (any fixed UUID: it only has to be the same on every node).
_CALL_ID_NAMESPACE = uuid.UUID("5b3a1c9e-2f4d-4e8a-9c61-0d7e52a4f310")


def fenced_call_id(instance: Instance) -> str:
    """The Call-ID of the instance's binding on every node and after every restart, so the
    registrar compares the CSeqs of all its owners (RFC 3261 §10.3)."""
    return f"{uuid.uuid5(_CALL_ID_NAMESPACE, f'{instance.instance_id}/{instance.reg_id}').hex}@sipis"


#: Registrar URIs parsed once each and shared by every binding that names them (read-only).
_MAX_SHARED_REGISTRARS = 4096


class ProxyRegistrar:
    def __init__(self, endpoint: SipEndpoint, resolver: Resolver, *, default_registrar: str | None = None,
                 user_agent: str | None = None) -> None:
        self.endpoint = endpoint
        self.resolver = resolver
        self.default_registrar = default_registrar
        self.user_agent = user_agent
        self._bindings: dict[str, Binding] = {}
        self._registrars: dict[str, SipURI] = {}
        #: selector → key of the reliable flow its binding rides on. No reverse index: a flow dies
        #: rarely, and finding its instances then (one pass, ~5 ms per 100k) is cheaper than a
        #: set entry per instance for as long as they live.
        self._flow_of: dict[str, tuple[str, str, int]] = {}
        #: one key tuple per flow for all its instances (``flow.key`` makes a new one per call)
        self._flow_keys: dict[tuple[str, str, int], tuple[str, str, int]] = {}
        #: registrar URI host → every address a REGISTER of ours went to: where requests for the
        #: instances registered there may come from (see :meth:`from_registrar`). Addresses, not
        #: ports: a registrar may open a new TCP connection (from any port) to deliver a call.
        self._registrar_addresses: dict[str, set[str]] = {}
        self.on_flow_lost: Callable[[list[str]], None] | None = None
        #: told the result of every exchange with one target (failovers included): health
        self.on_target_result: Callable[[str, RegisterResult], None] | None = None
        #: asked for a new epoch when a binding's CSeqs in its epoch are used up (sets
        #: ``instance.epoch``; False: the lease is gone). None: no leases, bindings are unfenced.
        self.new_epoch: Callable[[Instance], Awaitable[bool]] | None = None
        #: does this node still own the instance? Asked right before each REGISTER leaves (after
        #: the awaits of resolving and connecting): a node paused past its lease sends nothing.
        #: Registrars cannot be relied on to refuse it: Kamailio 5.6 matches a binding by
        #: +sip.instance/reg-id and then compares no CSeq (tests/integration/test_fencing.py).
        self.owns: Callable[[str], bool] | None = None
        endpoint.flow_closed_listeners.append(self._flow_closed)

    async def __call__(self, instance: Instance, expires: int) -> RegisterResult:
        """One exchange, failing over across the registrar's targets; the result's
        ``transactions`` counts every REGISTER sent on the way (0: none was)."""
        account = instance.account
        if account.password is None:
            return RegisterResult(Outcome.UNAUTHORIZED, 403, "Credentials wiped", detail="no credentials",
                                  transactions=0)
        try:
            binding = self._binding(instance)
        except (SipParseError, ValueError) as exc:
            return RegisterResult(Outcome.REJECTED, 400, "Bad account", detail=str(exc), transactions=0)
        if binding.epoch != instance.epoch or binding.epoch_used_up:
            fenced = await self._follow_epoch(instance, binding)
            if fenced is not None:
                return fenced
        try:
            targets = await self.resolver.resolve(binding.registrar)
        except ResolveError as exc:
            return RegisterResult(Outcome.FAILED, 503, "Registrar not found", detail=str(exc), transactions=0)
        result: RegisterResult | None = None
        sent = 0
        for target in targets:
            name = target_name(target.transport, target.host, target.port)
            try:
                flow = await self.endpoint.transport.flow_to(target.transport, target.host, target.port,
                                                             server_name=target.server_name)
            except TransportError as exc:
                result = RegisterResult(Outcome.FAILED, 503, "Service Unavailable", detail=str(exc),
                                        transactions=sent, target=name)
                self._report(name, result)
                continue
            addresses = self._registrar_addresses.get(binding.registrar.host)
            if addresses is None:
                addresses = self._registrar_addresses[binding.registrar.host] = set()
            addresses.add(flow.remote[0])
            if self.owns is not None and not self.owns(instance.selector):
                return RegisterResult(Outcome.FENCED, 0, "Lease gone", detail="another node may own the instance",
                                      transactions=sent)
            previous = self._flow_of.get(instance.selector)
            if previous is not None and previous[0] != flow.transport:
                binding.contact_uri = None  # failed over to another transport: new Contact
            result = await register(self.endpoint, binding, flow, expires)
            sent += result.transactions
            result.transactions = sent
            result.target = name
            self._report(name, result)
            self._track(instance.selector, flow, bound=result.ok and expires > 0)
            if result.outcome is not Outcome.FAILED or result.status not in FAILOVER_STATUSES:
                return result
        if result is None:
            result = RegisterResult(Outcome.FAILED, 503, "Service Unavailable", detail="no target", transactions=0)
        return result

    def _report(self, target: str, result: RegisterResult) -> None:
        if self.on_target_result is not None:
            self.on_target_result(target, result)

    async def _follow_epoch(self, instance: Instance, binding: Binding) -> RegisterResult | None:
        """Count the binding's CSeqs in the owner's current epoch, asking for a new one when this
        one's are used up; a result when there is none to have (the lease is gone)."""
        if binding.epoch == instance.epoch:  # its CSeqs are used up
            renewed = self.new_epoch is not None and await self.new_epoch(instance)
            if not renewed or binding.epoch == instance.epoch:
                return RegisterResult(Outcome.FENCED, 0, "Epoch used up", detail="no new epoch for the binding",
                                      transactions=0)
        binding.begin_epoch(instance.epoch, fenced_call_id(instance))
        return None

    def from_registrar(self, selector: str, flow: Flow) -> bool:
        """Did this request come from the registrar the instance registers with: from an address
        we sent its REGISTERs to (any port, so also over the flow we registered on)?"""
        binding = self._bindings.get(selector)
        if binding is None:
            return False
        addresses = self._registrar_addresses.get(binding.registrar.host)
        return addresses is not None and flow.remote[0] in addresses

    async def learn_registrars(self, timeout: float = 5.0) -> None:
        """Resolve every registrar the prepared bindings name, so that :meth:`from_registrar` knows
        their addresses before our first REGISTER to each: after a restart a registrar still holds
        our bindings and may deliver a call at once (paced re-registration can take minutes)."""
        hosts = {binding.registrar.host: binding.registrar for binding in self._bindings.values()}

        async def learn(host: str) -> None:
            with contextlib.suppress(ResolveError):
                targets = await self.resolver.resolve(hosts[host])
                self._registrar_addresses.setdefault(host, set()).update(t.host for t in targets)

        if hosts:
            await asyncio.wait([asyncio.ensure_future(learn(host)) for host in hosts], timeout=timeout)

    def prepare(self, instance: Instance) -> None:
        """Build the instance's binding now rather than at its first REGISTER.

        Start-up calls this for every restored instance before it freezes what it built
        (``gc.freeze()`` in ``Core.start``): bindings are the bulk of what lives per instance, and
        frozen they no longer lengthen the garbage collector's full passes. A bad account is
        left for the first exchange to report.
        """
        if instance.account.password is None:
            return
        try:
            self._binding(instance)
        except (SipParseError, ValueError):
            pass

    def forget(self, selector: str) -> None:
        self._bindings.pop(selector, None)
        self._untrack(selector)

    def _binding(self, instance: Instance) -> Binding:
        account = instance.account
        binding = self._bindings.get(instance.selector)
        password = account.password or ""
        if binding is None or binding.credentials.password != password or \
                binding.credentials.username != account.auth_user:
            old = binding
            aor = _aor_uri(account.aor, account.username)
            binding = Binding(
                aor=aor, registrar=self._registrar_uri(account.registrar or self.default_registrar, aor),
                credentials=Credentials(account.auth_user, password),
                contact_params={"+sip.instance": instance.sip_instance, "reg-id": sys.intern(str(instance.reg_id))},
                display_name=account.display_name, user_agent=self.user_agent,
                contact_user=contact_user(instance),
            )
            if old is not None and old.epoch:
                # new credentials, the same fenced binding: its CSeqs go on counting
                binding.epoch, binding.call_id, binding.cseq = old.epoch, old.call_id, old.cseq
            self._bindings[instance.selector] = binding
        return binding

    def _registrar_uri(self, text: str | None, aor: SipURI) -> SipURI:
        """The registrar's parsed URI, one object per distinct registrar (most deployments: one).

        Bindings only read it (the request URI, the resolver), so sharing it is safe.
        """
        key = text if text is not None else f"{aor.scheme}:{aor.host}"
        uri = self._registrars.get(key)
        if uri is None:
            uri = SipURI.parse(text) if text is not None else SipURI(host=aor.host, scheme=aor.scheme)
            if len(self._registrars) >= _MAX_SHARED_REGISTRARS:
                self._registrars.clear()
            self._registrars[key] = uri
        return uri

    def _track(self, selector: str, flow: Flow, *, bound: bool) -> None:
        if bound and flow.reliable:
            key = flow.key
            if self._flow_of.get(selector) != key:
                self._flow_of[selector] = self._flow_keys.setdefault(key, key)
        else:
            self._untrack(selector)

    def _untrack(self, selector: str) -> None:
        self._flow_of.pop(selector, None)

    def _flow_closed(self, flow: Flow, reason: str) -> None:
        key = self._flow_keys.pop(flow.key, None)
        if key is None:
            return  # no instance ever registered over it
        users = sorted(selector for selector, used in self._flow_of.items() if used == key)
        for selector in users:
            del self._flow_of[selector]
        if users and self.on_flow_lost is not None:
            log.info("flow %s lost (%s): re-registering %d instances", flow, reason, len(users))
            self.on_flow_lost(users)


def _aor_uri(text: str, username: str) -> SipURI:
    """The AOR parsed, its scheme and domain shared with every other AOR of that domain and its
    user part with the account's username when they are equal: one copy of each per instance
    is all the binding needs to keep."""
    aor = SipURI.parse(text)
    aor.scheme = sys.intern(aor.scheme)
    aor.host = sys.intern(aor.host)
    if aor.user == username:
        aor.user = username
    return aor
