"""Benchmark: 3 nodes on one PostgreSQL against one Kamailio: failover, double bindings, database cost.

One Kamailio (``lab.kamailio``), one throwaway PostgreSQL (``lab.postgres``) and four real cores
(``sipis-console serve`` as child processes, ``lab.core_process``): nodes ``c-1``…``c-3`` on
PostgreSQL sharing one key file, and ``solo`` on embedded SQLite with a third of the instances, for
comparison in the same run. N proxied instances (``loadNNNNNNN``, all asleep) are written straight
into PostgreSQL before the nodes start (encrypted as the core does), N/3 into solo's SQLite.

Phases:

1. **start**: the nodes claim and register everything (paced by ``--register-rate``); done when
   Kamailio holds N + N/3 bindings.
2. **steady state** for ``--window`` seconds (default 60; with ``register_expires`` 60 the nodes refresh at 30-48 s,
   so the window holds at least one refresh round): ``pg_stat_database`` (transactions, tuples read/written) before
   and after gives queries per second per 10k instances; each core's CPU (``/proc``) over the window / its REGISTER
   exchanges (``sipis_registrations_total`` on its metrics listener) gives CPU per refresh, per node and for solo.
   ``pg_total_relation_size`` of ``instances`` / N: bytes per instance.
3. **failover**: ``kill -9`` of ``c-2``. Before the kill, a random sample (``--sample``, 200) of its
   AORs is looked up at Kamailio (kamcmd cannot dump a big location table) and each binding's CSeq
   epoch (CSeq >> 16, ``sipis.sip.register.EPOCH_SHIFT``) noted. A new owner registers with a higher
   epoch (same Call-ID, CSeq keeps growing), so a sampled AOR has moved when its binding's epoch is
   higher than before the kill (the Contact's host:port says nothing: over TCP it may be the flow's
   local port). Every 2 s: the sample at Kamailio, and in PostgreSQL how many of c-2's instances are
   still owned by c-2 or not yet in a higher epoch (all of them, not a sample). ``failover_s`` is
   the time from the kill until both are done (``claimed_s``: PostgreSQL alone). Each poll counts
   sampled AORs holding more than one binding for one ``+sip.instance`` (double bindings, goal 0);
   the maximum is reported, and the steady-state phase runs the same check once.

**Scale run** (``--scale N[,N...]``): one Kamailio (shm ``--kamailio-shm-mb``), one PostgreSQL and one
``sipis-console serve --workers W`` (``--workers``, default 2). The workers start on an empty database
(baseline RSS, Kamailio's shm in use), then N instances are written into PostgreSQL and the workers claim and
register them at ``register_rate`` each (``--scale-rate``). After all are bound: memory per instance (the
workers' summed RSS increase / N, Kamailio's shm increase / N); then, once refreshes have begun (half the
expiry after the first REGISTER), for ``--window`` seconds CPU per refresh (the workers' CPU / their REGISTER
exchanges; Kamailio's CPU too) and punctuality: the workers' ``sipis_event_loop_lag_seconds`` (max over 1 s
scrapes) and, as the registrar sees it, a sample of bindings polled every second: a binding whose remaining
expiry drops below ``(1 - refresh_max) × expires`` is that much later than its refresh's latest due time
(``max_lateness_pbx_s``; resolution 1 s: Kamailio counts in seconds; ``sample_lapsed``: polls that found a
sampled AOR without any binding). Sizes run in order; the run stops at the first one that fails (time-outs,
memory above ``--max-rss-gb``).

stdout gets exactly one JSON line; progress goes to stderr. Exit status: 0; 1 when the failover did
not complete within ``lease_ttl`` + moved / ``register_rate`` + 60 s or a double binding was seen
(scale run: when a size did not complete); 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import httpx

from bench._common import run_main
from lab.core_process import CoreProcess
from lab.kamailio import LOAD_PASSWORD, Kamailio, KamailioError, UlContact, free_port
from lab.postgres import PostgresServer, postgres_bin
from lab.procstat import group_cpu_seconds, process_cpu_seconds
from sipis.clock import SystemClock
from sipis.core import DB_FILE
from sipis.crypto import SecretBox, hash_token, load_or_create_key, new_token
from sipis.instance import Account, AppState, Instance, PushTarget
from sipis.persistence import InstancePersistence
from sipis.sip.register import EPOCH_SHIFT
from storage.database import Database
from storage.pg_repositories import pg_stores
from storage.postgres import PgDatabase
from storage.repositories import sqlite_stores

log = logging.getLogger("bench.cluster")

NODES = ("c-1", "c-2", "c-3")
VICTIM = "c-2"
BATCH = 2000
#: [sip] refresh_max's default: a refresh is due at the latest this fraction into the granted expiry
REFRESH_MAX = 0.8


def instances(first: int, count: int, kam: Kamailio) -> list[Instance]:
    now = time.time()
    made = []
    for n in range(first, first + count):
        user = f"load{n:07d}"
        made.append(Instance(
            selector=uuid.uuid4().hex.upper(), account=Account(
                aor=f"sip:{user}@{kam.domain}", username=user, password=LOAD_PASSWORD, registrar=kam.uri("tcp")),
            push=PushTarget("mediator", "com.example.softphone", uuid.uuid4().hex * 3),
            token_hash=hash_token(new_token()), app_last_seen=now, created_at=now, state=AppState.PROXIED))
    return made


async def seed(url: str | None, sqlite: Path | None, key_file: Path, made: list[Instance]) -> None:
    """Write the instances as the core stores them (password encrypted with the shared key)."""
    box = SecretBox(load_or_create_key(key_file))
    persistence = InstancePersistence(cast(Any, None), box, lambda _: None, SystemClock())
    records = [persistence.record(i) for i in made]
    if url is not None:
        db: PgDatabase | Database = await PgDatabase.open(url)
        stores = pg_stores(cast(PgDatabase, db), "seed")
    else:
        assert sqlite is not None
        sqlite.parent.mkdir(parents=True, exist_ok=True)
        db = await Database.open(sqlite)
        stores = sqlite_stores(db)
    try:
        for k in range(0, len(records), BATCH):
            await stores.instances.upsert_many(records[k:k + BATCH])
    finally:
        await db.close()


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def registrations(metrics_port: int) -> float:
    """REGISTER exchanges the node has ended (``sipis_registrations_total``, every label set)."""
    found = re.findall(r"^sipis_registrations_total\{[^}]*\} (\S+)$", scrape(metrics_port), re.M)
    if not found:
        raise RuntimeError(f"no sipis_registrations_total on :{metrics_port}")
    return sum(float(m) for m in found)


def loop_lag(metrics_port: int) -> float:
    found = re.search(r"^sipis_event_loop_lag_seconds(?:\{[^}]*\})? (\S+)$", scrape(metrics_port), re.M)
    return float(found.group(1)) if found else 0.0


def lookup(kam: Kamailio, users: Sequence[str]) -> dict[str, list[UlContact]]:
    return {user: bindings_of(kam, user) for user in users}


def bindings_of(kam: Kamailio, user: str) -> list[UlContact]:
    try:
        return kam.ul_lookup(user)
    except KamailioError as exc:  # its binding expired: Kamailio keeps the AOR a while, empty
        if "no contacts" in str(exc):
            return []
        raise


def doubles(bound: dict[str, list[UlContact]]) -> int:
    """AORs holding more than one binding for one ``+sip.instance``."""
    return sum(max(Counter(c["instance"] for c in contacts).values(), default=0) > 1 for contacts in bound.values())


def epoch(contacts: list[UlContact]) -> int:
    """The highest CSeq epoch among an AOR's bindings (-1: none)."""
    return max(((c["cseq"] or 0) >> EPOCH_SHIFT for c in contacts), default=-1)


