"""Pilot tests of the console against the FakeFeed (frozen clock, scripted events)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from textual.command import CommandPalette
from textual.pilot import Pilot
from textual.widgets import Input, OptionList

from console.app import SipisConsole
from console.commands import palette_commands
from console.feed import FeedError
from console.model import InstanceStore
from console.screens import (
    AuditScreen,
    CallsScreen,
    CallTraceScreen,
    ConfirmScreen,
    DashboardScreen,
    EventLogScreen,
    EventScreen,
    HelpScreen,
    InstanceDetailScreen,
    PushLogScreen,
)
from contract.documents import CallsSnapshot, HeldCall, InstanceRow, NodeRow
from contract.events import Event, InstanceDetail
from widgets.instance_table import InstanceTable
from widgets.ladder import Ladder
from widgets.sparklines import SparkPanel
from widgets.status_strip import StatusStrip
from widgets.table import VirtualTable

from .fake_feed import FakeFeed
from .helpers import NOW, make_console, ready, record_notes, screen_text, until


def info_text(app: SipisConsole) -> str:
    return str(app.screen.query_one("#table-info").render())


def table(app: SipisConsole) -> InstanceTable:
    return app.screen.query_one(InstanceTable)


def strip_text(app: SipisConsole) -> str:
    return str(app.screen.query_one(StatusStrip).render())


# ---------------------------------------------------------------------------------------------- dashboard


async def test_dashboard_shows_every_instance_and_the_status_strip() -> None:
    app = make_console()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        assert isinstance(app.screen, DashboardScreen)
        assert "40 of 40" in info_text(app)
        assert table(app).row_count == 40
        strip = strip_text(app)
        for text in ("sipis-lab-1", "up 3d04h", "PBX 3 up", "held 2", "alice", "OPERATOR", "proxied 24", "99.4%"):
            assert text in strip


async def test_filter_narrows_as_you_type_and_shows_n_of_m() -> None:
    app = make_console()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press(*"alice")
        await pilot.pause()
        assert "4 of 40" in info_text(app)
        assert table(app).row_count == 4
        assert all("alice" in row.aor for row in table(app).rows)
        await pilot.press("space", *"state:prox")
        await pilot.pause()
        assert "3 of 40" in info_text(app)
        await pilot.press("enter")  # keep the filter, back to the table
        assert isinstance(app.focused, InstanceTable)
        assert "3 of 40" in info_text(app)
        await pilot.press("escape")  # clear it
        await pilot.pause()
        assert "40 of 40" in info_text(app)
        assert not app.screen.query_one("#filter", Input).has_class("-active")


async def test_typing_q_into_the_filter_does_not_quit() -> None:
    app = make_console()
    async with app.run_test() as pilot:
        await ready(pilot, app)
        await pilot.press("slash", "q", "p", "t")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        assert app.screen.query_one("#filter", Input).value == "qpt"
        assert not app.paused


async def test_sort_keys_toggle_and_header_click() -> None:
    app = make_console()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        store: InstanceStore = app.model.store
        assert (store.sort_key, store.sort_desc) == ("aor", False)
        await pilot.press("s")
        assert (store.sort_key, store.sort_desc) == ("reg", False)
        assert table(app).rows[0].reg_status == "unauthorized"
        await pilot.press("S")
        assert (store.sort_key, store.sort_desc) == ("reg", True)
        assert table(app).rows[0].reg_status == "idle"
        assert "Reg▼" in info_text(app)
        await pilot.click(InstanceTable, offset=(2, 0))  # the "State" header
        await pilot.pause()
        assert (store.sort_key, store.sort_desc) == ("state", False)
        assert table(app).rows[0].state == "active"
        await pilot.click(InstanceTable, offset=(2, 0))
        await pilot.pause()
        assert (store.sort_key, store.sort_desc) == ("state", True)
        assert table(app).rows[0].state == "off"


@pytest.mark.parametrize("width", [80, 120])
async def test_a_sorted_header_is_never_cut(width: int) -> None:
    app = make_console()
    async with app.run_test(size=(width, 30)) as pilot:
        await ready(pilot, app)
        instances = table(app)
        for column, _ in instances._columns_for(instances.scrollable_content_region.width):
            app.model.store.set_sort(column.key, False)
            instances.set_sort_indicator(column.key, False)
            await pilot.pause()
            assert f"{column.title}▲" in screen_text(app)


async def test_sparklines_start_at_zero() -> None:
    app = make_console()
    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot, app)
        sparks = app.screen.query_one(SparkPanel)
        sparks.show("proxied", [33.0] * 60 + [34.0] * 60, "34")
        await pilot.pause()
        top_half = screen_text(app).splitlines()[sparks.region.y + 1][1: sparks.region.width // 3 - 2]
        assert top_half.strip() and " " not in top_half  # 33 is nearly as high as 34, not a floor


async def test_countdowns_are_computed_at_render_time() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        first = table(app).rows[0]
        assert first.next_refresh_at == NOW + 30
        assert "     30s   1m00s" in screen_text(app)
        feed.now += 10
        app.tick()
        await pilot.pause()
        assert "     20s     50s" in screen_text(app)


async def test_events_update_the_table_in_batches() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        first = table(app).rows[0]
        assert first.state == "proxied"
        feed.emit("instance.state", first.selector, state="off", previous="proxied")
        feed.emit("registration.status", first.selector, status="idle", previous="registered")
        await until(pilot, lambda: len(app._pending) == 2)
        assert table(app).rows[0].state == "proxied"  # not before the tick
        app.tick()
        await pilot.pause()
        assert table(app).rows[0].state == "off"
        assert table(app).rows[0].reg_status == "idle"


async def test_a_gap_in_the_event_stream_reloads_everything() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test() as pilot:
        await ready(pilot, app)
        loads = sum(1 for name, _ in feed.requests if name == "instances")
        feed.emit("instance.app", "s000001", reported="active")
        feed.emit("gap", None, since=1, first_available=7)  # events 2..6 left the core's ring
        await until(pilot, lambda: app._resync)
        app.tick()
        await until(pilot, lambda: sum(1 for name, _ in feed.requests if name == "instances") == loads + 1)


# ---------------------------------------------------------------------------------------------- drill-down


async def test_click_a_row_then_click_it_again_opens_the_detail() -> None:
    app = make_console()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.click(InstanceTable, offset=(5, 3))  # header is line 0: this is the third row
        await pilot.pause()
        assert table(app).cursor_row == 2
        selector = table(app).rows[2].selector
        await pilot.click(InstanceTable, offset=(5, 3))
        await pilot.pause()
        assert isinstance(app.screen, InstanceDetailScreen) and app.screen.selector == selector


async def test_enter_opens_the_detail_with_a_ladder_and_escape_returns() -> None:
    app = make_console()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        selector = table(app).rows[0].selector
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, InstanceDetailScreen)
        assert app.screen.selector == selector
        ladder = app.screen.query_one(Ladder)
        await until(pilot, lambda: ladder.row_count > 0)
        assert ladder.row_count == 14  # 10 SIP messages, a push and its answer, two app reports
        text = screen_text(app)
        for lane in ("PBX", "SIPIS", "Push/App"):
            assert lane in text
        assert "REGISTER" in text and "401 Unauthorized" in text and "push call (fcm)" in text
        # the raw message of the selected arrow is shown beside the ladder
        for _ in range(5):
            await pilot.press("down")
        await pilot.pause()
        assert "Call-ID: inv-s000000@pbx1.example.net" in screen_text(app)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)


async def test_export_a_call_trace_as_text_and_pcap(tmp_path: Path) -> None:
    app = make_console(export_dir=tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        notes = record_notes(app)
        await ready(pilot, app)
        await pilot.press("enter")
        ladder = app.screen.query_one(Ladder)
        await until(pilot, lambda: ladder.row_count > 0)
        for _ in range(5):
            await pilot.press("down")
        await pilot.press("e", "E")
        text_file = tmp_path / "sipis-call-inv-s000000_pbx1.example.net.txt"
        pcap_file = tmp_path / "sipis-call-inv-s000000_pbx1.example.net.pcap"
        await until(pilot, lambda: text_file.exists() and pcap_file.exists())
        assert text_file.read_text().startswith("call inv-s000000@pbx1.example.net")
        assert pcap_file.read_bytes()[:4] == bytes.fromhex("d4c3b2a1")
        await until(pilot, lambda: sum("Trace written" in n.title for n in notes) == 2)
        assert any(str(text_file) in n.message for n in notes)


async def test_exports_go_to_a_private_folder_in_home_never_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    app = make_console()
    async with app.run_test(size=(120, 40)) as pilot:
        notes = record_notes(app)
        await ready(pilot, app)
        await pilot.press("2", "e")
        folder = tmp_path / "home" / "sipis-exports"
        await until(pilot, lambda: any(n.title == "Trace written (text)" for n in notes))
        written = [n.message for n in notes if n.title == "Trace written (text)"]
        assert written == [str(folder / "sipis-call-inv-s000001_pbx.txt")]
        assert (folder / "sipis-call-inv-s000001_pbx.txt").is_file()
        assert folder.stat().st_mode & 0o777 == 0o700
        assert not list(tmp_path.glob("sipis-call-*"))


async def test_held_calls_board_and_call_trace() -> None:
    app = make_console()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("2")
        await pilot.pause()
        assert isinstance(app.screen, CallsScreen)
        held = app.screen.query_one("#held", VirtualTable)
        assert held.row_count == 2
        text = screen_text(app)
        assert "Held calls (2)" in text and "1m52s" in text and "3m52s" in text and "Push-Notification-Sent" in text
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, CallTraceScreen)
        ladder = app.screen.query_one(Ladder)
        await until(pilot, lambda: ladder.row_count > 0)
        text = screen_text(app)
        assert "INVITE" in text and "app: active" in text  # the app's report, from the push stages
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, CallsScreen)


async def test_recent_calls_fill_the_screen_newest_first_by_received_time() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        held = (await feed.calls()).held
        # ended in another order than they came: the first to come ended last
        recent = [HeldCall(call_id=f"inv-{n:02d}@pbx", push_id=f"p-{n:02d}", selector=feed.rows[0].selector,
                           caller="sip:+4930@pbx1.example.net", stage="Ended", received_at=NOW - 100 - n * 60,
                           outcome="redirected", final_status=302) for n in range(40)]
        app.model.load_calls(CallsSnapshot(held=held, recent=recent), NOW)
        await pilot.press("2")
        await pilot.pause()
        rows = app.screen.query_one("#recent", VirtualTable).rows
        assert [c.call.call_id for c in rows[:3]] == ["inv-00@pbx", "inv-01@pbx", "inv-02@pbx"]
        shown = [line for line in screen_text(app).splitlines() if "+4930@pbx1" in line]
        assert len(shown) >= 25  # two held calls take their own lines, the recent ones the rest


async def test_the_raw_message_uses_the_width_it_gets_and_wraps_long_lines() -> None:
    app = make_console()
    async with app.run_test(size=(130, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("enter")
        ladder = app.screen.query_one(Ladder)
        await until(pilot, lambda: ladder.row_count > 0)
        for _ in range(5):  # the INVITE from the PBX
            await pilot.press("down")
        await pilot.pause()
        row = ladder.cursor_value
        assert row is not None and "INVITE sip:" in row.detail
        box, raw = app.screen.query_one(".raw-box"), app.screen.query_one(".raw")
        assert raw.region.width >= box.region.width - 2
        text = screen_text(app)
        for word in row.detail.split():  # nothing cut off at the pane's edge
            assert word in text


async def test_views_switch_with_number_keys() -> None:
    app = make_console()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        for key, kind in (("3", PushLogScreen), ("4", EventLogScreen), ("5", AuditScreen), ("1", DashboardScreen),
                          ("2", CallsScreen)):
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, kind)
        await pilot.press("3")
        await pilot.pause()
        assert app.screen.query_one("#push-log", VirtualTable).row_count == 35
        await pilot.press("5")
        await pilot.pause()
        assert "take_over" in screen_text(app)


async def test_the_pbx_view_lists_targets_with_instances_and_errors() -> None:
    feed = FakeFeed(now=NOW)
    feed.pbx_reachable = False
    app = make_console(feed)
    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("6")
        await until(pilot, lambda: "udp:192.0.2.10:5060" in screen_text(app))
        text = screen_text(app)
        assert "Registrar targets" in text and "408 Request Timeout" in text and "24 inst" in text
        assert "Push providers" in text and "fcm" in text
        assert "PBX 2 up" in strip_text(app) and "1 DOWN" in strip_text(app)


async def test_the_alarms_view_lists_episodes_and_acknowledges_one() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("7")
        await until(pilot, lambda: "udp:192.0.2.10:5060" in screen_text(app))
        text = screen_text(app)
        assert "1 active, 1 past" in text and "pbx-down" in text and "token-dead" in text
        await pilot.press("a")
        await until(pilot, lambda: feed.active_alarms[0].acknowledged_by == "alice")
        await until(pilot, lambda: "alice" in screen_text(app))


async def test_a_viewer_may_not_acknowledge_alarms() -> None:
    feed = FakeFeed(now=NOW, role="viewer")
    app = make_console(feed)
    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("7")
        await until(pilot, lambda: "pbx-down" in screen_text(app))
        await pilot.press("a")
        await pilot.pause()
        assert feed.active_alarms[0].acknowledged_by is None
async def test_number_keys_open_the_view_itself_and_esc_goes_back_one_step() -> None:
    app = make_console()
    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("enter")  # an instance's detail, stacked on the instances view
        await until(pilot, lambda: isinstance(app.screen, InstanceDetailScreen))
        await pilot.press("2", "enter")  # a call's trace, stacked on the calls view
        await until(pilot, lambda: isinstance(app.screen, CallTraceScreen))
        await pilot.press("1")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)
        await pilot.press("2")
        await pilot.pause()
        assert isinstance(app.screen, CallsScreen)
        await pilot.press("3", "escape")  # back to the calls view
        await pilot.pause()
        assert isinstance(app.screen, CallsScreen)
        await pilot.press("escape")  # back to the instances view
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)
        await pilot.press("enter", "escape")  # a detail closes: one step
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)
        for view in (CallsScreen, DashboardScreen, DashboardScreen):  # the views before, then nothing
            await pilot.press("escape")
            await pilot.pause()
            assert isinstance(app.screen, view)


async def test_logs_are_newest_first_by_time_and_stay_put_while_scrolled_away() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)

    def push(push_id: str, sent: float, outcome: str = "accepted") -> None:
        feed.emit("push", feed.rows[0].selector, push_id=push_id, kind="call", provider="fcm", attempt=1,
                  outcome=outcome, stages={"push_sent": sent})

    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("3")
        await pilot.pause()
        log = app.screen.query_one("#push-log", VirtualTable)
        oldest = log.rows[-1]
        push("p-new-1", NOW + 1)
        push(oldest.push_id, oldest.stages["push_sent"], outcome="rejected-permanent")  # a later stage of an old push
        await until(pilot, lambda: len(app._pending) == 2)
        await app.refresh_now()
        await pilot.pause()
        assert log.rows[0].push_id == "p-new-1" and log.cursor_row == 0  # at the top: follows the newest
        assert log.rows[-1].push_id == oldest.push_id  # an update does not move a row
        assert "new ↑" not in screen_text(app)

        await pilot.press("down", "down", "down")
        reading, top = log.cursor_value, log.scroll_offset.y
        push("p-new-2", NOW + 2)
        push("p-new-3", NOW + 3)
        await until(pilot, lambda: len(app._pending) == 2)
        await app.refresh_now()
        await pilot.pause()
        assert log.cursor_value == reading and log.cursor_row == 5  # the row being read stays under the cursor
        assert log.scroll_offset.y == top + 2  # and where it was on the screen
        assert "Push log (38, newest first) · 2 new ↑ (home)" in screen_text(app)
        await pilot.press("home")
        await pilot.pause()
        assert log.cursor_value is not None and log.cursor_value.push_id == "p-new-3"
        assert "Push log (38, newest first)" in screen_text(app) and "new ↑" not in screen_text(app)


async def test_event_log_follows_the_stream() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("4")
        feed.emit("registration", "s000001", result="registered", code=200, expires=3600)
        await until(pilot, lambda: len(app._pending) == 1)
        app.tick()
        await pilot.pause()
        text = screen_text(app)
        assert "Event log (1, newest first)" in text
        assert "registration" in text and "bob00001@pbx2.example.net" in text and "code 200" in text


async def test_events_read_in_words_with_local_or_utc_times_and_enter_shows_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30, so local and UTC times differ
    time.tzset()
    try:
        feed = FakeFeed(now=NOW)
        app = make_console(feed, utc=False)
        async with app.run_test(size=(180, 30)) as pilot:
            await ready(pilot, app)
            await pilot.press("4")
            feed.emit("registration", "s000001", result="registered", code=200, reason="OK", expires=3600,
                      detail="", failure_count=0, next_refresh_at=NOW + 1800, expires_at=NOW + 3600)
            await until(pilot, lambda: len(app._pending) == 1)
            app.tick()
            await pilot.pause()
            line = next(line for line in screen_text(app).splitlines() if "registration" in line)
            # 2023-11-14 22:13:20 UTC is 03:43:20 in Kolkata: local first
            assert line.startswith("03:43:20") and "code 200  reason OK  expires 3600 s" in line
            assert "=" not in line and "1700" not in line  # no key=value, no epoch seconds
            await pilot.press("u")
            await pilot.pause()
            line = next(line for line in screen_text(app).splitlines() if "registration" in line)
            assert line.startswith("22:13:20")

            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, EventScreen)
            text = screen_text(app)
            for field in ("result", "registered", "failure count", "next refresh at  22:43:20",
                          "expires at       23:13:20"):
                assert field in text
            await pilot.press("i")
            await pilot.pause()
            assert isinstance(app.screen, InstanceDetailScreen) and app.screen.selector == "s000001"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# ---------------------------------------------------------------------------------------------- actions and roles


async def test_action_needs_confirmation_and_calls_the_feed_only_on_yes() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 40)) as pilot:
        notes = record_notes(app)
        await ready(pilot, app)
        selector = table(app).rows[0].selector
        await pilot.press("t")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert "Take over sip:alice00000@pbx1.example.net" in screen_text(app)
        await pilot.press("n")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)
        assert feed.actions == []
        await pilot.press("t", "y")
        await until(pilot, lambda: feed.actions == [(selector, "take-over")])
        await until(pilot, lambda: any(n.title == "Take over" for n in notes))
        for key, name in (("h", "hand-back"), ("r", "re-register"), ("n", "test-push")):
            await pilot.press(key)
            await pilot.pause()
            await pilot.press("y")
            await until(pilot, lambda name=name: feed.actions[-1] == (selector, name))  # type: ignore[misc]
        await until(pilot, lambda: any("push accepted" in n.message for n in notes))
        # disable needs admin: an operator does not even get the key
        await pilot.press("D")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)


async def test_actions_from_the_detail_screen() -> None:
    feed = FakeFeed(now=NOW, role="admin")
    app = make_console(feed, role="admin")
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("enter")
        await pilot.pause()
        await pilot.press("D")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and app.screen.has_class("-danger")
        assert 0 < app.screen.styles.background.a < 1  # the screen behind shows through, dimmed
        assert "Type alice00000 and press enter" in screen_text(app)
        await pilot.press("y", "enter")  # y is no answer here: it is typed, and a wrong name confirms nothing
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and feed.actions == []
        await pilot.press(*["backspace"] * 1, *"alice00000")
        await pilot.press("enter")
        await until(pilot, lambda: feed.actions == [("s000000", "disable")])
        assert isinstance(app.screen, InstanceDetailScreen)


async def test_replay_a_push_from_the_push_log() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("3")
        await pilot.pause()
        push = app.screen.query_one("#push-log", VirtualTable).cursor_value
        await pilot.press("R")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: feed.actions == [(push.push_id, "replay")])  # type: ignore[union-attr]


async def test_refused_action_shows_the_403() -> None:
    feed = FakeFeed(now=NOW, refuse_actions=True)
    app = make_console(feed)
    async with app.run_test() as pilot:
        notes = record_notes(app)
        await ready(pilot, app)
        await pilot.press("r", "y")
        await until(pilot, lambda: any("403" in n.message for n in notes))
        note = next(n for n in notes if "403" in n.message)
        assert note.severity == "error" and note.title == "Re-register"
        assert feed.actions == []


async def test_viewer_sees_no_actions() -> None:
    feed = FakeFeed(now=NOW, role="viewer")
    app = make_console(feed, role="viewer")
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        assert "VIEWER" in strip_text(app)
        actions = {binding.binding.action for binding in app.screen.active_bindings.values()}
        assert not any(action.startswith("act(") for action in actions)
        footer = screen_text(app).splitlines()[-1]
        assert "Take over" not in footer and "Filter" in footer
        await pilot.press("t", "h", "r", "n", "D")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        titles = [c.title for c in palette_commands(app)]
        assert not any(title.startswith("Action:") for title in titles)
        assert "View: held calls" in titles
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, InstanceDetailScreen)
        actions = {binding.binding.action for binding in app.screen.active_bindings.values()}
        assert not any(action.startswith("act(") for action in actions)
        await pilot.press("escape", "3")
        await pilot.pause()
        assert "replay" not in {binding.binding.action for binding in app.screen.active_bindings.values()}
        await pilot.press("question_mark")
        await pilot.pause()
        assert "take over" not in screen_text(app)
        assert feed.actions == [] and not any(r[0] == "action" for r in feed.requests)


async def test_operator_palette_and_footer_offer_actions() -> None:
    app = make_console(role="operator")
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        titles = [c.title for c in palette_commands(app)]
        for title in ("View: instances (dashboard)", "View: held calls", "View: push log", "View: event log",
                      "View: audit log", "Help: key map", "Pause updates", "Filter instances", "Quit",
                      "Action: Take over sip:alice00000@pbx1.example.net", "Action: Hand back sip:alice00000@pbx1."
                      "example.net", "Action: Re-register sip:alice00000@pbx1.example.net",
                      "Action: Test push sip:alice00000@pbx1.example.net"):
            assert title in titles
        assert not any(title.startswith("Action: Disable") for title in titles)  # admin only
        assert "Take over" in screen_text(app).splitlines()[-1]


async def test_command_palette_lists_views_and_actions() -> None:
    app = make_console()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"held calls")
        options = app.screen.query_one(OptionList)
        await until(pilot, lambda: options.option_count > 0)
        prompts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert any("View: held calls" in p for p in prompts)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, CallsScreen))
        await pilot.press("1", "ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"take over")
        options = app.screen.query_one(OptionList)
        await until(pilot, lambda: options.option_count > 0)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))


async def palette_prompts(pilot: Pilot[Any], app: SipisConsole, query: str) -> list[str]:
    await pilot.press("ctrl+p")
    await until(pilot, lambda: isinstance(app.screen, CommandPalette))
    await pilot.press(*query)
    options = app.screen.query_one(OptionList)
    await until(pilot, lambda: options.option_count > 0)
    await pilot.pause(0.2)  # every provider has answered
    prompts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
    await pilot.press("escape")
    await until(pilot, lambda: not isinstance(app.screen, CommandPalette))
    return prompts


async def test_footer_and_palette_put_the_product_first() -> None:
    feed = FakeFeed(now=NOW, role="admin")
    app = make_console(feed, role="admin")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        footer = screen_text(app).splitlines()[-1]
        assert footer.startswith(" q Quit  ? Help  p Pause")  # kept at 80 columns
        assert "Disable" in {b.binding.description for b in app.screen.active_bindings.values() if b.binding.show}
        quits = [p for p in await palette_prompts(pilot, app, "quit") if p.startswith("Quit")]
        assert len(quits) == 1 and "asks first" in quits[0]  # ours, not Textual's as well
        await pilot.press("3")
        await pilot.pause()
        footer = screen_text(app).splitlines()[-1]
        assert footer.startswith(" q Quit  ? Help  p Pause  R Replay")
        assert any("Replay push" in p for p in await palette_prompts(pilot, app, "replay"))


async def test_an_action_the_state_forbids_is_disabled_with_the_reason() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 40)) as pilot:
        notes = record_notes(app)
        await ready(pilot, app)
        off = next(i for i, row in enumerate(table(app).rows) if row.state == "off")
        table(app).move_cursor_to(off)
        await pilot.pause()
        shown = {b.binding.key: b.enabled for b in app.screen.active_bindings.values()}
        assert shown["t"] is False and shown["n"] is True  # take over greyed out, test push not
        prompts = await palette_prompts(pilot, app, "take over")
        assert any("Take over" in p and "not now: the instance is off" in p for p in prompts)
        app.request_action(table(app).rows[off].selector, "take-over")  # the palette's way in
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen) and feed.actions == []
        assert any("not now: the instance is off" in n.message for n in notes)


# ---------------------------------------------------------------------------------- alarms, pause, help, quit


async def test_alarm_events_notify_at_once() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test() as pilot:
        notes = record_notes(app)
        await ready(pilot, app)
        await pilot.press("p")  # even while paused
        feed.emit("alarm", "s000005", alarm="unauthorized", code=403, reason="Forbidden")
        feed.emit("alarm", "s000006", alarm="push-rejected", push_id="p1", outcome="rejected-permanent", code=410,
                  reason="Unregistered")
        feed.emit("alarm", None, alarm="cluster-split", reason="node b unreachable")  # a newer core's alarm
        await until(pilot, lambda: len(notes) == 3)
        assert [n.title for n in notes] == ["Registrar refuses credentials", "Push rejected", "Alarm: cluster-split"]
        assert all(n.severity == "error" for n in notes)
        assert "frank00005" in notes[0].message and "403" in notes[0].message
        assert "410 Unregistered" in notes[1].message and notes[2].message == "node b unreachable"


async def test_one_toast_per_cause_counts_repeats_for_a_minute_and_covers_no_column() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)

    def rejected(selector: str) -> None:
        feed.emit("alarm", selector, alarm="push-rejected", outcome="rejected-permanent", code=410,
                  reason="Unregistered")

    def toast_lines() -> list[str]:
        return [line for line in screen_text(app).splitlines() if "Push rejected" in line]

    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot, app)
        for _ in range(3):
            rejected("s000006")  # a dead token, call after call
        rejected("s000007")
        await until(pilot, lambda: len(app._pending) == 4)
        await pilot.pause()
        lines = toast_lines()
        assert len(lines) == 2 and "×3" in lines[0] and "×" not in lines[1]
        table, toasts = app.screen.query_one("#instances"), app.screen.query_one("#toasts")
        assert table.region.bottom <= toasts.region.y  # the table gives up lines; no column is covered

        feed.now += 61  # a minute later the same cause is news again
        rejected("s000006")
        await until(pilot, lambda: len(app._pending) == 5)
        await pilot.pause()
        assert len(toast_lines()) == 1 and "×" not in toast_lines()[0]

        await pilot.press("q")  # a dialog is drawn over the toasts, never under them
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and not app.screen.query("#toasts")
        assert "Leave the SIPIS console?" in screen_text(app)


async def test_one_toast_per_raised_alarm_and_pbx_down_in_the_strip() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 30)) as pilot:
        notes = record_notes(app)
        await ready(pilot, app)
        feed.pbx_reachable = False
        feed.emit("alarm", alarm="pbx-down", state="raised", target="udp:192.0.2.10:5060", id="pbx-down-1",
                  reason="408 Request Timeout")
        feed.emit("alarm", alarm="pbx-down", state="cleared", target="udp:192.0.2.10:5060", id="pbx-down-1")
        await until(pilot, lambda: len(app._pending) == 2)
        await app.refresh_now()
        await app.refresh_now()
        await pilot.pause()
        assert [n.title for n in notes] == ["PBX down"]
        assert "udp:192.0.2.10:5060" in notes[0].message
        assert "DOWN" in strip_text(app) and "alarms 1" in strip_text(app)


async def test_pause_freezes_the_view() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        before = screen_text(app)
        await pilot.press("p")
        await pilot.pause()
        assert app.paused and "PAUSED" in strip_text(app)
        selector = table(app).rows[0].selector
        feed.emit("instance.state", selector, state="off", previous="proxied")
        await until(pilot, lambda: len(app._pending) == 1)
        feed.now += 15
        app.tick()
        await app.refresh_now()
        await pilot.pause()
        assert table(app).rows[0].state == "proxied"
        assert screen_text(app).replace(" PAUSED ", "        ") == before.replace(" PAUSED ", "        ")
        await pilot.press("p")
        await until(pilot, lambda: table(app).rows[0].state == "off")
        assert not app.paused and "PAUSED" not in strip_text(app)
        assert "     15s     45s" in screen_text(app) or table(app).rows[0].next_refresh_at is not None


async def test_help_lists_the_key_map() -> None:
    app = make_console()
    async with app.run_test(size=(100, 60)) as pilot:
        await ready(pilot, app)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app)
        for item in ("Key map", "command palette", "filter as you type", "take over", "export", "pause"):
            assert item in text
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)


async def test_quit_asks_first_and_ctrl_c_is_harmless() -> None:
    app = make_console()
    async with app.run_test() as pilot:
        notes = record_notes(app)
        await ready(pilot, app)
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert app.is_running and not isinstance(app.screen, ConfirmScreen)
        assert any("press q to quit" in n.message for n in notes)
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause()
        assert app.is_running and isinstance(app.screen, DashboardScreen)
        await pilot.press("q", "y")
        await pilot.pause()
    assert app.return_code == 0


async def test_high_contrast_theme_toggles() -> None:
    app = make_console()
    async with app.run_test() as pilot:
        await ready(pilot, app)
        default = app.theme
        await pilot.press("f2")
        assert app.theme == SipisConsole.HIGH_CONTRAST
        await pilot.press("f2")
        assert app.theme == default


async def test_identity_comes_from_whoami_when_not_given() -> None:
    feed = FakeFeed(now=NOW, name="carol", role="viewer")
    app = make_console(feed, name=None, role=None)
    async with app.run_test() as pilot:
        await ready(pilot, app)
        assert (app.operator_name, app.role) == ("carol", "viewer")
        assert "carol" in strip_text(app) and "VIEWER" in strip_text(app)


class BuggyFeed(FakeFeed):
    async def instance(self, selector: str) -> InstanceDetail:
        raise RuntimeError("boom")


async def test_an_unexpected_error_in_a_background_job_is_shown() -> None:
    app = make_console(BuggyFeed(now=NOW))
    async with app.run_test() as pilot:
        notes = record_notes(app)
        await ready(pilot, app)
        await pilot.press("enter")
        await until(pilot, lambda: any(n.title == "Console error" and "boom" in n.message for n in notes))
        assert isinstance(app.screen, InstanceDetailScreen)


class BrokenFeed(FakeFeed):
    async def instances(self) -> list:  # type: ignore[type-arg]
        raise FeedError("connection refused", code="unreachable")


async def test_unreachable_core_is_reported() -> None:
    app = make_console(BrokenFeed(now=NOW))
    async with app.run_test(size=(100, 24)) as pilot:
        notes = record_notes(app)
        await app.ready.wait()
        await pilot.pause()
        app.tick()
        await pilot.pause()
        assert any(n.title == "Core unreachable" for n in notes) or not app.connected
        assert "DISCONNECTED" in strip_text(app)


# ---------------------------------------------------------------------------------------------- size and scale


@pytest.mark.parametrize("size", [(80, 24), (160, 50)])
async def test_every_screen_renders_at(size: tuple[int, int]) -> None:
    app = make_console()
    async with app.run_test(size=size) as pilot:
        await ready(pilot, app)
        assert "Instances  40 of 40" in screen_text(app)
        await pilot.press("enter")
        ladder = app.screen.query_one(Ladder)
        await until(pilot, lambda: ladder.row_count > 0)
        text = screen_text(app)
        assert "REGISTER" in text and "esc Back" in text
        for tab in ("tab", "tab"):
            await pilot.press(tab)
        await pilot.press("escape")
        for key in ("2", "3", "4", "5", "6", "question_mark", "escape", "1"):
            await pilot.press(key)
            await pilot.pause()
            assert screen_text(app).strip()
        assert isinstance(app.screen, DashboardScreen)


async def test_100k_instances_load_and_scroll() -> None:
    feed = FakeFeed(now=NOW, instances=100_000)
    app = make_console(feed)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        tbl = table(app)
        assert tbl.row_count == 100_000
        assert tbl.virtual_size.height == 100_001  # one header line + the rows
        assert "100,000 of 100,000" in info_text(app)
        await pilot.press("end")
        await pilot.pause()
        assert tbl.cursor_row == 99_999
        assert tbl.scroll_offset.y == 100_001 - tbl.scrollable_content_region.height
        await pilot.press("slash", *"oscar09995")
        await pilot.pause()
        assert "1 of 100,000" in info_text(app)
        assert tbl.rows[0].aor == "sip:oscar09995@pbx3.example.net"


class SlowListFeed(FakeFeed):
    """The whole instance list arrives only when the test says so (100k rows take a while)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.release = asyncio.Event()

    async def instances(self) -> list[InstanceRow]:
        """The rows as they were when asked for (like the core's snapshot), delivered on release."""
        self.requests.append(("instances_asked", ()))
        snapshot = await super().instances()
        await self.release.wait()
        return snapshot


