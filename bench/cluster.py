"""Benchmark: 3 nodes on one PostgreSQL against one Kamailio: failover, double bindings, database cost.

One Kamailio (``lab.kamailio``), one throwaway PostgreSQL (``lab.postgres``) and four real cores
(``sipis-console serve`` as child processes, ``lab.core_process``): nodes ``c-1``…``c-3`` on
PostgreSQL sharing one key file, and ``solo`` on embedded SQLite with a third of the instances, for
comparison in the same run. N proxied instances (``loadNNNNNNN``, all asleep) are written straight
into PostgreSQL before the nodes start (encrypted as the core does), N/3 into solo's SQLite.

Phases:

1. **start**: the nodes claim and register everything (paced by ``--register-rate``); done when
   Kamailio holds N + N/3 bindings.
2. **steady state** for ``--window`` seconds (default 60; with ``register_expires`` 120 that is
   most of a refresh round): ``pg_stat_database`` (transactions, tuples read/written) before and
   after gives queries per second per 10k instances; each core's CPU (``/proc``) over the window /
   its REGISTER exchanges (``sipis_registrations_total`` on its metrics listener) gives CPU per
   refresh, per node and for solo. ``pg_total_relation_size`` of ``instances`` / N: bytes per
   instance.
3. **failover**: ``kill -9`` of ``c-2``; every 2 s a random sample (``--sample``, 200) of its AORs is
   looked up at Kamailio (kamcmd cannot dump a big location table): an AOR whose binding still
   points at c-2's SIP port is not yet moved; ``failover_s`` is the time until none is. Each poll
   also counts sampled AORs with more than one binding (double bindings, goal 0); the maximum is
   reported.

stdout gets exactly one JSON line; progress goes to stderr. Exit status: 0; 1 when the failover did
not complete within ``lease_ttl`` + moved / ``register_rate`` + 60 s or a double binding was seen;
2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import shutil
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
from lab.kamailio import LOAD_PASSWORD, Kamailio, free_port
from lab.postgres import PostgresServer, postgres_bin
from lab.procstat import process_cpu_seconds
from sipis.clock import SystemClock
from sipis.core import DB_FILE
from sipis.crypto import SecretBox, hash_token, load_or_create_key, new_token
from sipis.instance import Account, AppState, Instance, PushTarget
from sipis.persistence import InstancePersistence
from storage.database import Database
from storage.pg_repositories import pg_stores
from storage.postgres import PgDatabase
from storage.repositories import sqlite_stores

log = logging.getLogger("bench.cluster")

NODES = ("c-1", "c-2", "c-3")
VICTIM = "c-2"
BATCH = 2000


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


def registrations(core: CoreProcess, metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r"^sipis_registrations_total\{[^}]*\} (\S+)$", text, re.M))


def bindings(kam: Kamailio, users: Sequence[str]) -> tuple[Counter[int], int]:
    """For these AORs (kamcmd cannot dump a big table: one lookup each): bindings per SIP port of the
    contact, and how many AORs have more than one binding."""
    ports: Counter[int] = Counter()
    doubles = 0
    for user in users:
        contacts = kam.registered_contacts(user)
        doubles += len(contacts) > 1
        for contact in contacts:
            found = re.search(r"@[^:;>]+:(\d+)", contact)
            if found:
                ports[int(found.group(1))] += 1
    return ports, doubles


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


def run(opts: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    work = Path(tempfile.mkdtemp(prefix="bc-", dir="/tmp"))
    kam = Kamailio(shm_mb=max(64, opts.instances // 100), children=2, tcp_children=4, ctl_max_kb=65536,
                   min_expires=60)
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

        before_pg = pg_counters(pg, database)
        before = {name: (process_cpu_seconds(c.proc.pid), registrations(c, metrics[name]))  # type: ignore[union-attr]
                  for name, c in cores.items()}
        time.sleep(opts.window)
        after = {name: (process_cpu_seconds(c.proc.pid), registrations(c, metrics[name]))  # type: ignore[union-attr]
                 for name, c in cores.items()}
        after_pg = pg_counters(pg, database)
        per_10k = 10_000 / n / opts.window
        cpu_per_refresh = {name: round((after[name][0] - before[name][0]) / max(1.0, after[name][1] - before[name][1])
                                       * 1e6) for name in cores}
        refreshes = {name: int(after[name][1] - before[name][1]) for name in cores}
        pg_bytes = int(pg.psql("SELECT pg_total_relation_size('instances')", database))
        owned = dict(row.split("|") for row in pg.psql(  # type: ignore[misc]
            "SELECT owner, count(*) FROM instances GROUP BY owner", database).splitlines())

        victim = cores[VICTIM]
        moved = int(owned.get(VICTIM, 0))
        victims = pg.psql(f"SELECT username FROM instances WHERE owner = '{VICTIM}' ORDER BY random() LIMIT "
                          f"{opts.sample}", database).split()
        log.info("kill -9 %s (%s instances)", VICTIM, moved)
        doubles_max = 0

        def victim_gone() -> bool:
            nonlocal doubles_max
            ports, doubles = bindings(kam, victims)
            doubles_max = max(doubles_max, doubles)
            return ports.get(victim.sip_port, 0) == 0

        victim.kill()
        killed = time.monotonic()
        budget = opts.lease_ttl + moved / opts.register_rate + 60
        try:
            failover_s: float | None = wait(victim_gone, budget, "the killed node's instances registered again")
            failover_s = time.monotonic() - killed
        except RuntimeError:
            failover_s = None
        victim_gone()  # one more dump after the move
        doc = {
            "benchmark": "cluster", "instances": n, "nodes": len(NODES), "solo_instances": solo_n,
            "register_rate": opts.register_rate, "register_expires": opts.expires, "lease_ttl": opts.lease_ttl,
            "startup_s": round(startup_s, 1), "owned": {k: int(v) for k, v in owned.items()},
            "failover_instances": moved, "failover_s": None if failover_s is None else round(failover_s, 1),
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=30_000, help="proxied instances on PostgreSQL (30000)")
    parser.add_argument("--register-rate", type=float, default=500.0, help="[sip] register_rate per node (500)")
    parser.add_argument("--expires", type=int, default=120, help="[sip] register_expires (120)")
    parser.add_argument("--lease-ttl", type=float, default=15.0, help="[cluster] lease_ttl (15)")
    parser.add_argument("--sample", type=int, default=200,
                        help="the killed node's AORs looked up at Kamailio each poll (200)")
    parser.add_argument("--window", type=float, default=60.0, help="steady-state window in seconds (60)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    missing = None if postgres_bin() is not None else "PostgreSQL is not installed"
    return run_main("cluster", log, lambda: run(opts), unavailable=missing)


if __name__ == "__main__":
    raise SystemExit(main())
