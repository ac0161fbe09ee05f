"""SIP message parsing and serialisation, in the spirit of RFC 4475's torture tests (own vectors)."""

from __future__ import annotations

import pytest

from sipis.sip.message import (
    Headers,
    Limits,
    Message,
    NameAddr,
    Request,
    Response,
    SipParseError,
    SipURI,
    Via,
    make_response,
    parse_message,
    safe_text,
)


def sip(*lines: str | bytes, body: bytes = b"") -> bytes:
    """A message from its start line and header lines, CRLF-terminated, plus ``body``."""
    raw = [line.encode() if isinstance(line, str) else line for line in lines]
    return b"\r\n".join(raw) + b"\r\n\r\n" + body


HEADERS = (
    "Via: SIP/2.0/UDP edge.example.net:5060;branch=z9hG4bKq1w2e3",
    "Max-Forwards: 70",
    'From: "Carol" <sip:carol@example.org>;tag=f00d',
    "To: <sip:dave@example.net>",
    "Call-ID: 8c3d-11ef@edge.example.net",
    "CSeq: 7 INVITE",
)


def invite(*extra: str | bytes, body: bytes = b"", start: str = "INVITE sip:dave@example.net SIP/2.0") -> bytes:
    return sip(start, *HEADERS, *extra, f"Content-Length: {len(body)}", body=body)


def parse_request(data: bytes, **kwargs: bool) -> Request:
    message = parse_message(data, **kwargs)  # type: ignore[arg-type]
    assert isinstance(message, Request)
    return message


def parse_response(data: bytes) -> Response:
    message = parse_message(data)
    assert isinstance(message, Response)
    return message


def same(a: Message, b: Message) -> None:
    """Semantic equality of two messages: start line, fields in order, body."""
    assert a.start_line() == b.start_line()
    assert list(a.headers) == list(b.headers)
    assert a.body == b.body


def roundtrip(message: Message) -> Message:
    again = parse_message(message.to_bytes())
    same(message, again)
    assert again.to_bytes() == message.to_bytes()
    return again


# --------------------------------------------------------------------------- well-formed input


def test_basic_invite_accessors() -> None:
    sdp = b"v=0\r\no=- 1 1 IN IP4 192.0.2.7\r\n"
    req = parse_request(invite("Contact: <sip:carol@192.0.2.7:5070;transport=tcp>", "Content-Type: application/sdp",
                               body=sdp))
    assert req.method == "INVITE"
    assert req.request_uri.user == "dave" and req.request_uri.host == "example.net"
    assert req.call_id == "8c3d-11ef@edge.example.net"
    assert req.cseq == (7, "INVITE")
    assert req.branch == "z9hG4bKq1w2e3"
    assert req.top_via.port == 5060 and req.top_via.transport == "UDP"
    assert req.from_.display_name == "Carol" and req.from_.tag == "f00d"
    assert req.to.tag is None and req.to.uri.aor == "sip:dave@example.net"
    assert req.contacts[0].uri.port == 5070 and req.contacts[0].uri.transport == "tcp"
    assert req.body == sdp
    roundtrip(req)


def test_compact_forms_expand_to_canonical_names() -> None:
    data = sip(
        "MESSAGE sip:dave@example.net SIP/2.0",
        "v: SIP/2.0/TCP edge.example.net;branch=z9hG4bKc1",
        "f: <sip:carol@example.org>;tag=1",
        "t: <sip:dave@example.net>",
        "i: compact-1",
        "CSeq: 2 MESSAGE",
        "m: <sip:carol@edge.example.net>",
        "c: text/plain",
        "k: path",
        "s: hi there",
        "l: 5",
        body=b"hello",
    )
    req = parse_request(data)
    names = [name for name, _ in req.headers]
    assert names == ["Via", "From", "To", "Call-ID", "CSeq", "Contact", "Content-Type", "Supported", "Subject"]
    assert req.headers.get("content-type") == "text/plain"
    assert req.headers.get("S") == "hi there"  # compact lookup works too
    assert req.body == b"hello"
    roundtrip(req)


def test_names_are_case_insensitive_and_colon_spacing_is_free() -> None:
    data = sip(
        "OPTIONS sip:example.net SIP/2.0",
        "vIa:SIP/2.0/UDP edge.example.net;branch=z9hG4bKn1",
        "FROM   :<sip:carol@example.org>;tag=2",
        "to\t: <sip:example.net>",
        "call-id:nospace",
        "cseq:\t3 OPTIONS",
        "X-Custom-Thing:value:with:colons",
    )
    req = parse_request(data)
    assert req.call_id == "nospace"
    assert req.cseq == (3, "OPTIONS")
    assert req.headers.get("x-custom-thing") == "value:with:colons"
    assert "VIA" in req.headers and "Call-Id" in req.headers
    assert [name for name, _ in req.headers][:3] == ["Via", "From", "To"]


