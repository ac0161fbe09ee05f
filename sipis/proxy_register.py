"""REGISTER exchanges on behalf of instances: the engine's link to the SIP layer.

For each instance it keeps a :class:`Binding` (Call-ID, CSeq, From-tag, digest state and a Contact
whose user part is unique to the instance, carrying ``+sip.instance`` and ``reg-id``), finds the
registrar through the resolver (failing over to the next target on transport errors, timeouts and
503), and remembers which flow each registration rides on so a lost flow re-registers exactly the
instances that used it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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
    """The Contact user part for an instance; incoming INVITEs are matched back by it."""
    return "sipis-" + instance.instance_id.replace("-", "")


class ProxyRegistrar:
    def __init__(self, endpoint: SipEndpoint, resolver: Resolver, *, default_registrar: str | None = None,
                 user_agent: str | None = None) -> None:
        self.endpoint = endpoint
        self.resolver = resolver
        self.default_registrar = default_registrar
        self.user_agent = user_agent
        self._bindings: dict[str, Binding] = {}
        self._flow_users: dict[tuple[str, str, int], set[str]] = {}
        self._flow_of: dict[str, tuple[str, str, int]] = {}
        self.on_flow_lost: Callable[[list[str]], None] | None = None
        endpoint.flow_closed_listeners.append(self._flow_closed)

    async def __call__(self, instance: Instance, expires: int) -> RegisterResult:
        account = instance.account
        if account.password is None:
            return RegisterResult(Outcome.UNAUTHORIZED, 403, "Credentials wiped", detail="no credentials")
        try:
            binding = self._binding(instance)
        except (SipParseError, ValueError) as exc:
            return RegisterResult(Outcome.REJECTED, 400, "Bad account", detail=str(exc))
        try:
            targets = await self.resolver.resolve(binding.registrar)
        except ResolveError as exc:
            return RegisterResult(Outcome.FAILED, 503, "Registrar not found", detail=str(exc))
        result = RegisterResult(Outcome.FAILED, 503, "Service Unavailable", detail="no target")
        for target in targets:
            try:
                flow = await self.endpoint.transport.flow_to(target.transport, target.host, target.port,
                                                             server_name=target.server_name)
            except TransportError as exc:
                result = RegisterResult(Outcome.FAILED, 503, "Service Unavailable", detail=str(exc))
                continue
            previous = self._flow_of.get(instance.selector)
            if previous is not None and previous[0] != flow.transport:
                binding.contact_uri = None  # failed over to another transport: new Contact
            result = await register(self.endpoint, binding, flow, expires)
            self._track(instance.selector, flow, bound=result.ok and expires > 0)
            if result.outcome is not Outcome.FAILED or result.status not in FAILOVER_STATUSES:
                return result
        return result

    def forget(self, selector: str) -> None:
        self._bindings.pop(selector, None)
        self._untrack(selector)

    def _binding(self, instance: Instance) -> Binding:
        account = instance.account
        binding = self._bindings.get(instance.selector)
        password = account.password or ""
        if binding is None or binding.credentials.password != password or \
                binding.credentials.username != account.auth_user:
            registrar_text = account.registrar or self.default_registrar
            aor = SipURI.parse(account.aor)
            registrar = SipURI.parse(registrar_text) if registrar_text else SipURI(host=aor.host, scheme=aor.scheme)
            binding = Binding(
                aor=aor, registrar=registrar,
                credentials=Credentials(account.auth_user, password),
                contact_params={"+sip.instance": instance.sip_instance, "reg-id": str(instance.reg_id)},
                display_name=account.display_name, user_agent=self.user_agent,
                contact_user=contact_user(instance),
            )
            self._bindings[instance.selector] = binding
        return binding

    def _track(self, selector: str, flow: Flow, *, bound: bool) -> None:
        self._untrack(selector)
        if bound and flow.reliable:
            self._flow_of[selector] = flow.key
            self._flow_users.setdefault(flow.key, set()).add(selector)

    def _untrack(self, selector: str) -> None:
        key = self._flow_of.pop(selector, None)
        if key is not None:
            users = self._flow_users.get(key)
            if users is not None:
                users.discard(selector)
                if not users:
                    del self._flow_users[key]

    def _flow_closed(self, flow: Flow, reason: str) -> None:
        users = self._flow_users.pop(flow.key, set())
        for selector in users:
            self._flow_of.pop(selector, None)
        if users and self.on_flow_lost is not None:
            log.info("flow %s lost (%s): re-registering %d instances", flow, reason, len(users))
            self.on_flow_lost(sorted(users))
