"""Run sipp scenarios as callers, phones and REGISTER load, for integration tests and benchmarks.

Every run gets its own temp folder (cwd, users.csv, messages/errors/stat/screen files). Local
ports: without -p sipp binds 5060 (then 5061, ...), so every run gets an explicit free port from
`lab.kamailio.free_port` (pass ``local_port`` for a UAS that must be reachable at a known port).
The RTP echo and control sockets are left to sipp, which probes upwards from 6000/8888 when a
port is taken (an explicit -mp/-cp that is taken is fatal, so pinning them would only add races).

The async variants are the important ones: tests run sipp while our asyncio SIP stack answers in
the same event loop, so nothing here may block that loop.

Debian's sipp 3.6.1 is built without TLS and only does MD5 digest: transports are udp/tcp.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.kamailio import LOAD_PASSWORD, free_port, guarded_argv, kill_group

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "tests" / "sipp"

# sipp's -t modes; "one socket for all calls" is what a SIP trunk or a SIPIS looks like.
TRANSPORTS = {"udp": "u1", "tcp": "t1", "u1": "u1", "un": "un", "t1": "t1", "tn": "tn"}

_LOG_SEPARATOR = re.compile(r"^-{20,}.*$", re.MULTILINE)
_LOG_HEADER = re.compile(r"^(UDP|TCP|TLS|SCTP) message (sent|received)\b.*$")
_COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
            "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding"}


class SippError(RuntimeError):
    """sipp could not be started or the arguments are wrong."""


def scenario(name: str) -> Path:
    """Path of one of our scenarios in tests/sipp (".xml" optional)."""
    path = SCENARIO_DIR / (name if name.endswith(".xml") else f"{name}.xml")
    if not path.exists():
        raise SippError(f"no such scenario: {path}")
    return path


# --------------------------------------------------------------------------- messages log


@dataclass(frozen=True)
class LoggedMessage:
    """One SIP message from sipp's -trace_msg log (headers in order, names as sent)."""

    direction: str  # "sent" or "received" (from sipp's point of view)
    transport: str  # "UDP"/"TCP"
    timestamp: str
    start_line: str
    headers: tuple[tuple[str, str], ...]
    body: str

    @property
    def status(self) -> int | None:
        if self.start_line.startswith("SIP/2.0 "):
            return int(self.start_line.split()[1])
        return None

    @property
    def method(self) -> str | None:
        """Request method, or for a response the method of its CSeq."""
        if self.status is None:
            return self.start_line.split(" ", 1)[0]
        cseq = self.header("CSeq")
        return cseq.split()[-1] if cseq else None

    def header_values(self, name: str) -> list[str]:
        """All values of a header (case-insensitive, compact forms understood)."""
        want = _COMPACT.get(name.lower(), name.lower())
        return [v for k, v in self.headers if _COMPACT.get(k.lower(), k.lower()) == want]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None


def parse_messages_log(text: str) -> list[LoggedMessage]:
    """Split a sipp messages log into messages; notes such as "Dead call ..." are skipped."""
    messages: list[LoggedMessage] = []
    stamps = [m.group(0).strip("- ") for m in _LOG_SEPARATOR.finditer(text)]
    for stamp, block in zip(stamps, _LOG_SEPARATOR.split(text)[1:], strict=False):
        lines = block.lstrip("\n").split("\n", 1)
        head = _LOG_HEADER.match(lines[0])
        if head is None or len(lines) < 2:
            continue
        parsed = _parse_sip(lines[1].lstrip("\r\n"))
        if parsed is not None:
            start, headers, body = parsed
            messages.append(LoggedMessage(head.group(2), head.group(1), stamp, start, headers, body))
    return messages


def _parse_sip(text: str) -> tuple[str, tuple[tuple[str, str], ...], str] | None:
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    if not lines or not lines[0].strip():
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded continuation
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    return lines[0].strip(), tuple(headers), body.strip("\n")


# --------------------------------------------------------------------------- results


