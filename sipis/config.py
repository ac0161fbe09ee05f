"""Configuration: one TOML file → a frozen :class:`Config`.

Everything is validated up front and *all* problems are reported together in one
:class:`ConfigError`, each naming its full dotted key, so an operator fixes a file in one round.
Relative paths resolve against the config file's folder; files the core generates itself
(certificates, SSH host key, operator socket) default into ``state_dir``. Durations are seconds
(int or float). The reference for every key is ``docs/configuration.md``.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import math
import os
import re
import secrets
import socket
import tempfile
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal, TypeAlias, cast
from urllib.parse import urlsplit

Role: TypeAlias = Literal["viewer", "operator", "admin"]
Transport: TypeAlias = Literal["udp", "tcp", "tls"]
ReleaseMode: TypeAlias = Literal["redirect", "reject"]
LogLevel: TypeAlias = Literal["debug", "info", "warning", "error", "critical"]

#: Operator roles, least privileged first (so ``ROLES.index`` orders them).
ROLES: Final[tuple[Role, ...]] = ("viewer", "operator", "admin")
TRANSPORTS: Final[tuple[Transport, ...]] = ("udp", "tcp", "tls")
RELEASE_MODES: Final[tuple[ReleaseMode, ...]] = ("redirect", "reject")
LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error", "critical")
PUSH_TYPES: Final[tuple[str, ...]] = ("acrobits", "fcm", "apns", "webhook")

ACROBITS_PNM_URL: Final = "https://pnm.cloudsoftphone.com/pnm2/send"
FCM_URL: Final = "https://fcm.googleapis.com"
APNS_URL: Final = "https://api.push.apple.com"

# AF_UNIX sun_path is 108 bytes on Linux including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107


def _version() -> str:
    try:
        return metadata.version("sipis-console")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class ConfigError(Exception):
    """The configuration is unusable; :attr:`problems` lists every problem found, one per line."""

    def __init__(self, problems: Iterable[str], source: Path | None = None) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        self.source = source
        where = f" {source}" if source else ""
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration{where} ({count}):\n{lines}")


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class HostPort:
    """A TCP listen address; ``host`` is bare (IPv6 without brackets). Port 0 = any free port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class SipListen:
    """One SIP listener, written ``transport:host:port`` in the file."""

    transport: Transport
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.transport}:{HostPort(self.host, self.port)}"


@dataclass(frozen=True)
class LogConfig:
    level: LogLevel = "info"
    file: Path | None = None  # None = stderr


@dataclass(frozen=True, kw_only=True)
class SipConfig:
    listen: tuple[SipListen, ...] = (
        SipListen("udp", "127.0.0.1", 5070),
        SipListen("tcp", "127.0.0.1", 5070),
    )
    ca_file: Path | None = None  # None = system trust store
    tls_verify: bool = True
    # Server certificate for tls listeners; tls_generate = not configured, so the core creates a
    # self-signed pair at these state_dir paths when the files are missing.
    tls_cert: Path
    tls_key: Path
    tls_generate: bool
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    user_agent: str = f"sipis-console/{_version()}"
    register_expires: int = 600
    refresh_min: float = 0.5
    refresh_max: float = 0.8
    keepalive_interval: float = 30.0  # 0 = off
    register_rate: float = 200.0
    backoff_base: float = 2.0
    backoff_max: float = 300.0
    unauthorized_retry: float = 3600.0
    unregister_on_shutdown: bool = True
    default_registrar: str | None = None
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    listen: HostPort | None = HostPort("127.0.0.1", 24998)  # None = app API off
    enroll_tokens: tuple[str, ...] = field(default=(), repr=False)
    tls: bool = True
    tls_cert: Path
    tls_key: Path
    tls_generate: bool


@dataclass(frozen=True)
class AgeingConfig:
    max_age: float = 259200.0
    not_registered_max_age: float = 43200.0
    check_interval: float = 60.0


@dataclass(frozen=True)
class CallsConfig:
    wake_timeout: float = 120.0
    answer_timeout: float = 120.0
    release: ReleaseMode = "redirect"
    no_response_status: int = 480
    no_response_reason: str = "Temporarily Unavailable"
    max_message_body: int = 4194304


@dataclass(frozen=True, kw_only=True)
class PushProviderBase:
    """Settings every provider type shares. ``name`` is the ``NAME`` of ``[push.NAME]``."""

    type: ClassVar[str]
    name: str
    url: str
    verify: bool = True
    ca_file: Path | None = None
    timeout: float = 5.0


