"""Benchmark: INVITE received → push request sent, for held calls at a fixed call rate.

Setup (all real protocols on loopback): one Kamailio (``lab.kamailio``), a push mediator
(``lab.push_servers.MediatorServer``, Acrobits JSON API over HTTPS) and the core (``sipis.core.Core``
built with ``parse_config``, as ``serve`` builds it) in this process. By default the mediator runs in
a **child process** (this file with ``--mediator-child``), so its HTTP server does not take time from
the core's event loop; ``--mediator inline`` puts it on the core's loop instead (as the integration
tests do), for comparison.

``--instances`` sleeping apps ``load00001``… (password ``loadpw``) are enrolled through the HTTPS app
API (``POST /v1/instances`` + ``PUT …/state inactive``) with the registrar
``sip:<kamailio>;transport=tcp``: the core registers all of them over one TCP connection and
Kamailio sends their INVITEs back over it. ``register_expires`` is 3600 s, so no refresh falls into
a run.

sipp calls them at ``--rate`` calls/s for ``--duration`` seconds over UDP, round-robin through an
injection file (scenario: ``tests/sipp/uac_final.xml`` with the called user from the file). Nobody
wakes up: every call is held for T1 (``--wake-timeout``, default 3 s) and ends with ``480
No-Response-From-Device``, so about ``rate × wake_timeout`` calls are held at once in steady state.
An unmeasured ``--warmup`` run comes first (TLS connections of the push client warm, code paths hot);
then ``--repeats`` measured runs, each followed by a drain until no call is held.

Measured per call (all wall-clock ``time.time()``, one host, one clock), in ``latency_ms``:

* ``invite_to_push_sent``: ``PushTrace.stages["invite_received"]`` → ``stages["push_sent"]``.
  ``invite_received`` is stamped by ``CallManager.on_invite`` (the INVITE is parsed, its server
  transaction created, ``100 Trying`` sent, the instance found); ``push_sent`` is stamped by
  ``PushDelivery.deliver`` **just before** the request is handed to the provider (the body is built
  and ``httpx`` called after it). The push is started eagerly inside ``on_invite`` (no task hop)
  when the provider allows it, as the Acrobits provider over ``sipis.push.transport`` does.
* ``invite_to_wire`` (**the goal's figure**): ``invite_received`` → the whole request has been
  written into the provider's TLS connection (the ``http11.send_request_body.complete`` trace event
  — emitted by httpcore, and with the same name by ``sipis.push.transport`` right after its single
  ``write`` returned — through a request hook this benchmark adds to the provider's
  ``httpx.AsyncClient``): "push request on the wire". ``push_sent_to_wire`` is the part spent in the
  provider and httpx/TLS; ``invite_to_wire_warm`` / ``invite_to_wire_new_connection`` split the
  calls by whether the push request went out on a pooled connection or had to open one (TCP
  connect + TLS handshake); ``invite_to_wire_no_gc`` are the calls whose window saw no garbage
  collection. ``invite_to_write_start`` ends just before the write call
  (``http11.send_request_headers.started``), ``write_call`` is the write itself (encryption and
  the loopback ``send``, which may switch the CPU to another process).
* ``over_goal``: the calls over 5 ms by cause, the first that applies: a garbage collection in the
  window (``gc_gen0/1/2``, from ``gc.callbacks`` with wall-clock times), a new connection,
  ``in_write`` (the write started in time but returned late: the kernel or the scheduler held the
  core in ``send``), ``before_write`` (anything else: a pool full of busy connections, the loop, the
  scheduler before the write). ``gc_in_window`` counts the calls whose window saw a collection.
* ``invite_to_mediator``: ``invite_received`` → the mediator's ``Received.at`` (stamped after
  uvicorn/FastAPI read the whole body): adds loopback TCP and the mediator's HTTP parsing
  (``wire_to_mediator``), an upper bound.
* ``frame_to_invite`` and ``frame_to_wire``: from the moment the INVITE's bytes (one framed message
  from the TCP connection) are handed to our SIP parser. Taken by wrapping two attributes of the
  core's ``TransportLayer`` instance (``_deliver`` and ``_on_message``); ``sipis/`` is not changed.

Also: calls attempted/held/completed, sipp's failed calls, pushes that never reached the mediator,
the largest and the steady-state number of simultaneously held calls (``len(core.calls.held)``
sampled every 10 ms, which also gives the event-loop lag), garbage-collector pauses per generation
(``gc.callbacks``), TCP/TLS connections the push client opened, push requests that had to wait for
a pooled connection because all were busy (``push_pool_waits``), SIP connections the core lost
(``endpoint.flow_closed_listeners``, with the reason) and SIP parse/framing errors, CPU seconds per
call of this process (the core, plus the mediator when inline), of the mediator process and of
Kamailio, and the 1-minute load average before and after (the machine is shared: a loaded machine
makes every figure worse). Per repeat p50/p90/p99/max; the summary gives the median over repeats
of each percentile, the pooled p99 of all calls and the maximum. The core's INFO log goes to
``core.log`` in the work folder, which is kept (and named in the JSON) when a run had trouble.

The mediator process runs with the ``SCHED_BATCH`` policy (``--mediator-sched normal`` to compare):
it stands in for a service on another machine, and a request written to a normal-policy local
reader makes the kernel switch to it inside the core's ``send`` (the reader was asleep, so it wins
the wake-up preemption), which a remote mediator never does. Batch tasks get the same share of the
CPU; they just never preempt on wake-up.

``--keepalive`` sets the core's ``sip.keepalive_interval`` (default 30 s as in the product).
``--profile FILE`` runs cProfile over the measured repeats (latencies are then inflated and not
comparable) and prints the top functions to stderr.

stdout gets exactly one JSON line; progress goes to stderr. Exit status: 0; 1 when more than 1 % of
the calls failed or got no push; 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import cProfile
import gc
import io
import json
import logging
import os
import pstats
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

# run as bench/invite_to_push.py (as the README does, and as this script starts its mediator child) only
# bench/ is on sys.path; the package import below needs the repository
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import cancel_and_wait, end_child, run_main, stderr_logging
from lab.kamailio import LOAD_PASSWORD, Kamailio, free_port
from lab.procstat import group_cpu_seconds, process_cpu_seconds
from lab.push_servers import MediatorServer
from lab.sipp import SippResult, load_user, start_scenario
from sipis.config import parse_config
from sipis.core import Core
from sipis.instance import AppState
from sipis.push.base import PushKind
from sipis.sip.message import Message, Request

log = logging.getLogger("bench.invite_to_push")

GOAL_P99_MS = 5.0
GOAL_RATE = 100.0
MAX_FAILED_FRACTION = 0.01
ENROL_TOKEN = "bench-enrol-token"
APP_ID = "com.example.bench"
SIPP_BUFFER = 1 << 20
SAMPLE_INTERVAL = 0.01
LATENCIES = ("invite_to_push_sent", "invite_to_wire", "invite_to_mediator", "push_sent_to_wire", "wire_to_mediator",
             "frame_to_invite", "frame_to_wire", "invite_to_wire_warm", "invite_to_wire_new_connection",
             "invite_to_wire_no_gc", "invite_to_write_start", "write_call")
#: why a call's INVITE → wire window took longer than the goal (first that applies): a collection in
#: the window, a new connection, the write call itself (the request was being written in time; the
#: kernel or the scheduler kept us, e.g. switching to the woken mediator), anything before the write
TAIL_CAUSES = ("gc_gen2", "gc_gen1", "gc_gen0", "new_connection", "in_write", "before_write")
WRITE_START = "http11.send_request_headers.started"
# httpcore trace events (``request.extensions["trace"]``) kept per push request
WIRE_EVENTS = ("http11.send_request_headers.started", "http11.send_request_body.complete",
               "http11.receive_response_headers.complete")
WIRE = "http11.send_request_body.complete"
CONNECT_EVENT = "connection.connect_tcp.complete"
NEW_CONNECTION = "new_connection"  # marks a request that had to open (TCP + TLS) its connection
_PUSH_ID = re.compile(rb'"Id":\s*"([^"]+)"')  # push id in the mediator body (httpx writes compact JSON)

# tests/sipp/uac_final.xml with the called user from the injection file ([field0]) instead of -s.
SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="uac held until T1 (called user from -inf)">
  <send retrans="500" start_txn="invite">
    <![CDATA[
INVITE sip:[field0]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:[field0]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: <sip:sipp@[local_ip]:[local_port];transport=[transport]>
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000

    ]]>
  </send>

  <recv response="100" optional="true" response_txn="invite"/>
  <recv response="180" optional="true" response_txn="invite"/>
  <recv response="183" optional="true" response_txn="invite"/>
  <recv response="302" optional="true" next="ack" response_txn="invite"/>
  <recv response="480" response_txn="invite"/>

  <label id="ack"/>
  <send ack_txn="invite">
    <![CDATA[
ACK sip:[field0]@[remote_ip]:[remote_port] SIP/2.0
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>

  <pause milliseconds="500"/>
</scenario>
"""


