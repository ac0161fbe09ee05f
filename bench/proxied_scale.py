"""Benchmark: many proxied instances against one Kamailio: memory, refresh CPU, punctuality, restore.

Per case (``--cases N:EXPIRES,...``) a fresh Kamailio (``lab.kamailio``, ``min_expires`` at most the
case's expiry so a short expiry is granted as asked) and, in this process, the core's pieces wired
the way ``sipis/core.py`` wires them: one ``SipEndpoint`` with the SIP trace recorder on its
observers, a ``ProxyRegistrar`` with the resolver, the ``RegistrationEngine``, the
``InstanceService`` and the storage path (``InstancePersistence`` on the bus → ``BatchedWriter`` →
SQLite in a temp folder, credentials encrypted). No HTTP, calls, push or operator API. N instances
``load00001``… (password ``loadpw``, registrar ``sip:<kamailio>;transport=tcp`` by default: one TCP
connection for all, as a deployment behind one PBX has) are built as ``Instance`` objects,
``service.add``-ed and handed to ``lifecycle.take_over``: enrolment plus "the app went to sleep".

Phases of a case:

1. **setup and memory**: register all N, paced at ``--register-rate``. ``tracemalloc`` runs from
   just before the first instance is created until all are registered and the process is quiet
   (writer drained, every transaction past its last timer, ``gc.collect()``); its increase / N is
   ``bytes_per_instance_tracemalloc``. The RSS increase over the same span, minus tracemalloc's own
   bookkeeping (``tracemalloc.get_tracemalloc_memory()``), / N is ``bytes_per_instance_rss``. The
   top allocation sites go to stderr and ``memory_top``. Nothing in this phase is timed:
   tracemalloc slows everything 3-4x.
2. **crash and restore**: the engine's tasks are cancelled, the endpoint's sockets closed (nothing
   is unregistered), the writer commits what it was told (it commits every 50 ms anyway) and every
   object is dropped. A new core is built from the same database the way ``Core.start`` does it
   (``load_all`` → ``persistence.restore`` → ``service.resume``) at ``--register-rate``;
   ``restore_s`` is the time from opening the database until every instance has had a successful
   REGISTER after the restart (``resume`` keeps unexpired instances ``proxied``, so the state alone
   says nothing).
3. **refresh load** on that restored (never traced) core for ``--duration`` seconds (default: two
   refresh rounds for short expiries, one for long ones: ``rounds × 0.8 × expires + 10``). CPU per
   refresh = this process's CPU time over the phase (SIP, engine, events, trace, storage thread:
   everything) / refresh exchanges completed in it. Punctuality is the engine's own
   ``engine.stats`` (lateness of a refresh's start against its due time, over the restored core's
   life); as a cross-check the exchange wrapper measures the lateness it sees
   (``now - registration.next_refresh_at``, after task start-up) and each refresh's duration.
   Event-loop lag and garbage-collector pauses are recorded too: they are what makes refreshes late.
4. **restore at the configured default** (``--default-rate``, 200/s) the same way, when that takes
   at most ``--max-default-restore`` seconds (N / rate); otherwise the figure is computed as load
   time + N / rate and marked ``restore_default_rate_measured: false``.

stdout gets exactly one JSON line; progress goes to stderr. Exit status: 0; 1 when more than 1 % of
the exchanges failed or instances were left unregistered; 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import cProfile
import gc
import io
import linecache
import logging
import math
import os
import pstats
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# run as bench/proxied_scale.py (as the README does) only bench/ is on sys.path; the package import below
# needs the repository
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import LoopLag, cancel_and_wait, run_main
from contract.events import InstanceEnrolled
from lab.kamailio import LOAD_PASSWORD, Kamailio
from lab.procstat import group_cpu_seconds
from sipis.clock import Clock, SystemClock
from sipis.config import SipConfig
from sipis.crypto import SecretBox, hash_token, load_or_create_key, new_token
from sipis.engine import Exchange, RegistrationEngine
from sipis.events import EventBus
from sipis.instance import Account, AppState, Instance, PushTarget, RegStatus
from sipis.lifecycle import InstanceLifecycle
from sipis.persistence import InstancePersistence
from sipis.proxy_register import ProxyRegistrar
from sipis.service import InstanceService
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.register import RegisterResult
from sipis.sip.resolver import Resolver
from sipis.sip.transport import ListenSpec, TransportName
from sipis.trace import TraceRecorder
from storage.database import Database
from storage.repositories import sqlite_stores
from storage.writer import BatchedWriter, WriterError

log = logging.getLogger("bench.proxied_scale")

GOAL_BYTES_PER_INSTANCE = 4096
GOAL_MAX_LATENESS_S = 1.0
DEFAULT_CASES = "10000:60,100000:600"
CONFIGURED_DEFAULT_RATE = 200.0  # sip.register_rate's default (README, [sip])
MAX_FAILED_FRACTION = 0.01
USER_AGENT = "sipis-console/bench"
REPO = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """The benchmark could not run (as opposed to: it ran and registrations failed)."""


# --------------------------------------------------------------------------- process measurements


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kamailio_cpu(kam: Kamailio) -> float:
    return group_cpu_seconds(kam.pid) if kam.pid is not None else 0.0


def kamailio_version() -> str | None:
    try:
        out = subprocess.run(["kamailio", "-v"], capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return None
    match = re.search(r"kamailio (\S+)", out)
    return match.group(1) if match else None


class GcPauses:
    """Garbage-collector pauses per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self._started = self._started_cpu = 0.0
        self.count = [0, 0, 0]
        self.max = [0.0, 0.0, 0.0]
        self.max_gen2_cpu = 0.0  # CPU time of the longest gen2 pause's thread: wall minus this = starved
        self.total = 0.0

    def reset(self) -> None:
        self.count, self.max, self.total, self.max_gen2_cpu = [0, 0, 0], [0.0, 0.0, 0.0], 0.0, 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started, self._started_cpu = time.perf_counter(), time.thread_time()
            return
        took = time.perf_counter() - self._started
        generation = info.get("generation", 0)
        self.count[generation] += 1
        if generation == 2 and took > self.max[2]:
            self.max_gen2_cpu = time.thread_time() - self._started_cpu
        self.max[generation] = max(self.max[generation], took)
        self.total += took

    def install(self) -> None:
        gc.callbacks.append(self)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self)

    def summary(self) -> dict[str, Any]:
        return {"gen2_collections": self.count[2], "max_gen2_pause_s": round(self.max[2], 4),
                "max_gen2_pause_cpu_s": round(self.max_gen2_cpu, 4),
                "max_pause_s": round(max(self.max), 4), "total_s": round(self.total, 3)}


