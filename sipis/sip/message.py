"""SIP messages (RFC 3261 §7, §20, §25): parse from bytes, build, serialise.

Headers keep the order and spelling they arrived with; names compare case-insensitively and
compact forms (``v:``, ``m:`` ...) are expanded on parse. Header fields that are comma-separated
lists (Via, Contact, Route ...) are split on demand by :meth:`Headers.get_all`, so a comma-joined
Via and two Via lines read the same. ``Content-Length`` is never stored: serialisation always
writes the real body length.

Parsing is strict where a mistake would be dangerous (line structure, control characters,
Content-Length, the headers a response is built from) and tolerant where real peers are sloppy
(bare LF line ends, non-UTF-8 bytes in display names and free-text headers, which are kept as
``surrogateescape`` characters so they serialise back byte for byte; see :func:`safe_text`).
Nothing but :class:`SipParseError` ever leaves :func:`parse_message`.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

# Final: compiled, they are constants in the code instead of a module attribute read at each use
SIP_VERSION: Final = "SIP/2.0"
CRLF: Final = "\r\n"

#: RFC 3261 §7.3.3 and later RFCs' compact forms.
COMPACT_FORMS: dict[str, str] = {
    "a": "Accept-Contact",
    "b": "Referred-By",
    "c": "Content-Type",
    "d": "Request-Disposition",
    "e": "Content-Encoding",
    "f": "From",
    "i": "Call-ID",
    "j": "Reject-Contact",
    "k": "Supported",
    "l": "Content-Length",
    "m": "Contact",
    "n": "Identity-Info",
    "o": "Event",
    "r": "Refer-To",
    "s": "Subject",
    "t": "To",
    "u": "Allow-Events",
    "v": "Via",
    "x": "Session-Expires",
    "y": "Identity",
}

_CANONICAL_NAMES = [
    "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Max-Forwards", "Expires", "Min-Expires",
    "Content-Type", "Content-Length", "Route", "Record-Route", "Allow", "Supported", "Require",
    "User-Agent", "Server", "WWW-Authenticate", "Authorization", "Proxy-Authenticate",
    "Proxy-Authorization", "Retry-After", "Reason", "Path", "Service-Route", "Event", "Date",
]
_CANONICAL = {name.lower(): name for name in _CANONICAL_NAMES}

#: Headers whose value is a comma-separated list (RFC 3261 §7.3.1), so may be comma-joined.
LIST_HEADERS = frozenset(
    {
        "via", "contact", "route", "record-route", "allow", "supported", "require",
        "proxy-require", "unsupported", "accept", "accept-encoding", "accept-language",
        "path", "service-route", "allow-events", "content-encoding", "in-reply-to",
    }
)

_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")

REASON_PHRASES: dict[int, str] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 301: "Moved Permanently",
    302: "Moved Temporarily", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 407: "Proxy Authentication Required",
    408: "Request Timeout", 413: "Request Entity Too Large", 414: "Request-URI Too Long",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    421: "Extension Required", 423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here", 491: "Request Pending",
    500: "Server Internal Error", 501: "Not Implemented", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large",
    600: "Busy Everywhere", 603: "Decline",
}

# Characters RFC 3261 §25.1 allows in URIs, plus "#" which real dial strings carry unescaped.
_URI_TEXT = re.compile(r"[A-Za-z0-9\-_.!~*'()%;?/:@&=+$,\[\]#]+")
_HOST = re.compile(r"[A-Za-z0-9\-._]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Control characters other than HTAB: never legal in a header line, and a bare CR or NUL copied
# into a response could split it (header injection).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
# The control bytes but CR and LF, to delete with bytes.translate (a C loop, unlike a regex).
_CONTROL_BYTES_BUT_CRLF = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
# what surrogateescape makes of undecodable bytes (spelled with chr: mypyc takes no surrogate literals)
_NON_UTF8 = re.compile(f"[{chr(0xDC80)}-{chr(0xDCFF)}]")
_STATUS_LINE = re.compile(r"SIP/2\.0 ([1-6][0-9][0-9])(?: (.*))?", re.IGNORECASE | re.DOTALL)
_VIA_PROTOCOL = re.compile(r"SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*([^\s/]+)[ \t]+(.*)", re.IGNORECASE | re.DOTALL)
_HOSTPORT_COLON = re.compile(r"[ \t]*:[ \t]*")
# Unquoted generic-param values: RFC 3261 allows token / host; anything printable without
# separators is accepted so sloppy peers' Contact parameters still parse.
_PARAM_VALUE_BAD = re.compile(r'[\s";,\x00-\x1f\x7f]')
# A parameter list that the general loop in _parse_generic_params would accept as it is, read
# in one go: ";name" or ";name=value" with a token name and a value that is unquoted, or quoted
# without backslash escapes (such as Kamailio's received="sip:...").
_PLAIN_PARAM_TEXT = (r";[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*"
                     r"(?:(=)[ \t]*(\"[^\"\\]*\"|[^\s\";,\x00-\x1f\x7f]+)[ \t]*)?")
_PLAIN_PARAM = re.compile(_PLAIN_PARAM_TEXT)
_PLAIN_PARAMS = re.compile(f"(?:{_PLAIN_PARAM_TEXT})+")
# The usual Via in one match: "SIP/2.0/UDP host:port;params" with a token transport, a host name
# or IPv4 address, an optional port and plain parameters (IPv6, LWS and the rest: Via.parse).
_PLAIN_VIA = re.compile(r"SIP/2\.0/([A-Za-z0-9\-.!%*_+`'~]+) ([A-Za-z0-9\-._]+)(?::([0-9]{1,5}))?"
                        f"((?:{_PLAIN_PARAM_TEXT})*)")


class SipParseError(ValueError):
    """The bytes are not a valid SIP message.

    ``partial`` is the request as far as it could be read when enough of it (start line and the
    headers needed for a response) was intact, so the caller can answer ``400``.
    """

    def __init__(self, reason: str, partial: Request | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial


@dataclass(frozen=True)
class Limits:
    """Hard limits applied while parsing; anything beyond them is a parse error."""

    max_message_bytes: int = 8 * 1024 * 1024
    max_headers: int = 256
    max_header_bytes: int = 64 * 1024


DEFAULT_LIMITS = Limits()


def canonical_name(name: str) -> str:
    """The usual spelling of a header name; compact forms are expanded."""
    known = _SPELLINGS.get(name)
    if known is not None:
        return known
    lower = name.lower()
    if len(lower) == 1 and lower in COMPACT_FORMS:
        return COMPACT_FORMS[lower]
    return _CANONICAL.get(lower, name)


def _known_spellings() -> dict[str, str]:
    """Spellings that occur in practice -> canonical name, so the usual case is one dict lookup."""
    spellings = {short: long for short, long in COMPACT_FORMS.items()}
    spellings.update({short.upper(): long for short, long in COMPACT_FORMS.items()})
    for name in _CANONICAL_NAMES:
        spellings.update(dict.fromkeys((name, name.lower(), name.upper()), name))
    return spellings


_SPELLINGS = _known_spellings()
#: The same spellings -> the key headers are compared by (the lower-cased canonical name).
_KEYS = {spelling: name.lower() for spelling, name in _SPELLINGS.items()}
#: The same spellings -> (canonical name, key), for the parser's one lookup per field.
_FIELD_NAMES = {spelling: (name, name.lower()) for spelling, name in _SPELLINGS.items()}


def header_key(name: str) -> str:
    """What header names compare by: the canonical name, lower-cased (``v``, ``VIA`` -> ``via``)."""
    key = _KEYS.get(name)
    return key if key is not None else canonical_name(name).lower()


def is_token(text: str) -> bool:
    return _TOKEN.fullmatch(text) is not None


def safe_text(text: str) -> str:
    """``text`` with undecodable bytes (kept as surrogates by the parser) shown as U+FFFD.

    Use it before handing header values to anything that needs clean Unicode (JSON, the console).
    """
    return _NON_UTF8.sub("\ufffd", text)


def _is_digits(text: str, max_len: int) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts "²" and friends, which int() rejects."""
    return 0 < len(text) <= max_len and text.isascii() and text.isdigit()


