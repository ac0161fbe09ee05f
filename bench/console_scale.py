"""Benchmark: the NOC console over SSH with 100k instances: first frame, filter, CPU, login stalls.

Setup (not measured, reported as ``setup``): ``--instances`` instances (default 100,000) are written
into a fresh state folder's SQLite database through the storage layer's public API
(``storage.repositories.sqlite_stores(...).instances.upsert_many``; records as
``sipis.persistence.InstancePersistence.record`` makes them, passwords sealed with
``sipis.crypto.SecretBox`` under the key file the core then loads). The mix is ``active`` (90 %) and
``off`` (10 %, credentials wiped): the only states a restore leaves alone, so nothing sends SIP during
the run (``inactive``/``proxied`` would be taken over and registered at once). Then the real core
(``sipis.core.Core`` from ``sipis.config.parse_config``, as ``serve`` builds it) starts **in this
process** with ``[ssh] listen = "127.0.0.1:0"`` and one operator whose key ``ssh-keygen`` made, and
restores them all. The app API is off and ageing runs once a day (its sweep of 100k instances would
otherwise fall into the measured windows at random).

Each console login is the real OpenSSH client on a pty, its host key pinned from the core's
generated key; the screen is the client's output fed through pyte. The terminals live in a
**driver child process** (this file with ``--driver``), so emulating the terminal never takes time
from the core's event loop whose lag is being measured. The core's SSH server spawns one console
process per session; its command is wrapped by a small bootstrap (``python -c``, then exactly what
``python -m sipis_console`` does) that appends time stamps to a file: interpreter up and console
imported (its own), then every timing mark the console gives its observers (``console/
instrumentation.py``: app mounted, first page and whole instance list requested / received / loaded,
every 1 Hz tick, to which it adds the console's GC time so far); optionally it runs cProfile
(``--profile-console``). All times are ``CLOCK_MONOTONIC`` (``time.monotonic()``), the same clock in
every process.

Measured:

1. **first frame** (``--logins`` logins, one after the other): from starting ``ssh`` until the
   screen shows the first instance row in AOR order and ``Instances  100,000 of 100,000``. The
   breakdown: ``ssh`` (client start, key exchange, public-key auth, pty and shell request: until the
   core audits ``ssh_login``), ``spawn`` (until the console's interpreter runs its first line),
   ``import``, ``app_start`` (Textual app built and mounted), ``until_request``, ``request`` (the
   rows of the first frame — a first page, or the whole list — asked for until received), ``load``
   (into the console's store), ``render`` (until the rows are on the ssh client's screen). The first
   login after the core started is also reported alone (lazy set-up on first requests shows there).
2. **filter latency**: ``/``, then one key at a time of ``--filter`` (default ``dy123``: with 100k
   instances each prefix matches fewer); per key, from writing it to the pty until the screen shows the
   expected ``Instances  N of 100,000``. After each login's first full load; ``esc`` clears it.
3. **console CPU per refresh**: ``--consoles`` consoles stay connected; each console process's CPU
   time (``/proc/PID/stat``) over ``--window`` seconds divided by the ticks it ran in that window;
   ``idle`` (nothing changes in the core) and ``churn`` (``--churn-rate`` apps a second report
   ``active`` through ``InstanceService.set_state``: one ``instance.app`` event each, applied by the
   console in its 1 Hz batch).
4. **core CPU per console**: this process's CPU time (the core; the terminals are in the driver)
   per second of wall time with 0 consoles (before the logins and after they left) and with
   ``--consoles`` idle consoles, sampler stopped: (with − without) / consoles.
5. **login stall**: a sampler in the core's loop sleeps ``--lag-interval`` (1 ms) and records how
   late it wakes (``wall``) and how much of that the core's thread ran (``busy``, from
   ``time.thread_time``: the stall the core's own work caused, without the waits for a CPU on a
   loaded machine); max and p99 during login windows (``ssh`` start until 1 s after the console
   loaded all rows) against a quiet baseline of ``--baseline`` seconds, the worst stall per phase of
   the login (by when it began), and every busy stall over 5 ms with its time. The goal is judged
   on ``busy``.

stdout gets exactly one JSON line; progress goes to stderr. Exit status: 0; 1 when a console never
showed its first frame or a filter step never showed its count; 2 when the benchmark could not run
(no ``ssh``/``ssh-keygen``, no pyte, the core failed to start).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import cProfile
import gc
import io
import itertools
import json
import logging
import os
import pstats
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# run as bench/console_scale.py (as the README does, and as this script starts its driver) only bench/ is
# on sys.path; the package import below needs the repository
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import LoopLag, cancel_and_wait, end_child, run_main

if TYPE_CHECKING:
    from sipis.core import Core

log = logging.getLogger("bench.console_scale")

GOAL_FIRST_FRAME_S = 1.0
GOAL_FILTER_MS = 100.0
GOAL_CPU_PER_REFRESH_MS = 50.0
GOAL_LOGIN_STALL_MS = 5.0

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar",
         "peggy", "trent", "victor", "wendy")
PROVIDERS = ("fcm", "apns", "acrobits")
OFF_EVERY = 10  # every 10th instance is off
OPERATOR = "noc"
#: with 100k instances: "d" ~96.6k (hex selectors), "dy" 12.5k (judy, wendy), then 1.25k, 125, 12
DEFAULT_FILTER = "dy123"
REPO = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """The benchmark could not run."""


def now_m() -> float:
    return time.monotonic()


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or value != value else round(value, digits)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def proc_cpu(pid: int) -> float:
    """user+sys CPU seconds of one process (Linux /proc); 0 when it is gone."""
    from lab.procstat import process_cpu_seconds

    return process_cpu_seconds(pid)


def proc_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


# =========================================================================== the terminal driver (child process)
#
# Runs ``ssh`` clients on ptys and emulates their screens with pyte. Commands arrive as JSON lines on
# stdin, answers leave as JSON lines on stdout, each with the request's ``req`` number. Only the
# standard library and pyte are imported here.


class _Term:
    def __init__(self, args: list[str], columns: int, rows: int) -> None:
        import pyte

        self.args = args
        self.columns, self.rows = columns, rows
        self.screen = pyte.Screen(columns, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.proc: subprocess.Popen[bytes] | None = None
        self.master = -1
        self.received = 0
        self.waiters: list[tuple[Callable[[str], bool], asyncio.Future[float]]] = []

    def start(self) -> float:
        import fcntl
        import pty
        import struct
        import termios

        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", self.rows, self.columns, 0, 0))
        began = now_m()
        self.proc = subprocess.Popen(self.args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     env={**os.environ, "TERM": "xterm-256color"})
        os.close(slave)
        self.master = master
        asyncio.get_running_loop().add_reader(master, self._read)
        return began

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            data = b""
        at = now_m()
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        self.received += len(data)
        self.stream.feed(data)
        if self.waiters:
            text = self.text()
            keep = []
            for predicate, future in self.waiters:
                if future.done():
                    continue
                if predicate(text):
                    future.set_result(at)
                else:
                    keep.append((predicate, future))
            self.waiters = keep

    def text(self) -> str:
        return "\n".join(self.screen.display)

    async def wait(self, predicate: Callable[[str], bool], timeout: float) -> float | None:
        """When the screen first satisfied ``predicate`` (monotonic), or None on timeout."""
        if predicate(self.text()):
            return now_m()
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters.append((predicate, future))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None

    def write(self, data: bytes) -> float:
        at = now_m()
        os.write(self.master, data)
        return at

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(5)
        if self.master >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.master)
            os.close(self.master)
            self.master = -1


def _needles(all_of: Sequence[str]) -> Callable[[str], bool]:
    return lambda text: all(n in text for n in all_of)


async def _driver_command(terms: dict[str, _Term], cmd: dict[str, Any]) -> dict[str, Any]:
    op, tid = cmd["op"], cmd.get("term", "")
    if op == "start":
        term = _Term(cmd["args"], cmd["columns"], cmd["rows"])
        terms[tid] = term
        return {"t_spawn": term.start(), "pid": term.proc.pid if term.proc else None}
    term = terms[tid]
    if op == "wait":
        seen = await term.wait(_needles(cmd["all"]), cmd.get("timeout", 30.0))
        return {"t": seen, "text": None if seen is not None else term.text()}
    if op == "keys":
        times = []
        for byte in cmd["keys"].encode():
            times.append(term.write(bytes([byte])))
            await asyncio.sleep(cmd.get("pause", 0.05))
        return {"t_write": times}
    if op == "filter":
        steps: list[dict[str, Any]] = []
        for key, needle in cmd["steps"]:
            await asyncio.sleep(cmd.get("pause", 0.2))
            wrote = term.write(key.encode())
            seen = await term.wait(_needles([needle]), cmd.get("timeout", 10.0))
            steps.append({"key": key, "t_write": wrote, "t_seen": seen,
                          "text": None if seen is not None else term.text()})
            if seen is None:
                break
        return {"steps": steps}
    if op == "text":
        return {"text": term.text(), "received": term.received}
    if op == "exit":
        deadline = now_m() + cmd.get("timeout", 10.0)
        while term.proc is not None and term.proc.poll() is None and now_m() < deadline:
            await asyncio.sleep(0.05)
        status = term.proc.poll() if term.proc is not None else None
        return {"status": status}
    if op == "close":
        term.close()
        del terms[tid]
        return {}
    raise ValueError(f"unknown op {op!r}")


async def _driver_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    terms: dict[str, _Term] = {}
    tasks: set[asyncio.Task[None]] = set()

    def answer(req: int, body: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps({"req": req, **body}) + "\n")
        sys.stdout.flush()

    async def run(cmd: dict[str, Any]) -> None:
        try:
            answer(cmd["req"], await _driver_command(terms, cmd))
        except Exception as exc:
            answer(cmd["req"], {"error": f"{type(exc).__name__}: {exc}"})

    try:
        while line := await reader.readline():
            task = asyncio.create_task(run(json.loads(line)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for term in list(terms.values()):
            term.close()


class Driver:
    """The benchmark's end of the driver process."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._req = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._terms = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--driver",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**22)
        self._reader = asyncio.create_task(self._read(), name="bench-driver-reader")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            reply = json.loads(line)
            future = self._pending.pop(reply.pop("req"), None)
            if future is not None and not future.done():
                future.set_result(reply)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BenchError("the terminal driver exited"))

    async def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self._req += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._req] = future
        self.proc.stdin.write((json.dumps({"req": self._req, **cmd}) + "\n").encode())
        reply = await future
        if "error" in reply:
            raise BenchError(f"driver: {cmd['op']}: {reply['error']}")
        return reply

    def new_term(self) -> str:
        self._terms += 1
        return f"t{self._terms}"

    async def stop(self) -> None:
        if self.proc is not None:
            await end_child(self.proc)
        await cancel_and_wait(self._reader)


