"""The SIP trace recorder: REGISTER and INVITE dialogs filed per instance and per Call-ID, bounds
(per key, number of keys, bytes), masking of Authorization in every export, the text ladder, the
pcap export (parsed back with ``struct``) and the endpoint's observer hook on a real loopback flow."""

from __future__ import annotations

import gc
import ipaddress
import struct

from sipis.clock import FakeClock
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.message import Headers, Message, Request, Response, make_response, new_branch, new_call_id
from sipis.sip.transaction import TimerSettings
from sipis.sip.transport import Flow, ListenSpec
from sipis.trace import MASKED, TracedMessage, TraceRecorder, ip_udp_packet, pcap_bytes

PBX = ("192.0.2.10", 5060)
US = ("192.0.2.1", 5070)
SELECTOR = "AB" * 20 + ":0000CAFE"
USER = "sipis-" + "0" * 31 + "1"
SECRET = 'Digest username="alice", realm="pbx", nonce="n1", uri="sip:pbx", response="deadbeefcafe"'


def flow(transport: str = "udp") -> Flow:
    return Flow(transport, US, PBX, True, lambda data: None, lambda: None)  # type: ignore[arg-type]


def recorder(**bounds: int) -> tuple[TraceRecorder, FakeClock]:
    clock = FakeClock()
    trace = TraceRecorder(clock, selector_of_user={USER: SELECTOR}.get, **bounds)
    return trace, clock


def register(call_id: str = "reg-1", cseq: int = 1, authorization: str | None = None) -> Request:
    headers = Headers([
        ("Via", f"SIP/2.0/UDP {US[0]}:{US[1]};branch={new_branch()};rport"),
        ("From", "<sip:alice@pbx>;tag=f1"), ("To", "<sip:alice@pbx>"), ("Call-ID", call_id),
        ("CSeq", f"{cseq} REGISTER"),
        ("Contact", f'<sip:{USER}@{US[0]}:{US[1]}>;+sip.instance="<urn:uuid:x>";reg-id=1;expires=600'),
    ])
    if authorization:
        headers.add("Authorization", authorization)
    return Request("REGISTER", "sip:pbx", headers)


def invite(call_id: str = "call-1", user: str = USER, method: str = "INVITE") -> Request:
    return Request(method, f"sip:{user}@{US[0]}:{US[1]}", Headers([
        ("Via", f"SIP/2.0/UDP {PBX[0]}:{PBX[1]};branch={new_branch()}"),
        ("From", '"Bob" <sip:bob@pbx>;tag=b1'), ("To", "<sip:alice@pbx>"), ("Call-ID", call_id),
        ("CSeq", f"1 {method}"), ("Proxy-Authorization", SECRET),
    ]))


def test_register_is_filed_under_the_instance_by_contact_user_and_its_responses_by_call_id() -> None:
    trace, clock = recorder()
    request = register()
    trace.observe("out", request, flow())
    clock.advance(0.05)
    trace.observe("in", make_response(request, 401, to_tag="t"), flow())
    trace.observe("out", register(cseq=2, authorization=SECRET), flow())
    trace.observe("in", make_response(register(cseq=2), 200, to_tag="t"), flow())

    assert trace.selector_of_call("reg-1") == SELECTOR
    messages = trace.instance_messages(SELECTOR)
    assert [m.as_dict()["first_line"] for m in messages] == [
        "REGISTER sip:pbx SIP/2.0", "SIP/2.0 401 Unauthorized", "REGISTER sip:pbx SIP/2.0", "SIP/2.0 200 OK"]
    assert "reg-1" not in trace.calls  # REGISTER is housekeeping, not a call ...
    assert len(trace.call_messages("reg-1")) == 4  # ... but its Call-ID still finds it
    first = messages[1].as_dict()
    assert first["direction"] == "in" and first["status"] == 401 and first["method"] == "REGISTER"
    assert first["cseq"] == 1 and first["local"] == "192.0.2.1:5070" and first["remote"] == "192.0.2.10:5060"
    assert first["at"] == messages[0].at + 0.05 and first["selector"] == SELECTOR


def test_authorization_values_are_masked_in_every_export() -> None:
    trace, _ = recorder()
    trace.observe("out", register(authorization=SECRET), flow())
    trace.observe("in", invite(), flow())
    raw = trace.instance_messages(SELECTOR)[0].as_dict()["raw"]
    assert "deadbeefcafe" not in raw and f"Authorization: Digest {MASKED}" in raw
    call_raw = trace.messages("call-1")[0]["raw"]
    assert "deadbeefcafe" not in call_raw and f"Proxy-Authorization: Digest {MASKED}" in call_raw
    assert "deadbeefcafe" not in trace.text_ladder("call-1", [])
    assert b"deadbeefcafe" not in trace.pcap("call-1") and MASKED.encode() in trace.pcap("call-1")
    assert b"deadbeefcafe" in trace.calls.get("call-1")[0].raw  # kept as it went over the wire


