"""The kinds of values a setting can take: each reads TOML with its own wording and writes TOML back.

Scalars (true/false, text, choices, numbers, paths, URLs, …) and the structures that hold other
sections (:class:`Section`, :class:`Entries`, :class:`NamedTables`). Wording matters: the problem
list is what an operator reads, so each kind says what it expected and what it got.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Final, Protocol, TypeVar
from urllib.parse import urlsplit

from sipis.config.addresses import HostPort, SipListen, parse_host_port, parse_sip_listen
from sipis.config.reader import TableReader, expected, is_number
from sipis.config.schema import Invalid, Kind, Reported, settings_of

S = TypeVar("S", bound=str)
C = TypeVar("C")


def toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def text(value: object, what: str) -> str:
    """A non-empty single-line string, else :class:`Invalid` (``what``: how the problem says it)."""
    if not isinstance(value, str) or not value.strip():
        raise expected(what, value)
    if any(c in value for c in "\r\n\0"):
        raise Invalid("must not contain line breaks or NUL")
    return value


def _bounds(low: float | None, low_open: bool, high: float | None, high_open: bool, *, symbols: bool) -> str:
    ge, le = ("≥", "≤") if symbols else (">=", "<=")
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else ge} {_number(low)}")
    if high is not None:
        parts.append(f"{'<' if high_open else le} {_number(high)}")
    return " and ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


# --------------------------------------------------------------------------- scalars


class Flag(Kind[bool]):
    what = "true or false"
    doc = "bool"

    def read(self, value: object, table: TableReader, name: str) -> bool:
        if not isinstance(value, bool):
            raise expected(self.what, value)
        return value

    def toml(self, value: Any) -> str:
        return "true" if value else "false"


class Text(Kind[str]):
    def __init__(self, what: str = "a non-empty string", doc: str = "string") -> None:
        self.what, self.doc = what, doc

    def read(self, value: object, table: TableReader, name: str) -> str:
        return text(value, self.what)

    def toml(self, value: Any) -> str:
        return toml_string(str(value))


class Choice(Kind[S]):
    """One of a few words, any case."""

    def __init__(self, choices: tuple[S, ...]) -> None:
        self.choices = choices
        self.what = "one of " + ", ".join(repr(c) for c in choices)
        self.doc = "one of " + ", ".join(f"`{c}`" for c in choices) + " (any case)"

    def read(self, value: object, table: TableReader, name: str) -> S:
        word = value.lower() if isinstance(value, str) else None
        for choice in self.choices:
            if choice == word:
                return choice
        raise expected(self.what, value)

    def toml(self, value: Any) -> str:
        return toml_string(str(value))

    def hint(self, doc: str) -> str:
        return "" if all(f"`{c}`" in doc for c in self.choices) else " | ".join(self.choices)


class Integer(Kind[int]):
    def __init__(self, *, low: int | None = None, high: int | None = None) -> None:
        self.low, self.high = low, high
        bounds = _bounds(low, False, high, False, symbols=False)
        self.what = "an integer" + (f" {bounds}" if bounds else "")
        self.doc = "integer " + _bounds(low, False, high, False, symbols=True)

    def read(self, value: object, table: TableReader, name: str) -> int:
        if (
            not isinstance(value, int) or isinstance(value, bool)
            or (self.low is not None and value < self.low) or (self.high is not None and value > self.high)
        ):
            raise expected(self.what, value)
        return value

    def toml(self, value: Any) -> str:
        return str(value)


class Number(Kind[float]):
    """An int or float within bounds (default: > 0), held as float."""

    def __init__(self, noun: str, doc_noun: str, *, low: float | None = 0.0, low_open: bool = True,
                 high: float | None = None, high_open: bool = True) -> None:
        self.low, self.low_open, self.high, self.high_open = low, low_open, high, high_open
        bounds = _bounds(low, low_open, high, high_open, symbols=False)
        self.what = noun + (f" {bounds}" if bounds else "")
        self.doc = f"{doc_noun} {_bounds(low, low_open, high, high_open, symbols=True)}"

    def read(self, value: object, table: TableReader, name: str) -> float:
        if not isinstance(value, int | float) or not is_number(value):
            raise expected(self.what, value)
        ok = True
        if self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise expected(self.what, value)
        return float(value)

    def toml(self, value: Any) -> str:
        return _number(value)


class Seconds(Number):
    """A duration: seconds, int or float."""

    def __init__(self, *, zero_ok: bool = False) -> None:
        super().__init__("a number of seconds", "seconds", low=0.0, low_open=not zero_ok)

    def doc_default(self, value: Any) -> str:
        shown = super().doc_default(value)
        if value >= 86400 and value % 86400 == 0:
            return f"{shown} ({_number(value / 86400)} d)"
        if value >= 3600 and value % 3600 == 0:
            return f"{shown} ({_number(value / 3600)} h)"
        return shown


class FilePath(Kind[Path]):
    """A path; relative ones resolve against the config file's folder, ``~`` is expanded."""

    what = "a path"
    doc = "path"

    def read(self, value: object, table: TableReader, name: str) -> Path:
        return table.ctx.base_dir / Path(text(value, self.what)).expanduser()

    def default(self, value: Any, table: TableReader, name: str) -> Any:
        return None if value is None else table.ctx.base_dir / value

    def toml(self, value: Any) -> str:
        return toml_string(str(value))