# --------------------------------------------------------------------------- the exchange probe


@dataclass
class PhaseStats:
    """What the exchange wrapper saw during one phase."""

    exchanges: int = 0
    ok: int = 0
    refreshes: int = 0  # exchanges for an instance whose last registration succeeded
    refreshes_ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    lateness: array.array[float] = field(default_factory=lambda: array.array("d"))
    refresh_durations: array.array[float] = field(default_factory=lambda: array.array("d"))

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


class ExchangeProbe:
    """Wraps the ProxyRegistrar as the engine's exchange: counts outcomes and times refreshes.

    A refresh is an exchange for an instance whose status is ``registered`` (its last REGISTER
    succeeded); its lateness as seen here is ``now - next_refresh_at`` (both wall clock), which
    includes the time the engine's task took to get going.
    """

    def __init__(self, inner: Exchange, clock: Clock) -> None:
        self.inner = inner
        self.clock = clock
        self.phase = PhaseStats()
        self.total = PhaseStats()  # counters only (no samples) over the probe's life

    def begin(self) -> PhaseStats:
        self.phase = PhaseStats()
        return self.phase

    async def __call__(self, instance: Instance, expires: int) -> RegisterResult:
        reg = instance.registration
        refresh = expires > 0 and reg.status is RegStatus.REGISTERED and reg.next_refresh_at is not None
        phase = self.phase
        started = time.perf_counter()
        if refresh:
            assert reg.next_refresh_at is not None
            phase.lateness.append(self.clock.wall() - reg.next_refresh_at)
        result = await self.inner(instance, expires)
        for stats in (phase, self.total):
            stats.exchanges += 1
            if result.ok:
                stats.ok += 1
            else:
                kind = f"{result.status} {result.reason}" + (f" ({result.detail})" if result.detail else "")
                stats.failures[kind[:120]] += 1
                if stats is self.total and stats.failures[kind[:120]] <= 3:
                    log.warning("%s: %s", instance.account.username, kind)
            if refresh:
                stats.refreshes += 1
                stats.refreshes_ok += result.ok
        if refresh:
            phase.refresh_durations.append(time.perf_counter() - started)
        return result


# --------------------------------------------------------------------------- the in-process core


@dataclass
class World:
    """The core's pieces (sipis/core.py without HTTP, ageing and the CLI)."""

    db: Database
    writer: BatchedWriter
    bus: EventBus
    endpoint: SipEndpoint
    registrar: ProxyRegistrar
    probe: ExchangeProbe
    engine: RegistrationEngine
    service: InstanceService
    persistence: InstancePersistence
    trace: TraceRecorder | None
    restored: int
    engine_stop_retries: int = 0


