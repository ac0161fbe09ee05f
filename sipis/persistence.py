"""Instances to and from storage records; the storage subscriber of the event bus.

Storage learns about changes only through the bus (DESIGN.md: one path per fact): every event that
names an instance queues a snapshot of that instance in the batched writer (taken when the batch is
written, so a burst of changes to one instance costs one row), every event is appended to the event
log, and ``instance.deleted`` deletes the row. Passwords are encrypted with the :class:`SecretBox`
under the instance's selector, once per password change (the blob is cached and re-checked by
decrypting it, which keeps the cache at one ``bytes`` per instance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from contract.documents import AuditEntry, HeldCall, PushRecord
from contract.events import Alarm, InstanceDeleted, MessageReceived
from sipis.clock import Clock
from sipis.crypto import DecryptionError, SecretBox
from sipis.events import Event, EventBus
from sipis.instance import Account, AppState, Instance, PushTarget, Registration, RegStatus
from storage.records import InstanceRecord
from storage.writer import BatchedWriter

log = logging.getLogger(__name__)


class InstancePersistence:
    def __init__(self, writer: BatchedWriter, box: SecretBox, lookup: Callable[[str], Instance | None],
                 clock: Clock) -> None:
        self.writer = writer
        self.box = box
        self.lookup = lookup
        self.clock = clock
        self._blobs: dict[str, bytes] = {}  # selector → blob of its current password
        self._snapshot = self.snapshot  # one bound method for every queued snapshot

    def attach(self, bus: EventBus) -> Callable[[], None]:
        return bus.subscribe(self.on_event)

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
            self.writer.delete_instance(event.selector)
            return
        if self.lookup(event.selector) is not None:
            self.writer.snapshot_instance(event.selector, self._snapshot)

    def snapshot(self, selector: str) -> InstanceRecord | None:
        """The row of the instance as it is now; None when it is gone."""
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
                          record.selector)
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


def _enum(kind: type[E], value: str, default: E) -> E:
    try:
        return kind(value)
    except ValueError:
        return default