@dataclass(frozen=True, kw_only=True)
class AcrobitsPush(PushProviderBase):
    type: ClassVar[str] = "acrobits"


@dataclass(frozen=True, kw_only=True)
class FcmPush(PushProviderBase):
    type: ClassVar[str] = "fcm"
    service_account_file: Path
    project_id: str | None = None  # None = the service account file's project_id
    token_uri: str | None = None  # None = the service account file's token_uri


@dataclass(frozen=True, kw_only=True)
class ApnsPush(PushProviderBase):
    type: ClassVar[str] = "apns"
    team_id: str
    key_id: str
    key_file: Path
    topic: str  # the bundle id

    @property
    def voip_topic(self) -> str:
        return f"{self.topic}.voip"


@dataclass(frozen=True, kw_only=True)
class WebhookPush(PushProviderBase):
    type: ClassVar[str] = "webhook"
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)


PushProvider: TypeAlias = AcrobitsPush | FcmPush | ApnsPush | WebhookPush


@dataclass(frozen=True)
class OperatorToken:
    name: str
    role: Role
    token: str = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class OperatorConfig:
    socket: Path
    tcp_listen: HostPort | None = None
    tokens: tuple[OperatorToken, ...] = ()


@dataclass(frozen=True)
class SshOperator:
    name: str
    role: Role
    public_key: str  # one authorized_keys line without options: "TYPE BASE64 [comment]"


@dataclass(frozen=True, kw_only=True)
class SshConfig:
    listen: HostPort | None = None  # None = SSH console off
    host_key: Path  # generated by the core when the file does not exist
    max_sessions: int = 16
    operators: tuple[SshOperator, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Config:
    state_dir: Path
    node_name: str
    log: LogConfig
    sip: SipConfig
    api: ApiConfig
    ageing: AgeingConfig
    calls: CallsConfig
    push: Mapping[str, PushProvider]
    operator: OperatorConfig
    ssh: SshConfig
    source: Path | None = None  # the file this came from, if any


# --------------------------------------------------------------------------- address parsing


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def parse_host_port(text: str) -> HostPort:
    """Parse ``host:port`` (IPv6 as ``[addr]:port``); raises ValueError with a readable reason."""
    if text.startswith("["):
        addr, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected '[IPv6]:port'")
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            raise ValueError(f"{addr!r} is not an IPv6 address") from None
        host = addr
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError("expected 'host:port'")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets: '[addr]:port'")
        if not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} is not a host name or IPv4 address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
    return HostPort(host, int(port_text))


def parse_sip_listen(text: str) -> SipListen:
    """Parse ``udp|tcp|tls:host:port``; raises ValueError with a readable reason."""
    transport, sep, rest = text.partition(":")
    if not sep or transport.lower() not in TRANSPORTS:
        raise ValueError("expected 'udp|tcp|tls:host:port'")
    address = parse_host_port(rest)
    return SipListen(cast(Transport, transport.lower()), address.host, address.port)


# --------------------------------------------------------------------------- reading tables


