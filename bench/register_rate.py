"""Benchmark: REGISTER rate with digest through our SIP layer vs. sipp, against one Kamailio.

One Kamailio (``lab.kamailio``) serves both clients in the same run. Per transport (UDP, TCP) and
repeat, our layer and sipp each register ``--users`` fresh load users (REGISTER, 401, REGISTER with
MD5 digest, 200), ``--concurrency`` registrations in flight at a time (a closed loop: a new one
starts when one ends; sipp ``-users``). Over TCP both use one connection for all users (sipp
``-t t1``); over UDP one socket (sipp ``-t u1``). The order alternates per repeat (ours first, then
sipp first) and the figures are medians; the ratio is the median of the per-repeat ours/sipp ratios.

Every measurement gets its own user range (load00001... counting up), so every registration is an
initial one (a new binding in Kamailio's location table), never a refresh.

Measured per side: wall time from start (sipp: spawn; ours: creating the endpoint) to the end
(sipp: exit; ours: endpoint closed), CPU seconds of the client (sipp: its rusage; ours:
``time.process_time()`` of this process) and Kamailio's CPU seconds (its process group, from /proc).
Successes are counted per registration: sipp's ``SuccessfulCall(C)`` statistic, ours
``RegisterResult.ok``. Retransmissions (UDP) are reported because one lost datagram costs a 500 ms
timer and dominates a short run.

sipp runs without ``-trace_msg`` (message tracing costs it ~40 % CPU) and with a 1 MB socket buffer
(``-buff_size``): with sipp's default 64 KB its own UDP socket drops replies under this load and
its rate falls to ~3.5k/s. That is sipp at full speed, which is the peer the goal refers to.

stdout gets exactly one JSON line; progress goes to stderr. Exit status: 0, 1 when more than 1 % of
either side's registrations failed, 2 when the benchmark could not run (no Kamailio, no sipp).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.kamailio import LOAD_PASSWORD, Kamailio, free_port, guarded_argv, kill_group
from lab.procstat import group_cpu_seconds
from lab.sipp import load_user, parse_stat_csv, scenario, write_users_csv
from sipis.sip import IMPLEMENTATION as SIP_IMPLEMENTATION
from sipis.sip.digest import Credentials
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.message import SipURI
from sipis.sip.register import Binding, register
from sipis.sip.transport import ListenSpec, TransportName

log = logging.getLogger("bench.register_rate")

GOAL_RATIO = 0.5
MAX_FAILED_FRACTION = 0.01
EXPIRES = 3600
SIPP_BUFFER = 1 << 20
SIPP_MODES = {"udp": "u1", "tcp": "t1"}


@dataclass
class Measurement:
    """One side's run of ``attempted`` registrations."""

    side: str  # "ours" or "sipp"
    transport: str
    attempted: int
    successful: int
    elapsed: float
    cpu_seconds: float
    retransmissions: int
    kamailio_cpu_seconds: float

    @property
    def failed(self) -> int:
        return self.attempted - self.successful

    @property
    def rate(self) -> float:
        return self.successful / self.elapsed if self.elapsed > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.side:4} {self.transport}: {self.successful}/{self.attempted} ok in "
                f"{self.elapsed:.3f} s = {self.rate:.0f}/s, cpu {self.cpu_seconds:.3f} s, "
                f"kamailio cpu {self.kamailio_cpu_seconds:.2f} s, retrans {self.retransmissions}")


class BenchError(RuntimeError):
    """The benchmark could not run (as opposed to: it ran and registrations failed)."""


# --------------------------------------------------------------------------- Kamailio CPU


def kamailio_cpu(kam: Kamailio) -> float:
    return group_cpu_seconds(kam.pid) if kam.pid is not None else 0.0


# --------------------------------------------------------------------------- our layer


def _binding(kam: Kamailio, user: str, registrar: SipURI | None = None) -> Binding:
    """One load user's binding; ``registrar`` is shared by all of them (one PBX), parsed once."""
    return Binding(
        aor=SipURI.parse(f"sip:{user}@{kam.domain}"),
        registrar=registrar if registrar is not None else SipURI.parse(f"sip:{kam.host}"),
        credentials=Credentials(user, LOAD_PASSWORD),
        contact_user=user,
    )


