"""The lab PBX's location table and nonce book, driven with explicit times (no sleeping)."""

from __future__ import annotations

import pytest

from lab.pbx import best_response
from lab.pbx_location import ChangeKind, ContactUpdate, LocationTable, NonceBook, OutOfOrder, PbxBinding
from sipis.sip.message import Response

INSTANCE = "<urn:uuid:00000000-0000-4000-8000-0000000000aa>"


def save(table: LocationTable, user: str, *updates: ContactUpdate, call_id: str = "c1", cseq: int = 1,
         now: float = 0.0) -> None:
    table.save(user, updates, call_id=call_id, cseq=cseq, transport="udp", source=("127.0.0.1", 5000), flow=None,
               user_agent="test", now=now)


def test_refresh_keeps_the_binding_and_expiry_removes_it() -> None:
    table = LocationTable()
    events: list[tuple[ChangeKind, str]] = []
    table.listeners.append(lambda kind, binding: events.append((kind, binding.contact)))
    save(table, "alice", ContactUpdate("sip:a@127.0.0.1:5000", 60), now=0.0)
    first = table.lookup("alice", 1.0)[0]
    save(table, "alice", ContactUpdate("sip:a@127.0.0.1:5000", 60), cseq=2, now=30.0)
    [again] = table.lookup("alice", 31.0)
    assert again is first and again.cseq == 2 and again.expires_in(31.0) == 59
    assert table.next_expiry() == 90.0
    assert table.lookup("alice", 89.9) and table.lookup("alice", 90.0) == []
    assert events == [("added", "sip:a@127.0.0.1:5000"), ("refreshed", "sip:a@127.0.0.1:5000"),
                      ("expired", "sip:a@127.0.0.1:5000")]
    assert table.next_expiry() is None and len(table) == 0


def test_instance_and_reg_id_identify_the_binding() -> None:
    table = LocationTable()
    save(table, "bob", ContactUpdate("sip:one@127.0.0.1:5000", 300, INSTANCE, 1), call_id="x")
    old = table.lookup("bob", 0.0)[0]
    save(table, "bob", ContactUpdate("sip:two@127.0.0.1:6000;transport=tcp", 300, INSTANCE, 1), call_id="y")
    [new] = table.lookup("bob", 0.0)
    assert new.contact == "sip:two@127.0.0.1:6000;transport=tcp" and new.id != old.id
    save(table, "bob", ContactUpdate("sip:three@127.0.0.1:7000", 300, INSTANCE, 2), call_id="z")
    assert len(table.lookup("bob", 0.0)) == 2
    # removal by instance + reg-id, whatever the contact URI says
    save(table, "bob", ContactUpdate("sip:other@127.0.0.1:1", 0, INSTANCE, 1), call_id="y", cseq=2)
    assert [b.contact for b in table.lookup("bob", 0.0)] == ["sip:three@127.0.0.1:7000"]


def test_contacts_without_instance_match_by_uri() -> None:
    table = LocationTable()
    save(table, "carol", ContactUpdate("sip:c@127.0.0.1:5000;transport=tcp", 300))
    save(table, "carol", ContactUpdate("sip:c@127.0.0.1:5000", 300), call_id="c2")  # other transport: other one
    save(table, "carol", ContactUpdate("sip:c@127.0.0.1:5000;transport=TCP", 300), call_id="c3")
    assert len(table.lookup("carol", 0.0)) == 2
    assert table.find_contact("sip:c@127.0.0.1:5000;transport=tcp;ob", 0.0) is not None
    assert table.find_contact("sip:c@127.0.0.1:5001", 0.0) is None


def test_out_of_order_cseq_changes_nothing() -> None:
    table = LocationTable()
    save(table, "dave", ContactUpdate("sip:d@127.0.0.1:5000", 300), cseq=5)
    with pytest.raises(OutOfOrder):
        save(table, "dave", ContactUpdate("sip:d@127.0.0.1:5000", 0), ContactUpdate("sip:e@127.0.0.1:1", 300), cseq=5)
    assert [b.contact for b in table.lookup("dave", 0.0)] == ["sip:d@127.0.0.1:5000"]


def test_remove_all_and_contact_header() -> None:
    table = LocationTable()
    save(table, "erin", ContactUpdate("sip:a@127.0.0.1:1", 300, INSTANCE, 1), ContactUpdate("sip:b@127.0.0.1:2", 100))
    binding: PbxBinding = table.lookup("erin", 0.0)[0]
    assert binding.contact_header(0.0) == f'<sip:a@127.0.0.1:1>;expires=300;+sip.instance="{INSTANCE}";reg-id=1'
    assert binding.received is None
    assert table.remove_all("erin") == 2 and table.users(0.0) == []


def test_nonce_book_ages_and_forgets() -> None:
    book = NonceBook(lifetime=10.0, capacity=2)
    first = book.issue(0.0)
    assert book.state(first, 9.9) == "fresh" and book.state(first, 10.0) == "stale"
    assert book.state("never-issued", 0.0) == "unknown"
    book.used(first, 3)
    book.used(first, 1)  # reuse of a lower nc is fine
    assert book.highest_nc[first] == 3
    book.issue(1.0)
    book.issue(2.0)
    assert book.state(first, 3.0) == "unknown" and len(book) == 2  # the oldest made room


def test_best_response_prefers_6xx_then_the_lowest_class() -> None:
    def r(status: int) -> Response:
        return Response(status)

    assert best_response([r(486), r(302), r(503)]).status == 302
    assert best_response([r(486), r(603), r(302)]).status == 603
    assert best_response([r(480), r(486)]).status == 480
    with pytest.raises(ValueError):
        best_response([])
