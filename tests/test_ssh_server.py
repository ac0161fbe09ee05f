"""The SSH server's pieces that need no client: host key handling and key → operator mapping.
(The sessions themselves are tested with the real OpenSSH client in tests/integration.)"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from sipis.config import HostPort, SshConfig, SshOperator
from sipis.operations import Operator
from sipis.operator_api import OperatorSessions
from sipis.ssh_server import ConsoleSshServer, console_command, load_or_create_host_key


def test_host_key_is_generated_private_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ssh_host_ed25519_key"
    first = load_or_create_host_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.algorithm == b"ssh-ed25519"
    again = load_or_create_host_key(path)
    assert again.public_data == first.public_data


def test_an_unreadable_host_key_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "hostkey"
    path.write_text("not a key\n")
    with pytest.raises(OSError, match=r"cannot read the SSH host key .*hostkey"):
        load_or_create_host_key(path)


def test_keys_map_to_their_operators_and_nothing_else(tmp_path: Path) -> None:
    alice, bob, stranger = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(3))
    config = SshConfig(listen=HostPort("127.0.0.1", 2222), host_key=tmp_path / "k", operators=(
        SshOperator("alice", "operator", alice.export_public_key().decode().strip()),
        SshOperator("bob", "viewer", bob.export_public_key().decode().strip() + " comment ignored"),
    ))
    server = ConsoleSshServer(config, OperatorSessions(), tmp_path / "operator.sock")
    assert server.operator_for(alice.convert_to_public()) == Operator("alice", "operator")
    assert server.operator_for(bob.convert_to_public()) == Operator("bob", "viewer")
    assert server.operator_for(stranger.convert_to_public()) is None


def test_the_console_child_talks_to_the_operator_socket(tmp_path: Path) -> None:
    command = console_command(tmp_path / "operator.sock")
    assert command[1:] == ["-m", "sipis_console", "console", "--socket", str(tmp_path / "operator.sock"),
                           "--session-tty"]


def test_importing_the_ssh_server_prints_no_deprecation_warning() -> None:
    """asyncssh's import of cryptography's DSA support warned five times at every start."""
    done = subprocess.run([sys.executable, "-W", "error", "-c", "import sipis.ssh_server"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
