"""The stores on both backends (SQLite and PostgreSQL): round trips, queries and orderings."""

from __future__ import annotations

from dataclasses import replace

import pytest

from contract.documents import PushRecord
from contract.events import Event, InstanceStateChanged, UnknownPayload
from contract.kinds import AppState
from storage.database import Database
from storage.pg_repositories import PgAuditLog, PgEventLog, PgInstanceStore, PgPushStore
from storage.postgres import PgDatabase
from storage.repositories import (
    AuditLog,
    EventLog,
    InstanceStore,
    PushStore,
    SqliteAuditLog,
    SqliteEventLog,
    SqliteInstanceStore,
    SqlitePushStore,
    Stores,
    sqlite_stores,
)

from .conftest import Backend
from .factories import make_audit, make_event, make_instance, make_push


def test_sqlite_stores_satisfy_the_protocols(db: Database) -> None:
    stores = sqlite_stores(db)
    # Assignments type-check the structural match under mypy.
    instances: InstanceStore = SqliteInstanceStore(db)
    events: EventLog = SqliteEventLog(db)
    audit: AuditLog = SqliteAuditLog(db)
    pushes: PushStore = SqlitePushStore(db)
    assert all(s is not None for s in (stores, instances, events, audit, pushes))


async def test_pg_stores_satisfy_the_protocols(pg_url: str) -> None:
    db = await PgDatabase.open(pg_url)
    try:
        instances: InstanceStore = PgInstanceStore(db)
        events: EventLog = PgEventLog(db, "node-a")
        audit: AuditLog = PgAuditLog(db)
        pushes: PushStore = PgPushStore(db)
        assert all(s is not None for s in (instances, events, audit, pushes))
    finally:
        await db.close()


async def test_instance_round_trip_with_every_field_set(stores: Stores) -> None:
    store = stores.instances
    record = make_instance(
        "sel-1",
        auth_username="auth-alice",
        push_voip_token="voip-token",
        app_contact="<sip:alice@10.0.0.2:5062;transport=tls>",
        unregistered_since=1_800_000_100.0,
        push_unreachable=True,
        disabled=True,
        last_code=None,
        last_reason=None,
    )
    await store.upsert(record)
    loaded = await store.get("sel-1")
    assert loaded == record
    assert loaded is not None and loaded.disabled is True and isinstance(loaded.password_blob, bytes)


async def test_instance_wiped_password_and_nulls(stores: Stores) -> None:
    store = stores.instances
    record = make_instance(password_blob=None, registrar=None, display_name=None, expires_at=None)
    await store.upsert(record)
    assert await store.get("sel-1") == record


async def test_instance_upsert_replaces_and_persists(backend: Backend) -> None:
    store = (await backend.open()).instances
    await store.upsert(make_instance("a"))
    await store.upsert(make_instance("a", state="active", failure_count=3))
    await backend.close()

    assert await (await backend.open()).instances.load_all() == [make_instance("a", state="active", failure_count=3)]


async def test_instance_queries(stores: Stores) -> None:
    store = stores.instances
    await store.upsert_many(
        [
            make_instance("c", state="proxied"),
            make_instance("a", state="active"),
            make_instance("b", state="proxied"),
        ]
    )
    assert [r.selector for r in await store.load_all()] == ["a", "b", "c"]
    assert await store.count_by_state() == {"proxied": 2, "active": 1}
    found = await store.get_by_token_hash("hash-b")
    assert found is not None and found.selector == "b"
    assert await store.get_by_token_hash("nope") is None
    assert await store.get("zzz") is None

    assert await store.delete("a") is True
    assert await store.delete("a") is False
    await store.delete_many(["b", "missing"])
    assert [r.selector for r in await store.load_all()] == ["c"]


def test_instance_repr_hides_secrets() -> None:
    text = repr(make_instance(push_voip_token="voip-secret"))
    for secret in ("push-token-sel-1", "voip-secret", "hash-sel-1", "password_blob"):
        assert secret not in text
    assert "sel-1" in text


async def test_events_append_recent_and_paging(stores: Stores) -> None:
    log = stores.events
    assert await log.last_seq() == 0
    await log.append_many([make_event(i, selector="a" if i % 2 else "b") for i in range(1, 11)])
    await log.append(make_event(11, selector=None, kind="system.started"))
    assert await log.last_seq() == 11

    assert [e.seq for e in await log.recent(3)] == [9, 10, 11]
    assert [e.seq for e in await log.recent(2, selector="a")] == [7, 9]
    assert [e.seq for e in await log.recent(3, since_seq=4)] == [5, 6, 7]
    assert [e.seq for e in await log.recent(10, selector="b", since_seq=6)] == [8, 10]
    assert await log.recent(0) == []
    event = (await log.recent(1, selector="a"))[0]
    assert event == make_event(9, selector="a")


