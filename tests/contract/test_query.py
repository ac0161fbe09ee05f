"""The instance query language: words AND-ed, plain words as substrings of selector/aor/user/
registrar, ``field:value`` words as prefixes of a field's text, all case-insensitive."""

from __future__ import annotations

import pytest

from contract.documents import InstanceRow
from contract.query import haystack, matches, parse_query, refines

ALICE = InstanceRow("SEL:0001", "sip:Alice@pbx2.example.net", "alice", "sip:edge.example.net;transport=tls",
                    state="proxied", reg_status="unauthorized", last_code=403, push_provider="FCM",
                    last_push_outcome="rejected-transient")
BOB = InstanceRow("SEL:0002", "sip:bob@pbx1.example.net", "bob", None, state="active", push_unreachable=True,
                  last_push_outcome="accepted")


def test_parse_query() -> None:
    assert parse_query("  Alice state:PROX  foo:bar state ") == [(None, "alice"), ("state", "prox"),
                                                                  (None, "foo:bar"), (None, "state")]
    assert parse_query("") == []


@pytest.mark.parametrize(("query", "alice", "bob"), [
    ("", True, True),
    ("ALICE", True, False),
    ("pbx", True, True),
    ("edge.example", True, False),  # the registrar
    ("sel:0002", False, True),  # the selector: "sel" is not a field
    ("e@p", True, False),  # inside one field
    ("example.netalice", False, False),  # the end of the aor and the user: two fields
    ("state:prox", True, False),
    ("state:", True, True),
    ("status:unauth", True, False),
    ("reg:idle", False, True),
    ("code:40", True, False),
    ("push:rej", True, False),
    ("push:unreach", False, True),  # a dead token, whatever the last outcome
    ("provider:fcm", True, False),
    ("alice state:active", False, False),
    ("pbx state:act", False, True),
])
def test_matches(query: str, alice: bool, bob: bool) -> None:
    terms = parse_query(query)
    assert (matches(terms, ALICE), matches(terms, BOB)) == (alice, bob)
    assert matches(terms, ALICE, haystack(ALICE)) == alice


def test_a_registrar_that_is_not_set_is_empty() -> None:
    assert haystack(BOB) == "sel:0002\0sip:bob@pbx1.example.net\0bob\0"


def test_refines() -> None:
    assert refines(parse_query("alic"), parse_query("ali"))
    assert refines(parse_query("ali state:prox"), parse_query("ali state:pr"))
    assert refines(parse_query("xalix"), parse_query("ali"))  # contains it: every match of it matches
    assert not refines(parse_query("al"), parse_query("ali"))
    assert not refines(parse_query("state:"), parse_query("state"))
    assert not refines(parse_query("state:off"), parse_query("state:prox"))
    assert not refines(parse_query(""), parse_query("a"))