def _describe(value: Any) -> str:
    """A value as the problem list shows it: TOML type plus a short rendering."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value}"


def _is_number(value: Any) -> bool:
    # bool is an int subclass in Python, but `true` is no number in a config file.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bounds(low: float | None, low_open: bool, high: float | None, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


class _Context:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []


class _Table:
    """One TOML table being read: typed getters record problems instead of raising (so every
    problem is collected), and every key asked for counts as known for :meth:`finish`."""

    def __init__(self, data: Mapping[str, Any], prefix: str, ctx: _Context) -> None:
        self._data = data
        self._prefix = prefix
        self._ctx = ctx
        self._asked: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def error(self, name: str, message: str) -> None:
        self._ctx.problems.append(f"{self.key(name)}: {message}")

    def has(self, name: str) -> bool:
        return name in self._data

    def raw(self, name: str) -> Any:
        """The value, or None when absent (TOML has no null, so None always means absent)."""
        self._asked.add(name)
        return self._data.get(name)

    def names(self) -> Iterator[str]:
        """All keys of a table whose keys are names chosen by the user (``[push.NAME]``)."""
        for name in self._data:
            self._asked.add(name)
            yield name

    def _expect(self, name: str, value: Any, expected: str) -> None:
        self.error(name, f"expected {expected}, got {_describe(value)}")

    # ---- scalars

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self._expect(name, value, "true or false")
            return default
        return value

    def opt_string(self, name: str, what: str = "a non-empty string") -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self._expect(name, value, what)
            return None
        if any(c in value for c in "\r\n\0"):
            self.error(name, "must not contain line breaks or NUL")
            return None
        return value

    def string(self, name: str, default: str) -> str:
        value = self.opt_string(name)
        return default if value is None else value

    def required_string(self, name: str, what: str = "a non-empty string") -> str:
        if not self.has(name):
            self.raw(name)
            self.error(name, f"required ({what})")
            return ""
        return self.opt_string(name, what) or ""

    def choice(self, name: str, default: str | None, choices: Iterable[str]) -> str:
        """A string from ``choices`` (case-insensitive); ``default=None`` makes the key required."""
        allowed = tuple(choices)
        what = "one of " + ", ".join(repr(c) for c in allowed)
        value = self.raw(name)
        if value is None:
            if default is None:
                self.error(name, f"required ({what})")
                return ""
            return default
        if not isinstance(value, str) or value.lower() not in allowed:
            self._expect(name, value, what)
            return default or ""
        return value.lower()

    def integer(self, name: str, default: int, *, low: int | None = None, high: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or (low is not None and value < low) or (high is not None and value > high):
            bounds = _bounds(low, False, high, False)
            self._expect(name, value, "an integer" + (f" {bounds}" if bounds else ""))
            return default
        return int(value)

    def number(
        self,
        name: str,
        default: float,
        *,
        low: float | None = 0.0,
        low_open: bool = True,
        high: float | None = None,
        high_open: bool = True,
        noun: str = "a number",
    ) -> float:
        """An int or float within bounds (default: > 0), returned as float."""
        value = self.raw(name)
        if value is None:
            return default
        ok = _is_number(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            bounds = _bounds(low, low_open, high, high_open)
            self._expect(name, value, noun + (f" {bounds}" if bounds else ""))
            return default
        return float(value)

    def seconds(self, name: str, default: float, *, zero_ok: bool = False) -> float:
        return self.number(name, default, low=0.0, low_open=not zero_ok, noun="a number of seconds")

    def path(self, name: str) -> Path | None:
        """A path; relative ones resolve against the config file's folder."""
        value = self.opt_string(name, "a path")
        if value is None:
            return None
        return self._ctx.base_dir / Path(value).expanduser()

    def required_path(self, name: str) -> Path:
        if not self.has(name):
            self.raw(name)
            self.error(name, "required (a path)")
            return self._ctx.base_dir
        return self.path(name) or self._ctx.base_dir

    def url(self, name: str, default: str | None) -> str:
        """An http(s) URL; ``default=None`` makes the key required."""
        value = self.required_string(name, "an http(s) URL") if default is None else self.opt_string(name)
        if not value:
            return default or ""
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self._expect(name, value, "an http(s) URL")
        return value

    def host_port(self, name: str, default: HostPort | None) -> HostPort | None:
        """``host:port``; an empty string turns the listener off (None)."""
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str):
            self._expect(name, value, "'host:port' or \"\" (off)")
            return default
        if not value.strip():
            return None
        try:
            return parse_host_port(value.strip())
        except ValueError as exc:
            self.error(name, f"{exc}, got {value!r}")
            return default

    # ---- compound values

    def string_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, list):
            self._expect(name, value, "an array of strings")
            return default
        items: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self._expect(f"{name}[{i}]", item, "a non-empty string")
            else:
                items.append(item)
        return tuple(items)

    def string_map(self, name: str) -> dict[str, str]:
        sub = self.table(name)
        return {key: value for key in sub.names() if (value := sub.opt_string(key)) is not None}

    def table(self, name: str) -> _Table:
        value = self.raw(name)
        if value is None:
            value = {}
        elif not isinstance(value, dict):
            self._expect(name, value, "a table")
            value = {}
        return _Table(value, self.key(name), self._ctx)

    def tables(self, name: str) -> list[_Table]:
        """An array of tables (``[[name]]``)."""
        value = self.raw(name)
        if value is None:
            return []
        if not isinstance(value, list):
            self._expect(name, value, "an array of tables ([[...]])")
            return []
        result = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                result.append(_Table(item, f"{self.key(name)}[{i}]", self._ctx))
            else:
                self._expect(f"{name}[{i}]", item, "a table")
        return result

    def finish(self, hints: Mapping[str, str] | None = None) -> None:
        """Report every key nobody asked for, with the closest known key as a suggestion."""
        for name, value in self._data.items():
            if name in self._asked:
                continue
            kind = "table" if isinstance(value, dict) else "key"
            message = f"unknown {kind} '{self.key(name)}'"
            if hints and name in hints:
                message += f" ({hints[name]})"
            elif close := difflib.get_close_matches(name, sorted(self._asked), n=1):
                message += f" (did you mean '{self.key(close[0])}'?)"
            self._ctx.problems.append(message)


