"""The console's feeds: :class:`OperatorFeed` decodes the client's JSON into the contract's types and
its errors into FeedError; the test fake keeps to the roles; the roles themselves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from console.feed import Feed, FeedError, Forbidden, NotFound, OperatorFeed
from console.roles import ACTIONS, role_allows
from contract.documents import ActionResult, InstanceRow, PushResult
from contract.events import Event, InstanceStateChanged, StreamNotice
from contract.kinds import AppState, StreamNoticeKind

from .fake_feed import FakeFeed


class HTTPError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status
        self.detail = detail


ROW = {"selector": "a", "aor": "sip:a@b", "user": "a", "registrar": "sip:b", "state": "proxied",
       "reg_status": "registered", "last_code": 200, "last_reason": "OK", "expires_at": 5, "next_refresh_at": None,
       "failure_count": None, "backoff_until": None, "push_provider": "fcm", "push_unreachable": False,
       "last_push_outcome": "accepted", "last_push_at": None, "app_last_seen": 1.0}
VIEW = {"selector": "a", "state": "proxied", "aor": "sip:a@b", "username": "a", "auth_username": None,
        "registrar": None, "display_name": None, "instance_id": "urn:x", "reg_id": 1,
        "push": {"provider": "fcm", "app_id": "com.x", "token": "f3…01", "voip_token": None, "unreachable": False},
        "registration": {"status": "registered", "last_code": 200, "last_reason": "OK", "expires_at": 5,
                         "next_refresh_at": None, "failure_count": 0, "backoff_until": None, "flow": None},
        "app_contact": None, "app_last_seen": 1.0, "created_at": 0.5, "disabled": False, "credentials_stored": True}


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
        return {"total": 1, "matched": 1, "counts": {"proxied": 1}, "items": [ROW]}

    async def stream_instances(self, on_rows: Callable[[list[dict[str, Any]]], None], **kwargs: Any) -> dict[str, Any]:
        self._log("stream_instances", **kwargs)
        on_rows([ROW])
        on_rows([{**ROW, "selector": "b"}])
        return {"total": 2, "matched": 2, "counts": {"proxied": 2}}

    async def action(self, selector: str, name: str) -> dict[str, Any]:
        self._log("action", selector, name)
        if name == "disable":
            raise HTTPError(403, "disable needs the admin role")
        if name == "hand-back":
            raise HTTPError(409, "not proxied")
        if name == "take-over":
            return {"instance": VIEW, "row": ROW}
        return {"push": {"push_id": "p9", "selector": selector, "kind": "test", "outcome": "accepted",
                         "provider": "fcm"}}

    async def instance(self, selector: str) -> dict[str, Any]:
        if selector != "a":
            raise HTTPError(404, f"no instance {selector}")
        return {"instance": VIEW, "row": ROW,
                "timeline": [{"seq": 2, "at": 4.0, "kind": "instance.state", "selector": "a",
                              "data": {"state": "proxied", "previous": "inactive"}}],
                "pushes": [{"push_id": "p", "selector": "a", "kind": "call", "provider": "fcm",
                            "stages": {"invite_received": 5.0, "push_sent": 6.0}}],
                "sip": [{"at": 5.0, "direction": "in", "transport": "UDP", "local": "h:1", "remote": "h:2",
                         "first_line": "INVITE sip:a@b SIP/2.0", "cseq": 7, "method": "INVITE"}]}

    async def audit(self, *, limit: int = 200) -> list[dict[str, Any]]:
        return [{"id": "x", "at": 3.0, "operator": "bob", "role": "admin", "action": "disable", "target": "a",
                 "outcome": "ok", "detail": {}}]

    async def pushes(self, *, limit: int = 200, selector: str | None = None) -> list[dict[str, Any]]:
        raise HTTPError(0, "timeout")

    async def calls(self) -> dict[str, Any]:
        return {"held": [{"call_id": "c", "push_id": "p", "selector": "a", "t1_remaining": 10, "t2_remaining": None,
                          "stage": "Alerting-Device", "received_at": 90}], "recent": []}

    async def events(self, since: int | None = None) -> AsyncIterator[dict[str, Any]]:
        self._log("events", since=since)
        yield {"kind": "heartbeat", "at": 0.5, "seq": 2}
        yield {"seq": 3, "at": 1.0, "kind": "instance.state", "selector": "a",
               "data": {"state": "off", "previous": "proxied"}}
        yield {"kind": "gap", "since": 3, "first_available": 9, "at": 2.0}

    async def summary(self) -> dict[str, Any]:
        raise ConnectionRefusedError("no socket")


async def test_operator_feed_decodes_answers_into_the_contract_and_maps_errors() -> None:
    client = FakeClient()
    feed = OperatorFeed(client)  # type: ignore[arg-type]
    assert isinstance(feed, Feed) and isinstance(FakeFeed(), Feed)
    assert (await feed.whoami()).role == "viewer"
    rows = await feed.instances()
    assert [r.selector for r in rows] == ["a", "b"] and isinstance(rows[0], InstanceRow)
    assert rows[0].expires_at == 5.0 and rows[0].failure_count == 0  # null → the type's zero
    assert client.log[0] == ("stream_instances", (), {"offset": 0, "limit": 0, "q": "", "state": "", "sort": "aor",
                                                       "desc": False})
    pushed = await feed.action("a", "test-push")
    assert isinstance(pushed, PushResult) and pushed.push.outcome == "accepted" and pushed.push.selector == "a"
    taken = await feed.action("a", "take-over")
    assert isinstance(taken, ActionResult) and taken.row.state == "proxied" and taken.instance.push.token == "f3…01"
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
    assert detail.pushes[0].stages["push_sent"] == 6.0 and detail.sip[0].cseq == 7
    assert isinstance(detail.timeline[0].payload, InstanceStateChanged)
    assert detail.timeline[0].payload.previous is AppState.INACTIVE
    assert (await feed.audit())[0].action == "disable"
    with pytest.raises(FeedError) as timeout:
        await feed.pushes()
    assert timeout.value.code == "unreachable" and timeout.value.status is None
    with pytest.raises(FeedError) as down:
        await feed.summary()
    assert down.value.code == "unreachable"
    held = (await feed.calls()).held
    assert held[0].t1_remaining == 10.0 and held[0].received_at == 90.0
    items = [e async for e in feed.events(since=2)]  # no heartbeats
    assert [type(e) for e in items] == [Event, StreamNotice]
    assert isinstance(items[0], Event) and items[0].seq == 3 and items[0].kind == "instance.state"
    assert items[1] == StreamNotice(StreamNoticeKind.GAP, 2.0, since=3, first_available=9)


async def test_operator_feed_asks_for_a_first_page() -> None:
    client = FakeClient()
    feed = OperatorFeed(client)  # type: ignore[arg-type]
    page = await feed.instance_page(50)
    assert page.total == 1 and page.items[0].aor == "sip:a@b" and page.counts == {"proxied": 1}
    assert client.log[-1] == ("instances", (), {"offset": 0, "limit": 50, "q": "", "state": "", "sort": "aor",
                                                  "desc": False})
    fake = FakeFeed(instances=30)
    first = await fake.instance_page(5)
    assert first.total == 30 and [r.aor for r in first.items] == sorted((r.aor for r in fake.rows),
                                                                       key=str.lower)[:5]


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


def test_roles() -> None:
    assert role_allows("admin", "admin") and role_allows("admin", "operator")
    assert role_allows("operator", "operator") and not role_allows("operator", "admin")
    assert not role_allows("viewer", "operator") and role_allows("viewer", "viewer")
    assert not role_allows(None, "operator") and not role_allows("bogus", "operator")
    assert ACTIONS["disable"][1] == "admin"