def test_invite_dialog_is_filed_per_call_and_per_instance_options_only_per_instance() -> None:
    trace, _ = recorder()
    request = invite()
    trace.observe("in", request, flow())
    trace.observe("out", make_response(request, 100), flow())
    trace.observe("out", make_response(request, 180, to_tag="x"), flow())
    trace.observe("in", invite(call_id="opt-1", method="OPTIONS"), flow())
    trace.observe("in", invite(call_id="call-2", user="bob"), flow())  # not ours: per call only

    assert [m["status"] for m in trace.messages("call-1")] == [None, 100, 180]
    assert [m["method"] for m in trace.messages("call-1")] == ["INVITE"] * 3
    assert "opt-1" not in trace.calls
    assert len(trace.instance_messages(SELECTOR)) == 4
    assert trace.selector_of_call("call-2") is None and len(trace.call_messages("call-2")) == 1


def test_bounds_per_call_calls_instances_and_bytes_hold() -> None:
    trace, _ = recorder(max_calls=3, per_call=5, max_instances=2, per_instance=4, call_bytes=10**9)
    for n in range(10):
        trace.observe("in", invite(call_id="busy"), flow())
        assert len(trace.call_messages("busy")) == min(n + 1, 5)
    for n in range(5):
        trace.observe("in", invite(call_id=f"c{n}"), flow())
    assert list(trace.calls.rings) == ["c2", "c3", "c4"]  # the least recently active went first
    assert trace.calls.messages == 3 and trace.calls.bytes == sum(m.size for m in
                                                                 (trace.calls.get(c)[0] for c in ("c2", "c3", "c4")))
    assert len(trace.instance_messages(SELECTOR)) == 4
    trace.selector_of_user = lambda user: user.upper()
    for n in range(3):
        trace.observe("in", invite(call_id=f"i{n}", user=f"sipis-{n}"), flow())
    assert list(trace.instances.rings) == ["SIPIS-1", "SIPIS-2"]

    small, _ = recorder(call_bytes=3000)
    for n in range(50):
        small.observe("in", invite(call_id=f"c{n}"), flow())
    assert small.calls.bytes <= 3000 and 1 <= len(small.calls.rings) < 50
    assert small.calls.bytes == sum(m.size for key in small.calls.rings for m in small.calls.get(key))


def test_call_id_mapping_is_bounded() -> None:
    trace, _ = recorder(max_call_ids=10)
    for n in range(30):
        trace.observe("in", invite(call_id=f"c{n}"), flow())
    assert len(trace._call_selector) == 10 and trace.selector_of_call("c29") == SELECTOR
    assert trace.selector_of_call("c0") is None


def test_text_ladder_shows_arrows_first_lines_pushes_and_raw_messages() -> None:
    trace, clock = recorder()
    request = invite()
    trace.observe("in", request, flow())
    clock.advance(0.001)
    trace.observe("out", make_response(request, 180, to_tag="x"), flow())
    clock.advance(0.5)
    trace.observe("out", make_response(request, 302, to_tag="x"), flow("tcp"))
    at = trace.calls.get("call-1")[0].at
    push = {"push_id": "p1", "kind": "call", "provider": "mediator", "outcome": "accepted", "provider_code": 200,
            "latency_ms": 12.0, "attempt": 1,
            "stages": {"invite_received": at, "push_sent": at + 0.0005, "provider_accepted": at + 0.01,
                       "released": at + 0.6}}
    text = trace.text_ladder("call-1", [push])
    lines = text.splitlines()
    assert lines[0] == "SIP trace of Call-ID call-1" and f"instance: {SELECTOR}" in lines
    ladder = [line for line in lines if line[:2].isdigit() and "|" in line]
    assert "INVITE sip:" in ladder[0] and ladder[0].rstrip().endswith("udp 192.0.2.10:5060")
    assert "--->|" in ladder[0]  # PBX → SIPIS
    assert "call push via mediator" in ladder[1] and ladder[1].index("|---") > 40  # SIPIS → push, after the INVITE
    assert "180 Ringing (INVITE)" in ladder[2] and "|<--" in ladder[2]
    assert "accepted 200 (12 ms)" in ladder[3]
    assert "302 Moved Temporarily" in ladder[4] and "tcp" in ladder[4]
    assert "(call released to the app)" in ladder[5]
    assert "----- #1 " in text and "Call-ID: call-1" in text and "----- push p1 call via mediator" in text


