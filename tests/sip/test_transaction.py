"""RFC 3261 §17 transactions driven by a fake clock: exact timer values, matching, ACK/CANCEL building."""

from __future__ import annotations

from typing import Any

import pytest

from sipis.clock import FakeClock
from sipis.sip.message import Request, Response, make_response, new_branch, parse_message
from sipis.sip.transaction import (
    Action,
    ClientInviteTransaction,
    ClientKey,
    ClientNonInviteTransaction,
    LegacyServerKey,
    PassRequest,
    PassResponse,
    ServerInviteTransaction,
    ServerKey,
    ServerNonInviteTransaction,
    State,
    Terminate,
    Timer,
    TimerSettings,
    TransactionFailed,
    TransactionTable,
    Transmit,
    build_ack,
    build_cancel,
    synthetic_response,
)
from sipis.sip.transaction import Transaction as Tx

# Cumulative retransmission times for T1=0.5, T2=4 over 64*T1: doubling capped at T2 (E, G) ...
CAPPED = [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
# ... and uncapped doubling (Timer A).
DOUBLING = [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]


def request(method: str = "OPTIONS", *, branch: str | None = "z9hG4bKabc", transport: str = "UDP",
            sent_by: str = "10.0.0.1:5060", to_tag: str | None = None, cseq: int = 1,
            call_id: str = "call-1", uri: str = "sip:bob@example.com", extra: str = "") -> Request:
    via = f"SIP/2.0/{transport} {sent_by}" + (f";branch={branch}" if branch else "")
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    text = (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Via: SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bKlower\r\n"
        "Max-Forwards: 69\r\n"
        "From: <sip:alice@example.com>;tag=from1\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


def invite(**kwargs: Any) -> Request:
    return request("INVITE", **kwargs)


def reply(req: Request, status: int, tag: str | None = "uas1") -> Response:
    return make_response(req, status, to_tag=tag)


def fire_until(tx: Tx, clock: FakeClock, until: float) -> list[tuple[float, Action]]:
    """Step the clock deadline by deadline up to ``until`` (relative to ``start``) and fire each."""
    out: list[tuple[float, Action]] = []
    while (deadline := tx.next_deadline) is not None and deadline <= until:
        clock.advance(deadline - clock.monotonic())
        out += [(clock.monotonic(), action) for action in tx.on_timer(clock.monotonic())]
    return out


def state(tx: Tx) -> State:
    """Read the state afresh (mypy would keep an earlier ``assert tx.state is ...`` narrowing)."""
    return tx.state


def times_of(events: list[tuple[float, Action]], kind: type, start: float) -> list[float]:
    return [t - start for t, action in events if isinstance(action, kind)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --------------------------------------------------------------------------- client non-INVITE


def test_non_invite_udp_retransmits_capped_at_t2_then_timer_f_gives_408(clock: FakeClock) -> None:
    req = request()
    tx = ClientNonInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    assert tx.start(t0) == [Transmit(req)]
    assert state(tx) is State.TRYING
    events = fire_until(tx, clock, t0 + 100)
    assert times_of(events, Transmit, t0) == CAPPED
    assert all(action == Transmit(req) for _, action in events if isinstance(action, Transmit))
    failed = [(t - t0, a) for t, a in events if isinstance(a, TransactionFailed)]
    assert len(failed) == 1
    when, failure = failed[0]
    assert when == 32.0
    assert failure.status == 408
    assert failure.response is not None and failure.response.status == 408
    assert isinstance(events[-1][1], Terminate)
    assert state(tx) is State.TERMINATED and tx.next_deadline is None


def test_non_invite_final_response_stops_retransmission_and_timer_k_lasts_t4(clock: FakeClock) -> None:
    req = request()
    tx = ClientNonInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    tx.start(t0)
    fire_until(tx, clock, t0 + 2)  # retransmits at 0.5 and 1.5
    clock.advance(0.25)
    ok = reply(req, 200)
    assert tx.on_response(ok, clock.monotonic()) == [PassResponse(ok)]
    assert state(tx) is State.COMPLETED
    assert tx.armed_timers == {Timer.K: clock.monotonic() + 5.0}
    assert tx.on_response(ok, clock.monotonic()) == []  # retransmitted final absorbed
    events = fire_until(tx, clock, t0 + 100)
    assert [action for _, action in events] == [Terminate()]
    assert events[0][0] - t0 == 1.75 + 5.0


def test_non_invite_tcp_never_retransmits_and_terminates_on_final(clock: FakeClock) -> None:
    req = request(transport="TCP")
    tx = ClientNonInviteTransaction(req, reliable=True)
    t0 = clock.monotonic()
    tx.start(t0)
    assert tx.armed_timers == {Timer.F: t0 + 32.0}
    ok = reply(req, 200)
    assert tx.on_response(ok, t0 + 1) == [PassResponse(ok), Terminate()]  # Timer K = 0


def test_non_invite_tcp_timer_f(clock: FakeClock) -> None:
    tx = ClientNonInviteTransaction(request(transport="TCP"), reliable=True)
    t0 = clock.monotonic()
    tx.start(t0)
    events = fire_until(tx, clock, t0 + 100)
    assert times_of(events, Transmit, t0) == []
    assert times_of(events, TransactionFailed, t0) == [32.0]


def test_provisional_moves_to_proceeding_and_retransmits_every_t2(clock: FakeClock) -> None:
    req = request()
    tx = ClientNonInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    tx.start(t0)
    fire_until(tx, clock, t0 + 1.0)  # retransmit at 0.5; next E armed at 1.5
    trying = reply(req, 100, tag=None)
    assert tx.on_response(trying, t0 + 1.0) == [PassResponse(trying)]
    assert state(tx) is State.PROCEEDING
    events = fire_until(tx, clock, t0 + 14)
    assert times_of(events, Transmit, t0) == [1.5, 5.5, 9.5, 13.5]
    ringing = reply(req, 180)
    assert tx.on_response(ringing, clock.monotonic()) == [PassResponse(ringing)]  # more 1xx still go up


def test_timer_f_still_runs_in_proceeding(clock: FakeClock) -> None:
    req = request()
    tx = ClientNonInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    tx.start(t0)
    tx.on_response(reply(req, 100, tag=None), t0 + 0.1)
    events = fire_until(tx, clock, t0 + 100)
    assert times_of(events, TransactionFailed, t0) == [32.0]


def test_client_transport_error_gives_503_with_synthetic_response(clock: FakeClock) -> None:
    req = request()
    tx = ClientNonInviteTransaction(req, reliable=False)
    tx.start(clock.monotonic())
    actions = tx.on_transport_error(clock.monotonic())
    assert len(actions) == 2 and actions[1] == Terminate()
    failed = actions[0]
    assert isinstance(failed, TransactionFailed) and failed.status == 503
    resp = failed.response
    assert resp is not None and resp.status == 503
    assert resp.headers.raw_values("Via") == req.headers.raw_values("Via")
    for name in ("From", "To", "Call-ID", "CSeq"):
        assert resp.headers.get(name) == req.headers.get(name)
    assert state(tx) is State.TERMINATED
    assert tx.on_transport_error(clock.monotonic()) == []
    assert tx.on_timer(clock.monotonic() + 100) == []


def test_start_twice_is_a_bug(clock: FakeClock) -> None:
    tx = ClientNonInviteTransaction(request(), reliable=False)
    tx.start(clock.monotonic())
    with pytest.raises(RuntimeError):
        tx.start(clock.monotonic())


def test_client_request_needs_a_branch() -> None:
    with pytest.raises(ValueError):
        ClientNonInviteTransaction(request(branch=None), reliable=False)


def test_custom_t1_scales_timeouts(clock: FakeClock) -> None:
    tx = ClientNonInviteTransaction(request(), reliable=False, timers=TimerSettings(t1=0.1, t2=0.4))
    t0 = clock.monotonic()
    tx.start(t0)
    events = fire_until(tx, clock, t0 + 100)
    assert times_of(events, Transmit, t0)[:5] == pytest.approx([0.1, 0.3, 0.7, 1.1, 1.5])
    assert times_of(events, TransactionFailed, t0) == pytest.approx([6.4])


def test_timer_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        TimerSettings(t1=0)
    with pytest.raises(ValueError):
        TimerSettings(t1=1.0, t2=0.5)


# --------------------------------------------------------------------------- client INVITE


def test_invite_udp_timer_a_doubles_without_cap_then_timer_b(clock: FakeClock) -> None:
    req = invite()
    tx = ClientInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    assert tx.start(t0) == [Transmit(req)]
    assert state(tx) is State.CALLING
    events = fire_until(tx, clock, t0 + 100)
    assert times_of(events, Transmit, t0) == DOUBLING
    assert times_of(events, TransactionFailed, t0) == [32.0]
    failure = next(a for _, a in events if isinstance(a, TransactionFailed))
    assert failure.status == 408 and failure.response is not None
    assert failure.response.cseq == (1, "INVITE")
    assert events[-1][1] == Terminate()


def test_invite_tcp_has_only_timer_b(clock: FakeClock) -> None:
    tx = ClientInviteTransaction(invite(transport="TCP"), reliable=True)
    t0 = clock.monotonic()
    tx.start(t0)
    assert tx.armed_timers == {Timer.B: t0 + 32.0}


def test_invite_provisional_stops_retransmission_and_timer_b(clock: FakeClock) -> None:
    req = invite()
    tx = ClientInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    tx.start(t0)
    fire_until(tx, clock, t0 + 0.5)
    ringing = reply(req, 180)
    assert tx.on_response(ringing, t0 + 0.7) == [PassResponse(ringing)]
    assert state(tx) is State.PROCEEDING
    assert tx.next_deadline is None  # the TU bounds ringing (CANCEL), as in RFC 3261 figure 5


def test_invite_487_gets_ack_built_by_the_transaction(clock: FakeClock) -> None:
    req = invite(extra="Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\nRoute: <sip:p3;lr>\r\n")
    tx = ClientInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    tx.start(t0)
    tx.on_response(reply(req, 180), t0 + 0.2)
    terminated = reply(req, 487)
    actions = tx.on_response(terminated, t0 + 1)
    assert len(actions) == 2
    transmit, passed = actions
    assert isinstance(transmit, Transmit) and passed == PassResponse(terminated)
    ack = transmit.message
    assert isinstance(ack, Request) and ack is tx.ack
    assert ack.method == "ACK" and ack.uri == req.uri
    assert ack.headers.raw_values("Via") == ["SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc"]
    assert ack.branch == req.branch
    assert ack.headers.get("To") == terminated.headers.get("To")
    assert ack.to.tag == "uas1"
    assert ack.headers.get("From") == req.headers.get("From")
    assert ack.call_id == req.call_id
    assert ack.cseq == (1, "ACK")
    assert ack.headers.raw_values("Route") == req.headers.raw_values("Route")
    assert ack.headers.get("Max-Forwards") == "69"
    assert ack.body == b""
    assert state(tx) is State.COMPLETED
    assert tx.armed_timers == {Timer.D: t0 + 1 + 32.0}
    # a retransmitted 487 means our ACK was lost: re-send it, don't bother the TU
    assert tx.on_response(terminated, t0 + 2) == [Transmit(ack)]
    assert tx.on_response(reply(req, 180), t0 + 2) == []
    events = fire_until(tx, clock, t0 + 100)
    assert [(t - t0, a) for t, a in events] == [(33.0, Terminate())]


def test_invite_final_error_in_calling_over_tcp_terminates_at_once(clock: FakeClock) -> None:
    req = invite(transport="TCP")
    tx = ClientInviteTransaction(req, reliable=True)
    tx.start(clock.monotonic())
    busy = reply(req, 486)
    actions = tx.on_response(busy, clock.monotonic())
    assert [type(a) for a in actions] == [Transmit, PassResponse, Terminate]
    assert state(tx) is State.TERMINATED


def test_invite_2xx_passes_up_and_lingers_accepted_for_timer_m(clock: FakeClock) -> None:
    req = invite()
    tx = ClientInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    tx.start(t0)
    ok = reply(req, 200)
    assert tx.on_response(ok, t0 + 1) == [PassResponse(ok)]  # no ACK: the dialog sends it
    assert state(tx) is State.ACCEPTED
    assert tx.armed_timers == {Timer.M: t0 + 1 + 32.0}
    fork = reply(req, 200, tag="uas2")
    assert tx.on_response(fork, t0 + 2) == [PassResponse(fork)]
    assert tx.on_response(reply(req, 486), t0 + 2) == []
    events = fire_until(tx, clock, t0 + 100)
    assert [(t - t0, a) for t, a in events] == [(33.0, Terminate())]


def test_invite_transport_error_after_final_only_terminates(clock: FakeClock) -> None:
    req = invite()
    tx = ClientInviteTransaction(req, reliable=False)
    tx.start(clock.monotonic())
    tx.on_response(reply(req, 404), clock.monotonic())
    assert tx.on_transport_error(clock.monotonic()) == [Terminate()]


def test_invite_transport_error_while_calling_gives_503(clock: FakeClock) -> None:
    tx = ClientInviteTransaction(invite(), reliable=False)
    tx.start(clock.monotonic())
    actions = tx.on_transport_error(clock.monotonic())
    assert isinstance(actions[0], TransactionFailed) and actions[0].status == 503
    assert actions[1:] == [Terminate()]


# --------------------------------------------------------------------------- server INVITE


def test_server_invite_sends_100_at_once_and_repeats_the_last_response(clock: FakeClock) -> None:
    req = invite(extra="Timestamp: 54\r\n")
    tx = ServerInviteTransaction(req, reliable=False)
    now = clock.monotonic()
    [first] = tx.start(now)
    assert isinstance(first, Transmit) and isinstance(first.message, Response)
    trying = first.message
    assert trying.status == 100 and trying.to.tag is None
    assert trying.headers.raw_values("Via") == req.headers.raw_values("Via")
    assert trying.cseq == (1, "INVITE") and trying.headers.get("Timestamp") == "54"
    assert state(tx) is State.PROCEEDING and tx.next_deadline is None
    assert tx.on_request(req, now) == [Transmit(trying)]
    ringing = reply(req, 180)
    assert tx.respond(ringing, now) == [Transmit(ringing)]
    assert tx.on_request(req, now) == [Transmit(ringing)]
    busy = reply(req, 486)
    assert tx.respond(busy, now) == [Transmit(busy)]
    assert state(tx) is State.COMPLETED
    assert tx.on_request(req, now) == [Transmit(busy)]
    assert tx.respond(reply(req, 500), now) == []  # a second final is discarded


def test_server_invite_timer_g_resends_final_then_timer_h_reports_no_ack(clock: FakeClock) -> None:
    req = invite()
    tx = ServerInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    tx.start(t0)
    busy = reply(req, 486)
    tx.respond(busy, t0)
    events = fire_until(tx, clock, t0 + 100)
    assert times_of(events, Transmit, t0) == CAPPED
    assert all(a == Transmit(busy) for _, a in events if isinstance(a, Transmit))
    assert times_of(events, TransactionFailed, t0) == [32.0]
    failure = next(a for _, a in events if isinstance(a, TransactionFailed))
    assert failure.status == 408 and "ACK" in failure.reason and failure.response is None
    assert events[-1][1] == Terminate() and state(tx) is State.TERMINATED


def test_server_invite_ack_stops_timer_g_is_absorbed_and_timer_i_lasts_t4(clock: FakeClock) -> None:
    req = invite()
    tx = ServerInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    tx.start(t0)
    busy = reply(req, 486)
    tx.respond(busy, t0)
    fire_until(tx, clock, t0 + 2)  # G at 0.5, 1.5
    ack = build_ack(req, busy)
    assert tx.on_request(ack, t0 + 2) == []  # absorbed, not passed to the TU
    assert state(tx) is State.CONFIRMED
    assert tx.armed_timers == {Timer.I: t0 + 2 + 5.0}
    assert tx.on_request(ack, t0 + 3) == []
    assert tx.on_request(req, t0 + 3) == []  # INVITE retransmissions absorbed too
    events = fire_until(tx, clock, t0 + 100)
    assert [(t - t0, a) for t, a in events] == [(7.0, Terminate())]


def test_server_invite_tcp_never_resends_but_still_waits_for_ack(clock: FakeClock) -> None:
    req = invite(transport="TCP")
    tx = ServerInviteTransaction(req, reliable=True)
    t0 = clock.monotonic()
    tx.start(t0)
    busy = reply(req, 486)
    tx.respond(busy, t0)
    assert tx.armed_timers == {Timer.H: t0 + 32.0}
    assert tx.on_request(build_ack(req, busy), t0 + 1) == [Terminate()]  # Timer I = 0


def test_server_invite_tcp_timer_h(clock: FakeClock) -> None:
    req = invite(transport="TCP")
    tx = ServerInviteTransaction(req, reliable=True)
    t0 = clock.monotonic()
    tx.start(t0)
    tx.respond(reply(req, 480), t0)
    events = fire_until(tx, clock, t0 + 100)
    assert times_of(events, Transmit, t0) == []
    assert times_of(events, TransactionFailed, t0) == [32.0]


def test_server_invite_2xx_is_accepted_per_rfc_6026(clock: FakeClock) -> None:
    req = invite()
    tx = ServerInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    tx.start(t0)
    ok = reply(req, 200)
    assert tx.respond(ok, t0) == [Transmit(ok)]
    assert state(tx) is State.ACCEPTED
    assert tx.armed_timers == {Timer.L: t0 + 32.0}
    assert tx.on_request(req, t0 + 1) == []  # retransmitted INVITE absorbed, not a new request
    assert tx.respond(ok, t0 + 1) == [Transmit(ok)]  # the TU retransmits its 2xx itself
    assert tx.respond(reply(req, 486), t0 + 1) == []
    ack = request("ACK", cseq=1, to_tag="uas1")
    assert tx.on_request(ack, t0 + 2) == [PassRequest(ack)]
    events = fire_until(tx, clock, t0 + 100)
    assert [(t - t0, a) for t, a in events] == [(32.0, Terminate())]


def test_server_transport_error_terminates(clock: FakeClock) -> None:
    tx = ServerInviteTransaction(invite(), reliable=False)
    tx.start(clock.monotonic())
    actions = tx.on_transport_error(clock.monotonic())
    assert actions == [TransactionFailed(503, "transport error"), Terminate()]
    assert tx.on_transport_error(clock.monotonic()) == []


# --------------------------------------------------------------------------- server non-INVITE


def test_server_non_invite_absorbs_in_trying_and_repeats_final_until_timer_j(clock: FakeClock) -> None:
    req = request("REGISTER")
    tx = ServerNonInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    assert tx.start(t0) == []
    assert tx.on_request(req, t0) == []  # Trying: nothing to repeat yet
    ok = reply(req, 200)
    assert tx.respond(ok, t0 + 1) == [Transmit(ok)]
    assert state(tx) is State.COMPLETED
    assert tx.on_request(req, t0 + 2) == [Transmit(ok)]
    assert tx.respond(reply(req, 500), t0 + 2) == []
    events = fire_until(tx, clock, t0 + 100)
    assert [(t - t0, a) for t, a in events] == [(33.0, Terminate())]


def test_server_non_invite_proceeding_repeats_provisional(clock: FakeClock) -> None:
    req = request()
    tx = ServerNonInviteTransaction(req, reliable=False)
    trying = reply(req, 100, tag=None)
    assert tx.respond(trying, clock.monotonic()) == [Transmit(trying)]
    assert state(tx) is State.PROCEEDING
    assert tx.on_request(req, clock.monotonic()) == [Transmit(trying)]


def test_server_non_invite_tcp_terminates_on_final(clock: FakeClock) -> None:
    req = request(transport="TCP")
    tx = ServerNonInviteTransaction(req, reliable=True)
    ok = reply(req, 200)
    assert tx.respond(ok, clock.monotonic()) == [Transmit(ok), Terminate()]  # Timer J = 0


# --------------------------------------------------------------------------- matching


def test_client_matching_by_branch_and_cseq_method(clock: FakeClock) -> None:
    table = TransactionTable()
    inv = invite(branch="z9hG4bKinv")
    inv_tx = ClientInviteTransaction(inv, reliable=False)
    table.start(inv_tx, clock.monotonic())
    assert inv_tx.key == ClientKey("z9hG4bKinv", "INVITE")
    assert table.match_response(reply(inv, 180)) is inv_tx
    cancel = build_cancel(inv)
    assert table.match_response(reply(cancel, 200)) is None  # same branch, other method
    cancel_tx = ClientNonInviteTransaction(cancel, reliable=False)
    table.start(cancel_tx, clock.monotonic())
    assert table.match_response(reply(cancel, 200)) is cancel_tx
    assert table.match_response(reply(inv, 487)) is inv_tx
    assert table.match_response(reply(invite(branch="z9hG4bKother"), 200)) is None
    assert table.match_response(reply(invite(branch=None), 200)) is None
    assert len(table) == 2 and set(table) == {inv_tx, cancel_tx}


def test_server_matching_by_branch_sent_by_and_method(clock: FakeClock) -> None:
    table = TransactionTable()
    inv = invite(branch="z9hG4bKsrv")
    tx = ServerInviteTransaction(inv, reliable=False)
    table.start(tx, clock.monotonic())
    assert tx.key == ServerKey("z9hG4bKsrv", "10.0.0.1:5060", "INVITE")
    assert table.match_request(invite(branch="z9hG4bKsrv")) is tx
    assert table.match_request(invite(branch="z9hG4bKsrv", sent_by="10.0.0.2:5060")) is None
    assert table.match_request(invite(branch="z9hG4bKnew")) is None
    # the ACK for a non-2xx carries the INVITE's branch and belongs to its transaction
    busy = reply(inv, 486)
    table.update(tx, tx.respond(busy, clock.monotonic()))
    assert table.match_request(build_ack(inv, busy)) is tx
    # CANCEL shares the branch but is a transaction of its own; it points at the INVITE
    cancel = build_cancel(inv)
    assert table.match_request(cancel) is None
    assert table.find_cancel_target(cancel) is tx
    cancel_tx = ServerNonInviteTransaction(cancel, reliable=False)
    table.start(cancel_tx, clock.monotonic())
    assert table.match_request(cancel) is cancel_tx
    assert table.match_request(build_ack(inv, busy)) is tx


def test_cancel_target_must_be_an_invite(clock: FakeClock) -> None:
    table = TransactionTable()
    options = request("OPTIONS", branch="z9hG4bKopt")
    table.start(ServerNonInviteTransaction(options, reliable=False), clock.monotonic())
    cancel = request("CANCEL", branch="z9hG4bKopt")
    assert table.find_cancel_target(cancel) is None
    assert table.find_cancel_target(request("CANCEL", branch="z9hG4bKnothing")) is None


def test_ack_to_2xx_with_new_branch_matches_nothing(clock: FakeClock) -> None:
    table = TransactionTable()
    inv = invite(branch="z9hG4bKa")
    table.start(ServerInviteTransaction(inv, reliable=False), clock.monotonic())
    assert table.match_request(request("ACK", branch=new_branch(), to_tag="uas1")) is None


def test_pre_3261_requests_match_on_the_legacy_fields(clock: FakeClock) -> None:
    table = TransactionTable()
    inv = invite(branch=None)
    tx = ServerInviteTransaction(inv, reliable=False)
    table.start(tx, clock.monotonic())
    assert isinstance(tx.key, LegacyServerKey)
    assert table.match_request(invite(branch=None)) is tx
    assert table.match_request(invite(branch=None, call_id="other")) is None
    assert table.match_request(invite(branch=None, cseq=2)) is None
    assert table.match_request(invite(branch=None, to_tag="x")) is None
    assert table.match_request(invite(branch=None, sent_by="10.0.0.7")) is None
    # ACK: matches only once a final was sent, and only with that response's To tag
    assert table.match_request(request("ACK", branch=None, to_tag="uas1")) is None
    table.update(tx, tx.respond(reply(inv, 486, tag="uas1"), clock.monotonic()))
    assert table.match_request(request("ACK", branch=None, to_tag="uas1")) is tx
    assert table.match_request(request("ACK", branch=None, to_tag="wrong")) is None
    assert table.find_cancel_target(request("CANCEL", branch=None)) is tx
    assert table.find_cancel_target(request("CANCEL", branch=None, to_tag="x")) is None


def test_pre_3261_non_invite_and_old_style_branch(clock: FakeClock) -> None:
    table = TransactionTable()
    reg = request("REGISTER", branch="oldstyle1")  # a branch without the magic cookie
    tx = ServerNonInviteTransaction(reg, reliable=False)
    table.start(tx, clock.monotonic())
    assert isinstance(tx.key, LegacyServerKey) and tx.key.method == "REGISTER"
    assert table.match_request(request("REGISTER", branch="oldstyle1")) is tx
    assert table.match_request(request("REGISTER", branch="oldstyle2")) is None
    assert table.match_request(request("OPTIONS", branch="oldstyle1")) is None


def test_duplicate_key_is_refused(clock: FakeClock) -> None:
    table = TransactionTable()
    table.add(ServerNonInviteTransaction(request(), reliable=False))
    with pytest.raises(ValueError):
        table.add(ServerNonInviteTransaction(request(), reliable=False))


# --------------------------------------------------------------------------- table timers


def test_table_fires_due_transactions_and_drops_terminated_ones(clock: FakeClock) -> None:
    table = TransactionTable()
    t0 = clock.monotonic()
    udp = ClientNonInviteTransaction(request(branch="z9hG4bK1"), reliable=False)
    tcp = ClientNonInviteTransaction(request(branch="z9hG4bK2", transport="TCP"), reliable=True)
    table.start(udp, t0)
    table.start(tcp, t0)
    assert table.next_deadline() == t0 + 0.5
    [(fired, actions)] = table.on_timer(t0 + 0.5)
    assert fired is udp and actions == [Transmit(udp.request)]
    assert table.next_deadline() == t0 + 1.5
    # the final response disarms E: its stale heap entry must never fire
    ok = reply(udp.request, 200)
    table.update(udp, udp.on_response(ok, t0 + 1))
    # in Completed it only absorbs retransmissions until Timer K: the table keeps just its key
    assert udp not in table and table.pending == 2 and table.absorbs(ok, t0 + 1)
    assert table.next_deadline() == t0 + 6.0  # Timer K
    assert table.on_timer(t0 + 1.5) == []
    assert table.on_timer(t0 + 6.0) == []  # Timer K ended: it is forgotten without a word
    assert not table.absorbs(ok, t0 + 6.0) and table.match_response(ok) is None
    assert table.contains(tcp) and len(table) == 1 and table.pending == 1
    [(fired, actions)] = table.on_timer(t0 + 40)
    assert fired is tcp and actions[-1] == Terminate()
    assert len(table) == 0 and table.next_deadline() is None


def test_table_rearms_after_the_tu_responds(clock: FakeClock) -> None:
    table = TransactionTable()
    req = invite()
    tx = ServerInviteTransaction(req, reliable=False)
    t0 = clock.monotonic()
    [trying] = table.start(tx, t0)
    assert isinstance(trying, Transmit)
    assert table.next_deadline() is None
    table.update(tx, tx.respond(reply(req, 486), t0 + 1))
    assert table.next_deadline() == t0 + 1.5  # Timer G
    assert table.update(tx, tx.on_transport_error(t0 + 1))[-1] == Terminate()
    assert tx not in table and table.next_deadline() is None


def test_table_on_timer_handles_a_late_wakeup(clock: FakeClock) -> None:
    table = TransactionTable()
    tx = ClientNonInviteTransaction(request(), reliable=False)
    t0 = clock.monotonic()
    table.start(tx, t0)
    [(_, actions)] = table.on_timer(t0 + 40)  # E then F were due: one retransmit, then give up
    assert [type(a) for a in actions] == [Transmit, TransactionFailed, Terminate]
    assert len(table) == 0


def test_remove_is_idempotent(clock: FakeClock) -> None:
    table = TransactionTable()
    tx = ClientNonInviteTransaction(request(), reliable=False)
    table.start(tx, clock.monotonic())
    table.remove(tx)
    table.remove(tx)
    assert len(table) == 0 and table.next_deadline() is None


# --------------------------------------------------------------------------- builders


def test_build_cancel_follows_rfc_3261_9_1() -> None:
    req = invite(to_tag=None, extra="Route: <sip:p1.example.com;lr>\r\nContent-Type: application/sdp\r\n")
    cancel = build_cancel(req)
    assert cancel.method == "CANCEL" and cancel.uri == req.uri
    assert cancel.headers.raw_values("Via") == ["SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc"]
    for name in ("From", "To", "Call-ID"):
        assert cancel.headers.get(name) == req.headers.get(name)
    assert cancel.cseq == (1, "CANCEL")
    assert cancel.headers.raw_values("Route") == ["<sip:p1.example.com;lr>"]
    assert "Content-Type" not in cancel.headers and cancel.body == b""
    reparsed = parse_message(cancel.to_bytes())
    assert isinstance(reparsed, Request) and reparsed.method == "CANCEL"


def test_builders_refuse_non_invite() -> None:
    with pytest.raises(ValueError):
        build_cancel(request("OPTIONS"))


def test_synthetic_response_copies_the_transaction_headers() -> None:
    req = request()
    resp = synthetic_response(req, 408)
    assert resp.status == 408 and resp.reason == "Request Timeout"
    assert resp.headers.raw_values("Via") == req.headers.raw_values("Via")
    assert resp.cseq == req.cseq and resp.call_id == req.call_id


def test_matching_never_crashes_on_bare_messages() -> None:
    table = TransactionTable()
    bare = Request("OPTIONS", "sip:x@example.com")
    assert table.match_request(bare) is None
    assert table.find_cancel_target(Request("CANCEL", "sip:x@example.com")) is None
    assert table.match_response(Response(200)) is None
