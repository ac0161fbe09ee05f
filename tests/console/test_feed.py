"""The console's data model without Textual: store (filter, sort, patches), events, parsers, feeds."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from console.feed import (
    ACTIONS,
    ConsoleModel,
    FakeFeed,
    Feed,
    FeedError,
    Forbidden,
    InstanceStore,
    NotFound,
    OperatorFeed,
    fake_rows,
    parse_query,
    role_allows,
    row_from_dict,
    row_from_public_view,
    summary_from_dict,
)
from widgets.format import ago, clock_time_ms, countdown, duration, fit
from widgets.rows import EventRow, InstanceRow

NOW = 1_700_000_000.0


def store_with(n: int = 200) -> InstanceStore:
    store = InstanceStore()
    store.load(fake_rows(n, NOW))
    return store


def brute(store: InstanceStore, query: str) -> list[str]:
    """The reference filter: what the store's view must contain (as a set)."""
    tokens = parse_query(query)
    from console.feed import FILTER_FIELDS

    result = []
    for row in store.all_rows():
        hay = f"{row.selector}\0{row.aor}\0{row.user}\0{row.registrar}".lower()
        if all(value in hay if name is None else FILTER_FIELDS[name](row).startswith(value)
               for name, value in tokens):
            result.append(row.selector)
    return sorted(result)


# ---------------------------------------------------------------------------------------------- store


def test_default_view_is_all_rows_sorted_by_aor() -> None:
    store = store_with(50)
    view = store.view()
    assert len(view) == store.total == 50
    aors = [row.aor.lower() for row in view]
    assert aors == sorted(aors)


@pytest.mark.parametrize("query", ["alice", "ALICE", "pbx2", "s00001", "state:proxied", "status:unauth",
                                   "bob state:prox", "code:403", "push:rej", "provider:fcm", "state:", "nomatch",
                                   "alice0001 pbx2", "state:off carol"])
def test_filter_matches_the_reference(query: str) -> None:
    store = store_with(300)
    store.set_query(query)
    assert sorted(row.selector for row in store.view()) == brute(store, query)
    assert store.matched == len(brute(store, query))


def test_typing_narrows_incrementally_and_backspace_widens() -> None:
    store = store_with(300)
    typed = ""
    for ch in "alice00":
        typed += ch
        store.set_query(typed)
        assert sorted(r.selector for r in store.view()) == brute(store, typed)
    for _ in range(3):
        typed = typed[:-1]
        store.set_query(typed)
        assert sorted(r.selector for r in store.view()) == brute(store, typed)
    store.set_query("state")  # a plain word, then a field token: not a refinement
    store.set_query("state:")
    assert sorted(r.selector for r in store.view()) == brute(store, "state:")


def test_sort_by_every_column_both_ways() -> None:
    from console.feed import SORT_KEYS

    store = store_with(120)
    for key, (_fields, fn) in SORT_KEYS.items():
        store.set_sort(key, False)
        keys = [fn(row) for row in store.view()]
        assert keys == sorted(keys), key
        store.set_sort(key, True)
        keys = [fn(row) for row in store.view()]
        assert keys == sorted(keys, reverse=True), key


def test_same_sort_key_toggles_direction() -> None:
    store = store_with(10)
    store.set_sort("aor")
    assert store.sort_desc is True
    store.set_sort("aor")
    assert store.sort_desc is False
    store.set_sort("state")
    assert (store.sort_key, store.sort_desc) == ("state", False)
    with pytest.raises(KeyError):
        store.set_sort("nope")


def test_patch_moves_a_row_when_its_sort_key_changes() -> None:
    store = store_with(100)
    store.set_sort("expires", False)
    first = store.view()[0]
    last = store.view()[len(store.view()) - 1]
    assert store.patch(last.selector, {"expires_at": NOW - 10_000})
    view = store.view()
    assert view[0].selector == last.selector
    assert view[1].selector == first.selector
    keys = [row.expires_at if row.expires_at is not None else float("inf") for row in view]
    assert keys == sorted(keys)


def test_patch_without_change_reports_nothing_and_unknown_selector_is_ignored() -> None:
    store = store_with(10)
    row = store.view()[0]
    assert not store.patch(row.selector, {"state": row.state})
    assert not store.patch("nobody", {"state": "off"})


def test_patch_updates_the_filter_result() -> None:
    store = store_with(100)
    store.set_query("state:off")
    before = store.matched
    victim = next(r for r in store.all_rows() if r.state == "proxied")
    store.patch(victim.selector, {"state": "off"})
    assert store.matched == before + 1
    assert victim.selector in {r.selector for r in store.view()}