async def test_the_first_page_shows_while_the_whole_list_loads() -> None:
    feed = SlowListFeed(now=NOW, instances=450)
    app = make_console(feed)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 200)  # FIRST_PAGE rows, in AOR order
        assert "Instances  450 of 450" in info_text(app) and "loading…" in info_text(app)
        first = min(feed.rows, key=lambda r: r.aor.lower())
        assert table(app).rows[0].selector == first.selector
        asked = [name for name, _ in feed.requests]
        assert asked.index("instance_page") < asked.index("instances_asked")
        await pilot.press("slash", "a")
        await until(pilot, lambda: "… of 450" in info_text(app))  # no count from a partial list
        feed.release.set()
        await app.ready.wait()
        await until(pilot, lambda: "loading…" not in info_text(app))
        expected = sum(1 for r in feed.rows if "a" in f"{r.selector}\0{r.aor}\0{r.user}\0{r.registrar}".lower())
        assert f"Instances  {expected:,} of 450" in info_text(app)


async def test_events_wait_while_the_list_loads_and_apply_to_the_fresh_rows() -> None:
    feed = SlowListFeed(now=NOW, instances=300)
    app = make_console(feed)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 200)
        target = max(feed.rows, key=lambda r: r.aor.lower())  # not on the first page
        feed.emit("instance.state", target.selector, state="off", previous=target.state)
        await until(pilot, lambda: len(app._pending) == 1)
        app.tick()  # the list is still loading: the event must wait, not be lost on a missing row
        await pilot.pause()
        assert len(app._pending) == 1
        feed.release.set()
        await app.ready.wait()
        app.tick()
        await pilot.pause()
        assert app._pending == []
        row = app.model.store.get(target.selector)
        assert row is not None and row.state == "off"


