"""sipis.config: defaults, validation (every problem names its key, all reported at once), paths,
push provider tables, SSH operators, the starter config."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sipis.config import (
    ACROBITS_PNM_URL,
    APNS_URL,
    FCM_URL,
    STARTER_TOKEN_PLACEHOLDER,
    AcrobitsPush,
    AgeingConfig,
    ApiConfig,
    ApnsPush,
    CallsConfig,
    Config,
    ConfigError,
    FcmPush,
    HostPort,
    LogConfig,
    SipConfig,
    SipListen,
    SshConfig,
    WebhookPush,
    insecure_settings,
    load_config,
    parse_config,
    parse_host_port,
    parse_sip_listen,
    ssh_public_key_problem,
    starter_config,
    write_starter_config,
)
from sipis.config.__main__ import main as config_main
from sipis.config.render import DOCS_BEGIN, DOCS_END, update_docs

BASE = Path("/srv/sipis")
TOKENS = {"api": {"enroll_tokens": ["t0ken"]}}


def ssh_key(comment: str = "noc@example") -> str:
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    return f"{raw.decode()} {comment}"


def merge(*parts: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge TOML-shaped dicts (later wins), so each test states only what it is about."""
    result: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merge(result[key], value)
            else:
                result[key] = value
    return result


def parse(data: dict[str, Any], base: Path = BASE) -> Config:
    return parse_config(merge(TOKENS, data), base)


def problems(data: dict[str, Any]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value.problems


# --------------------------------------------------------------------------- defaults


def test_almost_empty_file_gives_sane_defaults() -> None:
    c = parse({})
    assert c.state_dir == BASE / "var"
    assert c.node_name  # the host name
    assert c.log.level == "info" and c.log.file is None
    assert c.sip.listen == (SipListen("udp", "127.0.0.1", 5070), SipListen("tcp", "127.0.0.1", 5070))
    assert c.sip.tls_verify and c.sip.ca_file is None
    assert (c.sip.tls_cert, c.sip.tls_key, c.sip.tls_generate) == (
        BASE / "var/sip-tls.crt",
        BASE / "var/sip-tls.key",
        True,
    )
    assert c.sip.user_agent.startswith("sipis-console/")
    assert (c.sip.register_expires, c.sip.refresh_min, c.sip.refresh_max) == (600, 0.5, 0.8)
    assert (c.sip.keepalive_interval, c.sip.register_rate) == (30, 200)
    assert (c.sip.backoff_base, c.sip.backoff_max, c.sip.unauthorized_retry) == (2, 300, 3600)
    assert c.sip.unregister_on_shutdown and c.sip.default_registrar is None
    assert (c.sip.t1, c.sip.t2, c.sip.t4) == (0.5, 4.0, 5.0)
    assert c.api.listen == HostPort("127.0.0.1", 24998) and c.api.tls and c.api.tls_generate
    assert c.api.enroll_tokens == ("t0ken",)
    assert (c.ageing.max_age, c.ageing.not_registered_max_age, c.ageing.check_interval) == (259200, 43200, 60)
    assert (c.calls.wake_timeout, c.calls.answer_timeout, c.calls.release) == (120, 120, "redirect")
    assert (c.calls.no_response_status, c.calls.no_response_reason) == (480, "Temporarily Unavailable")
    assert c.calls.max_message_body == 4 * 1024 * 1024
    assert dict(c.push) == {}
    assert c.operator.socket == BASE / "var/operator.sock"
    assert c.operator.tcp_listen is None and c.operator.tokens == ()
    assert c.ssh.listen is None and c.ssh.max_sessions == 16 and c.ssh.operators == ()
    assert c.ssh.host_key == BASE / "var/ssh_host_ed25519_key"
    assert insecure_settings(c) == []


def test_empty_file_needs_an_enroll_token_unless_the_api_is_off() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, BASE)
    assert info.value.problems == (
        'api.enroll_tokens: must list at least one token while the app API is on (or set api.listen = "")',
    )
    assert problems({"api": {"enroll_tokens": []}})[0].startswith("api.enroll_tokens: must list")
    off = parse_config({"api": {"listen": ""}}, BASE)
    assert off.api.listen is None and off.api.enroll_tokens == ()


