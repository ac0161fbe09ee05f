"""The app API's operations: enrolment, state reports, push target, delete, call progress.

State changes go through the lifecycle owner (:mod:`sipis.lifecycle`, which also keeps the set of
instances); everything else this module changes is announced on the bus (storage follows from
there). Bearer tokens are stored only as hashes.

Acknowledge only what is stored, apply only what is acknowledged: every app operation first has storage
commit the row its change will produce (a copy of the instance showing the change), within
``api.commit_timeout``; only then is the change applied (lifecycle transitions, REGISTERs, events).
Storing first rather than applying and rolling back, because a removed binding or a sent REGISTER
cannot be taken back. When storage does not commit in time, :class:`StorageUnavailable` reaches
the app API (503) and nothing changed.
"""

from __future__ import annotations

import logging
import secrets
import sys
import uuid
from dataclasses import replace
from typing import Protocol

from contract.documents import HeldCall
from contract.events import (
    InstanceAppReport,
    InstanceDeleted,
    InstanceEnrolled,
    InstancePushChanged,
    InstanceUpdated,
)
from sipis.api.models import EnrollIn, PushIn
from sipis.api.service_protocol import InstanceGone, SelectorTaken, ServiceError
from sipis.calls import CallError, CallManager
from sipis.clock import Clock
from sipis.cluster import ChangeSignal
from sipis.crypto import hash_token, new_token, tokens_equal
from sipis.events import EventBus
from sipis.instance import Account, AppState, Instance, PushTarget
from sipis.lifecycle import InstanceLifecycle, Unusable, is_usable
from sipis.proxy_register import ProxyRegistrar

log = logging.getLogger(__name__)


class Storage(Protocol):
    """Stores a change before it is applied (:class:`sipis.persistence.InstancePersistence`)."""

    async def store(self, instance: Instance) -> None:
        """Commit this row (raises :class:`storage.writer.StorageUnavailable` when it cannot)."""
        ...

    async def store_deletion(self, selector: str) -> None: ...

    def undo_deletion(self, selector: str) -> None: ...


