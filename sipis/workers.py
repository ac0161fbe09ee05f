"""``serve --workers N``: N nodes of one cluster as worker processes of one supervisor.

Each worker is ``sipis-console serve --config FILE --worker K`` (K = 1…N), a whole node on the
configured PostgreSQL: :func:`worker_config` names it ``<node_name>-K`` and moves every TCP/UDP
listener's port up by K-1 (SIP, app API, operator TCP, SSH, metrics; port 0 stays 0) and its
operator socket to ``<stem>-K<suffix>``. Everything else is shared: the key file, the generated
certificates and the SSH host key in ``state_dir``. Worker 1 starts alone and the others only once
its operator socket answers, so those files and the schema are created once.

The supervisor restarts a worker that exits, after :func:`restart_delay` (1 s doubling to 30 s;
back to 1 s once a worker has run for a minute), with a WARNING line each time. SIGTERM or SIGINT:
every worker gets SIGTERM (each hands its instances over, within ``cluster.drain_timeout``); one
still running ``drain_timeout`` + 30 s later gets SIGKILL. A worker whose supervisor dies gets
SIGTERM from the kernel (``PR_SET_PDEATHSIG``), so no worker outlives its supervisor.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from sipis.config import Config, HostPort

log = logging.getLogger("sipis.workers")

#: a worker that ran this long before exiting restarts after the first delay again
STABLE_AFTER = 60.0
FIRST_DELAY = 1.0
MAX_DELAY = 30.0
#: how long worker 1 may take to open its operator socket before the others start anyway
FIRST_START_TIMEOUT = 120.0
#: SIGTERM → SIGKILL: the workers' drain_timeout plus this
STOP_MARGIN = 30.0
POLL = 0.2


def worker_config(config: Config, index: int) -> Config:
    """Worker ``index``'s (1-based) node: its name and listeners; everything else as configured."""
    shift = index - 1

    def moved(address: HostPort | None) -> HostPort | None:
        if address is None or address.port == 0:
            return address
        return replace(address, port=address.port + shift)

    socket_path = config.operator.socket
    return replace(
        config,
        node_name=f"{config.node_name}-{index}",
        sip=replace(config.sip, listen=tuple(
            spec if spec.port == 0 else replace(spec, port=spec.port + shift) for spec in config.sip.listen)),
        api=replace(config.api, listen=moved(config.api.listen)),
        operator=replace(config.operator, tcp_listen=moved(config.operator.tcp_listen),
                         socket=socket_path.with_name(f"{socket_path.stem}-{index}{socket_path.suffix}")),
        ssh=replace(config.ssh, listen=moved(config.ssh.listen)),
        metrics=replace(config.metrics, listen=moved(config.metrics.listen)),
    )


def restart_delay(failures: int) -> float:
    """The wait before restarting a worker that exited ``failures`` times in a row (1 = first)."""
    return min(MAX_DELAY, FIRST_DELAY * 2.0 ** max(0, failures - 1))


def die_with_parent() -> None:
    """Linux: SIGTERM when the supervisor dies (a worker must not outlive it); elsewhere nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before the call
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Worker:
    index: int
    name: str
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs ``command(K)`` for K = 1…count and keeps them running until SIGTERM/SIGINT."""

    def __init__(self, command: Callable[[int], Sequence[str]], names: Sequence[str], *,
                 ready: Callable[[int], bool], stop_timeout: float) -> None:
        self.command = command
        self.workers = [Worker(index, name) for index, name in enumerate(names, start=1)]
        self.ready = ready
        self.stop_timeout = stop_timeout
        self.stopping = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        first, *others = self.workers
        self._spawn(first)
        deadline = time.monotonic() + FIRST_START_TIMEOUT
        while not self.stopping and time.monotonic() < deadline and not self.ready(first.index):
            if first.proc is not None and first.proc.poll() is not None:
                break  # the loop below restarts it
            time.sleep(POLL)
        for worker in others:
            if not self.stopping:
                self._spawn(worker)
        while not self.stopping:
            self._watch(time.monotonic())
            time.sleep(POLL)
        self._stop_all()
        return 0

    def _spawn(self, worker: Worker) -> None:
        worker.proc = subprocess.Popen(list(self.command(worker.index)))
        worker.started = time.monotonic()
        worker.restart_at = None
        log.info("worker %s started (pid %d)", worker.name, worker.proc.pid)

    def _watch(self, now: float) -> None:
        for worker in self.workers:
            proc = worker.proc
            if worker.restart_at is not None:
                if now >= worker.restart_at:
                    self._spawn(worker)
                continue
            if proc is None or proc.poll() is None:
                continue
            worker.failures = 1 if now - worker.started >= STABLE_AFTER else worker.failures + 1
            delay = restart_delay(worker.failures)
            worker.restart_at = now + delay
            log.warning("worker %s (pid %d) exited with %s; restarting it in %.0f s", worker.name, proc.pid,
                        _status(proc.returncode), delay)

    def _stop_all(self) -> None:
        running = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        log.info("stopping %d workers", len(running))
        for worker in running:
            assert worker.proc is not None
            worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for worker in running:
            assert worker.proc is not None
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop within %.0f s; killing it", worker.name, self.stop_timeout)
                worker.proc.kill()
                worker.proc.wait()


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def socket_answers(path: Path) -> bool:
    """A unix socket accepts a connection (the worker's core is up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def supervise(config: Config, count: int, worker_argv: Callable[[int], Sequence[str]]) -> int:
    """Run ``count`` workers of ``config`` until SIGTERM; the exit status."""
    names = [worker_config(config, k).node_name for k in range(1, count + 1)]
    log.info("supervising %d workers (%s) on %s", count, ", ".join(names), "PostgreSQL")
    supervisor = Supervisor(worker_argv, names,
                            ready=lambda k: socket_answers(worker_config(config, k).operator.socket),
                            stop_timeout=config.cluster.drain_timeout + STOP_MARGIN)
    status = supervisor.run()
    log.info("all workers stopped")
    return status