def test_config_is_frozen_and_hides_secrets_in_repr() -> None:
    c = parse(
        {
            "operator": {"tokens": [{"name": "a", "role": "admin", "token": "op-secret"}]},
            "push": {"h": {"type": "webhook", "url": "https://h.example", "headers": {"X-Key": "hdr-secret"}}},
        }
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.sip.t1 = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.push["x"] = c.push["h"]  # type: ignore[index]
    text = repr(c)
    assert "t0ken" not in text and "op-secret" not in text and "hdr-secret" not in text


# --------------------------------------------------------------------------- unknown keys


def test_unknown_key_names_full_dotted_key_with_suggestion() -> None:
    assert problems({"sip": {"lisen": ["udp:127.0.0.1:5070"]}}) == (
        "unknown key 'sip.lisen' (did you mean 'sip.listen'?)",
    )


def test_unknown_tables_and_nested_keys() -> None:
    found = problems(
        {
            "sipp": {"t1": 1},
            "nonsense_xyz": 1,
            "calls": {"wake_timout": 3},
            "ssh": {"operators": [{"name": "n", "role": "admin", "public_key": ssh_key(), "rol": "x"}]},
        }
    )
    assert "unknown table 'sipp' (did you mean 'sip'?)" in found
    assert "unknown key 'nonsense_xyz'" in found  # nothing close: no suggestion
    assert "unknown key 'calls.wake_timout' (did you mean 'calls.wake_timeout'?)" in found
    assert "unknown key 'ssh.operators[0].rol' (did you mean 'ssh.operators[0].role'?)" in found


def test_multiple_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"sip": {"t1": -1, "register_expires": "600"}, "calls": {"release": "drop"}, "bogus": 1})
    err = info.value
    assert len(err.problems) == 4
    keys = [p.split(":")[0] for p in err.problems]
    assert {"sip.t1", "sip.register_expires", "calls.release"} <= set(keys)
    assert "(4 problems)" in str(err)
    assert all(p in str(err) for p in err.problems)


# --------------------------------------------------------------------------- every check names its key