def test_folded_lines_join_with_one_space() -> None:
    data = invite(
        "Subject: a subject",
        "\t that goes on",
        "     and on",
        "X-Folded-Empty:",
        "  later value",
    )
    req = parse_request(data)
    assert req.headers.get("Subject") == "a subject that goes on and on"
    assert req.headers.get("X-Folded-Empty") == "later value"


def test_folded_core_headers_still_parse() -> None:
    data = sip(
        "INVITE sip:dave@example.net SIP/2.0",
        "Via: SIP/2.0/UDP",
        "  edge.example.net;branch=z9hG4bKf1",
        "From: <sip:carol@example.org>",
        "\t;tag=99",
        "To: <sip:dave@example.net>",
        "Call-ID: fold-1",
        "CSeq: 8",
        " INVITE",
    )
    req = parse_request(data)
    assert req.top_via.host == "edge.example.net"
    assert req.from_.tag == "99"
    assert req.cseq == (8, "INVITE")


def test_comma_joined_via_and_contact_read_like_separate_lines() -> None:
    joined = sip(
        "REGISTER sip:example.net SIP/2.0",
        "Via: SIP/2.0/TLS a.example.net;branch=z9hG4bKa, SIP/2.0/UDP [2001:db8::5]:5062;branch=z9hG4bKb;rport",
        "From: <sip:carol@example.net>;tag=3",
        "To: <sip:carol@example.net>",
        "Call-ID: reg-1",
        "CSeq: 1 REGISTER",
        'Contact: "Desk, left" <sip:carol@192.0.2.1;ob>;expires=60, <sip:carol@192.0.2.2>;q=0.5',
    )
    separate = sip(
        "REGISTER sip:example.net SIP/2.0",
        "Via: SIP/2.0/TLS a.example.net;branch=z9hG4bKa",
        "Via: SIP/2.0/UDP [2001:db8::5]:5062;branch=z9hG4bKb;rport",
        "From: <sip:carol@example.net>;tag=3",
        "To: <sip:carol@example.net>",
        "Call-ID: reg-1",
        "CSeq: 1 REGISTER",
        'Contact: "Desk, left" <sip:carol@192.0.2.1;ob>;expires=60',
        "Contact: <sip:carol@192.0.2.2>;q=0.5",
    )
    a, b = parse_request(joined), parse_request(separate)
    assert a.vias == b.vias
    assert [v.host for v in a.vias] == ["a.example.net", "[2001:db8::5]"]
    assert a.vias[1].params == {"branch": "z9hG4bKb", "rport": None}
    assert a.contacts == b.contacts
    assert a.contacts[0].display_name == "Desk, left"
    assert a.contacts[0].params == {"expires": "60"} and a.contacts[0].uri.params == {"ob": None}
    assert a.headers.get("Contact") == b.headers.get("Contact")
    assert len(a.headers.raw_values("Via")) == 1 and len(b.headers.raw_values("Via")) == 2


def test_addr_spec_params_belong_to_the_header() -> None:
    addr_spec = NameAddr.parse("sip:dave@example.net;tag=abc;transport=tcp")
    assert addr_spec.params == {"tag": "abc", "transport": "tcp"}
    assert addr_spec.uri.params == {} and addr_spec.tag == "abc"
    name_addr = NameAddr.parse("<sip:dave@example.net;tag=abc;transport=tcp>")
    assert name_addr.tag is None
    assert name_addr.uri.params == {"tag": "abc", "transport": "tcp"}
    assert name_addr.uri.transport == "tcp"


@pytest.mark.parametrize(
    ("text", "display"),
    [
        ('"Doe, Jane" <sip:jane@example.org>', "Doe, Jane"),
        (r'"say \"hi\"" <sip:jane@example.org>', 'say "hi"'),
        (r'"back\\slash" <sip:jane@example.org>', "back\\slash"),
        (r'"\q\u\o\t\e\d" <sip:jane@example.org>', "quoted"),
        ('"semi;colon <not> an address" <sip:jane@example.org>', "semi;colon <not> an address"),
        ("Jane  Q. Doe <sip:jane@example.org>", "Jane  Q. Doe"),
        ('"" <sip:jane@example.org>', ""),
        ("<sip:jane@example.org>", None),
        ('"Jörg Ünïcode" <sip:jane@example.org>', "Jörg Ünïcode"),
    ],
)
def test_display_names(text: str, display: str | None) -> None:
    parsed = NameAddr.parse(text + ";tag=t1")
    assert parsed.display_name == display
    assert parsed.tag == "t1"
    assert parsed.uri.user == "jane"
    again = NameAddr.parse(str(parsed))
    assert again.display_name == (display or None) and again.uri == parsed.uri and again.params == parsed.params


