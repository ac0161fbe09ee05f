"""The operator API's answers are the contract's documents: each decodes into its type and encodes
back to the same JSON; the instance list as NDJSON holds what the JSON document holds; ``q`` is the
instance query language the console's filter speaks; the console's feed reads the real API."""

from __future__ import annotations

import json
from typing import Any

import pytest

import sipis.operator_api.pages as operator_pages
from console.feed import OperatorFeed
from contract.codec import from_json, to_json
from contract.documents import (
    ActionResult,
    AuditEntry,
    CallsSnapshot,
    CallTrace,
    InstancePage,
    InstanceRow,
    PushRecord,
    PushResult,
    Summary,
    Whoami,
)
from contract.events import InstanceDetail
from contract.query import matches, parse_query
from sipis.instance import AppState
from sipis.operations import Operator
from tests.test_calls import invite as held_invite
from tests.test_operator_api import ADMIN, OPERATOR, VIEWER, Op
from tests.test_operator_api import op as op  # the fixture

NDJSON = {"Accept": "application/x-ndjson"}


def same_after_a_round_trip(cls: type[Any], answer: Any) -> None:
    assert to_json(from_json(cls, answer)) == answer, cls.__name__


async def test_every_answer_is_its_contract_document(op: Op) -> None:
    alice = await op.enrol("alice", sleeping=True)
    await op.enrol("bob")
    w = op.world
    call = held_invite(alice, call_id="c1@pbx")
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle()
    await w.operations.test_push(alice.selector, Operator("ada", "admin"))
    async with op.client(VIEWER) as viewer, op.client(OPERATOR) as operator:
        same_after_a_round_trip(Whoami, await viewer.whoami())
        same_after_a_round_trip(Summary, await viewer.summary())
        same_after_a_round_trip(InstancePage, await viewer.instances())
        same_after_a_round_trip(InstanceDetail, await viewer.instance(alice.selector))
        same_after_a_round_trip(CallsSnapshot, await viewer.calls())
        same_after_a_round_trip(CallTrace, await viewer.call_trace("c1@pbx"))
        for push in await viewer.pushes():
            same_after_a_round_trip(PushRecord, push)
        same_after_a_round_trip(ActionResult, await operator.re_register(alice.selector))
        same_after_a_round_trip(PushResult, await operator.test_push(alice.selector))
        for row in await viewer.audit():
            same_after_a_round_trip(AuditEntry, row)
    async with op.http(VIEWER) as raw:
        missing = await raw.get("/v1/instances/NOPE")
        assert missing.status_code == 404 and set(missing.json()) == {"error", "detail"}


async def test_the_instance_list_as_ndjson_holds_what_the_json_document_holds(
        op: Op, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(9):
        await op.enrol(f"user{n}", sleeping=n % 3 == 0)
    queries: list[dict[str, Any]] = [{}, {"limit": 0}, {"q": "user1"}, {"state": "proxied", "limit": 0},
                                     {"sort": "state", "desc": "true", "offset": 2, "limit": 4}, {"q": "nobody"}]
    async with op.http(VIEWER) as raw:
        for small in (False, True):
            if small:
                monkeypatch.setattr(operator_pages, "STREAM_ROWS_OVER", 2)  # streamed in slices
            for params in queries:
                document = (await raw.get("/v1/instances", params=params)).json()
                answer = await raw.get("/v1/instances", params=params, headers=NDJSON)
                assert answer.headers["content-type"] == "application/x-ndjson"
                assert answer.text.endswith("\n") and "\n\n" not in answer.text
                head, *rows = [json.loads(line) for line in answer.text.splitlines()]
                assert head == {k: v for k, v in document.items() if k != "items"}
                assert rows == document["items"], params
    async with op.client(VIEWER) as viewer:
        got: list[dict[str, Any]] = []
        head = await viewer.stream_instances(got.extend, q="user", state="active")
        assert head["matched"] == len(got) == 6 and {r["state"] for r in got} == {"active"}


async def test_q_is_the_instance_query_language(op: Op) -> None:
    made = {user: await op.enrol(user, sleeping=user in ("bob", "erin", "alina")) for user in
            ("alice", "alina", "bob", "carol", "dave", "erin")}
    made["dave"].state = AppState.OFF
    await op.world.operations.test_push(made["carol"].selector, Operator("ada", "admin"))
    async with op.client(VIEWER) as viewer:
        everything = [from_json(InstanceRow, r) for r in (await viewer.instances(limit=0))["items"]]
        for q in ("ALI", "ali state:prox", "state:act", "status:reg", "reg:idle", "code:2", "push:acc",
                  "provider:media", "pbx state:off", "state", "x:y", "alice alina"):
            page = await viewer.instances(q=q, limit=0)
            expected = [r.user for r in everything if matches(parse_query(q), r)]
            assert [r["user"] for r in page["items"]] == expected, q
            assert page["matched"] == len(expected)
            states = [r.state for r in everything if matches(parse_query(q), r)]
            assert page["counts"] == {s.value: states.count(s.value) for s in AppState}, q
        assert [r["user"] for r in (await viewer.instances(q="ali state:prox"))["items"]] == ["alina"]
        assert [r["user"] for r in (await viewer.instances(q="push:acc"))["items"]] == ["carol"]


async def test_the_console_feed_reads_the_real_api(op: Op) -> None:
    alice = await op.enrol("alice", sleeping=True)
    await op.enrol("bob")
    async with op.client(ADMIN) as client:
        feed = OperatorFeed(client)
        rows = await feed.instances()
        assert [r.user for r in rows] == ["alice", "bob"] and rows[0].state == "proxied"
        page = await feed.instance_page(1)
        assert page.total == 2 and [r.user for r in page.items] == ["alice"]
        detail = await feed.instance(alice.selector)
        assert detail.row == rows[0] and detail.instance.push.token != "token-alice"
        assert [e.kind for e in detail.timeline][:1] == ["instance.enrolled"]
        summary = await feed.summary()
        assert summary.counts["proxied"] == 1 and summary.pbx.reachable
        pushed = await feed.action(alice.selector, "test-push")
        assert isinstance(pushed, PushResult) and pushed.push.kind == "test"
        assert [p.push_id for p in await feed.pushes()] == [pushed.push.push_id]
        assert (await feed.audit())[-1].action == "test_push"