async def open_world(state_dir: Path, host: str, opts: Options, expires: int, rate: float) -> World:
    """Storage, endpoint, registrar, engine, service; restore what the database holds; start."""
    transport, keepalive, trace, freeze = opts.transport, opts.keepalive, opts.trace, opts.gc_freeze
    clock = SystemClock()
    box = SecretBox(load_or_create_key(state_dir / "credentials.key"))
    db = await Database.open(state_dir / "sipis.db")
    stores = sqlite_stores(db)
    bus = EventBus(clock, first_seq=await stores.events.last_seq() + 1)
    writer = BatchedWriter(db, stores)
    writer.start()
    endpoint = SipEndpoint(EndpointSettings(listen=[ListenSpec(transport, host, 0)], user_agent=USER_AGENT,
                                            keepalive_interval=keepalive))
    recorder = TraceRecorder(clock) if trace else None
    if recorder is not None:  # as sipis/core.py: every SIP message into the bounded per-instance trace
        endpoint.observers.append(recorder.observe)
    await endpoint.start()
    registrar = ProxyRegistrar(endpoint, Resolver(clock=clock), user_agent=USER_AGENT)
    probe = ExchangeProbe(registrar, clock)
    engine = RegistrationEngine(probe, bus, clock, SipConfig(register_expires=expires, register_rate=rate))
    registrar.on_flow_lost = engine.flow_lost
    lifecycle = InstanceLifecycle(engine=engine, registrar=registrar, bus=bus, clock=clock)
    persistence = InstancePersistence(writer, box, lifecycle.get, clock)
    service = InstanceService(lifecycle=lifecycle, registrar=registrar, bus=bus, clock=clock,
                              enroll_tokens=("bench-enrol-token",), storage=persistence)
    if recorder is not None:

        def selector_of_user(user: str) -> str | None:
            instance = service.by_contact_user(user)
            return instance.selector if instance is not None else None

        recorder.selector_of_user = selector_of_user
    restored = 0
    for record in await stores.instances.load_all():
        service.resume(persistence.restore(record))
        restored += 1
    persistence.attach(bus)
    engine.start()
    if freeze:  # as Core.start() ends: what start-up built is kept out of the collector's generations
        gc.collect()
        gc.freeze()
    return World(db, writer, bus, endpoint, registrar, probe, engine, service, persistence, recorder, restored)


async def stop_engine(engine: RegistrationEngine) -> int:
    """``engine.stop(unregister=False)``; returns how often its runner had to be cancelled again.

    On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives in the same loop
    iteration as the wake-up it waits for (gh-86296, fixed in 3.12), so ``RegistrationEngine.run``
    keeps looping and ``stop()`` waits for it forever. Cancelling the runner again ends it.
    """
    stopping = asyncio.ensure_future(engine.stop(unregister=False))
    retries = 0
    while True:
        done, _ = await asyncio.wait({stopping}, timeout=0.5)
        if done:
            stopping.result()
            if retries:
                log.warning("engine.stop() hung: its runner swallowed the cancellation (asyncio.wait_for on "
                            "Python 3.11); cancelled it %d more time(s)", retries)
            return retries
        runner: asyncio.Task[None] | None = getattr(engine, "_runner", None)  # private: see the docstring
        if runner is not None and not runner.done():
            runner.cancel()
            retries += 1
        if retries > 100:
            raise BenchError("the registration engine does not stop")


async def crash(world: World, writer_timeout: float = 600.0) -> None:
    """Stop everything without unregistering; the writer still commits what it was told (bounded)."""
    world.engine_stop_retries += await stop_engine(world.engine)
    gc.unfreeze()  # benchmark hygiene: a process that really crashed frees everything anyway
    await world.endpoint.close()
    try:
        await world.writer.close(timeout=writer_timeout)
    except WriterError as exc:
        log.error("crash: %s", exc)
    await world.db.close()


async def close_world(world: World) -> None:
    """End of a case: same as a crash (Kamailio goes away with its bindings anyway)."""
    await crash(world)


def _fresh(text: str) -> str:
    """A new str object with this value: enrolments parse their own copies from JSON."""
    return text.encode().decode()


def make_instance(n: int, kam: Kamailio, transport: TransportName, now: float) -> Instance:
    user = f"load{n:05d}"
    selector = f"{secrets.token_hex(20).upper()}:{secrets.token_hex(4).upper()}"  # Acrobits-shaped
    account = Account(aor=f"sip:{user}@{kam.domain}", username=user, password=_fresh(LOAD_PASSWORD),
                      registrar=_fresh(kam.uri(transport)))
    push = PushTarget(_fresh("fcm"), _fresh("com.example.softphone"), secrets.token_urlsafe(120))  # FCM-sized
    return Instance(selector=selector, account=account, push=push, token_hash=hash_token(new_token()),
                    instance_id=str(uuid.uuid4()), app_last_seen=now, created_at=now)


def enrol_and_sleep(world: World, instance: Instance) -> None:
    """What ``enroll`` + ``set_state(inactive)`` do, minus the API: add, announce, take over."""
    world.service.add(instance)
    world.bus.publish(instance.selector, InstanceEnrolled(instance.account.aor))
    world.service.lifecycle.take_over(instance)


def endpoint_timers(world: World) -> int:
    """Entries in the transaction table's deadline heap: each keeps its transaction (request and response)."""
    return len(world.endpoint.table._heap)


def trace_bytes(world: World, n: int) -> float | None:
    """The trace recorder's own accounting of what it keeps (message bytes + a fixed overhead each)."""
    if world.trace is None:
        return None
    stats = world.trace.stats()
    return round((stats["instance_bytes"] + stats["call_bytes"]) / n, 1)


