"""The contract's JSON codec: every payload and document survives a round trip, wire shapes are
those of docs/operator-api.md, and decoding tolerates what an older or newer peer sends."""

from __future__ import annotations

import json

from contract.codec import decode_event, decode_stream_line, decoder, encode_event, encode_notice, from_json, to_json
from contract.documents import HeldCall, InstanceRow, PushRecord, Summary
from contract.events import (
    PAYLOADS,
    Alarm,
    Event,
    InstancePushChanged,
    InstanceStateChanged,
    RegistrationResult,
    StreamNotice,
    UnknownPayload,
)
from contract.kinds import AlarmKind, AppState, EventKind, StreamNoticeKind


def test_every_event_kind_has_exactly_one_payload_type() -> None:
    assert set(PAYLOADS) == set(EventKind)
    assert all(cls.KIND is kind for kind, cls in PAYLOADS.items())


def test_event_round_trip_through_json_text() -> None:
    event = Event(7, 1700000000.5, "SEL:1", RegistrationResult("registered", 200, "OK", 600, "", 0, 1.0, None))
    line = json.loads(json.dumps(encode_event(event)))
    assert line == {"seq": 7, "at": 1700000000.5, "kind": "registration", "selector": "SEL:1",
                    "data": {"result": "registered", "code": 200, "reason": "OK", "expires": 600, "detail": "",
                             "failure_count": 0, "next_refresh_at": 1.0, "expires_at": None, "duration": None}}
    assert decode_event(line) == event


def test_optional_fields_of_one_of_several_happenings_are_left_out() -> None:
    data = encode_event(Event(1, 0.0, "s", InstancePushChanged(unreachable=True, push_id="p")))["data"]
    assert data == {"unreachable": True, "push_id": "p"}
    state = encode_event(Event(2, 0.0, "s", InstanceStateChanged(AppState.PROXIED, AppState.INACTIVE)))["data"]
    assert state == {"state": "proxied", "previous": "inactive"}


def test_enums_decode_to_members_and_unknown_values_stay_strings() -> None:
    event = decode_event({"seq": 1, "at": 0, "kind": "alarm", "selector": None, "data": {"alarm": "unauthorized"}})
    assert isinstance(event.payload, Alarm) and event.payload.alarm is AlarmKind.UNAUTHORIZED
    newer = decode_event({"seq": 2, "at": 0, "kind": "alarm", "selector": None, "data": {"alarm": "from-the-future"}})
    assert isinstance(newer.payload, Alarm) and newer.payload.alarm == "from-the-future"


def test_unknown_kind_is_kept_raw() -> None:
    event = decode_event({"seq": 3, "at": 1, "kind": "cluster.node", "selector": None, "data": {"node": "b"}})
    assert event.payload == UnknownPayload("cluster.node", {"node": "b"})
    assert event.kind == "cluster.node"
    assert encode_event(event)["data"] == {"node": "b"}


def test_push_event_takes_its_selector_from_the_envelope_when_data_lacks_it() -> None:
    event = decode_event({"seq": 4, "at": 1, "kind": "push", "selector": "S",
                          "data": {"push_id": "p", "kind": "call", "provider": "fcm", "outcome": "accepted"}})
    assert isinstance(event.payload, PushRecord)
    assert (event.payload.selector, event.payload.outcome, event.payload.stages) == ("S", "accepted", {})


def test_missing_and_extra_fields() -> None:
    row = from_json(InstanceRow, {"selector": "s", "aor": "sip:a@b", "new_field": 1, "failure_count": None})
    assert row == InstanceRow("s", "sip:a@b")
    call = from_json(HeldCall, {"call_id": "c", "push_id": "p", "selector": "s", "received_at": 5})
    assert call.received_at == 5.0 and isinstance(call.received_at, float)


def test_nested_documents() -> None:
    summary = {"node": "n", "version": "1", "started_at": 1.0, "now": 2.0, "counts": {"active": 1},
               "reg_status": {}, "held_calls": 0, "calls_per_min": 0, "outcomes": {},
               "push": {"accepted": 1, "rejected": 0, "transient": 0, "success_rate": 1.0,
                        "latency_p50_ms": 3.0, "latency_p99_ms": 4.0},
               "pbx": {"reachable": True, "last_error": None, "up": 1, "degraded": 0, "down": 0, "unknown": 0},
               "writer": {"pending": 0, "last_error": None},
               "alarms": 0, "nodes_up": 2}
    decoded = from_json(Summary, summary)
    assert decoded.push.latency_p99_ms == 4.0 and decoded.pbx.reachable is True
    assert to_json(decoded) == summary


def test_stream_notices() -> None:
    gap = StreamNotice(StreamNoticeKind.GAP, 5.0, since=3, first_available=None)
    line = encode_notice(gap)
    assert line == {"kind": "gap", "at": 5.0, "since": 3, "first_available": None}
    assert decode_stream_line(line) == gap
    heartbeat = decode_stream_line({"kind": "heartbeat", "at": 1.0, "seq": 9})
    assert heartbeat == StreamNotice(StreamNoticeKind.HEARTBEAT, 1.0, seq=9)


def test_repeated_row_values_are_decoded_into_one_shared_string() -> None:
    first, second = (from_json(InstanceRow, json.loads(json.dumps(
        {"selector": s, "aor": f"sip:{s}@pbx", "registrar": "sip:pbx;transport=tls", "state": "proxied",
         "reg_status": "registered", "last_reason": "OK", "push_provider": "fcm", "last_push_outcome": "accepted"})))
        for s in ("a", "b"))
    for name in InstanceRow.SHARED:
        assert getattr(first, name) is getattr(second, name), name
    assert first.aor is not second.aor


def test_the_compiled_decoder_is_what_from_json_runs() -> None:
    decode = decoder(InstanceRow)
    data = {"selector": "s", "aor": "sip:a@b", "last_code": 200, "expires_at": 5, "push_unreachable": 1}
    assert decode(data) == from_json(InstanceRow, data) == InstanceRow("s", "sip:a@b", last_code=200, expires_at=5.0,
                                                                      push_unreachable=True)
    assert decoder(InstanceRow) is decode


def test_the_compiled_encoder_writes_plain_values() -> None:
    row = InstanceRow("s", "sip:a@b", state=AppState.PROXIED, last_code=200)  # an enum member in a str field
    encoded = to_json(row)
    assert encoded["state"] == "proxied" and type(encoded["state"]) is str and encoded["last_code"] == 200
    assert from_json(InstanceRow, encoded) == InstanceRow("s", "sip:a@b", state="proxied", last_code=200)
    held = to_json(HeldCall("c", "p", "s", t1_remaining=3.0))
    assert held["t1_remaining"] == 3.0 and held["outcome"] is None