# --------------------------------------------------------------------------- sections


def _path_pair(t: _Table, first: str, second: str) -> tuple[Path | None, Path | None]:
    """Two paths that only work together (certificate and key): both or neither."""
    a, b = t.path(first), t.path(second)
    if bool(a) != bool(b):
        missing, present = (second, first) if a else (first, second)
        t.error(missing, f"required together with {t.key(present)}")
        return None, None
    return a, b


def _tls_pair(t: _Table, state_dir: Path, stem: str) -> tuple[Path, Path, bool]:
    """``tls_cert``/``tls_key``; neither given = a pair the core generates in state_dir."""
    cert, key = _path_pair(t, "tls_cert", "tls_key")
    if cert and key:
        return cert, key, False
    return state_dir / f"{stem}.crt", state_dir / f"{stem}.key", True


def _log(t: _Table) -> LogConfig:
    level = cast(LogLevel, t.choice("level", LogConfig.level, LOG_LEVELS))
    config = LogConfig(level=level, file=t.path("file"))
    t.finish()
    return config


def _sip_listen(t: _Table) -> tuple[SipListen, ...]:
    value = t.raw("listen")
    if value is None:
        return SipConfig.listen
    if value == []:
        t.error("listen", "must list at least one 'transport:host:port'")
    specs = t.string_list("listen", ())
    result: list[SipListen] = []
    seen: dict[tuple[str, str, int], str] = {}
    for i, spec in enumerate(specs):
        try:
            listen = parse_sip_listen(spec.strip())
        except ValueError as exc:
            t.error(f"listen[{i}]", f"{exc}, got {spec!r}")
            continue
        # tcp and tls both take a TCP port; port 0 picks a fresh one each time.
        slot = ("udp" if listen.transport == "udp" else "tcp", listen.host, listen.port)
        if listen.port and slot in seen:
            t.error(f"listen[{i}]", f"{spec!r} takes the same port as {seen[slot]!r}")
        seen[slot] = spec
        result.append(listen)
    return tuple(result)


_REGISTRAR = re.compile(r"^sips?:[^\s@;]+(;\S*)?$", re.IGNORECASE)


def _sip(t: _Table, state_dir: Path) -> SipConfig:
    d = SipConfig
    listen = _sip_listen(t)
    cert, key, generate = _tls_pair(t, state_dir, "sip-tls")
    client_cert, client_key = _path_pair(t, "tls_client_cert", "tls_client_key")
    registrar = t.opt_string("default_registrar", "a SIP URI such as 'sip:pbx.example.com'")
    if registrar and not _REGISTRAR.match(registrar):
        t.error("default_registrar", f"expected a SIP URI such as 'sip:pbx.example.com', got {registrar!r}")
    config = SipConfig(
        listen=listen,
        ca_file=t.path("ca_file"),
        tls_verify=t.boolean("tls_verify", d.tls_verify),
        tls_cert=cert,
        tls_key=key,
        tls_generate=generate,
        tls_client_cert=client_cert,
        tls_client_key=client_key,
        user_agent=t.string("user_agent", d.user_agent),
        register_expires=t.integer("register_expires", d.register_expires, low=1),
        refresh_min=t.number("refresh_min", d.refresh_min, high=1.0, noun="a fraction"),
        refresh_max=t.number("refresh_max", d.refresh_max, high=1.0, noun="a fraction"),
        keepalive_interval=t.seconds("keepalive_interval", d.keepalive_interval, zero_ok=True),
        register_rate=t.number("register_rate", d.register_rate, noun="a rate per second"),
        backoff_base=t.seconds("backoff_base", d.backoff_base),
        backoff_max=t.seconds("backoff_max", d.backoff_max),
        unauthorized_retry=t.seconds("unauthorized_retry", d.unauthorized_retry),
        unregister_on_shutdown=t.boolean("unregister_on_shutdown", d.unregister_on_shutdown),
        default_registrar=registrar,
        t1=t.seconds("t1", d.t1),
        t2=t.seconds("t2", d.t2),
        t4=t.seconds("t4", d.t4),
    )
    _check_sip_order(t, config)
    t.finish()
    return config