@dataclass
class SippResult:
    """Outcome of one sipp run; ``ok`` means every call followed the scenario."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    messages_log: str
    errors_log: str
    screen: str
    stats: dict[str, str]
    elapsed: float  # wall-clock seconds from spawn to exit
    cpu_seconds: float | None  # user+sys of sipp; None where the rusage is not available (async)
    workdir: Path
    local_port: int  # sipp's SIP port ([local_port] in the scenario)
    _messages: list[LoggedMessage] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def successful(self) -> int:
        return _stat_int(self.stats, "SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return _stat_int(self.stats, "FailedCall(C)")

    @property
    def messages(self) -> list[LoggedMessage]:
        if self._messages is None:
            self._messages = parse_messages_log(self.messages_log)
        return self._messages

    def received(self, status: int | None = None, method: str | None = None) -> list[LoggedMessage]:
        """Messages sipp received, filtered by status code and/or (CSeq) method."""
        return _filter(self.messages, "received", status, method)

    def sent(self, status: int | None = None, method: str | None = None) -> list[LoggedMessage]:
        return _filter(self.messages, "sent", status, method)

    def describe(self) -> str:
        """A compact diagnosis for assertion messages."""
        return (
            f"sipp exit {self.returncode} ({self.successful} ok / {self.failed} failed) in "
            f"{self.elapsed:.2f}s\nargv: {' '.join(self.argv)}\nstderr: {self.stderr[-1500:]}\n"
            f"errors: {self.errors_log[-3000:]}\nworkdir: {self.workdir}"
        )


def _filter(msgs: list[LoggedMessage], direction: str, status: int | None, method: str | None) -> list[
    LoggedMessage
]:
    return [
        m for m in msgs
        if m.direction == direction
        and (status is None or m.status == status)
        and (method is None or (m.method or "").upper() == method.upper())
    ]


def _stat_int(stats: Mapping[str, str], key: str) -> int:
    try:
        return int(stats.get(key, "0"))
    except ValueError:
        return 0


def parse_stat_csv(text: str) -> dict[str, str]:
    """Last row of sipp's -trace_stat file, keyed by the header row (";"-separated)."""
    rows = [r for r in text.splitlines() if r.strip()]
    if len(rows) < 2:
        return {}
    names = rows[0].rstrip(";").split(";")
    values = rows[-1].rstrip(";").split(";")
    return dict(zip(names, values, strict=False))


# --------------------------------------------------------------------------- running