CASES: list[tuple[dict[str, Any], str]] = [
    ({"state_dir": 5}, "state_dir: expected a path, got integer 5"),
    ({"state_dir": ""}, "state_dir: expected a path"),
    ({"node_name": ["x"]}, "node_name: expected a non-empty string, got an array"),
    ({"log": {"level": "loud"}}, "log.level: expected one of 'debug', 'info'"),
    ({"log": 3}, "log: expected a table, got integer 3"),
    ({"sip": {"listen": "udp:127.0.0.1:5060"}}, "sip.listen: expected an array of strings"),
    ({"sip": {"listen": []}}, "sip.listen: must list at least one"),
    ({"sip": {"listen": ["sctp:1.2.3.4:5060"]}}, "sip.listen[0]: expected 'udp|tcp|tls:host:port'"),
    ({"sip": {"listen": ["udp:1.2.3.4"]}}, "sip.listen[0]: "),
    ({"sip": {"listen": ["udp:1.2.3.4:70000"]}}, "sip.listen[0]: port '70000' is not a number from 0 to 65535"),
    ({"sip": {"listen": ["udp:::1:5060"]}}, "sip.listen[0]: put an IPv6 address in brackets"),
    ({"sip": {"listen": ["udp:[nope]:5060"]}}, "sip.listen[0]: 'nope' is not an IPv6 address"),
    ({"sip": {"listen": ["udp:bad host:5060"]}}, "sip.listen[0]: 'bad host' is not a host name"),
    (
        {"sip": {"listen": ["tcp:0.0.0.0:5061", "tls:0.0.0.0:5061"]}},
        "sip.listen[1]: 'tls:0.0.0.0:5061' takes the same port",
    ),
    ({"sip": {"listen": [7]}}, "sip.listen[0]: expected a non-empty string, got integer 7"),
    ({"sip": {"tls_verify": "no"}}, "sip.tls_verify: expected true or false, got string 'no'"),
    ({"sip": {"tls_cert": "c.pem"}}, "sip.tls_key: required together with sip.tls_cert"),
    ({"sip": {"tls_client_key": "k.pem"}}, "sip.tls_client_cert: required together with sip.tls_client_key"),
    ({"sip": {"user_agent": "a\r\nX-Evil: 1"}}, "sip.user_agent: must not contain line breaks"),
    ({"sip": {"register_expires": 0}}, "sip.register_expires: expected an integer >= 1, got integer 0"),
    ({"sip": {"register_expires": 60.5}}, "sip.register_expires: expected an integer >= 1, got float 60.5"),
    ({"sip": {"refresh_min": 0}}, "sip.refresh_min: expected a fraction > 0 and < 1, got integer 0"),
    ({"sip": {"refresh_max": 1.0}}, "sip.refresh_max: expected a fraction > 0 and < 1, got float 1.0"),
    ({"sip": {"refresh_min": 0.8, "refresh_max": 0.6}}, "sip.refresh_min: must be < sip.refresh_max (0.6), got 0.8"),
    ({"sip": {"refresh_min": 0.7, "refresh_max": 0.7}}, "sip.refresh_min: must be < sip.refresh_max"),
    ({"sip": {"keepalive_interval": -1}}, "sip.keepalive_interval: expected a number of seconds >= 0"),
    ({"sip": {"register_rate": 0}}, "sip.register_rate: expected a rate per second > 0, got integer 0"),
    ({"sip": {"backoff_base": 0}}, "sip.backoff_base: expected a number of seconds > 0"),
    ({"sip": {"backoff_base": 10, "backoff_max": 5}}, "sip.backoff_max: must be >= sip.backoff_base (10), got 5"),
    (
        {"sip": {"unauthorized_retry": True}},
        "sip.unauthorized_retry: expected a number of seconds > 0, got boolean true",
    ),
    ({"sip": {"unregister_on_shutdown": 1}}, "sip.unregister_on_shutdown: expected true or false, got integer 1"),
    ({"sip": {"default_registrar": "pbx.example.com"}}, "sip.default_registrar: expected a SIP URI"),
    ({"sip": {"t1": float("nan")}}, "sip.t1: expected a number of seconds > 0, got float nan"),
    ({"sip": {"t1": float("inf")}}, "sip.t1: expected a number of seconds > 0"),
    ({"sip": {"t1": 2, "t2": 1}}, "sip.t2: must be >= sip.t1 (2), got 1"),
    ({"sip": {"t4": 0}}, "sip.t4: expected a number of seconds > 0"),
    ({"api": {"listen": "localhost"}}, "api.listen: expected 'host:port', got 'localhost'"),
    ({"api": {"listen": 24998}}, "api.listen: expected 'host:port' or \"\" (off), got integer 24998"),
    ({"api": {"enroll_tokens": "abc"}}, "api.enroll_tokens: expected an array of strings"),
    ({"api": {"enroll_tokens": ["a", ""]}}, "api.enroll_tokens[1]: expected a non-empty string"),
    ({"api": {"tls": "yes"}}, "api.tls: expected true or false"),
    ({"api": {"tls_key": "k.pem"}}, "api.tls_cert: required together with api.tls_key"),
    ({"ageing": {"max_age": 0}}, "ageing.max_age: expected a number of seconds > 0"),
    ({"ageing": {"not_registered_max_age": "12h"}}, "ageing.not_registered_max_age: expected a number of seconds"),
    ({"ageing": {"check_interval": -5}}, "ageing.check_interval: expected a number of seconds > 0"),
    ({"calls": {"wake_timeout": 0}}, "calls.wake_timeout: expected a number of seconds > 0, got integer 0"),
    ({"calls": {"answer_timeout": -0.5}}, "calls.answer_timeout: expected a number of seconds > 0"),
    ({"calls": {"release": "drop"}}, "calls.release: expected one of 'redirect', 'reject', got string 'drop'"),
    ({"calls": {"no_response_status": 200}}, "calls.no_response_status: expected an integer >= 400 and <= 699"),
    ({"calls": {"no_response_reason": ""}}, "calls.no_response_reason: expected a non-empty string"),
    ({"calls": {"max_message_body": 0}}, "calls.max_message_body: expected an integer >= 1"),
    ({"push": {"x": "fcm"}}, "push.x: expected a table, got string 'fcm'"),
    (
        {"push": {"x": {"url": "https://a.example"}}},
        "push.x.type: required (one of 'acrobits', 'fcm', 'apns', 'webhook')",
    ),
    ({"push": {"x": {"type": "gcm"}}}, "push.x.type: expected one of 'acrobits', 'fcm', 'apns', 'webhook'"),
    ({"push": {"x y": {"type": "acrobits"}}}, "push.x y: provider names may only use"),
    (
        {"push": {"x": {"type": "acrobits", "url": "ftp://a"}}},
        "push.x.url: expected an http(s) URL, got string 'ftp://a'",
    ),
    ({"push": {"x": {"type": "acrobits", "timeout": 0}}}, "push.x.timeout: expected a number of seconds > 0"),
    ({"push": {"x": {"type": "acrobits", "verify": "off"}}}, "push.x.verify: expected true or false"),
    (
        {"push": {"x": {"type": "acrobits", "verify": False, "ca_file": "ca.pem"}}},
        "push.x.ca_file: has no effect with push.x.verify = false",
    ),
    ({"push": {"x": {"type": "webhook"}}}, "push.x.url: required (an http(s) URL)"),
    (
        {"push": {"x": {"type": "webhook", "url": "https://h.example", "headers": {"Bad Name": "v"}}}},
        "push.x.headers.Bad Name: is not a valid HTTP header name",
    ),
    (
        {"push": {"x": {"type": "webhook", "url": "https://h.example", "headers": {"A": 1}}}},
        "push.x.headers.A: expected a non-empty string, got integer 1",
    ),
    ({"push": {"x": {"type": "fcm"}}}, "push.x.service_account_file: required (a path)"),
    (
        {"push": {"x": {"type": "fcm", "service_account_file": "sa.json", "token_uri": "nope"}}},
        "push.x.token_uri: expected an http(s) URL",
    ),
    (
        {"push": {"x": {"type": "apns", "team_id": "ABCDE12345", "key_id": "KEY1234567", "key_file": "k.p8"}}},
        "push.x.topic: required (the app's bundle id",
    ),
    (
        {"push": {"x": {"type": "apns", "team_id": "abc", "key_id": "KEY1234567", "key_file": "k.p8", "topic": "a.b"}}},
        "push.x.team_id: expected Apple's 10-character id (A-Z, 0-9), got 'abc'",
    ),
    (
        {"push": {"x": {"type": "apns", "team_id": "ABCDE12345", "key_id": "KEY1234567", "topic": "a.b"}}},
        "push.x.key_file: required (a path)",
    ),
    (
        {
            "push": {
                "x": {
                    "type": "apns",
                    "team_id": "ABCDE12345",
                    "key_id": "KEY1234567",
                    "key_file": "k.p8",
                    "topic": "com.example.app.voip",
                }
            }
        },
        "push.x.topic: give the plain bundle id",
    ),
    (
        {"push": {"x": {"type": "fcm", "service_account_file": "sa.json", "topic": "a"}}},
        "unknown key 'push.x.topic' (not used by type 'fcm', only by 'apns')",
    ),
    ({"operator": {"socket": "/" + "s" * 120}}, "operator.socket: path is longer than 107 bytes"),
    (
        {"operator": {"tcp_listen": "127.0.0.1:24999"}},
        "operator.tokens: at least one token is required while operator.tcp_listen is set",
    ),
    ({"operator": {"tokens": {"name": "a"}}}, "operator.tokens: expected an array of tables"),
    ({"operator": {"tokens": [{"name": "a", "token": "t"}]}}, "operator.tokens[0].role: required (one of 'viewer'"),
    (
        {"operator": {"tokens": [{"name": "a", "role": "root", "token": "t"}]}},
        "operator.tokens[0].role: expected one of 'viewer', 'operator', 'admin', got string 'root'",
    ),
    ({"operator": {"tokens": [{"name": "a", "role": "admin"}]}}, "operator.tokens[0].token: required"),
    ({"operator": {"tokens": [{"role": "admin", "token": "t"}]}}, "operator.tokens[0].name: required"),
    (
        {
            "operator": {
                "tokens": [
                    {"name": "a", "role": "admin", "token": "t1"},
                    {"name": "a", "role": "viewer", "token": "t2"},
                ]
            }
        },
        "operator.tokens[1].name: duplicate 'a'",
    ),
    (
        {"ssh": {"listen": "127.0.0.1:2222"}},
        "ssh.operators: at least one [[ssh.operators]] is required while ssh.listen is set",
    ),
    ({"ssh": {"listen": "[::1]:22:1"}}, "ssh.listen: "),
    ({"ssh": {"max_sessions": 0}}, "ssh.max_sessions: expected an integer >= 1, got integer 0"),
    (
        {"ssh": {"operators": [{"name": "n", "role": "boss", "public_key": ssh_key()}]}},
        "ssh.operators[0].role: expected one of 'viewer', 'operator', 'admin'",
    ),
    ({"ssh": {"operators": [{"name": "n", "role": "admin"}]}}, "ssh.operators[0].public_key: required"),
    (
        {"ssh": {"operators": [{"name": "n", "role": "admin", "public_key": "AAAAC3Nza"}]}},
        "ssh.operators[0].public_key: expected an OpenSSH public key",
    ),
    (
        {"ssh": {"operators": [{"name": "n", "role": "admin", "public_key": "ssh-dss AAAA"}]}},
        "ssh.operators[0].public_key: unsupported key type 'ssh-dss'",
    ),
    (
        {"ssh": {"operators": [{"name": "n", "role": "admin", "public_key": "ssh-ed25519 !!!"}]}},
        "ssh.operators[0].public_key: the key data is not valid base64",
    ),
    (
        {"ssh": {"operators": [{"name": "n", "role": "admin", "public_key": "ssh-rsa " + ssh_key().split()[1]}]}},
        "ssh.operators[0].public_key: the key data is not a valid ssh-rsa key",
    ),
    ({"ssh": {"operators": ["noc"]}}, "ssh.operators[0]: expected a table, got string 'noc'"),
]