class StatePath(FilePath):
    """A file the core may create itself: by default in ``state_dir``."""

    def default(self, value: Any, table: TableReader, name: str) -> Any:
        return table.ctx.state_dir / value

    def doc_default(self, value: Any) -> str:
        return f"`<state_dir>/{value}`"


# AF_UNIX sun_path is 108 bytes on Linux including the terminating NUL.
MAX_SOCKET_PATH: Final = 107


class SocketPath(StatePath):
    """A unix socket's path, which the kernel limits in length."""

    doc = f"path (at most {MAX_SOCKET_PATH} bytes)"

    def read(self, value: object, table: TableReader, name: str) -> Path:
        return self._check(super().read(value, table, name), table, name)

    def default(self, value: Any, table: TableReader, name: str) -> Any:
        return self._check(super().default(value, table, name), table, name)

    def _check(self, path: Path, table: TableReader, name: str) -> Path:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            table.error(name, f"path is longer than {MAX_SOCKET_PATH} bytes, too long for a unix socket: {path}")
        return path


class Listen(Kind[HostPort | None]):
    """A TCP listener ``host:port``; ``""`` turns it off (None)."""

    what = "'host:port' or \"\" (off)"
    doc = '`host:port` or `""` (off)'

    def read(self, value: object, table: TableReader, name: str) -> HostPort | None:
        if not isinstance(value, str):
            raise expected(self.what, value)
        if not value.strip():
            return None
        try:
            return parse_host_port(value.strip())
        except ValueError as exc:
            raise Invalid(f"{exc}, got {value!r}") from None

    def toml(self, value: Any) -> str:
        return toml_string("" if value is None else str(value))

    def doc_default(self, value: Any) -> str:
        return '`""` (off)' if value is None else super().doc_default(value)

    def hint(self, doc: str) -> str:
        return "" if '""' in doc else '"" = off'


class Url(Kind[str]):
    what = "an http(s) URL"
    doc = "`http` or `https` URL"

    def read(self, value: object, table: TableReader, name: str) -> str:
        url = text(value, self.what)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise expected(self.what, value)
        return url

    def toml(self, value: Any) -> str:
        return toml_string(str(value))


class DatabaseUrl(Kind[str]):
    """A PostgreSQL URL without a password; the problem never repeats one."""

    what = "a postgresql:// URL"
    doc = "`postgresql://user@host:port/database` URL, no password"

    def read(self, value: object, table: TableReader, name: str) -> str:
        from storage.pg_url import check_url  # only when a URL is given: `init` loads no storage code

        url = text(value, self.what)
        try:
            return check_url(url)
        except ValueError as exc:
            raise Invalid(str(exc)) from None

    def toml(self, value: Any) -> str:
        return toml_string(str(value))


class Pattern(Text):
    """Text that must match ``pattern``; ``mismatch`` is the problem when it does not."""

    def __init__(self, pattern: re.Pattern[str], what: str, mismatch: str, doc: str = "string") -> None:
        super().__init__(what, doc)
        self.pattern, self.mismatch = pattern, mismatch

    def read(self, value: object, table: TableReader, name: str) -> str:
        found = super().read(value, table, name)
        if not self.pattern.match(found):
            raise Invalid(f"{self.mismatch}, got {found!r}")
        return found


class BundleId(Text):
    """An iOS app's bundle id (APNs topic); the VoIP topic is derived from it."""

    def __init__(self) -> None:
        super().__init__("the app's bundle id, e.g. 'com.example.phone'", "bundle id")

    def read(self, value: object, table: TableReader, name: str) -> str:
        topic = super().read(value, table, name)
        if topic.endswith(".voip"):
            raise Invalid("give the plain bundle id; '.voip' is appended for VoIP pushes")
        return topic


