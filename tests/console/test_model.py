"""The console's model without Textual: the instance store (filter, sort, patches), typed events
applied to rows, calls, pushes and logs, and the summary series."""

from __future__ import annotations

import random
from typing import Any

import pytest

from console.model import SORT_KEYS, ConsoleModel, InstanceStore, push_time
from contract.codec import from_json
from contract.documents import CallsSnapshot, HeldCall, InstanceRow, PushRecord, Summary
from contract.events import StreamNotice
from contract.kinds import AlarmKind, StreamNoticeKind
from contract.query import matches, parse_query
from widgets.format import ago, clock_time_ms, countdown, duration, fit

from .fake_feed import FakeFeed, event, fake_rows

NOW = 1_700_000_000.0


def store_with(n: int = 200) -> InstanceStore:
    store = InstanceStore()
    store.load(fake_rows(n, NOW))
    return store


def brute(store: InstanceStore, query: str) -> list[str]:
    """The reference filter: what the store's view must contain (as a set)."""
    terms = parse_query(query)
    return sorted(row.selector for row in store.all_rows() if matches(terms, row))


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
    fn = SORT_KEYS[store.sort_key][1]
    keys = [fn(r) for r in store.view()]
    assert keys == sorted(keys, reverse=store.sort_desc)


# ---------------------------------------------------------------------------------------------- model + events


def ev(seq: int, event_kind: str, selector: str | None, /, **data: Any) -> Any:
    return event(seq, NOW + seq, event_kind, selector, **data)


def test_events_update_rows_calls_pushes_and_logs() -> None:
    model = ConsoleModel()
    model.store.load(fake_rows(10, NOW))
    applied = model.apply([
        ev(1, "instance.state", "s000001", state="off", previous="proxied"),
        ev(2, "registration.status", "s000001", status="unauthorized", previous="registered"),
        ev(3, "registration", "s000001", result="unauthorized", code=403, reason="Forbidden", failure_count=2,
           next_refresh_at=NOW + 99, expires_at=None),
        ev(4, "call", "s000002", call_id="c1", push_id="p1", stage="Alerting-Device", caller="sip:x@y",
           received_at=NOW, t1_remaining=120.0, t2_remaining=None),
        ev(5, "push", "s000002", push_id="p1", kind="call", provider="fcm", outcome="accepted", latency_ms=80.0),
        ev(6, "audit", None, id="a1", at=NOW + 6, operator="bob", role="operator", action="test_push",
           target="s000002", outcome="accepted"),
        ev(7, "instance.app", "s000003", reported="active"),
    ])
    row = model.store.get("s000001")
    assert row is not None
    assert (row.state, row.reg_status, row.last_code, row.failure_count) == ("off", "unauthorized", 403, 2)
    assert row.next_refresh_at == NOW + 99 and row.expires_at is None
    assert applied.calls and applied.pushes and applied.audit
    assert applied.touched == {"s000001", "s000002", "s000003"}
    [call] = model.held_calls()
    assert call.t1_deadline == NOW + 4 + 120.0 and call.t2_deadline is None and call.push_outcome == "accepted"
    assert model.push_log()[0].push_id == "p1"
    assert model.store.get("s000002").last_push_outcome == "accepted"  # type: ignore[union-attr]
    assert model.audit_log()[0].operator == "bob" and model.audit_log()[0].at == NOW + 6
    assert model.store.get("s000003").app_last_seen == NOW + 7  # type: ignore[union-attr]
    assert len(model.event_log()) == 7

    model.apply([ev(9, "registration.status", "s000004", status="idle", previous="unregistering")])
    idle = model.store.get("s000004")
    assert idle is not None and (idle.reg_status, idle.next_refresh_at, idle.expires_at) == ("idle", None, None)

    model.apply([ev(10, "call", "s000002", call_id="c1", push_id="p1", stage="Ended", outcome="redirected",
                    final_status=302)])
    assert model.held_calls() == []
    assert model.recent()[0].call.final_status == 302


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
        model.record_summary(from_json(Summary, {"counts": {"proxied": 10 + n}, "calls_per_min": n,
                                                 "push": {"rejected": 2 * n, "transient": n}}))
    assert list(model.series["proxied"]) == [10, 11, 12]
    assert list(model.series["calls"]) == [0, 1, 2]
    assert list(model.series["push_failures"]) == [0, 3, 3]


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


def test_held_calls_get_wall_clock_deadlines_when_they_arrive() -> None:
    model = ConsoleModel()
    call = HeldCall(call_id="c", push_id="p", selector="a", stage="Alerting-Device", received_at=95.0,
                    t1_remaining=10.0, t2_remaining=None)
    model.load_pushes([PushRecord(push_id="p", selector="a", kind="call", provider="fcm", outcome="pending",
                                  stages={"push_sent": 96.0})])
    model.load_calls(CallsSnapshot(held=[call], recent=[]), now=100.0)
    [entry] = model.held_calls()
    assert (entry.call, entry.t1_deadline, entry.t2_deadline, entry.push_outcome) == (call, 110.0, None, "pending")


def test_push_times_come_from_the_stages_else_from_when_the_push_was_first_seen() -> None:
    sent = PushRecord(push_id="p1", selector="a", kind="test", provider="fcm", stages={"push_sent": 7.0,
                                                                                      "invite_received": 6.0})
    assert push_time(sent) == 7.0
    assert push_time(PushRecord(push_id="p2", selector="a", kind="call", provider="x",
                                stages={"invite_received": 6.0})) == 6.0
    model = ConsoleModel()
    model.apply([event(1, 42.0, "push", "a", push_id="p3", kind="test", provider="none",
                       outcome="rejected-permanent", error="no push provider 'none' configured")])
    [refused] = model.push_log()
    assert refused.stages == {} and model.push_at(refused) == 42.0


def test_stream_notices_go_to_the_event_log_only() -> None:
    model = ConsoleModel()
    model.store.load(fake_rows(3, NOW))
    gap = StreamNotice(StreamNoticeKind.GAP, NOW, since=3, first_available=9)
    applied = model.apply([gap])
    assert model.event_log() == [gap] and applied.touched == set() and model.last_seq is None


def test_every_alarm_the_core_raises_has_a_title_and_no_title_is_for_another() -> None:
    from console.model import ALARM_TITLES

    assert set(ALARM_TITLES) == set(AlarmKind)
    assert all(title for title in ALARM_TITLES.values())


def test_formatting() -> None:
    assert duration(9.2) == "10s" and duration(65) == "1m05s" and duration(7260) == "2h01m"
    assert duration(90000) == "1d01h"
    assert countdown(None, 0) == "-" and countdown(5, 10) == "now" and countdown(70, 10) == "1m00s"
    assert ago(None, 0) == "-" and ago(0, 125) == "2m ago"
    assert clock_time_ms(0.0414, utc=True) == "00:00:00.041"
    assert clock_time_ms(59.9996, utc=True) == "00:01:00.000"
    assert fit("abcdef", 4) == "abc…" and fit("ab", 4, right=True) == "  ab" and fit("äöü", 2) == "ä…"


async def test_the_fake_feed_keeps_its_rows_in_step_with_what_it_emits() -> None:
    fake = FakeFeed(instances=3)
    fake.emit("instance.state", "s000001", state="off", previous="proxied")
    assert [r.state for r in await fake.instances()][1] == "off"