def test_quoted_display_name_with_comma_in_a_contact_list() -> None:
    req = parse_request(invite(r'Contact: "a, \"b\", c" <sip:x@h1>, "d,e" <sip:y@h2>;expires=5, sip:z@h3'))
    contacts = req.contacts
    assert [c.display_name for c in contacts] == ['a, "b", c', "d,e", None]
    assert [c.uri.host for c in contacts] == ["h1", "h2", "h3"]
    assert contacts[1].params == {"expires": "5"}


@pytest.mark.parametrize(
    ("uri", "host", "port"),
    [
        ("sip:[2001:db8::10]", "[2001:db8::10]", None),
        ("sip:bob@[2001:db8::10]:5070;transport=tcp", "[2001:db8::10]", 5070),
        ("sips:[::ffff:192.0.2.4]:5061", "[::ffff:192.0.2.4]", 5061),
        ("sip:bob@192.0.2.4:1", "192.0.2.4", 1),
        ("sip:Bob@Example.NET", "Example.NET", None),
    ],
)
def test_hosts(uri: str, host: str, port: int | None) -> None:
    parsed = SipURI.parse(uri)
    assert (parsed.host, parsed.port) == (host, port)
    assert str(SipURI.parse(str(parsed))) == str(parsed)


@pytest.mark.parametrize(
    "uri",
    [
        "sip:[2001:db8::10",  # unterminated
        "sip:[2001:db8:::10]",  # not an IPv6 address
        "sip:2001:db8::10",  # IPv6 without brackets
        "sip:[2001:db8::10]5060",
        "sip:bob@host:0",
        "sip:bob@host:65536",
        "sip:bob@host:5o60",
        "sip:bob@host:" + "5" * 6000,  # huge digit runs must not reach int()
        "sip:bob@host:²",
        "sip:@host",
        "sip:bob@",
        "sip:bob@ho st",
        "sip:bob@ho<st",
        "sip:bob%zz@host",  # broken escape
        "sip:bob%4@host",
        "sip:bob@host;=x",
        "sip:bob@h@host",
        "http://example.net/",
        "sip:",
        "sip:bob@héllo.example",
    ],
)
def test_bad_uris(uri: str) -> None:
    with pytest.raises(SipParseError):
        SipURI.parse(uri)


def test_uri_params_headers_and_escapes() -> None:
    uri = SipURI.parse(
        "sip:alice%20smith:pw%21@example.com;transport=TCP;lr;maddr=[2001:db8::1]?subject=hi%20there&x=y"
    )
    assert uri.user == "alice%20smith"  # escapes are kept as sent, so the URI serialises back unchanged
    assert uri.password == "pw%21"
    assert uri.params == {"transport": "TCP", "lr": None, "maddr": "[2001:db8::1]"}
    assert uri.transport == "tcp"
    assert uri.headers == "subject=hi%20there&x=y"
    assert SipURI.parse(str(uri)) == uri


def test_user_part_may_contain_semicolon_and_question_mark() -> None:
    uri = SipURI.parse("sip:user;par=u%40example.net?x@example.com;transport=udp")
    assert uri.user == "user;par=u%40example.net?x"
    assert uri.host == "example.com"
    assert uri.params == {"transport": "udp"}


def test_other_uri_schemes_in_addresses_and_request_uri() -> None:
    req = parse_request(
        sip(
            "INVITE tel:+4930123456;phone-context=example.net SIP/2.0",
            "Via: SIP/2.0/UDP edge.example.net;branch=z9hG4bKt1",
            'From: "Caller" <tel:+4930999;phone-context=example.net>;tag=x1',
            "To: urn:service:sos",
            "Call-ID: tel-1",
            "CSeq: 1 INVITE",
        )
    )
    assert req.from_.uri.scheme == "tel" and req.from_.uri.host == "+4930999;phone-context=example.net"
    assert str(req.from_.uri) == "tel:+4930999;phone-context=example.net"
    assert req.to.uri.scheme == "urn"
    with pytest.raises(SipParseError):
        req.request_uri  # noqa: B018 - not a SIP URI, and request_uri says so