def test_view_reads_rows_fresh_after_a_patch_that_does_not_reorder() -> None:
    store = store_with(20)
    view = store.view()
    row = view[3]
    store.patch(row.selector, {"last_code": 599})
    assert store.view()[3].last_code == 599


def test_upsert_remove_and_locate() -> None:
    store = store_with(20)
    store.upsert(InstanceRow(selector="znew", aor="sip:aaaa@x"))
    view = store.view()
    assert view[0].selector == "znew"
    assert view.locate("znew") == 0
    assert store.remove("znew")
    assert not store.remove("znew")
    assert "znew" not in store
    assert store.view().locate("znew") is None
    assert store.total == 20


def test_random_operations_keep_the_view_consistent() -> None:
    rng = random.Random(7)
    store = store_with(400)
    states = ["active", "inactive", "proxied", "off"]
    for step in range(300):
        op = rng.random()
        selectors = [r.selector for r in store.all_rows()]
        if op < 0.5:
            store.patch(rng.choice(selectors), {"state": rng.choice(states), "expires_at": NOW + rng.random() * 1000})
        elif op < 0.6:
            store.remove(rng.choice(selectors))
        elif op < 0.7:
            store.upsert(InstanceRow(selector=f"n{step}", aor=f"sip:n{step}@pbx{step % 3}", state=rng.choice(states)))
        elif op < 0.85:
            store.set_query(rng.choice(["", "alice", "state:prox", "pbx1", "a", "al", "ali", "n1"]))
        else:
            store.set_sort(rng.choice(["state", "aor", "expires", "code"]), rng.random() < 0.5)
        view = store.view()
        assert sorted(r.selector for r in view) == brute(store, store.query)
    from console.feed import SORT_KEYS

    fn = SORT_KEYS[store.sort_key][1]
    keys = [fn(r) for r in store.view()]
    assert keys == sorted(keys, reverse=store.sort_desc)


# ---------------------------------------------------------------------------------------------- model + events


def ev(seq: int, event_kind: str, selector: str | None, **data: Any) -> EventRow:
    return EventRow(seq=seq, at=NOW + seq, kind=event_kind, selector=selector, data=data)


def test_events_update_rows_calls_pushes_and_logs() -> None:
    model = ConsoleModel()
    model.store.load(fake_rows(10, NOW))
    applied = model.apply([
        ev(1, "instance.state", "s000001", state="off", previous="proxied"),
        ev(2, "registration.status", "s000001", status="unauthorized", previous="registered"),
        ev(3, "registration", "s000001", result="failed", code=403, reason="Forbidden", failure_count=2,
           next_refresh_at=NOW + 99, expires_at=None),
        ev(4, "call", "s000002", call_id="c1", push_id="p1", stage="Alerting-Device", caller="sip:x@y",
           received_at=NOW, t1_remaining=120.0, t2_remaining=None),
        ev(5, "push", "s000002", push_id="p1", kind="call", provider="fcm", outcome="accepted", latency_ms=80.0),
        ev(6, "audit", None, operator="bob", role="operator", action="test_push", target="s000002", outcome="accepted"),
        ev(7, "instance.app", "s000003", reported="active"),
    ])
    row = model.store.get("s000001")
    assert row is not None
    assert (row.state, row.reg_status, row.last_code, row.failure_count) == ("off", "unauthorized", 403, 2)
    assert row.next_refresh_at == NOW + 99 and row.expires_at is None
    assert applied.calls and applied.pushes and applied.audit
    assert applied.touched == {"s000001", "s000002", "s000003"}
    [call] = model.held_calls()
    assert call.t1_deadline == NOW + 4 + 120.0 and call.push_outcome == "accepted"
    assert model.push_log()[0].push_id == "p1"
    assert model.store.get("s000002").last_push_outcome == "accepted"  # type: ignore[union-attr]
    assert model.audit_log()[0].operator == "bob"
    assert model.store.get("s000003").app_last_seen == NOW + 7  # type: ignore[union-attr]
    assert len(model.event_log()) == 7

    model.apply([ev(9, "registration.status", "s000004", status="idle", previous="unregistering")])
    idle = model.store.get("s000004")
    assert idle is not None and (idle.reg_status, idle.next_refresh_at, idle.expires_at) == ("idle", None, None)

    model.apply([ev(10, "call", "s000002", call_id="c1", push_id="p1", stage="Ended", outcome="redirected",
                    final_status=302)])
    assert model.held_calls() == []
    assert model.recent()[0].final_status == 302