class BenchError(RuntimeError):
    """The benchmark could not run (as opposed to: it ran and calls failed)."""


# --------------------------------------------------------------------------- process measurements


def kamailio_version() -> str | None:
    try:
        out = subprocess.run(["kamailio", "-v"], capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return None
    match = re.search(r"kamailio (\S+)", out)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- the mediator


@dataclass(frozen=True)
class PushSeen:
    """One request the mediator received."""

    push_id: str | None
    verb: str | None
    at: float  # wall clock, after the body was read
    status: int | None


def _seen(requests: Sequence[Any]) -> list[PushSeen]:
    rows = []
    for r in requests:
        body = r.json if isinstance(r.json, dict) else {}
        rows.append(PushSeen(body.get("Id"), body.get("verb"), r.at, r.status))
    return rows


class Mediator(Protocol):
    send_url: str
    ca_file: str
    where: str

    async def requests(self) -> list[PushSeen]: ...

    async def clear(self) -> None: ...

    def cpu_seconds(self) -> float | None: ...

    async def stop(self) -> None: ...


class InlineMediator:
    """The mediator on the core's own event loop (it competes with the core for loop time)."""

    where = "inline (same process and event loop as the core)"

    def __init__(self, server: MediatorServer) -> None:
        self.server = server
        self.send_url = server.send_url
        self.ca_file = str(server.ca_file)

    @classmethod
    async def start(cls, state_dir: Path) -> InlineMediator:
        server = MediatorServer(state_dir)
        await server.start()
        return cls(server)

    async def requests(self) -> list[PushSeen]:
        return _seen(self.server.requests)

    async def clear(self) -> None:
        self.server.requests.clear()

    def cpu_seconds(self) -> float | None:
        return None  # part of this process's CPU time

    async def stop(self) -> None:
        await self.server.stop()


class MediatorProcess:
    """The mediator in a child process (this file, ``--mediator-child``), driven over stdin/stdout:
    ``dump`` → one JSON line with every request seen, ``clear`` → forget them, EOF → stop."""

    where = "separate process"

    def __init__(self, proc: asyncio.subprocess.Process, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.send_url = str(hello["send_url"])
        self.ca_file = str(hello["ca_file"])

    @classmethod
    async def start(cls, state_dir: Path, sched: str = "batch") -> MediatorProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--mediator-child", str(state_dir),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 26,
            preexec_fn=_batch_scheduling if sched == "batch" else None)
        try:
            hello = await cls._read(proc, 30.0)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        mediator = cls(proc, hello)
        mediator.where = f"separate process, {sched} scheduling"
        return mediator

    @staticmethod
    async def _read(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not line:
            raise BenchError(f"mediator process exited ({await proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def _command(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._read(self.proc, 30.0)

    async def requests(self) -> list[PushSeen]:
        answer = await self._command("dump")
        return [PushSeen(*row) for row in answer["requests"]]

    async def clear(self) -> None:
        await self._command("clear")

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.proc.pid)

    async def stop(self) -> None:
        await end_child(self.proc)


def _batch_scheduling() -> None:
    """In the mediator child before exec: SCHED_BATCH. The mediator stands in for a service on
    another machine; a request written to it must not switch this 2-CPU box over to the mediator
    in the middle of the core's ``send`` (a loopback write wakes the reader synchronously, and a
    normal-policy reader that slept preempts the writer at once: measured 30-60 of 6000 calls
    > 5 ms "in the write call" alone). Batch tasks get the same CPU share but never preempt on
    wake-up; they run when the core blocks or on the other CPU."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


async def mediator_child(state_dir: Path) -> int:
    """The child side of :class:`MediatorProcess`."""
    server = MediatorServer(state_dir)
    await server.start()
    out = sys.stdout
    out.write(json.dumps({"send_url": server.send_url, "ca_file": str(server.ca_file)}) + "\n")
    out.flush()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "dump":
                rows = [[s.push_id, s.verb, s.at, s.status] for s in _seen(server.requests)]
                answer: dict[str, Any] = {"requests": rows}
            elif command == "clear":
                server.requests.clear()
                answer = {"ok": True}
            else:
                answer = {"error": f"unknown command {command!r}"}
            out.write(json.dumps(answer, separators=(",", ":")) + "\n")
            out.flush()
    finally:
        await server.stop()
    return 0


# --------------------------------------------------------------------------- measuring


class FrameStamps:
    """When each INVITE's bytes were handed to the core's SIP parser, by Call-ID.

    Wraps ``_deliver`` (parse one framed message) and ``_on_message`` (hand the parsed message to the
    endpoint) on the core's ``TransportLayer`` *instance*; the class and ``sipis/`` stay untouched."""

    def __init__(self, transport: Any) -> None:
        self.by_call_id: dict[str, float] = {}
        self._frame_at = 0.0
        deliver: Callable[..., None] = transport._deliver
        on_message: Callable[[Message, Any], None] = transport._on_message

        def stamped_deliver(data: bytes, flow: Any, *, stream: bool) -> None:
            self._frame_at = time.time()
            deliver(data, flow, stream=stream)

        def stamped_on_message(message: Message, flow: Any) -> None:
            if isinstance(message, Request) and message.method == "INVITE":
                self.by_call_id.setdefault(message.call_id, self._frame_at)
            on_message(message, flow)

        setattr(transport, "_deliver", stamped_deliver)  # noqa: B010 - an instance attribute on purpose
        setattr(transport, "_on_message", stamped_on_message)  # noqa: B010


class WireStamps:
    """When each push request's last byte was written to the provider connection ("on the wire").

    Adds a request event hook to the push provider's ``httpx.AsyncClient`` that gives every request an
    httpcore ``trace`` extension; ``http11.send_request_body.complete`` is the moment httpcore has
    written the whole request into the (TLS) socket. The hook and the trace callbacks run on the
    measured path and cost some microseconds per request; no request object is kept (that would add
    to the garbage collector's work). New TCP connections of the client are counted too."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.by_push_id: dict[str, dict[str, float]] = {}
        self.connections = 0
        self.client = client
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks.get("request", []), self._on_request],
                              "response": list(hooks.get("response", []))}

    async def _on_request(self, request: httpx.Request) -> None:
        match = _PUSH_ID.search(request.content)
        if match is None:
            return
        times = self.by_push_id.setdefault(match.group(1).decode(), {})

        async def trace(name: str, info: dict[str, Any]) -> None:
            if name in WIRE_EVENTS:
                times.setdefault(name, time.time())  # the first attempt's, like push_sent
            elif name == CONNECT_EVENT:
                self.connections += 1
                times.setdefault(NEW_CONNECTION, time.time())

        request.extensions["trace"] = trace

    def clear(self) -> None:
        self.by_push_id.clear()
        self.connections = 0

    def pool_waits(self) -> int:
        """Requests that waited for a pooled connection (all busy), as far as the transport counts them."""
        return int(getattr(getattr(self.client, "_transport", None), "waits", 0))


class GcPauses:
    """Duration of every garbage collection while installed (``gc.callbacks``), by generation, and
    when it happened (wall clock, to find the calls whose INVITE → wire window it fell into)."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}  # ms
        self.spans: list[tuple[float, float, int]] = []  # (wall start, wall end, generation)
        self._started = 0.0
        self._started_wall = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_wall = time.time()
            self._started = time.perf_counter()
        else:
            generation = int(info["generation"])
            self.pauses[generation].append(1000 * (time.perf_counter() - self._started))
            self.spans.append((self._started_wall, time.time(), generation))

    def in_window(self, start: float, end: float) -> int | None:
        """The oldest generation collected between ``start`` and ``end`` (wall clock), or None."""
        spans = self.spans
        i = bisect.bisect_left(spans, (start,)) - 1  # a collection that began just before start
        found: int | None = None
        for j in range(max(0, i), len(spans)):
            began, ended, generation = spans[j]
            if began > end:
                break
            if ended >= start:
                found = generation if found is None else max(found, generation)
        return found

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        return {f"gen{g}": {"count": len(v), "max": round(max(v, default=0.0), 3),
                            "total": round(sum(v), 1)} for g, v in self.pauses.items()}


class Sampler:
    """Every 10 ms: how many calls are held, and how late the loop woke us (event-loop lag)."""

    def __init__(self, held: Callable[[], int]) -> None:
        self.held = held
        self.samples: list[tuple[float, int]] = []  # (monotonic, held)
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + SAMPLE_INTERVAL
            await asyncio.sleep(SAMPLE_INTERVAL)
            now = loop.time()
            self.lags.append(max(0.0, now - due))
            self.samples.append((now, self.held()))


def percentiles(values: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/p99/max (ms, linear interpolation between closest ranks) and n."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    if len(ordered) == 1:
        v = round(ordered[0], 3)
        return {"p50": v, "p90": v, "p99": v, "max": v, "n": 1}
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": round(cuts[49], 3), "p90": round(cuts[89], 3), "p99": round(cuts[98], 3),
            "max": round(ordered[-1], 3), "n": len(ordered)}


@dataclass
class Run:
    """One measured sipp run."""

    rate: float
    duration: float
    sipp: SippResult | None
    elapsed: float
    latencies: dict[str, list[float]] = field(default_factory=dict)  # ms
    calls_held: int = 0
    pushes_seen: int = 0
    pushes_missing: int = 0
    new_connections: int = 0
    pool_waits: int = 0
    sip_flows_closed: list[str] = field(default_factory=list)
    sip_errors: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    held_max: int = 0
    held_steady: float = 0.0
    loop_lag_ms: dict[str, float | int] = field(default_factory=dict)
    gc_ms: dict[str, Any] = field(default_factory=dict)
    gc_in_window: dict[str, int] = field(default_factory=dict)  # calls whose window saw a collection, by gen
    over_goal: dict[str, int] = field(default_factory=dict)  # calls over the goal, by cause (TAIL_CAUSES)
    cpu_s: float = 0.0
    mediator_cpu_s: float | None = None
    kamailio_cpu_s: float = 0.0

    @property
    def attempted(self) -> int:
        if self.sipp is None:
            return 0
        stats = self.sipp.stats
        for key in ("OutgoingCall(C)", "TotalCallCreated"):
            with contextlib.suppress(ValueError):
                if int(stats.get(key, "0")):
                    return int(stats[key])
        return 0

    @property
    def completed(self) -> int:
        return self.sipp.successful if self.sipp is not None else 0

    @property
    def failed(self) -> int:
        return self.sipp.failed if self.sipp is not None else 0

    def summary(self) -> dict[str, Any]:
        per_call = max(1, self.attempted)
        return {
            "calls_attempted": self.attempted, "calls_held": self.calls_held, "calls_completed": self.completed,
            "sipp_failed_calls": self.failed, "pushes_seen": self.pushes_seen, "pushes_missing": self.pushes_missing,
            "push_connections_opened": self.new_connections, "push_pool_waits": self.pool_waits,
            "sip_flows_closed": self.sip_flows_closed,
            "sip_errors": self.sip_errors, "outcomes": self.outcomes,
            "held_max": self.held_max, "held_steady_median": self.held_steady,
            "elapsed_s": round(self.elapsed, 2),
            "latency_ms": {name: percentiles(self.latencies.get(name, [])) for name in LATENCIES},
            "loop_lag_ms": self.loop_lag_ms, "gc_pauses_ms": self.gc_ms,
            "gc_in_window": self.gc_in_window, "over_goal": self.over_goal,
            "cpu_s_per_call": round(self.cpu_s / per_call, 6),
            "mediator_cpu_s_per_call": (None if self.mediator_cpu_s is None
                                        else round(self.mediator_cpu_s / per_call, 6)),
            "kamailio_cpu_s_per_call": round(self.kamailio_cpu_s / per_call, 6),
        }

    def describe(self) -> str:
        parts = []
        for name in ("invite_to_push_sent", "invite_to_wire", "invite_to_mediator"):
            p = percentiles(self.latencies.get(name, []))
            parts.append(f"{name.removeprefix('invite_to_')} p50 {p.get('p50')} p99 {p.get('p99')}")
        return (f"{self.attempted} calls at {self.rate:g}/s: {self.completed} ok, {self.failed} failed, "
                f"held max {self.held_max}; ms: {'; '.join(parts)}; loop lag p99 {self.loop_lag_ms.get('p99')}; "
                f"cpu {1000 * self.cpu_s / max(1, self.attempted):.2f} ms/call; GC in the window {self.gc_in_window}; "
                f"over {GOAL_P99_MS:g} ms by cause {self.over_goal}")


# --------------------------------------------------------------------------- the lab


@dataclass
class Options:
    rate: float
    duration: float
    instances: int
    wake_timeout: float
    repeats: int
    warmup: float
    mediator: str
    keepalive: float
    profile: Path | None
    keep: bool
    mediator_sched: str = "batch"


@dataclass
class Lab:
    flows_closed: list[tuple[float, str, str]]  # (wall time, flow, reason): SIP connections the core lost
    kam: Kamailio
    mediator: Mediator
    core: Core
    stamps: FrameStamps
    wire: WireStamps
    workdir: Path
    users_csv: Path
    scenario: Path
    kam_pid: int


def make_config(workdir: Path, mediator: Mediator, wake_timeout: float, keepalive: float) -> Any:
    port = free_port()
    return parse_config({
        "state_dir": str(workdir / "state"),
        "sip": {"listen": [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}"], "register_expires": 3600,
                "keepalive_interval": keepalive},
        "api": {"listen": "127.0.0.1:0", "enroll_tokens": [ENROL_TOKEN]},
        "calls": {"wake_timeout": wake_timeout, "answer_timeout": wake_timeout},
        "push": {"mediator": {"type": "acrobits", "url": mediator.send_url, "ca_file": mediator.ca_file,
                              "timeout": 5}},
    }, workdir)


async def enrol(core: Core, kam: Kamailio, api_url: str, instances: int) -> None:
    """Enrol ``instances`` load users through the HTTPS app API and report them inactive (asleep)."""
    trust = ssl.create_default_context(cafile=str(core.config.api.tls_cert))
    registrar = f"sip:{kam.host}:{kam.udp_port};transport=tcp"
    semaphore = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=api_url, verify=trust, timeout=30) as api:
        async def one(n: int) -> None:
            user = load_user(n)
            async with semaphore:
                response = await api.post("/v1/instances", headers={"Authorization": f"Bearer {ENROL_TOKEN}"},
                                          json={"account": {"aor": f"sip:{user}@{kam.domain}", "username": user,
                                                            "password": LOAD_PASSWORD, "registrar": registrar},
                                                "push": {"provider": "mediator", "app_id": APP_ID,
                                                         "token": f"token-{user}"}})
                if response.status_code != 201:
                    raise BenchError(f"enrolling {user}: {response.status_code} {response.text[:200]}")
                selector, bearer = response.json()["selector"], response.json()["token"]
                response = await api.put(f"/v1/instances/{selector}/state", json={"state": "inactive"},
                                         headers={"Authorization": f"Bearer {bearer}"})
                if response.status_code != 200:
                    raise BenchError(f"{user} inactive: {response.status_code} {response.text[:200]}")

        await asyncio.gather(*(one(n) for n in range(1, instances + 1)))
    assert core.service is not None
    service = core.service
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30 + instances / 50
    while loop.time() < deadline:
        proxied = sum(1 for i in service.instances.values() if i.state is AppState.PROXIED)
        if proxied == instances:
            break
        await asyncio.sleep(0.1)
    else:
        raise BenchError(f"only {proxied} of {instances} instances proxied in time")
    bindings = kam.contact_count()
    if bindings != instances:
        raise BenchError(f"{instances} instances proxied but Kamailio holds {bindings} bindings")


async def drain(core: Core, timeout: float) -> None:
    assert core.calls is not None
    calls = core.calls
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (calls.held or calls._tasks) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if calls.held:
        log.warning("%d calls still held after %.0f s", len(calls.held), timeout)


async def sipp_run(lab: Lab, opts: Options, duration: float, name: str) -> SippResult:
    calls = max(1, round(opts.rate * duration))
    limit = max(1000, int(opts.rate * (opts.wake_timeout + 2) * 4))
    workdir = lab.workdir / name
    proc = await start_scenario(
        lab.scenario, lab.kam.target("udp"), transport="udp", calls=calls, rate=opts.rate, inf=lab.users_csv,
        timeout=duration + opts.wake_timeout + 60, trace_messages=False, workdir=workdir,
        extra_args=["-l", str(limit), "-buff_size", str(SIPP_BUFFER)])
    return await proc.wait()


async def measure(lab: Lab, opts: Options, index: int, profiler: cProfile.Profile | None) -> Run:
    core, mediator = lab.core, lab.mediator
    assert core.calls is not None and core.delivery is not None
    calls, delivery = core.calls, core.delivery
    await mediator.clear()
    lab.stamps.by_call_id.clear()
    lab.wire.clear()
    known = set(delivery.traces)
    outcomes_before = dict(calls.outcomes)
    assert core.endpoint is not None
    sip_stats = core.endpoint.transport.stats
    errors_before = {k: sip_stats.get(k, 0) for k in ("parse_errors", "framing_errors")}
    closed_before = len(lab.flows_closed)
    pool_waits_before = lab.wire.pool_waits()
    began_wall = time.time()
    sampler = Sampler(lambda: len(calls.held))
    kam_cpu, med_cpu = group_cpu_seconds(lab.kam_pid), mediator.cpu_seconds()
    cpu, started = time.process_time(), time.perf_counter()
    sampler.start()
    if profiler is not None:
        profiler.enable()
    try:
        with GcPauses() as pauses:
            result = await sipp_run(lab, opts, opts.duration, f"run{index}")
            await drain(core, opts.wake_timeout + 15)
    finally:
        if profiler is not None:
            profiler.disable()
        await sampler.stop()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    med_after = mediator.cpu_seconds()
    run = Run(opts.rate, opts.duration, result, elapsed, cpu_s=cpu,
              kamailio_cpu_s=group_cpu_seconds(lab.kam_pid) - kam_cpu,
              mediator_cpu_s=None if med_cpu is None or med_after is None else med_after - med_cpu)
    run.gc_ms = pauses.summary()
    run.sip_errors = {k: sip_stats.get(k, 0) - v for k, v in errors_before.items()}
    run.sip_flows_closed = [f"{at - began_wall:.1f} s: {flow}: {reason}"
                            for at, flow, reason in lab.flows_closed[closed_before:]]
    for line in run.sip_flows_closed:
        log.warning("the core lost a SIP connection during the run: %s", line)
    run.outcomes = {k: v - outcomes_before.get(k, 0) for k, v in calls.outcomes.items()
                    if v - outcomes_before.get(k, 0)}
    seen = {s.push_id: s for s in await mediator.requests() if s.verb == "NotifyIncomingCall"}
    wire = lab.wire.by_push_id
    run.new_connections = lab.wire.connections
    run.pool_waits = lab.wire.pool_waits() - pool_waits_before
    lat: dict[str, list[float]] = {name: [] for name in LATENCIES}
    traces = [t for pid, t in delivery.traces.items() if pid not in known and t.kind is PushKind.CALL]
    run.calls_held = len(traces)
    for trace in traces:
        invite = trace.stages.get("invite_received")
        sent = trace.stages.get("push_sent")
        frame = lab.stamps.by_call_id.get(trace.call_id or "")
        push = seen.get(trace.push_id)
        stamps = wire.get(trace.push_id, {})
        written = stamps.get(WIRE)

        def add(name: str, start: float | None, end: float | None) -> None:
            if start is not None and end is not None:
                lat[name].append(1000 * (end - start))

        add("invite_to_push_sent", invite, sent)
        add("invite_to_wire", invite, written)
        add("invite_to_write_start", invite, stamps.get(WRITE_START))
        add("write_call", stamps.get(WRITE_START), written)
        if invite is not None and written is not None:
            generation = pauses.in_window(invite, written)
            if generation is None:
                add("invite_to_wire_no_gc", invite, written)
            else:
                key = f"gen{generation}"
                run.gc_in_window[key] = run.gc_in_window.get(key, 0) + 1
            if 1000 * (written - invite) > GOAL_P99_MS:
                write_start = stamps.get(WRITE_START, written)
                cause = (f"gc_gen{generation}" if generation is not None
                         else "new_connection" if NEW_CONNECTION in stamps
                         else "in_write" if 1000 * (write_start - invite) <= GOAL_P99_MS else "before_write")
                run.over_goal[cause] = run.over_goal.get(cause, 0) + 1
        add("invite_to_wire_new_connection" if NEW_CONNECTION in stamps else "invite_to_wire_warm", invite, written)
        add("push_sent_to_wire", sent, written)
        add("frame_to_invite", frame, invite)
        add("frame_to_wire", frame, written)
        if push is None:
            run.pushes_missing += 1
        else:
            run.pushes_seen += 1
            add("invite_to_mediator", invite, push.at)
            add("wire_to_mediator", written, push.at)
    run.latencies = lat
    held = [h for _, h in sampler.samples]
    run.held_max = max(held, default=0)
    # steady state: the middle half of the calling period (ramp-up is T1 long, so skip at least that)
    if sampler.samples:
        t0 = sampler.samples[0][0]
        lo, hi = max(opts.wake_timeout, opts.duration * 0.25), opts.duration * 0.75
        steady = [h for t, h in sampler.samples if lo <= t - t0 <= max(lo, hi)]
        run.held_steady = float(statistics.median(steady)) if steady else 0.0
    lags = [1000 * v for v in sampler.lags]
    run.loop_lag_ms = {k: v for k, v in percentiles(lags).items() if k != "p90"}
    return run


async def run_benchmark(opts: Options) -> tuple[dict[str, Any], bool]:
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="bench-invite-"))
    core_log = logging.FileHandler(workdir / "core.log")  # the core's INFO lines (flows, transactions)
    core_log.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    sipis_log = logging.getLogger("sipis")
    sipis_log.addHandler(core_log)
    sipis_log.setLevel(logging.INFO)
    sipis_log.propagate = False  # stderr keeps only our progress (and the core's warnings, below)
    core_warnings = logging.StreamHandler(sys.stderr)
    core_warnings.setLevel(logging.WARNING)
    sipis_log.addHandler(core_warnings)
    result: dict[str, Any] = {
        "benchmark": "invite_to_push", "rate": opts.rate, "duration_s": opts.duration,
        "instances": opts.instances, "wake_timeout_s": opts.wake_timeout, "repeats": opts.repeats,
        "warmup_s": opts.warmup, "keepalive_interval_s": opts.keepalive, "mediator_sched": opts.mediator_sched,
    }
    runs: list[Run] = []
    profiler = cProfile.Profile() if opts.profile is not None else None
    try:
        (workdir / "kamailio").mkdir()
        with Kamailio(children=4, tcp_children=4, shm_mb=128, pkg_mb=16, max_expires=3600, default_expires=3600,
                      workdir=workdir / "kamailio") as kam:
            assert kam.pid is not None
            log.info("kamailio on %s, pid %s; workdir %s", kam.target(), kam.pid, workdir)
            mediator: Mediator
            if opts.mediator == "process":
                mediator = await MediatorProcess.start(workdir / "mediator", opts.mediator_sched)
            else:
                mediator = await InlineMediator.start(workdir / "mediator")
            result["mediator"] = mediator.where
            try:
                core = Core(make_config(workdir, mediator, opts.wake_timeout, opts.keepalive))
                listening = await core.start()
                try:
                    assert listening.api_url is not None and core.endpoint is not None
                    stamps = FrameStamps(core.endpoint.transport)
                    assert core.delivery is not None
                    wire = WireStamps(core.delivery.providers["mediator"].client)  # type: ignore[attr-defined]
                    users_csv = workdir / "users.csv"
                    users_csv.write_text("SEQUENTIAL\n" + "".join(
                        f"{load_user(n)}\n" for n in range(1, opts.instances + 1)))
                    scenario = workdir / "uac_held.xml"
                    scenario.write_text(SCENARIO)
                    flows_closed: list[tuple[float, str, str]] = []
                    core.endpoint.flow_closed_listeners.append(
                        lambda flow, reason: flows_closed.append((time.time(), str(flow), reason)))
                    lab = Lab(flows_closed, kam, mediator, core, stamps, wire, workdir, users_csv, scenario, kam.pid)
                    t = time.perf_counter()
                    await enrol(core, kam, listening.api_url, opts.instances)
                    log.info("%d instances enrolled and proxied in %.1f s", opts.instances, time.perf_counter() - t)
                    if opts.warmup > 0:
                        warm = await sipp_run(lab, opts, opts.warmup, "warmup")
                        await drain(core, opts.wake_timeout + 15)
                        log.info("warm-up: %d ok, %d failed", warm.successful, warm.failed)
                    for index in range(opts.repeats):
                        run = await measure(lab, opts, index, profiler)
                        runs.append(run)
                        log.info("[%d/%d] %s", index + 1, opts.repeats, run.describe())
                finally:
                    await core.stop()
            finally:
                await mediator.stop()
    finally:
        for handler in (core_log, core_warnings):
            sipis_log.removeHandler(handler)
        core_log.close()
        troubled = any(r.failed or r.pushes_missing or r.attempted - r.completed or r.sip_flows_closed
                       for r in runs)
        if opts.keep or troubled:
            log.info("work folder kept: %s", workdir)
            result["workdir"] = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if profiler is not None and opts.profile is not None:
        profiler.dump_stats(str(opts.profile))
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(40)
        sys.stderr.write(text.getvalue())
        result["profiled"] = str(opts.profile)
    result.update(summarize(runs, opts))
    result.update({"cpus": os.cpu_count(), "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                   "kamailio": kamailio_version(),
                   "python": sys.version.split()[0], "runtime_s": round(time.perf_counter() - began, 1)})
    attempted = sum(r.attempted for r in runs)
    bad = sum(r.failed + r.pushes_missing for r in runs) + sum(max(0, r.attempted - r.calls_held) for r in runs)
    return result, bad <= MAX_FAILED_FRACTION * max(1, attempted)


