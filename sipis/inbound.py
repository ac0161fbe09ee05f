"""Which incoming INVITE/MESSAGE requests the core serves at all, decided before the SIP layer
keeps anything for them (the endpoint's screens).

A request for a user we do not know gets its ``404`` statelessly: one response, no transaction, no
retransmissions — junk costs neither memory nor amplification.
"""

from __future__ import annotations

from sipis.instance import Instance
from sipis.lifecycle import InstanceLifecycle
from sipis.sip.message import Request, SipParseError
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

    def __init__(self, lifecycle: InstanceLifecycle) -> None:
        self.lifecycle = lifecycle

    def __call__(self, request: Request, flow: Flow) -> int | None:
        if instance_for(self.lifecycle, request) is None:
            return 404
        return None