def test_unknown_method_and_unknown_headers() -> None:
    data = sip(
        "NEWMETHOD sip:dave@example.net SIP/2.0",
        "Via: SIP/2.0/SCTP edge.example.net;branch=z9hG4bKu1;newparam=newvalue;flag",
        "From: <sip:carol@example.org>;tag=u",
        "To: <sip:dave@example.net>",
        "Call-ID: unknown-1",
        "CSeq: 4 NEWMETHOD",
        "NewFangledHeader:   newfangled value",
        " continued newfangled value",
        "Content-Type: application/x-new",
        "Content-Length: 3",
        body=b"abc",
    )
    req = parse_request(data)
    assert req.method == "NEWMETHOD"
    assert req.top_via.transport == "SCTP" and req.top_via.params["flag"] is None
    assert req.headers.get("newfangledheader") == "newfangled value continued newfangled value"
    roundtrip(req)


def test_methods_are_case_sensitive() -> None:
    lower = parse_request(invite(start="invite sip:dave@example.net SIP/2.0").replace(b"7 INVITE", b"7 invite"))
    assert lower.method == "invite" and lower.cseq == (7, "invite")
    with pytest.raises(SipParseError, match="does not match"):
        parse_message(invite(start="invite sip:dave@example.net SIP/2.0"))


def test_percent_that_is_not_an_escape() -> None:
    # "%" is a token character: methods, header names and parameter values may carry it.
    data = sip(
        "PU%42LISH sip:presence%40x@example.net SIP/2.0",
        "Via: SIP/2.0/TCP edge.example.net;branch=z9hG4bK%q%z",
        'From: "%zz%41" <sip:a@example.net>;tag=%%',
        "To: <sip:a@example.net>",
        "Call-ID: pct-1",
        "CSeq: 5 PU%42LISH",
        "Cont%61ct: not really a contact",
    )
    req = parse_request(data)
    assert req.method == "PU%42LISH" and req.request_uri.user == "presence%40x"
    assert req.branch == "z9hG4bK%q%z" and req.from_.display_name == "%zz%41" and req.from_.tag == "%%"
    assert req.headers.get("Cont%61ct") == "not really a contact" and req.contacts == []
    roundtrip(req)


def test_request_uri_of_unknown_scheme_is_left_to_the_application() -> None:
    req = parse_request(invite(start="INVITE name:Dave_Smith SIP/2.0"))
    assert req.uri == "name:Dave_Smith"


def test_via_with_whitespace_around_separators() -> None:
    via = Via.parse("SIP  /  2.0 /\tUDP   edge.example.net : 5070 ;branch = z9hG4bKw ; received=192.0.2.9")
    assert (via.transport, via.host, via.port) == ("UDP", "edge.example.net", 5070)
    assert via.params == {"branch": "z9hG4bKw", "received": "192.0.2.9"}
    assert Via.parse(str(via)) == via


@pytest.mark.parametrize(
    "text",
    ["SIP/2.0 host", "SIP/3.0/UDP host", "SIP/2.0/UDP", "HTTP/1.1/TCP host", "SIP/2.0/UDP host;branch=a b",
     "SIP/2.0/UDP host junk", "SIP/2.0/UDP [::1", "SIP/2.0/UDP host;=x"],
)
def test_bad_vias(text: str) -> None:
    with pytest.raises(SipParseError):
        Via.parse(text)


def test_params_lowercase_names_keep_quoted_values() -> None:
    contact = NameAddr.parse('<sip:carol@192.0.2.1;transport=tcp>;+sip.instance="<urn:uuid:0000-1>";Expires=60;'
                             'methods="INVITE, BYE;x"')
    assert contact.params == {"+sip.instance": '"<urn:uuid:0000-1>"', "expires": "60", "methods": '"INVITE, BYE;x"'}
    assert NameAddr.parse(str(contact)) == contact


def test_status_lines() -> None:
    base = ("Via: SIP/2.0/UDP edge.example.net;branch=z9hG4bKr", "From: <sip:c@example.org>;tag=1",
            "To: <sip:d@example.net>;tag=2", "Call-ID: r1", "CSeq: 1 INVITE")
    assert parse_response(sip("SIP/2.0 180 Ringing", *base)).reason == "Ringing"
    assert parse_response(sip("SIP/2.0 200", *base)).reason == ""
    odd = parse_response(sip("SIP/2.0 499 Reason: with  odd   spacing, ÜTF-8", *base))
    assert odd.status == 499 and odd.reason == "Reason: with  odd   spacing, ÜTF-8"
    assert parse_response(sip("sip/2.0 603 Decline", *base)).status == 603
    roundtrip(odd)
    for short in ("SIP/2.0 2", "SIP/2.0 20", "SIP/2.0 2x0 OK"):  # found by the fuzzer: a clean error
        with pytest.raises(SipParseError, match="bad status line"):
            parse_message(sip(short, *base))


