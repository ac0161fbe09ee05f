"""The instance service with real storage: enrolment, tokens, persistence through the bus,
credentials encrypted at rest, restore after a restart, delete and retire."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from sipis.api.models import AccountIn, EnrollIn, PushIn
from sipis.api.service_protocol import InstanceGone, SelectorTaken, ServiceError
from sipis.clock import FakeClock
from sipis.config import SipConfig
from sipis.crypto import SecretBox, load_or_create_key
from sipis.engine import RegistrationEngine
from sipis.events import EventBus
from sipis.instance import AppState, Instance, RegStatus
from sipis.lifecycle import InstanceLifecycle
from sipis.persistence import InstancePersistence
from sipis.service import InstanceService
from sipis.sip.register import Outcome, RegisterResult
from storage.database import Database
from storage.repositories import sqlite_stores
from storage.writer import BatchedWriter

PASSWORD = "correct horse battery staple"


@dataclass
class CountingBox(SecretBox):
    __slots__ = ("encryptions",)

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self.encryptions = 0

    def encrypt(self, plaintext: str, *, context: str) -> bytes:
        self.encryptions += 1
        return super().encrypt(plaintext, context=context)


@dataclass
class FakeRegistrar:
    """Stands in for the SIP side: records exchanges, always succeeds."""

    calls: list[tuple[str, int]] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)

    async def __call__(self, instance: Instance, expires: int) -> RegisterResult:
        self.calls.append((instance.selector, expires))
        return RegisterResult(Outcome.REGISTERED, 200, "OK", expires=expires)

    def forget(self, selector: str) -> None:
        self.forgotten.append(selector)

    def prepare(self, instance: Instance) -> None:
        self.prepared.append(instance.selector)


@dataclass
class World:
    path: Path
    clock: FakeClock
    bus: EventBus
    db: Database
    writer: BatchedWriter
    registrar: FakeRegistrar
    engine: RegistrationEngine
    service: InstanceService
    persistence: InstancePersistence

    async def settle(self) -> None:
        self.engine.tick()
        await self.engine.drain()
        await self.writer.flush()

    async def close(self) -> None:
        await self.writer.close()
        await self.db.close()


async def open_world(path: Path) -> World:
    clock = FakeClock()
    box = SecretBox(load_or_create_key(path / "credentials.key"))
    db = await Database.open(path / "sipis.db")
    stores = sqlite_stores(db)
    bus = EventBus(clock, first_seq=await stores.events.last_seq() + 1)
    writer = BatchedWriter(db, stores)
    writer.start()
    registrar = FakeRegistrar()
    engine = RegistrationEngine(registrar, bus, clock, SipConfig(register_rate=1000),
                                rng=random.Random(7))
    lifecycle = InstanceLifecycle(engine=engine, registrar=registrar, bus=bus, clock=clock)  # type: ignore[arg-type]
    persistence = InstancePersistence(writer, box, lifecycle.get, clock)
    service = InstanceService(lifecycle=lifecycle, registrar=registrar, bus=bus, clock=clock,  # type: ignore[arg-type]
                              enroll_tokens=("enrol-me",), storage=persistence)
    for record in await stores.instances.load_all():
        service.resume(persistence.restore(record))
    persistence.attach(bus)
    return World(path, clock, bus, db, writer, registrar, engine, service, persistence)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await open_world(tmp_path)
    yield w
    await w.close()


def enrol_request(user: str = "alice", selector: str | None = None, password: str = PASSWORD) -> EnrollIn:
    return EnrollIn(
        account=AccountIn(aor=f"sip:{user}@pbx.example.com", username=user, password=password,  # type: ignore[arg-type]
                          registrar="sip:pbx.example.com;transport=tcp"),
        push=PushIn(provider="mediator", app_id="com.example", token=f"push-token-{user}-0123456789"),
        selector=selector,
    )


async def test_enrol_issues_a_token_and_stores_only_its_hash(world: World) -> None:
    instance, token = await world.service.enroll(enrol_request())
    assert world.service.check_instance_token(instance.selector, token)
    assert not world.service.check_instance_token(instance.selector, token + "x")
    assert not world.service.check_instance_token("no-such-selector", token)
    assert world.service.check_enroll_token("enrol-me") and not world.service.check_enroll_token("nope")
    raw = (world.path / "sipis.db").read_bytes() + (world.path / "sipis.db-wal").read_bytes()
    assert token.encode() not in raw
    assert PASSWORD.encode() not in raw  # credentials are encrypted at rest


async def test_reenrolment_updates_and_rotates_the_token(world: World) -> None:
    first, old_token = await world.service.enroll(enrol_request())
    again, new_token = await world.service.enroll(
        enrol_request(selector=first.selector, password="new-password"), by_owner=True)
    assert again is first and new_token != old_token
    assert world.service.check_instance_token(first.selector, new_token)
    assert not world.service.check_instance_token(first.selector, old_token)
    assert first.account.password == "new-password"


async def test_reenrolment_without_the_owners_token_is_refused(world: World) -> None:
    first, token = await world.service.enroll(enrol_request())
    with pytest.raises(SelectorTaken):
        await world.service.enroll(enrol_request(selector=first.selector, password="taken-over"))
    assert first.account.password == PASSWORD and world.service.check_instance_token(first.selector, token)


async def test_state_changes_drive_the_engine_and_persist(world: World) -> None:
    instance, _ = await world.service.enroll(enrol_request())
    await world.service.set_state(instance.selector, "inactive", None)
    await world.settle()
    assert instance.state is AppState.PROXIED
    assert world.registrar.calls == [(instance.selector, 600)]
    record = await sqlite_stores(world.db).instances.get(instance.selector)
    assert record is not None and record.state == "proxied" and record.reg_status == "registered"

    await world.service.set_state(instance.selector, "active", "sip:alice@10.0.0.2:5060")
    await world.settle()
    assert world.registrar.calls[-1] == (instance.selector, 0)  # only our binding removed
    assert instance.state is AppState.ACTIVE and instance.registration.status is RegStatus.IDLE
    assert instance.app_contact == "sip:alice@10.0.0.2:5060"


async def test_restart_restores_instances_and_takes_sleeping_ones_over(tmp_path: Path) -> None:
    world = await open_world(tmp_path)
    sleeping, sleeping_token = await world.service.enroll(enrol_request("alice"))
    awake, _ = await world.service.enroll(enrol_request("bob"))
    await world.service.set_state(sleeping.selector, "inactive", None)
    await world.settle()
    await world.close()

    reopened = await open_world(tmp_path)
    try:
        restored = reopened.service.get(sleeping.selector)
        assert restored is not None
        assert restored.account.password == PASSWORD  # decrypted with the key file
        assert restored.instance_id == sleeping.instance_id
        assert reopened.service.check_instance_token(sleeping.selector, sleeping_token)
        assert reopened.service.get(awake.selector) is not None
        await reopened.settle()
        assert reopened.registrar.calls == [(sleeping.selector, 600)]  # only the sleeping app re-registered
        # its binding was built during start-up (covered by Core.start's gc.freeze()), the awake one's not
        assert reopened.registrar.prepared == [sleeping.selector]
        assert restored.state is AppState.PROXIED
    finally:
        await reopened.close()


async def test_a_foreign_key_file_means_wiped_credentials_not_a_crash(tmp_path: Path) -> None:
    world = await open_world(tmp_path)
    instance, _ = await world.service.enroll(enrol_request())
    await world.close()
    (tmp_path / "credentials.key").unlink()
    reopened = await open_world(tmp_path)  # a new key: the old blob cannot be decrypted
    try:
        restored = reopened.service.get(instance.selector)
        assert restored is not None and restored.account.password is None
    finally:
        await reopened.close()


async def test_delete_unregisters_wipes_and_forgets(world: World) -> None:
    instance, _ = await world.service.enroll(enrol_request())
    await world.service.set_state(instance.selector, "inactive", None)
    await world.settle()
    deleting = world.service.delete(instance.selector)
    import asyncio

    task = asyncio.ensure_future(deleting)
    for _ in range(500):  # the deletion is stored first, then the engine is asked to remove the binding
        await asyncio.sleep(0.001)
        world.engine.tick()
        if task.done():
            break
    await task
    assert world.registrar.calls[-1] == (instance.selector, 0)
    assert world.service.get(instance.selector) is None
    assert instance.account.password is None
    assert await sqlite_stores(world.db).instances.get(instance.selector) is None
    with pytest.raises(InstanceGone):
        await world.service.set_state(instance.selector, "inactive", None)


async def test_an_off_instance_refuses_state_changes_until_reenrolled(world: World) -> None:
    instance, _ = await world.service.enroll(enrol_request())
    await world.service.lifecycle.retire(instance, reason="test", delete=False)
    assert instance.state is AppState.OFF and instance.account.password is None
    with pytest.raises(ServiceError):
        await world.service.set_state(instance.selector, "inactive", None)
    again, _ = await world.service.enroll(enrol_request(selector=instance.selector), by_owner=True)
    assert again.state is AppState.ACTIVE and again.account.password == PASSWORD


async def test_instances_share_the_strings_they_have_in_common(world: World) -> None:
    """Registrar, push provider and app id are the same for most instances: one object each."""
    first, _ = await world.service.enroll(enrol_request("alice"))
    second, _ = await world.service.enroll(enrol_request("bob"))
    assert first.account.registrar == "sip:pbx.example.com;transport=tcp"
    assert first.account.registrar is second.account.registrar
    assert first.push.provider is second.push.provider and first.push.app_id is second.push.app_id
    assert first.push.token is not second.push.token  # per-instance values stay their own


async def test_a_password_is_encrypted_once_however_often_the_row_is_written(tmp_path: Path) -> None:
    world = await open_world(tmp_path)
    box = CountingBox(load_or_create_key(tmp_path / "credentials.key"))
    world.persistence.box = box
    try:
        instance, _ = await world.service.enroll(enrol_request())
        for _ in range(3):
            await world.service.set_state(instance.selector, "inactive", None)
            await world.settle()
            await world.service.set_state(instance.selector, "active", None)
            await world.settle()
        assert box.encryptions == 1
        await world.service.enroll(enrol_request(selector=instance.selector, password="changed"), by_owner=True)
        assert box.encryptions == 2
        record = await sqlite_stores(world.db).instances.get(instance.selector)
        assert record is not None and record.password_blob is not None
        assert box.decrypt(record.password_blob, context=instance.selector) == "changed"
        assert record.state == "active" and record.reg_status == "idle"  # the latest state
    finally:
        await world.close()


async def test_two_changes_at_once_each_store_their_own_row(world: World) -> None:
    """One app call's commit must not drop the row another call staged meanwhile."""
    instance, _ = await world.service.enroll(enrol_request())
    first = replace(world.persistence.record(instance), app_contact="sip:first@192.0.2.1")
    second = replace(world.persistence.record(instance), app_contact="sip:second@192.0.2.2")
    world.persistence._staged[instance.selector] = first
    world.persistence._staged[instance.selector] = second  # the second call staged over the first
    world.persistence.unstage(instance.selector, first)  # the first call's commit ends
    assert world.persistence.snapshot(instance.selector) == second
    world.persistence.unstage(instance.selector, second)
    assert world.persistence.snapshot(instance.selector) != second  # the live row again


async def test_a_delete_whose_removal_fails_keeps_the_instance_stored(tmp_path: Path) -> None:
    world = await open_world(tmp_path)
    instance, _ = await world.service.enroll(enrol_request())
    await world.settle()

    async def broken_retire(*_: object, **__: object) -> None:
        raise RuntimeError("registrar gone mad")

    world.service.lifecycle.retire = broken_retire  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await world.service.delete(instance.selector)
    await world.writer.flush()
    await world.close()
    again = await open_world(tmp_path)
    try:
        assert again.service.get(instance.selector) is not None  # not lost on restart
    finally:
        await again.close()
