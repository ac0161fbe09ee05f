"""Configuration: one TOML file → a frozen :class:`Config`.

Every setting is declared once, in :mod:`sipis.config.model` (name, type, default, bounds, doc); the
reader, the starter file and the tables of ``docs/configuration.md`` are made from it. Everything
is validated up front and *all* problems are reported together in one :class:`ConfigError`, each
naming its full dotted key, so an operator fixes a file in one round. Relative paths resolve
against the config file's folder; files the core generates itself (certificates, SSH host key,
operator socket) default into ``state_dir``. Durations are seconds (int or float).
"""

from sipis.config.addresses import TRANSPORTS, HostPort, SipListen, Transport, parse_host_port, parse_sip_listen
from sipis.config.kinds import ssh_public_key_problem
from sipis.config.load import insecure_settings, load_config, parse_config
from sipis.config.model import (
    ACROBITS_PNM_URL,
    APNS_URL,
    FCM_URL,
    LOG_LEVELS,
    PUSH_TYPES,
    RELEASE_MODES,
    ROLES,
    STARTER_TOKEN_PLACEHOLDER,
    AcrobitsPush,
    AgeingConfig,
    ApiConfig,
    ApnsPush,
    CallsConfig,
    ClusterConfig,
    Config,
    FcmPush,
    LogConfig,
    LogLevel,
    MetricsConfig,
    OperatorConfig,
    OperatorToken,
    PushProvider,
    PushProviderBase,
    ReleaseMode,
    Role,
    SipConfig,
    SshConfig,
    SshOperator,
    StorageConfig,
    WebhookPush,
)
from sipis.config.reader import ConfigError
from sipis.config.render import starter_config, write_starter_config

__all__ = [
    "ACROBITS_PNM_URL",
    "APNS_URL",
    "FCM_URL",
    "LOG_LEVELS",
    "PUSH_TYPES",
    "RELEASE_MODES",
    "ROLES",
    "STARTER_TOKEN_PLACEHOLDER",
    "TRANSPORTS",
    "AcrobitsPush",
    "AgeingConfig",
    "ApiConfig",
    "ApnsPush",
    "CallsConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "FcmPush",
    "HostPort",
    "LogConfig",
    "LogLevel",
    "MetricsConfig",
    "OperatorConfig",
    "OperatorToken",
    "PushProvider",
    "PushProviderBase",
    "ReleaseMode",
    "Role",
    "SipConfig",
    "SipListen",
    "SshConfig",
    "SshOperator",
    "StorageConfig",
    "Transport",
    "WebhookPush",
    "insecure_settings",
    "load_config",
    "parse_config",
    "parse_host_port",
    "parse_sip_listen",
    "ssh_public_key_problem",
    "starter_config",
    "write_starter_config",
]
