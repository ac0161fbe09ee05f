"""Every setting of the config file, declared once: key, type, default, bounds and doc text.

The reader, the starter file (``sipis-console init``) and the tables of ``docs/configuration.md``
are all made from these declarations (``python -m sipis.config docs`` regenerates the docs). The
runtime parts take their section as it is: ``RegistrationEngine(…, SipConfig)``,
``CallManager(settings=CallsConfig)``, ``Ageing(…, AgeingConfig)``; built without arguments, a
section holds the declared defaults (paths of generated files relative to ``state_dir``).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, Final, Literal, TypeAlias

from sipis.config.addresses import HostPort, SipListen, parse_sip_listen, source_problem
from sipis.config.kinds import (
    BundleId,
    Choice,
    DatabaseUrl,
    Entries,
    FilePath,
    Flag,
    Headers,
    Integer,
    Listen,
    NamedTables,
    Number,
    Pattern,
    Seconds,
    Section,
    SipListens,
    SocketPath,
    SshPublicKey,
    StatePath,
    Strings,
    Text,
    Url,
)
from sipis.config.schema import Check, Order, Together, override, section, setting

Role: TypeAlias = Literal["viewer", "operator", "admin"]
ReleaseMode: TypeAlias = Literal["redirect", "reject"]
LogLevel: TypeAlias = Literal["debug", "info", "warning", "error", "critical"]

#: Operator roles, least privileged first (so ``ROLES.index`` orders them).
ROLES: Final[tuple[Role, ...]] = ("viewer", "operator", "admin")
RELEASE_MODES: Final[tuple[ReleaseMode, ...]] = ("redirect", "reject")
LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error", "critical")
LogFormat: TypeAlias = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")

ACROBITS_PNM_URL: Final = "https://pnm.cloudsoftphone.com/pnm2/send"
FCM_URL: Final = "https://fcm.googleapis.com"
APNS_URL: Final = "https://api.push.apple.com"

#: The starter file's enroll token, replaced by a random one when the file is written.
STARTER_TOKEN_PLACEHOLDER: Final = "change-me"


def package_version() -> str:
    """The installed package's version (``--version``, User-Agent, the operator API's summary)."""
    try:
        return metadata.version("sipis-console")
    except metadata.PackageNotFoundError:
        return "0+unknown"


SECONDS: Final = Seconds()
FRACTION: Final = Number("a fraction", "fraction", high=1.0)
SIP_URI: Final = Pattern(re.compile(r"^sips?:[^\s@;]+(;\S*)?$", re.IGNORECASE),
                         "a SIP URI such as 'sip:pbx.example.com'",
                         "expected a SIP URI such as 'sip:pbx.example.com'", "SIP URI")
APPLE_ID: Final = Pattern(re.compile(r"^[A-Z0-9]{10}$"), "Apple's 10-character id, e.g. 'ABCDE12345'",
                          "expected Apple's 10-character id (A-Z, 0-9)", "10 characters `A-Z`, `0-9`")


@section()
class LogConfig:
    level: LogLevel = setting(Choice(LOG_LEVELS), "how much to log", default="info")
    file: Path | None = setting(FilePath(), "log file", default=None, default_doc="stderr",
                                example=Path("sipis.log"))
    format: LogFormat = setting(Choice(LOG_FORMATS), "`text` (one line per record) or `json` (one JSON "
                                "object per line, for log shippers)", default="text")


@section(rules=(
    Together("tls_cert", "tls_key", flag="tls_generate"),
    Together("tls_client_cert", "tls_client_key"),
    Order("refresh_min", "<", "refresh_max"),
    Order("backoff_max", ">=", "backoff_base"),
    Order("t2", ">=", "t1"),
    Check("trusted_sources", lambda v: source_problem(v["trusted_sources"]) is not None,
          "each entry must be an IP address, address:port ([v6]:port) or CIDR network"),
))
class SipConfig:
    listen: tuple[SipListen, ...] = setting(
        SipListens(), "SIP listeners (`udp`, `tcp`, `tls`; IPv6 as `[addr]`); `tcp` and `tls` must not share a port",
        default=(SipListen("udp", "127.0.0.1", 5070), SipListen("tcp", "127.0.0.1", 5070)))
    tls_cert: Path = setting(StatePath(), "server certificate for `tls` listeners (none: a self-signed pair is "
                             "generated)", default=Path("sip-tls.crt"), example=Path("sip.crt"))
    tls_key: Path = setting(StatePath(), "its private key", default=Path("sip-tls.key"), example=Path("sip.key"))
    #: no pair configured: the core creates a self-signed one at tls_cert/tls_key when they are missing
    tls_generate: bool = True
    ca_file: Path | None = setting(FilePath(), "CA for the PBX's TLS certificate", default=None,
                                   default_doc="system trust store", example=Path("pbx-ca.pem"))
    tls_verify: bool = setting(Flag(), "check the PBX's certificate; `false` only in labs", default=True)
    tls_client_cert: Path | None = setting(FilePath(), "client certificate when the PBX wants mutual TLS",
                                           default=None, example=Path("client.crt"))
    tls_client_key: Path | None = setting(FilePath(), "its private key", default=None, example=Path("client.key"))
    user_agent: str = setting(Text(), "User-Agent toward the PBX", default=f"sipis-console/{package_version()}",
                              default_doc='`"sipis-console/<version>"`', example="sipis-console/x.y")
    register_expires: int = setting(Integer(low=1), "Expires asked for in REGISTER", default=600)
    refresh_min: float = setting(FRACTION, "refresh at a random point between these fractions of the granted expiry",
                                 default=0.5)
    refresh_max: float = setting(FRACTION, "the refresh window's end", default=0.8)
    keepalive_interval: float = setting(Seconds(zero_ok=True), "CRLF keep-alive on TCP/TLS flows (RFC 5626); `0` = off",
                                        default=30.0)
    register_rate: float = setting(Number("a rate per second", "rate per second"),
                                   "REGISTER transactions per second at most for all but routine refreshes (start-up, "
                                   "take-overs, re-enrolments, removals, retries; a challenged retry counts)",
                                   default=200.0)
    backoff_base: float = setting(SECONDS, "first wait of the exponential backoff with jitter after timeouts, lost "
                                  "flows and 5xx without Retry-After", default=2.0)
    backoff_max: float = setting(SECONDS, "longest backoff wait", default=300.0)
    unauthorized_retry: float = setting(SECONDS, "wait this long after a registrar says 'unauthorized'",
                                        default=3600.0)
    unregister_on_shutdown: bool = setting(Flag(), "remove our bindings when the core stops", default=True)
    default_registrar: str | None = setting(SIP_URI, "registrar for enrolments that name none", default=None,
                                            example="sip:pbx.example.com;transport=tcp")
    t1: float = setting(SECONDS, "RFC 3261 T1: RTT estimate, first retransmit", default=0.5)
    t2: float = setting(SECONDS, "RFC 3261 T2: longest retransmit interval", default=4.0)
    t4: float = setting(SECONDS, "RFC 3261 T4: how long the network keeps a message", default=5.0)
    # -- who may send us requests, and what junk may cost (README "Security and limits")
    trusted_sources: tuple[str, ...] = setting(
        Strings(), "peers whose INVITE/MESSAGE for our bindings are taken besides the registrars we registered "
        "with: IP address (any port), `address:port` or CIDR network; anyone else gets 403", default=(),
        example=("192.0.2.10:5060", "198.51.100.0/24"))
    idle_timeout: float = setting(Seconds(zero_ok=True), "inbound TCP/TLS connections that complete no message for "
                                  "this long are closed (never the flows to our registrars); `0` = never",
                                  default=30.0)
    max_connections: int = setting(Integer(low=1), "inbound TCP/TLS connections at most; more are refused and "
                                   "counted", default=10000)
    max_connections_per_source: int = setting(Integer(low=1), "inbound TCP/TLS connections from one address at "
                                              "most", default=100)


@section(rules=(
    Together("tls_cert", "tls_key", flag="tls_generate"),
    Check("enroll_tokens", lambda v: v["listen"] is not None and not v["enroll_tokens"],
          'must list at least one token while the app API is on (or set {listen} = "")', needs=("listen",)),
))
class ApiConfig:
    listen: HostPort | None = setting(Listen(), "where the app API listens", default=HostPort("127.0.0.1", 24998))
    enroll_tokens: tuple[str, ...] = setting(
        Strings(distinct="token"), "apps present one of these to enrol; required while the app API is on; keep "
        "them secret", default=(), secret=True, starter=(STARTER_TOKEN_PLACEHOLDER,))
    tls: bool = setting(Flag(), "`false` (plain HTTP) only in labs and tests", default=True)
    tls_cert: Path = setting(StatePath(), "server certificate (none: a self-signed pair is generated)",
                             default=Path("api-tls.crt"), example=Path("api.crt"))
    tls_key: Path = setting(StatePath(), "its private key", default=Path("api-tls.key"), example=Path("api.key"))
    #: no pair configured: the core creates a self-signed one at tls_cert/tls_key when they are missing
    tls_generate: bool = True
    commit_timeout: float = setting(SECONDS, "longest wait for storage to commit an app's change; past it the app "
                                    "gets `503` with `Retry-After` and the change is not applied", default=2.0)
    # Request limits (sipis/api/limits.py); over them the API answers 429 with Retry-After.
    rate_per_source: float = setting(
        Number("a rate per second", "rate per second", low=0.0, low_open=False),
        "requests per second from one address, sustained; `0` = no limit", default=50.0)
    burst_per_source: float = setting(Number("a number of requests", "requests", low=1.0, low_open=False),
                                      "requests one address may make at once", default=200.0)
    rate_per_token: float = setting(
        Number("a rate per second", "rate per second", low=0.0, low_open=False),
        "requests per second with one instance token, sustained; `0` = no limit", default=2.0)
    burst_per_token: float = setting(Number("a number of requests", "requests", low=1.0, low_open=False),
                                     "requests one instance token may make at once", default=20.0)


@section()
class AgeingConfig:
    max_age: float = setting(SECONDS, "app silent longer → instance off, credentials wiped", default=259200.0)
    not_registered_max_age: float = setting(SECONDS, "not registered longer → instance off", default=43200.0)
    check_interval: float = setting(SECONDS, "how often ageing runs", default=60.0)


@section()
class CallsConfig:
    wake_timeout: float = setting(SECONDS, "T1: push sent, waiting for the app to wake", default=120.0)
    answer_timeout: float = setting(SECONDS, "T2: app awake, waiting for it to take the call", default=120.0)
    release: ReleaseMode = setting(Choice(RELEASE_MODES), "how a held INVITE is handed over: `redirect` (302 to "
                                   "the app) or `reject` (480, the PBX forks)", default="redirect")
    no_response_status: int = setting(Integer(low=400, high=699), "final response when the app never reacts",
                                      default=480)
    no_response_reason: str = setting(Text(), "its reason phrase", default="Temporarily Unavailable")
    max_message_body: int = setting(Integer(low=1), "SIP MESSAGE bodies larger than this (bytes) get 413",
                                    default=4194304)


@section(rules=(
    Check("ca_file", lambda v: v["ca_file"] is not None and not v["verify"],
          "has no effect with {verify} = false; drop one of them", needs=("verify",), doc="not with `verify = false`"),
))
class PushProviderBase:
    """Settings every provider type shares. ``name`` is the ``NAME`` of ``[push.NAME]``."""

    type: ClassVar[str]
    title: ClassVar[str]
    example_name: ClassVar[str]
    name: str
    url: str = setting(Url(), "endpoint (acrobits, webhook) or base URL (fcm, apns; the APNs sandbox: "
                       "`https://api.sandbox.push.apple.com`)")
    verify: bool = setting(Flag(), "check the provider's TLS certificate", default=True)
    ca_file: Path | None = setting(FilePath(), "trust only this CA", default=None, default_doc="system trust store",
                                   example=Path("mediator-ca.pem"))
    timeout: float = setting(SECONDS, "per request", default=5.0)


@section()
class AcrobitsPush(PushProviderBase):
    type: ClassVar[str] = "acrobits"
    title: ClassVar[str] = "Acrobits PN mediator (`pnm2/send`)"
    example_name: ClassVar[str] = "mediator"
    url: str = override(PushProviderBase, "url", default=ACROBITS_PNM_URL)


@section()
class FcmPush(PushProviderBase):
    type: ClassVar[str] = "fcm"
    title: ClassVar[str] = "Firebase Cloud Messaging HTTP v1"
    example_name: ClassVar[str] = "android"
    url: str = override(PushProviderBase, "url", default=FCM_URL)
    service_account_file: Path = setting(FilePath(), "Google service account JSON (from the Firebase console)",
                                         example=Path("firebase-service-account.json"))
    # Read lazily by the provider from the service account file: the loader never opens key files.
    project_id: str | None = setting(Text(), "Firebase project id", default=None,
                                     default_doc="from the service account file", example="my-project")
    token_uri: str | None = setting(Url(), "OAuth token endpoint", default=None,
                                    default_doc="from the service account file",
                                    example="https://oauth2.googleapis.com/token")


@section()
class ApnsPush(PushProviderBase):
    type: ClassVar[str] = "apns"
    title: ClassVar[str] = "Apple Push Notification service, token (`.p8`) auth"
    example_name: ClassVar[str] = "ios"
    url: str = override(PushProviderBase, "url", default=APNS_URL)
    team_id: str = setting(APPLE_ID, "Apple developer team id", example="ABCDE12345")
    key_id: str = setting(APPLE_ID, "id of the APNs auth key", example="KEY1234567")
    topic: str = setting(BundleId(), "the app's bundle id; `.voip` is appended for VoIP pushes",
                         example="com.example.phone")
    key_file: Path = setting(FilePath(), "the APNs auth key (`.p8`)", example=Path("AuthKey_KEY1234567.p8"))

    @property
    def voip_topic(self) -> str:
        return f"{self.topic}.voip"


@section()
class WebhookPush(PushProviderBase):
    type: ClassVar[str] = "webhook"
    title: ClassVar[str] = "POST a JSON description of the push to your own service"
    example_name: ClassVar[str] = "hook"
    url: str = override(PushProviderBase, "url", example="https://push.example.com/sipis")
    headers: Mapping[str, str] = setting(Headers(), "extra HTTP headers", default_factory=lambda: MappingProxyType({}),
                                         default_doc="`{}`", example={"Authorization": "Bearer secret"},
                                         secret=True)


PushProvider: TypeAlias = AcrobitsPush | FcmPush | ApnsPush | WebhookPush

PUSH_PROVIDERS: Final = NamedTables[PushProvider](PushProviderBase, AcrobitsPush, FcmPush, ApnsPush, WebhookPush)
PUSH_TYPES: Final[tuple[str, ...]] = tuple(PUSH_PROVIDERS.types)


@section(kw_only=False)
class OperatorToken:
    name: str = setting(Text(), "shown in audit records", example="automation", unique=True)
    role: Role = setting(Choice(ROLES), "what the token may do", example="viewer")
    token: str = setting(Text(), "the bearer token; keep it secret", example="a-long-random-secret", secret=True,
                         unique=True)


@section(rules=(
    Check("tokens", lambda v: v["tcp_listen"] is not None and not v["tokens"],
          "at least one token is required while {tcp_listen} is set", needs=("tcp_listen",)),
))
class OperatorConfig:
    socket: Path = setting(SocketPath(), "unix socket (mode 0600)", default=Path("operator.sock"),
                           example=Path("var/operator.sock"))
    tcp_listen: HostPort | None = setting(Listen(), "optional TCP listener; needs a token", default=None,
                                          example=HostPort("127.0.0.1", 24999))
    tokens: tuple[OperatorToken, ...] = setting(Entries(OperatorToken), "bearer tokens for the TCP listener",
                                                default=())


@section(kw_only=False)
class SshOperator:
    name: str = setting(Text(), "the operator's name, on every audit row", example="noc", unique=True)
    role: Role = setting(Choice(ROLES), "what the operator may do", example="operator")
    # not secret, but a key is not echoed in problems either (the comment may name a person)
    public_key: str = setting(SshPublicKey(), "one `authorized_keys` line without options (`ssh-ed25519`, "
                              "`ecdsa-sha2-nistp256/384/521`, `ssh-rsa`, `sk-…`)",
                              example="ssh-ed25519 AAAA... noc@example", secret=True, unique=True)


@section(rules=(
    Check("operators", lambda v: v["listen"] is not None and not v["operators"],
          "at least one [[{operators}]] is required while {listen} is set", needs=("listen",)),
))
class SshConfig:
    listen: HostPort | None = setting(Listen(), "SSH listener, e.g. `127.0.0.1:2222`; needs an operator",
                                      default=None)
    host_key: Path = setting(StatePath(), "host key, generated when the file does not exist",
                             default=Path("ssh_host_ed25519_key"), example=Path("var/ssh_host_ed25519_key"))
    max_sessions: int = setting(Integer(low=1), "concurrent console sessions", default=16)
    operators: tuple[SshOperator, ...] = setting(Entries(SshOperator), "who may open the console", default=())


HEP_COLLECTOR: Final = Pattern(re.compile(r"^udp:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$"),
                               "'udp:host:port' ([IPv6] in brackets)", "expected 'udp:host:port'", "`udp:host:port`")


def _collector_problem(collector: str | None) -> bool:
    if collector is None:
        return False
    try:
        return parse_sip_listen(collector).port == 0
    except ValueError:
        return True


@section(rules=(
    Check("collector", lambda v: _collector_problem(v["collector"]),
          "{collector} needs a host name or IP address and a port from 1 to 65535"),
))
class HepConfig:
    collector: str | None = setting(HEP_COLLECTOR, "Homer collector to send HEP v3 to: every SIP message in and "
                                    "out, every push stage as a log (type 100) correlated by Call-ID",
                                    default=None, default_doc="off", example="udp:127.0.0.1:9060")
    capture_id: int = setting(Integer(low=0, high=4294967295), "capture agent id in every packet (HEP chunk 12)",
                              default=2001)
    auth_key: str | None = setting(Text(), "HEP auth key (chunk 14), if the collector wants one", default=None,
                                   default_doc="none", example="a-shared-secret", secret=True)


@section()
class StorageConfig:
    url: str | None = setting(DatabaseUrl(), "PostgreSQL shared by the nodes of a cluster; the password comes from "
                              "`PGPASSWORD` or libpq's passfile, never from here", default=None,
                              default_doc="embedded SQLite in `state_dir`",
                              example="postgresql://sipis@127.0.0.1:5432/sipis")
    key_file: Path = setting(StatePath(), "the key that encrypts stored SIP passwords: the same file on every node "
                             "of a cluster", default=Path("credentials.key"),
                             example=Path("/etc/sipis/credentials.key"))
    connect_timeout: float = setting(SECONDS, "at start, how long to wait for PostgreSQL (retrying, with a log "
                                     "line each time) before giving up with exit status 1", default=60.0)


@section()
class MetricsConfig:
    listen: HostPort | None = setting(
        Listen(), "Prometheus `/metrics` and Acrobits-compatible `/stats/summary/json` (plain HTTP, no "
        "authentication: counts only, keep it on loopback or a management network)", default=None,
        starter=HostPort("127.0.0.1", 9464))


@section()
class ClusterConfig:
    lease_ttl: float = setting(SECONDS, "seconds before other nodes take a silent node's instances; each node "
                               "renews its leases every third of it", default=15.0)
    drain_timeout: float = setting(SECONDS, "longest a node stopped by SIGTERM spends handing its instances over "
                                   "to the other nodes up; what it still holds then is theirs after lease_ttl",
                                   default=120.0)


@section()
class ConsoleConfig:
    export_dir: Path | None = setting(FilePath(), "where the console writes call traces (`e` / `E`), created mode "
                                      "0700; never the working directory", default=None,
                                      default_doc="`~/sipis-exports`", example=Path("~/sipis-exports"))


@section()
class Config:
    state_dir: Path = setting(FilePath(), "database, key file, generated certificates, SSH host key, operator socket",
                              default=Path("var"))
    node_name: str = setting(Text(), "shown in the console", default_factory=socket.gethostname,
                             default_doc="this host's name", example="sipis-1")
    log: LogConfig = setting(Section(LogConfig), "logging")
    storage: StorageConfig = setting(Section(StorageConfig), "where state is kept: embedded SQLite (one node) or "
                                     "PostgreSQL (a cluster)")
    sip: SipConfig = setting(Section(SipConfig), "the SIP side: listeners, registration at the PBX, timers")
    api: ApiConfig = setting(Section(ApiConfig), "the HTTPS app API (enrolment, background/foreground)")
    ageing: AgeingConfig = setting(Section(AgeingConfig), "instances nobody looks after any more go off")
    calls: CallsConfig = setting(Section(CallsConfig), "held calls: an INVITE for a sleeping app waits for it")
    push: Mapping[str, PushProvider] = setting(PUSH_PROVIDERS, "one table per push provider; `NAME` (letters, "
                                               "digits, `_`, `-`) is what apps name at enrolment")
    operator: OperatorConfig = setting(Section(OperatorConfig), "the operator API (console, automation)")
    ssh: SshConfig = setting(Section(SshConfig), "the NOC console over SSH (key auth only)")
    hep: HepConfig = setting(Section(HepConfig), "HEP v3 to Homer (SIP messages and push stages)")
    metrics: MetricsConfig = setting(Section(MetricsConfig), "monitoring: Prometheus metrics, Acrobits statistics")
    cluster: ClusterConfig = setting(Section(ClusterConfig), "several nodes on one database: who acts for "
                                     "which instance")
    console: ConsoleConfig = setting(Section(ConsoleConfig), "the operator console (local and over SSH)")
    source: Path | None = None  # the file this came from, if any