def test_leading_crlfs_and_bare_lf_line_ends() -> None:
    crlf = invite()
    bare = crlf.replace(b"\r\n", b"\n")
    a = parse_request(b"\r\n\r\n" + crlf)
    b = parse_request(bare)
    same(a, b)


def test_datagram_body_is_cut_to_content_length() -> None:
    req = parse_request(invite(body=b"abc") + b"trailing junk")
    assert req.body == b"abc"


def test_datagram_without_content_length_takes_the_rest() -> None:
    data = sip("MESSAGE sip:dave@example.net SIP/2.0", *HEADERS[:5], "CSeq: 7 MESSAGE", body=b"the\r\n\r\nrest")
    assert parse_request(data).body == b"the\r\n\r\nrest"


def test_body_containing_blank_lines() -> None:
    body = b"\r\n\r\nline\r\n\r\n\r\n"
    req = parse_request(invite(body=body))
    assert req.body == body
    assert parse_request(req.to_bytes(), stream=True).body == body


def test_duplicate_equal_content_length_is_accepted() -> None:
    data = sip("MESSAGE sip:d@example.net SIP/2.0", *HEADERS[:5], "CSeq: 7 MESSAGE", "l: 2",
               "Content-Length: 0002", body=b"ok")
    assert parse_request(data).body == b"ok"


def test_non_utf8_in_free_text_is_kept_byte_for_byte() -> None:
    data = invite(b"Subject: caf\xe9 cr\xe8me", b'X-Name: "M\xfcller"')
    req = parse_request(data)
    assert req.to_bytes() == data
    assert safe_text(req.headers.get("Subject") or "") == "caf\ufffd cr\ufffdme"
    roundtrip(req)


def test_non_utf8_display_name_is_tolerated() -> None:
    data = invite().replace(b'"Carol"', b'"Z\xfcrich"')
    req = parse_request(data)
    assert req.to_bytes() == data
    assert safe_text(req.from_.display_name or "") == "Z\ufffdrich"


def test_message_without_final_blank_line_but_with_line_end() -> None:
    data = invite().removesuffix(b"\r\n")
    assert parse_request(data).call_id == "8c3d-11ef@edge.example.net"


def test_register_with_star_contact() -> None:
    data = sip("REGISTER sip:example.net SIP/2.0", *HEADERS[:5], "CSeq: 9 REGISTER", "Contact: *", "Expires: 0")
    req = parse_request(data)
    assert req.contacts == [] and req.headers.get("Contact") == "*"


# --------------------------------------------------------------------------- malformed input

