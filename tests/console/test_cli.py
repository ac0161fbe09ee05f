"""``sipis-console`` with no command: the console against the local core, or help that says why not."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import console.cli as cli


def test_bare_command_without_a_core_prints_help_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("SIPIS_OPERATOR_SOCKET", "SIPIS_OPERATOR_URL"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert "usage: sipis-console" in out and "demo" in out
    assert "no running core" in err and "sipis.toml" in err


def test_bare_command_opens_the_console_on_the_local_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sipis.toml").write_text('state_dir = "var"\n')
    opened: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "open_console", lambda args: opened.append(args) or 0)
    assert cli.main([]) == 0
    assert [(a.command, a.config, a.socket, a.session_tty) for a in opened] == [
        ("console", Path("sipis.toml"), None, False)]


def test_bare_command_uses_the_socket_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIPIS_OPERATOR_SOCKET", str(tmp_path / "operator.sock"))
    opened: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "open_console", lambda args: opened.append(args) or 0)
    assert cli.main([]) == 0
    assert [(a.command, a.config) for a in opened] == [("console", None)]