@dataclass
class _Tally:
    successful: int = 0
    sent: int = 0  # requests put on the wire, retransmissions included
    failures: list[str] = field(default_factory=list)


async def _register_ours(kam: Kamailio, transport: TransportName, first: int, users: int,
                         concurrency: int, tally: _Tally) -> None:
    """Register users ``first``.. through one endpoint, ``concurrency`` workers pulling users."""
    ep = SipEndpoint(EndpointSettings(listen=[ListenSpec.parse(f"udp:{kam.host}:0")]))
    await ep.start()
    try:
        # TCP: one connection for everybody (the flow table hands every registration the same one)
        flow = await ep.transport.flow_to(transport, kam.host, kam.port(transport))
        numbers: Iterator[int] = iter(range(first, first + users))  # shared by all workers
        registrar = SipURI.parse(f"sip:{kam.host}")  # one PBX for all: parsed once

        async def worker() -> None:
            for n in numbers:
                user = load_user(n)
                try:
                    result = await register(ep, _binding(kam, user, registrar), flow, EXPIRES)
                except Exception as exc:  # count it, keep the load going
                    tally.failures.append(f"{user}: {type(exc).__name__}: {exc}")
                    continue
                if result.ok:
                    tally.successful += 1
                else:
                    tally.failures.append(f"{user}: {result.status} {result.reason} {result.detail}")

        await asyncio.gather(*(worker() for _ in range(min(concurrency, users))))
    finally:
        tally.sent = ep.transport.stats["sent"]
        await ep.close()


def run_ours(kam: Kamailio, transport: TransportName, first: int, users: int, concurrency: int,
             timeout: float) -> Measurement:
    tally = _Tally()
    kam_cpu = kamailio_cpu(kam)
    cpu, started = time.process_time(), time.perf_counter()
    try:
        asyncio.run(asyncio.wait_for(
            _register_ours(kam, transport, first, users, concurrency, tally), timeout))
    except TimeoutError:
        log.error("ours %s: not done within %.0f s", transport, timeout)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    for line in tally.failures[:5]:
        log.warning("ours %s failed: %s", transport, line)
    # every registration sends two REGISTERs (plain, then with digest); more is retransmission
    retrans = max(0, tally.sent - 2 * users)
    return Measurement("ours", transport, users, tally.successful, elapsed, cpu, retrans,
                       kamailio_cpu(kam) - kam_cpu)


# --------------------------------------------------------------------------- sipp


def sipp_argv(kam: Kamailio, transport: str, users: int, concurrency: int, local_port: int,
              workdir: Path, csv: Path, timeout: float) -> list[str]:
    sipp = shutil.which("sipp")
    if sipp is None:
        raise BenchError("sipp not found (Debian package sip-tester)")
    return [
        sipp, kam.target(transport), "-sf", str(scenario("uac_register")), "-s", "load",
        "-t", SIPP_MODES[transport], "-i", kam.host, "-p", str(local_port), "-nostdin",
        "-m", str(users), "-users", str(concurrency), "-buff_size", str(SIPP_BUFFER),
        "-inf", str(csv), "-key", "expires", str(EXPIRES), "-default_behaviors", "-bye",
        "-trace_stat", "-stf", str(workdir / "stat.csv"), "-fd", "3600",
        "-trace_err", "-error_file", str(workdir / "errors.log"),
        "-timeout", f"{max(1, round(timeout))}s", "-timeout_error",
    ]