def pg_counters(server: PostgresServer, database: str) -> dict[str, int]:
    row = server.psql("SELECT xact_commit + xact_rollback, tup_returned + tup_fetched, "
                      "tup_inserted + tup_updated + tup_deleted FROM pg_stat_database "
                      f"WHERE datname = '{database}'")
    xacts, read, written = (int(v) for v in row.split("|"))
    return {"xacts": xacts, "tuples_read": read, "tuples_written": written}


def wait(predicate: Any, timeout: float, what: str, every: float = 2.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of all live processes in process group ``pgid`` (Linux /proc)."""
    pages = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[2]) == pgid:
                pages += int(Path(entry.path, "statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return pages * os.sysconf("SC_PAGE_SIZE")


def shm_used(kam: Kamailio) -> int:
    found = re.search(r"real_used:\s*(\d+)", kam.kamcmd("core.shmmem"))
    return int(found.group(1)) if found else 0


def run(opts: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    work = Path(tempfile.mkdtemp(prefix="bc-", dir="/tmp"))
    kam = Kamailio(shm_mb=max(64, opts.instances // 100), children=2, tcp_children=4, ctl_max_kb=65536,
                   min_expires=min(60, opts.expires))
    pg = PostgresServer()
    cores: dict[str, CoreProcess] = {}
    try:
        kam.start()
        pg.start()
        url = pg.create_database("bench")
        database = url.rsplit("/", 1)[1]
        key_file = work / "credentials.key"
        n, solo_n = opts.instances, opts.instances // 3
        log.info("seeding %d instances in PostgreSQL, %d in solo's SQLite", n, solo_n)
        asyncio.run(seed(url, None, key_file, instances(1, n, kam)))
        asyncio.run(seed(None, work / "solo" / "state" / DB_FILE, work / "solo" / "state" / "credentials.key",
                         instances(n + 1, solo_n, kam)))
        metrics: dict[str, int] = {}
        sip = {"register_rate": opts.register_rate, "register_expires": opts.expires}
        for name in (*NODES, "solo"):
            folder = work / name
            folder.mkdir(exist_ok=True)
            metrics[name] = free_port(udp=False)
            storage = (f'[storage]\nurl = "{url}"\nkey_file = "{key_file}"\n'
                       f"[cluster]\nlease_ttl = {opts.lease_ttl}\n") if name != "solo" else ""
            cores[name] = CoreProcess(folder, sip_options=sip, node_name=name, extra_config=(
                f'{storage}[metrics]\nlisten = "127.0.0.1:{metrics[name]}"\n[log]\nlevel = "warning"\n'))
        started = time.monotonic()
        for core in cores.values():
            core.start(timeout=120)
        total = n + solo_n
        wait(lambda: kam.contact_count() >= total, n / opts.register_rate * 3 + 120, "every instance registered")
        startup_s = time.monotonic() - started
        log.info("all %d registered after %.1f s; steady state for %.0f s", total, startup_s, opts.window)
        time.sleep(5)  # the start-up's writes settle

        def pids() -> dict[str, int]:
            return {name: c.proc.pid for name, c in cores.items() if c.proc is not None}

        before_pg = pg_counters(pg, database)
        before = {name: (process_cpu_seconds(pid), registrations(metrics[name])) for name, pid in pids().items()}
        time.sleep(opts.window)
        after = {name: (process_cpu_seconds(pid), registrations(metrics[name])) for name, pid in pids().items()}
        after_pg = pg_counters(pg, database)
        per_10k = 10_000 / n / opts.window
        refreshes = {name: int(after[name][1] - before[name][1]) for name in cores}
        if min(refreshes.values()) == 0:
            raise RuntimeError(f"no refreshes in the window ({refreshes}): lengthen --window or shorten --expires")
        cpu_per_refresh = {name: round((after[name][0] - before[name][0]) / refreshes[name] * 1e6) for name in cores}
        pg_bytes = int(pg.psql("SELECT pg_total_relation_size('instances')", database))
        owned = {owner: int(count) for owner, count in (row.split("|") for row in pg.psql(
            "SELECT owner, count(*) FROM instances GROUP BY owner", database).splitlines())}

        moved = owned.get(VICTIM, 0)
        sample = pg.psql(f"SELECT username FROM instances WHERE owner = '{VICTIM}' ORDER BY random() LIMIT "
                         f"{opts.sample}", database).split()
        bound = lookup(kam, sample)
        steady_doubles = doubles(bound)
        epochs_before = {user: epoch(contacts) for user, contacts in bound.items()}
        unbound = sum(e < 0 for e in epochs_before.values())
        pg.psql("CREATE TABLE victims AS SELECT selector, epoch FROM instances WHERE owner = "
                f"'{VICTIM}'", database)
        log.info("kill -9 %s (%d instances; %d sampled, %d of them unbound)", VICTIM, moved, len(sample), unbound)
        doubles_max, claimed_s = steady_doubles, None
        killed = 0.0

        def moved_all() -> bool:
            nonlocal doubles_max, claimed_s
            left = int(pg.psql("SELECT count(*) FROM instances i JOIN victims v USING (selector) WHERE "
                               f"i.owner IS NULL OR i.owner = '{VICTIM}' OR i.epoch <= v.epoch", database))
            if left == 0 and claimed_s is None:
                claimed_s = time.monotonic() - killed
            now = lookup(kam, sample)
            doubles_max = max(doubles_max, doubles(now))
            stale = sum(epoch(contacts) <= epochs_before[user] for user, contacts in now.items())
            log.info("%.0f s: %d not claimed yet, %d of %d sampled AORs not re-registered",
                     time.monotonic() - killed, left, stale, len(sample))
            return left == 0 and stale == 0

        victim = cores[VICTIM]
        victim.kill()
        killed = time.monotonic()
        budget = opts.lease_ttl + moved / opts.register_rate + 60
        failover_s: float | None = None
        with contextlib.suppress(RuntimeError):
            wait(moved_all, budget, "the killed node's instances registered again")
            failover_s = time.monotonic() - killed
        time.sleep(2)
        moved_all()  # one more look after the move
        doc = {
            "benchmark": "cluster", "instances": n, "nodes": len(NODES), "solo_instances": solo_n,
            "register_rate": opts.register_rate, "register_expires": opts.expires, "lease_ttl": opts.lease_ttl,
            "startup_s": round(startup_s, 1), "owned": owned,
            "failover_instances": moved, "failover_sample": len(sample),
            "claimed_s": None if claimed_s is None else round(claimed_s, 1),
            "failover_s": None if failover_s is None else round(failover_s, 1),
            "double_bindings_max": doubles_max,
            "pg_bytes_per_instance": round(pg_bytes / n),
            "pg_per_s_per_10k": {k: round((after_pg[k] - before_pg[k]) * per_10k, 1) for k in before_pg},
            "window_s": opts.window, "refreshes": refreshes,
            "cpu_us_per_refresh": cpu_per_refresh,
        }
        return doc, failover_s is not None and doubles_max == 0
    finally:
        for core in cores.values():
            core.kill()
        kam.close()
        pg.close()
        shutil.rmtree(work, ignore_errors=True)


def scale_case(opts: argparse.Namespace, n: int, work: Path) -> dict[str, Any]:
    """One size of the scale run (see the module's doc); raises when it cannot complete."""
    kam = Kamailio(shm_mb=opts.kamailio_shm_mb, children=2, tcp_children=4, ctl_max_kb=65536,
                   min_expires=min(60, opts.scale_expires))
    pg = PostgresServer()
    supervisor: subprocess.Popen[bytes] | None = None
    try:
        kam.start()
        pg.start()
        url = pg.create_database("scale")
        key_file = work / "credentials.key"
        asyncio.run(seed(url, None, key_file, []))  # migrations and the key before the workers start
        metrics = free_port(udp=False)
        core = CoreProcess(work, sip_options={"register_rate": opts.scale_rate, "register_expires": opts.scale_expires},
                           node_name="w", extra_config=(
                               f'[storage]\nurl = "{url}"\nkey_file = "{key_file}"\n'
                               f'[cluster]\nlease_ttl = {opts.lease_ttl}\n'
                               f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n[log]\nlevel = "warning"\n'))
        ports = [metrics + k for k in range(opts.workers)]
        with core.log_path.open("ab") as out:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "sipis_console", "serve", "--config", str(core.config_path),
                 "--workers", str(opts.workers)], stdout=out, stderr=out, start_new_session=True)
        group = supervisor.pid

        def answering() -> bool:
            try:
                return all(scrape(port) for port in ports)
            except httpx.HTTPError:
                return False
        wait(answering, 120, "the workers' metrics listeners", every=0.5)
        time.sleep(3)
        rss0, shm0 = group_rss_bytes(group), shm_used(kam)
        log.info("%d workers up (RSS %.0f MB); seeding %d instances", opts.workers, rss0 / 2**20, n)
        made = time.monotonic()
        for first in range(1, n + 1, 50_000):
            asyncio.run(seed(url, None, key_file, instances(first, min(50_000, n + 1 - first), kam)))
        seed_s = time.monotonic() - made
        started = time.monotonic()
        expected = n / (opts.workers * opts.scale_rate)

        def bound() -> bool:
            rss = group_rss_bytes(group)
            if rss > opts.max_rss_gb * 2**30:
                raise MemoryError(f"workers' RSS {rss / 2**30:.1f} GB above --max-rss-gb")
            count = kam.contact_count()
            log.info("%.0f s: %d of %d bound, workers' RSS %.0f MB", time.monotonic() - started, count, n, rss / 2**20)
            return count >= n
        wait(bound, expected * 2 + 120, f"{n} instances registered", every=5)
        register_s = time.monotonic() - started
        time.sleep(5)
        rss1, shm1 = group_rss_bytes(group), shm_used(kam)
        # refreshes begin refresh_min (0.5) × expires after the first REGISTER
        time.sleep(max(0.0, started + 0.5 * opts.scale_expires + 5 - time.monotonic()))
        sample = [f"load{k:07d}" for k in random.sample(range(1, n + 1), min(n, opts.scale_sample))]
        margin = (1 - REFRESH_MAX) * opts.scale_expires
        lag_max, remaining_min, lapsed = 0.0, float("inf"), 0
        cpu0, kcpu0 = group_cpu_seconds(group), group_cpu_seconds(kam.pid or 0)
        regs0 = sum(registrations(port) for port in ports)
        end = time.monotonic() + opts.window
        while time.monotonic() < end:
            tick = time.monotonic()
            lag_max = max(lag_max, *(loop_lag(port) for port in ports))
            for contacts in lookup(kam, sample).values():
                lapsed += not contacts
                remaining_min = min(remaining_min, *((c["expires"] or 0) for c in contacts), float("inf"))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        cpu1, kcpu1 = group_cpu_seconds(group), group_cpu_seconds(kam.pid or 0)
        refreshes = sum(registrations(port) for port in ports) - regs0
        if refreshes <= 0:
            raise RuntimeError("no refreshes in the window: lengthen --window or shorten --scale-expires")
        return {
            "instances": n, "workers": opts.workers, "register_rate_per_worker": opts.scale_rate,
            "register_expires": opts.scale_expires, "seed_s": round(seed_s, 1), "register_s": round(register_s, 1),
            "register_s_expected": round(expected, 1),
            "rss_bytes_per_instance": round((rss1 - rss0) / n), "workers_rss_mb": round(rss1 / 2**20),
            "kamailio_shm_bytes_per_binding": round((shm1 - shm0) / n),
            "window_s": opts.window, "refreshes": int(refreshes),
            "refreshes_per_s": round(refreshes / opts.window, 1),
            "cpu_us_per_refresh": round((cpu1 - cpu0) / refreshes * 1e6),
            "kamailio_cpu_us_per_refresh": round((kcpu1 - kcpu0) / refreshes * 1e6),
            "loop_lag_max_s": round(lag_max, 3),
            "sample_lapsed": lapsed,
            "max_lateness_pbx_s": max(0.0, round(margin - remaining_min, 1)) if remaining_min != float("inf") else None,
        }
    finally:
        if supervisor is not None and supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait(10)
        kam.close()
        pg.close()


def run_scale(opts: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    cases: list[dict[str, Any]] = []
    limit = None
    for n in opts.scale:
        work = Path(tempfile.mkdtemp(prefix="bcs-", dir="/tmp"))
        log.info("scale: %d instances over %d workers", n, opts.workers)
        try:
            cases.append(scale_case(opts, n, work))
            log.info("%s", json.dumps(cases[-1]))
        except (RuntimeError, MemoryError) as exc:
            limit = f"{n}: {exc}"
            log.warning("stopped at %d instances: %s", n, exc)
            break
        finally:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": "cluster_scale", "cases": cases, "reached": cases[-1]["instances"] if cases else 0,
           "stopped": limit}
    return doc, limit is None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=30_000, help="proxied instances on PostgreSQL (30000)")
    parser.add_argument("--register-rate", type=float, default=500.0, help="[sip] register_rate per node (500)")
    parser.add_argument("--expires", type=int, default=60, help="[sip] register_expires (60)")
    parser.add_argument("--lease-ttl", type=float, default=15.0, help="[cluster] lease_ttl (15)")
    parser.add_argument("--sample", type=int, default=200,
                        help="the killed node's AORs looked up at Kamailio each poll (200)")
    parser.add_argument("--window", type=float, default=60.0, help="steady-state window in seconds (60)")
    parser.add_argument("--scale", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="run the scale run instead, at these sizes in order (e.g. 50000,100000,200000)")
    parser.add_argument("--workers", type=int, default=2, help="scale run: serve --workers (2)")
    parser.add_argument("--scale-rate", type=float, default=1000.0, help="scale run: register_rate per worker (1000)")
    parser.add_argument("--scale-expires", type=int, default=120, help="scale run: register_expires (120)")
    parser.add_argument("--scale-sample", type=int, default=50,
                        help="scale run: AORs looked up at Kamailio every second (50)")
    parser.add_argument("--kamailio-shm-mb", type=int, default=1024, help="scale run: Kamailio's shm (1024)")
    parser.add_argument("--max-rss-gb", type=float, default=8.0, help="scale run: stop above this workers' RSS (8)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    missing = None if postgres_bin() is not None else "PostgreSQL is not installed"
    if opts.scale:
        return run_main("cluster_scale", log, lambda: run_scale(opts), unavailable=missing)
    return run_main("cluster", log, lambda: run(opts), unavailable=missing)


if __name__ == "__main__":
    raise SystemExit(main())