# One element of a comma-separated list: runs of quoted strings (backslash escapes; an unterminated
# one runs to the end), <...> (no quoting inside; an unclosed one runs to the end) and any other
# character but the comma.
_LIST_ELEMENT = re.compile(r'(?:"(?:[^"\\]|\\.)*"?|<[^>]*>?|[^,"<])+', re.DOTALL)


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value, ignoring commas in quotes or ``<...>``."""
    if "," not in value:
        value = value.strip()
        return [value] if value else []
    plain = '"' not in value and "<" not in value  # the usual case: every comma separates
    parts = value.split(",") if plain else _LIST_ELEMENT.findall(value)
    return [stripped for part in parts if (stripped := part.strip())]


def first_list_element(value: str) -> str | None:
    """``split_list(value)[0]`` (None for an empty list) without splitting the rest."""
    if '"' not in value and "<" not in value:
        while True:
            head, comma, value = value.partition(",")
            head = head.strip()
            if head or not comma:
                return head or None
    for match in _LIST_ELEMENT.finditer(value):
        stripped = match[0].strip()
        if stripped:
            return stripped
    return None


def _split_params(text: str) -> list[str]:
    """Split ``a;b=1;c="x;y"`` on semicolons outside quotes."""
    if '"' not in text:
        return text.split(";")
    parts: list[str] = []
    current: list[str] = []
    in_quotes = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif in_quotes and ch == "\\":
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == ";" and not in_quotes:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ``;name=value;flag`` parameters (leading semicolon optional). Names are lower-cased."""
    params: dict[str, str | None] = {}
    for part in _split_params(text.lstrip(";")):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        params[name.strip().lower()] = value.strip() if eq else None
    return params


def _parse_generic_params(text: str) -> dict[str, str | None]:
    """Header parameters after an address or Via (``;tag=1;lr;x="a b"``), validated.

    ``text`` is empty or starts with ``;``. Names must be tokens; values a quoted string or a
    run of printable characters without separators, so they serialise back unchanged.
    """
    params: dict[str, str | None] = {}
    text = text.strip()
    if not text:
        return params
    if _PLAIN_PARAMS.fullmatch(text):
        # the usual case, no odd or empty parameters, read in one go: the loop below cost 4.9 %
        # of a registration's instructions on TCP, where Kamailio adds received="..." to our
        # Contact (register_rate under callgrind: 23k of 471k)
        return _plain_params(text)
    if not text.startswith(";"):
        raise SipParseError(f"junk before parameters: {text[:80]!r}")
    for part in _split_params(text)[1:]:
        part = part.strip()
        if not part:
            continue  # ";;" or a trailing ";": harmless
        name, eq, value = part.partition("=")
        name, value = name.strip(" \t"), value.strip(" \t")
        if _TOKEN.fullmatch(name) is None:
            raise SipParseError(f"bad parameter name {name[:40]!r}")
        if eq and not _is_param_value(value):
            raise SipParseError(f"bad value for parameter {name[:40]!r}: {value[:40]!r}")
        params[name.lower()] = value if eq else None
    return params


def _plain_params(text: str) -> dict[str, str | None]:
    """Parameters from text that _PLAIN_PARAMS matches in full."""
    return {name.lower(): value if eq else None for name, eq, value in _PLAIN_PARAM.findall(text)}


def _is_param_value(value: str) -> bool:
    if value.startswith('"'):
        try:
            _, end = _read_quoted(value, 0)
        except SipParseError:
            return False
        return end == len(value)
    return bool(value) and _PARAM_VALUE_BAD.search(value) is None


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """Unescape the quoted string opening at ``text[start]``; returns (content, index after it)."""
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise SipParseError(f"unterminated quoted string {text[:80]!r}")


def format_params(params: dict[str, str | None]) -> str:
    """``;name=value;flag`` as the parameters read."""
    text = ""
    for name, value in params.items():
        text += f";{name}" if value is None else f";{name}={value}"
    return text


_RANDOM_CHUNK = 16  # bytes handed out at a time (the longest token asks for 16)
_RANDOM_READ = 4096  # bytes read from the OS at a time
_random_chunks: Iterator[bytes] = iter(())


def _random_chunk() -> bytes:
    """16 bytes from ``os.urandom``, read 4 KiB at a time and handed out in slices: every branch,
    tag, Call-ID and cnonce is as random as ``secrets.token_hex`` makes it, for one system call
    per 256 of them instead of one each. ``next`` on the shared iterator is atomic, so threads
    never get the same slice; a forked child starts afresh (it must not reuse its parent's)."""
    global _random_chunks
    chunk = next(_random_chunks, None)
    if chunk is None:
        data = os.urandom(_RANDOM_READ)
        chunks = [data[i:i + _RANDOM_CHUNK] for i in range(0, _RANDOM_READ, _RANDOM_CHUNK)]
        chunk = chunks.pop()
        _random_chunks = iter(chunks)
    return chunk


def _forget_random_chunks() -> None:
    global _random_chunks
    _random_chunks = iter(())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_random_chunks)


def random_hex(nbytes: int) -> str:
    """``secrets.token_hex(nbytes)`` (``nbytes`` random bytes from the OS as hex), pooled."""
    if nbytes > _RANDOM_CHUNK:
        return os.urandom(nbytes).hex()
    return _random_chunk()[:nbytes].hex()


def new_branch() -> str:
    """A fresh RFC 3261 magic-cookie branch."""
    return "z9hG4bK" + _random_chunk()[:10].hex()


def new_tag() -> str:
    return _random_chunk()[:6].hex()


