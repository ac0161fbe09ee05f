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
import re
import secrets
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

SIP_VERSION = "SIP/2.0"
CRLF = "\r\n"

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

_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")

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
_URI_CHARS = frozenset(string.ascii_letters + string.digits + "-_.!~*'()%;?/:@&=+$,[]#")
_HOST_CHARS = frozenset(string.ascii_letters + string.digits + "-._")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Control characters other than HTAB: never legal in a header line, and a bare CR or NUL copied
# into a response could split it (header injection).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_LINE_BREAK = re.compile("[\r\n\x00]")
_NON_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of undecodable bytes
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(r"SIP/2\.0 ([1-6][0-9][0-9])(?: (.*))?", re.IGNORECASE | re.DOTALL)
_VIA_PROTOCOL = re.compile(r"SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*([^\s/]+)[ \t]+(.*)", re.IGNORECASE | re.DOTALL)
_HOSTPORT_COLON = re.compile(r"[ \t]*:[ \t]*")
# Unquoted generic-param values: RFC 3261 allows token / host; anything printable without
# separators is accepted so sloppy peers' Contact parameters still parse.
_PARAM_VALUE_BAD = re.compile(r'[\s";,\x00-\x1f\x7f]')


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
    lower = name.lower()
    if len(lower) == 1 and lower in COMPACT_FORMS:
        return COMPACT_FORMS[lower]
    return _CANONICAL.get(lower, name)


def is_token(text: str) -> bool:
    return bool(text) and all(ch in _TOKEN_CHARS for ch in text)


def safe_text(text: str) -> str:
    """``text`` with undecodable bytes (kept as surrogates by the parser) shown as U+FFFD.

    Use it before handing header values to anything that needs clean Unicode (JSON, the console).
    """
    return _NON_UTF8.sub("\ufffd", text)


def _is_digits(text: str, max_len: int) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts "²" and friends, which int() rejects."""
    return 0 < len(text) <= max_len and text.isascii() and text.isdigit()


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value, ignoring commas in quotes or ``<...>``."""
    parts: list[str] = []
    current: list[str] = []
    in_quotes = in_angle = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif in_quotes and ch == "\\":
            escaped = True
        elif ch == '"' and not in_angle:
            in_quotes = not in_quotes
        elif ch == "<" and not in_quotes:
            in_angle = True
        elif ch == ">" and not in_quotes:
            in_angle = False
        elif ch == "," and not in_quotes and not in_angle:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def _split_params(text: str) -> list[str]:
    """Split ``a;b=1;c="x;y"`` on semicolons outside quotes."""
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
    if not text.startswith(";"):
        raise SipParseError(f"junk before parameters: {text[:80]!r}")
    for part in _split_params(text)[1:]:
        part = part.strip()
        if not part:
            continue  # ";;" or a trailing ";": harmless
        name, eq, value = part.partition("=")
        name, value = name.strip(" \t"), value.strip(" \t")
        if not is_token(name):
            raise SipParseError(f"bad parameter name {name[:40]!r}")
        if eq and not _is_param_value(value):
            raise SipParseError(f"bad value for parameter {name[:40]!r}: {value[:40]!r}")
        params[name.lower()] = value if eq else None
    return params


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
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def new_branch() -> str:
    """A fresh RFC 3261 magic-cookie branch."""
    return "z9hG4bK" + secrets.token_hex(10)


def new_tag() -> str:
    return secrets.token_hex(6)


def new_call_id() -> str:
    return secrets.token_hex(16)


# --------------------------------------------------------------------------- URIs and addresses


def _check_uri_chars(rest: str, text: str) -> None:
    if not rest or any(ch not in _URI_CHARS for ch in rest) or _BAD_ESCAPE.search(rest):
        raise SipParseError(f"bad characters in URI {text[:80]!r}")


@dataclass
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
        if not host or any(ch not in _HOST_CHARS for ch in host):
            raise SipParseError(f"bad host {text[:80]!r}")
    if port_text is None:
        return host, None
    if not _is_digits(port_text, 5) or not 0 < int(port_text) < 65536:
        raise SipParseError(f"bad port in {text[:80]!r}")
    return host, int(port_text)


@dataclass
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
        display = ""
        if self.display_name:
            escaped = self.display_name.replace("\\", "\\\\").replace('"', '\\"')
            display = f'"{escaped}" '
        return f"{display}<{self.uri}>{format_params(self.params)}"


# An unquoted display name is tokens and spaces (RFC 3261 §25.1); letters beyond ASCII are
# tolerated, separators are not (``Bell, Alexander <sip:...>`` is two list elements or garbage).
_DISPLAY_SEPARATORS = frozenset('()<>@,;:\\"/[]?={}')


def _parse_display_name(text: str) -> str | None:
    if not text:
        return None
    if text.startswith('"'):
        content, end = _read_quoted(text, 0)
        if end != len(text):
            raise SipParseError(f"junk after quoted display name {text[:80]!r}")
        return content
    if any(ch in _DISPLAY_SEPARATORS for ch in text):
        raise SipParseError(f"display name needs quotes: {text[:80]!r}")
    return text