class InstanceService:
    def __init__(self, *, lifecycle: InstanceLifecycle, registrar: ProxyRegistrar, bus: EventBus,
                 clock: Clock, enroll_tokens: tuple[str, ...], calls: CallManager | None = None,
                 storage: Storage | None = None, signal: ChangeSignal | None = None) -> None:
        self.lifecycle = lifecycle
        #: the held-call manager, when calls are handled (the app reports progress to it)
        self.calls = calls
        #: stores each change before it is applied: what an app was told is never lost
        self.storage = storage
        #: the other nodes' copies follow every stored change through it (None: one node)
        self.signal = signal
        self.registrar = registrar
        self.bus = bus
        self.clock = clock
        self._enroll_hashes = tuple(hash_token(t) for t in enroll_tokens)

    # ------------------------------------------------------------------ lookups

    @property
    def instances(self) -> dict[str, Instance]:
        return self.lifecycle.instances

    def get(self, selector: str) -> Instance | None:
        return self.lifecycle.get(selector)

    def by_contact_user(self, user: str) -> Instance | None:
        return self.lifecycle.by_contact_user(user)

    def check_enroll_token(self, token: str) -> bool:
        digest = hash_token(token)
        return any(tokens_equal(digest, known) for known in self._enroll_hashes)

    def check_instance_token(self, selector: str, token: str) -> bool:
        instance = self.instances.get(selector)
        expected = instance.token_hash if instance is not None else hash_token(secrets.token_hex(8))
        return tokens_equal(hash_token(token), expected) and instance is not None

    # ------------------------------------------------------------------ app operations

    async def enroll(self, request: EnrollIn, *, by_owner: bool = False) -> tuple[Instance, str]:
        token = new_token()
        now = self.clock.wall()
        account_in, push_in = request.account, request.push
        account = Account(
            aor=account_in.aor, username=account_in.username,
            password=account_in.password.get_secret_value(), auth_username=account_in.auth_username,
            registrar=account_in.registrar, display_name=account_in.display_name,
        )
        push = PushTarget(push_in.provider, push_in.app_id, push_in.token, push_in.voip_token)
        selector = request.selector or _new_selector()
        existing = self.instances.get(selector)
        if existing is not None:
            if not by_owner:
                # The enrolment token is shared by every install: with it alone, anyone knowing a
                # selector could take that instance over (its calls, its push target).
                raise SelectorTaken("selector is taken: re-enrol it with that instance's own token, "
                                    "or enrol without a selector")
            if request.instance_id is not None and str(request.instance_id) != existing.instance_id:
                raise ServiceError("instance_id differs from the enrolled instance; use a new selector")
            credentials_changed = _account_key(existing.account) != _account_key(account)
            off = existing.disabled or existing.state is AppState.OFF  # reactivate() makes it active
            token_hash = hash_token(token)
            await self._store(replace(existing, account=account, push=push, token_hash=token_hash,
                                      app_last_seen=now, state=AppState.ACTIVE if off else existing.state,
                                      disabled=False))
            existing.account, existing.push = account, push
            _share_common_strings(existing)
            existing.token_hash = token_hash
            existing.app_last_seen = now
            if self.lifecycle.owns(selector):
                self.lifecycle.reactivate(existing)
            else:
                self.lifecycle.mirror(existing, replace(existing, state=AppState.ACTIVE if off else existing.state,
                                                        disabled=False))
            self.bus.publish(selector, InstanceUpdated(credentials_changed))
            if credentials_changed and existing.state in (AppState.INACTIVE, AppState.PROXIED) and \
                    self.lifecycle.owns(selector):
                self.registrar.forget(selector)
                self.lifecycle.re_register(existing)
            await self._changed(selector)
            return existing, token
        instance = Instance(
            selector=selector, account=account, push=push, token_hash=hash_token(token),
            instance_id=str(request.instance_id or uuid.uuid4()), app_last_seen=now, created_at=now,
        )
        await self._store(instance)
        self.add(instance)
        await self.lifecycle.claim_new(selector)
        self.bus.publish(selector, InstanceEnrolled(account.aor))
        await self._changed(selector)
        return instance, token

    async def set_state(self, selector: str, state: str, contact: str | None) -> Instance:
        instance = self._require(selector)
        owned = self.lifecycle.owns(selector)
        if not (self.lifecycle.may_act(instance) if owned else is_usable(instance)):
            raise ServiceError("instance is off; enrol again to reactivate it")
        now = self.clock.wall()
        if state == "inactive":  # take_over() leaves inactive and proxied as they are
            after = replace(instance, app_last_seen=now,
                            state=AppState.INACTIVE if instance.state is AppState.ACTIVE else instance.state)
        else:
            after = replace(instance, app_last_seen=now, app_contact=contact, state=AppState.ACTIVE)
        await self._store(after)
        # asked again: a lease claimed or lost while the change was stored decides who carries it out
        if not self.lifecycle.owns(selector):  # stored: its owner carries it out when signalled
            self.lifecycle.mirror(instance, after)
        else:
            try:
                if state == "inactive":
                    self.lifecycle.take_over(instance)
                else:
                    self.lifecycle.hand_back(instance, contact)
            except Unusable:
                raise ServiceError("instance is off; enrol again to reactivate it") from None
        instance.app_last_seen = now
        if state != "inactive":
            instance.app_contact = contact
        self.bus.publish(selector, InstanceAppReport(state, contact))
        await self._changed(selector)
        return instance

    async def update_push(self, selector: str, push: PushIn) -> Instance:
        instance = self._require(selector)
        target = PushTarget(push.provider, push.app_id, push.token, push.voip_token)
        now = self.clock.wall()
        await self._store(replace(instance, push=target, app_last_seen=now))
        instance.push = target
        _share_common_strings(instance)
        instance.app_last_seen = now
        self.bus.publish(selector, InstancePushChanged(provider=push.provider))
        await self._changed(selector)
        return instance

    async def delete(self, selector: str) -> None:
        instance = self._require(selector)
        if self.storage is not None:
            await self.storage.store_deletion(selector)
        if not self.lifecycle.owns(selector):  # its owner removes the binding when signalled
            await self.lifecycle.deleted_elsewhere(selector)
            self.bus.publish(selector, InstanceDeleted("deleted by app"))
            await self._changed(selector)
            return
        try:
            await self.lifecycle.retire(instance, reason="deleted by app", delete=True)
        except BaseException:
            if self.storage is not None:  # nothing was retired: its row must not stay deleted
                self.storage.undo_deletion(selector)
            raise
        await self._changed(selector)

    async def call_progress(self, selector: str, push_id: str) -> HeldCall:
        instance = self._require(selector)
        instance.app_last_seen = self.clock.wall()
        if self.calls is None:
            raise InstanceGone("no such call")
        try:
            call = self.calls.progress(selector, push_id)
        except CallError:
            raise InstanceGone("no such held call for this instance") from None
        return call.view(self.clock)

    async def _store(self, after: Instance) -> None:
        if self.storage is not None:
            await self.storage.store(after)

    async def _changed(self, selector: str) -> None:
        if self.signal is not None:
            await self.signal.changed(selector)

    # ------------------------------------------------------------------ core operations

    def add(self, instance: Instance) -> None:
        """Take an instance under management (enrolment)."""
        _share_common_strings(instance)
        self.lifecycle.add(instance)

    def resume(self, instance: Instance) -> None:
        """After a restart: manage the instance again (see :meth:`InstanceLifecycle.resume`)."""
        _share_common_strings(instance)
        self.lifecycle.resume(instance)

    def _require(self, selector: str) -> Instance:
        instance = self.instances.get(selector)
        if instance is None:
            raise InstanceGone("no such instance")
        return instance


def _share_common_strings(instance: Instance) -> None:
    """Values most instances have in common (the registrar, the push provider and app) become one
    string object each instead of one copy per enrolment: at 100k instances that is megabytes.
    Secrets and per-instance values are left alone."""
    account, push = instance.account, instance.push
    if account.registrar is not None:
        account.registrar = sys.intern(account.registrar)
    push.provider = sys.intern(push.provider)
    push.app_id = sys.intern(push.app_id)


def _new_selector() -> str:
    """Acrobits-shaped: 40 hex digits, a colon, 8 hex digits; all 192 bits random (≥ 128 needed),
    so nobody finds another install's selector by guessing."""
    return f"{secrets.token_hex(20).upper()}:{secrets.token_hex(4).upper()}"


def _account_key(account: Account) -> tuple[str | None, ...]:
    return (account.aor, account.username, account.auth_username, account.password, account.registrar)