async def test_instance_actions_grey_out_when_the_filter_leaves_no_row_and_come_back() -> None:
    from textual.widgets._footer import FooterKey

    app = make_console()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)

        def take_over_disabled() -> bool:
            keys = [k for k in app.screen.query(FooterKey) if k.action == "act('take-over')"]
            return bool(keys) and keys[0].has_class("-disabled")

        await until(pilot, lambda: not take_over_disabled())
        await pilot.press("slash", "z", "z", "z", "enter")  # enter: back to the (empty) table
        await until(pilot, lambda: "Instances  0 of 40" in info_text(app))
        await until(pilot, take_over_disabled)
        await pilot.press("escape")  # clears the filter: a row is selected again
        await until(pilot, lambda: not take_over_disabled())


async def test_timing_marks_reach_an_observer_in_order() -> None:
    from console import instrumentation

    marks: list[tuple[str, str]] = []
    stop = instrumentation.observe(lambda name, detail: marks.append((name, detail)))
    try:
        app = make_console(SlowListFeed(now=NOW, instances=450))
        async with app.run_test() as pilot:
            await until(pilot, lambda: ("page_loaded", "200") in marks)
            app.feed.release.set()  # type: ignore[attr-defined]
            await app.ready.wait()
            app.tick()
            await pilot.pause()
    finally:
        stop()
    names = [name for name, _ in marks]
    assert names[:7] == ["mounted", "page_start", "page_end", "page_loaded", "fetch_start", "fetch_end", "loaded"]
    assert ("fetch_end", "450") in marks and ("loaded", "450") in marks and "tick" in names
    instrumentation.mark("tick")  # nobody listens any more
    assert marks.count(("tick", "")) == names.count("tick")


