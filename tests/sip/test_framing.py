"""Stream framing (TCP/TLS): Content-Length cutting, keep-alives, limits."""

from __future__ import annotations

import pytest

from sipis.sip.framing import (
    PING,
    PONG,
    Frame,
    FramingError,
    KeepAlivePing,
    KeepAlivePong,
    StreamFramer,
)
from sipis.sip.message import Request, parse_message


def message(body: bytes = b"", *, length_header: str = "Content-Length: {n}", call_id: str = "c1") -> bytes:
    head = [
        "MESSAGE sip:dave@example.net SIP/2.0",
        "Via: SIP/2.0/TCP edge.example.net;branch=z9hG4bK" + call_id,
        "From: <sip:carol@example.org>;tag=1",
        "To: <sip:dave@example.net>",
        f"Call-ID: {call_id}",
        "CSeq: 1 MESSAGE",
    ]
    if length_header:
        head.append(length_header.format(n=len(body)))
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


FIRST = message(b"hello", call_id="m1")
WITH_BLANK_LINES = message(b"\r\n\r\nbody with\r\n\r\nblank lines\r\n\r\n", call_id="m2")
EMPTY = message(call_id="m3")
STREAM = FIRST + WITH_BLANK_LINES + EMPTY
MESSAGES = [FIRST, WITH_BLANK_LINES, EMPTY]


def feed_all(framer: StreamFramer, chunks: list[bytes]) -> list[Frame]:
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(framer.feed(chunk))
    return frames


def only_messages(frames: list[Frame]) -> list[bytes]:
    return [f for f in frames if isinstance(f, bytes)]


# --------------------------------------------------------------------------- cutting


def test_one_message_one_feed() -> None:
    framer = StreamFramer()
    assert framer.feed(FIRST) == [FIRST]
    assert framer.buffered == 0


def test_several_messages_in_one_feed() -> None:
    assert StreamFramer().feed(STREAM) == MESSAGES


def test_split_at_every_byte_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        frames = feed_all(StreamFramer(), [STREAM[:cut], STREAM[cut:]])
        assert frames == MESSAGES, cut


def test_split_at_every_pair_of_boundaries_in_one_message() -> None:
    data = WITH_BLANK_LINES
    for a in range(0, len(data), 3):
        for b in range(a, len(data), 7):
            assert feed_all(StreamFramer(), [data[:a], data[a:b], data[b:]]) == [data]


def test_byte_by_byte() -> None:
    framer = StreamFramer()
    frames = feed_all(framer, [STREAM[i : i + 1] for i in range(len(STREAM))])
    assert frames == MESSAGES


def test_body_containing_crlfcrlf_is_not_a_message_end() -> None:
    body = b"\r\n\r\nINVITE sip:x SIP/2.0\r\n\r\n"
    data = message(body)
    frames = StreamFramer().feed(data + FIRST)
    assert frames == [data, FIRST]
    assert isinstance(frames[0], bytes)
    parsed = parse_message(frames[0], stream=True)
    assert parsed.body == body


@pytest.mark.parametrize(
    "header",
    ["Content-Length: {n}", "l: {n}", "L:{n}", "content-LENGTH   :   {n}", "Content-Length:\r\n {n}",
     "Content-Length: {n}\r\nl: {n}", "Content-Length: 000{n}"],
)
def test_content_length_spellings(header: str) -> None:
    data = message(b"12345", length_header=header)
    assert StreamFramer().feed(data + FIRST) == [data, FIRST]
    assert parse_message(data, stream=True).body == b"12345"


def test_missing_content_length_means_empty_body() -> None:
    data = message(length_header="")
    assert StreamFramer().feed(data + FIRST) == [data, FIRST]


def test_content_length_in_the_start_line_is_ignored() -> None:
    data = b"l: 5\r\nVia: x\r\n\r\n"
    assert StreamFramer().feed(data) == [data]


def test_frames_parse_as_stream_messages() -> None:
    for frame in StreamFramer().feed(STREAM):
        assert isinstance(frame, bytes)
        assert isinstance(parse_message(frame, stream=True), Request)


def test_big_body_in_small_chunks() -> None:
    body = bytes(range(256)) * 2048  # 512 KiB, with plenty of CR and LF inside
    data = message(body)
    framer = StreamFramer()
    frames = feed_all(framer, [data[i : i + 1500] for i in range(0, len(data), 1500)])
    assert frames == [data]
    assert framer.buffered == 0


def test_header_search_resumes_where_it_stopped() -> None:
    # White box: feeding a header block piecewise must not rescan what was searched already.
    framer = StreamFramer()
    head = FIRST[: FIRST.index(b"\r\n\r\n")]
    framer.feed(head[:100])
    assert framer._searched >= 100 - 3
    framer.feed(head[100:])
    assert framer._searched >= len(head) - 3
    assert framer.feed(FIRST[len(head) :]) == [FIRST]


# --------------------------------------------------------------------------- keep-alives


def test_ping_alone() -> None:
    frames = StreamFramer().feed(b"\r\n\r\n")
    assert frames == [PING] and isinstance(frames[0], KeepAlivePing)


