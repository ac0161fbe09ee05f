"""SIP messages (RFC 3261 §7, §20, §25): parse from bytes, build, serialise.

Headers keep the order and spelling they arrived with; names compare case-insensitively and
compact forms (``v:``, ``m:`` ...) are expanded on parse. Header fields that are comma-separated
lists (Via, Contact, Route ...) are split on demand by :meth:`Headers.get_all`, so a comma-joined
Via and two Via lines read the same. ``Content-Length`` is never stored: serialisation always
writes the real body length.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
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
    408: "Request Timeout", 413: "Request Entity Too Large", 415: "Unsupported Media Type",
    420: "Bad Extension", 423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    500: "Server Internal Error", 501: "Not Implemented", 503: "Service Unavailable",
    504: "Server Time-out", 513: "Message Too Large", 600: "Busy Everywhere", 603: "Decline",
}


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


@dataclass
class SipURI:
    """A ``sip:``/``sips:`` URI (RFC 3261 §19.1). ``host`` keeps IPv6 brackets."""

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
        rest, _, uri_headers = rest.partition("?")
        hostport, *param_parts = _split_params(rest)
        user = password = None
        if "@" in hostport:
            userinfo, _, hostport = hostport.rpartition("@")
            user, _, pw = userinfo.partition(":")
            password = pw or None
            if not user:
                raise SipParseError(f"empty user part in URI: {text[:80]!r}")
        host, port = _split_hostport(hostport)
        params = parse_params(";".join(param_parts)) if param_parts else {}
        return cls(host=host, user=user, password=password, port=port, scheme=scheme,
                   params=params, headers=uri_headers)

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
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"unterminated IPv6 reference: {text[:80]!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise SipParseError(f"bad host:port {text[:80]!r}")
    else:
        host, colon, port_text_ = text.partition(":")
        port_text = port_text_ if colon else None
    if not host or any(ch in host for ch in " \t<>\"@,;"):
        raise SipParseError(f"bad host {text[:80]!r}")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SipParseError(f"bad port in {text[:80]!r}")
    return host, int(port_text)


@dataclass
class NameAddr:
    """A From/To/Contact/Route value: optional display name, URI, header parameters (tag, expires...).

    Both the name-addr (``"Bob" <sip:bob@h;transport=tcp>;tag=1``) and the addr-spec
    (``sip:bob@h;tag=1``, where the parameters belong to the header) forms are accepted.
    """

    uri: SipURI
    display_name: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        text = text.strip()
        display: str | None = None
        if "<" in text:
            lt = _find_unquoted(text, "<")
            gt = text.find(">", lt)
            if lt < 0 or gt < 0:
                raise SipParseError(f"unbalanced <> in address {text[:80]!r}")
            display_text = text[:lt].strip()
            if display_text.startswith('"') and display_text.endswith('"') and len(display_text) >= 2:
                display = display_text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            elif display_text:
                display = display_text
            uri = SipURI.parse(text[lt + 1 : gt])
            params = parse_params(text[gt + 1 :])
        else:
            uri_text, *rest = _split_params(text)
            uri = SipURI.parse(uri_text)
            params = parse_params(";".join(rest)) if rest else {}
        return cls(uri=uri, display_name=display, params=params)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        display = ""
        if self.display_name:
            escaped = self.display_name.replace("\\", "\\\\").replace('"', '\\"')
            display = f'"{escaped}" '
        return f"{display}<{self.uri}>{format_params(self.params)}"


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
        sent_protocol, _, rest = text.strip().partition(" ")
        parts = [p.strip() for p in sent_protocol.split("/")]
        if len(parts) != 3 or parts[0].upper() != "SIP" or not parts[2]:
            raise SipParseError(f"bad Via protocol {text[:80]!r}")
        sent_by, *param_parts = _split_params(rest.strip())
        host, port = _split_hostport(sent_by)
        params = parse_params(";".join(param_parts)) if param_parts else {}
        return cls(transport=parts[2].upper(), host=host, port=port, params=params)

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
        name = canonical_name(name)
        if name.lower() == "content-length":
            return  # always derived from the body
        self._items.append((name, str(value)))

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
    if value is None:
        raise SipParseError("missing CSeq")
    number, _, method = value.strip().partition(" ")
    method = method.strip()
    if not number.isdigit() or len(number) > 10 or not is_token(method):
        raise SipParseError(f"bad CSeq {value[:80]!r}")
    return int(number), method.upper()


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
    """
    out = Headers()
    for name in ("Via", "Record-Route", "From"):
        for value in request.headers.raw_values(name):
            if name != "Record-Route" or 100 < status < 300:
                out.add(name, value)
    to_value = request.headers.get("To") or ""
    if to_tag and status > 100 and ";tag=" not in to_value.replace(" ", "").lower():
        to_value = f"{to_value};tag={to_tag}"
    out.add("To", to_value)
    for name in ("Call-ID", "CSeq"):
        value = request.headers.get(name)
        if value is not None:
            out.add(name, value)
    for name, value in headers:
        out.add(name, value)
    return Response(status, reason, out, body)


# --------------------------------------------------------------------------- parsing


_REQUIRED_REQUEST_HEADERS = ("Via", "From", "To", "Call-ID", "CSeq")