# (id, data, respondable): respondable means a 400 can be sent (SipParseError.partial is set).
REQ = "INVITE sip:dave@example.net SIP/2.0"
CORE = ("Via", "From", "To", "Call-ID", "CSeq")
WITHOUT = {name: tuple(h for h in HEADERS if not h.startswith(name)) for name in CORE}
MALFORMED: list[tuple[str, bytes, bool]] = [
    # start lines
    ("two-element request line", sip("INVITE sip:dave@example.net", *HEADERS), True),
    ("double space in request line", sip("INVITE  sip:dave@example.net SIP/2.0", *HEADERS), True),
    ("trailing element", sip("INVITE sip:dave@example.net SIP/2.0 extra", *HEADERS), True),
    ("unsupported version", sip("INVITE sip:dave@example.net SIP/7.0", *HEADERS), True),
    ("space in request-uri", sip("INVITE sip:dave smith@example.net SIP/2.0", *HEADERS), True),
    ("request-uri without scheme", sip("INVITE dave@example.net SIP/2.0", *HEADERS), True),
    ("request-uri bad port", sip("INVITE sip:dave@example.net:70000 SIP/2.0", *HEADERS), True),
    ("request-uri bad escape", sip("INVITE sip:dave%g1@example.net SIP/2.0", *HEADERS), True),
    ("request-uri with angle brackets", sip("INVITE <sip:dave@example.net> SIP/2.0", *HEADERS), True),
    ("request-uri non-utf8", sip(b"INVITE sip:d\xffve@example.net SIP/2.0", *HEADERS), True),
    ("method not a token", sip("INV(TE sip:dave@example.net SIP/2.0", *HEADERS), False),
    ("non-utf8 method", sip(b"INV\xc3TE sip:dave@example.net SIP/2.0", *HEADERS), False),
    ("tab-separated start line", sip("INVITE\tsip:dave@example.net\tSIP/2.0", *HEADERS), False),
    ("http request", sip("GET / HTTP/1.1", "Host: example.net"), False),
    ("status code too short", sip("SIP/2.0 20 OK", *HEADERS), False),
    ("status code out of range", sip("SIP/2.0 700 Nope", *HEADERS), False),
    ("status line without space", sip("SIP/2.0 200OK", *HEADERS), False),
    ("response version", sip("SIP/2.1 200 OK", *HEADERS), False),
    # CSeq
    ("cseq without number", invite().replace(b"CSeq: 7 INVITE", b"CSeq: INVITE"), False),
    ("cseq negative", invite().replace(b"CSeq: 7 INVITE", b"CSeq: -7 INVITE"), False),
    ("cseq without method", invite().replace(b"CSeq: 7 INVITE", b"CSeq: 7"), False),
    ("cseq too big", invite().replace(b"CSeq: 7 INVITE", b"CSeq: 2147483648 INVITE"), True),
    ("cseq absurdly big", invite().replace(b"CSeq: 7 INVITE", b"CSeq: 1234567890123456789012 INVITE"), False),
    ("cseq extra word", invite().replace(b"CSeq: 7 INVITE", b"CSeq: 7 INVITE now"), False),
    ("cseq unicode digit", invite().replace(b"CSeq: 7 INVITE", "CSeq: ٧ INVITE".encode()), False),
    ("cseq method mismatch", invite().replace(b"CSeq: 7 INVITE", b"CSeq: 7 ACK"), True),
    ("two cseq lines", invite("CSeq: 8 INVITE"), True),
    # required headers
    ("missing via", sip(REQ, *WITHOUT["Via"]), False),
    ("missing from", sip(REQ, *WITHOUT["From"]), False),
    ("missing to", sip(REQ, *WITHOUT["To"]), False),
    ("missing call-id", sip(REQ, *WITHOUT["Call-ID"]), False),
    ("missing cseq", sip(REQ, *WITHOUT["CSeq"]), False),
    ("empty call-id", sip(REQ, *WITHOUT["Call-ID"], "Call-ID:"), False),
    ("call-id with space", sip(REQ, *WITHOUT["Call-ID"], "Call-ID: two words"), True),
    ("two from headers", invite('From: "X" <sip:x@example.org>;tag=2'), True),
    ("two to headers", invite("t: <sip:y@example.org>"), True),
    # Content-Length
    ("negative content-length", sip(REQ, *HEADERS, "Content-Length: -1"), True),
    ("non-numeric content-length", sip(REQ, *HEADERS, "Content-Length: ten"), True),
    ("empty content-length", sip(REQ, *HEADERS, "Content-Length:"), True),
    ("content-length with sign", sip(REQ, *HEADERS, "l: +3", body=b"abc"), True),
    ("content-length unicode digit", sip(REQ, *HEADERS, "l: ³".encode(), body=b"abc"), True),
    ("content-length too many digits", sip(REQ, *HEADERS, "l: 00000000003", body=b"abc"), True),
    ("conflicting content-length", sip(REQ, *HEADERS, "Content-Length: 3", "l: 4", body=b"abcd"), True),
    ("content-length beyond datagram", sip(REQ, *HEADERS, "Content-Length: 50", body=b"short"), True),
    # Via, addresses, other headers
    ("top via unparseable", invite().replace(b"SIP/2.0/UDP edge", b"SIP/2.0/UDP edge junk"), False),
    ("second via unparseable", invite("Via: nonsense"), True),
    ("via line without colon", invite().replace(b"Via: SIP", b"Via SIP"), False),
    ("from without closing bracket", invite().replace(b"<sip:carol@example.org>", b"<sip:carol@example.org"), True),
    ("from with junk after address", invite().replace(b";tag=f00d", b" junk;tag=f00d"), True),
    ("to with bad uri", invite().replace(b"<sip:dave@example.net>", b"<sip:dave@exa mple.net>"), True),
    ("contact garbage", invite("Contact: <<sip:x@y>>"), True),
    ("max-forwards not numeric", invite().replace(b"Max-Forwards: 70", b"Max-Forwards: many"), True),
    ("max-forwards over 255", invite().replace(b"Max-Forwards: 70", b"Max-Forwards: 256"), True),
    ("unquoted display name with comma", invite().replace(b'"Carol"', b"Doe, Carol"), True),
    ("addr-spec with uri headers", invite().replace(b"To: <sip:dave@example.net>", b"To: sip:dave@example.net?x=y"),
     True),
    ("request-uri with headers", sip("INVITE sip:dave@example.net?Route=%3Csip:p.example.net%3E SIP/2.0", *HEADERS),
     True),
    ("header line without colon", invite("This is not a header"), True),
    ("header name with space", invite("Bad Name: value"), True),
    ("empty header name", invite(": value"), True),
    ("continuation before first header", sip(REQ, " folded start", *HEADERS), True),
    ("nul in subject", invite(b"Subject: a\x00b"), True),
    ("bare cr in subject", invite(b"Subject: a\rb"), True),
    ("bare cr in to", invite().replace(b"To: <sip", b"To: \r<sip"), False),
    ("escape char in call-id", invite().replace(b"Call-ID: 8c3d", b"Call-ID: 8c\x1b3d"), False),
    ("non-utf8 header name", invite(b"X-N\xe4me: v"), True),
    # whole-message damage
    ("empty", b"", False),
    ("only crlfs", b"\r\n\r\n\r\n", False),
    ("no end of headers", invite().rstrip(b"\r\n") + b"\r\nSubject: cut off", False),
    ("garbage", b"\x00\x01\x02\xff\xfe\r\n\r\n", False),
    ("utf-16", "INVITE sip:x@y SIP/2.0\r\n\r\n".encode("utf-16"), False),
]


