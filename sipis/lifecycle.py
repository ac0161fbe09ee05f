"""The one owner of the instance lifecycle: the only writer of ``Instance.state`` and ``disabled``.

Everyone else asks it (DESIGN.md, "One contract, one owner"):

* :func:`is_usable` — may anything be done for this instance at all (not off, not disabled,
  credentials present)? A pure function of the instance (ageing decides with it).
* :meth:`InstanceLifecycle.may_act` — may *this node* act for it now? It is the one check made
  before every transition, before the registration engine starts a REGISTER for a binding and
  before a held call or a text push is accepted for the instance. On one node it is "usable and
  not being retired"; the cluster's leases plug in here and nowhere else.

Transitions, each publishing exactly one ``instance.state`` event when the state changes:
:meth:`take_over` (→ ``inactive``), :meth:`hand_back` (→ ``active``), :meth:`retire` (→ ``off``,
or forgotten on delete), :meth:`disable` (→ ``off`` for good), :meth:`reactivate` (re-enrolment,
``off`` → ``active``), :meth:`resume` (after a restart) and what the registration engine reports
(:meth:`achieved`: a confirmed binding → ``proxied``, a lapsed one → ``inactive``). The engine
writes only its own ``registration`` fields.

The instance directory (selector and SIPIS Contact user → instance) lives here too: taking an
instance under management and forgetting it are lifecycle steps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from contract.events import InstanceDeleted, InstanceStateChanged
from contract.masking import mask
from sipis.clock import Clock
from sipis.engine import Achieved, RegistrationEngine
from sipis.events import EventBus
from sipis.instance import AppState, Instance
from sipis.proxy_register import ProxyRegistrar, contact_user
from sipis.sip.register import RegisterResult

log = logging.getLogger(__name__)

#: How long a retirement waits for the registrar to confirm the removal of our binding.
UNREGISTER_WAIT = 5.0

#: Told of every hand-back: the instance, the removal of our binding (resolves once the registrar
#: confirmed it) and the contact the app reported (None: release to its AOR).
HandBackListener = Callable[[Instance, "asyncio.Future[RegisterResult | None]", str | None], None]


class Unusable(RuntimeError):
    """The instance's state does not allow this transition (off, disabled, or the wrong state)."""


def is_usable(instance: Instance) -> bool:
    return not instance.disabled and instance.state is not AppState.OFF and instance.account.password is not None


