"""Run the real core (``sipis-console serve``) as a child process, for tests and benchmarks.

The config is written into a folder of its own with free loopback ports; :meth:`CoreProcess.client`
talks HTTPS to the app API, verifying the certificate the core generated into its state folder.
``kill()`` sends SIGKILL (a crash), ``stop()`` SIGTERM (a clean shutdown); ``start()`` again
reuses the same state folder and ports, so restart recovery can be observed. ``pause()``/``resume()``
(SIGSTOP/SIGCONT) freeze it, as a stalled machine would; :meth:`CoreProcess.operator` talks to the
operator API on its unix socket as the local administrator.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from lab.kamailio import free_port

ENROL_TOKEN = "lab-enrol-token"


class CoreProcess:
    def __init__(self, workdir: Path, *, sip_options: dict[str, Any] | None = None,
                 extra_config: str = "", node_name: str | None = None) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.config_path = workdir / "sipis.toml"
        self.log_path = workdir / "core.log"
        self.sip_port = free_port()
        self.api_port = free_port(udp=False)
        self.proc: subprocess.Popen[bytes] | None = None
        options = {"register_expires": 120, "backoff_base": 0.2, "backoff_max": 1.0, **(sip_options or {})}
        sip_lines = "\n".join(f"{key} = {_toml(value)}" for key, value in options.items())
        self.config_path.write_text(
            f'state_dir = "{self.state_dir}"\n'
            + (f'node_name = "{node_name}"\n' if node_name else "")
            + "[sip]\n"
            f'listen = ["udp:127.0.0.1:{self.sip_port}", "tcp:127.0.0.1:{self.sip_port}"]\n'
            f"{sip_lines}\n"
            "[api]\n"
            f'listen = "127.0.0.1:{self.api_port}"\n'
            f'enroll_tokens = ["{ENROL_TOKEN}"]\n'
            f"{extra_config}\n"
        )

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def start(self, timeout: float = 20.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sipis_console", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=log, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"core exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                httpx.get(self.base_url + "/v1/health", verify=False, timeout=1.0)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"core did not answer within {timeout} s:\n{self.log_text()[-3000:]}")

    def client(self) -> httpx.Client:
        trust = ssl.create_default_context(cafile=str(self.state_dir / "api-tls.crt"))
        return httpx.Client(base_url=self.base_url, verify=trust, timeout=10.0)

    def operator(self, name: str = "lab") -> httpx.Client:
        """The operator API on the unix socket (``state_dir/operator.sock``), as administrator ``name``."""
        transport = httpx.HTTPTransport(uds=str(self.state_dir / "operator.sock"))
        return httpx.Client(transport=transport, base_url="http://operator", headers={"X-Operator": name},
                            timeout=10.0)

    def pause(self) -> None:
        """SIGSTOP: frozen, timers and sockets untouched, until :meth:`resume`."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the core gets no chance to clean up (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM: a clean shutdown. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> CoreProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