def test_pcap_is_libpcap_raw_ip_with_valid_ipv4_and_udp_headers() -> None:
    trace, clock = recorder()
    request = invite()
    trace.observe("in", request, flow())
    clock.advance(1.25)
    trace.observe("out", make_response(request, 180, to_tag="x"), flow())
    data = trace.pcap("call-1")
    magic, major, minor, _, _, snaplen, linktype = struct.unpack("<IHHiIII", data[:24])
    assert (magic, major, minor, snaplen, linktype) == (0xA1B2C3D4, 2, 4, 65535, 101)
    offset, records = 24, []
    while offset < len(data):
        sec, usec, incl, orig = struct.unpack("<IIII", data[offset:offset + 16])
        records.append((sec + usec / 1e6, data[offset + 16:offset + 16 + incl]))
        assert incl == orig
        offset += 16 + incl
    assert len(records) == 2 and abs(records[1][0] - records[0][0] - 1.25) < 1e-5
    messages = trace.call_messages("call-1")
    for (_, packet), message, (src, dst) in zip(records, messages, [(PBX, US), (US, PBX)], strict=True):
        version_ihl, _, total, _, flags, ttl, proto, checksum, s, d = struct.unpack("!BBHHHBBH4s4s", packet[:20])
        assert version_ihl == 0x45 and total == len(packet) and proto == 17 and ttl == 64 and flags == 0x4000
        assert ipaddress.IPv4Address(s) == ipaddress.IPv4Address(src[0])
        assert ipaddress.IPv4Address(d) == ipaddress.IPv4Address(dst[0])
        assert _ones_complement_sum(packet[:20]) == 0xFFFF  # the header checksum is right
        assert checksum != 0
        sport, dport, length, _ = struct.unpack("!HHHH", packet[20:28])
        assert (sport, dport, length) == (src[1], dst[1], len(packet) - 20)
        assert packet[28:] == message.text().encode()


def test_ipv6_flows_become_ipv6_packets() -> None:
    packet = ip_udp_packet(("::1", 5060), ("2001:db8::1", 5070), b"OPTIONS")
    assert packet[0] >> 4 == 6 and packet[6] == 17 and struct.unpack("!H", packet[4:6])[0] == 8 + 7
    assert pcap_bytes([]) == pcap_bytes([])[:24]
    one = TracedMessage(1.5, "out", "udp", ("::1", 1), ("::1", 2), b"X", "c", None)
    assert len(pcap_bytes([one])) == 24 + 16 + 40 + 8 + 1


def _ones_complement_sum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


async def test_endpoint_observers_see_both_directions_and_a_failing_observer_breaks_nothing() -> None:
    timers = TimerSettings(t1=0.01, t2=0.04, t4=0.05, timer_d=0.1)
    server = SipEndpoint(EndpointSettings(listen=[ListenSpec("udp", "127.0.0.1", 0)], timers=timers,
                                          keepalive_interval=0))
    client = SipEndpoint(EndpointSettings(timers=timers, keepalive_interval=0))
    seen: list[tuple[str, Message]] = []
    trace = TraceRecorder()

    def broken(direction: str, message: Message, flow: Flow) -> None:
        raise RuntimeError("observer bug")

    client.observers += [broken, lambda d, m, f: seen.append((d, m)), trace.observe]
    await server.start()
    try:
        address = server.transport.local_address("udp")
        assert address is not None
        flow_ = await client.transport.flow_to("udp", "127.0.0.1", address[1])
        call_id = new_call_id()
        request = Request("OPTIONS", f"sip:x@127.0.0.1:{address[1]}", Headers([
            ("From", "<sip:a@b>;tag=1"), ("To", "<sip:x@b>"), ("Call-ID", call_id), ("CSeq", "1 OPTIONS")]))
        client.add_via(request, flow_)
        response = await client.request(request, flow_)
        assert response.status == 200
        assert [d for d, _ in seen] == ["out", "in"] and isinstance(seen[1][1], Response)
        assert [m.direction for m in trace.instances.get(call_id)] == []  # OPTIONS to nobody: no instance
        assert trace.observed == 2
    finally:
        await client.close()
        await server.close()


def test_stored_messages_are_out_of_the_garbage_collectors_way() -> None:
    trace, _ = recorder()
    for n in range(20):
        request = invite(call_id=f"c{n}")
        trace.observe("in", request, flow())
        trace.observe("out", make_response(request, 180, to_tag="t"), flow("tcp"))
    gc.collect()
    gc.collect()  # a ring is untracked in the collection after the one that untracked its messages
    stored = [m for rings in (trace.calls.rings, trace.instances.rings) for ring in rings.values() for m in ring]
    assert len(stored) == 80
    assert not any(gc.is_tracked(m) for m in stored)  # plain tuples of atomic values: untracked
    assert not any(gc.is_tracked(ring) for ring in trace.calls.rings.values())
    first = trace.call_messages("c0")[0]  # read back as TracedMessage, fields in their order
    assert isinstance(first, TracedMessage) and first.direction == "in" and first.remote == PBX
    assert first.call_id == "c0" and first.selector == SELECTOR and first.raw.startswith(b"INVITE ")
