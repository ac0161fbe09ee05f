"""The ``sipis-console`` dispatcher: every command listed, each run by its owner; no command at all
opens the console against the local core, or prints help that says why not."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import console.cli
from sipis.cli import configure_logging
from sipis_console.cli import COMMANDS, main


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[argparse.Namespace]:
    """The console's arguments each time it would have opened (in ``tmp_path``, no core known)."""
    monkeypatch.chdir(tmp_path)
    for name in ("SIPIS_OPERATOR_SOCKET", "SIPIS_OPERATOR_URL"):
        monkeypatch.delenv(name, raising=False)
    calls: list[argparse.Namespace] = []
    monkeypatch.setattr(console.cli, "main", lambda args: calls.append(args) or 0)
    return calls


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sipis-console [-h] [--version] COMMAND ..." in out and "examples:" in out
    for name, command in COMMANDS.items():
        assert f"    {name:<10}{command.help}" in out


@pytest.mark.parametrize(("name", "option"), [("serve", "--log-level"), ("init", "--force"), ("console", "--url"),
                                              ("demo", "--call-rate")])
def test_a_commands_help_comes_from_its_owner(name: str, option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sipis-console {name} [-h]") and option in out


def test_bare_command_without_a_core_prints_help_and_says_why(opened: list[argparse.Namespace],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert "usage: sipis-console" in out and "demo" in out
    assert "no running core" in err and "sipis.toml" in err
    assert opened == []


def test_bare_command_opens_the_console_on_the_local_config(tmp_path: Path, opened: list[argparse.Namespace]) -> None:
    assert main(["init"]) == 0  # ./sipis.toml
    assert main([]) == 0
    assert [(a.command, a.config, a.socket, a.session_tty) for a in opened] == [
        ("console", Path("sipis.toml"), tmp_path / "var" / "operator.sock", False)]


def test_bare_command_uses_the_socket_from_the_environment(tmp_path: Path, opened: list[argparse.Namespace],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPIS_OPERATOR_SOCKET", str(tmp_path / "operator.sock"))
    assert main([]) == 0
    assert [(a.command, a.config, a.socket) for a in opened] == [("console", None, None)]


def test_a_broken_config_is_reported_before_the_console_starts(tmp_path: Path, opened: list[argparse.Namespace],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.toml").write_text("state_dir = [\n")
    assert main(["console", "--config", "bad.toml"]) == 2
    assert capsys.readouterr().err.startswith("sipis-console: bad.toml: ")
    assert opened == []


@pytest.mark.parametrize(("level", "asyncssh_level"), [("info", logging.WARNING), ("warning", logging.WARNING),
                                                      ("debug", logging.DEBUG)])
def test_asyncssh_routine_lines_show_only_at_debug(level: str, asyncssh_level: int) -> None:
    chatty = logging.getLogger("asyncssh")
    saved = chatty.level
    try:
        configure_logging(level, None)
        assert chatty.getEffectiveLevel() == asyncssh_level
    finally:
        chatty.setLevel(saved)


def test_json_log_format_writes_one_object_per_record(tmp_path: Path) -> None:
    log_file = tmp_path / "core.log"
    script = ("import logging, pathlib, sys\n"
              "from sipis.cli import configure_logging\n"
              "configure_logging('info', pathlib.Path(sys.argv[1]), 'json')\n"
              "logging.getLogger('sipis.core').info('SIP listening on %s', 'udp:127.0.0.1:5060')\n"
              "logging.getLogger('asyncssh').info('connection from 127.0.0.1')\n"
              "try:\n    1 / 0\n"
              "except ZeroDivisionError:\n    logging.getLogger('sipis').exception('oops \"quoted\"')\n")
    done = subprocess.run([sys.executable, "-c", script, str(log_file)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(e["level"], e["logger"], e["message"]) for e in entries] == [
        ("INFO", "sipis.core", "SIP listening on udp:127.0.0.1:5060"), ("ERROR", "sipis", 'oops "quoted"')]
    assert "ZeroDivisionError" in entries[1]["exception"] and entries[0]["time"].endswith("+00:00")


def test_console_without_options_uses_the_local_config(tmp_path: Path, opened: list[argparse.Namespace]) -> None:
    assert main(["init"]) == 0
    assert main(["console"]) == 0
    assert [(a.config, a.socket) for a in opened] == [(Path("sipis.toml"), tmp_path / "var" / "operator.sock")]


def test_the_export_folder_comes_from_the_config(tmp_path: Path, opened: list[argparse.Namespace]) -> None:
    assert main(["init"]) == 0
    config = Path("sipis.toml")
    config.write_text(config.read_text().replace('# export_dir = "~/sipis-exports"', 'export_dir = "traces"'))
    assert main([]) == 0
    assert main(["console", "--export-dir", "/elsewhere"]) == 0
    assert [a.export_dir for a in opened] == [tmp_path / "traces", Path("/elsewhere")]