async def test_nodes_view_and_the_strip_show_the_cluster() -> None:
    app = make_console()
    feed = app.feed
    assert isinstance(feed, FakeFeed)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        assert "nodes" not in strip_text(app)  # one node: the strip is as it always was
        feed.nodes_up = 2
        feed.node_rows = [NodeRow("sipis-a", "up", 30, 0.3, feed.now - 60),
                          NodeRow("sipis-b", "draining", 10, 4.2, feed.now - 120)]
        await app._poll_summary()
        app.refresh_screen()
        await pilot.pause()
        assert "nodes 2 up" in strip_text(app)
        await pilot.press("8")
        await until(pilot, lambda: "sipis-b" in screen_text(app))
        text = screen_text(app)
        assert "Nodes (1 up of 2)" in text and "draining" in text


async def test_the_event_log_names_each_events_node_once_two_nodes_are_up() -> None:
    feed = FakeFeed(now=NOW)
    app = make_console(feed)
    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("4")
        feed.emit("alarm", None, alarm="pbx-down", state="raised", target="udp:pbx:5060", id="e1")
        await until(pilot, lambda: len(app._pending) == 1)
        app.tick()
        await pilot.pause()
        assert "Node" not in screen_text(app)  # one node: as it always was
        feed.nodes_up = 2
        await app._poll_summary()
        event = feed.emit("alarm", None, alarm="pbx-down", state="raised", target="udp:pbx:5061", id="e2")
        assert isinstance(event, Event)
        event.node = "sipis-b"
        await until(pilot, lambda: len(app._pending) == 1)
        app.tick()
        await pilot.pause()
        text = screen_text(app)
        assert "Node" in text and "sipis-b" in text
