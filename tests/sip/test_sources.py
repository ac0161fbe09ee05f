"""Trusted sources: the entries a config may list and which peers they admit."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipis.config import ConfigError, parse_config
from sipis.sip.sources import TrustedSources


@pytest.mark.parametrize("entries, address, admitted", [
    ((), ("192.0.2.10", 5060), False),
    (("192.0.2.10",), ("192.0.2.10", 41000), True),
    (("192.0.2.10",), ("192.0.2.11", 5060), False),
    (("192.0.2.10:5060",), ("192.0.2.10", 5060), True),
    (("192.0.2.10:5060",), ("192.0.2.10", 5061), False),
    (("198.51.100.0/24",), ("198.51.100.77", 5060), True),
    (("198.51.100.0/24",), ("198.51.101.1", 5060), False),
    (("198.51.100.0/24",), ("::ffff:198.51.100.9", 5060), True),  # IPv4 on a dual-stack socket
    (("[2001:db8::1]:5061",), ("2001:db8::1", 5061), True),
    (("2001:db8::/32",), ("2001:db8:1::5", 5060), True),
    (("2001:db8::/32",), ("192.0.2.10", 5060), False),
])
def test_trusted_sources_admit_what_they_list(entries: tuple[str, ...], address: tuple[str, int],
                                              admitted: bool) -> None:
    assert TrustedSources(entries).admits(address) is admitted


@pytest.mark.parametrize("entry", ["pbx.example.com", "192.0.2.10:http", "192.0.2.10:70000", "[::1]5060"])
def test_a_bad_trusted_source_is_a_config_problem(entry: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"state_dir": str(tmp_path), "sip": {"trusted_sources": [entry]}}, tmp_path)
    assert any("trusted_sources" in problem for problem in raised.value.problems)