def count_registered_since(world: World, since: float) -> int:
    n = 0
    for instance in world.service.instances.values():
        reg = instance.registration
        if (instance.state is AppState.PROXIED and reg.status is RegStatus.REGISTERED
                and reg.registered_at is not None and reg.registered_at >= since):
            n += 1
    return n


async def wait_registered(world: World, n: int, since: float, deadline: float, what: str) -> int:
    """Poll until ``n`` instances registered after ``since`` (wall) or ``deadline`` (perf_counter)."""
    last_report = time.perf_counter()
    began = last_report
    done = 0
    while True:
        done = count_registered_since(world, since)
        now = time.perf_counter()
        if done >= n or now >= deadline:
            return done
        if now - last_report >= 10:
            last_report = now
            log.info("%s: %d/%d registered after %.0f s (%.0f/s), %d failed exchanges, writer pending %d",
                     what, done, n, now - began, done / (now - began), world.probe.total.failed,
                     world.writer.pending)
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class Case:
    instances: int
    expires: int


@dataclass
class Options:
    cases: list[Case]
    duration: float | None
    register_rate: float
    default_rate: float
    max_default_restore: float
    transport: TransportName
    keepalive: float
    trace: bool
    gc_freeze: bool
    profile: bool
    tracemalloc_frames: int
    top: int


def refresh_duration(opts: Options, case: Case) -> float:
    if opts.duration is not None:
        return opts.duration
    rounds = 2 if case.expires <= 150 else 1
    return rounds * 0.8 * case.expires + 10.0


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _where(frame_file: str, line: int) -> str:
    try:
        path = str(Path(frame_file).resolve().relative_to(REPO))
    except ValueError:
        path = frame_file.split("/lib/python3", 1)[-1].split("site-packages/", 1)[-1]
    return f"{path}:{line}"


def memory_hot_spots(snapshot: tracemalloc.Snapshot, n: int, top: int) -> list[dict[str, Any]]:
    """The biggest allocation sites (file:line) of the traced span, per instance."""
    spots: list[dict[str, Any]] = []
    for stat in snapshot.statistics("lineno")[:top]:
        frame = stat.traceback[0]
        spots.append({"where": _where(frame.filename, frame.lineno),
                      "code": linecache.getline(frame.filename, frame.lineno).strip()[:100],
                      "bytes_per_instance": round(stat.size / n, 1), "blocks_per_instance": round(stat.count / n, 2)})
    log.info("memory hot spots (tracemalloc, by line, per instance):")
    for spot in spots:
        log.info("  %8.1f B %6.2f blocks  %-32s %s", spot["bytes_per_instance"], spot["blocks_per_instance"],
                 spot["where"], spot["code"])
    by_file = snapshot.statistics("filename")[:top]
    log.info("memory by file (per instance):")
    for stat in by_file:
        log.info("  %8.1f B  %s", stat.size / n, _where(stat.traceback[0].filename, 0).rsplit(":", 1)[0])
    if len(snapshot.statistics("traceback")[0].traceback) > 1:  # --tracemalloc-frames > 1
        for stat in snapshot.statistics("traceback")[:5]:
            log.info("%.1f B per instance allocated at:\n  %s", stat.size / n,
                     "\n  ".join(_where(f.filename, f.lineno) for f in stat.traceback))
    return spots


def print_profile(profiler: cProfile.Profile, top: int) -> None:
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.strip_dirs().sort_stats(key).print_stats(top)
        log.info("cProfile of the refresh phase, by %s:\n%s", key, out.getvalue())


class WriterWatch:
    """The storage writer's backlog (ops queued, not yet committed), sampled twice a second."""

    def __init__(self) -> None:
        self.world: World | None = None
        self.max_pending = 0
        self._task: asyncio.Task[None] | None = None

    def watch(self, world: World) -> None:
        self.world, self.max_pending = world, world.writer.pending

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bench-writer-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.world is not None:
                self.max_pending = max(self.max_pending, self.world.writer.pending)


async def drain_writer(world: World, what: str) -> float:
    """Wait until everything published so far is committed; returns the seconds it took."""
    began, pending = time.perf_counter(), world.writer.pending
    await world.writer.flush()
    took = time.perf_counter() - began
    if took > 1.0:
        log.info("%s: the storage writer needed %.1f s to commit its backlog of %d ops", what, took, pending)
    return took