def run_sipp(kam: Kamailio, transport: str, first: int, users: int, concurrency: int,
             timeout: float) -> Measurement:
    workdir = Path(tempfile.mkdtemp(prefix="bench-sipp-"))
    csv = write_users_csv(workdir / "users.csv",
                          ((load_user(n), LOAD_PASSWORD) for n in range(first, first + users)))
    for _attempt in range(3):  # a port taken between free_port() and sipp's bind: try another
        argv = sipp_argv(kam, transport, users, concurrency,
                         free_port(kam.host, udp=True, tcp=transport == "tcp"), workdir, csv, timeout)
        kam_cpu = kamailio_cpu(kam)
        started = time.perf_counter()
        with (workdir / "stdout.txt").open("wb") as out, (workdir / "stderr.txt").open("wb") as err:
            proc = subprocess.Popen(guarded_argv(argv, thread_bound=False), cwd=workdir,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        killer = threading.Timer(timeout + 10, kill_group, (proc.pid,))
        killer.start()
        try:
            _, status, rusage = os.wait4(proc.pid, 0)  # this child's own CPU time
        except BaseException:
            kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        stats_file = workdir / "stat.csv"
        stats = parse_stat_csv(stats_file.read_text()) if stats_file.exists() else {}
        if stats:
            break
        stderr = (workdir / "stderr.txt").read_text(errors="replace")
        log.warning("sipp exited %d without statistics: %s", proc.returncode, stderr.strip()[-500:])
    else:
        raise BenchError(f"sipp did not run; see {workdir}")
    successful = _stat(stats, "SuccessfulCall(C)")
    if successful < users:
        errors = workdir / "errors.log"
        log.warning("sipp %s: exit %d, %d of %d ok; errors in %s", transport, proc.returncode,
                    successful, users, errors)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return Measurement("sipp", transport, users, successful, elapsed,
                       rusage.ru_utime + rusage.ru_stime, _stat(stats, "Retransmissions(C)"),
                       kamailio_cpu(kam) - kam_cpu)


def _stat(stats: dict[str, str], key: str) -> int:
    try:
        return int(stats.get(key, "0"))
    except ValueError:
        return 0


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Options:
    users: int
    repeats: int
    concurrency: int
    transports: list[TransportName]
    warmup: int
    timeout: float
    ours_only: bool = False


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="register_rate",
        description="REGISTER-with-digest rate of our SIP layer vs. sipp against one Kamailio; "
                    "prints one JSON line.")
    parser.add_argument("--users", type=int, default=2000,
                        help="registrations per measurement, each a fresh user (default 2000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per side and transport, alternating ours/sipp (default 3)")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="registrations in flight at a time, ours and sipp's -users (default 100)")
    parser.add_argument("--transports", default="udp,tcp",
                        help="comma-separated subset of udp,tcp (default udp,tcp)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="unmeasured registrations per side and transport first (default 200)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one measurement may take (default 300)")
    parser.add_argument("--ours-only", action="store_true",
                        help="run our side only (no sipp, no ratio): for profiling, e.g. counting "
                             "instructions under valgrind --tool=callgrind")
    ns = parser.parse_args(argv)
    transports = [t.strip().lower() for t in ns.transports.split(",") if t.strip()]
    bad = [t for t in transports if t not in SIPP_MODES]
    if bad or not transports:
        parser.error(f"--transports: use udp and/or tcp, not {','.join(bad) or 'nothing'}")
    for name in ("users", "repeats", "concurrency"):
        if getattr(ns, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if ns.warmup < 0 or ns.timeout <= 0:
        parser.error("--warmup must be >= 0 and --timeout > 0")
    return Options(ns.users, ns.repeats, ns.concurrency, transports,  # type: ignore[arg-type]
                   ns.warmup, ns.timeout, ns.ours_only)


def _median(values: Sequence[float], digits: int) -> float:
    return round(statistics.median(values), digits) if values else 0.0


def summarize(ours: list[Measurement], sipp: list[Measurement]) -> dict[str, Any]:
    """Medians of one transport's measurements (``ours[i]`` and ``sipp[i]`` ran back to back)."""
    # with --ours-only there are no sipp runs, hence no ratios
    ratios = [o.rate / s.rate for o, s in zip(ours, sipp, strict=False) if s.rate > 0]
    ours_failed = sum(m.failed for m in ours)
    sipp_failed = sum(m.failed for m in sipp)
    return {
        "ours_per_s": _median([m.rate for m in ours], 1),
        "sipp_per_s": _median([m.rate for m in sipp], 1),
        "ratio": _median(ratios, 3),
        "ours_cpu_s_per_reg": _median([m.cpu_seconds / max(1, m.successful) for m in ours], 6),
        "sipp_cpu_s_per_reg": _median([m.cpu_seconds / max(1, m.successful) for m in sipp], 6),
        "kamailio_cpu_s_per_reg": {
            "ours": _median([m.kamailio_cpu_seconds / max(1, m.successful) for m in ours], 6),
            "sipp": _median([m.kamailio_cpu_seconds / max(1, m.successful) for m in sipp], 6),
        },
        "retransmissions": {"ours": sum(m.retransmissions for m in ours),
                            "sipp": sum(m.retransmissions for m in sipp)},
        "failures": ours_failed + sipp_failed,
        "ours_failures": ours_failed,
        "sipp_failures": sipp_failed,
        "runs_per_s": {"ours": [round(m.rate, 1) for m in ours],
                       "sipp": [round(m.rate, 1) for m in sipp]},
    }


def run_benchmark(opts: Options) -> tuple[dict[str, Any], bool]:
    """Run everything; returns the JSON document and whether failures stayed within 1 %."""
    began = time.perf_counter()
    cursor = 1  # every measurement (warm-up included) registers its own range of fresh users

    def fresh_users(count: int) -> int:
        nonlocal cursor
        first, cursor = cursor, cursor + count
        return first

    result: dict[str, Any] = {"benchmark": "register_rate", "users": opts.users,
                              "repeats": opts.repeats, "concurrency": opts.concurrency,
                              # compiled (scripts/compile) or Python (SIPIS_PURE_PYTHON=1)
                              "sip_layer": "compiled" if SIP_IMPLEMENTATION.compiled else "python"}
    within_limits = True
    with Kamailio(children=4, tcp_children=4, shm_mb=256, pkg_mb=16,
                  max_expires=EXPIRES, default_expires=EXPIRES) as kam:
        log.info("kamailio on %s (udp+tcp), pid %s", kam.target(), kam.pid)
        for transport in opts.transports:
            if opts.warmup:
                run_ours(kam, transport, fresh_users(opts.warmup), opts.warmup, opts.concurrency,
                         opts.timeout)
                if not opts.ours_only:
                    run_sipp(kam, transport, fresh_users(opts.warmup), opts.warmup, opts.concurrency,
                             opts.timeout)
            ours: list[Measurement] = []
            bindings_match = True
            sipp: list[Measurement] = []
            for repeat in range(opts.repeats):
                order = ("ours", "sipp") if repeat % 2 == 0 else ("sipp", "ours")
                for side in order:
                    if side == "sipp" and opts.ours_only:
                        continue
                    first = fresh_users(opts.users)
                    before = kam.contact_count()
                    if side == "ours":
                        m = run_ours(kam, transport, first, opts.users, opts.concurrency, opts.timeout)
                        ours.append(m)
                    else:
                        m = run_sipp(kam, transport, first, opts.users, opts.concurrency, opts.timeout)
                        sipp.append(m)
                    log.info("[%d/%d] %s", repeat + 1, opts.repeats, m.describe())
                    # cross-check the client's count against the registrar's location table
                    added = kam.contact_count() - before
                    if added != m.successful:
                        log.warning("%s %s: %d successes but %d new bindings in Kamailio",
                                    side, transport, m.successful, added)
                        bindings_match = False
            summary = summarize(ours, sipp)
            summary["bindings_match"] = bindings_match
            result[transport] = summary
            limit = MAX_FAILED_FRACTION * opts.users * opts.repeats
            if summary["ours_failures"] > limit or summary["sipp_failures"] > limit:
                within_limits = False
    ratios = [result[t]["ratio"] for t in opts.transports]
    result.update({
        "goal_ratio": GOAL_RATIO,
        "meets_goal": None if opts.ours_only else all(r >= GOAL_RATIO for r in ratios),
        "failures": sum(result[t]["failures"] for t in opts.transports),
        "failures_within_1pct": within_limits,
        "cpus": os.cpu_count(),
        "runtime_s": round(time.perf_counter() - began, 1),
    })
    return result, within_limits


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    log.info("%s", SIP_IMPLEMENTATION.describe())
    try:
        result, within_limits = run_benchmark(opts)
    except Exception as exc:  # Kamailio/sipp missing or broken: say so in the one JSON line
        log.exception("benchmark could not run")
        print(json.dumps({"benchmark": "register_rate", "error": f"{type(exc).__name__}: {exc}"}))
        return 2
    print(json.dumps(result, separators=(",", ":")))
    return 0 if within_limits else 1


if __name__ == "__main__":
    sys.exit(main())