def _check_sip_order(t: _Table, c: SipConfig) -> None:
    """Cross-key rules: each names the key that has to give way."""
    if c.refresh_min >= c.refresh_max:
        _must_be(t, "refresh_min", c.refresh_min, "<", "refresh_max", c.refresh_max)
    if c.backoff_max < c.backoff_base:
        _must_be(t, "backoff_max", c.backoff_max, ">=", "backoff_base", c.backoff_base)
    if c.t2 < c.t1:
        _must_be(t, "t2", c.t2, ">=", "t1", c.t1)


def _must_be(t: _Table, name: str, value: float, relation: str, other: str, other_value: float) -> None:
    t.error(name, f"must be {relation} {t.key(other)} ({other_value:g}), got {value:g}")


def _api(t: _Table, state_dir: Path) -> ApiConfig:
    listen = t.host_port("listen", ApiConfig.listen)
    tokens = t.string_list("enroll_tokens", ())
    tls = t.boolean("tls", ApiConfig.tls)
    cert, key, generate = _tls_pair(t, state_dir, "api-tls")
    # Absent or [] (a wrongly typed value has its own problem already).
    if listen is not None and t.raw("enroll_tokens") in (None, []):
        off = f'{t.key("listen")} = ""'
        t.error("enroll_tokens", f"must list at least one token while the app API is on (or set {off})")
    if len(set(tokens)) != len(tokens):
        t.error("enroll_tokens", "lists the same token twice")  # never echo secrets
    t.finish()
    return ApiConfig(
        listen=listen, enroll_tokens=tokens, tls=tls, tls_cert=cert, tls_key=key, tls_generate=generate
    )


def _ageing(t: _Table) -> AgeingConfig:
    d = AgeingConfig
    config = AgeingConfig(
        max_age=t.seconds("max_age", d.max_age),
        not_registered_max_age=t.seconds("not_registered_max_age", d.not_registered_max_age),
        check_interval=t.seconds("check_interval", d.check_interval),
    )
    t.finish()
    return config


def _calls(t: _Table) -> CallsConfig:
    d = CallsConfig
    config = CallsConfig(
        wake_timeout=t.seconds("wake_timeout", d.wake_timeout),
        answer_timeout=t.seconds("answer_timeout", d.answer_timeout),
        release=cast(ReleaseMode, t.choice("release", d.release, RELEASE_MODES)),
        no_response_status=t.integer("no_response_status", d.no_response_status, low=400, high=699),
        no_response_reason=t.string("no_response_reason", d.no_response_reason),
        max_message_body=t.integer("max_message_body", d.max_message_body, low=1),
    )
    t.finish()
    return config