def test_replayed_events_are_skipped_and_lifecycle_events_add_and_remove_rows() -> None:
    model = ConsoleModel()
    model.store.load(fake_rows(3, NOW))
    model.apply([ev(5, "instance.enrolled", "snew", aor="sip:new@pbx")])
    assert "snew" in model.store
    applied = model.apply([ev(5, "instance.deleted", "snew"), ev(6, "instance.updated", "s000000")])
    assert "snew" in model.store  # seq 5 was seen already
    assert applied.refetch == {"s000000"}
    model.apply([ev(7, "instance.deleted", "snew")])
    assert "snew" not in model.store


def test_summary_series() -> None:
    model = ConsoleModel()
    for n in range(3):
        model.record_summary(summary_from_dict({"counts": {"proxied": 10 + n}, "calls_per_min": n,
                                                "push": {"rejected": 2 * n, "transient": n}}))
    assert list(model.series["proxied"]) == [10, 11, 12]
    assert list(model.series["calls"]) == [0, 1, 2]
    assert list(model.series["push_failures"]) == [0, 3, 3]


# ---------------------------------------------------------------------------------------------- parsers and helpers


def test_row_parsers() -> None:
    row = row_from_dict({"selector": "a", "aor": "sip:a@b", "state": "proxied", "reg_status": "registered",
                         "last_code": 200, "expires_at": 5, "failure_count": None, "push_unreachable": 0})
    assert row.last_code == 200 and row.expires_at == 5.0 and row.failure_count == 0
    view = {"selector": "a", "aor": "sip:a@b", "state": "off", "username": "a", "registrar": "sip:b",
            "push": {"provider": "apns", "unreachable": True},
            "registration": {"status": "idle", "last_code": None, "expires_at": None}}
    merged = row_from_public_view(view, replace(row, last_push_outcome="accepted"))
    assert (merged.state, merged.push_provider, merged.push_unreachable) == ("off", "apns", True)
    assert merged.last_push_outcome == "accepted"


def test_summary_parser() -> None:
    s = summary_from_dict({"node": "n1", "counts": {"proxied": 3}, "push": {"success_rate": 0.5,
                           "latency_p50_ms": 12}, "pbx": {"reachable": False, "last_error": "timeout"}})
    assert (s.node, s.counts["proxied"], s.push_success_rate, s.push_p50_ms) == ("n1", 3, 0.5, 12.0)
    assert s.pbx_reachable is False and s.pbx_error == "timeout"


def test_roles() -> None:
    assert role_allows("admin", "admin") and role_allows("admin", "operator")
    assert role_allows("operator", "operator") and not role_allows("operator", "admin")
    assert not role_allows("viewer", "operator") and role_allows("viewer", "viewer")
    assert not role_allows(None, "operator") and not role_allows("bogus", "operator")
    assert ACTIONS["disable"][1] == "admin"


def test_formatting() -> None:
    assert duration(9.2) == "10s" and duration(65) == "1m05s" and duration(7260) == "2h01m"
    assert duration(90000) == "1d01h"
    assert countdown(None, 0) == "-" and countdown(5, 10) == "now" and countdown(70, 10) == "1m00s"
    assert ago(None, 0) == "-" and ago(0, 125) == "2m ago"
    assert clock_time_ms(0.0414, utc=True) == "00:00:00.041"
    assert clock_time_ms(59.9996, utc=True) == "00:01:00.000"
    assert fit("abcdef", 4) == "abc…" and fit("ab", 4, right=True) == "  ab" and fit("äöü", 2) == "ä…"


# ---------------------------------------------------------------------------------------------- feeds


class HTTPError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status
        self.detail = detail