async def test_events_keep_their_typed_payloads(stores: Stores) -> None:
    log = stores.events
    state = Event(1, 1_800_000_001.0, "sel-1", InstanceStateChanged(AppState.PROXIED, AppState.INACTIVE))
    push = Event(2, 1_800_000_002.0, "sel-1", make_push("p1"))
    await log.append_many([state, push])
    assert await log.recent(10) == [state, push]


async def test_events_written_by_another_version_still_load(db: Database) -> None:
    async with db.transaction():
        await db.execute(
            "INSERT INTO events (seq, at, kind, selector, data) VALUES (?, ?, ?, ?, ?)",
            (1, 1_800_000_001.0, "instance.state", "sel-1",
             '{"state":"proxied","previous":"inactive","reason":null,"added_later":1}'))
        await db.execute(
            "INSERT INTO events (seq, at, kind, selector, data) VALUES (?, ?, ?, ?, ?)",
            (2, 1_800_000_002.0, "registration", "sel-1", '{"code":"not a number"}'))
    state, odd = await SqliteEventLog(db).recent(10)
    assert state.payload == InstanceStateChanged(AppState.PROXIED, AppState.INACTIVE)
    assert odd.payload == UnknownPayload("registration", {"code": "not a number"})


async def test_events_are_append_only(stores: Stores) -> None:
    log = stores.events
    await log.append(make_event(1, kind="first"))
    await log.append(make_event(1, kind="second"))
    assert [e.kind for e in await log.recent(10)] == ["first"]


async def test_events_prune_keeps_newest(stores: Stores) -> None:
    log = stores.events
    await log.append_many([make_event(i) for i in range(1, 21)])
    assert await log.prune(keep=50) == 0
    assert await log.prune(keep=5) == 15
    assert [e.seq for e in await log.recent(100)] == [16, 17, 18, 19, 20]
    assert await log.prune(keep=0) == 5
    assert await log.recent(100) == []
    with pytest.raises(ValueError):
        await log.prune(keep=-1)


async def test_audit_append_and_recent(stores: Stores) -> None:
    log = stores.audit
    await log.append_many([make_audit(i, operator="alice" if i < 4 else "bob") for i in range(1, 7)])
    await log.append(make_audit(7, operator="alice"))
    await log.append(replace(make_audit(7), outcome="tampered"))  # immutable: ignored
    assert [a.id for a in await log.recent(3)] == ["audit-5", "audit-6", "audit-7"]
    assert [a.id for a in await log.recent(10, operator="alice")] == ["audit-1", "audit-2", "audit-3", "audit-7"]
    latest = (await log.recent(1))[0]
    assert latest == make_audit(7, operator="alice")


async def test_push_round_trip_upsert_and_queries(stores: Stores) -> None:
    store = stores.pushes
    first = make_push("p1", call_id="c1")
    await store.upsert(first)
    await store.upsert_many([make_push("p2", selector="other", call_id=None), make_push("p3", call_id="c1")])
    accepted = replace(
        first,
        outcome="accepted",
        provider_code=200,
        stages={"created": 1_800_000_000.0, "sent": 1_800_000_000.1, "accepted": 1_800_000_000.3},
        latency_ms=300.5,
    )
    await store.upsert(accepted)  # a later stage of p1 keeps p1's place in the order

    assert await store.get("p1") == accepted
    assert await store.get("missing") is None
    assert [p.push_id for p in await store.recent(10)] == ["p1", "p2", "p3"]
    assert [p.push_id for p in await store.recent(1)] == ["p3"]
    assert [p.push_id for p in await store.recent(10, selector="sel-1")] == ["p1", "p3"]
    assert [p.push_id for p in await store.for_call("c1")] == ["p1", "p3"]

    replay = make_push("p4", call_id="c1", kind="test", attempt=2, replay_of="p1", error="BadDeviceToken")
    await store.upsert(replay)
    assert (await store.for_call("c1"))[-1] == replay


async def test_push_keeps_the_provider_reason_in_its_error_column(stores: Stores) -> None:
    store = stores.pushes
    await store.upsert_many([make_push("p1", provider_reason="Unregistered"),
                             make_push("p2", provider_reason="Unregistered", error="not sent")])
    loaded = await store.recent(10)
    assert [(p.error, p.provider_reason) for p in loaded] == [("Unregistered", None), ("not sent", None)]
    assert all(isinstance(p, PushRecord) for p in loaded)


async def test_negative_limit_is_rejected(stores: Stores) -> None:
    with pytest.raises(ValueError):
        await stores.events.recent(-1)
