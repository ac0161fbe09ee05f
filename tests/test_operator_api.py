"""The operator API (docs/operator-api.md) on a small in-process core world (fake clock, scripted
registrar and push provider — the world of ``test_calls``), through ``httpx.ASGITransport`` and the
console's :class:`OperatorClient`; the event stream, reconnects and the listeners over a real unix
socket and a loopback TCP port with :class:`OperatorServer`; and the core's own wiring."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sipis.operator_api as operator_api
import sipis.operator_api.index as operator_index
import sipis.operator_api.pages as operator_pages
from console.client import Forbidden as ClientForbidden
from console.client import OperatorClient, Unauthorized
from contract.codec import encode_event, payload_data
from contract.documents import AuditEntry, PushRecord
from contract.events import (
    Alarm,
    CoreStarted,
    InstanceDeleted,
    InstanceEnrolled,
    InstanceStateChanged,
    InstanceUpdated,
    RegistrationResult,
    RegistrationStatusChanged,
)
from contract.kinds import AlarmKind
from sipis.api.models import EnrollIn
from sipis.config import OperatorToken, parse_config
from sipis.core import Core
from sipis.events import EventBus
from sipis.instance import Account, AppState, Instance, PushTarget, RegStatus
from sipis.operations import Operator
from sipis.operator_api import (
    DYNAMIC_SORTS,
    EventRing,
    InstanceIndex,
    OperatorContext,
    OperatorServer,
    OperatorSessions,
    create_operator_app,
    listener_app,
)
from sipis.proxy_register import contact_user
from sipis.sip.message import Headers, Request, make_response, new_branch
from sipis.sip.register import Outcome, RegisterResult
from sipis.sip.transport import Flow
from sipis.trace import TraceRecorder
from tests.test_calls import World, make_world
from tests.test_calls import invite as held_invite

TOKENS = (OperatorToken("vera", "viewer", "tok-viewer-0123456789"),
          OperatorToken("otto", "operator", "tok-operator-0123456789"),
          OperatorToken("ada", "admin", "tok-admin-0123456789"))
VIEWER, OPERATOR, ADMIN = (t.token for t in TOKENS)
ACTIONS = ("take-over", "hand-back", "re-register", "test-push", "disable")


@dataclass
class Op:
    world: World
    ctx: OperatorContext
    app: Any

    def client(self, token: str | None = None, *, listener: str = "tcp", name: str | None = None) -> OperatorClient:
        return OperatorClient(transport=httpx.ASGITransport(app=listener_app(self.app, listener)), token=token,
                              operator_name=name)

    def http(self, token: str | None = None, *, listener: str = "tcp") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=listener_app(self.app, listener)),
                                 base_url="http://op", headers=headers)

    def audit(self) -> list[dict[str, Any]]:
        return [payload_data(e.payload) for e in self.world.events_of("audit")]

    async def enrol(self, user: str, *, sleeping: bool = False) -> Instance:
        instance, _ = await self.world.service.enroll(EnrollIn.model_validate({
            "account": {"aor": f"sip:{user}@pbx.example.com", "username": user, "password": "pw"},
            "push": {"provider": "mediator", "app_id": "com.example", "token": f"token-{user}"}}))
        if sleeping:
            await self.world.service.set_state(instance.selector, "inactive", None)
            for _ in range(10):  # the pacing bucket refills with (fake) time
                await self.world.settle(0.01)
                if instance.state is AppState.PROXIED:
                    break
            assert instance.state is AppState.PROXIED
        return instance


def make_op(**ctx_args: Any) -> Op:
    world = make_world()
    world.engine.start()

    def selector_of_user(user: str) -> str | None:
        instance = world.service.by_contact_user(user)
        return instance.selector if instance is not None else None

    trace = TraceRecorder(world.clock, selector_of_user=selector_of_user)
    ctx = OperatorContext(service=world.service, calls=world.calls, delivery=world.delivery,
                          operations=world.operations, bus=world.bus, clock=world.clock, trace=trace,
                          tokens=TOKENS, started_at=world.clock.wall(),
                          **{"heartbeat": 0.05, "node": "test-node", **ctx_args})
    return Op(world, ctx, create_operator_app(ctx))


@pytest.fixture
async def op() -> AsyncIterator[Op]:
    made = make_op()
    yield made
    made.ctx.close()
    await made.world.engine.stop(unregister=False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="op-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def flow() -> Flow:
    return Flow("udp", ("127.0.0.1", 5070), ("127.0.0.1", 5060), False, lambda d: None, lambda: None)  # type: ignore[arg-type]


def sip_register(instance: Instance, authorization: str | None = None) -> Request:
    headers = Headers([("Via", f"SIP/2.0/UDP 127.0.0.1:5070;branch={new_branch()}"),
                       ("From", "<sip:alice@pbx.example.com>;tag=1"), ("To", "<sip:alice@pbx.example.com>"),
                       ("Call-ID", f"reg-{instance.selector}"), ("CSeq", "1 REGISTER"),
                       ("Contact", f"<sip:{contact_user(instance)}@127.0.0.1:5070>;expires=600")])
    if authorization:
        headers.add("Authorization", authorization)
    return Request("REGISTER", "sip:pbx.example.com", headers)


# =========================================================================== authentication


async def test_tokens_sessions_and_the_local_administrator(op: Op) -> None:
    async with op.http() as tcp:
        response = await tcp.get("/v1/whoami")
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert "Bearer" in response.headers["WWW-Authenticate"]
        assert (await tcp.get("/v1/whoami", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await tcp.get("/v1/whoami", headers={"Authorization": "Basic abc"})).status_code == 401
        assert (await tcp.get("/v1/summary")).status_code == 401
    async with op.client(VIEWER) as viewer, op.client(ADMIN) as admin:
        assert await viewer.whoami() == {"name": "vera", "role": "viewer"}
        assert await admin.whoami() == {"name": "ada", "role": "admin"}
    async with op.client(listener="unix", name="noc-bob") as local, op.client(listener="unix") as anonymous:
        assert await local.whoami() == {"name": "noc-bob", "role": "admin"}
        assert await anonymous.whoami() == {"name": "local", "role": "admin"}
    async with op.http(listener="unix") as raw:
        weird = await raw.get("/v1/whoami", headers={"X-Operator": "bad name\x7f"})
        assert weird.json() == {"name": "local", "role": "admin"}

    token = op.ctx.sessions.mint("sam", "operator")
    async with op.client(token, listener="unix") as session, op.client(token) as over_tcp, \
            op.client("not-a-session", listener="unix") as wrong:
        assert await session.whoami() == {"name": "sam", "role": "operator"}
        with pytest.raises(Unauthorized):
            await over_tcp.whoami()  # session tokens are for the unix socket only
        with pytest.raises(Unauthorized):
            await wrong.whoami()  # a wrong token is never the local administrator
        assert op.ctx.sessions.revoke(token) and not op.ctx.sessions.revoke(token)
        with pytest.raises(Unauthorized):
            await session.whoami()


def test_sessions_mint_unique_tokens_and_revoke_by_name() -> None:
    sessions = OperatorSessions()
    tokens = {sessions.mint("sam", "viewer") for _ in range(3)} | {sessions.mint("kim", "admin")}
    assert len(tokens) == 4 and len(sessions) == 4
    assert sessions.revoke_all("sam") == 3 and len(sessions) == 1
    with pytest.raises(ValueError):
        sessions.mint("x", "root")


# =========================================================================== roles and audit


async def test_viewer_is_refused_every_action_and_each_refusal_is_audited(op: Op) -> None:
    instance = await op.enrol("alice", sleeping=True)
    push = await op.world.operations.test_push(instance.selector, Operator("ada", "admin"))
    async with op.http(VIEWER) as viewer:
        for action in ACTIONS:
            response = await viewer.post(f"/v1/instances/{instance.selector}/actions/{action}")
            assert response.status_code == 403, action
            assert response.json()["error"] == "forbidden" and "viewer" in response.json()["detail"]
        response = await viewer.post(f"/v1/pushes/{push.push_id}/replay")
        assert response.status_code == 403
    refused = [a for a in op.audit() if a["outcome"] == "refused"]
    assert [a["action"] for a in refused] == ["take_over", "hand_back", "re_register", "test_push", "disable",
                                              "replay_push"]
    assert all(a["operator"] == "vera" and a["role"] == "viewer" for a in refused)
    assert refused[0]["target"] == instance.selector and refused[-1]["target"] == push.push_id
    assert instance.state is AppState.PROXIED and len(op.world.provider.sent) == 1  # nothing happened
    async with op.client(VIEWER) as viewer:
        rows = await viewer.audit()
        assert [r["outcome"] for r in rows].count("refused") == 6
        assert rows[-1]["operator"] == "vera" and rows[-1]["action"] == "replay_push"
        with pytest.raises(ClientForbidden) as refused_error:
            await viewer.take_over(instance.selector)
        assert refused_error.value.status == 403 and refused_error.value.code == "forbidden"


async def test_alarms_are_listed_and_acknowledged_by_an_operator_with_an_audit_row(op: Op) -> None:
    board = op.world.operations.alarms
    board.storage("disk full")
    board.storage(None)
    board.raise_alarm(AlarmKind.PBX_DOWN, "udp:127.0.0.1:5060", "408 Request Timeout")
    async with op.client(VIEWER) as viewer, op.client(OPERATOR) as otto:
        listed = await viewer.alarms()
        assert [(a["alarm"], a["state"], a["target"]) for a in listed["active"]] == [
            ("pbx-down", "raised", "udp:127.0.0.1:5060")]
        assert [(a["alarm"], a["state"]) for a in listed["history"]] == [("storage-failing", "cleared")]
        alarm_id = listed["active"][0]["id"]
        with pytest.raises(ClientForbidden):
            await viewer.acknowledge_alarm(alarm_id)
        seen = await otto.acknowledge_alarm(alarm_id)
        assert seen["acknowledged_by"] == "otto" and seen["id"] == alarm_id
        assert (await viewer.alarms())["active"][0]["acknowledged_by"] == "otto"
    async with op.http(OPERATOR) as otto_http:
        assert (await otto_http.post("/v1/alarms/nope/acknowledge")).status_code == 404
    rows = [(a["operator"], a["action"], a["target"], a["outcome"]) for a in op.audit()]
    assert rows == [("vera", "acknowledge_alarm", alarm_id, "refused"), ("otto", "acknowledge_alarm", alarm_id, "ok"),
                    ("otto", "acknowledge_alarm", "nope", "not-found")]


async def test_operator_may_act_and_only_admin_may_disable(op: Op) -> None:
    instance = await op.enrol("alice")
    selector = instance.selector
    registrar = op.world.registrar
    async with op.client(OPERATOR) as otto, op.client(ADMIN) as ada:
        result = await otto.take_over(selector)
        assert result["row"]["selector"] == selector and result["instance"]["selector"] == selector
        await op.world.settle()
        assert instance.state is AppState.PROXIED and registrar.calls == [600]

        before = len(registrar.calls)
        await otto.re_register(selector)
        await op.world.settle()
        assert len(registrar.calls) == before + 1 and registrar.calls[-1] == 600

        await otto.hand_back(selector)
        await op.world.settle()
        assert instance.state is AppState.ACTIVE and registrar.calls[-1] == 0  # type: ignore[comparison-overlap]

        with pytest.raises(Exception) as conflict:
            await otto.re_register(selector)  # the app registers itself: take over first
        assert getattr(conflict.value, "status", None) == 409

        push = (await otto.action(selector, "test-push"))["push"]
        assert push["kind"] == "test" and push["outcome"] == "accepted" and push["selector"] == selector
        replay = (await otto.replay_push(push["push_id"]))["push"]
        assert replay["replay_of"] == push["push_id"] and replay["push_id"] != push["push_id"]

        with pytest.raises(ClientForbidden):
            await otto.disable(selector)
        assert instance.state is AppState.ACTIVE and instance.account.password == "pw"
        disabled = await ada.disable(selector)
        assert disabled["row"]["state"] == "off" and disabled["instance"]["credentials_stored"] is False
        assert instance.disabled and instance.account.password is None

        with pytest.raises(Exception) as off:
            await otto.take_over(selector)
        assert getattr(off.value, "status", None) == 409
        async with op.http(OPERATOR) as raw:
            missing = await raw.post("/v1/instances/NOPE/actions/take-over")
            assert missing.status_code == 404 and missing.json()["error"] == "not_found"
            assert (await raw.post("/v1/pushes/nope/replay")).status_code == 404

    rows = [(a["operator"], a["role"], a["action"], a["target"], a["outcome"]) for a in op.audit()]
    assert rows == [
        ("otto", "operator", "take_over", selector, "ok"),
        ("otto", "operator", "re_register", selector, "ok"),
        ("otto", "operator", "hand_back", selector, "ok"),
        ("otto", "operator", "re_register", selector, "conflict"),
        ("otto", "operator", "test_push", selector, "accepted"),
        ("otto", "operator", "replay_push", push["push_id"], "accepted"),
        ("otto", "operator", "disable", selector, "refused"),
        ("ada", "admin", "disable", selector, "ok"),
        ("otto", "operator", "take_over", selector, "conflict"),
        ("otto", "operator", "take_over", "NOPE", "not-found"),
        ("otto", "operator", "replay_push", "nope", "not-found"),
    ]
    # audit rows about an instance are on its timeline
    timeline = [e for e in op.world.events if e.kind == "audit" and e.selector == selector]
    assert len(timeline) == 6


# =========================================================================== reads


async def test_instance_list_filters_sorts_pages_and_counts(op: Op) -> None:
    users = ["carol", "alice", "bob", "dave", "erin", "frank", "alina"]
    made = {user: await op.enrol(user, sleeping=user in ("bob", "erin", "alina")) for user in users}
    made["frank"].state = AppState.OFF
    made["dave"].account.registrar = "sip:edge.example.net;transport=tcp"
    async with op.client(VIEWER) as viewer:
        page = await viewer.instances()
        assert page["total"] == page["matched"] == 7
        assert page["counts"] == {"active": 3, "inactive": 0, "proxied": 3, "off": 1}
        assert [row["user"] for row in page["items"]] == sorted(users)
        row = page["items"][0]
        assert set(row) == {"selector", "aor", "user", "registrar", "state", "reg_status", "last_code",
                            "last_reason", "expires_at", "next_refresh_at", "failure_count", "backoff_until",
                            "push_provider", "push_unreachable", "last_push_outcome", "last_push_at",
                            "app_last_seen", "registrar_agent", "owner"}

        desc = await viewer.instances(desc=True, offset=1, limit=2)
        assert [r["user"] for r in desc["items"]] == ["erin", "dave"] and desc["matched"] == 7

        found = await viewer.instances(q="ALI")
        assert [r["user"] for r in found["items"]] == ["alice", "alina"]
        assert found["counts"] == {"active": 1, "inactive": 0, "proxied": 1, "off": 0}
        by_registrar = await viewer.instances(q="edge.EXAMPLE")
        assert [r["user"] for r in by_registrar["items"]] == ["dave"]
        by_selector = await viewer.instances(q=made["bob"].selector[:12].lower())
        assert [r["user"] for r in by_selector["items"]] == ["bob"]

        proxied = await viewer.instances(state="proxied", limit=0)
        assert [r["user"] for r in proxied["items"]] == ["alina", "bob", "erin"]
        assert proxied["matched"] == 3 and proxied["total"] == 7 and proxied["counts"]["active"] == 3

        by_state = await viewer.instances(sort="state")
        assert [r["user"] for r in by_state["items"]] == ["alice", "carol", "dave", "frank",
                                                          "alina", "bob", "erin"]  # ties in aor order
        by_expiry = await viewer.instances(sort="expires_at", desc=True)
        assert [r["expires_at"] is None for r in by_expiry["items"]] == [False] * 3 + [True] * 4

        await op.world.operations.test_push(made["carol"].selector, Operator("ada", "admin"))
        pushed = await viewer.instances(sort="last_push_at")
        assert pushed["items"][0]["user"] == "carol" and pushed["items"][0]["last_push_outcome"] == "accepted"

    async with op.http(VIEWER) as raw:
        bad = await raw.get("/v1/instances", params={"sort": "password"})
        assert bad.status_code == 422 and bad.json()["error"] == "validation_error" and "sort" in bad.json()["detail"]
        assert (await raw.get("/v1/instances", params={"state": "sleepy"})).status_code == 422
        assert (await raw.get("/v1/instances", params={"limit": -1})).status_code == 422


async def test_big_pages_are_streamed_in_slices_with_the_same_content(op: Op, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(12):
        await op.enrol(f"user{n:02d}")
    async with op.client(VIEWER) as viewer:
        whole = await viewer.instances(limit=0)
        monkeypatch.setattr(operator_pages, "STREAM_ROWS_OVER", 5)
        sliced = await viewer.instances(limit=0)
        assert sliced == whole and len(sliced["items"]) == 12


async def test_index_follows_enrolment_deletion_and_restore(op: Op) -> None:
    index = InstanceIndex(op.world.service, op.world.bus)
    alice = await op.enrol("alice")
    assert [i.selector for i in index.query()[3]] == [alice.selector]
    await op.world.service.delete(alice.selector)
    assert index.query()[0] == 0
    restored = Instance("R" * 40 + ":00000001", Account("sip:zed@pbx", "zed", "pw"), PushTarget("m", "a", "t"), "h")
    op.world.service.resume(restored)  # restore publishes nothing: noticed by count
    assert [i.selector for i in index.query()[3]] == [restored.selector]
    index.close()


async def test_sorting_100k_instances_stays_fast(op: Op) -> None:
    service = op.world.service
    states, statuses = list(AppState), list(RegStatus)
    for n in range(100_000):
        instance = Instance(f"{n * 7919 % 100_003:040X}:{n:08X}", Account(f"sip:u{n * 31 % 99_991}@pbx{n % 7}",
                                                                          f"u{n}", "pw"),
                            PushTarget("m", "a", "t"), "h")
        instance.state, instance.registration.status = states[n % 4], statuses[n % 6]
        instance.registration.expires_at = None if n % 3 == 0 else float(n * 13 % 1000)
        service.instances[instance.selector] = instance
    index = op.ctx.index
    index.query()  # builds the keys and the aor order once
    for query in ({}, {"sort": "expires_at", "desc": True}, {"sort": "reg_status"}, {"q": "pbx3"},
                  {"state": "proxied", "sort": "user"}):
        spent = min(_cpu(lambda q=query: index.query(**q)) for _ in range(3))  # type: ignore[misc]
        assert spent < 0.25, (query, spent)  # ~30–60 ms on a busy CI box; the target is well under 0.1 s
    total, matched, _, page = index.query(sort="expires_at", desc=True, limit=3)
    assert total == matched == 100_000 and [i.registration.expires_at for i in page] == [999.0] * 3


def _cpu(work: Any) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


async def test_instance_detail_has_timeline_pushes_and_sip_messages(op: Op) -> None:
    instance = await op.enrol("alice", sleeping=True)
    await op.world.operations.test_push(instance.selector, Operator("ada", "admin"))
    request = sip_register(instance, authorization='Digest username="alice", response="s3cr3t"')
    op.ctx.trace.observe("out", request, flow())
    op.ctx.trace.observe("in", make_response(request, 200, to_tag="t"), flow())
    async with op.client(VIEWER) as viewer:
        detail = await viewer.instance(instance.selector)
        assert detail["instance"]["selector"] == instance.selector and "password" not in json.dumps(detail)
        assert detail["instance"]["push"]["token"] != "token-alice"  # masked
        assert detail["row"]["state"] == "proxied"
        kinds = [e["kind"] for e in detail["timeline"]]
        assert kinds[0] == "instance.enrolled" and "registration" in kinds and "instance.state" in kinds
        assert [e["seq"] for e in detail["timeline"]] == sorted(e["seq"] for e in detail["timeline"])
        assert [p["kind"] for p in detail["pushes"]] == ["test"]
        assert [m["first_line"] for m in detail["sip"]] == ["REGISTER sip:pbx.example.com SIP/2.0",
                                                            "SIP/2.0 200 OK"]
        assert "s3cr3t" not in detail["sip"][0]["raw"] and "<masked>" in detail["sip"][0]["raw"]
        with pytest.raises(Exception) as missing:
            await viewer.instance("NOPE")
        assert getattr(missing.value, "status", None) == 404


async def test_calls_pushes_and_call_trace_exports(op: Op) -> None:
    instance = await op.enrol("alice", sleeping=True)
    w = op.world
    call = held_invite(instance, call_id="abc/def@pbx")
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle()
    trace = op.ctx.trace
    trace.observe("in", call.request, flow())
    trace.observe("out", make_response(call.request, 180, to_tag="t"), flow())
    async with op.client(VIEWER) as viewer:
        calls = await viewer.calls()
        assert [c["call_id"] for c in calls["held"]] == ["abc/def@pbx"] and calls["recent"] == []
        assert calls["held"][0]["stage"] == "Push-Notification-Sent"

        exported = await viewer.call_trace("abc/def@pbx")
        assert exported["selector"] == instance.selector
        assert [m["direction"] for m in exported["messages"]] == ["in", "out"]
        assert [p["kind"] for p in exported["pushes"]] == ["call"]

        text = await viewer.call_trace_text("abc/def@pbx")
        assert "SIP trace of Call-ID abc/def@pbx" in text and "call push via mediator" in text
        assert "180 Ringing (INVITE)" in text and "|<--" in text and "--->|" in text

        pcap = await viewer.call_trace_pcap("abc/def@pbx")
        assert struct.unpack("<I", pcap[:4])[0] == 0xA1B2C3D4 and struct.unpack("<I", pcap[20:24])[0] == 101
        first_length = struct.unpack("<I", pcap[24 + 8:24 + 12])[0]
        packet = pcap[40:40 + first_length]
        assert packet[0] == 0x45 and packet[9] == 17 and packet[28:].startswith(b"INVITE sip:sipis-")
        assert len(pcap) == 24 + 2 * 16 + sum(len(m.text().encode()) + 28 for m in trace.call_messages("abc/def@pbx"))

        await w.service.set_state(instance.selector, "active", None)
        await w.settle()
        calls = await viewer.calls()
        assert calls["held"] == [] and calls["recent"][0]["outcome"] == "released"

        other = await op.enrol("bob", sleeping=True)
        await w.operations.test_push(other.selector, Operator("ada", "admin"))
        pushes = await viewer.pushes()
        assert [p["kind"] for p in pushes] == ["call", "test"]  # newest last
        assert [p["selector"] for p in await viewer.pushes(selector=other.selector)] == [other.selector]
        assert len(await viewer.pushes(limit=1)) == 1

        empty = await viewer.call_trace("never-seen")
        assert empty["messages"] == [] and empty["pushes"] == []


async def test_summary_counts_calls_pushes_pbx_and_alarms(op: Op) -> None:
    first = await op.enrol("alice", sleeping=True)
    await op.enrol("bob")
    w = op.world
    w.calls.on_invite(held_invite(first, call_id="c1"))  # type: ignore[arg-type]
    await w.settle()
    async with op.client(VIEWER) as viewer:
        summary = await viewer.summary()
        assert summary["node"] == "test-node" and summary["version"] and summary["now"] == w.clock.wall()
        assert summary["counts"] == {"active": 1, "inactive": 0, "proxied": 1, "off": 0}
        assert summary["reg_status"]["registered"] == 1 and summary["reg_status"]["idle"] == 1
        assert summary["held_calls"] == 1 and summary["calls_per_min"] == 1
        assert summary["push"]["accepted"] == 1 and summary["push"]["success_rate"] == 1.0
        nothing = {"reachable": True, "last_error": None, "up": 0, "degraded": 0, "down": 0, "unknown": 0}
        assert summary["pbx"] == nothing  # nothing known yet: no target counts as up
        assert summary["writer"] == {"pending": 0, "last_error": None} and summary["alarms"] == 0

        target = "udp:127.0.0.1:5060"
        op.ctx.targets.pbx_result(target, RegisterResult(Outcome.FAILED, 408, "Request Timeout", detail="no answer"))
        w.bus.publish(first.selector, Alarm(AlarmKind.UNAUTHORIZED))
        summary = await viewer.summary()
        assert summary["pbx"] == {**nothing, "reachable": False, "last_error": "408 Request Timeout: no answer",
                                  "down": 1}
        assert summary["alarms"] == 2  # pbx-down and unauthorized
        first.registration.target = target
        targets = (await viewer.health_targets())["targets"]
        assert [(t["subject"], t["target"], t["state"], t["last_error"], t["instances"]) for t in targets] == [
            ("pbx", target, "down", "408 Request Timeout: no answer", 1), ("provider", "mediator", "up", None, 2)]
        op.ctx.targets.pbx_result(target, RegisterResult(Outcome.REGISTERED, 200, "OK", 600))
        assert (await viewer.summary())["pbx"]["reachable"] is True


# =========================================================================== real listeners


async def test_event_stream_over_the_unix_socket(short_dir: Path) -> None:
    op = make_op(ring_size=50)
    socket_path = short_dir / "op.sock"
    server = OperatorServer(op.ctx, socket_path=socket_path, app=op.app)
    await server.start()
    try:
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
        async with OperatorClient(socket_path=socket_path, operator_name="tester") as client:
            assert await client.whoami() == {"name": "tester", "role": "admin"}
            stream = client.events(heartbeats=True)
            first = await asyncio.wait_for(anext(stream), 5)
            assert first["kind"] == "heartbeat"
            instance = await op.enrol("alice")
            await op.world.service.set_state(instance.selector, "inactive", None)
            seen: list[dict[str, Any]] = []
            while not any(e["kind"] == "instance.state" for e in seen):
                seen.append(dict(await asyncio.wait_for(anext(stream), 5)))
            state = next(e for e in seen if e["kind"] == "instance.state")
            assert state["selector"] == instance.selector and state["data"]["state"] == "inactive"
            assert set(state) == {"seq", "at", "kind", "selector", "data"}
            heartbeat = await asyncio.wait_for(_next_of(stream, "heartbeat"), 5)  # idle: heartbeats
            assert heartbeat["seq"] >= state["seq"]
            await stream.aclose()

            since = state["seq"] - 2
            replay = client.events(since=since)
            replayed = [await asyncio.wait_for(anext(replay), 5) for _ in range(2)]
            assert [e["seq"] for e in replayed] == [since + 1, since + 2]
            await replay.aclose()

            for n in range(60):  # push the early events out of the 50-event ring
                op.world.bus.publish(None, CoreStarted(n, "noise"))
            gapped = client.events(since=1)
            gap = await asyncio.wait_for(anext(gapped), 5)
            assert gap["kind"] == "gap" and gap["since"] == 1 and (gap["first_available"] or 0) > 2
            assert (await asyncio.wait_for(anext(gapped), 5))["seq"] == gap["first_available"]
            await gapped.aclose()
        await asyncio.sleep(0.05)
        assert op.ctx.streams == set()  # closed streams unsubscribed from the bus
    finally:
        await server.stop()
        op.ctx.close()
        await op.world.engine.stop(unregister=False)
    assert not socket_path.exists()


async def test_event_stream_resumes_with_since_after_the_core_comes_back(short_dir: Path) -> None:
    op = make_op()
    socket_path = short_dir / "op.sock"
    server = OperatorServer(op.ctx, socket_path=socket_path, app=op.app)
    await server.start()
    client = OperatorClient(socket_path=socket_path)
    stream = client.events(since=op.ctx.ring.last_seq, backoff_initial=0.02, backoff_max=0.05)
    try:
        op.world.bus.publish(None, CoreStarted(1, "one"))
        assert (await asyncio.wait_for(anext(stream), 5))["data"]["node"] == "one"
        await server.stop()  # ends the stream; the client retries with backoff
        assert not socket_path.exists()
        op.world.bus.publish(None, CoreStarted(2, "two"))
        op.world.bus.publish(None, CoreStarted(3, "three"))
        server = OperatorServer(op.ctx, socket_path=socket_path, app=op.app)
        await server.start()
        got = [await asyncio.wait_for(anext(stream), 5) for _ in range(2)]
        assert [e["data"]["node"] for e in got] == ["two", "three"]  # replayed with since=
    finally:
        await stream.aclose()
        await client.aclose()
        await server.stop()
        op.ctx.close()
        await op.world.engine.stop(unregister=False)


async def test_stopping_the_server_ends_open_streams_at_once(short_dir: Path) -> None:
    op = make_op(heartbeat=30.0)
    server = OperatorServer(op.ctx, socket_path=short_dir / "op.sock", app=op.app)
    await server.start()
    client = OperatorClient(socket_path=short_dir / "op.sock")
    stream = client.events(heartbeats=True, reconnect=False)
    try:
        await asyncio.wait_for(anext(stream), 5)
        started = time.monotonic()
        await asyncio.wait_for(server.stop(), 5)
        assert time.monotonic() - started < 2.0
    finally:
        await stream.aclose()
        await client.aclose()
        op.ctx.close()
        await op.world.engine.stop(unregister=False)


async def test_tcp_listener_needs_a_configured_token(short_dir: Path) -> None:
    op = make_op()
    server = OperatorServer(op.ctx, socket_path=short_dir / "op.sock", tcp_host="127.0.0.1", tcp_port=0,
                            app=op.app)
    await server.start()
    try:
        assert server.tcp_url is not None and server.tcp_port != 0
        async with httpx.AsyncClient(base_url=server.tcp_url) as raw:
            assert (await raw.get("/v1/whoami")).status_code == 401
            assert (await raw.get("/v1/whoami", headers={"X-Operator": "root"})).status_code == 401
            wrong = await raw.get("/v1/instances", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
            session = op.ctx.sessions.mint("sam", "admin")
            assert (await raw.get("/v1/whoami", headers={"Authorization": f"Bearer {session}"})).status_code == 401
        async with OperatorClient(url=server.tcp_url, token=OPERATOR) as client:
            assert await client.whoami() == {"name": "otto", "role": "operator"}
    finally:
        await server.stop()
        op.ctx.close()
        await op.world.engine.stop(unregister=False)


async def test_a_live_socket_is_not_taken_over_and_a_stale_one_is_replaced(short_dir: Path) -> None:
    op = make_op()
    path = short_dir / "op.sock"
    first = OperatorServer(op.ctx, socket_path=path, app=op.app)
    await first.start()
    try:
        with pytest.raises(OSError, match="in use"):
            await OperatorServer(op.ctx, socket_path=path, app=op.app).start()
    finally:
        await first.stop()
    import socket as socket_module
    stale = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as after a crash
    second = OperatorServer(op.ctx, socket_path=path, app=op.app)
    await second.start()
    try:
        async with OperatorClient(socket_path=path) as client:
            assert (await client.whoami())["role"] == "admin"
    finally:
        await second.stop()
        op.ctx.close()
        await op.world.engine.stop(unregister=False)


async def test_the_core_serves_the_operator_api_and_records_sip(short_dir: Path) -> None:
    config = parse_config({
        "state_dir": str(short_dir / "state"),
        "sip": {"listen": ["udp:127.0.0.1:0"]},
        "api": {"listen": ""},
        "operator": {"socket": str(short_dir / "op.sock"), "tcp_listen": "127.0.0.1:0",
                     "tokens": [{"name": "ada", "role": "admin", "token": ADMIN}]},
    }, short_dir)
    core = Core(config)
    listening = await core.start()
    try:
        assert listening.operator_socket == str(short_dir / "op.sock") and listening.operator_url
        assert core.endpoint is not None and core.trace.observe in core.endpoint.observers
        async with OperatorClient(socket_path=short_dir / "op.sock", operator_name="root") as local:
            assert await local.whoami() == {"name": "root", "role": "admin"}
            summary = await local.summary()
            assert summary["counts"] == {"active": 0, "inactive": 0, "proxied": 0, "off": 0}
            assert summary["started_at"] == core.started_at
        async with OperatorClient(url=listening.operator_url) as anonymous:
            with pytest.raises(Unauthorized):
                await anonymous.whoami()
        token = core.operator_sessions.mint("sam", "viewer")
        async with OperatorClient(socket_path=short_dir / "op.sock", token=token) as session:
            assert await session.whoami() == {"name": "sam", "role": "viewer"}
    finally:
        await core.stop()
    assert not (short_dir / "op.sock").exists()


async def _next_of(stream: AsyncIterator[Any], kind: str) -> dict[str, Any]:
    async for event in stream:
        if event["kind"] == kind:
            return dict(event)
    raise AssertionError(f"stream ended before a {kind}")


async def test_tcp_is_plain_on_loopback_and_tls_elsewhere(short_dir: Path) -> None:
    def config(listen: str) -> Any:
        return parse_config({"state_dir": str(short_dir / "state"), "sip": {"listen": ["udp:127.0.0.1:0"]},
                             "api": {"listen": ""},
                             "operator": {"socket": str(short_dir / "op.sock"), "tcp_listen": listen,
                                          "tokens": [{"name": "ada", "role": "admin", "token": ADMIN}]}}, short_dir)

    op = make_op()
    try:
        loopback = OperatorServer.from_config(op.ctx, config("127.0.0.1:0"))
        assert loopback.tls_files is None and loopback.socket_path == short_dir / "op.sock"
        assert loopback.tcp_url is not None and loopback.tcp_url.startswith("http://127.0.0.1:")
        anywhere = OperatorServer.from_config(op.ctx, config("0.0.0.0:0"))
        assert anywhere.tls_files is not None and all(path.exists() for path in anywhere.tls_files)
        assert anywhere.tcp_url is not None and anywhere.tcp_url.startswith("https://")
        assert operator_api.is_loopback("::1") and operator_api.is_loopback("localhost")
        assert not operator_api.is_loopback("192.0.2.1") and not operator_api.is_loopback("example.com")
    finally:
        op.ctx.close()
        await op.world.engine.stop(unregister=False)


def test_event_ring_keeps_events_out_of_the_garbage_collectors_way() -> None:
    bus = EventBus()
    ring = EventRing(bus, size=5, audit_size=2)
    push = PushRecord("p1", "sel-1", "call", "m", stages={"push_sent": 1.5}, request_summary={"body": {"Id": "p1"}})
    bus.publish("sel-1", push)
    bus.publish(None, AuditEntry("a1", 1.0, "anna", "admin", "disable", None, "ok", {"k": [1, 2]}))
    bus.publish("sel-1", Alarm(AlarmKind.PUSH_REJECTED))
    bus.publish("sel-2", InstanceStateChanged(AppState.PROXIED, AppState.INACTIVE))
    gc.collect()
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in ring.entries if isinstance(entry[4], bytes))
    events = ring.events
    assert [e.seq for e in events] == [1, 2, 3, 4] and ring.first_seq == 1 and ring.last_seq == 4
    assert events[0].payload == push and events[0].payload is not push
    assert events[3].payload == InstanceStateChanged(AppState.PROXIED, AppState.INACTIVE)
    assert isinstance(events[3].payload, InstanceStateChanged) and events[3].payload.state is AppState.PROXIED
    assert [payload_data(e.payload)["id"] for e in ring.audit] == ["a1"] and ring.alarms_since(0.0) == 1
    assert [e.seq for e in ring.for_selector("sel-1", 10)] == [1, 3]
    newer, gap = ring.since(2)
    assert [e.seq for e in newer] == [3, 4] and not gap
    for n in range(3):
        bus.publish(None, CoreStarted(n, "tick"))
    newer, gap = ring.since(1)
    assert [e.seq for e in newer] == [3, 4, 5, 6, 7] and gap  # event 2 already left the ring
    assert encode_event(ring.events[0])["data"] == {"alarm": "push-rejected"}
    ring.close()


# =========================================================================== the incremental index


class _Service:
    """Just what :class:`InstanceIndex` reads of the service."""

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}


_AORS = ("sip:alice@pbx", "sip:Alice@pbx", "sip:bob@pbx", "sip:carol@edge", "sip:dave@pbx")
_REGISTRARS = (None, "sip:edge;transport=tcp", "sip:PBX")
_CONTINUOUS = {"expires_at", "next_refresh_at", "backoff_until", "app_last_seen", "last_push_at"}


def _brute_rows(index: InstanceIndex, service: _Service, *, q: str, state: str, sort: str,
                desc: bool) -> tuple[dict[str, int], list[tuple[str, Any]]]:
    """The instance list recomputed from scratch: (counts among the q matches, [(selector, sort value)])."""
    needle = q.lower()

    def hay(i: Instance) -> str:
        return "\0".join((i.selector.lower(), i.account.aor.lower(), i.account.username.lower(),
                          (i.account.registrar or index.default_registrar or "").lower()))

    found = [i for i in service.instances.values() if needle in hay(i)]
    counts = {s.value: sum(1 for i in found if i.state is s) for s in AppState}
    if state:
        found = [i for i in found if i.state.value == state]
    aor_key = {i.selector: (i.account.aor.lower(), i.selector) for i in found}
    found.sort(key=lambda i: aor_key[i.selector])

    def value(i: Instance) -> Any:
        row = index.row(i)
        if sort in ("aor", "user", "registrar", "selector"):
            return {"aor": i.account.aor.lower(), "user": i.account.username.lower(), "selector": i.selector,
                    "registrar": (row["registrar"] or "").lower()}[sort]
        return row[sort]

    if sort in ("aor", "user", "registrar", "selector"):
        found.sort(key=value)  # stable: ties in aor order
        if desc:
            found.reverse()
    else:
        present = [i for i in found if value(i) is not None]
        present.sort(key=value, reverse=desc)  # stable: ties in aor order
        found = present + [i for i in found if value(i) is None]
    return counts, [(i.selector, value(i)) for i in found]


def _check(index: InstanceIndex, service: _Service) -> None:
    index.sync()
    live = list(service.instances.values())
    assert index.state_counts == {s.value: sum(1 for i in live if i.state is s) for s in AppState}
    assert index.status_counts == {s.value: sum(1 for i in live if i.registration.status is s) for s in RegStatus}
    for q, state, sort, desc in (("", "", "aor", False), ("", "", "aor", True), ("ali", "", "aor", False),
                                 ("", "proxied", "aor", False), ("", "", "registrar", False),
                                 ("PBX", "", "user", True), ("", "", "state", False), ("", "", "reg_status", True),
                                 ("", "active", "last_code", False), ("", "", "expires_at", True),
                                 ("", "", "last_push_at", False), ("", "", "selector", True)):
        counts, want = _brute_rows(index, service, q=q, state=state, sort=sort, desc=desc)
        total, matched, got_counts, page = index.query_entries(q=q, state=state, sort=sort, desc=desc, limit=0)
        assert (total, matched, got_counts) == (len(live), len(want), counts), (q, state, sort, desc)
        got = [(e.selector, index.row(e.instance)[sort] if sort in DYNAMIC_SORTS else None) for e in page]
        if sort in _CONTINUOUS:  # ties of times: any order
            assert [v for _s, v in got] == [v for _s, v in want], (sort, desc)
            assert sorted(s for s, _v in got) == sorted(s for s, _v in want)
        else:
            assert [s for s, _v in got] == [s for s, _v in want], (q, state, sort, desc)
        for offset, limit in ((0, 1), (1, 2), (3, 200)):
            sliced = index.query_entries(q=q, state=state, sort=sort, desc=desc, offset=offset, limit=limit)[3]
            if sort not in _CONTINUOUS:
                assert [e.selector for e in sliced] == [s for s, _v in want[offset:offset + limit]]
    for entry in index.entries.values():
        assert json.loads(index.row_json(entry)) == index.row(entry.instance)


_OPS = st.lists(st.tuples(
    st.sampled_from(["add", "add-silently", "remove", "state", "status", "account", "registration", "push",
                     "seen", "check"]),
    st.integers(0, 5), st.integers(0, 1_000), st.booleans()), max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, dirty_limit=st.sampled_from([1, 3, 256]))
def test_index_counts_and_orders_match_a_recount_after_any_events(ops: list[tuple[str, int, int, bool]],
                                                                 dirty_limit: int) -> None:
    """Instances come, go and change state, status, account, registration values and pushes, each
    change announced on the bus as the core does (restores are not); after any of them the kept
    counts, orders, pages and cached rows equal a recount from scratch."""
    _run_index_ops(ops, dirty_limit)


def test_index_matches_a_recount_after_many_random_event_sequences() -> None:
    """The same as above over many seeded random sequences (long ones, every kind of step)."""
    rng = random.Random(5)
    kinds = ["add", "add-silently", "remove", "state", "status", "account", "registration", "push", "seen", "check"]
    for _ in range(200):
        ops = [(rng.choice(kinds), rng.randrange(6), rng.randrange(1000), rng.random() < 0.5)
               for _ in range(rng.randrange(1, 80))]
        _run_index_ops(ops, rng.choice([1, 3, 256]))


def _run_index_ops(ops: list[tuple[str, int, int, bool]], dirty_limit: int) -> None:
    bus = EventBus()
    service = _Service()
    index = InstanceIndex(service, bus, default_registrar="sip:default-pbx")  # type: ignore[arg-type]
    saved, operator_index.DIRTY_LIMIT = operator_index.DIRTY_LIMIT, dirty_limit
    try:
        _check(index, service)
        for op, which, value, flag in ops:
            selector = f"{which:040X}:{which:08X}"
            instance = service.instances.get(selector)
            if op == "add" or (op == "add-silently" and instance is None):  # a restore brings new ones only
                made = Instance(selector, Account(_AORS[value % len(_AORS)], f"u{value % 7}", "pw",
                                                  registrar=_REGISTRARS[value % 3]), PushTarget("m", "a", "t"), "h")
                made.state = list(AppState)[value % 4]
                made.registration.status = list(RegStatus)[value % 6]
                service.instances[selector] = made  # a new object also when the selector is known
                if op == "add":
                    bus.publish(selector, InstanceEnrolled(made.account.aor))
                continue
            if op == "check":
                _check(index, service)
                continue
            if instance is None:
                continue
            if op == "remove":
                del service.instances[selector]
                bus.publish(selector, InstanceDeleted("test"))
            elif op == "state":
                previous, instance.state = instance.state, list(AppState)[value % 4]
                bus.publish(selector, InstanceStateChanged(instance.state, previous))
            elif op == "status":
                before, instance.registration.status = instance.registration.status, list(RegStatus)[value % 6]
                bus.publish(selector, RegistrationStatusChanged(instance.registration.status, before))
            elif op == "account":
                if flag:
                    instance.account = Account(_AORS[value % len(_AORS)], f"u{value % 5}", "pw")
                else:
                    instance.account.registrar = _REGISTRARS[value % 3]
                bus.publish(selector, InstanceUpdated(True))
            elif op == "registration":
                reg = instance.registration
                reg.expires_at = None if flag else float(value % 13)
                reg.last_code, reg.failure_count = (value % 3) * 200 or None, value % 4
                bus.publish(selector, RegistrationResult("error", reg.last_code or 0, "", 0, "", reg.failure_count,
                                                         None, reg.expires_at))
            elif op == "push":
                bus.publish(selector, PushRecord("p", selector, "call", "m",
                                                  outcome="accepted" if flag else "rejected-transient",
                                                  stages={"push_sent": float(value % 17)}))
            elif op == "seen":  # changes a row without any event (as call progress does)
                instance.app_last_seen = float(value)
            if flag and value % 2:
                index.sync()  # a read in between: changes are applied one by one, not coalesced
        _check(index, service)
    finally:
        operator_index.DIRTY_LIMIT = saved
        index.close()


def test_the_whole_list_handed_out_stays_as_it_was_while_the_index_changes() -> None:
    bus = EventBus()
    service = _Service()
    index = InstanceIndex(service, bus)  # type: ignore[arg-type]
    for n in range(5):
        made = Instance(f"{n:040X}:0", Account(f"sip:u{n}@pbx", f"u{n}", "pw"), PushTarget("m", "a", "t"), "h")
        service.instances[made.selector] = made
    held = index.query_entries(limit=0)[3]
    before = [e.selector for e in held]
    gone = before[2]
    del service.instances[gone]
    bus.publish(gone, InstanceDeleted("test"))
    added = Instance("F" * 40 + ":0", Account("sip:a@pbx", "a", "pw"), PushTarget("m", "a", "t"), "h")
    service.instances[added.selector] = added
    bus.publish(added.selector, InstanceEnrolled(added.account.aor))
    now = [e.selector for e in index.query_entries(limit=0)[3]]
    assert [e.selector for e in held] == before  # a stream still sending it is not disturbed
    assert now == [added.selector] + [s for s in before if s != gone]
    index.close()


async def test_summary_counts_follow_events_without_recounting(op: Op) -> None:
    alice = await op.enrol("alice")
    bob = await op.enrol("bob", sleeping=True)
    async with op.client(VIEWER) as viewer:
        assert (await viewer.summary())["counts"] == {"active": 1, "inactive": 0, "proxied": 1, "off": 0}
        await op.world.service.set_state(alice.selector, "inactive", None)
        for _ in range(10):
            await op.world.settle(0.01)
            if alice.state is AppState.PROXIED:
                break
        await op.world.service.delete(bob.selector)
        summary = await viewer.summary()
        assert summary["counts"] == {"active": 0, "inactive": 0, "proxied": 1, "off": 0}
        assert sum(summary["reg_status"].values()) == 1
        assert summary["reg_status"][alice.registration.status.value] == 1
        page = await viewer.instances(limit=0)
        assert page["counts"] == summary["counts"] and [r["selector"] for r in page["items"]] == [alice.selector]


async def test_streamed_pages_in_many_slices_equal_the_plain_answer(op: Op, monkeypatch: pytest.MonkeyPatch) -> None:
    made = [await op.enrol(f"user{n:02d}") for n in range(9)]
    async with op.client(VIEWER) as viewer:
        plain = await viewer.instances(limit=0)
        monkeypatch.setattr(operator_pages, "STREAM_ROWS_OVER", 2)
        monkeypatch.setattr(operator_pages, "SLICE_CHECK", 2)
        monkeypatch.setattr(operator_pages, "SLICE_SECONDS", 0.0)  # a slice per check
        assert await viewer.instances(limit=0) == plain
        made[3].app_last_seen = 12345.5  # no event: the cached row notices anyway
        again = await viewer.instances(limit=0, sort="user", desc=True)
        assert next(r for r in again["items"] if r["selector"] == made[3].selector)["app_last_seen"] == 12345.5
        made[4].registration.registrar_agent = "kamailio (5.6.3)"  # learnt from an answer; the row shows it
        latest = await viewer.instances(limit=0)
        assert next(r for r in latest["items"] if r["selector"] == made[4].selector)["registrar_agent"] == (
            "kamailio (5.6.3)")
        assert [r["user"] for r in again["items"]] == sorted((r["user"] for r in plain["items"]), reverse=True)