class FakeClient:
    """Stands in for console.client.OperatorClient: JSON bodies as dicts, errors with a status."""

    def __init__(self) -> None:
        self.log: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _log(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.log.append((name, args, kwargs))

    async def whoami(self) -> dict[str, Any]:
        return {"name": "bob", "role": "viewer"}

    async def instances(self, **kwargs: Any) -> dict[str, Any]:
        self._log("instances", **kwargs)
        return {"total": 1, "matched": 1, "counts": {}, "items": [{"selector": "a", "aor": "sip:a@b"}]}

    async def action(self, selector: str, name: str) -> dict[str, Any]:
        self._log("action", selector, name)
        if name == "disable":
            raise HTTPError(403, "disable needs the admin role")
        if name == "hand-back":
            raise HTTPError(409, "not proxied")
        return {"push": {"push_id": "p9", "outcome": "accepted", "provider": "fcm"}}

    async def instance(self, selector: str) -> dict[str, Any]:
        if selector != "a":
            raise HTTPError(404, f"no instance {selector}")
        return {"instance": {"selector": "a", "aor": "sip:a@b", "registration": {}, "push": {}},
                "row": {"selector": "a", "aor": "sip:a@b", "last_push_outcome": "accepted"},
                "timeline": [], "pushes": [{"push_id": "p", "stages": {"invite_received": 5.0, "push_sent": 6.0}}],
                "sip": [{"at": 5.0, "direction": "in", "first_line": "INVITE sip:a@b SIP/2.0", "cseq": 7}]}

    async def audit(self, *, limit: int = 200) -> list[dict[str, Any]]:
        return [{"id": "x", "at": 3.0, "operator": "bob", "role": "admin", "action": "disable", "target": "a",
                 "outcome": "ok", "detail": {}}]

    async def pushes(self, *, limit: int = 200, selector: str | None = None) -> list[dict[str, Any]]:
        raise HTTPError(0, "timeout")

    async def calls(self) -> dict[str, Any]:
        return {"held": [{"call_id": "c", "push_id": "p", "selector": "a", "t1_remaining": 10, "t2_remaining": None,
                          "stage": "Alerting-Device"}], "recent": []}

    async def events(self, since: int | None = None) -> AsyncIterator[dict[str, Any]]:
        self._log("events", since=since)
        yield {"kind": "heartbeat"}
        yield {"seq": 3, "at": 1.0, "kind": "instance.state", "selector": "a", "data": {"state": "off"}}
        yield {"kind": "gap", "since": 3, "first_available": 9, "at": 2.0}

    async def summary(self) -> dict[str, Any]:
        raise ConnectionRefusedError("no socket")


async def test_operator_feed_maps_the_contract() -> None:
    client = FakeClient()
    feed = OperatorFeed(client, clock=lambda: 100.0)
    assert isinstance(feed, Feed) and isinstance(FakeFeed(), Feed)
    assert (await feed.whoami()).role == "viewer"
    rows = await feed.instances()
    assert rows[0].aor == "sip:a@b"
    assert client.log[0] == ("instances", (), {"offset": 0, "limit": 0, "q": "", "state": "", "sort": "aor",
                                                 "desc": False})
    result = await feed.action("a", "test-push")
    assert result.push is not None and result.push.outcome == "accepted" and result.push.selector == "a"
    with pytest.raises(Forbidden) as forbidden:
        await feed.action("a", "disable")
    assert forbidden.value.status == 403
    with pytest.raises(FeedError) as conflict:
        await feed.action("a", "hand-back")
    assert conflict.value.status == 409 and not isinstance(conflict.value, Forbidden)
    with pytest.raises(NotFound):
        await feed.instance("zz")
    detail = await feed.instance("a")
    assert detail.row.last_push_outcome == "accepted"  # the list row the core sends along
    assert detail.pushes[0].at == 6.0 and detail.sip[0].cseq == "7"
    assert (await feed.audit())[0].action == "disable"
    with pytest.raises(FeedError) as timeout:
        await feed.pushes()
    assert timeout.value.code == "unreachable" and timeout.value.status is None
    with pytest.raises(FeedError) as down:
        await feed.summary()
    assert down.value.code == "unreachable"
    held = (await feed.calls()).held
    assert held[0].t1_deadline == 110.0 and held[0].t2_deadline is None
    events = [e async for e in feed.events(since=2)]
    assert [(e.seq, e.kind) for e in events] == [(3, "instance.state"), (0, "gap")]
    assert events[1].data == {"since": 3, "first_available": 9}


async def test_fake_feed_enforces_roles_and_records_actions() -> None:
    viewer = FakeFeed(instances=3, role="viewer")
    with pytest.raises(Forbidden):
        await viewer.action("s000000", "take-over")
    assert viewer.actions == []
    operator = FakeFeed(instances=3, role="operator")
    await operator.action("s000000", "take-over")
    with pytest.raises(Forbidden):
        await operator.action("s000000", "disable")
    assert operator.actions == [("s000000", "take-over")]
    with pytest.raises(NotFound):
        await operator.instance("nope")


# ---------------------------------------------------------------------------------------------- the big list


def test_a_first_page_stands_for_the_whole_list_until_the_rest_is_in() -> None:
    rows = sorted(fake_rows(300, NOW), key=lambda r: r.aor.lower())
    store = InstanceStore()
    store.load(rows[:20], partial_total=300)
    assert store.partial and store.total == 300 and store.matched == 300
    assert [r.selector for r in store.view()] == [r.selector for r in rows[:20]]
    store.set_query("alice")
    assert store.matched == len(store.view())  # only what is in; the dashboard shows "…" meanwhile
    store.load(rows)
    assert not store.partial and store.total == 300
    assert store.matched == len(brute(store, "alice"))


def _items_chunks(doc: bytes, size: int) -> list[bytes]:
    return [doc[i:i + size] for i in range(0, len(doc), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096, 1 << 30])
def test_items_parser_decodes_any_chunking(size: int) -> None:
    import json

    from console.client import ItemsParser

    items = [{"selector": f"s{i}", "aor": "sip:x}{" + str(i) + "@y", "n": i, "f": 1.5, "z": None, "t": True,
              "nested": {"a": [1, {"b": "}],"}]}, "u": "é€𝄞"} for i in range(120)]
    for document in ({"total": 120, "matched": 120, "counts": {"active": 3}, "items": items},
                     {"items": items, "total": 12345678},
                     {"total": 0, "items": []}):
        got: list[Any] = []
        parser = ItemsParser(got.extend)
        for chunk in _items_chunks(json.dumps(document, ensure_ascii=False).encode(), size):
            parser.feed(chunk)
        head = parser.close()
        assert got == document["items"]
        assert head == {k: v for k, v in document.items() if k != "items"}
    spaced = b' { "total" : 2 ,\n "items" : [ {"a":1} , \n {"a":"}"} ] , "x": [1,2] } '
    got = []
    parser = ItemsParser(got.extend)
    for chunk in _items_chunks(spaced, size):
        parser.feed(chunk)
    assert parser.close() == {"total": 2, "x": [1, 2]} and got == [{"a": 1}, {"a": "}"}]


@pytest.mark.parametrize("bad", [b'{"items": [{"a": 1}, {"a": 2', b'{"items": [{"a":1}]', b'{"items": []} x',
                                 b"[1]", b'{"total": 1, "items": [{"a": }]}', b"", b'{"items": [{"a":1} {"a":2}]}'])
def test_items_parser_refuses_broken_documents(bad: bytes) -> None:
    from console.client import ItemsParser

    parser = ItemsParser(lambda items: None)
    with pytest.raises(ValueError):
        parser.feed(bad)
        parser.close()


async def test_the_client_streams_the_instance_list_in_batches() -> None:
    import json

    import httpx

    from console.client import Forbidden as ClientForbidden
    from console.client import OperatorApiError, OperatorClient

    rows = [{"selector": f"S{i:04d}", "aor": f"sip:u{i}@pbx", "state": "active"} for i in range(3000)]
    body = json.dumps({"total": 3000, "matched": 3000, "counts": {"active": 3000}, "items": rows}).encode()

    class Chunks(httpx.AsyncByteStream):
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in _items_chunks(self.data, 5000):
                yield chunk

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.params.get("q") == "forbidden":
            return httpx.Response(403, json={"error": "forbidden", "detail": "no"})
        if request.url.params.get("q") == "broken":
            return httpx.Response(200, stream=Chunks(body[:-40]))
        return httpx.Response(200, stream=Chunks(body))

    client = OperatorClient(transport=httpx.MockTransport(handler))
    batches: list[int] = []
    got: list[dict[str, Any]] = []

    def take(items: list[Any]) -> None:
        batches.append(len(items))
        got.extend(items)

    head = await client.stream_instances(take)
    assert got == rows and len(batches) > 1
    assert head == {"total": 3000, "matched": 3000, "counts": {"active": 3000}, "items": []}
    assert seen[0].url.params["limit"] == "0"
    with pytest.raises(ClientForbidden):
        await client.stream_instances(take, q="forbidden")
    with pytest.raises(OperatorApiError):
        await client.stream_instances(take, q="broken")
    feed = OperatorFeed(client)
    assert [r.selector for r in await feed.instances()] == [r["selector"] for r in rows]
    await client.aclose()


async def test_operator_feed_asks_for_a_first_page() -> None:
    client = FakeClient()
    feed = OperatorFeed(client)
    page = await feed.instance_page(50)
    assert page.total == 1 and page.rows[0].aor == "sip:a@b"
    assert client.log[-1] == ("instances", (), {"offset": 0, "limit": 50, "q": "", "state": "", "sort": "aor",
                                                  "desc": False})
    fake = FakeFeed(instances=30)
    first = await fake.instance_page(5)
    assert first.total == 30 and [r.aor for r in first.rows] == sorted((r.aor for r in fake.rows),
                                                                      key=str.lower)[:5]
