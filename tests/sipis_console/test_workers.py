"""``serve --workers N``: N nodes of one cluster as worker processes on a real PostgreSQL, each on
its own listeners, restarted when one dies, all stopped by SIGTERM to the supervisor."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lab.kamailio import free_port
from sipis.config import HostPort, SipListen, parse_config
from sipis.workers import restart_delay, socket_answers, worker_config

ENROL = "enrol-" + "W" * 30


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wk-", dir="/tmp"))  # short: operator socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


def port_pair() -> int:
    """A port P with P and P+1 free for UDP and TCP (worker 2 adds 1)."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and all(_free(port + 1, kind) for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM)):
            return port
    raise AssertionError("no pair of free ports")


def _free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def write_config(root: Path, url: str | None) -> Path:
    sip, api = port_pair(), port_pair()
    storage = f'[storage]\nurl = "{url}"\n' if url else ""
    path = root / "sipis.toml"
    path.write_text(
        f'state_dir = "{root / "state"}"\nnode_name = "wk"\n{storage}'
        f'[sip]\nlisten = ["udp:127.0.0.1:{sip}", "tcp:127.0.0.1:{sip}"]\n'
        f'[api]\nlisten = "127.0.0.1:{api}"\ntls = false\nenroll_tokens = ["{ENROL}"]\n'
        f'[operator]\nsocket = "{root / "op.sock"}"\n'
        "[cluster]\nlease_ttl = 3\ndrain_timeout = 5\n"
    )
    return path


def test_each_worker_is_a_node_of_its_own_on_listeners_moved_by_its_index(tmp_path: Path) -> None:
    config = parse_config({
        "node_name": "edge", "storage": {"url": "postgresql://sipis@127.0.0.1:5432/sipis"},
        "sip": {"listen": ["udp:127.0.0.1:5070", "tls:127.0.0.1:5071", "tcp:127.0.0.1:0"]},
        "api": {"listen": "127.0.0.1:24998", "enroll_tokens": [ENROL]},
        "operator": {"socket": "run/operator.sock", "tcp_listen": "127.0.0.1:24999", "tokens": [
            {"name": "auto", "role": "viewer", "token": "t" * 32}]},
        "metrics": {"listen": "127.0.0.1:9464"},
    }, tmp_path)
    third = worker_config(config, 3)
    assert third.node_name == "edge-3"
    assert third.sip.listen == (SipListen("udp", "127.0.0.1", 5072), SipListen("tls", "127.0.0.1", 5073),
                                SipListen("tcp", "127.0.0.1", 0))
    assert (third.api.listen, third.operator.tcp_listen, third.metrics.listen, third.ssh.listen) == (
        HostPort("127.0.0.1", 25000), HostPort("127.0.0.1", 25001), HostPort("127.0.0.1", 9466), None)
    assert third.operator.socket == tmp_path / "run" / "operator-3.sock"
    assert (third.storage, third.state_dir, third.api.tls_cert) == (
        config.storage, config.state_dir, config.api.tls_cert)  # shared: key file, certificates
    assert worker_config(config, 1).sip.listen == config.sip.listen


def test_a_worker_that_keeps_dying_is_restarted_ever_more_slowly() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_workers_need_postgresql(root: Path) -> None:
    path = write_config(root, None)
    result = subprocess.run([sys.executable, "-m", "sipis_console", "serve", "--config", str(path),
                             "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--workers 2 needs [storage] url" in result.stderr
    assert not (root / "state").exists()  # nothing started


def nodes(sock: Path) -> dict[str, dict[str, Any]]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://operator",
                      timeout=5) as client:
        answer = client.get("/v1/nodes")
    answer.raise_for_status()
    return {row["name"]: row for row in answer.json()["nodes"]}


def wait_until(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def started_pids(log: Path, name: str) -> list[int]:
    return [int(pid) for pid in re.findall(rf"worker {name} started \(pid (\d+)\)", log.read_text(errors="replace"))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by the supervisor) counts as gone
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(") ")[-1][:1] != "Z"


def test_two_workers_serve_as_two_nodes_and_one_killed_comes_back(root: Path, pg_url: str) -> None:
    path = write_config(root, pg_url)
    log = root / "serve.log"
    with log.open("ab") as out:
        supervisor = subprocess.Popen([sys.executable, "-m", "sipis_console", "serve", "--config", str(path),
                                       "--workers", "2", "--log-level", "info"],
                                      stdout=out, stderr=out, start_new_session=True)
    sockets = [root / "op-1.sock", root / "op-2.sock"]
    try:
        wait_until(lambda: all(socket_answers(s) for s in sockets), "both workers' operator sockets")
        wait_until(lambda: {n: r["state"] for n, r in nodes(sockets[0]).items()} == {"wk-1": "up", "wk-2": "up"},
                   "both nodes up in GET /v1/nodes")
        assert nodes(sockets[1]).keys() == {"wk-1", "wk-2"}  # any node shows the cluster

        [first] = started_pids(log, "wk-2")
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(started_pids(log, "wk-2")) == 2, "the killed worker restarted")
        assert re.search(rf"worker wk-2 \(pid {first}\) exited with signal SIGKILL; restarting it in 1 s",
                         log.read_text())
        wait_until(lambda: socket_answers(sockets[1]) and nodes(sockets[1])["wk-2"]["state"] == "up",
                   "the restarted worker up again")
        assert supervisor.poll() is None

        workers = [started_pids(log, "wk-1")[0], started_pids(log, "wk-2")[1]]
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0
        assert not any(alive(pid) for pid in workers)
        assert "all workers stopped" in log.read_text()
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait(10)


def test_drain_follows_a_node_down_to_nothing(root: Path, pg_url: str) -> None:
    path = write_config(root, pg_url)
    api = re.search(r'\[api\]\nlisten = "127.0.0.1:(\d+)"', path.read_text())
    assert api is not None
    log = root / "serve.log"
    with log.open("ab") as out:
        supervisor = subprocess.Popen([sys.executable, "-m", "sipis_console", "serve", "--config", str(path),
                                       "--workers", "2"], stdout=out, stderr=out, start_new_session=True)
    sockets = [root / "op-1.sock", root / "op-2.sock"]
    try:
        wait_until(lambda: all(socket_answers(s) for s in sockets), "both workers' operator sockets")
        with httpx.Client(base_url=f"http://127.0.0.1:{api.group(1)}", timeout=10) as app_api:
            for k in range(6):  # enrolled on wk-1, which claims them; balancing hands wk-2 its share
                app_api.post("/v1/instances", headers={"Authorization": f"Bearer {ENROL}"}, json={
                    "account": {"aor": f"sip:user{k}@example.net", "username": f"user{k}", "password": "pw"},
                    "push": {"provider": "mediator", "app_id": "com.example.app", "token": f"push-{k}"},
                }).raise_for_status()
        wait_until(lambda: nodes(sockets[0])["wk-2"]["instances"] > 0, "wk-2 holding its share")
        result = subprocess.run([sys.executable, "-m", "sipis_console", "drain", "wk-2", "--socket", str(sockets[0])],
                                capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert re.fullmatch(r"drain wk-2: 0/\d handed over, \d left", lines[0]) and lines[-1] == "drain wk-2: done"
        rows = nodes(sockets[0])
        assert (rows["wk-2"]["state"], rows["wk-2"]["instances"], rows["wk-1"]["instances"]) == ("draining", 0, 6)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait(10)