class InstanceLifecycle:
    def __init__(self, *, engine: RegistrationEngine, registrar: ProxyRegistrar, bus: EventBus,
                 clock: Clock) -> None:
        self.engine = engine
        self.registrar = registrar
        self.bus = bus
        self.clock = clock
        self.instances: dict[str, Instance] = {}
        self._by_contact_user: dict[str, str] = {}
        #: selectors being retired: unusable from the start of the removal, off at its end
        self._retiring: set[str] = set()
        self._hand_back_listeners: list[HandBackListener] = []
        engine.owner = self

    # ------------------------------------------------------------------ questions

    def get(self, selector: str) -> Instance | None:
        return self.instances.get(selector)

    def by_contact_user(self, user: str) -> Instance | None:
        """The instance whose SIPIS Contact has this user part (incoming requests are routed by it)."""
        selector = self._by_contact_user.get(user)
        return self.instances.get(selector) if selector is not None else None

    def may_act(self, instance: Instance) -> bool:
        """May this node act for the instance now? One node owns every instance (leases go here)."""
        return is_usable(instance) and instance.selector not in self._retiring

    def on_hand_back(self, listener: HandBackListener) -> None:
        self._hand_back_listeners.append(listener)

    # ------------------------------------------------------------------ transitions

    def add(self, instance: Instance) -> None:
        """Take an instance under management (enrolment or restore after a restart)."""
        self.instances[instance.selector] = instance
        self._by_contact_user[contact_user(instance)] = instance.selector

    def take_over(self, instance: Instance, reason: str | None = None) -> None:
        """The app went to sleep (or an operator forces it): register on its behalf."""
        self._require_usable(instance)
        fresh = instance.state is AppState.ACTIVE
        if fresh:
            self._change(instance, AppState.INACTIVE, reason)
        self.engine.take_over(instance, fresh=fresh)

    def hand_back(self, instance: Instance, contact: str | None, reason: str | None = None
                  ) -> asyncio.Future[RegisterResult | None]:
        """The app is active again (``contact``: its own, when it reported one): drop only our
        binding; the hand-back listeners release held calls once it is gone."""
        self._require_usable(instance)
        self._change(instance, AppState.ACTIVE, reason)
        removal = self.engine.hand_back(instance)
        for listener in self._hand_back_listeners:
            listener(instance, removal, contact)
        return removal

    def re_register(self, instance: Instance) -> None:
        """REGISTER now (cuts short a backoff); only while we are meant to hold the registration."""
        self._require_usable(instance)
        if instance.state not in (AppState.INACTIVE, AppState.PROXIED):
            raise Unusable("the app registers itself (state active); use take-over first")
        self.engine.refresh_now(instance)

    def reactivate(self, instance: Instance) -> None:
        """The app enrolled again: a disabled or off instance becomes usable (``active``)."""
        if instance.disabled or instance.state is AppState.OFF:
            instance.disabled = False
            self._change(instance, AppState.ACTIVE, "enrolled again", force=True)

    def resume(self, instance: Instance) -> None:
        """After a restart: manage the instance again and take over where the app was asleep."""
        self.add(instance)
        if not self.may_act(instance) or instance.state not in (AppState.INACTIVE, AppState.PROXIED):
            return
        expires_at = instance.registration.expires_at
        if expires_at is None or expires_at <= self.clock.wall():
            self._change(instance, AppState.INACTIVE, "registration lapsed during the restart")
        self.registrar.prepare(instance)  # built during start-up, so Core.start's gc.freeze() covers it
        self.engine.take_over(instance, fresh=False)

    async def retire(self, instance: Instance, *, reason: str, delete: bool) -> None:
        """Remove our binding, wipe the credentials; then forget the instance or turn it off."""
        await self._retire(instance, reason=reason, delete=delete, disable=False)

    async def disable(self, instance: Instance, *, reason: str) -> None:
        """Like :meth:`retire`, and only a new enrolment brings the instance back."""
        await self._retire(instance, reason=reason, delete=False, disable=True)

    def achieved(self, instance: Instance, what: Achieved) -> None:
        """The registration engine's report while it is meant to hold the registration."""
        if what is Achieved.REGISTERED and instance.state is AppState.INACTIVE:
            self._change(instance, AppState.PROXIED)
        elif what is Achieved.LAPSED and instance.state is AppState.PROXIED:
            self._change(instance, AppState.INACTIVE)

    # ------------------------------------------------------------------ internals

    async def _retire(self, instance: Instance, *, reason: str, delete: bool, disable: bool) -> None:
        selector = instance.selector
        self._retiring.add(selector)
        try:
            removal = self.engine.remove(instance)
            try:
                await asyncio.wait_for(asyncio.shield(removal), UNREGISTER_WAIT)
            except TimeoutError:
                log.warning("unREGISTER of %s not confirmed within %.0f s", mask(selector), UNREGISTER_WAIT)
            self.registrar.forget(selector)
            instance.account.password = None
            if delete:
                self.instances.pop(selector, None)
                self._by_contact_user.pop(contact_user(instance), None)
                self.bus.publish(selector, InstanceDeleted(reason))
                return
            if disable:
                instance.disabled = True
            self._change(instance, AppState.OFF, reason, force=disable)
        finally:
            self._retiring.discard(selector)

    def _require_usable(self, instance: Instance) -> None:
        if not self.may_act(instance):
            raise Unusable("instance is off (credentials wiped); the app has to enrol again")

    def _change(self, instance: Instance, state: AppState, reason: str | None = None, *,
                force: bool = False) -> None:
        """The one write of ``state``: one event per change (``force``: also when only
        ``disabled`` changed along with it)."""
        previous = instance.state
        if previous is state and not force:
            return
        instance.state = state
        self.bus.publish(instance.selector, InstanceStateChanged(state, previous, reason))