@pytest.mark.parametrize(("data", "expected"), CASES, ids=[c[1].split(":")[0] for c in CASES])
def test_each_problem_names_its_key(data: dict[str, Any], expected: str) -> None:
    found = problems(data)
    assert any(p.startswith(expected) for p in found), found


def test_duplicate_secrets_are_reported_without_echoing_them() -> None:
    key = ssh_key()
    found = problems(
        {
            "api": {"enroll_tokens": ["dup-secret", "dup-secret"]},
            "operator": {
                "tokens": [
                    {"name": "a", "role": "admin", "token": "op-secret"},
                    {"name": "b", "role": "admin", "token": "op-secret"},
                ]
            },
            "ssh": {
                "operators": [
                    {"name": "a", "role": "admin", "public_key": key},
                    {"name": "b", "role": "viewer", "public_key": key.rsplit(" ", 1)[0] + " other"},
                ]
            },
        }
    )
    assert found == (
        "api.enroll_tokens: lists the same token twice",
        "operator.tokens[1].token: duplicate: an earlier entry has the same token",
        "ssh.operators[1].public_key: duplicate: an earlier entry has the same public_key",
    )
    assert not any("secret" in p for p in found)


# --------------------------------------------------------------------------- values


def test_durations_accept_ints_and_fractions() -> None:
    c = parse(
        {
            "sip": {"t1": 0.25, "t2": 2, "keepalive_interval": 0, "backoff_base": 0.5},
            "calls": {"wake_timeout": 7.5, "answer_timeout": 1},
            "ageing": {"check_interval": 0.1},
        }
    )
    assert (c.sip.t1, c.sip.t2, c.sip.keepalive_interval, c.sip.backoff_base) == (0.25, 2.0, 0.0, 0.5)
    assert (c.calls.wake_timeout, c.calls.answer_timeout, c.ageing.check_interval) == (7.5, 1.0, 0.1)
    assert isinstance(c.sip.t2, float) and isinstance(c.calls.answer_timeout, float)