def _median(values: Sequence[float], digits: int = 3) -> float | None:
    return round(statistics.median(values), digits) if values else None


def summarize(runs: list[Run], opts: Options) -> dict[str, Any]:
    latency: dict[str, Any] = {}
    for name in LATENCIES:
        per = [percentiles(r.latencies.get(name, [])) for r in runs]
        pooled = percentiles([v for r in runs for v in r.latencies.get(name, [])])
        latency[name] = {
            **{k: _median([float(p[k]) for p in per if k in p]) for k in ("p50", "p90", "p99")},
            "max": pooled.get("max"), "pooled_p99": pooled.get("p99"), "n": pooled.get("n", 0),
            "p99_per_repeat": [p.get("p99") for p in per],
        }
    p99_sent = latency["invite_to_push_sent"]["p99"]
    p99_wire = latency["invite_to_wire"]["p99"]
    p99_mediator = latency["invite_to_mediator"]["p99"]
    return {
        "calls_attempted": sum(r.attempted for r in runs),
        "calls_held": sum(r.calls_held for r in runs),
        "calls_completed": sum(r.completed for r in runs),
        "sipp_failed_calls": sum(r.failed for r in runs),
        "pushes_missing": sum(r.pushes_missing for r in runs),
        "push_connections_opened": sum(r.new_connections for r in runs),
        "push_pool_waits": sum(r.pool_waits for r in runs),
        "sip_flows_closed": sum(len(r.sip_flows_closed) for r in runs),
        "held_max": max((r.held_max for r in runs), default=0),
        "held_steady_median": _median([r.held_steady for r in runs], 1),
        "expected_held": round(opts.rate * opts.wake_timeout),
        "latency_ms": latency,
        "loop_lag_ms": {"p99": _median([float(r.loop_lag_ms.get("p99", 0)) for r in runs]),
                        "max": max((float(r.loop_lag_ms.get("max", 0)) for r in runs), default=None)},
        "gc_pauses_ms": {f"gen{g}": {"count": sum(r.gc_ms[f"gen{g}"]["count"] for r in runs),
                                     "max": max((r.gc_ms[f"gen{g}"]["max"] for r in runs), default=0.0)}
                         for g in (0, 1, 2)},
        "gc_in_window": {f"gen{g}": sum(r.gc_in_window.get(f"gen{g}", 0) for r in runs) for g in (0, 1, 2)},
        "over_goal": {cause: sum(r.over_goal.get(cause, 0) for r in runs) for cause in TAIL_CAUSES},
        "cpu_s_per_call": _median([r.cpu_s / max(1, r.attempted) for r in runs], 6),
        "mediator_cpu_s_per_call": _median([r.mediator_cpu_s / max(1, r.attempted) for r in runs
                                            if r.mediator_cpu_s is not None], 6),
        "kamailio_cpu_s_per_call": _median([r.kamailio_cpu_s / max(1, r.attempted) for r in runs], 6),
        "goal_p99_ms": GOAL_P99_MS,
        "meets_goal": p99_wire is not None and p99_wire <= GOAL_P99_MS,
        "meets_goal_push_sent": p99_sent is not None and p99_sent <= GOAL_P99_MS,
        "meets_goal_mediator": p99_mediator is not None and p99_mediator <= GOAL_P99_MS,
        "runs": [r.summary() for r in runs],
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> Options | Path:
    parser = argparse.ArgumentParser(
        prog="invite_to_push",
        description="Latency from a held INVITE to its push request at a fixed call rate (sipp → Kamailio "
                    "→ the core → a mediator); prints one JSON line.")
    parser.add_argument("--rate", type=float, default=GOAL_RATE, help="calls per second (default 100)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of calling per repeat (default 20)")
    parser.add_argument("--instances", type=int, default=200,
                        help="sleeping instances called round-robin (default 200)")
    parser.add_argument("--wake-timeout", type=float, default=3.0,
                        help="T1: seconds every call is held before 480 (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs (default 3)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of unmeasured calling first (default 3; 0 = none)")
    parser.add_argument("--mediator", choices=("process", "inline"), default="process",
                        help="mediator in a child process (default) or on the core's event loop")
    parser.add_argument("--mediator-sched", choices=("batch", "normal"), default="batch",
                        help="scheduling policy of the mediator process: batch (default; it never preempts the "
                             "core when woken by a push request, as a remote mediator would not) or normal")
    parser.add_argument("--keepalive", type=float, default=30.0,
                        help="sip.keepalive_interval of the core, seconds (default 30 as in the product; 0 = off)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="cProfile the measured runs into this file (latencies then inflated)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, sipp files)")
    parser.add_argument("--mediator-child", type=Path, default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.mediator_child is not None:
        return Path(ns.mediator_child)
    if ns.rate <= 0 or ns.duration <= 0 or ns.wake_timeout <= 0 or ns.warmup < 0 or ns.keepalive < 0:
        parser.error("--rate, --duration and --wake-timeout must be > 0, --warmup and --keepalive >= 0")
    if ns.instances < 1 or ns.repeats < 1:
        parser.error("--instances and --repeats must be at least 1")
    if ns.instances > 99999:
        parser.error("--instances: at most 99999 load users")
    return Options(ns.rate, ns.duration, ns.instances, ns.wake_timeout, ns.repeats, ns.warmup, ns.mediator,
                   ns.keepalive, ns.profile, ns.keep, ns.mediator_sched)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if isinstance(opts, Path):
        stderr_logging()
        return asyncio.run(mediator_child(opts))
    unavailable = None if shutil.which("sipp") and shutil.which("kamailio") else "kamailio and sipp are needed"
    return run_main("invite_to_push", log, lambda: asyncio.run(run_benchmark(opts)), unavailable=unavailable)


if __name__ == "__main__":
    sys.exit(main())