# Keys only some push types read, to tell "wrong type" apart from "typo" in unknown-key messages.
_PUSH_TYPE_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "acrobits": (),
    "fcm": ("project_id", "service_account_file", "token_uri"),
    "apns": ("team_id", "key_id", "key_file", "topic"),
    "webhook": ("headers",),
}
_PUSH_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_APPLE_ID = re.compile(r"^[A-Z0-9]{10}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _push(t: _Table) -> dict[str, PushProvider]:
    providers: dict[str, PushProvider] = {}
    for name in t.names():
        if not _PUSH_NAME.match(name):
            t.error(name, "provider names may only use letters, digits, '_' and '-'")
        sub = t.table(name)
        provider = _push_provider(name, sub)
        if provider is not None:
            providers[name] = provider
    return providers


def _push_provider(name: str, t: _Table) -> PushProvider | None:
    kind = t.choice("type", None, PUSH_TYPES)
    if not kind:
        return None  # without a valid type the other keys cannot be judged
    default_url = {"acrobits": ACROBITS_PNM_URL, "fcm": FCM_URL, "apns": APNS_URL}.get(kind)
    common: dict[str, Any] = {
        "name": name,
        "url": t.url("url", default_url),
        "verify": t.boolean("verify", PushProviderBase.verify),
        "ca_file": t.path("ca_file"),
        "timeout": t.seconds("timeout", PushProviderBase.timeout),
    }
    if common["ca_file"] and not common["verify"]:
        t.error("ca_file", f"has no effect with {t.key('verify')} = false; drop one of them")
    provider = _push_specific(kind, t, common)
    t.finish(
        {
            key: f"not used by type '{kind}', only by '{other}'"
            for other, keys in _PUSH_TYPE_KEYS.items()
            if other != kind
            for key in keys
            if key not in _PUSH_TYPE_KEYS[kind]
        }
    )
    return provider


def _push_specific(kind: str, t: _Table, common: dict[str, Any]) -> PushProvider:
    if kind == "fcm":
        token_uri = t.url("token_uri", "") or None
        return FcmPush(
            **common,
            service_account_file=t.required_path("service_account_file"),
            project_id=t.opt_string("project_id"),
            token_uri=token_uri,
        )
    if kind == "apns":
        return _apns(t, common)
    if kind == "webhook":
        headers = t.string_map("headers")
        for header in headers:
            if not _HEADER_NAME.match(header):
                t.error(f"headers.{header}", "is not a valid HTTP header name")
        return WebhookPush(**common, headers=MappingProxyType(headers))
    return AcrobitsPush(**common)


def _apns(t: _Table, common: dict[str, Any]) -> ApnsPush:
    team_id, key_id = _apple_id(t, "team_id"), _apple_id(t, "key_id")
    topic = t.required_string("topic", "the app's bundle id, e.g. 'com.example.phone'")
    if topic.endswith(".voip"):
        t.error("topic", "give the plain bundle id; '.voip' is appended for VoIP pushes")
    key_file = t.required_path("key_file")
    return ApnsPush(**common, team_id=team_id, key_id=key_id, key_file=key_file, topic=topic)


def _apple_id(t: _Table, name: str) -> str:
    value = t.required_string(name, "Apple's 10-character id, e.g. 'ABCDE12345'")
    if value and not _APPLE_ID.match(value):
        t.error(name, f"expected Apple's 10-character id (A-Z, 0-9), got {value!r}")
    return value


def _role(t: _Table) -> Role:
    return cast(Role, t.choice("role", None, ROLES))


def _check_unique(entries: list[_Table], values: list[str], key: str, secret: bool) -> None:
    """Names, tokens and keys identify someone, so two entries must not share one."""
    seen: set[str] = set()
    for entry, value in zip(entries, values, strict=True):
        if value and value in seen:
            shown = "" if secret else f" {value!r}"  # never echo a secret
            entry.error(key, f"duplicate{shown}: an earlier entry has the same {key}")
        seen.add(value)


def _operator(t: _Table, state_dir: Path) -> OperatorConfig:
    sock = t.path("socket") or state_dir / "operator.sock"
    if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
        t.error("socket", f"path is longer than {_MAX_SOCKET_PATH} bytes, too long for a unix socket: {sock}")
    tcp_listen = t.host_port("tcp_listen", None)
    entries = t.tables("tokens")
    tokens = []
    for entry in entries:
        name, role, token = entry.required_string("name"), _role(entry), entry.required_string("token")
        tokens.append(OperatorToken(name, role, token))
        entry.finish()
    _check_unique(entries, [x.name for x in tokens], "name", secret=False)
    _check_unique(entries, [x.token for x in tokens], "token", secret=True)
    if tcp_listen is not None and not tokens:
        t.error("tokens", f"at least one token is required while {t.key('tcp_listen')} is set")
    t.finish()
    return OperatorConfig(socket=sock, tcp_listen=tcp_listen, tokens=tuple(tokens))


_SSH_KEY_TYPES: Final = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def ssh_public_key_problem(text: str) -> str | None:
    """Why ``text`` is not an OpenSSH public key line ("TYPE BASE64 [comment]"), or None."""
    parts = text.split()
    if len(parts) < 2:
        return "expected an OpenSSH public key 'TYPE BASE64 [comment]' (one authorized_keys line)"
    kind, blob = parts[0], parts[1]
    if kind not in _SSH_KEY_TYPES:
        return f"unsupported key type {kind!r} (expected one of {', '.join(_SSH_KEY_TYPES)})"
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


def _ssh(t: _Table, state_dir: Path) -> SshConfig:
    listen = t.host_port("listen", SshConfig.listen)
    host_key = t.path("host_key") or state_dir / "ssh_host_ed25519_key"
    max_sessions = t.integer("max_sessions", SshConfig.max_sessions, low=1)
    entries = t.tables("operators")
    operators = []
    for entry in entries:
        key = entry.required_string("public_key", "an OpenSSH public key 'TYPE BASE64 [comment]'")
        if key and (problem := ssh_public_key_problem(key)):
            entry.error("public_key", problem)
        operators.append(SshOperator(entry.required_string("name"), _role(entry), key.strip()))
        entry.finish()
    _check_unique(entries, [x.name for x in operators], "name", secret=False)
    key_data = [" ".join(x.public_key.split()[:2]) for x in operators]  # the comment does not count
    _check_unique(entries, key_data, "public_key", secret=True)
    if listen is not None and not operators:
        needed = f"at least one [[{t.key('operators')}]] is required while {t.key('listen')} is set"
        t.error("operators", needed)
    t.finish()
    return SshConfig(listen=listen, host_key=host_key, max_sessions=max_sessions, operators=tuple(operators))


# --------------------------------------------------------------------------- entry points


#: The placeholder in :data:`STARTER_CONFIG` that :func:`write_starter_config` replaces.
STARTER_TOKEN_PLACEHOLDER: Final = "change-me"

#: A commented starter file: every key, lab-safe values, loopback listeners only.
STARTER_CONFIG: Final = """\
# sipis-console configuration (TOML). Durations are seconds; fractions are allowed.
# Relative paths resolve against this file's folder. Reference: docs/configuration.md

state_dir = "var"                  # database, key file, generated certificates and host key
# node_name = "sipis-1"            # shown in the console; default: this host's name

[log]
level = "info"                     # debug | info | warning | error | critical
# file = "sipis.log"               # default: stderr

[sip]
listen = ["udp:127.0.0.1:5070", "tcp:127.0.0.1:5070"]  # transport:host:port (udp|tcp|tls), IPv6 as [addr]
# tls_cert = "sip.crt"             # server certificate for tls listeners; with tls_key,
# tls_key = "sip.key"              # or both absent: self-signed pair generated into state_dir
# ca_file = "pbx-ca.pem"           # CA for the PBX's TLS certificate; default: system store
tls_verify = true                  # check the PBX's certificate; false only in labs
# tls_client_cert = "client.crt"   # client certificate when the PBX wants mutual TLS
# tls_client_key = "client.key"    #   (give both or neither)
# user_agent = "sipis-console/x.y"  # User-Agent toward the PBX; default: this version
register_expires = 600             # Expires asked for in REGISTER
refresh_min = 0.5                  # refresh at a random point between these fractions
refresh_max = 0.8                  #   of the granted expiry
keepalive_interval = 30            # CRLF keep-alive on TCP/TLS flows (RFC 5626); 0 = off
register_rate = 200                # max new REGISTER transactions per second (start-up pacing)
backoff_base = 2                   # exponential backoff with jitter after timeouts,
backoff_max = 300                  #   lost flows and 5xx without Retry-After
unauthorized_retry = 3600          # wait this long after a registrar says 'unauthorized'
unregister_on_shutdown = true      # remove our bindings when the core stops
# default_registrar = "sip:pbx.example.com;transport=tcp"  # for enrolments without a registrar
t1 = 0.5                           # RFC 3261 T1: RTT estimate, first retransmit
t2 = 4.0                           # RFC 3261 T2: longest retransmit interval
t4 = 5.0                           # RFC 3261 T4: how long the network keeps a message

[api]                              # the HTTPS app API (enrolment, background/foreground)
listen = "127.0.0.1:24998"         # host:port; "" = API off
enroll_tokens = ["change-me"]      # apps present one of these to enrol; keep them secret
tls = true                         # false only in labs and tests
# tls_cert = "api.crt"             # with tls_key, or both absent: self-signed pair
# tls_key = "api.key"              #   generated into state_dir

[ageing]
max_age = 259200                   # app silent longer (3 days) -> off, credentials wiped
not_registered_max_age = 43200     # not registered longer (12 h) -> off
check_interval = 60                # how often ageing runs

[calls]
wake_timeout = 120                 # T1: push sent, waiting for the app to wake
answer_timeout = 120               # T2: app awake, waiting for it to take the call
release = "redirect"               # hand-over: "redirect" (302 to the app) or "reject"
no_response_status = 480           # final response when the app never reacts (400-699)
no_response_reason = "Temporarily Unavailable"  # its reason phrase
max_message_body = 4194304         # SIP MESSAGE bodies larger than this get 413

# One [push.NAME] table per push provider. Examples (uncomment and fill in):
#
# [push.mediator]
# type = "acrobits"                # Acrobits PN mediator (pnm2/send)
# url = "https://pnm.cloudsoftphone.com/pnm2/send"  # the default
# verify = true                    # check the provider's TLS certificate
# # ca_file = "mediator-ca.pem"    # or trust only this CA
# timeout = 5                      # per request
#
# [push.android]
# type = "fcm"                     # Firebase Cloud Messaging HTTP v1
# service_account_file = "firebase-service-account.json"  # from the Firebase console
# # project_id = "my-project"      # default: project_id from the service account file
# # token_uri = "https://oauth2.googleapis.com/token"  # default: from the service account file
# # url = "https://fcm.googleapis.com"  # base URL (the default)
#
# [push.ios]
# type = "apns"                    # Apple Push Notification service, token (.p8) auth
# team_id = "ABCDE12345"          # Apple developer team id
# key_id = "KEY1234567"            # id of the APNs auth key
# key_file = "AuthKey_KEY1234567.p8"  # the APNs auth key (.p8)
# topic = "com.example.phone"      # bundle id; ".voip" is appended for VoIP pushes
# # url = "https://api.sandbox.push.apple.com"  # default: https://api.push.apple.com
#
# [push.hook]
# type = "webhook"                 # POST a JSON description of the push to your own service
# url = "https://push.example.com/sipis"  # required for webhooks
# headers = { Authorization = "Bearer secret" }  # optional extra HTTP headers

[operator]                         # the operator API (console, automation)
# socket = "var/operator.sock"     # unix socket (mode 0600); default: <state_dir>/operator.sock
# tcp_listen = "127.0.0.1:24999"   # optional TCP listener; needs [[operator.tokens]]
#
# [[operator.tokens]]
# name = "automation"              # unique name, shown in audit records
# role = "viewer"                  # viewer | operator | admin
# token = "a-long-random-secret"   # the bearer token; keep it secret

[ssh]                              # the NOC console over SSH (key auth only)
listen = ""                        # e.g. "127.0.0.1:2222"; "" = off; needs [[ssh.operators]]
# host_key = "var/ssh_host_ed25519_key"  # default: generated into state_dir
max_sessions = 16                  # concurrent console sessions
#
# [[ssh.operators]]
# name = "noc"                     # unique operator name
# role = "operator"                # viewer | operator | admin
# public_key = "ssh-ed25519 AAAA... noc@example"  # one authorized_keys line, no options
"""


def write_starter_config(path: Path, force: bool = False) -> None:
    """Write :data:`STARTER_CONFIG` with a fresh random enroll token, mode 0600 (it holds secrets).

    Refuses to replace an existing file (FileExistsError) unless ``force``.
    """
    path = Path(path).expanduser()
    token = secrets.token_urlsafe(24)
    text = STARTER_CONFIG.replace(f'"{STARTER_TOKEN_PLACEHOLDER}"', f'"{token}"', 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not force:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            message = f"{path} already exists; not overwriting it (use force to replace it)"
            raise FileExistsError(message) from None
        _write_private(fd, text)
        return
    # Replace through a private temp file: the result is 0600 even if the old file was not.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        _write_private(fd, text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_private(fd: int, text: str) -> None:
    os.fchmod(fd, 0o600)  # the umask may have been stricter, never looser; make it exact
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def parse_config(data: Mapping[str, Any], base_dir: Path, *, source: Path | None = None) -> Config:
    """Validate parsed TOML; relative paths resolve against ``base_dir``. Raises ConfigError."""
    ctx = _Context(base_dir.expanduser().absolute())
    root = _Table(data, "", ctx)
    state_dir = root.path("state_dir") or ctx.base_dir / "var"
    node_name = root.string("node_name", socket.gethostname())
    config = Config(
        state_dir=state_dir,
        node_name=node_name,
        log=_log(root.table("log")),
        sip=_sip(root.table("sip"), state_dir),
        api=_api(root.table("api"), state_dir),
        ageing=_ageing(root.table("ageing")),
        calls=_calls(root.table("calls")),
        push=MappingProxyType(_push(root.table("push"))),
        operator=_operator(root.table("operator"), state_dir),
        ssh=_ssh(root.table("ssh"), state_dir),
        source=source,
    )
    root.finish()
    if ctx.problems:
        raise ConfigError(ctx.problems, source)
    return config


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file. Raises ConfigError (also for I/O and syntax)."""
    path = Path(path).expanduser().absolute()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(["file not found (create one with write_starter_config / 'init')"], path) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax error: {exc}"], path) from None
    return parse_config(data, path.parent, source=path)


def insecure_settings(config: Config) -> list[str]:
    """Lab-only settings in use, for a start-up warning."""
    found = []
    if not config.sip.tls_verify:
        found.append("sip.tls_verify = false: the PBX's TLS certificate is not checked")
    if config.api.listen is not None and not config.api.tls:
        found.append("api.tls = false: the app API (credentials, tokens) runs over plain HTTP")
    found += [
        f"push.{p.name}.verify = false: the provider's TLS certificate is not checked"
        for p in config.push.values()
        if not p.verify
    ]
    return found