# =========================================================================== the console bootstrap
#
# The console child's command: the same as ``python -m sipis_console console --socket S --session-tty``
# plus time stamps appended to <marks dir>/<pid>.marks: its own ("exec", "imported") and the console's
# timing marks (an observer of console.instrumentation), and optionally cProfile.

BOOTSTRAP = r"""
import os, sys, time
_marks_dir, _profile_dir = sys.argv[1], sys.argv[2]
_fd = os.open(os.path.join(_marks_dir, "%d.marks" % os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
def _mark(name, extra=""):
    os.write(_fd, ("%s %.6f %s\n" % (name, time.monotonic(), extra)).encode())
_mark("exec")
_profiler = None
_phase, _, _profile_dir = _profile_dir.rpartition(":")  # "", "steady" or "startup"
_steady, _startup = _phase == "steady", _phase == "startup"
if _profile_dir:
    import atexit, cProfile
    _profiler = cProfile.Profile()
    _dumped = []
    def _dump():
        if not _dumped:
            _dumped.append(1)
            _profiler.disable()
            _profiler.dump_stats(os.path.join(_profile_dir, "%d.prof" % os.getpid()))
    atexit.register(_dump)
    if not _steady:
        _profiler.enable()
import console.app, console.cli, sipis_console.cli
from console import instrumentation
_mark("imported")
import gc as _gc
_gc_time = [0.0, 0.0, 0.0]
_gc_began = [0.0]
def _gc_watch(phase, info):
    if phase == "start":
        _gc_began[0] = time.perf_counter()
    else:
        _gc_time[info.get("generation", 0)] += time.perf_counter() - _gc_began[0]
_gc.callbacks.append(_gc_watch)
_loaded = [False]
_ticks_loaded = [0]
def _observe(name, detail):
    if name == "tick":
        _mark("tick", "%.6f" % sum(_gc_time))
        if _steady and _profiler is not None and _loaded[0]:
            _ticks_loaded[0] += 1
            if _ticks_loaded[0] == 3:  # steady state: from the 3rd tick after the rows are in
                _profiler.enable()
        return
    _mark(name, detail)
    if name == "loaded":
        _loaded[0] = True
    if name in ("page_loaded", "loaded") and _startup and _profiler is not None:
        _dump()  # start-up profile: until the first rows are in
instrumentation.observe(_observe)
sys.argv = ["sipis-console", *sys.argv[3:]]
sys.exit(sipis_console.cli.main())
"""