def test_pong_alone() -> None:
    frames = StreamFramer().feed(b"\r\n")
    assert frames == [PONG] and isinstance(frames[0], KeepAlivePong)


def test_keepalives_between_messages() -> None:
    framer = StreamFramer()
    assert framer.feed(FIRST + b"\r\n\r\n" + EMPTY + b"\r\n\r\n\r\n\r\n") == [FIRST, PING, EMPTY, PING, PING]
    assert framer.feed(b"\r\n") == [PONG]
    assert framer.feed(b"\r\n\r\n" + FIRST + b"\r\n") == [PING, FIRST, PONG]


def test_crlf_before_a_message_is_a_pong_and_bare_line_ends_are_skipped() -> None:
    """RFC 5626 §4.4.1: between messages CRLFCRLF is a ping and a single CRLF a pong, also when the
    next message follows in the same read (on a busy flow it usually does; missing it once made
    the keep-alive drop a connection carrying thousands of registrations)."""
    assert StreamFramer().feed(b"\r\n" + FIRST) == [PONG, FIRST]
    assert StreamFramer().feed(b"\r\n\r\n\r\n" + FIRST) == [PING, PONG, FIRST]
    assert StreamFramer().feed(b"\n\r" + FIRST) == [FIRST]  # not a CRLF pair: stray bytes


def test_pong_arriving_with_the_next_response_is_reported() -> None:
    framer = StreamFramer()
    assert framer.feed(FIRST + b"\r\n" + FIRST) == [FIRST, PONG, FIRST]


def test_ping_split_after_three_bytes_is_still_a_ping() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r") == []
    assert framer.feed(b"\n") == [PING]


def test_lone_cr_waits_for_its_lf() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r") == []
    assert framer.feed(b"\n") == [PONG]
    assert framer.feed(b"\r") == []
    assert framer.feed(FIRST) == [FIRST]


def test_pong_then_message() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == [PONG]
    assert framer.feed(FIRST) == [FIRST]


def test_crlf_after_message_in_same_read_is_a_pong() -> None:
    # A lone CRLF with nothing after it is reported at once (it may be the pong we wait for).
    assert StreamFramer().feed(FIRST + b"\r\n") == [FIRST, PONG]


# --------------------------------------------------------------------------- limits and errors


def test_content_length_over_message_limit() -> None:
    data = message(b"x" * 100)
    framer = StreamFramer(max_message_bytes=len(data) - 1)
    with pytest.raises(FramingError, match="exceeds"):
        framer.feed(data[: data.index(b"\r\n\r\n") + 4])  # raised before the body arrives
    assert StreamFramer(max_message_bytes=len(data)).feed(data) == [data]


def test_huge_content_length_fails_without_waiting() -> None:
    data = message(length_header="Content-Length: 4294967295")
    with pytest.raises(FramingError):
        StreamFramer().feed(data)


def test_missing_header_end_within_limit() -> None:
    framer = StreamFramer(max_header_bytes=200)
    framer.feed(b"INVITE sip:x SIP/2.0\r\n")
    with pytest.raises(FramingError, match="no end of headers"):
        for _ in range(100):
            framer.feed(b"X-Filler: abcdefgh\r\n")
    assert framer.dead


def test_header_block_exactly_at_limit() -> None:
    head_len = FIRST.index(b"\r\n\r\n")
    assert StreamFramer(max_header_bytes=head_len).feed(FIRST) == [FIRST]
    with pytest.raises(FramingError):
        StreamFramer(max_header_bytes=head_len - 1).feed(FIRST)
    framer = StreamFramer(max_header_bytes=head_len)
    assert feed_all(framer, [FIRST[i : i + 1] for i in range(len(FIRST))]) == [FIRST]


def test_limit_applies_per_message_not_per_stream() -> None:
    framer = StreamFramer(max_header_bytes=FIRST.index(b"\r\n\r\n"), max_message_bytes=len(FIRST))
    assert framer.feed(FIRST * 50) == [FIRST] * 50


@pytest.mark.parametrize(
    "header",
    ["Content-Length: -1", "Content-Length: abc", "l: 1e3", "Content-Length:", "Content-Length: 5\r\nl: 6",
     "Content-Length: 12345678901", "Content-Length: ５", "Content-Length: 1\r\n 2"],
)
def test_bad_content_length(header: str) -> None:
    with pytest.raises(FramingError, match="Content-Length"):
        StreamFramer().feed(message(b"12345", length_header=header))


def test_framer_is_dead_after_an_error() -> None:
    framer = StreamFramer()
    with pytest.raises(FramingError):
        framer.feed(message(length_header="l: x"))
    with pytest.raises(FramingError, match="already failed"):
        framer.feed(FIRST)
    assert framer.dead and framer.buffered == 0


def test_frames_before_an_error_are_handed_over() -> None:
    with pytest.raises(FramingError) as info:
        StreamFramer().feed(FIRST + b"\r\n\r\n" + message(length_header="l: -2"))
    assert info.value.frames == [FIRST, PING]