@pytest.mark.parametrize(("data", "respondable"), [(d, r) for _, d, r in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_malformed(data: bytes, respondable: bool) -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    error = info.value
    assert error.reason and not error.reason.startswith("internal")
    assert (error.partial is not None) == respondable, error.reason
    if error.partial is not None:
        check_400(error.partial, data)


def check_400(partial: Request, original: bytes) -> None:
    """A 400 built from ``partial`` serialises, re-parses and is routed like the request."""
    reply = make_response(partial, 400, to_tag="t400")
    back = parse_response(reply.to_bytes())
    assert back.status == 400
    assert back.call_id == partial.call_id
    assert back.headers.raw_values("Via") == partial.headers.raw_values("Via")
    assert back.headers.get("CSeq") == partial.headers.get("CSeq")
    assert back.headers.raw_values("Via")[0].encode() in original


def test_stream_content_length_mismatch_and_missing() -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(sip(REQ, *HEADERS, body=b"body"), stream=True)
    assert info.value.partial is not None
    with pytest.raises(SipParseError):
        parse_message(sip(REQ, *HEADERS, "l: 9", body=b"body"), stream=True)


def test_malformed_responses_are_never_respondable() -> None:
    good = ("Via: SIP/2.0/UDP edge.example.net;branch=z9hG4bKr", "From: <sip:c@example.org>;tag=1",
            "To: <sip:d@example.net>;tag=2", "Call-ID: r1", "CSeq: 1 INVITE")
    for broken in [
        sip("SIP/2.0 200 OK", *good[1:]),
        sip("SIP/2.0 200 OK", *good[:4]),
        sip("SIP/2.0 200 OK", *good, "CSeq: 2 INVITE"),
        sip("SIP/2.0 200 OK", *good, "Content-Length: 10", body=b"x"),
        sip("SIP/2.0 200 OK", *good, "Garbage line"),
        sip(b"SIP/2.0 200 O\x01K", *good),
    ]:
        with pytest.raises(SipParseError) as info:
            parse_message(broken)
        assert info.value.partial is None


# --------------------------------------------------------------------------- limits


def test_message_size_limit() -> None:
    data = invite(body=b"x" * 1000)
    limits = Limits(max_message_bytes=len(data) - 1)
    with pytest.raises(SipParseError, match="exceeds") as info:
        parse_message(data, limits)
    assert info.value.partial is None
    assert parse_message(data, Limits(max_message_bytes=len(data))).body == b"x" * 1000


def test_header_count_limit() -> None:
    many = [f"X-H{i}: {i}" for i in range(10)]
    data = invite(*many)
    count = len(HEADERS) + len(many) + 1  # + Content-Length
    assert len(parse_message(data, Limits(max_headers=count)).headers) == count - 1
    with pytest.raises(SipParseError, match="header fields") as info:
        parse_message(data, Limits(max_headers=count - 1))
    assert info.value.partial is None


def test_header_bytes_limit() -> None:
    data = invite("Subject: " + "s" * 500)
    head_len = data.index(b"\r\n\r\n")
    assert parse_message(data, Limits(max_header_bytes=head_len))
    with pytest.raises(SipParseError, match="header block"):
        parse_message(data, Limits(max_header_bytes=head_len - 1))
    with pytest.raises(SipParseError, match="header block"):
        parse_message(data.replace(b"\r\n\r\n", b"\r\n") + b"x" * 100, Limits(max_header_bytes=head_len - 1))


def test_many_folded_lines() -> None:
    data = invite("Subject: start", *[" x"] * 10000)
    req = parse_request(data)
    assert (req.headers.get("Subject") or "").count("x") == 10000


# --------------------------------------------------------------------------- building and serialising


def test_content_length_always_follows_the_body() -> None:
    req = parse_request(invite(body=b"original body"))
    req.body = b"new"
    assert b"\r\nContent-Length: 3\r\n" in req.to_bytes()
    assert parse_request(req.to_bytes()).body == b"new"
    req.body = b""
    assert parse_request(req.to_bytes()).body == b""
    req.headers.add("Content-Length", "99")  # ignored: derived from the body
    req.headers.set("l", "99")
    assert req.to_bytes().count(b"Content-Length") == 1
    assert b"Content-Length: 0\r\n" in req.to_bytes()


def test_headers_refuse_injection() -> None:
    headers = Headers()
    for name, value in [("X-A", "a\r\nVia: evil"), ("X-A", "a\nb"), ("X-A", "a\x00"), ("Bad Name", "v"), ("", "v")]:
        with pytest.raises(ValueError):
            headers.add(name, value)
    assert len(headers) == 0


def test_built_request_round_trips() -> None:
    headers = Headers([
        ("Via", "SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bKbuilt"),
        ("Max-Forwards", "70"),
        ("From", str(NameAddr(SipURI("example.net", user="carol"), 'Carol "C" \\', {"tag": "1"}))),
        ("To", str(NameAddr(SipURI("example.net", user="carol")))),
        ("Call-ID", "built-1"),
        ("CSeq", "1 REGISTER"),
        ("Contact", str(NameAddr(SipURI("[2001:db8::1]", user="carol", port=5070, params={"transport": "tcp"}),
                                 params={"expires": "600"}))),
    ])
    req = Request("register", SipURI("example.net"), headers, b"")
    assert req.method == "REGISTER"
    again = roundtrip(req)
    assert isinstance(again, Request)
    assert again.from_.display_name == 'Carol "C" \\'
    assert again.contacts[0].uri.host == "[2001:db8::1]" and again.contacts[0].params == {"expires": "600"}


def test_make_response_copies_and_tags() -> None:
    req = parse_request(invite("Record-Route: <sip:p1.example.net;lr>, <sip:p2.example.net;lr>",
                               "Via: SIP/2.0/UDP second.example.net;branch=z9hG4bK2"))
    ringing = make_response(req, 180, to_tag="tt")
    assert ringing.headers.raw_values("Via") == req.headers.raw_values("Via")
    assert ringing.headers.raw_values("Record-Route") == req.headers.raw_values("Record-Route")
    assert ringing.to.tag == "tt" and ringing.from_ == req.from_
    assert ringing.reason == "Ringing"
    trying = make_response(req, 100, to_tag="tt")
    assert trying.to.tag is None and "Record-Route" not in trying.headers
    final = make_response(req, 486, to_tag="tt", headers=[("Retry-After", "30")], body=b"b")
    assert "Record-Route" not in final.headers and final.headers.get("Retry-After") == "30"
    parsed = parse_response(final.to_bytes())
    assert parsed.cseq == (7, "INVITE") and parsed.body == b"b" and parsed.reason == "Busy Here"


def test_make_response_keeps_existing_to_tag() -> None:
    tagged = parse_request(invite().replace(b"To: <sip:dave@example.net>", b"To: <sip:dave@example.net> ; tag = old"))
    assert make_response(tagged, 200, to_tag="new").to.tag == "old"
    in_uri = parse_request(invite().replace(b"To: <sip:dave@example.net>", b"To: <sip:dave@example.net;tag=uri>"))
    reply = make_response(in_uri, 200, to_tag="new")
    assert reply.to.tag == "new" and reply.to.uri.params == {"tag": "uri"}


def test_response_round_trip_with_body() -> None:
    resp = Response(200, headers=Headers([
        ("Via", "SIP/2.0/UDP edge.example.net;branch=z9hG4bKr;received=2001:db8::9;rport=5060"),
        ("From", "<sip:c@example.org>;tag=1"), ("To", "<sip:d@example.net>;tag=2"),
        ("Call-ID", "r1"), ("CSeq", "1 INVITE"), ("Content-Type", "application/sdp"),
    ]), body=b"v=0\r\n\r\n")
    again = roundtrip(resp)
    assert again.top_via.params["received"] == "2001:db8::9"