@dataclass
class Marks:
    pid: int
    first: dict[str, float] = field(default_factory=dict)  # name → first time
    extra: dict[str, str] = field(default_factory=dict)
    ticks: list[float] = field(default_factory=list)
    gc_seconds: list[float] = field(default_factory=list)  # the console's GC time so far, at each tick


def read_marks(path: Path) -> Marks:
    marks = Marks(int(path.stem))
    try:
        text = path.read_text()
    except OSError:
        return marks
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        at_text, _, extra = rest.partition(" ")
        try:
            at = float(at_text)
        except ValueError:
            continue
        if name == "tick":
            marks.ticks.append(at)
            with contextlib.suppress(ValueError):
                marks.gc_seconds.append(float(extra))
        elif name not in marks.first:
            marks.first[name] = at
            if extra:
                marks.extra[name] = extra
    return marks


# =========================================================================== samplers in the core's loop


class GcLog:
    """Garbage-collector pauses of this process, with their times (gc.callbacks)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []  # (end, seconds, generation)
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.monotonic()
        else:
            end = time.monotonic()
            self.pauses.append((end, end - self._began, info.get("generation", 0)))

    def install(self) -> None:
        gc.callbacks.append(self)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self)

    def between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        return [p for p in self.pauses if start <= p[0] <= end]


# =========================================================================== seeding


@dataclass(frozen=True)
class Seeded:
    selector: str
    aor: str
    user: str
    registrar: str
    state: str


def seed_plan(n: int, rng: random.Random) -> list[Seeded]:
    plan = []
    digits = max(5, len(str(n - 1)))
    for i in range(n):
        name = NAMES[i % len(NAMES)]
        user = f"{name}{i:0{digits}d}"
        host = f"pbx{i % 3 + 1}.example.net"
        selector = f"{rng.getrandbits(160):040X}:{rng.getrandbits(32):08X}"  # Acrobits-shaped
        state = "off" if i % OFF_EVERY == OFF_EVERY - 1 else "active"
        plan.append(Seeded(selector, f"sip:{user}@{host}", user, f"sip:{host};transport=tcp", state))
    return plan


async def seed_database(state_dir: Path, plan: Sequence[Seeded], now: float, rng: random.Random) -> None:
    """Write the instances the way the core stores them (InstancePersistence.record's fields)."""
    from sipis.crypto import SecretBox, hash_token, load_or_create_key
    from storage.database import Database
    from storage.records import InstanceRecord
    from storage.repositories import sqlite_stores

    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    box = SecretBox(load_or_create_key(state_dir / "credentials.key"))  # the file Core.start loads
    db = await Database.open(state_dir / "sipis.db")
    try:
        stores = sqlite_stores(db)
        batch: list[InstanceRecord] = []
        for i, seed in enumerate(plan):
            off = seed.state == "off"
            seen = now - rng.uniform(0, 36 * 3600)  # within max_age (3 days): ageing leaves them alone
            batch.append(InstanceRecord(
                selector=seed.selector, aor=seed.aor, username=seed.user, auth_username=None,
                password_blob=None if off else box.encrypt(f"pw-{i}-{rng.getrandbits(32):x}", context=seed.selector),
                registrar=seed.registrar, display_name=seed.user.title(), instance_id=f"{rng.getrandbits(128):032x}",
                reg_id=1, push_provider=PROVIDERS[i % len(PROVIDERS)], push_app_id="com.example.phone",
                push_token=f"{rng.getrandbits(512):0128x}", push_voip_token=None,
                token_hash=hash_token(f"bench-{seed.selector}"), state=seed.state, reg_status="idle",
                last_code=200 if i % 4 else None, last_reason="OK" if i % 4 else None, expires_at=None,
                failure_count=0, app_contact=None, app_last_seen=seen, created_at=now - 30 * 86400,
                updated_at=seen, unregistered_since=seen if not off else now - 86400,
                push_unreachable=i % 97 == 13, disabled=False,
            ))
            if len(batch) == 5000:
                async with db.transaction():
                    await stores.instances.upsert_many(batch)
                batch = []
        if batch:
            async with db.transaction():
                await stores.instances.upsert_many(batch)
    finally:
        await db.close()


def expected_matches(plan: Sequence[Seeded], text: str) -> int:
    """What the console's filter counts: a plain word matches selector, aor, user or registrar."""
    from contract.query import haystack

    needle = text.lower()
    return sum(1 for s in plan if needle in haystack(s))  # type: ignore[arg-type]  # the four fields it reads


# =========================================================================== the run


@dataclass
class Options:
    instances: int
    logins: int
    consoles: int
    window: float
    windows: int
    baseline: float
    churn_rate: float
    lag_interval: float
    filter_text: str
    columns: int
    rows: int
    seed: int
    profile_console: Path | None
    profile_core: Path | None
    profile_phase: str
    keep: bool
    top: int


@dataclass
class Login:
    term: str
    t_spawn: float
    marks_path: Path | None = None
    t_login: float | None = None
    t_frame: float | None = None
    marks: Marks | None = None
    screen: str | None = None

    @property
    def pid(self) -> int | None:
        return self.marks.pid if self.marks is not None else None


class Bench:
    def __init__(self, opts: Options, work: Path) -> None:
        self.opts = opts
        self.work = work
        self.marks_dir = work / "marks"
        self.marks_dir.mkdir()
        self.keys = work / "keys"
        self.keys.mkdir()
        self.known_hosts = work / "known_hosts"
        self.driver = Driver()
        self.core: Core | None = None
        self.port = 0
        self.lag = LoopLag(opts.lag_interval, keep=True)  # every sample: login windows are cut out later
        self.gc = GcLog()
        self.ssh_logins: list[float] = []  # when the core audited ssh_login
        self.plan: list[Seeded] = []
        self._first_row: str | None = None
        self.result: dict[str, Any] = {}
        self.failed = False

    # ------------------------------------------------------------------ setup

    async def setup(self) -> None:
        from sipis.config import parse_config
        from sipis.core import Core

        opts = self.opts
        rng = random.Random(opts.seed)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "noc@bench", "-f",
                        str(self.keys / OPERATOR)], check=True)
        public_key = (self.keys / f"{OPERATOR}.pub").read_text().strip()
        state_dir = self.work / "state"
        self.plan = seed_plan(opts.instances, rng)
        began = now_m()
        await seed_database(state_dir, self.plan, time.time(), rng)
        seed_s = now_m() - began
        log.info("seeded %d instances in %.1f s", opts.instances, seed_s)
        config = parse_config({
            "state_dir": str(state_dir),
            "node_name": "bench-console",
            "sip": {"listen": ["udp:127.0.0.1:0"]},
            "api": {"listen": ""},
            "ageing": {"check_interval": 86400},
            "ssh": {"listen": "127.0.0.1:0", "max_sessions": opts.consoles + 4,
                    "operators": [{"name": OPERATOR, "role": "operator", "public_key": public_key}]},
        }, self.work)
        core = Core(config)
        began = now_m()
        listening = await core.start()
        start_s = now_m() - began
        self.core = core
        if listening.ssh is None or core.ssh is None:
            raise BenchError("the core did not start its SSH server")
        self.port = listening.ssh[1]
        assert core.service is not None
        restored = len(core.service.instances)
        log.info("core restored %d instances in %.1f s (rss %.0f MB)", restored, start_s,
                 proc_rss_mb(os.getpid()) or 0)
        if restored != opts.instances:
            raise BenchError(f"the core restored {restored} of {opts.instances} instances")
        import asyncssh

        host_key = asyncssh.read_private_key(config.ssh.host_key)
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_key.export_public_key().decode().strip()}\n")
        self._wrap_ssh(core)
        self.first_row_needle()
        counts: dict[str, int] = {}
        for seed in self.plan:
            counts[seed.state] = counts.get(seed.state, 0) + 1
        self.result["setup"] = {"seed_s": _r(seed_s, 2), "core_start_s": _r(start_s, 2), "restored": restored,
                                "states": counts, "core_rss_mb": _r(proc_rss_mb(os.getpid()), 0)}
        await self.driver.start()

    def _wrap_ssh(self, core: Core) -> None:
        """Time stamp ``ssh_login`` (the session starts) and wrap the console's command in the bootstrap."""
        ssh = core.ssh
        assert ssh is not None
        original = ssh.audit

        def audit(operator: Any, action: str, where: str | None, outcome: str) -> None:
            if action == "ssh_login":
                self.ssh_logins.append(now_m())
            if original is not None:
                original(operator, action, where, outcome)

        ssh.audit = audit
        command = list(ssh.command)
        if "sipis_console" not in command:
            raise BenchError(f"unexpected console command {command}")
        rest = command[command.index("sipis_console") + 1:]
        profile = ""
        if self.opts.profile_console is not None:
            profile = f"{self.opts.profile_phase}:{self.opts.profile_console}"
        ssh.command = [command[0], "-c", BOOTSTRAP, str(self.marks_dir), profile, *rest]

    def ssh_args(self) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(self.keys / OPERATOR),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "LogLevel=ERROR",
                "-F", "/dev/null", f"{OPERATOR}@127.0.0.1"]

    # ------------------------------------------------------------------ logins

    def first_row_needle(self) -> str:
        """Worked out once: a walk over 100k planned instances in the core's loop at the start of
        every login showed up as a ~10 ms stall of its own (in the ``ssh`` phase)."""
        if self._first_row is None:
            first = min(self.plan, key=lambda s: s.aor.lower())
            self._first_row = first.aor.removeprefix("sip:").split("@", 1)[0] + "@"
        return self._first_row

    def count_needle(self, matched: int) -> str:
        return f"Instances  {matched:,} of {self.opts.instances:,}"

    async def login(self, timeout: float = 60.0) -> Login:
        """One ssh session until its first frame; then until its console has every row loaded."""
        term = self.driver.new_term()
        before = set(self.marks_dir.glob("*.marks"))
        logins = len(self.ssh_logins)
        started = await self.driver.call(op="start", term=term, args=self.ssh_args(), columns=self.opts.columns,
                                         rows=self.opts.rows)
        session = Login(term, started["t_spawn"])
        frame = await self.driver.call(op="wait", term=term, timeout=timeout,
                                       all=[self.count_needle(self.opts.instances), self.first_row_needle()])
        session.t_frame = frame["t"]
        if frame["t"] is None:
            session.screen = frame["text"]
            log.error("no first frame after %.0f s; the screen:\n%s", timeout, frame["text"])
        if len(self.ssh_logins) > logins:
            session.t_login = self.ssh_logins[logins]
        new = set(self.marks_dir.glob("*.marks")) - before
        if len(new) == 1:
            session.marks_path = new.pop()
        # wait for the whole list to be in the console (it may show a first page earlier)
        deadline = now_m() + timeout
        while session.marks_path is not None and now_m() < deadline:
            session.marks = read_marks(session.marks_path)
            if "loaded" in session.marks.first:
                break
            await asyncio.sleep(0.05)
        return session

    async def logout(self, session: Login) -> None:
        await self.driver.call(op="keys", term=session.term, keys="q")
        quit_asked = await self.driver.call(op="wait", term=session.term, all=["Quit?"], timeout=10)
        if quit_asked["t"] is not None:
            await self.driver.call(op="keys", term=session.term, keys="y")
            await self.driver.call(op="exit", term=session.term, timeout=10)
        await self.driver.call(op="close", term=session.term)

    def breakdown(self, s: Login) -> dict[str, float | None]:
        m = s.marks.first if s.marks is not None else {}

        def span(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        # the rows of the first frame: a first page (when the console asks for one) or the whole list
        by_page = "page_loaded" in m and s.t_frame is not None and m["page_loaded"] <= s.t_frame
        asked, answered, shown = (("page_start", "page_end", "page_loaded") if by_page
                                  else ("fetch_start", "fetch_end", "loaded"))
        return {
            "ssh": span(s.t_spawn, s.t_login),
            "spawn": span(s.t_login, m.get("exec")),
            "import": span(m.get("exec"), m.get("imported")),
            "app_start": span(m.get("imported"), m.get("mounted")),
            "until_request": span(m.get("mounted"), m.get(asked)),
            "request": span(m.get(asked), m.get(answered)),
            "load": span(m.get(answered), m.get(shown)),
            "render": span(m.get(shown), s.t_frame),
        }

    def full_list(self, s: Login) -> dict[str, float | None]:
        m = s.marks.first if s.marks is not None else {}

        def span(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        return {"fetch": span(m.get("fetch_start"), m.get("fetch_end")),
                "load": span(m.get("fetch_end"), m.get("loaded")),
                "since_ssh_start": span(s.t_spawn, m.get("loaded"))}

    def login_window(self, s: Login) -> tuple[float, float]:
        loaded = s.marks.first.get("loaded") if s.marks is not None else None
        end = max(x for x in (s.t_frame, loaded, s.t_spawn) if x is not None)
        return s.t_spawn, end + 1.0

    PHASES = ("ssh", "spawn", "console start", "first page", "list fetch", "load", "after load")

    def stall_phase(self, s: Login, at: float) -> str:
        m = s.marks.first if s.marks is not None else {}
        first_request = min((m[k] for k in ("page_start", "fetch_start") if k in m), default=None)
        bounds = [("ssh", s.t_login), ("spawn", m.get("exec")), ("console start", first_request),
                  ("first page", m.get("page_loaded")), ("list fetch", m.get("fetch_end")),
                  ("load", m.get("loaded"))]
        for name, end in bounds:
            if end is not None and at <= end:
                return name
        return "after load"

    # ------------------------------------------------------------------ filter

    def filter_steps(self) -> list[tuple[str, int]]:
        text = self.opts.filter_text
        return [(text[k - 1], expected_matches(self.plan, text[:k])) for k in range(1, len(text) + 1)]

    async def filter_run(self, s: Login, steps: list[tuple[str, int]]) -> list[dict[str, Any]]:
        await self.driver.call(op="keys", term=s.term, keys="/")
        await asyncio.sleep(0.3)
        reply = await self.driver.call(op="filter", term=s.term, pause=0.3, timeout=10.0,
                                       steps=[(key, self.count_needle(n)) for key, n in steps])
        samples = []
        for step, (_key, expected) in zip(reply["steps"], steps, strict=False):
            took = None if step["t_seen"] is None else (step["t_seen"] - step["t_write"]) * 1000
            samples.append({"key": step["key"], "expected": expected, "ms": _r(took, 1)})
            if step["t_seen"] is None:
                log.error("filter step %r: %r never showed; the screen:\n%s", step["key"],
                          self.count_needle(expected), step["text"])
        await self.driver.call(op="keys", term=s.term, keys="\x1b", pause=0.3)  # esc: clear the filter
        await self.driver.call(op="wait", term=s.term, all=[self.count_needle(self.opts.instances)], timeout=10)
        return samples

    # ------------------------------------------------------------------ CPU windows

    async def core_cpu_window(self, seconds: float) -> float:
        """CPU seconds per second of this process (the core) over ``seconds``."""
        pid = os.getpid()
        cpu0, t0 = proc_cpu(pid), now_m()
        await asyncio.sleep(seconds)
        return (proc_cpu(pid) - cpu0) / (now_m() - t0)

    async def console_cpu_window(self, sessions: Sequence[Login],
                                 seconds: float) -> tuple[list[float], list[float], float]:
        """(ms CPU per tick for each console, ms of it in the console's GC, core CPU s/s) over one window."""
        pids = [s.pid for s in sessions if s.pid is not None]
        me = os.getpid()
        cpu0 = {pid: proc_cpu(pid) for pid in pids}
        core0, t0 = proc_cpu(me), now_m()
        await asyncio.sleep(seconds)
        t1 = now_m()
        core = (proc_cpu(me) - core0) / (t1 - t0)
        per_tick, gc_per_tick = [], []
        for s in sessions:
            if s.pid is None or s.marks_path is None:
                continue
            cpu = proc_cpu(s.pid) - cpu0[s.pid]
            marks = read_marks(s.marks_path)
            inside = [k for k, t in enumerate(marks.ticks) if t0 <= t <= t1]
            if inside:
                per_tick.append(cpu / len(inside) * 1000)
                if len(marks.gc_seconds) == len(marks.ticks) and inside[0] > 0:
                    spent = marks.gc_seconds[inside[-1]] - marks.gc_seconds[inside[0] - 1]
                    gc_per_tick.append(spent / len(inside) * 1000)
        return per_tick, gc_per_tick, core

    async def churn(self, rate: float, stop: asyncio.Event) -> int:
        """``rate`` apps a second report ``active`` (InstanceService.set_state): one event each."""
        core = self.core
        assert core is not None and core.service is not None
        active = [s.selector for s in self.plan if s.state == "active"]
        rng = random.Random(self.opts.seed + 1)
        done = 0
        began = now_m()
        while not stop.is_set():
            due = int((now_m() - began) * rate) - done
            for _ in range(max(0, due)):
                await core.service.set_state(rng.choice(active), "active", None)
                done += 1
            await asyncio.sleep(0.01)
        return done

    # ------------------------------------------------------------------ the phases

    async def run(self) -> None:
        opts = self.opts
        core = self.core
        assert core is not None
        result = self.result
        self.gc.install()
        # baseline: loop lag and core CPU with no console
        self.lag.start()
        await asyncio.sleep(0.5)
        base_start = now_m()
        await asyncio.sleep(opts.baseline)
        base_end = now_m()
        await self.lag.stop()
        core_idle = [await self.core_cpu_window(opts.window)]

        # logins one after the other: first frame, breakdown, filter, stalls
        steps = self.filter_steps()
        counts = [n for _key, n in steps]
        if any(b >= a for a, b in itertools.pairwise(counts)) or counts[0] >= opts.instances:
            log.warning("filter %r: not every key changes the count: %s", opts.filter_text, counts)
        profiler = cProfile.Profile() if opts.profile_core else None
        logins: list[Login] = []
        filters: list[dict[str, Any]] = []
        self.lag.start()
        await asyncio.sleep(0.5)
        for k in range(opts.logins):
            log.info("login %d/%d", k + 1, opts.logins)
            if profiler is not None:
                profiler.enable()
            session = await self.login()
            if profiler is not None:
                profiler.disable()
            logins.append(session)
            if session.t_frame is None:
                self.failed = True
                await self.driver.call(op="close", term=session.term)
                continue
            await asyncio.sleep(1.2)  # the login window ends 1 s after the load
            samples = await self.filter_run(session, steps)
            filters.extend(samples)
            if any(x["ms"] is None for x in samples):
                self.failed = True
            await self.logout(session)
            await asyncio.sleep(1.0)
        await self.lag.stop()
        if profiler is not None and opts.profile_core is not None:
            profiler.dump_stats(str(opts.profile_core))
            _print_profile(profiler, opts.top, "core during logins")
        result["first_frame"] = self._first_frame_figures(logins)
        result["filter"] = self._filter_figures(filters, steps)
        result["login_stall"] = self._stall_figures(logins, base_start, base_end)

        # K consoles connected: console CPU per refresh (idle, churn) and core CPU per console
        sessions: list[Login] = []
        for k in range(opts.consoles):
            log.info("console %d/%d", k + 1, opts.consoles)
            session = await self.login()
            if session.t_frame is None:
                self.failed = True
            sessions.append(session)
        await asyncio.sleep(3.0)
        idle_ticks: list[float] = []
        idle_gc: list[float] = []
        core_k: list[float] = []
        for w in range(opts.windows):
            log.info("idle window %d/%d (%d consoles)", w + 1, opts.windows, len(sessions))
            per_tick, gc_ms, core_cpu = await self.console_cpu_window(sessions, opts.window)
            idle_ticks.extend(per_tick)
            idle_gc.extend(gc_ms)
            core_k.append(core_cpu)
        churn_ticks: list[float] = []
        churn_gc: list[float] = []
        churned = 0
        churn_seconds = 0.0
        if opts.churn_rate > 0:
            for w in range(opts.windows):
                log.info("churn window %d/%d (%.0f events/s)", w + 1, opts.windows, opts.churn_rate)
                stop = asyncio.Event()
                began = now_m()
                churner = asyncio.create_task(self.churn(opts.churn_rate, stop))
                await asyncio.sleep(1.0)
                per_tick, gc_ms, _core = await self.console_cpu_window(sessions, opts.window)
                stop.set()
                churned += await churner
                churn_seconds += now_m() - began
                churn_ticks.extend(per_tick)
                churn_gc.extend(gc_ms)
                await asyncio.sleep(1.5)
        rss = [proc_rss_mb(s.pid) for s in sessions if s.pid is not None]
        for session in sessions:
            await self.logout(session)
        await asyncio.sleep(2.0)
        core_idle.append(await self.core_cpu_window(opts.window))
        result["console_cpu_per_refresh_ms"] = {
            "idle": _summary(idle_ticks),
            "churn": _summary(churn_ticks) if churn_ticks else None,
            "churn_events_per_s": _r(churned / churn_seconds, 0) if churn_seconds else None,
            "gc_ms_per_refresh": {"idle": _r(_median(idle_gc), 2), "churn": _r(_median(churn_gc), 2)},
            "consoles": len(sessions),
            "console_rss_mb": _r(_median([x for x in rss if x is not None]), 0),
        }
        baseline = statistics.mean(core_idle)
        with_k = statistics.median(core_k) if core_k else float("nan")
        result["core_cpu_per_console"] = {
            "consoles": len(sessions),
            "without_consoles_cpu_s_per_s": [_r(x, 4) for x in core_idle],
            "with_consoles_cpu_s_per_s": [_r(x, 4) for x in core_k],
            "per_console_cpu_s_per_s": _r((with_k - baseline) / max(1, len(sessions)), 4),
        }
        self.gc.remove()

    # ------------------------------------------------------------------ figures

    def _first_frame_figures(self, logins: list[Login]) -> dict[str, Any]:
        frames = [s.t_frame - s.t_spawn for s in logins if s.t_frame is not None]
        parts: dict[str, list[float]] = {}
        for s in logins:
            for name, value in self.breakdown(s).items():
                if value is not None:
                    parts.setdefault(name, []).append(value)
        full: dict[str, list[float]] = {}
        for s in logins:
            for name, value in self.full_list(s).items():
                if value is not None:
                    full.setdefault(name, []).append(value)
        return {
            "median_s": _r(_median(frames)), "first_login_s": _r(frames[0] if frames else None),
            "later_logins_median_s": _r(_median(frames[1:])), "min_s": _r(min(frames, default=None)),
            "max_s": _r(max(frames, default=None)), "runs_s": [_r(x) for x in frames],
            "breakdown_median_s": {k: _r(_median(v)) for k, v in parts.items()},
            "all_rows_median_s": {k: _r(_median(v)) for k, v in full.items()},
            "rows_fetched": next((int(s.marks.extra["fetch_end"]) for s in logins
                                  if s.marks is not None and "fetch_end" in s.marks.extra), None),
            "logins": len(logins), "failed": sum(1 for s in logins if s.t_frame is None),
        }

    def _filter_figures(self, samples: list[dict[str, Any]], steps: list[tuple[str, int]]) -> dict[str, Any]:
        ms = [x["ms"] for x in samples if x["ms"] is not None]
        per_key: dict[str, list[float]] = {}
        for k, x in enumerate(samples):
            if x["ms"] is not None:
                per_key.setdefault(f"{k % len(steps)}:{x['key']}", []).append(x["ms"])
        return {
            "text": self.opts.filter_text, "counts": [n for _k, n in steps],
            "p50_ms": _r(_median(ms), 1), "p90_ms": _r(_pct(ms, 90), 1), "max_ms": _r(max(ms, default=None), 1),
            "samples": len(ms), "failed": sum(1 for x in samples if x["ms"] is None),
            "median_per_key_ms": {k: _r(_median(v), 1) for k, v in per_key.items()},
        }

    def _stall_figures(self, logins: list[Login], base_start: float, base_end: float) -> dict[str, Any]:
        """Loop lag during the logins against the quiet baseline, as ``wall`` (how late the loop woke:
        also the process waiting for a CPU) and ``busy`` (the part of it the core's thread ran)."""
        figures: dict[str, Any] = {"interval_ms": self.opts.lag_interval * 1000}
        for kind in ("wall", "busy"):
            busy = kind == "busy"
            base = self.lag.window(base_start, base_end, busy=busy)
            in_logins: list[float] = []
            maxima: list[float] = []
            over: list[float] = []
            phase_max: dict[str, list[float]] = {}
            phase_of_max: dict[str, int] = {}
            for s in logins:
                start, end = self.login_window(s)
                lags = self.lag.window(start, end, busy=busy)
                in_logins.extend(lags)
                worst, at = self.lag.worst(start, end, busy=busy)
                maxima.append(worst)
                over.append(float(sum(1 for x in lags if x > GOAL_LOGIN_STALL_MS / 1000)))
                phase = self.stall_phase(s, at)
                phase_of_max[phase] = phase_of_max.get(phase, 0) + 1
                by_phase: dict[str, float] = {}
                lo = bisect.bisect_left(self.lag.at, start)
                for k, lag in enumerate(lags):
                    name = self.stall_phase(s, self.lag.began(lo + k))
                    by_phase[name] = max(by_phase.get(name, 0.0), lag)
                for name, lag in by_phase.items():
                    phase_max.setdefault(name, []).append(lag)
            figures[kind] = {
                "baseline": {"max_ms": _r(max(base, default=0.0) * 1000, 2), "p99_ms": _r(_pct(base, 99) * 1000, 2),
                             "samples": len(base)},
                "login": {"max_ms": _r(max(in_logins, default=0.0) * 1000, 2),
                          "p99_ms": _r(_pct(in_logins, 99) * 1000, 2),
                          "median_of_login_max_ms": _r(_ms(_median(maxima)), 2),
                          # the first login after the core started: lazy set-up on first requests shows here
                          "first_login_max_ms": _r(_ms(maxima[0] if maxima else None), 2),
                          "later_logins_max_ms": _r(_ms(max(maxima[1:], default=None)), 2),
                          "over_5ms_per_login": _r(_median(over), 1), "samples": len(in_logins)},
                "phase_of_max": phase_of_max,
                "max_ms_by_phase": {name: {"median": _r(_ms(_median(phase_max[name])), 2),
                                           "max": _r(max(phase_max[name]) * 1000, 2)}
                                    for name in self.PHASES if name in phase_max},
            }
        per_login = []
        for s in logins:
            start, end = self.login_window(s)
            lags = self.lag.window(start, end)
            busy_lags = self.lag.window(start, end, busy=True)
            lo = bisect.bisect_left(self.lag.at, start)
            top = sorted(range(len(lags)), key=lags.__getitem__, reverse=True)[:3]
            gc_pauses = self.gc.between(start, end)
            marks = s.marks.first if s.marks is not None else {}
            per_login.append({
                # when each step happened, seconds since ssh started
                "marks": {name: _r(at - s.t_spawn, 3) for name, at in
                          sorted([("ssh_login", s.t_login), ("frame", s.t_frame), *marks.items()],
                                 key=lambda item: item[1] or 0.0) if at is not None},
                # (wall ms, of it busy ms, phase, seconds since ssh started when it began)
                "worst": [(_r(lags[k] * 1000, 1), _r(busy_lags[k] * 1000, 1),
                           self.stall_phase(s, self.lag.began(lo + k)), _r(self.lag.began(lo + k) - s.t_spawn, 3))
                          for k in top],
                # every busy stall over 5 ms: (busy ms, phase, seconds since ssh started when it began)
                "busy_over_5ms": [(_r(b * 1000, 1), self.stall_phase(s, self.lag.began(lo + k)),
                                   _r(self.lag.began(lo + k) - s.t_spawn, 3))
                                  for k, b in enumerate(busy_lags) if b > GOAL_LOGIN_STALL_MS / 1000][:40],
                # (ms, generation, seconds since ssh started) of the core's GC pauses over 5 ms
                "gc_over_5ms": [(_r(p[1] * 1000, 1), p[2], _r(p[0] - s.t_spawn, 3)) for p in gc_pauses
                                if p[1] > 0.005],
            })
        figures["per_login"] = per_login
        return figures

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.driver.stop()
        if self.core is not None:
            with contextlib.suppress(Exception):
                await self.core.stop()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _summary(values: Sequence[float]) -> dict[str, Any]:
    return {"median": _r(_median(values), 2), "max": _r(max(values, default=None), 2), "samples": len(values)}


def _print_profile(profiler: cProfile.Profile, top: int, what: str) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    print(f"--- cProfile: {what} (by own time)\n{out.getvalue()}", file=sys.stderr)


def print_console_profiles(folder: Path, top: int) -> None:
    for path in sorted(folder.glob("*.prof"))[:1]:
        out = io.StringIO()
        stats = pstats.Stats(str(path), stream=out)
        stats.sort_stats("cumulative").print_stats(top)
        print(f"--- cProfile: console process {path.stem} (cumulative)\n{out.getvalue()}", file=sys.stderr)


def goals(result: dict[str, Any]) -> dict[str, Any]:
    ff = result.get("first_frame", {}).get("median_s")
    flt = result.get("filter", {}).get("max_ms")
    cpu = result.get("console_cpu_per_refresh_ms", {})
    cpu_worst = max((x["median"] for x in (cpu.get("idle"), cpu.get("churn")) if x and x["median"] is not None),
                    default=None)
    stall = result.get("login_stall", {}).get("busy", {}).get("login", {}).get("max_ms")
    return {
        "first_frame_s": {"goal": GOAL_FIRST_FRAME_S, "met": ff is not None and ff <= GOAL_FIRST_FRAME_S},
        "filter_ms": {"goal": GOAL_FILTER_MS, "met": flt is not None and flt <= GOAL_FILTER_MS},
        "console_cpu_per_refresh_ms": {"goal": GOAL_CPU_PER_REFRESH_MS,
                                       "met": cpu_worst is not None and cpu_worst <= GOAL_CPU_PER_REFRESH_MS},
        "login_stall_ms": {"goal": GOAL_LOGIN_STALL_MS, "met": stall is not None and stall <= GOAL_LOGIN_STALL_MS},
    }


async def run_benchmark(opts: Options) -> tuple[dict[str, Any], bool]:
    began = now_m()
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="cscale-"))  # short: the operator socket lives in it
    bench = Bench(opts, work)
    ok = False
    try:
        await bench.setup()
        await bench.run()
        ok = not bench.failed
    finally:
        await bench.close()
        if opts.profile_console is not None:
            print_console_profiles(opts.profile_console, opts.top)
        if opts.keep or bench.failed:
            bench.result["workdir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc: dict[str, Any] = {
        "benchmark": "console_scale",
        "instances": opts.instances,
        **bench.result,
        "goals": goals(bench.result),
        "terminal": f"{opts.columns}x{opts.rows}",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "runtime_s": round(now_m() - began, 1),
    }
    doc["meets_goals"] = all(g["met"] for g in doc["goals"].values())
    return doc, ok


