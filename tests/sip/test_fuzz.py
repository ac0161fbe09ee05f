"""Property tests: the parser and the framer never fail in any way but their own error."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipis.sip.framing import Frame, FramingError, StreamFramer
from sipis.sip.message import (
    Limits,
    Message,
    Request,
    Response,
    SipParseError,
    make_response,
    parse_message,
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = Limits(max_message_bytes=1500, max_headers=12, max_header_bytes=700)


def lines(*parts: str | bytes, body: bytes = b"") -> bytes:
    raw = [p.encode() if isinstance(p, str) else p for p in parts]
    return b"\r\n".join(raw) + b"\r\n\r\n" + body


CORPUS = [
    lines(
        "INVITE sip:dave@example.net;transport=tcp SIP/2.0",
        "v: SIP/2.0/TCP edge.example.net:5060;branch=z9hG4bKa1;rport, SIP/2.0/UDP [2001:db8::2];branch=z9hG4bKa0",
        "Max-Forwards:70",
        'f: "Carol, \\"C\\"" <sip:carol@example.org>;tag=ft',
        "t: dave <sip:dave@example.net>",
        "i: fuzz-1@edge",
        "CSeq: 12",
        " INVITE",
        "m: <sip:carol@[2001:db8::7]:5070;ob>;+sip.instance=\"<urn:uuid:1-2>\"",
        "c: application/sdp",
        "l: 17",
        body=b"v=0\r\n\r\ns=fuzz\r\n\r\n",
    ),
    lines(
        "REGISTER sips:example.net SIP/2.0",
        "Via: SIP/2.0/TLS 192.0.2.5:5061;branch=z9hG4bKr1",
        "From: <sip:carol@example.net>;tag=rt",
        "To: sip:carol@example.net",
        "Call-ID: reg-fuzz",
        "CSeq: 3 REGISTER",
        "Contact: <sip:carol@192.0.2.5:5061;transport=tls>;expires=600, \"x,y\" <sip:c2@h>",
        "Expires: 600",
        "Content-Length: 0",
    ),
    lines(
        "SIP/2.0 200 OK",
        "Via: SIP/2.0/UDP edge.example.net;branch=z9hG4bKo1;received=2001:db8::1",
        "Record-Route: <sip:p1.example.net;lr>",
        "From: <sip:carol@example.org>;tag=ft",
        "To: <sip:dave@example.net>;tag=tt",
        "Call-ID: resp-fuzz",
        "CSeq: 12 INVITE",
        "Content-Length: 4",
        body=b"body",
    ),
    lines(
        "MESSAGE tel:+4930123 SIP/2.0",
        "Via: SIP/2.0/UDP h;branch=z9hG4bKm1",
        b"From: \"M\xfcller\" <tel:+4930999>;tag=m",
        "To: <urn:service:sos>",
        "Call-ID: msg-fuzz",
        "CSeq: 1 MESSAGE",
        b"Subject: caf\xe9",
        "Content-Type: text/plain",
        body=b"no content-length on a datagram",
    ),
]

FRAGMENTS = [
    b"\r\n", b"\r\n\r\n", b"\n", b"\r", b" ", b"\t", b":", b";", b",", b"<", b">", b'"', b"\\", b"%", b"%4",
    b"@", b"[", b"]", b"=", b"\x00", b"\xff", b"\xc3", "²".encode(), "٣".encode(), b"9" * 12, b"-1",
    b"l: 99\r\n", b"Content-Length: 2\r\n", b"Via: SIP/2.0/UDP x\r\n", b"\r\n ", b"CSeq: 1 BYE\r\n",
    b"SIP/2.0 ", b"sip:", b"tel:", b"[::1]", b"tag=", b"?",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A corpus message with a few flips, truncations, insertions, duplicated or dropped lines."""
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "fragment", "duplicate", "drop", "case"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "fragment":
            data[at:at] = draw(st.sampled_from(FRAGMENTS))
        elif kind in ("duplicate", "drop"):
            _edit_line(data, at, duplicate=kind == "duplicate")
        elif kind == "case" and at < len(data):
            data[at : at + 8] = bytes(data[at : at + 8]).swapcase()
    return bytes(data)


def _edit_line(data: bytearray, at: int, *, duplicate: bool) -> None:
    start = data.rfind(b"\r\n", 0, at) + 2 if data.rfind(b"\r\n", 0, at) >= 0 else 0
    end = data.find(b"\r\n", at)
    if end < 0:
        return
    line = bytes(data[start : end + 2])
    if duplicate:
        data[start:start] = line
    else:
        del data[start : end + 2]