async def measure_setup(opts: Options, case: Case, kam: Kamailio, world: World, lag: LoopLag,
                        writer: WriterWatch, result: dict[str, Any]) -> None:
    """Phase 1: register all N under tracemalloc; memory per instance just registered and settled."""
    n, rate = case.instances, opts.register_rate
    gc.collect()
    objects0 = len(gc.get_objects())
    rss0 = rss_bytes()
    tracemalloc.start(opts.tracemalloc_frames)
    traced0 = tracemalloc.get_traced_memory()[0]
    own0 = tracemalloc.get_tracemalloc_memory()
    kcpu0, cpu0 = kamailio_cpu(kam), time.process_time()
    setup_wall, began = time.time(), time.perf_counter()
    now = time.time()
    for i in range(1, n + 1):
        enrol_and_sleep(world, make_instance(i, kam, opts.transport, now))
        if i % 500 == 0:
            await asyncio.sleep(0)  # let the engine and the writer run
    log.info("created %d instances in %.1f s; registering at %.0f/s (tracemalloc on: slow)", n,
             time.perf_counter() - began, rate)
    registered = await wait_registered(world, n, setup_wall, began + n / rate * 4 + 300, "setup")
    setup_s = time.perf_counter() - began
    setup_cpu = time.process_time() - cpu0
    result.update({"setup_s": round(setup_s, 1), "setup_per_s": round(registered / setup_s, 1),
                   "setup_cpu_s_per_registration": round(setup_cpu / max(1, registered), 6),
                   "registered": registered,
                   "setup_kamailio_cpu_s_per_registration": round((kamailio_cpu(kam) - kcpu0) / max(1, registered), 6)})
    log.info("setup: %d/%d registered in %.1f s (%.0f/s), cpu %.0f µs per registration (tracemalloc on); "
             "loop lag max %.2f s", registered, n, setup_s, registered / setup_s,
             setup_cpu / max(1, registered) * 1e6, lag.max)
    # "just registered": writer drained, loop quiet, garbage collected
    result["setup_writer_drain_s"] = round(await drain_writer(world, "setup"), 1)
    await asyncio.sleep(1.0)
    await world.writer.flush()
    gc.collect()
    reg_traced, reg_rss, reg_heap = tracemalloc.get_traced_memory()[0], rss_bytes(), endpoint_timers(world)
    # "settled": every transaction of the setup has passed its last timer (64*T1, Timer F), so the
    # endpoint's deadline heap no longer holds them; from here on only refresh traffic does
    settle = world.endpoint.timers.timeout + 1.0
    log.info("just registered: tracemalloc %.0f B per instance, %.2f endpoint timers per instance; "
             "waiting %.0f s for the setup's transactions to end", (reg_traced - traced0) / n, reg_heap / n, settle)
    await asyncio.sleep(settle)
    await world.writer.flush()
    gc.collect()
    traced1 = tracemalloc.get_traced_memory()[0]
    own1 = tracemalloc.get_tracemalloc_memory()
    rss1 = rss_bytes()
    heap1 = endpoint_timers(world)
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    objects1 = len(gc.get_objects())
    full_gc = time.perf_counter()
    gc.collect()
    full_gc = time.perf_counter() - full_gc  # what one gen2 collection stalls the loop for at this size
    rss_raw = rss1 - rss0
    # what one retained transaction costs, from the two points (the heap shrank in between)
    per_tx = (reg_traced - traced1) / (reg_heap - heap1) if reg_heap - heap1 > n / 10 else None
    result.update({
        "bytes_per_instance_tracemalloc": round((traced1 - traced0) / n, 1),
        "bytes_per_instance_rss": round((rss_raw - (own1 - own0)) / n, 1),
        "bytes_per_instance_rss_raw": round(rss_raw / n, 1),
        "endpoint_timers_per_instance": round(heap1 / n, 3),
        "bytes_per_retained_transaction": round(per_tx, 1) if per_tx is not None else None,
        "bytes_per_instance_without_retained_transactions":
            round((traced1 - traced0 - heap1 * per_tx) / n, 1) if per_tx is not None else None,
        "just_registered": {"bytes_per_instance_tracemalloc": round((reg_traced - traced0) / n, 1),
                            "bytes_per_instance_rss_raw": round((reg_rss - rss0) / n, 1),
                            "endpoint_timers_per_instance": round(reg_heap / n, 3)},
        "trace_bytes_per_instance": trace_bytes(world, n),
        "gc_objects_per_instance": round((objects1 - objects0) / n, 1),
        "full_gc_s": round(full_gc, 3),
        "setup_writer_max_pending": writer.max_pending,
        "setup_failures": world.probe.total.failed,
    })
    log.info("memory per instance (settled): tracemalloc %.0f B, RSS %.0f B (raw %.0f B incl. tracemalloc's "
             "own %.0f B); %.2f endpoint timers, %.0f gc-tracked objects per instance, trace store %s B per "
             "instance; a full gc.collect() takes %.2f s", result["bytes_per_instance_tracemalloc"],
             result["bytes_per_instance_rss"], result["bytes_per_instance_rss_raw"], (own1 - own0) / n, heap1 / n,
             (objects1 - objects0) / n, result["trace_bytes_per_instance"], full_gc)
    result["memory_top"] = memory_hot_spots(snapshot, n, opts.top)[:8]
    del snapshot
    gc.collect()