# =========================================================================== CLI


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None or int(match.group(1)) < 80 or int(match.group(2)) < 24:
        raise argparse.ArgumentTypeError(f"COLUMNSxROWS, at least 80x24: {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="console_scale",
        description="The NOC console over SSH (real OpenSSH client on a pty) against the core with 100k "
                    "instances: time to first frame, filter latency, console CPU per refresh, core CPU per "
                    "console, core event-loop stalls during logins; prints one JSON line.")
    parser.add_argument("--instances", type=int, default=100_000, help="instances in the core (default 100000)")
    parser.add_argument("--logins", type=int, default=5,
                        help="logins one after the other for first frame, filter and stalls (default 5)")
    parser.add_argument("--consoles", type=int, default=3,
                        help="consoles kept connected for the CPU figures (default 3)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per CPU window (default 10)")
    parser.add_argument("--windows", type=int, default=3, help="CPU windows per condition (default 3)")
    parser.add_argument("--baseline", type=float, default=5.0,
                        help="seconds of quiet loop-lag baseline before the logins (default 5)")
    parser.add_argument("--churn-rate", type=float, default=200.0,
                        help="events per second during the churn windows, 0 = none (default 200)")
    parser.add_argument("--lag-interval", type=float, default=0.001,
                        help="loop-lag sampler sleep in seconds (default 0.001)")
    parser.add_argument("--filter", dest="filter_text", default=DEFAULT_FILTER,
                        help=f"text typed into the filter, one key at a time (default {DEFAULT_FILTER}: with "
                             "100k instances each key narrows the match)")
    parser.add_argument("--size", type=_size, default=(120, 32), help="terminal COLUMNSxROWS (default 120x32)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the instance data (default 1)")
    parser.add_argument("--profile-console", type=Path, metavar="DIR",
                        help="cProfile every console process into DIR/<pid>.prof; the first one's top "
                             "functions go to stderr (slows the consoles down)")
    parser.add_argument("--profile-phase", choices=("all", "startup", "steady"), default="all",
                        help="with --profile-console: the whole life (default), the start-up until the first "
                             "rows are in, or the 1 Hz steady state from the 3rd tick after all rows are in")
    parser.add_argument("--profile-core", type=Path, metavar="FILE",
                        help="cProfile the core during the logins into FILE; top functions to stderr")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (named in the JSON)")
    parser.add_argument("--top", type=int, default=25, help="lines of profile output (default 25)")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.instances < 1 or ns.logins < 1 or ns.consoles < 1 or ns.windows < 1:
        parser.error("--instances, --logins, --consoles and --windows must be >= 1")
    if ns.window <= 0 or ns.baseline <= 0 or ns.lag_interval <= 0 or ns.churn_rate < 0:
        parser.error("--window, --baseline and --lag-interval must be > 0, --churn-rate >= 0")
    if not ns.filter_text:
        parser.error("--filter must not be empty")
    if ns.profile_console is not None:
        ns.profile_console.mkdir(parents=True, exist_ok=True)
        ns.profile_console = ns.profile_console.resolve()
    return Options(ns.instances, ns.logins, ns.consoles, ns.window, ns.windows, ns.baseline, ns.churn_rate,
                   ns.lag_interval, ns.filter_text, ns.size[0], ns.size[1], ns.seed, ns.profile_console,
                   ns.profile_core, ns.profile_phase, ns.keep, ns.top)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--driver"]:
        asyncio.run(_driver_main())
        return 0
    opts = parse_args(args)
    missing = [tool for tool in ("ssh", "ssh-keygen") if shutil.which(tool) is None]
    try:
        import pyte  # noqa: F401
    except ImportError:
        missing.append("pyte (pip install pyte)")
    return run_main("console_scale", log, lambda: asyncio.run(run_benchmark(opts)),
                    unavailable=f"missing: {', '.join(missing)}" if missing else None)


if __name__ == "__main__":
    sys.exit(main())