def parse_message(data: bytes, limits: Limits = DEFAULT_LIMITS, *, stream: bool = False) -> Message:
    """Parse one SIP message.

    On a datagram (``stream=False``) a body longer than Content-Length is cut to it and a shorter
    one is an error (RFC 3261 §18.3). On a stream the framer has already cut the message.
    Raises :class:`SipParseError` for anything malformed or over ``limits``.
    """
    if len(data) > limits.max_message_bytes:
        raise SipParseError(f"message of {len(data)} bytes exceeds {limits.max_message_bytes}")
    data = data.lstrip(b"\r\n")
    head_end = data.find(b"\r\n\r\n")
    if head_end >= 0:
        head, body = data[:head_end], data[head_end + 4 :]
    else:
        head_end = data.find(b"\n\n")  # tolerate bare LF line ends
        if head_end < 0:
            head, body = data, b""
            if not data.endswith(b"\r\n") and not data.endswith(b"\n"):
                raise SipParseError("no end of headers")
        else:
            head, body = data[:head_end], data[head_end + 2 :]
    if len(head) > limits.max_header_bytes:
        raise SipParseError(f"header block over {limits.max_header_bytes} bytes")
    text = head.decode("utf-8", "surrogateescape")
    lines = text.replace("\r\n", "\n").split("\n")
    start = lines[0].strip()
    headers = _parse_header_lines(lines[1:], limits)
    message = _parse_start_line(start, headers, body)
    _check_body_length(message, headers, stream)
    if isinstance(message, Request):
        _validate_request(message)
    else:
        _validate_response(message)
    return message


def _parse_start_line(start: str, headers: Headers, body: bytes) -> Message:
    if start.startswith(SIP_VERSION + " ") or start.upper().startswith("SIP/"):
        version, _, rest = start.partition(" ")
        if version.upper() != SIP_VERSION:
            raise SipParseError(f"unsupported version {version[:20]!r}")
        code, _, reason = rest.partition(" ")
        if len(code) != 3 or not code.isdigit() or not 100 <= int(code) <= 699:
            raise SipParseError(f"bad status code {code[:20]!r}")
        return Response(int(code), reason.strip(), headers, body)
    parts = start.split()
    if len(parts) != 3:
        raise SipParseError(f"bad start line {start[:80]!r}")
    method, uri, version = parts
    request = Request(method, uri, headers, body)
    request.method = method  # keep case for the token check below
    if not is_token(method):
        raise SipParseError(f"bad method {method[:20]!r}")
    request.method = method.upper()
    if version.upper() != SIP_VERSION:
        raise SipParseError(f"unsupported version {version[:20]!r}", partial=request)
    if ":" not in uri:
        raise SipParseError(f"bad Request-URI {uri[:80]!r}", partial=request)
    return request


def _parse_header_lines(lines: list[str], limits: Limits) -> Headers:
    fields: list[tuple[str, str]] = []
    for line in lines:
        if not line.strip():
            continue
        if line[0] in " \t":
            if not fields:
                raise SipParseError("continuation line before any header")
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not is_token(name):
            raise SipParseError(f"bad header line {line[:80]!r}")
        fields.append((name, value.strip()))
        if len(fields) > limits.max_headers:
            raise SipParseError(f"more than {limits.max_headers} header fields")
    headers = Headers()
    for name, value in fields:
        if canonical_name(name).lower() == "content-length":
            headers._items.append(("Content-Length", value))  # checked, then dropped
        else:
            headers.add(name, value)
    return headers


def _check_body_length(message: Message, headers: Headers, stream: bool) -> None:
    declared = [v for n, v in headers._items if n == "Content-Length"]
    headers._items = [(n, v) for n, v in headers._items if n != "Content-Length"]
    if not declared:
        if stream and message.body:
            raise SipParseError("body without Content-Length on a stream")
        return
    if len(set(declared)) > 1 or not declared[0].isdigit() or len(declared[0]) > 10:
        raise SipParseError(f"bad Content-Length {declared[0][:20]!r}")
    length = int(declared[0])
    if length > len(message.body):
        raise SipParseError(f"Content-Length {length} but only {len(message.body)} body bytes")
    message.body = message.body[:length]


def _validate_request(request: Request) -> None:
    try:
        for name in _REQUIRED_REQUEST_HEADERS:
            if name not in request.headers:
                raise SipParseError(f"missing {name}")
        number, method = request.cseq
        if method != request.method:
            raise SipParseError(f"CSeq method {method} does not match {request.method}")
        for via in request.headers.get_all("Via"):
            Via.parse(via)
        request.from_  # noqa: B018 - parsed for validation
        request.to  # noqa: B018
        mf = request.headers.get("Max-Forwards")
        if mf is not None and (not mf.isdigit() or len(mf) > 3):
            raise SipParseError(f"bad Max-Forwards {mf[:20]!r}")
    except SipParseError as exc:
        raise SipParseError(exc.reason, partial=_respondable(request)) from None


def _respondable(request: Request) -> Request | None:
    """The request if a 400 can be built for it (top Via, From, To, Call-ID, CSeq readable)."""
    try:
        request.top_via  # noqa: B018
        for name in ("From", "To", "Call-ID", "CSeq"):
            if not request.headers.get(name):
                return None
        return request
    except SipParseError:
        return None


def _validate_response(response: Response) -> None:
    for name in ("Via", "CSeq", "Call-ID"):
        if name not in response.headers:
            raise SipParseError(f"response missing {name}")
    response.cseq  # noqa: B018
    response.top_via  # noqa: B018
