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
from collections.abc import Callable, Sequence
from typing import Protocol

from contract.events import InstanceDeleted, InstanceStateChanged
from contract.masking import mask
from sipis.clock import Clock
from sipis.engine import Achieved, RegistrationEngine
from sipis.events import EventBus
from sipis.instance import AppState, Instance
from sipis.proxy_register import ProxyRegistrar, contact_user
from sipis.sip.register import RegisterResult
from storage.cluster import Lease

log = logging.getLogger(__name__)

#: How long a retirement waits for the registrar to confirm the removal of our binding.
UNREGISTER_WAIT = 5.0

#: Told of every hand-back: the instance, the removal of our binding (resolves once the registrar
#: confirmed it) and the contact the app reported (None: release to its AOR).
HandBackListener = Callable[[Instance, "asyncio.Future[RegisterResult | None]", str | None], None]


class Ownership(Protocol):
    """Which instances this node owns (:class:`sipis.cluster.LeaseKeeper`)."""

    def owns(self, selector: str) -> bool: ...

    def epoch(self, selector: str) -> int: ...

    def forfeit(self, selector: str) -> None: ...

    async def new_epoch(self, selector: str) -> int | None: ...

    def claim_soon(self) -> None: ...


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
        #: the cluster's leases (None: one node, it owns every instance)
        self.ownership: Ownership | None = None
        #: asked to load the stored row of an instance this node won the lease of (unknown here:
        #: enrolled on another node a moment ago); it comes back through :meth:`adopt`
        self.load_missing: Callable[[str], None] | None = None
        engine.owner = self

    def use_ownership(self, ownership: Ownership) -> None:
        """Act only for the instances ``ownership`` says are ours (it tells :meth:`acquired` and
        :meth:`lost`), counting their CSeqs in the lease's epoch."""
        self.ownership = ownership
        self.registrar.new_epoch = self._new_epoch
        self.registrar.owns = ownership.owns

    # ------------------------------------------------------------------ questions

    def get(self, selector: str) -> Instance | None:
        return self.instances.get(selector)

    def by_contact_user(self, user: str) -> Instance | None:
        """The instance whose SIPIS Contact has this user part (incoming requests are routed by it)."""
        selector = self._by_contact_user.get(user)
        return self.instances.get(selector) if selector is not None else None

    def may_act(self, instance: Instance) -> bool:
        """May this node act for the instance now: usable, not being retired, and ours (its lease)."""
        return is_usable(instance) and instance.selector not in self._retiring and self.owns(instance.selector)

    def owns(self, selector: str) -> bool:
        """Is this node the one acting for the instance (one node: always)?"""
        return self.ownership is None or self.ownership.owns(selector)

    def on_hand_back(self, listener: HandBackListener) -> None:
        self._hand_back_listeners.append(listener)

    # ------------------------------------------------------------------ transitions

    def add(self, instance: Instance) -> None:
        """Take an instance under management (enrolment or restore after a restart)."""
        self.instances[instance.selector] = instance
        self._by_contact_user[contact_user(instance)] = instance.selector

    def enrolled(self, instance: Instance) -> None:
        """Take a newly enrolled instance under management; nobody owns it yet, so ask for a claim
        now rather than at the next lease round."""
        self.add(instance)
        if self.ownership is not None and not self.ownership.owns(instance.selector):
            self.ownership.claim_soon()

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
        self._act_for(instance)

    def acquired(self, leases: Sequence[Lease], *, reload: bool) -> None:
        """This node owns these now: register those whose app sleeps, in the lease's epoch, at
        once (the old owner stopped). ``reload``: our copy may miss a change the old owner made
        (a signal lost with storage): the stored row follows and is adopted."""
        for lease in leases:
            instance = self.instances.get(lease.selector)
            if instance is not None:
                instance.epoch = lease.epoch
                self._act_for(instance)
            if (instance is None or reload) and self.load_missing is not None:
                self.load_missing(lease.selector)

    def lost(self, selectors: Sequence[str]) -> None:
        """Another node owns these now: stop at once (its REGISTER replaces our binding)."""
        for selector in selectors:
            instance = self.instances.get(selector)
            if instance is not None:
                self.engine.abandon(instance)

    # ------------------------------------------------------------------ changes made on other nodes

    def mirror(self, instance: Instance, stored: Instance) -> None:
        """Show a change stored for an instance another node owns (that node carries it out)."""
        instance.state, instance.disabled = stored.state, stored.disabled
        instance.registration = stored.registration

    async def adopt(self, stored: Instance) -> None:
        """Another node stored a change of this instance (an app report, a re-enrolment, an
        operator's action): the owner carries it out, every other node only mirrors it."""
        live = self.instances.get(stored.selector)
        if live is None:
            self.add(stored)  # enrolled on another node
            if self.ownership is not None:
                stored.epoch = self.ownership.epoch(stored.selector)
            self._act_for(stored)
            return
        credentials_changed = live.account != stored.account
        live.account, live.push, live.token_hash = stored.account, stored.push, stored.token_hash
        live.app_contact, live.app_last_seen = stored.app_contact, max(live.app_last_seen, stored.app_last_seen)
        if not self.owns(live.selector):
            self.mirror(live, stored)
            return
        reason = "changed on another node"
        if stored.disabled and not live.disabled:
            await self.disable(live, reason=reason)
        elif stored.state is AppState.OFF and live.state is not AppState.OFF:
            await self.retire(live, reason=reason, delete=False)
        elif is_usable(stored) and not is_usable(live):
            self.reactivate(live)
        if not self.may_act(live):
            return
        asleep = (AppState.INACTIVE, AppState.PROXIED)
        if stored.state is AppState.ACTIVE and live.state in asleep:
            self.hand_back(live, stored.app_contact, reason)
        elif stored.state in asleep and live.state is AppState.ACTIVE:
            self.take_over(live, reason)
        elif credentials_changed and live.state in asleep:
            self.registrar.forget(live.selector)
            self.re_register(live)

    async def deleted_elsewhere(self, selector: str) -> None:
        """Another node deleted the instance's row: its owner removes the binding and tells the
        app's subscribers; every other node just forgets its copy."""
        instance = self.instances.get(selector)
        if instance is None:
            return
        if self.owns(selector):
            await self.retire(instance, reason="deleted on another node", delete=True)
            return
        self.engine.abandon(instance)
        self.registrar.forget(selector)
        self.instances.pop(selector, None)
        self._by_contact_user.pop(contact_user(instance), None)

    def fenced(self, instance: Instance) -> None:
        """The registrar holds a newer owner's binding (the engine stopped already)."""
        if self.ownership is not None:
            self.ownership.forfeit(instance.selector)

    def _act_for(self, instance: Instance) -> None:
        """Take over where the app is asleep, if this node may act for the instance."""
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

    async def _new_epoch(self, instance: Instance) -> bool:
        """The binding's CSeqs in its epoch are used up: a new epoch, while the lease is ours."""
        if self.ownership is None:
            return False
        epoch = await self.ownership.new_epoch(instance.selector)
        if epoch is None:
            return False
        instance.epoch = epoch
        return True

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