async def restore(opts: Options, case: Case, kam: Kamailio, state_dir: Path, old: World, rate: float,
                  lag: LoopLag, gcp: GcPauses, writer: WriterWatch, key: str,
                  result: dict[str, Any]) -> World:
    """Crash ``old``, build a new core from the database at ``rate``; time until all are registered."""
    n = case.instances
    await crash(old)
    result["engine_stop_hangs"] = result.get("engine_stop_hangs", 0) + (old.engine_stop_retries > 0)
    del old
    gc.collect()
    lag.reset()
    gcp.reset()
    cpu0 = time.process_time()
    restart_wall, began = time.time(), time.perf_counter()
    world = await open_world(state_dir, kam.host, opts, case.expires, rate)
    writer.watch(world)
    load_s = time.perf_counter() - began
    log.info("restart at %.0f/s: %d instances loaded from the database in %.2f s", rate, world.restored, load_s)
    done = await wait_registered(world, n, restart_wall, began + n / rate * 4 + 300, f"restore at {rate:.0f}/s")
    took = time.perf_counter() - began
    cpu = time.process_time() - cpu0
    log.info("restore at %.0f/s: %d/%d registered again in %.1f s (load %.2f s), cpu %.0f µs per registration; "
             "loop lag max %.2f s, gen2 gc max %.2f s, writer backlog max %d", rate, done, n, took, load_s,
             cpu / max(1, done) * 1e6, lag.max, gcp.max[2], writer.max_pending)
    result.update({f"{key}_s": round(took, 2), f"{key}_load_s": round(load_s, 2),
                   f"{key}_registered": done,
                   f"{key}_cpu_s_per_registration": round(cpu / max(1, done), 6),
                   f"{key}_loop_lag_max_s": round(lag.max, 3)})
    result[f"{key}_writer_drain_s"] = round(await drain_writer(world, f"restore at {rate:.0f}/s"), 1)
    result[f"{key}_writer_max_pending"] = writer.max_pending
    return world


async def measure_refreshes(opts: Options, case: Case, kam: Kamailio, world: World, lag: LoopLag,
                            gcp: GcPauses, result: dict[str, Any]) -> None:
    """Phase 3: refresh load on the restored core (never traced) for the configured duration."""
    n, expires = case.instances, case.expires
    duration = refresh_duration(opts, case)
    objects_a = len(gc.get_objects())
    full_gc = time.perf_counter()
    gc.collect()
    full_gc = time.perf_counter() - full_gc
    log.info("refresh phase starts with %d gc-tracked objects in the process; a full gc.collect() takes %.2f s",
             objects_a, full_gc)
    phase = world.probe.begin()
    lag.reset()
    gcp.reset()
    rss_a = rss_bytes()
    kcpu0, cpu0, began = kamailio_cpu(kam), time.process_time(), time.perf_counter()
    profiler = cProfile.Profile() if opts.profile else None
    if profiler is not None:
        profiler.enable()
    log.info("refresh phase: %.0f s (refresh at 50-80 %% of %d s)", duration, expires)
    end = began + duration
    while (left := end - time.perf_counter()) > 0:
        await asyncio.sleep(min(30.0, left))
        stats = world.engine.stats
        log.info("  +%.0f s: %d refreshes (%d ok), engine max lateness %.3f s, %d late > 1 s, "
                 "loop lag max %.3f s, gen2 gc max %.3f s, writer pending %d", time.perf_counter() - began,
                 phase.refreshes, phase.refreshes_ok, stats.max_lateness, stats.late_over_1s, lag.max, gcp.max[2],
                 world.writer.pending)
    if profiler is not None:
        profiler.disable()
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu0
    kcpu = kamailio_cpu(kam) - kcpu0
    refreshes = max(1, phase.refreshes)
    stats = world.engine.stats
    result.update({
        "refresh_phase_s": round(elapsed, 1),
        "refreshes": phase.refreshes,
        "refreshes_ok": phase.refreshes_ok,
        "refreshes_per_s": round(phase.refreshes / elapsed, 1),
        "cpu_s_per_refresh": round(cpu / refreshes, 6),
        "cpu_fraction": round(cpu / elapsed, 3),
        "kamailio_cpu_s_per_refresh": round(kcpu / refreshes, 6),
        "max_refresh_lateness_s": round(stats.max_lateness, 4),
        "late_over_1s": stats.late_over_1s,
        "unpaced_starts": stats.unpaced_starts,
        "observed_max_lateness_s": round(max(phase.lateness, default=0.0), 4),
        "observed_late_over_1s": sum(1 for x in phase.lateness if x > 1.0),
        "refresh_exchange_s": {"p50": round(_pct(phase.refresh_durations, 0.5), 4),
                               "p99": round(_pct(phase.refresh_durations, 0.99), 4),
                               "max": round(max(phase.refresh_durations, default=0.0), 4)},
        "loop_lag_max_s": round(lag.max, 4),
        "loop_lag_over_100ms": lag.over_100ms,
        "gc": gcp.summary(),
        "rss_growth_refresh_phase_bytes_per_instance": round((rss_bytes() - rss_a) / n, 1),
        "refresh_failures": phase.failed,
        "trace_bytes_per_instance_at_end": trace_bytes(world, n),
        "registered_at_end": count_registered_since(world, 0.0),
        "gc_objects": {"start": objects_a, "end": len(gc.get_objects()), "frozen": gc.get_freeze_count(),
                       "full_gc_s_at_start": round(full_gc, 3)},
        "kamailio_contacts": kam.contact_count(),
    })
    log.info("refresh phase: %d refreshes in %.0f s (%.1f/s), cpu %.0f µs per refresh (%.0f %% of a core), "
             "kamailio %.0f µs; engine max lateness %.3f s, %d late > 1 s (of %d unpaced starts); "
             "refresh exchange p99 %.3f s; loop lag max %.3f s; gen2 gc %d, max %.3f s", phase.refreshes, elapsed,
             phase.refreshes / elapsed, cpu / refreshes * 1e6, cpu / elapsed * 100, kcpu / refreshes * 1e6,
             stats.max_lateness, stats.late_over_1s, stats.unpaced_starts, result["refresh_exchange_s"]["p99"],
             lag.max, gcp.count[2], gcp.max[2])
    if profiler is not None:
        print_profile(profiler, opts.top * 2)