def new_call_id() -> str:
    return _random_chunk().hex()


# --------------------------------------------------------------------------- URIs and addresses


def _check_uri_chars(rest: str, text: str) -> None:
    if _URI_TEXT.fullmatch(rest) is None or ("%" in rest and _BAD_ESCAPE.search(rest)):
        raise SipParseError(f"bad characters in URI {text[:80]!r}")


@dataclass(slots=True)
class SipURI:
    """A ``sip:``/``sips:`` URI (RFC 3261 §19.1). ``host`` keeps IPv6 brackets.

    :meth:`parse_any` also holds other absolute URIs (``tel:``, ``urn:``) for From/To/Contact:
    then ``scheme`` is that scheme and ``host`` the opaque rest, so ``str()`` gives it back.
    """

    host: str
    user: str | None = None
    password: str | None = None
    port: int | None = None
    scheme: str = "sip"
    params: dict[str, str | None] = field(default_factory=dict)
    headers: str = ""

    @classmethod
    def parse(cls, text: str) -> SipURI:
        text = text.strip()
        scheme, colon, rest = text.partition(":")
        scheme = scheme.lower()
        if not colon or scheme not in ("sip", "sips"):
            raise SipParseError(f"not a sip: or sips: URI: {text[:80]!r}")
        _check_uri_chars(rest, text)
        user = password = None
        # userinfo first: the user part may itself hold ";" and "?" (RFC 3261 user-unreserved),
        # while "@" can appear nowhere else in a SIP URI.
        userinfo, at, hostpart = rest.partition("@")
        if at:
            user, _, pw = userinfo.partition(":")
            password = pw or None
            if not user:
                raise SipParseError(f"empty user part in URI: {text[:80]!r}")
            rest = hostpart
        if "?" not in rest and ";" not in rest and "[" not in rest and " " not in rest:
            # the usual host[:port] alone: _split_hostport without its IPv6 and spacing cases
            # (0.9 % of a registration's instructions: register_rate under callgrind, UDP: 4k of 452k)
            host, colon, port_text = rest.partition(":")
            if _HOST.fullmatch(host) is not None and (
                    not colon or (_is_digits(port_text, 5) and 0 < int(port_text) < 65536)):
                return cls(host, user, password, int(port_text) if colon else None, scheme, {}, "")
        rest, _, uri_headers = rest.partition("?")
        hostport, *param_parts = rest.split(";")
        host, port = _split_hostport(hostport)
        params = parse_params(";".join(param_parts)) if param_parts else {}
        if "" in params:
            raise SipParseError(f"empty URI parameter name in {text[:80]!r}")
        return cls(host=host, user=user, password=password, port=port, scheme=scheme,
                   params=params, headers=uri_headers)

    @classmethod
    def parse_any(cls, text: str) -> SipURI:
        """Any absolute URI: ``sip:``/``sips:`` parsed fully, other schemes kept opaque in ``host``."""
        text = text.strip()
        scheme, colon, rest = text.partition(":")
        if scheme.lower() in ("sip", "sips"):
            return cls.parse(text)
        if not colon or not _SCHEME.fullmatch(scheme):
            raise SipParseError(f"not an absolute URI: {text[:80]!r}")
        _check_uri_chars(rest, text)
        return cls(host=rest, scheme=scheme.lower())

    @property
    def transport(self) -> str:
        """The transport this URI asks for: ``tls`` for sips:, else the transport param or udp."""
        if self.scheme == "sips":
            return "tls"
        value = self.params.get("transport")
        return value.lower() if value else "udp"

    @property
    def hostport(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def aor(self) -> str:
        """``scheme:user@host`` without port and parameters, as a registrar keys bindings."""
        return f"{self.scheme}:{self.user}@{self.host}" if self.user else f"{self.scheme}:{self.host}"

    def __str__(self) -> str:
        userinfo = ""
        if self.user is not None:
            userinfo = self.user + (f":{self.password}" if self.password else "") + "@"
        text = f"{self.scheme}:{userinfo}{self.hostport}{format_params(self.params)}"
        return f"{text}?{self.headers}" if self.headers else text


def _split_hostport(text: str) -> tuple[str, int | None]:
    text = text.strip()
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"unterminated IPv6 reference: {text[:80]!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise SipParseError(f"bad IPv6 reference {host[:80]!r}") from None
        if rest and not rest.startswith(":"):
            raise SipParseError(f"bad host:port {text[:80]!r}")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = text.partition(":")
        port_text = port_text_ if colon else None
        if _HOST.fullmatch(host) is None:
            raise SipParseError(f"bad host {text[:80]!r}")
    if port_text is None:
        return host, None
    if not _is_digits(port_text, 5) or not 0 < int(port_text) < 65536:
        raise SipParseError(f"bad port in {text[:80]!r}")
    return host, int(port_text)


@dataclass(slots=True)
class NameAddr:
    """A From/To/Contact/Route value: optional display name, URI, header parameters (tag, expires...).

    Both the name-addr (``"Bob" <sip:bob@h;transport=tcp>;tag=1``) and the addr-spec
    (``sip:bob@h;tag=1``, where the parameters belong to the header) forms are accepted. The URI
    may be any absolute URI (see :meth:`SipURI.parse_any`).
    """

    uri: SipURI
    display_name: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        text = text.strip()
        lt = _find_unquoted(text, "<")
        if lt < 0:
            return cls._parse_addr_spec(text)
        gt = text.find(">", lt)
        if gt < 0:
            raise SipParseError(f"unbalanced <> in address {text[:80]!r}")
        display = _parse_display_name(text[:lt].strip())
        uri = SipURI.parse_any(text[lt + 1 : gt])
        params = _parse_generic_params(text[gt + 1 :])
        return cls(uri=uri, display_name=display, params=params)

    @classmethod
    def _parse_addr_spec(cls, text: str) -> NameAddr:
        # A URI with "?", "," or ";" of its own must be written in <> (RFC 3261 §20.10).
        if any(ch in text for ch in '"<>?'):
            raise SipParseError(f"bad address {text[:80]!r}")
        # In an addr-spec the first ";" already starts the header parameters (RFC 3261 §20).
        uri_text, semi, rest = text.partition(";")
        return cls(uri=SipURI.parse_any(uri_text), params=_parse_generic_params(semi + rest))

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        return format_address(str(self.uri), self.display_name, format_params(self.params))


def format_address(uri: str, display_name: str | None = None, params: str = "") -> str:
    """``"Display" <uri>;params`` as :class:`NameAddr` writes it, from ready-made text parts
    (``params`` formatted, leading ``;`` included) for callers that have no NameAddr to hand."""
    if not display_name:
        return f"<{uri}>{params}"
    escaped = display_name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{uri}>{params}'


# An unquoted display name is tokens and spaces (RFC 3261 §25.1); letters beyond ASCII are
# tolerated, separators are not (``Bell, Alexander <sip:...>`` is two list elements or garbage).
_DISPLAY_SEPARATOR = re.compile(r'[()<>@,;:\\"/\[\]?={}]')


def _parse_display_name(text: str) -> str | None:
    if not text:
        return None
    if text.startswith('"'):
        content, end = _read_quoted(text, 0)
        if end != len(text):
            raise SipParseError(f"junk after quoted display name {text[:80]!r}")
        return content
    if _DISPLAY_SEPARATOR.search(text):
        raise SipParseError(f"display name needs quotes: {text[:80]!r}")
    return text


def _find_unquoted(text: str, needle: str) -> int:
    if '"' not in text:
        return text.find(needle)
    in_quotes = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif in_quotes and ch == "\\":
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == needle and not in_quotes:
            return i
    return -1


@dataclass(slots=True)
class Via:
    """One Via value (RFC 3261 §20.42): ``SIP/2.0/TCP host:port;branch=...;rport``."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Via:
        stripped = text.strip()
        quick = _quick_via(stripped)
        if quick is not None:
            return quick
        plain = _PLAIN_VIA.fullmatch(stripped)
        if plain is not None and (plain[3] is None or 0 < int(plain[3]) < 65536):
            transport, host, port, params = plain.group(1, 2, 3, 4)
            return cls(transport=transport.upper(), host=host, port=int(port) if port else None,
                       params=_plain_params(params))
        match = _VIA_PROTOCOL.fullmatch(stripped)
        if match is None or not is_token(match[1]):
            raise SipParseError(f"bad Via {text[:80]!r}")
        sent_by, semi, rest = match[2].partition(";")
        sent_by = sent_by.strip()
        if " " in sent_by or "\t" in sent_by:  # RFC 3261 allows LWS around the ":" of sent-by
            sent_by = _HOSTPORT_COLON.sub(":", sent_by)
        host, port = _split_hostport(sent_by)
        params = _parse_generic_params(semi + rest)
        return cls(transport=match[1].upper(), host=host, port=port, params=params)

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def sent_by(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"SIP/2.0/{self.transport} {self.sent_by}{format_params(self.params)}"


def make_via(transport: str, local: tuple[str, int]) -> tuple[str, str]:
    """(branch, value) of our Via for a new request sent from ``local`` over ``transport``: a new
    branch, and ``rport`` to have responses come back to where we sent from (RFC 3581)."""
    host, port = local
    if ":" in host:
        host = f"[{host}]"
    branch = new_branch()
    # str(Via(transport.upper(), host, port, {"rport": None, "branch": branch})), written directly:
    # building the Via to print it cost 2.5 % of a registration's instructions (register_rate
    # under callgrind, UDP: 11k of 450k; every REGISTER takes a new Via)
    return branch, f"SIP/2.0/{transport.upper()} {host}:{port};rport;branch={branch}"


_VIA_TRANSPORTS = {name: name.upper() for upper in ("UDP", "TCP", "TLS", "SCTP", "WS", "WSS")
                   for name in (upper, upper.lower())}
# The Via most peers write, "SIP/2.0/UDP host:port;branch=..;rport=..", in one tight match: a
# transport, a host name or IPv4 address, a port, and parameters of token characters, "=" and ";"
# only (whether they make well-formed parameters is checked apart, far faster than a regex can).
# Reading every Via the general way instead (and building it for each response, whose branch is
# all we need) cost 15 % of a registration's instructions (register_rate under callgrind, UDP:
# 69k of 452k).
_QUICK_VIA = re.compile(r"SIP/2\.0/([A-Za-z]+) ([A-Za-z0-9\-._]+)(?::([0-9]{1,5}))?"
                        r"(;[;=A-Za-z0-9\-.!%*_+`'~]*)?")
_QUICK_VIA_PARAM = re.compile(r";([^;=]+)=?([^;]*)")


class _NotQuick:
    pass


_NOT_QUICK = _NotQuick()


def _quick_via_match(text: str) -> tuple[str, str, int | None, str | None] | None:
    """(transport, host, port, parameter text) of a Via _QUICK_VIA matches and Via.parse would
    read alike, or None (then only Via.parse can tell)."""
    match = _QUICK_VIA.fullmatch(text)
    if match is None:
        return None
    transport_text, host, port_text, rest = match.groups()
    transport = _VIA_TRANSPORTS.get(transport_text)
    if transport is None:
        return None
    port = None
    if port_text is not None:
        port = int(port_text)
        if not 0 < port < 65536:
            return None
    # every parameter a name, maybe "=" and a value (no empty name or value, nothing empty)
    if rest and (";;" in rest or ";=" in rest or "=;" in rest or rest[-1] in ";="):
        return None
    return transport, host, port, rest


def _quick_branch(text: str) -> str | _NotQuick | None:
    """``Via.parse(text).branch`` for a Via that _quick_via_match reads (so it parses), without
    the Via: None when it has no branch; _NOT_QUICK for any other Via (or two branch-like names)."""
    parts = _quick_via_match(text)
    if parts is None:
        return _NOT_QUICK
    rest = parts[3]
    if not rest:
        return None
    lowered = rest.lower()
    count = lowered.count(";branch")
    if count != 1:
        return None if count == 0 else _NOT_QUICK  # of several, which wins is the parser's call
    at = lowered.find(";branch=")
    if at < 0:
        return None  # a ";branch" flag (no value) or a ";branchx..." name: no branch value
    end = rest.find(";", at + 8)
    return rest[at + 8:end] if end >= 0 else rest[at + 8:]


def _quick_via(text: str) -> Via | None:
    """The usual Via (see _QUICK_VIA) without the general parser; None for anything else, which
    Via.parse then reads the general way (to the same result)."""
    parts = _quick_via_match(text)
    if parts is None:
        return None
    transport, host, port, rest = parts
    if not rest:
        return Via(transport, host, port, {})
    pairs = _QUICK_VIA_PARAM.findall(rest)
    params: dict[str, str | None] = dict(pairs)
    if len(params) != len(pairs) or "" in params.values() or not "".join(params).islower():
        # repeated or flag parameters, upper case names: the dictionary the general way
        params = {name.lower(): value or None for name, value in pairs}
    return Via(transport, host, port, params)


# --------------------------------------------------------------------------- headers


class Headers:
    """Ordered, multi-valued, case-insensitive header fields.

    Lookups go through an index from key (:func:`header_key`) to values, kept up to date by every
    change, so reading a message costs one dict access per header name.

    The layout keeps the number of objects the garbage collector tracks small (two lists and this
    object; no tuple per field, and an index of plain strings, which it does not track at all):
    collections run over every live message, and many live on in transactions awaiting timers.
    """

    __slots__ = ("_index", "_names", "_values", "_version")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._names: list[str] = []
        self._values: list[str] = []
        #: key -> its value, or a tuple of its values when there are several
        self._index: dict[str, str | tuple[str, ...]] = {}
        #: counts changes made through add/prepend/remove (see Request.to_bytes)
        self._version = 0
        for name, value in items:
            self.add(name, value)

    @classmethod
    def from_canonical(cls, names: list[str], keys: list[str], values: list[str]) -> Headers:
        """Headers with these fields, for callers that build many at once from names they know:
        ``names`` in their canonical spelling, ``keys`` their :func:`header_key` (the caller's
        promise; no Content-Length among them). Values are checked like :meth:`add` does, in one
        pass over all of them; ValueError names the first bad one."""
        count = len(names)
        if len(keys) != count or len(values) != count:
            raise ValueError("names, keys and values differ in length")
        joined = "".join(values)
        if "\r" in joined or "\n" in joined or "\x00" in joined:
            for i in range(count):
                _checked_field(names[i], values[i])  # raises for the first bad value
        headers = Headers()  # its fields are replaced right here
        headers._names = names
        headers._values = values
        index: dict[str, str | tuple[str, ...]] = {}
        for i in range(count):
            key = keys[i]
            if key in index:  # a name more than once: a tuple of its values
                _index_add(index, key, values[i])
            else:
                index[key] = values[i]
        headers._index = index
        return headers

    def add(self, name: str, value: str) -> None:
        """Append a field. Raises ValueError for a non-token name or a value with CR, LF or NUL,
        which would split the serialised message (header injection)."""
        name, key, value = _checked_field(name, value)
        self._version += 1
        if key != "content-length":  # always derived from the body
            self._names.append(name)
            self._values.append(value)
            _index_add(self._index, key, value)

    def prepend(self, name: str, value: str) -> None:
        """Insert a field before all others (a new top Via), checked like :meth:`add`."""
        name, key, value = _checked_field(name, value)
        self._version += 1
        if key == "content-length":
            return
        self._names.insert(0, name)
        self._values.insert(0, value)
        _index_add(self._index, key, value, first=True)

    def set(self, name: str, value: str) -> None:
        """Replace every field of this name by one field."""
        self.remove(name)
        self.add(name, value)

    def remove(self, name: str) -> None:
        key = header_key(name)
        self._version += 1
        if key not in self._index:
            return
        kept = [(n, v) for n, v in zip(self._names, self._values, strict=True) if header_key(n) != key]
        self._names = [n for n, _ in kept]
        self._values = [v for _, v in kept]
        del self._index[key]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value; for list headers the first element of the list."""
        key = header_key(name)
        found = self._index.get(key)
        if found is None:
            return default
        if key not in LIST_HEADERS:
            return found if isinstance(found, str) else found[0]
        for value in (found,) if isinstance(found, str) else found:
            first = first_list_element(value)  # split only as far as the first element
            if first is not None:
                return first
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of this header, list headers split on commas."""
        key = header_key(name)
        raw = self._lookup(key)
        if key in LIST_HEADERS:
            return [part for value in raw for part in split_list(value)]
        return list(raw)

    def raw_values(self, name: str) -> list[str]:
        """Field values exactly as stored (list headers not split), e.g. to copy into a response."""
        return list(self._lookup(header_key(name)))

    def _lookup(self, key: str) -> tuple[str, ...]:
        """The stored values for ``key``."""
        found = self._index.get(key)
        if found is None:
            return ()
        return (found,) if isinstance(found, str) else found

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return header_key(name) in self._index

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(zip(self._names, self._values, strict=True)))

    def __len__(self) -> int:
        return len(self._names)

    def copy(self) -> Headers:
        clone = Headers()
        clone._names = list(self._names)
        clone._values = list(self._values)
        clone._index = dict(self._index)  # its values are strings and tuples: nothing to copy deeper
        return clone

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"


def _index_add(index: dict[str, str | tuple[str, ...]], key: str, value: str, *,
               first: bool = False) -> None:
    """Record one more value of ``key``: a lone value is kept as the string itself."""
    known = index.get(key)
    if known is None:
        index[key] = value
        return
    values = (known,) if isinstance(known, str) else known
    index[key] = (value, *values) if first else (*values, value)


def _checked_field(name: str, value: str) -> tuple[str, str, str]:
    """(canonical name, key, value) of a field to store; ValueError for what could inject headers."""
    canonical = _SPELLINGS.get(name)  # a known spelling is a token
    if canonical is None:
        canonical = canonical_name(name)
        if _TOKEN.fullmatch(canonical) is None:
            raise ValueError(f"refusing header {canonical[:40]!r}: {str(value)[:40]!r}")
    value = str(value)
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError(f"refusing header {canonical[:40]!r}: {value[:40]!r}")
    return canonical, header_key(canonical), value


# --------------------------------------------------------------------------- messages


class _Message:
    """What requests and responses share: headers, body and accessors for the core headers.

    The top Via and the CSeq are read by validation, transaction matching and the layers above,
    so their parsed forms are kept together with the header's stored value they were parsed
    from (the string, or the tuple of strings of a repeated header, in the headers' index): a
    cached value is used only while the header still holds that very object, so changing or
    replacing ``headers`` needs no invalidation. (The cache keeps the object alive, so no other
    can take its identity; strings and tuples are immutable, so the same object is the same text.)
    """

    __slots__ = ("__weakref__", "_branch_cache", "_cseq_cache", "_top_via", "_top_via_raw", "_wire",
                 "body", "headers")

    def __init__(self, headers: Headers, body: bytes) -> None:
        self.headers = headers
        self.body = body
        self._wire: tuple[Headers, int, object, object, bytes, bytes] | None = None  # Request.to_bytes
        self._top_via_raw: str | tuple[str, ...] | None = None  # what _top_via was parsed from
        self._top_via: Via | None = None
        self._branch_cache: tuple[str | tuple[str, ...], str | None] | None = None
        self._cseq_cache: tuple[str | tuple[str, ...], tuple[int, str]] | None = None

    @property
    def call_id(self) -> str:
        return self.headers.get("Call-ID") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        """(number, method) from CSeq; raises SipParseError when absent or malformed."""
        raw = self.headers._index.get("cseq")
        cached = self._cseq_cache
        if cached is not None and cached[0] is raw:
            return cached[1]
        if raw is None:
            raise SipParseError("missing CSeq")
        cseq = parse_cseq(raw if isinstance(raw, str) else raw[0])
        self._cseq_cache = (raw, cseq)
        return cseq

    def _known_cseq(self, number: int, method: str) -> None:
        """Tell the message what its CSeq header reads (its builder wrote it), sparing the parse."""
        raw = self.headers._index.get("cseq")
        if raw is not None:
            self._cseq_cache = (raw, (number, method))

    def _known_branch(self, branch: str) -> None:
        """Tell the message its top Via's branch (its builder wrote it), sparing the parse."""
        raw = self.headers._index.get("via")
        if raw is not None:
            self._branch_cache = (raw, branch)

    @property
    def vias(self) -> list[Via]:
        return [Via.parse(v) for v in self.headers.get_all("Via")]

    @property
    def top_via(self) -> Via:
        """The top Via, parsed; a copy the caller may change."""
        via = self.shared_top_via()
        return Via(via.transport, via.host, via.port, dict(via.params))

    def shared_top_via(self) -> Via:
        """The top Via, parsed once per value and shared by every caller: treat it as read-only."""
        raw = self.headers._index.get("via")
        if raw is not None and raw is self._top_via_raw and self._top_via is not None:
            return self._top_via
        first = self.headers.get("Via")
        if first is None:
            raise SipParseError("missing Via")
        via = Via.parse(first)
        self._top_via_raw, self._top_via = raw, via
        return via

    @property
    def branch(self) -> str | None:
        """The top Via's branch parameter (read without building the Via where it can be)."""
        raw = self.headers._index.get("via")
        cached = self._branch_cache
        if cached is not None and cached[0] is raw:
            return cached[1]
        branch = self.shared_top_via().branch
        if raw is not None:
            self._branch_cache = (raw, branch)
        return branch

    def _check_top_via(self) -> None:
        """Raise SipParseError unless the top Via parses: the usual one is only checked (and its
        branch kept), for a message whose Via may never be needed as a whole (a response)."""
        raw = self.headers._index.get("via")
        if type(raw) is str and "," not in raw:
            first: str | None = raw  # one Via value: it is the top one (what get("Via") returns)
        else:
            first = self.headers.get("Via")
        if raw is None or first is None:
            raise SipParseError("missing Via")
        branch = _quick_branch(first.strip())
        if branch is _NOT_QUICK:
            self.shared_top_via()
        else:
            self._branch_cache = (raw, branch)  # type: ignore[assignment]  # str | None here

    @property
    def from_(self) -> NameAddr:
        return _required_address(self.headers, "From")

    @property
    def to(self) -> NameAddr:
        return _required_address(self.headers, "To")

    @property
    def contacts(self) -> list[NameAddr]:
        return [NameAddr.parse(v) for v in self.headers.get_all("Contact") if v.strip() != "*"]

    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The start line, every field as ``Name: value``, the real Content-Length, the empty line
        and the body; non-UTF-8 bytes the parser kept go back out as they came."""
        headers, body = self.headers, self.body
        names, values = headers._names, headers._values
        parts = [self.start_line(), CRLF]
        for i in range(len(names)):  # one join of all the pieces: far cheaper than one per field
            parts.append(names[i])
            parts.append(": ")
            parts.append(values[i])
            parts.append(CRLF)
        parts.append(f"Content-Length: {len(body)}{CRLF}{CRLF}")
        return "".join(parts).encode("utf-8", "surrogateescape") + body


def _required_address(headers: Headers, name: str) -> NameAddr:
    value = headers.get(name)
    if value is None:
        raise SipParseError(f"missing {name}")
    return NameAddr.parse(value)


_METHODS = frozenset({"REGISTER", "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "MESSAGE", "INFO",
                      "NOTIFY", "SUBSCRIBE", "PUBLISH", "REFER", "UPDATE", "PRACK"})


def parse_cseq(value: str | None) -> tuple[int, str]:
    """(number, method) from a CSeq value. The method keeps its case: SIP methods are
    case-sensitive (RFC 3261 §7.1), so ``invite`` is not ``INVITE``."""
    if value is None:
        raise SipParseError("missing CSeq")
    parts = value.split()
    if len(parts) == 2 and parts[1] in _METHODS and parts[0].isdigit() and parts[0].isascii() \
            and len(parts[0]) <= 20:
        # the usual case, checked as below without the regex (0.6 % of a registration's
        # instructions: register_rate under callgrind, UDP: 2.8k of 452k)
        return int(parts[0]), parts[1]
    # Numbers of 2**31 and more are wrong too (RFC 3261 §8.1.1.5) but still readable, so the
    # request validation reports them and a 400 that echoes them can be parsed.
    if len(parts) != 2 or not _is_digits(parts[0], 20) or not is_token(parts[1]):
        raise SipParseError(f"bad CSeq {value[:80]!r}")
    return int(parts[0]), parts[1]


class Request(_Message):
    __slots__ = ("method", "uri")

    def __init__(self, method: str, uri: str | SipURI, headers: Headers | None = None,
                 body: bytes = b"") -> None:
        super().__init__(headers if headers is not None else Headers(), body)
        self.method = method.upper()
        self.uri = uri if type(uri) is str else str(uri)

    @property
    def request_uri(self) -> SipURI:
        return SipURI.parse(self.uri)

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"

    def _prepared(self, data: bytes) -> None:
        """``data`` is what to_bytes() makes of the request as it is now: its builder wrote it
        along with the fields. The next to_bytes() returns it if nothing changed in between (the
        headers object and its changes, method, URI and body), and forgets it either way: it is
        for sending the request once, not kept along with it."""
        headers = self.headers
        self._wire = (headers, headers._version, self.method, self.uri, self.body, data)

    def to_bytes(self) -> bytes:
        wire = self._wire
        if wire is not None:
            self._wire = None
            headers = self.headers
            if wire[0] is headers and wire[1] == headers._version and wire[2] is self.method \
                    and wire[3] is self.uri and wire[4] is self.body:
                return wire[5]
        return super().to_bytes()

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri} call-id={self.call_id}>"


class Response(_Message):
    __slots__ = ("reason", "status")

    def __init__(self, status: int, reason: str | None = None, headers: Headers | None = None,
                 body: bytes = b"") -> None:
        super().__init__(headers if headers is not None else Headers(), body)
        self.status = status
        self.reason = REASON_PHRASES.get(status, "Unknown") if reason is None else reason

    def start_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"

    @property
    def is_final(self) -> bool:
        return self.status >= 200

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason} call-id={self.call_id}>"


Message = Request | Response


def make_response(request: Request, status: int, reason: str | None = None, *,
                  to_tag: str | None = None, headers: Iterable[tuple[str, str]] = (),
                  body: bytes = b"") -> Response:
    """A response to ``request`` per RFC 3261 §8.2.6: Via, From, Call-ID, CSeq copied; To gets a tag.

    ``to_tag`` is added to To unless To already has one (and never for 100 Trying).
    Works on a :attr:`SipParseError.partial` too, whose From/To may not parse.
    """
    out = Headers()
    for name in ("Via", "Record-Route", "From"):
        for value in request.headers.raw_values(name):
            if name != "Record-Route" or 100 < status < 300:
                out.add(name, value)
    to_value = request.headers.get("To") or ""
    if to_tag and status > 100 and not _has_tag(to_value):
        to_value = f"{to_value};tag={to_tag}"
    out.add("To", to_value)
    for name in ("Call-ID", "CSeq"):
        single = request.headers.get(name)
        if single is not None:
            out.add(name, single)
    for name, value in headers:
        out.add(name, value)
    return Response(status, reason, out, body)


def _has_tag(to_value: str) -> bool:
    try:
        return NameAddr.parse(to_value).tag is not None
    except SipParseError:
        return ";tag=" in to_value.replace(" ", "").lower()


# --------------------------------------------------------------------------- parsing


_REQUIRED_REQUEST_HEADERS = ("Via", "From", "To", "Call-ID", "CSeq")
_REQUIRED_KEYS = tuple((name.lower(), name) for name in _REQUIRED_REQUEST_HEADERS)
#: What a response is built from (make_response copies these): if one of them is damaged, a 400
#: could go to the wrong place or carry garbage, so the request is not respondable.
_RESPONSE_CRITICAL = frozenset({"via", "from", "to", "call-id", "cseq"})
_SINGLE_VALUED = ("From", "To", "Max-Forwards")  # Call-ID and CSeq: see _validate


def parse_message(data: bytes, limits: Limits = DEFAULT_LIMITS, *, stream: bool = False) -> Message:
    """Parse one SIP message.

    On a datagram (``stream=False``) a body longer than Content-Length is cut to it and a shorter
    one is an error (RFC 3261 §18.3). On a stream the framer has already cut the message.
    Raises :class:`SipParseError` for anything malformed or over ``limits``; for a malformed
    request whose response-critical headers are intact, ``partial`` holds it so a 400 can be sent.
    """
    try:
        return _parse(data, limits, stream)
    except SipParseError:
        raise
    except Exception as exc:  # the contract: only SipParseError leaves the parser
        raise SipParseError(f"internal parser error ({type(exc).__name__})") from exc


def _parse(data: bytes, limits: Limits, stream: bool) -> Message:
    if len(data) > limits.max_message_bytes:
        raise SipParseError(f"message of {len(data)} bytes exceeds {limits.max_message_bytes}")
    head, body = _split_head(data.lstrip(b"\r\n"), limits)
    text = head.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
    newline = text.find("\n")
    start = text if newline < 0 else text[:newline]
    problems: list[str] = []  # defects that still leave a request respondable
    clean = _no_controls(head, text)
    headers, lengths, damaged = _read_headers(text, newline, limits, problems, clean)
    message = _parse_start_line(start.strip(" \t"), headers, problems, clean)
    message.body = b"" if lengths == ["0"] else _cut_body(body, lengths, stream, problems)
    _validate(message, problems)
    if isinstance(message, Response):
        if problems:
            raise SipParseError(problems[0])  # a broken response is dropped, never answered
        return message
    _validate_request(message, problems)
    if problems:
        raise SipParseError(problems[0], partial=None if damaged else _respondable(message))
    return message


def _split_head(data: bytes, limits: Limits) -> tuple[bytes, bytes]:
    """(header block, rest) at the first empty line; bare LF line ends are tolerated."""
    window = limits.max_header_bytes + 4  # the blank line must start within the limit
    found = _find_blank_line(data, window)
    if found is not None:
        start, end = found
        if start > limits.max_header_bytes:
            raise SipParseError(f"header block over {limits.max_header_bytes} bytes")
        return data[:start], data[end:]
    if len(data) > limits.max_header_bytes:
        raise SipParseError(f"header block over {limits.max_header_bytes} bytes")
    if data.endswith(b"\n"):
        return data, b""  # a datagram that ends right after its last header line
    raise SipParseError("no end of headers")


def _no_controls(head: bytes, text: str) -> bool:
    """Whether the header block has no control characters but its CRLF/LF line ends, as in most
    messages: then no field needs a check of its own. Controls are ASCII, so bytes tell.

    ``text`` is ``head`` decoded with its CRLFs made LFs: a CR left in it stood alone.
    """
    return len(head.translate(None, _CONTROL_BYTES_BUT_CRLF)) == len(head) and "\r" not in text


def _find_blank_line(data: bytes, window: int) -> tuple[int, int] | None:
    """(start, end) of the first ``\\r?\\n\\r?\\n`` ending within ``data[:window]``.

    Every such line end contains ``\\n\\n`` or ``\\n\\r\\n``, which ``bytes.find`` locates far faster
    than a regular expression tried at every position; a CR just before makes it part of the match.
    """
    bare, crlf = data.find(b"\n\n", 0, window), data.find(b"\n\r\n", 0, window)
    if bare < 0 and crlf < 0:
        return None
    if crlf < 0 or 0 <= bare < crlf:
        first, end = bare, bare + 2
    else:
        first, end = crlf, crlf + 3
    start = first - 1 if first > 0 and data[first - 1] == 0x0D else first
    return start, end


def _read_headers(text: str, newline: int, limits: Limits, problems: list[str],
                  clean: bool) -> tuple[Headers, list[str], bool]:
    """The header fields of a message's head (``text``, its start line ending at ``newline``; -1:
    there is no other line) as Headers, the Content-Length values apart from them, and whether a
    field a response is built from was dropped.

    Folded lines are joined to their field by one space. A line that is no ``name: value`` (a
    token name) is dropped and reported in ``problems``, and so is, unless ``clean`` says the head
    has no control characters, a field whose value has one (reported after the bad lines).
    """
    headers = Headers()  # filled right here
    lengths: list[str] = []
    damaged = False
    if newline < 0:
        return headers, lengths, damaged
    controls: list[str] = []
    known = _FIELD_NAMES
    count = 0
    # The field read last, stored once the next line shows that it does not go on (folding).
    pending = False
    raw = name = key = value = ""
    for line in text[newline + 1:].split("\n"):
        if not line:
            continue  # the blank line that ends the head
        if line[0] == " " or line[0] == "\t":
            more = line.strip(" \t")
            if more and pending:
                value = f"{value} {more}" if value else more
            elif more and count == 0:
                problems.append("continuation line before the first header")
            continue
        if pending:
            damaged = _store_field(headers, lengths, controls, raw, name, key, value, clean) or damaged
        count += 1
        if count > limits.max_headers:
            raise SipParseError(f"more than {limits.max_headers} header fields")
        raw, colon, value = line.partition(":")
        found = known.get(raw) if colon else None
        if found is None:
            plain = _PLAIN_NAME.fullmatch(raw) if colon else None
            if plain is None:
                problems.append(f"bad header line {line[:80]!r}")
                damaged = damaged or _guess_name(line) in _RESPONSE_CRITICAL
                pending = False
                continue
            name = canonical_name(plain[1])
            key = header_key(name)
        else:
            name, key = found
        value = value.strip(" \t")
        pending = True
    if pending:
        damaged = _store_field(headers, lengths, controls, raw, name, key, value, clean) or damaged
    problems += controls
    return headers, lengths, damaged


# A header name as _read_headers takes it: a token, maybe followed by spaces and tabs.
_PLAIN_NAME = re.compile(r"([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*")


def _store_field(headers: Headers, lengths: list[str], controls: list[str], raw: str, name: str, key: str,
                 value: str, clean: bool) -> bool:
    """Add one field read by _read_headers (as ``raw`` name, canonical ``name``, ``key``); whether it
    was dropped for a control character and a response is built from it."""
    if not clean and _CONTROL.search(value):
        shown = raw.strip(" \t")[:40]
        controls.append(f"control character in {shown!r}")
        return key in _RESPONSE_CRITICAL
    if key == "content-length":
        lengths.append(value)
        return False
    headers._names.append(name)
    headers._values.append(value)
    index = headers._index
    if key in index:
        _index_add(index, key, value)
    else:
        index[key] = value
    return False


def _guess_name(line: str) -> str:
    words = line.partition(":")[0].split()
    return canonical_name(words[0]).lower() if words else ""


def _parse_start_line(start: str, headers: Headers, problems: list[str], clean: bool = False) -> Message:
    """The message the start line announces; raises when it is not even a request line.

    ``clean``: the header block has no control characters (then the reason phrase has none).
    """
    if start[:8] == "SIP/2.0 " and len(start) >= 11 and start[8:11].isdigit() and start[8] in "123456" and \
            (len(start) == 11 or start[11] == " ") and start.isascii():
        # the usual "SIP/2.0 200 OK": what _STATUS_LINE would match, without the regex (1.4 % of
        # a registration's instructions: register_rate under callgrind, UDP: 6.5k of 452k)
        reason = start[12:].strip(" \t")
        if not clean and _CONTROL.search(reason):
            raise SipParseError(f"control character in reason phrase {reason[:80]!r}")
        return Response(int(start[8:11]), reason, headers)
    if start[:4].upper() == "SIP/":
        match = _STATUS_LINE.fullmatch(start)
        if match is None:
            raise SipParseError(f"bad status line {start[:80]!r}")
        reason = (match[2] or "").strip(" \t")
        if not clean and _CONTROL.search(reason):
            raise SipParseError(f"control character in reason phrase {reason[:80]!r}")
        return Response(int(match[1]), reason, headers)
    parts = start.split(" ")  # exactly one SP between the elements (RFC 3261 §7.1)
    method = parts[0]
    if not is_token(method):
        raise SipParseError(f"bad start line {start[:80]!r}")
    uri = parts[1] if len(parts) > 1 else ""
    request = Request(method, uri, headers)
    request.method = method  # methods are case-sensitive: keep what was sent
    if len(parts) != 3 or not all(parts):
        problems.append(f"bad request line {start[:80]!r}")
    elif parts[2].upper() != SIP_VERSION:
        problems.append(f"unsupported version {parts[2][:20]!r}")
    else:
        _check(problems, lambda: _check_request_uri(uri))
    return request


def _check_request_uri(uri: str) -> None:
    scheme, colon, rest = uri.partition(":")
    if not colon or not _SCHEME.fullmatch(scheme):
        raise SipParseError(f"bad Request-URI {uri[:80]!r}")
    if scheme.lower() in ("sip", "sips"):
        if SipURI.parse(uri).headers:
            raise SipParseError(f"header fields in Request-URI {uri[:80]!r}")  # RFC 3261 §19.1.5
    else:
        _check_uri_chars(rest, uri)


def _cut_body(body: bytes, lengths: list[str], stream: bool, problems: list[str]) -> bytes:
    """The body as Content-Length declares it; a missing header means "the rest" on a datagram."""
    if not lengths:
        if stream and body:
            problems.append("body without Content-Length on a stream")
        return body
    if any(not _is_digits(text, 10) for text in lengths):
        problems.append(f"bad Content-Length {lengths[0][:20]!r}")
        return body
    values = {int(text) for text in lengths}
    if len(values) > 1:
        problems.append(f"conflicting Content-Length values {sorted(values)[:4]}")
        return body
    length = values.pop()
    if length > len(body):
        problems.append(f"Content-Length {length} but only {len(body)} body bytes")
        return body
    return body[:length]


def _check(problems: list[str], check: Callable[[], object]) -> None:
    """Run one validation, recording its failure instead of stopping at it."""
    try:
        check()
    except SipParseError as exc:
        problems.append(exc.reason)


def _validate(message: Message, problems: list[str]) -> None:
    """What a response needs too: the core headers, and the two that match it to a transaction.

    Responses are checked no further: their other fields are copies of our own request's, and a
    400 we build from a :attr:`SipParseError.partial` must parse even if its From was broken.
    """
    index = message.headers._index  # keys are the lower-cased canonical names
    for key, name in _REQUIRED_KEYS:
        found = index.get(key)
        if found is None or not (found.strip() if isinstance(found, str) else any(map(str.strip, found))):
            problems.append(f"missing {name}")
    for key, name in (("call-id", "Call-ID"), ("cseq", "CSeq")):  # make_response copies the first
        if isinstance(index.get(key), tuple):
            problems.append(f"more than one {name}")
    if "cseq" in index:
        try:
            message.cseq  # noqa: B018 - parsed (and kept) to see that it parses
        except SipParseError as exc:
            problems.append(exc.reason)
    if "via" in index:
        try:
            if isinstance(message, Response):
                message._check_top_via()  # its Via is read whole only if someone asks
            else:
                message.shared_top_via()
        except SipParseError as exc:
            problems.append(exc.reason)


def _validate_request(request: Request, problems: list[str]) -> None:
    headers = request.headers
    for name in _SINGLE_VALUED:
        if len(headers.raw_values(name)) > 1:
            problems.append(f"more than one {name}")
    try:
        number, method = request.cseq
        if method != request.method:
            problems.append(f"CSeq method {method[:20]!r} does not match {request.method[:20]!r}")
        if number >= 2**31:
            problems.append(f"CSeq number {number} out of range")
    except SipParseError:
        pass  # already reported by _validate
    _check(problems, lambda: request.vias)
    for name in ("From", "To", "Contact"):
        for value in headers.get_all(name):
            if value != "*":
                _check(problems, functools.partial(NameAddr.parse, value))
    call_id = headers.get("Call-ID")
    if call_id and (not call_id.isascii() or len(call_id.split()) != 1):
        problems.append(f"bad Call-ID {call_id[:80]!r}")
    max_forwards = headers.get("Max-Forwards")
    if max_forwards is not None and not (_is_digits(max_forwards, 3) and int(max_forwards) <= 255):
        problems.append(f"bad Max-Forwards {max_forwards[:20]!r}")


def _respondable(request: Request) -> Request | None:
    """The request if a 400 can be built for it that its sender can match: top Via and CSeq
    readable (the client matches responses by branch and CSeq method), From, To, Call-ID present."""
    try:
        request.shared_top_via()
        request.cseq  # noqa: B018
    except SipParseError:
        return None
    for name in ("From", "To", "Call-ID"):
        if not (request.headers.get(name) or "").strip():
            return None
    return request