def test_listen_specs_ipv6_and_case() -> None:
    c = parse(
        {
            "sip": {"listen": ["UDP:[::1]:5060", "tls:pbx-side.example:5061", "tcp:0.0.0.0:0", "tls:0.0.0.0:0"]},
            "api": {"listen": "[::]:8443"},
        }
    )
    assert c.sip.listen == (
        SipListen("udp", "::1", 5060),
        SipListen("tls", "pbx-side.example", 5061),
        SipListen("tcp", "0.0.0.0", 0),
        SipListen("tls", "0.0.0.0", 0),
    )
    assert [str(x) for x in c.sip.listen] == [
        "udp:[::1]:5060",
        "tls:pbx-side.example:5061",
        "tcp:0.0.0.0:0",
        "tls:0.0.0.0:0",
    ]
    assert c.api.listen == HostPort("::", 8443) and str(c.api.listen) == "[::]:8443"
    assert parse_host_port("127.0.0.1:1") == HostPort("127.0.0.1", 1)
    assert parse_sip_listen("tcp:[2001:db8::1]:5060") == SipListen("tcp", "2001:db8::1", 5060)
    for bad in ("127.0.0.1", ":5060", "[::1]5060", "h:-1", "h:x"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_other_values_parse() -> None:
    c = parse(
        {
            "log": {"level": "DEBUG", "file": "log/sipis.log"},
            "node_name": "node-a",
            "sip": {
                "default_registrar": "sip:pbx.example.com;transport=tcp",
                "tls_verify": False,
                "user_agent": "UA/1",
                "register_expires": 3600,
                "register_rate": 12.5,
            },
            "calls": {"release": "reject", "no_response_status": 603, "no_response_reason": "Decline"},
            "api": {"tls": False},
        }
    )
    assert c.log.level == "debug" and c.node_name == "node-a"
    assert c.sip.default_registrar == "sip:pbx.example.com;transport=tcp"
    assert (c.sip.user_agent, c.sip.register_expires, c.sip.register_rate) == ("UA/1", 3600, 12.5)
    assert (c.calls.release, c.calls.no_response_status, c.calls.no_response_reason) == ("reject", 603, "Decline")
    assert insecure_settings(c) == [
        "sip.tls_verify = false: the PBX's TLS certificate is not checked",
        "api.tls = false: the app API (credentials, tokens) runs over plain HTTP",
    ]


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "sipis.toml").write_text(
        'state_dir = "state"\n'
        '[log]\nfile = "logs/sipis.log"\n'
        '[sip]\nca_file = "pbx-ca.pem"\ntls_cert = "/abs/sip.crt"\ntls_key = "sip.key"\n'
        '[api]\nenroll_tokens = ["x"]\n'
        '[ssh]\nhost_key = "~/hk"\n'
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    monkeypatch.setenv("HOME", "/home/noc")
    c = load_config(Path("etc/sipis.toml"))
    assert c.source == conf_dir / "sipis.toml"
    assert c.state_dir == conf_dir / "state"
    assert c.log.file == conf_dir / "logs/sipis.log"
    assert c.sip.ca_file == conf_dir / "pbx-ca.pem"
    assert (c.sip.tls_cert, c.sip.tls_key, c.sip.tls_generate) == (Path("/abs/sip.crt"), conf_dir / "sip.key", False)
    assert c.ssh.host_key == Path("/home/noc/hk")
    # Generated files follow state_dir.
    assert c.api.tls_cert == conf_dir / "state/api-tls.crt" and c.api.tls_generate
    assert c.operator.socket == conf_dir / "state/operator.sock"


def test_absolute_state_dir_and_explicit_socket() -> None:
    c = parse({"state_dir": "/var/lib/sipis", "operator": {"socket": "run/op.sock"}})
    assert c.state_dir == Path("/var/lib/sipis")
    assert c.sip.tls_cert == Path("/var/lib/sipis/sip-tls.crt")
    assert c.operator.socket == BASE / "run/op.sock"


def test_load_config_reports_missing_file_and_syntax_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "none.toml")
    assert info.value.source == tmp_path / "none.toml"
    assert info.value.problems[0].startswith("file not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("[sip\nt1 = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.problems[0].startswith("TOML syntax error")
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------- push providers


def test_push_tables_per_type() -> None:
    c = parse(
        {
            "push": {
                "med": {"type": "acrobits"},
                "android": {"type": "fcm", "service_account_file": "keys/sa.json", "timeout": 2.5},
                "android2": {
                    "type": "fcm",
                    "service_account_file": "/k/sa.json",
                    "project_id": "p-1",
                    "token_uri": "https://oauth2.example/token",
                    "url": "http://127.0.0.1:9000",
                },
                "ios": {
                    "type": "apns",
                    "team_id": "ABCDE12345",
                    "key_id": "KEY1234567",
                    "key_file": "AuthKey.p8",
                    "topic": "com.example.phone",
                    "ca_file": "apple-ca.pem",
                },
                "hook": {
                    "type": "webhook",
                    "url": "https://h.example/push",
                    "verify": False,
                    "headers": {"Authorization": "Bearer x", "X-Env": "lab"},
                },
            }
        }
    )
    assert list(c.push) == ["med", "android", "android2", "ios", "hook"]
    med, android, android2, ios, hook = c.push.values()
    assert isinstance(med, AcrobitsPush) and med.type == "acrobits"
    assert (med.url, med.verify, med.ca_file, med.timeout) == (ACROBITS_PNM_URL, True, None, 5.0)
    assert isinstance(android, FcmPush) and android.name == "android"
    assert (android.url, android.service_account_file, android.project_id, android.token_uri, android.timeout) == (
        FCM_URL,
        BASE / "keys/sa.json",
        None,
        None,
        2.5,
    )
    assert isinstance(android2, FcmPush)
    assert (android2.project_id, android2.token_uri) == ("p-1", "https://oauth2.example/token")
    assert isinstance(ios, ApnsPush) and ios.url == APNS_URL
    assert (ios.team_id, ios.key_id, ios.key_file, ios.topic) == (
        "ABCDE12345",
        "KEY1234567",
        BASE / "AuthKey.p8",
        "com.example.phone",
    )
    assert ios.voip_topic == "com.example.phone.voip" and ios.ca_file == BASE / "apple-ca.pem"
    assert isinstance(hook, WebhookPush) and not hook.verify
    assert dict(hook.headers) == {"Authorization": "Bearer x", "X-Env": "lab"}
    assert insecure_settings(c) == ["push.hook.verify = false: the provider's TLS certificate is not checked"]


def test_push_type_errors_are_all_reported() -> None:
    found = problems({"push": {"ios": {"type": "apns", "headers": {}}}})
    assert found == (
        "push.ios.team_id: required (Apple's 10-character id, e.g. 'ABCDE12345')",
        "push.ios.key_id: required (Apple's 10-character id, e.g. 'ABCDE12345')",
        "push.ios.topic: required (the app's bundle id, e.g. 'com.example.phone')",
        "push.ios.key_file: required (a path)",
        "unknown table 'push.ios.headers' (not used by type 'apns', only by 'webhook')",
    )


# --------------------------------------------------------------------------- operators


def test_ssh_operators_and_operator_tokens() -> None:
    noc, lead = ssh_key("noc@example"), ssh_key()
    c = parse(
        {
            "ssh": {
                "listen": "127.0.0.1:2222",
                "max_sessions": 4,
                "operators": [
                    {"name": "noc", "role": "viewer", "public_key": noc},
                    {"name": "lead", "role": "ADMIN", "public_key": "  " + lead + " "},
                ],
            },
            "operator": {"tcp_listen": "127.0.0.1:24999", "tokens": [{"name": "ci", "role": "operator", "token": "s"}]},
        }
    )
    assert c.ssh.listen == HostPort("127.0.0.1", 2222) and c.ssh.max_sessions == 4
    assert [(o.name, o.role, o.public_key) for o in c.ssh.operators] == [
        ("noc", "viewer", noc),
        ("lead", "admin", lead),
    ]
    assert c.operator.tcp_listen == HostPort("127.0.0.1", 24999)
    assert [(t.name, t.role, t.token) for t in c.operator.tokens] == [("ci", "operator", "s")]


def test_ssh_public_key_check() -> None:
    assert ssh_public_key_problem(ssh_key()) is None
    assert ssh_public_key_problem(ssh_key().split(" noc")[0]) is None  # comment is optional
    assert ssh_public_key_problem("ssh-ed25519") is not None
    assert ssh_public_key_problem("ssh-ed25519 AAAA") == "the key data is not a valid ssh-ed25519 key"


# --------------------------------------------------------------------------- starter config


def test_starter_config_parses_to_a_valid_config() -> None:
    c = parse_config(tomllib.loads(starter_config()), BASE)
    assert c.api.enroll_tokens == (STARTER_TOKEN_PLACEHOLDER,)
    assert all(x.host == "127.0.0.1" for x in c.sip.listen)
    assert c.api.listen is not None and c.api.listen.host == "127.0.0.1"
    assert c.ssh.listen is None and c.operator.tcp_listen is None
    assert starter_config().count(f'"{STARTER_TOKEN_PLACEHOLDER}"') == 1


def test_starter_config_examples_parse_when_uncommented() -> None:
    # Uncomment every example key/table once ("# # x" stays a comment), with a real SSH key.
    text = re.sub(r"(?m)^# (?=\[|\w+ = )", "", starter_config())
    text = text.replace("ssh-ed25519 AAAA... noc@example", ssh_key())
    text = text.replace('listen = ""  ', 'listen = "127.0.0.1:2222"  ')
    c = parse_config(tomllib.loads(text), BASE)
    assert set(c.push) == {"mediator", "android", "ios", "hook"}
    assert c.ssh.listen == HostPort("127.0.0.1", 2222) and c.ssh.operators[0].name == "noc"
    assert c.operator.tokens[0].name == "automation" and c.node_name == "sipis-1"
    assert c.sip.default_registrar == "sip:pbx.example.com;transport=tcp"


def test_starter_config_comments_every_key() -> None:
    for line in starter_config().splitlines():
        if re.match(r"^(# )?(# )?\w+ = ", line):
            assert "  # " in line.split(" = ", 1)[1], f"no comment: {line}"


def test_write_starter_config(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "sipis.toml", tmp_path / "b.toml"
    write_starter_config(first)
    write_starter_config(second)
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    a, b = load_config(first), load_config(second)
    assert a.api.enroll_tokens != (STARTER_TOKEN_PLACEHOLDER,)
    assert len(a.api.enroll_tokens[0]) >= 32 and a.api.enroll_tokens != b.api.enroll_tokens
    assert a.state_dir == first.parent / "var"


def test_write_starter_config_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "sipis.toml"
    path.write_text("# mine\n")
    os.chmod(path, 0o644)
    with pytest.raises(FileExistsError, match="already exists"):
        write_starter_config(path)
    assert path.read_text() == "# mine\n"
    write_starter_config(path, force=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config(path).api.enroll_tokens
    assert [p.name for p in tmp_path.iterdir()] == ["sipis.toml"]  # no temp file left behind


def test_starter_config_sets_the_declared_defaults() -> None:
    c = parse_config(tomllib.loads(starter_config()), BASE)
    var = BASE / "var"
    assert (c.log, c.ageing, c.calls) == (LogConfig(), AgeingConfig(), CallsConfig())
    assert c.sip == dataclasses.replace(SipConfig(), tls_cert=var / "sip-tls.crt", tls_key=var / "sip-tls.key")
    tokens = (STARTER_TOKEN_PLACEHOLDER,)
    assert c.api == ApiConfig(enroll_tokens=tokens, tls_cert=var / "api-tls.crt", tls_key=var / "api-tls.key")
    assert c.ssh == SshConfig(host_key=var / "ssh_host_ed25519_key")


# --------------------------------------------------------------------------- docs


def test_docs_tables_are_made_from_the_declarations() -> None:
    docs = Path(__file__).parents[1] / "docs" / "configuration.md"
    text = docs.read_text(encoding="utf-8")
    assert update_docs(text) == text, (
        "docs/configuration.md is stale: run `python -m sipis.config docs` from the repository root"
    )


def test_docs_command_rewrites_only_the_generated_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "configuration.md"
    path.write_text(f"# Mine\n\n{DOCS_BEGIN}\nold table\n{DOCS_END}\n\nafter\n", encoding="utf-8")
    assert config_main(["docs", str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# Mine\n\n{DOCS_BEGIN}\n") and text.endswith(f"{DOCS_END}\n\nafter\n")
    assert "old table" not in text and "| `wake_timeout` | seconds > 0 | `120` |" in text
    assert config_main(["docs", str(path)]) == 0 and path.read_text(encoding="utf-8") == text
    assert capsys.readouterr().out.splitlines() == [f"{path}: updated", f"{path}: up to date"]
    assert config_main(["starter"]) == 0 and capsys.readouterr().out == starter_config()
    assert config_main(["nonsense"]) == 2
    path.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no generated part"):
        update_docs(path.read_text(encoding="utf-8"))