SSH_KEY_TYPES: Final = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def ssh_public_key_problem(key: str) -> str | None:
    """Why ``key`` is not an OpenSSH public key line ("TYPE BASE64 [comment]"), or None."""
    parts = key.split()
    if len(parts) < 2:
        return "expected an OpenSSH public key 'TYPE BASE64 [comment]' (one authorized_keys line)"
    kind, blob = parts[0], parts[1]
    if kind not in SSH_KEY_TYPES:
        return f"unsupported key type {kind!r} (expected one of {', '.join(SSH_KEY_TYPES)})"
    try:
        raw = base64.b64decode(blob, validate=True)
    except binascii.Error:
        return "the key data is not valid base64"
    # The blob starts with its own type as an SSH string (uint32 length + bytes): a cheap check
    # that catches keys pasted with a wrong or truncated prefix.
    length = int.from_bytes(raw[:4], "big")
    if raw[4 : 4 + length] != kind.encode():
        return f"the key data is not a valid {kind} key"
    return None


class SshPublicKey(Text):
    """One ``authorized_keys`` line without options; the comment does not make a key different."""

    def __init__(self) -> None:
        super().__init__("an OpenSSH public key 'TYPE BASE64 [comment]'", "OpenSSH public key")

    def read(self, value: object, table: TableReader, name: str) -> str:
        key = super().read(value, table, name)
        if problem := ssh_public_key_problem(key):
            raise Invalid(problem)
        return key.strip()

    def identity(self, value: Any) -> object:
        return " ".join(str(value).split()[:2])


# --------------------------------------------------------------------------- compound values


class _Parts:
    """Problems with items of one value: all are listed, then the value as a whole is unusable."""

    def __init__(self, table: TableReader, name: str) -> None:
        self.table, self.name = table, name
        self._before = len(table.ctx.problems)

    def error(self, part: str, message: str) -> None:
        self.table.error(self.name, message, part=part)

    def done(self) -> None:
        if len(self.table.ctx.problems) > self._before:
            raise Reported


