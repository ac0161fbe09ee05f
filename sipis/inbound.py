"""Which incoming INVITE/MESSAGE requests the core serves at all, decided before the SIP layer
keeps anything for them (the endpoint's screens).

A request for a user we do not know gets its ``404`` statelessly: one response, no transaction, no
retransmissions — junk costs neither memory nor amplification. A request for one of our bindings is
taken only from where we registered it (the registrar's addresses, the flow we registered on) or a
configured trusted source; anyone else gets ``403`` and rings nothing.
"""

from __future__ import annotations

from sipis.instance import Instance
from sipis.lifecycle import InstanceLifecycle
from sipis.proxy_register import ProxyRegistrar
from sipis.sip.message import Request, SipParseError
from sipis.sip.sources import TrustedSources
from sipis.sip.transport import Flow


def instance_for(lifecycle: InstanceLifecycle, request: Request) -> Instance | None:
    """The instance a request is for, by the user part of its Request-URI (our Contact's)."""
    try:
        user = request.request_uri.user
    except SipParseError:
        return None
    return lifecycle.by_contact_user(user) if user else None


class InboundGate:
    """The endpoint's screen for INVITE and MESSAGE: a status to refuse with, or None to serve."""

    def __init__(self, lifecycle: InstanceLifecycle, registrar: ProxyRegistrar,
                 trusted: TrustedSources | None = None) -> None:
        self.lifecycle = lifecycle
        self.registrar = registrar
        self.trusted = trusted or TrustedSources()
        #: requests refused because of where they came from
        self.forbidden = 0

    def __call__(self, request: Request, flow: Flow) -> int | None:
        instance = instance_for(self.lifecycle, request)
        if instance is None:
            return 404
        if self.registrar.from_registrar(instance.selector, flow) or self.trusted.admits(flow.remote):
            return None
        self.forbidden += 1
        return 403
