"""Instances to and from storage records; the storage subscriber of the event bus.

Storage learns about changes only through the bus (DESIGN.md: one path per fact): every event that
names an instance queues a snapshot of that instance in the batched writer (taken when the batch is
written, so a burst of changes to one instance costs one row), every event is appended to the event
log, and ``instance.deleted`` deletes the row. Passwords are encrypted with the :class:`SecretBox`
under the instance's selector, once per password change (the blob is cached and re-checked by
decrypting it, which keeps the cache at one ``bytes`` per instance).

App changes are stored *before* they are applied (:meth:`InstancePersistence.store`): the row the
change will produce is staged and committed within ``commit_timeout``; only then does the service
apply it (and announce it on the bus). When storage does not commit in time, the staged row is
replaced by the live one before it can ever reach the disk, and the app is told to retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from contract.documents import AuditEntry, HeldCall, PushRecord
from contract.events import Alarm, InstanceDeleted, MessageReceived
from contract.masking import mask
from sipis.clock import Clock
from sipis.crypto import DecryptionError, SecretBox
from sipis.events import Event, EventBus
from sipis.instance import Account, AppState, Instance, PushTarget, Registration, RegStatus
from storage.records import InstanceRecord
from storage.writer import BatchedWriter, StorageUnavailable

log = logging.getLogger(__name__)


class InstancePersistence:
    def __init__(self, writer: BatchedWriter, box: SecretBox, lookup: Callable[[str], Instance | None],
                 clock: Clock, commit_timeout: float = 2.0) -> None:
        self.writer = writer
        self.box = box
        self.lookup = lookup
        self.clock = clock
        self.commit_timeout = commit_timeout
        self._blobs: dict[str, bytes] = {}  # selector → blob of its current password
        self._snapshot = self.snapshot  # one bound method for every queued snapshot
        #: rows of changes being stored before they are applied (None: a deletion)
        self._staged: dict[str, InstanceRecord | None] = {}
        #: whether this node acts for (and so writes the live row of) an instance: another node
        #: owns the row of an instance it acts for, and this node's copy of it may be stale
        self.acts_for: Callable[[str], bool] = _always

    def attach(self, bus: EventBus) -> Callable[[], None]:
        return bus.subscribe(self.on_event)

    async def store(self, instance: Instance) -> None:
        """Commit the row of ``instance`` (the live one or a copy showing a change not yet applied)
        within ``commit_timeout``; else put the live row back in its place and raise
        :class:`StorageUnavailable`."""
        staged = self._staged[instance.selector] = self.record(instance)
        await self._commit_staged(instance.selector, staged, keep=False)

    async def store_deletion(self, selector: str) -> None:
        """Like :meth:`store` for deleting the row; on success the row stays deleted until the
        instance's ``instance.deleted`` event (the removal at the registrar comes in between)."""
        self._staged[selector] = None
        await self._commit_staged(selector, None, keep=True)

    def undo_deletion(self, selector: str) -> None:
        """A stored deletion whose removal did not happen: the live instance's row is written again."""
        self.unstage(selector, None)
        if self.lookup(selector) is not None:
            self.writer.snapshot_instance(selector, self._snapshot)

    def unstage(self, selector: str, staged: InstanceRecord | None) -> None:
        """Forget what this caller staged, unless another caller has staged over it since (two app
        calls for one instance at once: each removes only its own row)."""
        if selector in self._staged and self._staged[selector] is staged:
            del self._staged[selector]

    async def _commit_staged(self, selector: str, staged: InstanceRecord | None, *, keep: bool) -> None:
        if staged is None:
            self.writer.delete_instance(selector)
        else:
            self.writer.snapshot_instance(selector, self._snapshot)
        try:
            await self.writer.commit(self.commit_timeout)
        except StorageUnavailable:
            # The staged write is still queued and will be retried: from now on it writes the live
            # row (a queued snapshot reads it when written), so the change never reaches the disk.
            self.unstage(selector, staged)
            if self.lookup(selector) is None:
                self._blobs.pop(selector, None)
                self.writer.delete_instance(selector)
            else:
                self.writer.snapshot_instance(selector, self._snapshot)
            raise
        if not keep:
            self.unstage(selector, staged)

    def on_event(self, event: Event) -> None:
        payload = event.payload
        # Published payloads are never changed, so storage keeps them as they are until written.
        self.writer.append_event(event)
        if isinstance(payload, AuditEntry):
            self.writer.append_audit(payload)
            return
        if isinstance(payload, PushRecord):
            self.writer.upsert_push(payload)
            return
        if event.selector is None or isinstance(payload, _NOT_ABOUT_THE_INSTANCE):
            return
        if isinstance(payload, InstanceDeleted):
            self._blobs.pop(event.selector, None)
            self._staged.pop(event.selector, None)
            self.writer.delete_instance(event.selector)
            return
        if self.lookup(event.selector) is not None and self.acts_for(event.selector):
            self.writer.snapshot_instance(event.selector, self._snapshot)

    def snapshot(self, selector: str) -> InstanceRecord | None:
        """The row of the instance as it is now (or as a change being stored will make it); None
        when it is gone."""
        if selector in self._staged:
            return self._staged[selector]
        instance = self.lookup(selector)
        return self.record(instance) if instance is not None else None

    def record(self, instance: Instance) -> InstanceRecord:
        account, reg, push = instance.account, instance.registration, instance.push
        return InstanceRecord(
            selector=instance.selector, aor=account.aor, username=account.username,
            auth_username=account.auth_username, password_blob=self._blob(instance),
            registrar=account.registrar, display_name=account.display_name,
            instance_id=instance.instance_id, reg_id=instance.reg_id,
            push_provider=push.provider, push_app_id=push.app_id, push_token=push.token,
            push_voip_token=push.voip_token, token_hash=instance.token_hash,
            state=instance.state.value, reg_status=reg.status.value, last_code=reg.last_code,
            last_reason=reg.last_reason, expires_at=reg.expires_at, failure_count=reg.failure_count,
            app_contact=instance.app_contact, app_last_seen=instance.app_last_seen,
            created_at=instance.created_at, updated_at=self.clock.wall(),
            unregistered_since=reg.unregistered_since, push_unreachable=push.unreachable,
            disabled=instance.disabled,
        )

    def _blob(self, instance: Instance) -> bytes | None:
        password = instance.account.password
        if password is None:
            self._blobs.pop(instance.selector, None)
            return None
        cached = self._blobs.get(instance.selector)
        if cached is not None and self._decrypts_to(cached, instance.selector, password):
            return cached
        # A fresh random nonce per blob: encrypting only on a change keeps the key far from
        # AES-GCM's limit on random nonces (2^32 messages), which a refresh-rate re-encryption
        # of 100k instances would reach within a year.
        blob = self.box.encrypt(password, context=instance.selector)
        self._blobs[instance.selector] = blob
        return blob

    def _decrypts_to(self, blob: bytes, selector: str, password: str) -> bool:
        try:
            return self.box.decrypt(blob, context=selector) == password
        except DecryptionError:
            return False

    def restore(self, record: InstanceRecord) -> Instance:
        """Rebuild an instance from its row. A blob that fails to decrypt counts as wiped."""
        password: str | None = None
        if record.password_blob is not None:
            try:
                password = self.box.decrypt(record.password_blob, context=record.selector)
                self._blobs[record.selector] = record.password_blob
            except DecryptionError:
                log.error("credentials of %s cannot be decrypted (wrong key file?); treating as wiped",
                          mask(record.selector))
        registration = Registration(
            status=_enum(RegStatus, record.reg_status, RegStatus.IDLE), last_code=record.last_code,
            last_reason=record.last_reason, expires_at=record.expires_at,
            failure_count=record.failure_count, unregistered_since=record.unregistered_since,
        )
        return Instance(
            selector=record.selector,
            account=Account(aor=record.aor, username=record.username, password=password,
                            auth_username=record.auth_username, registrar=record.registrar,
                            display_name=record.display_name),
            push=PushTarget(record.push_provider, record.push_app_id, record.push_token,
                            record.push_voip_token, record.push_unreachable),
            token_hash=record.token_hash, instance_id=record.instance_id, reg_id=record.reg_id,
            state=_enum(AppState, record.state, AppState.ACTIVE), registration=registration,
            app_contact=record.app_contact, app_last_seen=record.app_last_seen,
            created_at=record.created_at, disabled=record.disabled,
        )


#: Events that change nothing stored in the instance row.
_NOT_ABOUT_THE_INSTANCE = (HeldCall, MessageReceived, Alarm)


E = TypeVar("E", AppState, RegStatus)


def _always(selector: str) -> bool:
    return True


def _enum(kind: type[E], value: str, default: E) -> E:
    try:
        return kind(value)
    except ValueError:
        return default
