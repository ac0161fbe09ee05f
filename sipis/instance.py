"""The instance model: one app install's SIP account, push target and registration state.

``state`` is what the app asked for and what we achieved (Acrobits' names in brackets):

* ``active``   — the app is in the foreground and registers itself (Idle);
* ``inactive`` — the app is asleep and the SIPIS is taking over (Registering);
* ``proxied``  — the SIPIS holds a confirmed registration for it (Registered);
* ``off``      — expired or disabled; credentials wiped (Off).

``reg_status`` is the registration engine's detail: ``idle``, ``registering``, ``registered``,
``unregistering``, ``unauthorized``, ``error``. Times named ``*_at`` are wall-clock epoch seconds
(for display and storage); the engine keeps its own monotonic schedule.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, cast

from contract.codec import to_json
from contract.documents import InstanceView, PushView, RegistrationView
from contract.kinds import AppState, RegStatus
from contract.masking import mask

__all__ = ["Account", "AppState", "Instance", "PushTarget", "RegStatus", "Registration", "mask"]


@dataclass(slots=True)
class PushTarget:
    provider: str
    app_id: str
    token: str
    voip_token: str | None = None
    unreachable: bool = False  # the provider said the token is dead: no more pushes to it


@dataclass(slots=True)
class Account:
    aor: str  # sip:alice@example.com
    username: str
    password: str | None  # plaintext only in memory; None once wiped
    auth_username: str | None = None
    registrar: str | None = None  # sip:/sips: URI of the registrar or outbound proxy
    display_name: str | None = None

    @property
    def auth_user(self) -> str:
        return self.auth_username or self.username

    def __repr__(self) -> str:  # never show the password
        return f"Account(aor={self.aor!r}, username={self.username!r}, registrar={self.registrar!r})"


@dataclass(slots=True)
class Registration:
    status: RegStatus = RegStatus.IDLE
    last_code: int | None = None
    last_reason: str | None = None
    expires_at: float | None = None
    next_refresh_at: float | None = None
    failure_count: int = 0
    backoff_until: float | None = None
    registered_at: float | None = None
    unregistered_since: float | None = None
    flow: str | None = None  # description of the flow in use, for the console
    target: str | None = None  # the registrar target (``transport:host:port``) of the last exchange
    registrar_agent: str | None = None  # Server (else User-Agent) of the registrar's last answer


@dataclass(slots=True)
class Instance:
    selector: str
    account: Account
    push: PushTarget
    token_hash: str
    instance_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    reg_id: int = 1
    state: AppState = AppState.ACTIVE
    registration: Registration = field(default_factory=Registration)
    app_contact: str | None = None
    app_last_seen: float = 0.0
    created_at: float = 0.0
    disabled: bool = False
    #: the lease epoch this node holds the instance in (memory only; 0: no leases, unfenced): the
    #: CSeqs of its REGISTERs count in it (sipis.sip.register.EPOCH_SHIFT)
    epoch: int = 0

    @property
    def sip_instance(self) -> str:
        """The ``+sip.instance`` Contact parameter value (RFC 5626 §4.1)."""
        return f'"<urn:uuid:{self.instance_id}>"'

    def view(self) -> InstanceView:
        """Everything an app or operator may see: no password, no bearer token, tokens masked."""
        account, push, reg = self.account, self.push, self.registration
        return InstanceView(
            selector=self.selector, state=self.state.value, aor=account.aor, username=account.username,
            auth_username=account.auth_username, registrar=account.registrar,
            display_name=account.display_name, instance_id=self.instance_id, reg_id=self.reg_id,
            push=PushView(provider=push.provider, app_id=push.app_id, token=mask(push.token),
                          voip_token=mask(push.voip_token) if push.voip_token else None,
                          unreachable=push.unreachable),
            registration=RegistrationView(
                status=reg.status.value, last_code=reg.last_code, last_reason=reg.last_reason,
                expires_at=reg.expires_at, next_refresh_at=reg.next_refresh_at,
                failure_count=reg.failure_count, backoff_until=reg.backoff_until, flow=reg.flow),
            app_contact=self.app_contact, app_last_seen=self.app_last_seen, created_at=self.created_at,
            disabled=self.disabled, credentials_stored=account.password is not None,
        )

    def public_view(self) -> dict[str, Any]:
        """:meth:`view` as JSON."""
        return cast(dict[str, Any], to_json(self.view()))