async def run_case(opts: Options, case: Case, kam: Kamailio, state_dir: Path) -> dict[str, Any]:
    """Setup (memory) → crash → restore at --register-rate → refresh load → crash → restore at the default."""
    n, rate = case.instances, opts.register_rate
    result: dict[str, Any] = {"instances": n, "expires": case.expires, "transport": opts.transport,
                              "register_rate": rate, "keepalive_s": opts.keepalive, "trace": opts.trace,
                              "gc_freeze": opts.gc_freeze}
    lag, gcp, writer = LoopLag(0.05), GcPauses(), WriterWatch()
    lag.start()
    writer.start()
    gcp.install()
    world: World | None = None
    try:
        world = await open_world(state_dir, kam.host, opts, case.expires, rate)
        writer.watch(world)
        await measure_setup(opts, case, kam, world, lag, writer, result)
        failures, exchanges = world.probe.total.failures.copy(), world.probe.total.exchanges

        world = await restore(opts, case, kam, state_dir, world, rate, lag, gcp, writer, "restore", result)
        await measure_refreshes(opts, case, kam, world, lag, gcp, result)
        failures.update(world.probe.total.failures)
        exchanges += world.probe.total.exchanges

        default_measured = n / opts.default_rate <= opts.max_default_restore
        if default_measured and opts.default_rate != rate:
            world = await restore(opts, case, kam, state_dir, world, opts.default_rate, lag, gcp, writer,
                                  "restore_default_rate", result)
            failures.update(world.probe.total.failures)
            exchanges += world.probe.total.exchanges
        elif opts.default_rate == rate:
            result["restore_default_rate_s"] = result["restore_s"]
        else:  # N / rate plus the load time: the pacing is the bottleneck at 200/s (see restore_cpu_*)
            result["restore_default_rate_s"] = round(result["restore_load_s"] + n / opts.default_rate, 1)
        result["default_rate"] = opts.default_rate
        result["restore_default_rate_measured"] = default_measured
        result["kamailio_contacts_after_restore"] = kam.contact_count()
        result["exchanges"] = exchanges
        result["failures"] = sum(failures.values())
        result["failure_kinds"] = dict(failures.most_common(5))
        return result
    finally:
        if world is not None:  # after a failure this may be one restore() already crashed: no harm
            with contextlib.suppress(Exception):
                await close_world(world)
            result["engine_stop_hangs"] = result.get("engine_stop_hangs", 0) + (world.engine_stop_retries > 0)
        gcp.remove()
        await lag.stop()
        await writer.stop()
        if tracemalloc.is_tracing():
            tracemalloc.stop()


def case_budget(opts: Options, case: Case) -> float:
    """Seconds after which a case is abandoned (every wait in it has its own, smaller deadline)."""
    n = case.instances
    waits = (n / opts.register_rate * 4 + 300) * 2 + n / opts.default_rate * 4 + 300
    return waits + refresh_duration(opts, case) + 1800


def git_state() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
    except OSError:
        return None
    return out or None


def kamailio_problems(kam: Kamailio) -> list[str]:
    lines = [line for line in kam.log_text().splitlines()
             if re.search(r"\b(ERROR|CRITICAL|ALERT|BUG)\b|out of memory|no more (shm|pkg)", line)]
    return lines