def _find_unquoted(text: str, needle: str) -> int:
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


@dataclass
class Via:
    """One Via value (RFC 3261 §20.42): ``SIP/2.0/TCP host:port;branch=...;rport``."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Via:
        match = _VIA_PROTOCOL.fullmatch(text.strip())
        if match is None or not is_token(match[1]):
            raise SipParseError(f"bad Via {text[:80]!r}")
        sent_by, semi, rest = match[2].partition(";")
        # RFC 3261 allows LWS around the ":" of sent-by.
        host, port = _split_hostport(_HOSTPORT_COLON.sub(":", sent_by.strip()))
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


# --------------------------------------------------------------------------- headers


class Headers:
    """Ordered, multi-valued, case-insensitive header fields."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = []
        for name, value in items:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        """Append a field. Raises ValueError for a non-token name or a value with CR, LF or NUL,
        which would split the serialised message (header injection)."""
        name = canonical_name(name)
        value = str(value)
        if not is_token(name) or _LINE_BREAK.search(value):
            raise ValueError(f"refusing header {name[:40]!r}: {value[:40]!r}")
        if name.lower() == "content-length":
            return  # always derived from the body
        self._items.append((name, value))

    def set(self, name: str, value: str) -> None:
        """Replace every field of this name by one field."""
        self.remove(name)
        self.add(name, value)

    def remove(self, name: str) -> None:
        key = canonical_name(name).lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != key]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value; for list headers the first element of the list."""
        values = self.get_all(name)
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        """Every value of this header, list headers split on commas."""
        key = canonical_name(name).lower()
        raw = [v for n, v in self._items if n.lower() == key]
        if key in LIST_HEADERS:
            return [part for value in raw for part in split_list(value)]
        return raw

    def raw_values(self, name: str) -> list[str]:
        """Field values exactly as stored (list headers not split), e.g. to copy into a response."""
        key = canonical_name(name).lower()
        return [v for n, v in self._items if n.lower() == key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = canonical_name(name).lower()
        return any(n.lower() == key for n, _ in self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def copy(self) -> Headers:
        clone = Headers()
        clone._items = list(self._items)
        return clone

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


# --------------------------------------------------------------------------- messages


class _Message:
    """What requests and responses share: headers, body and accessors for the core headers."""

    def __init__(self, headers: Headers, body: bytes) -> None:
        self.headers = headers
        self.body = body

    @property
    def call_id(self) -> str:
        return self.headers.get("Call-ID") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        """(number, method) from CSeq; raises SipParseError when absent or malformed."""
        return parse_cseq(self.headers.get("CSeq"))

    @property
    def vias(self) -> list[Via]:
        return [Via.parse(v) for v in self.headers.get_all("Via")]

    @property
    def top_via(self) -> Via:
        first = self.headers.get("Via")
        if first is None:
            raise SipParseError("missing Via")
        return Via.parse(first)

    @property
    def branch(self) -> str | None:
        return self.top_via.branch

    @property
    def from_(self) -> NameAddr:
        return _required_address(self.headers, "From")

    @property
    def to(self) -> NameAddr:
        return _required_address(self.headers, "To")

    @property
    def contacts(self) -> list[NameAddr]:
        return [NameAddr.parse(v) for v in self.headers.get_all("Contact") if v.strip() != "*"]

    def _header_block(self) -> list[str]:
        lines = [f"{name}: {value}" for name, value in self.headers]
        lines.append(f"Content-Length: {len(self.body)}")
        return lines


def _required_address(headers: Headers, name: str) -> NameAddr:
    value = headers.get(name)
    if value is None:
        raise SipParseError(f"missing {name}")
    return NameAddr.parse(value)


def parse_cseq(value: str | None) -> tuple[int, str]:
    """(number, method) from a CSeq value. The method keeps its case: SIP methods are
    case-sensitive (RFC 3261 §7.1), so ``invite`` is not ``INVITE``."""
    if value is None:
        raise SipParseError("missing CSeq")
    parts = value.split()
    # Numbers of 2**31 and more are wrong too (RFC 3261 §8.1.1.5) but still readable, so the
    # request validation reports them and a 400 that echoes them can be parsed.
    if len(parts) != 2 or not _is_digits(parts[0], 20) or not is_token(parts[1]):
        raise SipParseError(f"bad CSeq {value[:80]!r}")
    return int(parts[0]), parts[1]


class Request(_Message):
    def __init__(self, method: str, uri: str | SipURI, headers: Headers | None = None,
                 body: bytes = b"") -> None:
        super().__init__(headers if headers is not None else Headers(), body)
        self.method = method.upper()
        self.uri = str(uri)

    @property
    def request_uri(self) -> SipURI:
        return SipURI.parse(self.uri)

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"

    def to_bytes(self) -> bytes:
        lines = [self.start_line(), *self._header_block()]
        return (CRLF.join(lines) + CRLF + CRLF).encode("utf-8", "surrogateescape") + self.body

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri} call-id={self.call_id}>"


class Response(_Message):
    def __init__(self, status: int, reason: str | None = None, headers: Headers | None = None,
                 body: bytes = b"") -> None:
        super().__init__(headers if headers is not None else Headers(), body)
        self.status = status
        self.reason = REASON_PHRASES.get(status, "Unknown") if reason is None else reason

    def start_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"

    def to_bytes(self) -> bytes:
        lines = [self.start_line(), *self._header_block()]
        return (CRLF.join(lines) + CRLF + CRLF).encode("utf-8", "surrogateescape") + self.body

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
    start, *lines = head.decode("utf-8", "surrogateescape").replace("\r\n", "\n").split("\n")
    problems: list[str] = []  # defects that still leave a request respondable
    fields, damaged = _read_fields(lines, limits, problems)
    headers = Headers()
    lengths: list[str] = []
    for name, value in fields:
        if canonical_name(name).lower() == "content-length":
            lengths.append(value)
        else:
            headers.add(name, value)
    message = _parse_start_line(start.strip(" \t"), headers, problems)
    message.body = _cut_body(body, lengths, stream, problems)
    if isinstance(message, Response):
        _validate(message, problems)
        if problems:
            raise SipParseError(problems[0])  # a broken response is dropped, never answered
        return message
    _validate(message, problems)
    _validate_request(message, problems)
    if problems:
        raise SipParseError(problems[0], partial=None if damaged else _respondable(message))
    return message


def _split_head(data: bytes, limits: Limits) -> tuple[bytes, bytes]:
    """(header block, rest) at the first empty line; bare LF line ends are tolerated."""
    window = limits.max_header_bytes + 4  # the blank line must start within the limit
    match = _HEADER_END.search(data, 0, window)
    if match is not None:
        if match.start() > limits.max_header_bytes:
            raise SipParseError(f"header block over {limits.max_header_bytes} bytes")
        return data[: match.start()], data[match.end() :]
    if len(data) > limits.max_header_bytes:
        raise SipParseError(f"header block over {limits.max_header_bytes} bytes")
    if data.endswith(b"\n"):
        return data, b""  # a datagram that ends right after its last header line
    raise SipParseError("no end of headers")


def _read_fields(lines: list[str], limits: Limits, problems: list[str]) -> tuple[list[tuple[str, str]], bool]:
    """Header fields with folded lines joined; bad lines are dropped and reported in ``problems``.

    Returns the fields and whether a response-critical header was among the dropped ones.
    """
    raw: list[tuple[str, list[str]]] = []
    damaged = False
    keep = False  # does a continuation line belong to a field we kept?
    count = 0
    for line in lines:
        if line[:1] in (" ", "\t"):
            text = line.strip(" \t")
            if text and keep:
                raw[-1][1].append(text)
            elif text and count == 0:
                problems.append("continuation line before the first header")
            continue
        if not line:
            continue
        count += 1
        if count > limits.max_headers:
            raise SipParseError(f"more than {limits.max_headers} header fields")
        name, colon, value = line.partition(":")
        name = name.strip(" \t")
        keep = bool(colon) and is_token(name)
        if keep:
            raw.append((name, [value.strip(" \t")]))
        else:
            problems.append(f"bad header line {line[:80]!r}")
            damaged = damaged or _guess_name(line) in _RESPONSE_CRITICAL
    fields: list[tuple[str, str]] = []
    for name, parts in raw:
        value = " ".join(part for part in parts if part)
        if _CONTROL.search(value):
            problems.append(f"control character in {name[:40]!r}")
            damaged = damaged or canonical_name(name).lower() in _RESPONSE_CRITICAL
            continue
        fields.append((name, value))
    return fields, damaged


def _guess_name(line: str) -> str:
    words = line.partition(":")[0].split()
    return canonical_name(words[0]).lower() if words else ""


def _parse_start_line(start: str, headers: Headers, problems: list[str]) -> Message:
    """The message the start line announces; raises when it is not even a request line."""
    if start[:4].upper() == "SIP/":
        match = _STATUS_LINE.fullmatch(start)
        if match is None:
            raise SipParseError(f"bad status line {start[:80]!r}")
        reason = (match[2] or "").strip(" \t")
        if _CONTROL.search(reason):
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
    headers = message.headers
    for name in _REQUIRED_REQUEST_HEADERS:
        if not any(value.strip() for value in headers.raw_values(name)):
            problems.append(f"missing {name}")
    for name in ("Call-ID", "CSeq"):  # make_response copies only the first of these
        if len(headers.raw_values(name)) > 1:
            problems.append(f"more than one {name}")
    if "CSeq" in headers:
        _check(problems, lambda: message.cseq)
    if "Via" in headers:
        _check(problems, lambda: message.top_via)


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
        request.top_via  # noqa: B018
        request.cseq  # noqa: B018
    except SipParseError:
        return None
    for name in ("From", "To", "Call-ID"):
        if not (request.headers.get(name) or "").strip():
            return None
    return request