@dataclass
class _Run:
    argv: list[str]
    workdir: Path
    own_workdir: bool  # made here: removed after a successful run (kept for post-mortems)
    local_ip: str
    local_port: int

    @property
    def files(self) -> dict[str, Path]:
        return {n: self.workdir / f"{n}.txt" for n in ("stdout", "stderr", "messages", "errors", "stat", "screen")}

    def result(self, returncode: int, elapsed: float, cpu: float | None) -> SippResult:
        f = {name: _read(path) for name, path in self.files.items()}
        if self.own_workdir and returncode == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return SippResult(
            argv=self.argv, returncode=returncode, stdout=f["stdout"], stderr=f["stderr"],
            messages_log=f["messages"], errors_log=f["errors"], screen=f["screen"],
            stats=parse_stat_csv(f["stat"]), elapsed=elapsed, cpu_seconds=cpu, workdir=self.workdir,
            local_port=self.local_port,
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def build_argv(
    scenario_path: Path,
    target: str,
    files: Mapping[str, Path],
    *,
    service: str = "service",
    transport: str = "udp",
    calls: int = 1,
    rate: float | None = None,
    users: int | None = None,
    local_ip: str = "127.0.0.1",
    local_port: int,
    timeout: float | None = 30.0,
    inf: Path | None = None,
    keys: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    trace_messages: bool = True,
) -> list[str]:
    """The sipp command line (tracing into ``files``); see `run_scenario` for the parameters."""
    if transport not in TRANSPORTS:
        raise SippError(f"transport {transport!r} not supported by this sipp (use {sorted(TRANSPORTS)})")
    sipp = shutil.which("sipp")
    if sipp is None:
        raise SippError("sipp not found (Debian package sip-tester)")
    argv = [sipp, target, "-sf", str(scenario_path), "-s", service, "-t", TRANSPORTS[transport],
            "-m", str(calls), "-i", local_ip, "-p", str(local_port), "-nostdin",
            "-trace_err", "-error_file", str(files["errors"]),
            "-trace_stat", "-stf", str(files["stat"]), "-fd", "3600",
            "-trace_screen", "-screen_file", str(files["screen"])]
    if trace_messages:
        argv += ["-trace_msg", "-message_file", str(files["messages"])]
    if users is not None:
        argv += ["-users", str(users)]
    elif rate is not None:
        argv += ["-r", f"{rate:g}"]
    if timeout is not None:
        argv += ["-timeout", f"{max(1, round(timeout))}s", "-timeout_error"]
    if inf is not None:
        argv += ["-inf", str(inf)]
    for name, value in (keys or {}).items():
        argv += ["-key", name, value]
    return argv + list(extra_args)


def _prepare(scenario_path: Path | str, workdir: Path | None, local_ip: str, local_port: int | None,
             transport: str, inf: Path | None, inf_lines: Sequence[str] | None, **kwargs: Any) -> _Run:
    path = Path(scenario_path)
    if not path.is_absolute() and not path.exists():
        path = scenario(str(scenario_path))
    wd = Path(tempfile.mkdtemp(prefix="sipp-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    if inf_lines is not None:
        inf = wd / "users.csv"
        inf.write_text("\n".join(inf_lines) + "\n")
    if local_port is None:
        local_port = free_port(local_ip, udp=True, tcp=TRANSPORTS.get(transport, "")[:1] == "t")
    run = _Run([], wd, workdir is None, local_ip, local_port)
    run.argv = build_argv(path, files=run.files, local_ip=local_ip, local_port=local_port,
                          transport=transport, inf=inf, **kwargs)
    return run


def _cpu_seconds(rusage: resource.struct_rusage) -> float:
    return rusage.ru_utime + rusage.ru_stime


def run_scenario(
    scenario_path: Path | str,
    target: str,
    *,
    service: str = "service",
    transport: str = "udp",
    calls: int = 1,
    rate: float | None = None,
    users: int | None = None,
    local_ip: str = "127.0.0.1",
    local_port: int | None = None,
    timeout: float | None = 30.0,
    inf: Path | None = None,
    inf_lines: Sequence[str] | None = None,
    keys: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    trace_messages: bool = True,
    workdir: Path | None = None,
) -> SippResult:
    """Run sipp to completion (blocking) and collect its logs, statistics and CPU time.

    ``target`` is "host:port"; ``service`` is the R-URI user ([service]); ``transport`` is
    "udp"/"tcp" (or a raw sipp mode u1/un/t1/tn); ``rate`` calls/s or ``users`` concurrent calls
    (closed loop); ``timeout`` is sipp's global -timeout (a hard kill follows 10 s later);
    ``inf`` an injection CSV, or ``inf_lines`` its lines (written into the run folder); ``keys``
    become ``-key name value`` ([name] in the scenario); ``trace_messages=False`` skips the
    messages log (load runs). The run folder (``workdir``, default a new temp folder) holds all
    logs; a temp folder is removed after a successful run.
    """
    run = _prepare(scenario_path, workdir, target=target, service=service, transport=transport,
                   calls=calls, rate=rate, users=users, local_ip=local_ip, local_port=local_port,
                   timeout=timeout, inf=inf, inf_lines=inf_lines, keys=keys, extra_args=extra_args,
                   trace_messages=trace_messages)
    files = run.files
    started = time.monotonic()
    with files["stdout"].open("wb") as out, files["stderr"].open("wb") as err:
        proc = subprocess.Popen(guarded_argv(run.argv, thread_bound=False), cwd=run.workdir,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
    killer = threading.Timer((timeout or 3600) + 10, kill_group, (proc.pid,))
    killer.start()
    try:
        # wait4 rather than Popen.wait: it returns this child's own rusage (exact CPU seconds)
        _, status, rusage = os.wait4(proc.pid, 0)
    except BaseException:
        kill_group(proc.pid)
        proc.wait()
        raise
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return run.result(proc.returncode, time.monotonic() - started, _cpu_seconds(rusage))


class SippProcess:
    """A sipp run in the background of an asyncio loop (see `start_scenario`)."""

    def __init__(self, run: _Run, proc: asyncio.subprocess.Process, started: float,
                 timeout: float | None) -> None:
        self._run, self._proc, self._started = run, proc, started
        self._timeout = timeout
        self._result: SippResult | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def argv(self) -> list[str]:
        return self._run.argv

    @property
    def local_port(self) -> int:
        """sipp's SIP port (given or picked)."""
        return self._run.local_port

    async def wait_listening(self, timeout: float = 5.0) -> None:
        """Wait until sipp has bound ``local_port`` (a UAS is then ready for calls)."""
        host, port = self._run.local_ip, self._run.local_port
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise SippError(f"sipp exited early ({self._proc.returncode}): {_read(self._run.files['stderr'])}")
            if _port_taken(host, port):
                return
            await asyncio.sleep(0.02)
        raise SippError(f"sipp did not bind {host}:{port} within {timeout}s")

    async def wait(self) -> SippResult:
        """Wait for sipp to finish (killing it 10 s after its own -timeout) and collect results."""
        if self._result is None:
            limit = (self._timeout or 3600) + 10
            try:
                code = await asyncio.wait_for(self._proc.wait(), limit)
            except BaseException:
                await self.kill()
                raise
            self._result = self._run.result(code, time.monotonic() - self._started, None)
        return self._result

    async def kill(self) -> None:
        """Kill sipp (and anything it spawned) now."""
        if self._proc.returncode is None:
            kill_group(self._proc.pid)
            with contextlib.suppress(ProcessLookupError):
                await self._proc.wait()

    async def stop(self, timeout: float = 3.0) -> SippResult:
        """Ask sipp to finish (SIGUSR1 = quit after dumping statistics), then collect results."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGUSR1)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout)
            except TimeoutError:
                await self.kill()
        return await self.wait()


def _port_taken(host: str, port: int) -> bool:
    """True once something (sipp) has bound ``port`` for UDP or TCP."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return True
    return False


async def start_scenario(
    scenario_path: Path | str,
    target: str,
    *,
    service: str = "service",
    transport: str = "udp",
    calls: int = 1,
    rate: float | None = None,
    users: int | None = None,
    local_ip: str = "127.0.0.1",
    local_port: int | None = None,
    timeout: float | None = 30.0,
    inf: Path | None = None,
    inf_lines: Sequence[str] | None = None,
    keys: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    trace_messages: bool = True,
    workdir: Path | None = None,
) -> SippProcess:
    """Start sipp without blocking the event loop; parameters as for `run_scenario`."""
    run = _prepare(scenario_path, workdir, target=target, service=service, transport=transport,
                   calls=calls, rate=rate, users=users, local_ip=local_ip, local_port=local_port,
                   timeout=timeout, inf=inf, inf_lines=inf_lines, keys=keys, extra_args=extra_args,
                   trace_messages=trace_messages)
    files = run.files
    started = time.monotonic()
    with files["stdout"].open("wb") as out, files["stderr"].open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *guarded_argv(run.argv, thread_bound=False), cwd=run.workdir,
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
    return SippProcess(run, proc, started, timeout)


async def arun_scenario(scenario_path: Path | str, target: str, **kwargs: Any) -> SippResult:
    """`run_scenario` for asyncio code: start sipp, await its end (CPU time is not measured)."""
    proc = await start_scenario(scenario_path, target, **kwargs)
    return await proc.wait()


# --------------------------------------------------------------------------- REGISTER


def users_csv_lines(users: Iterable[tuple[str, str]]) -> list[str]:
    """Injection file for uac_register.xml: "user;[authentication username=... password=...]".

    sipp 3.6 cannot nest [field0] inside [authentication ...] in a scenario, but it does expand an
    [authentication] keyword that arrives through an injected field.
    """
    lines = ["SEQUENTIAL"]
    for user, password in users:
        if any(c in user + password for c in ";[] \n"):
            raise SippError(f"user/password unusable in a sipp CSV: {user!r}")
        lines.append(f"{user};[authentication username={user} password={password}]")
    return lines


def write_users_csv(path: Path, users: Iterable[tuple[str, str]]) -> Path:
    """Write `users_csv_lines` to ``path`` (for ``inf=``)."""
    path.write_text("\n".join(users_csv_lines(users)) + "\n")
    return path


def _register_kwargs(user: str, password: str, transport: str, expires: int, local_port: int | None,
                     timeout: float) -> dict[str, Any]:
    return dict(service=user, transport=transport, calls=1, local_port=local_port, timeout=timeout,
                inf_lines=users_csv_lines([(user, password)]), keys={"expires": str(expires)})


def register_user(target: str, user: str, password: str, *, transport: str = "udp", expires: int = 3600,
                  local_port: int | None = None, timeout: float = 15.0) -> SippResult:
    """REGISTER one user (401 challenge, digest, 200) with uac_register.xml; blocking."""
    kwargs = _register_kwargs(user, password, transport, expires, local_port, timeout)
    return run_scenario(scenario("uac_register"), target, **kwargs)


async def aregister_user(target: str, user: str, password: str, *, transport: str = "udp",
                         expires: int = 3600, local_port: int | None = None,
                         timeout: float = 15.0) -> SippResult:
    """`register_user` for asyncio code."""
    kwargs = _register_kwargs(user, password, transport, expires, local_port, timeout)
    return await arun_scenario(scenario("uac_register"), target, **kwargs)


def load_user(n: int, prefix: str = "load") -> str:
    """Name of load user ``n`` (1-based): load00001, load00002, ..."""
    return f"{prefix}{n:05d}"


@dataclass
class LoadResult:
    """REGISTER load figures (one registration = REGISTER, 401, REGISTER+auth, 200)."""

    transport: str
    users: int
    concurrency: int
    attempted: int
    successful: int
    failed: int
    elapsed: float
    cpu_seconds: float  # sipp's own user+sys CPU
    result: SippResult

    @property
    def rate(self) -> float:
        """Successful registrations per second."""
        return self.successful / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"transport": self.transport, "users": self.users, "concurrency": self.concurrency,
                "attempted": self.attempted, "successful": self.successful, "failed": self.failed,
                "elapsed_s": round(self.elapsed, 3), "registrations_per_s": round(self.rate, 1),
                "sipp_cpu_s": round(self.cpu_seconds, 3)}


def register_load(
    target: str,
    *,
    users: int = 200,
    transport: str = "udp",
    concurrency: int = 50,
    calls: int | None = None,
    first: int = 1,
    prefix: str = "load",
    password: str = LOAD_PASSWORD,
    expires: int = 3600,
    timeout: float = 120.0,
    extra_args: Sequence[str] = (),
) -> LoadResult:
    """Register ``users`` load users (load00001...) through one sipp, ``concurrency`` at a time.

    ``calls`` (default ``users``) registrations in total: more than ``users`` wraps around and
    refreshes. Over TCP sipp uses one connection for everything (-t t1), like a SIPIS would.
    Blocking; use `aregister_load` from asyncio code.
    """
    total = calls if calls is not None else users
    lines = users_csv_lines((load_user(n, prefix), password) for n in range(first, first + users))
    # no messages log (tens of MB, and it slows sipp down); no BYE for a failed registration
    res = run_scenario(scenario("uac_register"), target, service=prefix, transport=transport, calls=total,
                       users=concurrency, timeout=timeout, inf_lines=lines, keys={"expires": str(expires)},
                       extra_args=["-default_behaviors", "all,-bye", *extra_args], trace_messages=False)
    return LoadResult(transport=transport, users=users, concurrency=concurrency, attempted=total,
                      successful=res.successful, failed=res.failed, elapsed=res.elapsed,
                      cpu_seconds=res.cpu_seconds or 0.0, result=res)


async def aregister_load(target: str, **kwargs: Any) -> LoadResult:
    """`register_load` in a worker thread (it waits with os.wait4 to measure sipp's CPU)."""
    return await asyncio.to_thread(register_load, target, **kwargs)