class Strings(Kind[tuple[str, ...]]):
    """An array of non-empty strings; ``distinct``: the same one twice is a problem."""

    what = "an array of strings"
    doc = "array of strings"

    def __init__(self, *, distinct: str | None = None) -> None:
        self.distinct = distinct  # what the items are, for the problem ("token")
        if distinct:
            self.doc = "array of strings, no two alike"

    def read(self, value: object, table: TableReader, name: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise expected(self.what, value)
        parts = _Parts(table, name)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                parts.error(f"[{i}]", str(expected("a non-empty string", item)))
        parts.done()
        if self.distinct and len(set(value)) != len(value):
            raise Invalid(f"lists the same {self.distinct} twice")  # never echo the items: secrets
        return tuple(value)

    def toml(self, value: Any) -> str:
        return "[" + ", ".join(toml_string(item) for item in value) + "]"


class SipListens(Kind[tuple[SipListen, ...]]):
    """SIP listeners ``transport:host:port``: at least one, no two on one port."""

    what = "an array of strings"
    doc = "array of `transport:host:port`, at least one"

    def read(self, value: object, table: TableReader, name: str) -> tuple[SipListen, ...]:
        if not isinstance(value, list):
            raise expected(self.what, value)
        if not value:
            raise Invalid("must list at least one 'transport:host:port'")
        parts = _Parts(table, name)
        result: list[SipListen] = []
        seen: dict[tuple[str, str, int], str] = {}
        for i, spec in enumerate(value):
            try:
                listen = parse_sip_listen(text(spec, "a non-empty string").strip())
            except Invalid as exc:
                parts.error(f"[{i}]", str(exc))
                continue
            except ValueError as exc:
                parts.error(f"[{i}]", f"{exc}, got {spec!r}")
                continue
            # tcp and tls both take a TCP port; port 0 picks a fresh one each time.
            slot = ("udp" if listen.transport == "udp" else "tcp", listen.host, listen.port)
            if listen.port and slot in seen:
                parts.error(f"[{i}]", f"{spec!r} takes the same port as {seen[slot]!r}")
            seen[slot] = spec
            result.append(listen)
        parts.done()
        return tuple(result)

    def toml(self, value: Any) -> str:
        return "[" + ", ".join(toml_string(str(item)) for item in value) + "]"


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Headers(Kind[Mapping[str, str]]):
    """Extra HTTP headers: a table of header name → value."""

    what = "a table"
    doc = "table of strings"

    def read(self, value: object, table: TableReader, name: str) -> Mapping[str, str]:
        if not isinstance(value, dict):
            raise expected(self.what, value)
        parts = _Parts(table, name)
        for header, item in value.items():
            try:
                text(item, "a non-empty string")
            except Invalid as exc:
                parts.error(f".{header}", str(exc))
                continue
            if not _HEADER_NAME.match(header):
                parts.error(f".{header}", "is not a valid HTTP header name")
        parts.done()
        return MappingProxyType(dict(value))

    def toml(self, value: Any) -> str:
        items = ", ".join(f"{key} = {toml_string(item)}" for key, item in value.items())
        return f"{{ {items} }}" if items else "{}"


# --------------------------------------------------------------------------- structures


class Section(Kind[C]):
    """A table ``[name]`` holding a section; absent = every key at its default."""

    what = "a table"
    doc = "table"

    def __init__(self, cls: type[C]) -> None:
        self.cls = cls

    def read(self, value: object, table: TableReader, name: str) -> C:
        return table.sub(name, value).read(self.cls)

    def missing(self, table: TableReader, name: str) -> C:
        return self.read({}, table, name)


class Entries(Kind[tuple[C, ...]]):
    """An array of tables ``[[name]]``, one section each (people, tokens)."""

    what = "an array of tables ([[...]])"
    doc = "array of tables"

    def __init__(self, cls: type[C]) -> None:
        self.cls = cls

    def read(self, value: object, table: TableReader, name: str) -> tuple[C, ...]:
        if not isinstance(value, list):
            raise expected(self.what, value)
        parts = _Parts(table, name)
        read: list[tuple[TableReader, dict[str, Any]]] = []
        entries: list[C] = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                parts.error(f"[{i}]", str(expected("a table", item)))
                continue
            entry = TableReader(item, f"{table.key(name)}[{i}]", table.ctx)
            values, complete = entry.values(self.cls)
            read.append((entry, values))
            if complete:
                entries.append(self.cls(**values))
        self._check_unique(read)
        parts.done()
        return tuple(entries)

    def _check_unique(self, read: Iterable[tuple[TableReader, dict[str, Any]]]) -> None:
        """Names, tokens and keys identify someone, so two entries must not share one."""
        for f, decl in settings_of(self.cls):
            if not decl.unique:
                continue
            seen: set[object] = set()
            for entry, values in read:
                if f.name not in values:
                    continue
                value = values[f.name]
                if (identity := decl.kind.identity(value)) in seen:
                    shown = "" if decl.secret else f" {value!r}"  # never echo a secret
                    entry.error(f.name, f"duplicate{shown}: an earlier entry has the same {f.name}")
                seen.add(identity)

    def toml(self, value: Any) -> str:
        raise NotImplementedError("arrays of tables are written as [[tables]]")


class Typed(Protocol):
    """A section chosen by the ``type`` key of its table (a push provider)."""

    type: ClassVar[str]
    #: what this type is, for the docs and the starter file
    title: ClassVar[str]
    #: the table name the starter file's example uses
    example_name: ClassVar[str]


TypedT = TypeVar("TypedT", bound=Typed)

_TABLE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class NamedTables(Kind[Mapping[str, TypedT]]):
    """``[name.NAME]`` tables, each a section of the class its ``type`` key names."""

    what = "a table"
    doc = "tables"

    def __init__(self, base: type, *types: type[TypedT]) -> None:
        self.base = base
        self.types = {cls.type: cls for cls in types}
        self.type_kind = Choice(tuple(self.types))

    def own_keys(self, cls: type[TypedT]) -> list[str]:
        """The keys only this type has."""
        common = {f.name for f, _ in settings_of(self.base)}
        return [f.name for f, _ in settings_of(cls) if f.name not in common]

    def read(self, value: object, table: TableReader, name: str) -> Mapping[str, TypedT]:
        tables = table.sub(name, value)
        result: dict[str, TypedT] = {}
        for key in tables.names():
            if not _TABLE_NAME.match(key):
                tables.error(key, "provider names may only use letters, digits, '_' and '-'")
            try:
                one = tables.sub(key, tables.raw(key))
            except Invalid as exc:
                tables.error(key, str(exc))
                continue
            raw = one.raw("type")
            try:
                kind = self.type_kind.missing(one, "type") if raw is None else self.type_kind.read(raw, one, "type")
            except Invalid as exc:
                one.error("type", str(exc))
                continue  # without a valid type the other keys cannot be judged
            try:
                result[key] = one.read(self.types[kind], given={"name": key}, hints=self._hints(kind))
            except Reported:
                pass
        return MappingProxyType(result)

    def missing(self, table: TableReader, name: str) -> Mapping[str, TypedT]:
        return MappingProxyType({})

    def _hints(self, kind: str) -> dict[str, str]:
        """Keys of other types, to tell "wrong type" apart from "typo" in unknown-key messages."""
        mine = self.own_keys(self.types[kind])
        return {
            key: f"not used by type '{kind}', only by '{other}'"
            for other, cls in self.types.items()
            if other != kind
            for key in self.own_keys(cls)
            if key not in mine
        }

    def toml(self, value: Any) -> str:
        raise NotImplementedError("named tables are written as [name.NAME] tables")