def run_benchmark(opts: Options) -> tuple[dict[str, Any], bool]:
    began = time.perf_counter()
    cases: list[dict[str, Any]] = []
    within_limits = True
    for case in opts.cases:
        shm = max(256, math.ceil(case.instances * 8 / 1024))  # ~8 KiB per instance: bindings, restores, tm
        log.info("case %d instances, expires %d s: kamailio shm %d MB", case.instances, case.expires, shm)
        state_dir = Path(tempfile.mkdtemp(prefix="bench-proxied-"))
        try:
            with Kamailio(children=4, tcp_children=4, shm_mb=shm, pkg_mb=16,
                          min_expires=min(60, case.expires), max_expires=max(3600, case.expires),
                          default_expires=case.expires) as kam:
                log.info("kamailio on %s, pid %s", kam.target(), kam.pid)
                started = time.perf_counter()
                result = asyncio.run(asyncio.wait_for(run_case(opts, case, kam, state_dir), case_budget(opts, case)))
                problems = kamailio_problems(kam)
                result["kamailio_errors"] = len(problems)
                for line in problems[:10]:
                    log.warning("kamailio: %s", line[:300])
                if not kam.running:
                    log.error("kamailio is not running any more")
                    result["kamailio_died"] = True
                result["case_runtime_s"] = round(time.perf_counter() - started, 1)
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)
        cases.append(result)
        unregistered = case.instances - min(result["registered"], result.get("restore_registered", 0))
        if result["failures"] > MAX_FAILED_FRACTION * max(1, result["exchanges"]) or unregistered > 0:
            within_limits = False
    meets = all(c["bytes_per_instance_tracemalloc"] <= GOAL_BYTES_PER_INSTANCE
                and c["max_refresh_lateness_s"] <= GOAL_MAX_LATENESS_S and c["late_over_1s"] == 0
                for c in cases)
    doc: dict[str, Any] = {
        "benchmark": "proxied_scale",
        "cases": cases,
        "goals": {"bytes_per_instance": GOAL_BYTES_PER_INSTANCE, "max_lateness_s": GOAL_MAX_LATENESS_S},
        "meets_goals": meets,
        "failures": sum(c["failures"] for c in cases),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "kamailio": kamailio_version(),
        "git": git_state(),
        "runtime_s": round(time.perf_counter() - began, 1),
    }
    return doc, within_limits


# --------------------------------------------------------------------------- CLI


def _parse_cases(text: str) -> list[Case]:
    cases: list[Case] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        count, sep, expires = item.partition(":")
        try:
            case = Case(int(count.replace("_", "")), int(expires) if sep else 600)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not INSTANCES:EXPIRES: {item!r}") from None
        if case.instances < 1 or case.expires < 1:
            raise argparse.ArgumentTypeError(f"instances and expires must be >= 1: {item!r}")
        cases.append(case)
    if not cases:
        raise argparse.ArgumentTypeError("no cases")
    return cases


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="proxied_scale",
        description="N proxied instances against one Kamailio: memory per instance, CPU per refresh, refresh "
                    "lateness, restore time after a crash; prints one JSON line.")
    parser.add_argument("--cases", type=_parse_cases, default=_parse_cases(DEFAULT_CASES),
                        help=f"comma-separated INSTANCES:EXPIRES (seconds asked for) (default {DEFAULT_CASES})")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of the refresh phase per case (default: 2 refresh rounds for expiries "
                             "<= 150 s, 1 round otherwise: rounds x 0.8 x expires + 10)")
    parser.add_argument("--register-rate", type=float, default=2000.0,
                        help="pacing (new REGISTERs per second) for setup and the measured restore (default 2000)")
    parser.add_argument("--default-rate", type=float, default=CONFIGURED_DEFAULT_RATE,
                        help="the configured default register_rate whose restore time is also reported "
                             "(default 200)")
    parser.add_argument("--max-default-restore", type=float, default=120.0,
                        help="measure the restore at --default-rate only when N / rate is at most this many "
                             "seconds, otherwise compute it (default 120)")
    parser.add_argument("--transport", choices=("tcp", "udp"), default="tcp",
                        help="to the registrar: tcp (one connection for all, default) or udp (one socket)")
    parser.add_argument("--keepalive", type=float, default=30.0,
                        help="CRLF keep-alive interval on TCP flows in seconds, 0 = off (default 30, the "
                             "configured default)")
    parser.add_argument("--no-trace", dest="trace", action="store_false",
                        help="leave out the SIP trace recorder the core attaches to the endpoint "
                             "(to see its share of memory and CPU)")
    parser.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                        help="leave out the gc.collect() + gc.freeze() that Core.start() ends with")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the refresh phase and print the top functions to stderr (slows it down)")
    parser.add_argument("--tracemalloc-frames", type=int, default=1,
                        help="frames kept per allocation by tracemalloc (default 1)")
    parser.add_argument("--top", type=int, default=15, help="lines of memory/profile hot spots (default 15)")
    ns = parser.parse_args(argv)
    if ns.duration is not None and ns.duration < 0:
        parser.error("--duration must be >= 0")
    if ns.register_rate <= 0 or ns.default_rate <= 0:
        parser.error("rates must be > 0")
    if ns.tracemalloc_frames < 1 or ns.top < 1:
        parser.error("--tracemalloc-frames and --top must be >= 1")
    return Options(ns.cases, ns.duration, ns.register_rate, ns.default_rate, ns.max_default_restore,
                   ns.transport, ns.keepalive, ns.trace, ns.gc_freeze, ns.profile, ns.tracemalloc_frames, ns.top)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    for name in ("sipis.sip.transport", "sipis.proxy_register"):  # lost flows and why: rare, and they matter
        logging.getLogger(name).setLevel(logging.INFO)
    return run_main("proxied_scale", log, lambda: run_benchmark(opts),
                    unavailable="kamailio not found" if shutil.which("kamailio") is None else None)


if __name__ == "__main__":
    sys.exit(main())