def check_parse(data: bytes, limits: Limits = Limits()) -> Message | None:
    """Parse; on success the message re-parses to the same thing, on failure any 400 is sound."""
    try:
        message = parse_message(data, limits)
    except SipParseError as exc:
        assert not exc.reason.startswith("internal"), repr(exc.__cause__)
        if exc.partial is not None:
            reply = parse_message(make_response(exc.partial, 400, to_tag="z").to_bytes())
            assert isinstance(reply, Response) and reply.status == 400
        return None
    touch(message)
    again = parse_message(message.to_bytes())
    assert again.start_line() == message.start_line()
    assert list(again.headers) == list(message.headers)
    assert again.body == message.body
    assert again.to_bytes() == message.to_bytes()
    return message


def touch(message: Message) -> None:
    """The accessors the parser validated must work on what it let through."""
    assert message.cseq and message.top_via and message.call_id
    if isinstance(message, Request):
        assert message.cseq[1] == message.method
        assert message.vias and message.from_ and message.to
        assert message.contacts is not None


# --------------------------------------------------------------------------- parser


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    check_parse(data)
    check_parse(data, SMALL)


@FUZZ
@given(st.sampled_from(CORPUS).flatmap(lambda m: st.tuples(st.just(m), st.binary(max_size=200))))
def test_valid_head_random_tail(case: tuple[bytes, bytes]) -> None:
    message, tail = case
    check_parse(message[: message.index(b"\r\n") + 2] + tail)


@FUZZ
@given(mutated())
def test_mutated_messages(data: bytes) -> None:
    check_parse(data)
    check_parse(data, SMALL)


def test_corpus_parses() -> None:
    for data in CORPUS:
        assert check_parse(data) is not None


# --------------------------------------------------------------------------- framer


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def run_framer(framer: StreamFramer, chunks: list[bytes]) -> list[Frame]:
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(framer.feed(chunk))
    return frames


def within_limits(frame: Frame, max_header_bytes: int, max_message_bytes: int) -> bool:
    if not isinstance(frame, bytes):
        return True
    head_end = frame.find(b"\r\n\r\n")
    return 0 <= head_end <= max_header_bytes and len(frame) <= max_message_bytes


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=12))
def test_framer_random_bytes(data: bytes, cuts: list[int]) -> None:
    framer = StreamFramer(max_header_bytes=300, max_message_bytes=900)
    frames: list[Frame] = []
    try:
        frames = run_framer(framer, chunked(data, cuts))
    except FramingError as exc:
        frames = exc.frames
        assert framer.dead
    for frame in frames:
        assert within_limits(frame, 300, 900)
        if isinstance(frame, bytes):
            check_stream_parse(frame)


@FUZZ
@given(st.lists(mutated(), min_size=1, max_size=4), st.lists(st.integers(0, 4000), max_size=10))
def test_framer_mutated_stream(messages: list[bytes], cuts: list[int]) -> None:
    data = b"".join(messages)
    framer = StreamFramer(max_header_bytes=700, max_message_bytes=1500)
    try:
        frames = run_framer(framer, chunked(data, cuts))
    except FramingError as exc:
        frames = exc.frames
    for frame in frames:
        assert within_limits(frame, 700, 1500)
        if isinstance(frame, bytes):
            check_stream_parse(frame)


def check_stream_parse(frame: bytes) -> None:
    try:
        parse_message(frame, stream=True)
    except SipParseError as exc:
        assert not exc.reason.startswith("internal"), repr(exc.__cause__)


@st.composite
def stream_message(draw: st.DrawFn) -> bytes:
    """A valid message with a random body (CRLFs likely) and a random Content-Length spelling."""
    body = draw(st.binary(max_size=300) | st.lists(st.sampled_from([b"\r\n", b"\r\n\r\n", b"x"])).map(b"".join))
    spellings = ["Content-Length: {n}", "l:{n}", "CONTENT-length :  {n}", "Content-Length:\r\n\t{n}"]
    header = draw(st.sampled_from(spellings))
    head = CORPUS[1].split(b"Content-Length")[0].decode()
    return head.encode() + header.format(n=len(body)).encode() + b"\r\n\r\n" + body


@FUZZ
@given(
    st.lists(st.tuples(stream_message(), st.sampled_from([b"", b"", b"\r\n\r\n", b"\r\n"])), min_size=1, max_size=6),
    st.lists(st.integers(0, 3000), max_size=15),
)
def test_framer_random_chunking_yields_the_messages(items: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    # Keep-alives go between messages; a trailing lone CRLF would be a pong, which is fine too.
    data = b"".join(keepalive + message for message, keepalive in items)
    frames = run_framer(StreamFramer(), chunked(data, cuts))
    assert [f for f in frames if isinstance(f, bytes)] == [message for message, _ in items]
    for frame in frames:
        if isinstance(frame, bytes):
            parsed = parse_message(frame, stream=True)
            assert isinstance(parsed, Request) and len(parsed.body) == len(frame) - frame.index(b"\r\n\r\n") - 4
