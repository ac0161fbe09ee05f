"""``sipis-console demo``: the real core, the lab PBX, the lab mediator, simulated phones and callers.

Everything runs in one event loop on loopback, on free ports, with a throwaway state folder (a
temporary directory, removed at exit):

* the **core** (:class:`sipis.core.Core`, in-process): SIP on ``udp``/``tcp`` ``127.0.0.1:0``, the
  HTTPS app API with its generated certificate, ``[push.mediator]`` (type ``acrobits``),
  ``[push.fcm]`` and ``[push.apns]`` pointing at the lab's endpoints with their CA files and the
  lab's credentials (:meth:`lab.mediator.LabMediator.push_tables`), short timers so things move
  (``register_expires`` 120, ``wake_timeout`` 15, ``answer_timeout`` 15 by default) and quick ageing;
* the **lab PBX** (:class:`lab.pbx.LabPbx`, registrar + forking proxy with 3xx retarget);
* the **lab mediator** (:class:`lab.mediator.LabMediator`: the Acrobits mediator plus FCM- and
  APNs-shaped endpoints, all with latency, transient 503/429s, dead tokens and delivery to the
  phones);
* the **phones** (:class:`lab.phones.PhoneFleet`: most push through the mediator, ``fcm_rate`` of
  them are Android apps on FCM, ``apns_rate`` iOS apps on APNs) and the **callers**
  (:class:`lab.callers.CallerLoad`).

``--nodes N`` (N > 1) runs N cores as the nodes ``lab-1…N`` of one cluster on a throwaway
PostgreSQL (:class:`lab.postgres.PostgresServer`, as the tests start it), sharing one key file, with
``lease_ttl`` 6 s; the phones enrol through node 1's app API and each node registers the instances it
holds. Without ``--nodes`` the core stays on embedded SQLite.

Without ``--headless`` the console runs on the terminal as a child process
(``python -m sipis_console console --socket <core's operator socket>``) when ``console.app`` is
importable and the core has an operator socket; otherwise a one-line status is printed every 2 s.
``--headless`` prints a summary at the end (:func:`format_summary`; one JSON line with ``--json``).

In-process use (tests)::

    summary = await run_demo(DemoOptions(apps=12, call_rate=1.5, duration=18, seed=7))

Summary format (:meth:`DemoLab.summary`; every count key is always present)::

    {"seed", "apps", "call_rate", "startup_s", "duration_s",    # duration: from running to summary
     "instances":        {active, inactive, proxied, off}          # at the end
     "instance_states_seen": {active, inactive, proxied, off}      # transitions into each state
     "calls":            {released-answered, released-rejected, answered, rejected, no-response,
                          not-answered, device-unreachable, instance-off, cancelled, unavailable,
                          timeout, not-found, failed}              # the callers' view
     "calls_total", "calls_unfinished",
     "held_calls":       {released, no-response, not-answered, push-rejected, cancelled, ...}  # the core's view
     "pushes":           {accepted, rejected-permanent, rejected-transient}   # final verdict per push
     "pushes_by_kind":   {"call": {...}, "missed": {...}, ...}
     "pushes_by_provider": {"mediator": {...}, "fcm": {...}, "apns": {...}}   # by [push.NAME]
     "push_attempts":    {accepted, rejected-permanent, rejected-transient}   # what the endpoints answered
     "push_attempts_by_provider": {"mediator": {...}, "fcm": {...}, "apns": {...}}
     "phones":           {"kinds": {...}, "push_types": {...}, "states": {...}, "stats": {...}},
     "nodes":            {node name: instances it holds}}                      # counts summed over nodes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from contract.events import InstanceEnrolled, InstanceStateChanged
from lab.mediator import (
    ACCEPTED,
    PERMANENT,
    PROVIDER_NAMES,
    TRANSIENT,
    Distribution,
    LabMediator,
    MediatorPolicy,
)

if TYPE_CHECKING:  # the rest is imported when a demo starts, so ``sipis-console --help`` stays fast
    from lab.callers import CallerLoad
    from lab.phones import PhoneFleet, PhoneProfile
    from lab.postgres import PostgresServer
    from sipis.config import Config
    from sipis.core import Core
    from sipis.events import Event

log = logging.getLogger(__name__)

STATES = ("active", "inactive", "proxied", "off")
PUSH_VERDICTS = (ACCEPTED, PERMANENT, TRANSIENT)
STATUS_INTERVAL = 2.0
#: seconds calls in progress get to finish after a signal (after --duration: DemoOptions.drain)
SIGNAL_DRAIN = 0.5


@dataclass
class DemoOptions:
    apps: int = 40
    call_rate: float = 0.5
    duration: float | None = None  # None: until Ctrl+C (or the console quits)
    seed: int | None = None  # None: a random one (printed in the summary)
    headless: bool = False
    json: bool = False
    nodes: int = 1  # more: a cluster on a throwaway PostgreSQL
    #: core timers
    register_expires: int = 120
    wake_timeout: float = 15.0
    answer_timeout: float = 15.0
    not_registered_max_age: float = 30.0
    ageing_interval: float = 5.0
    #: after ``duration``: how long calls in progress may still finish
    drain: float = 3.0
    #: lab behaviour
    mediator: MediatorPolicy = field(default_factory=MediatorPolicy)
    profile: PhoneProfile | None = None  # None: lab.phones.PhoneProfile() (with ``wake_delay`` if given)
    wake_delay: Distribution | None = None
    never_wake_rate: float = 0.1
    dead_token_rate: float = 0.05
    stale_password_rate: float = 0.05
    #: shares of the apps pushed through FCM (Android) and APNs (iOS); the rest use the mediator
    fcm_rate: float = 0.2
    apns_rate: float = 0.2
    cancel_rate: float = 0.1
    cancel_after: Distribution = field(default_factory=lambda: Distribution.uniform(0.5, 4.0))
    hold: Distribution = field(default_factory=lambda: Distribution.uniform(1.0, 5.0))
    log_level: str = "error"

    def resolved_seed(self) -> int:
        if self.seed is None:
            self.seed = secrets.randbelow(1_000_000)
        return self.seed


#: a demo cluster's lease_ttl: a joining node takes its share within seconds
DEMO_LEASE_TTL = 6.0


def core_config(state_dir: Path, mediator: LabMediator, enroll_token: str, options: DemoOptions, *,
                node: str = "lab", storage_url: str | None = None) -> Config:
    """The core's config for the lab: free loopback ports, TLS API, the lab's push endpoints, short timers;
    with ``storage_url`` a node of a cluster whose key file is next to ``state_dir``."""
    from sipis.config import parse_config

    cluster: dict[str, Any] = {} if storage_url is None else {
        "storage": {"url": storage_url, "key_file": str(state_dir.parent / "credentials.key")},
        "cluster": {"lease_ttl": DEMO_LEASE_TTL}}
    return parse_config({
        **cluster,
        "state_dir": str(state_dir),
        "node_name": node,
        "sip": {"listen": ["udp:127.0.0.1:0", "tcp:127.0.0.1:0"], "register_expires": options.register_expires,
                "backoff_base": 1, "backoff_max": 30},
        "api": {"listen": "127.0.0.1:0", "enroll_tokens": [enroll_token]},
        "calls": {"wake_timeout": options.wake_timeout, "answer_timeout": options.answer_timeout},
        "ageing": {"not_registered_max_age": options.not_registered_max_age,
                   "check_interval": options.ageing_interval},
        "push": mediator.push_tables(timeout=3),
    }, state_dir.parent)


class DemoLab:
    """Starts and stops every part of the demo in ``workdir``; counts what happens."""

    def __init__(self, options: DemoOptions, workdir: Path) -> None:
        from lab.pbx import LabPbx

        self.options = options
        self.seed = options.resolved_seed()
        self.workdir = workdir
        self.enroll_token = secrets.token_urlsafe(24)
        self.pbx = LabPbx(transports=("udp", "tcp"), workdir=workdir / "pbx")
        self.mediator = LabMediator(workdir / "mediator", policy=options.mediator,
                                    rng=random.Random(f"{self.seed}:mediator"), fcm=options.fcm_rate > 0,
                                    apns=options.apns_rate > 0)
        self.core: Core | None = None  # node 1: the phones enrol through its app API
        self.cores: list[Core] = []
        self.postgres: PostgresServer | None = None
        self.fleet: PhoneFleet | None = None
        self.callers: CallerLoad | None = None
        self.states_seen: Counter[str] = Counter()
        self.started_at = time.monotonic()
        self.running_since: float | None = None
        self.startup_s: float | None = None
        self._unsubscribe: list[Callable[[], None]] = []

    async def start(self) -> None:
        from dataclasses import replace

        from lab.callers import CallerLoad, CallerSettings
        from lab.phones import FleetSettings, PhoneFleet, PhoneProfile
        from sipis.core import Core

        options = self.options
        profile = options.profile or PhoneProfile()
        if options.wake_delay is not None:
            profile = replace(profile, wake_delay=options.wake_delay)
        self.started_at = time.monotonic()
        await self.pbx.start()
        await self.mediator.start()
        if options.nodes == 1:
            self.cores = [Core(core_config(self.workdir / "state", self.mediator, self.enroll_token, options))]
        else:
            from lab.postgres import PostgresServer

            self.postgres = PostgresServer()  # its own folder: the postgres user must reach it
            await asyncio.to_thread(self.postgres.start)
            url = await asyncio.to_thread(self.postgres.create_database, "demo")
            self.cores = [Core(core_config(self.workdir / f"state-{k}", self.mediator, self.enroll_token, options,
                                           node=f"lab-{k}", storage_url=url)) for k in range(1, options.nodes + 1)]
        self.core = self.cores[0]
        listening = await self.core.start()  # first: it creates the schema and the key file
        for core in self.cores[1:]:
            await core.start()
        assert listening.api_url is not None
        self._unsubscribe = [core.bus.subscribe(self._on_event) for core in self.cores]
        self.fleet = PhoneFleet(FleetSettings(
            apps=options.apps, profile=profile, never_wake_rate=options.never_wake_rate,
            dead_token_rate=options.dead_token_rate, stale_password_rate=options.stale_password_rate,
            fcm_rate=options.fcm_rate, apns_rate=options.apns_rate,
        ), pbx=self.pbx, mediator=self.mediator, api_url=listening.api_url,
            api_ca_file=self.core.config.api.tls_cert, enroll_token=self.enroll_token, seed=self.seed)
        await self.fleet.start()
        fleet = self.fleet
        self.callers = CallerLoad(self.pbx, lambda: fleet.users, settings=CallerSettings(
            rate=options.call_rate, cancel_rate=options.cancel_rate, cancel_after=options.cancel_after,
            hold=options.hold), rng=random.Random(f"{self.seed}:callers"))
        await self.callers.start()
        self.running_since = time.monotonic()
        self.startup_s = self.running_since - self.started_at

    async def stop_load(self, drain: float | None = None) -> None:
        """Stop placing calls and let the calls in progress finish (up to ``drain`` seconds, by
        default the options')."""
        if self.callers is not None:
            await self.callers.stop(drain=self.options.drain if drain is None else drain)

    async def stop(self) -> None:
        """Stop everything, callers first and the PBX last but one (the core unregisters at it)."""
        if self.callers is not None:
            await self.callers.stop()
        await self._settle()
        if self.fleet is not None:
            await self.fleet.stop()
        while self._unsubscribe:
            self._unsubscribe.pop()()
        for core in reversed(self.cores):
            await core.stop()
        await self.pbx.stop()
        await self.mediator.stop()
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.close)

    async def _settle(self, timeout: float = 3.0) -> None:
        """Give the cores a moment to end the calls the callers cancelled and send their pushes."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        for calls in (core.calls for core in self.cores if core.calls is not None):
            while calls.held and loop.time() < until:
                await asyncio.sleep(0.05)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(calls.drain(), max(0.1, until - loop.time()))

    async def __aenter__(self) -> DemoLab:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ counting

    def _on_event(self, event: Event) -> None:
        payload = event.payload
        if isinstance(payload, InstanceStateChanged):
            self.states_seen[payload.state] += 1
        elif isinstance(payload, InstanceEnrolled):
            self.states_seen["active"] += 1

    @property
    def operator_socket(self) -> str | None:
        if self.core is None:
            return None
        operator = getattr(self.core.config, "operator", None)
        socket = getattr(operator, "socket", None)
        return str(socket) if socket is not None and Path(socket).exists() else None

    def instance_states(self) -> dict[str, int]:
        """Each instance counted once: by the node that holds it."""
        counts = Counter(i.state.value for core in self.cores if core.service is not None
                         for i in core.service.instances.values()
                         if core.keeper is None or core.keeper.owns(i.selector))
        return {state: counts.get(state, 0) for state in STATES}

    def node_instances(self) -> dict[str, int]:
        return {core.config.node_name: core.keeper.held() if core.keeper is not None else 0 for core in self.cores}

    def held_outcomes(self) -> Counter[str]:
        return sum((Counter(core.calls.outcomes) for core in self.cores if core.calls is not None), Counter())

    def push_verdicts(self) -> tuple[dict[str, int], dict[str, dict[str, int]], dict[str, dict[str, int]]]:
        """Final verdicts of the core's pushes: in total, by kind and by provider (``[push.NAME]``)."""
        totals: Counter[str] = Counter()
        kinds: dict[str, Counter[str]] = {}
        providers: dict[str, Counter[str]] = {self.provider_name(t): Counter() for t in self.mediator.provider_types}
        traces = (trace for core in self.cores if core.delivery is not None for trace in core.delivery.traces.values())
        for trace in traces:
            if trace.outcome == "pending":
                continue
            totals[trace.outcome] += 1
            kinds.setdefault(str(trace.kind), Counter())[trace.outcome] += 1
            providers.setdefault(trace.provider, Counter())[trace.outcome] += 1
        return ({v: totals.get(v, 0) for v in PUSH_VERDICTS}, _by_verdict(sorted(kinds.items())),
                _by_verdict(providers.items()))  # providers: mediator, fcm, apns, as the lab lists them

    @staticmethod
    def provider_name(push_type: str) -> str:
        return PROVIDER_NAMES.get(push_type, push_type)

    def summary(self) -> dict[str, Any]:
        from lab.callers import OUTCOMES

        pushes, by_kind, by_provider = self.push_verdicts()
        callers = self.callers
        outcomes = callers.outcomes if callers is not None else Counter()
        held = dict(sorted(self.held_outcomes().items()))
        fleet = self.fleet
        return {
            "seed": self.seed, "apps": self.options.apps, "call_rate": self.options.call_rate,
            "startup_s": round(self.startup_s or 0.0, 1),
            "duration_s": round(time.monotonic() - (self.running_since or self.started_at), 1),
            "instances": self.instance_states(),
            "instance_states_seen": {state: self.states_seen.get(state, 0) for state in STATES},
            "calls": {outcome: outcomes.get(outcome, 0) for outcome in OUTCOMES},
            "calls_total": sum(outcomes.values()),
            "calls_unfinished": callers.in_flight + callers.abandoned if callers is not None else 0,
            "held_calls": held,
            "pushes": pushes,
            "pushes_by_kind": by_kind,
            "pushes_by_provider": by_provider,
            "push_attempts": {v: self.mediator.answers.get(v, 0) for v in PUSH_VERDICTS},
            "push_attempts_by_provider": {
                self.provider_name(t): {v: counts.get(v, 0) for v in PUSH_VERDICTS}
                for t, counts in self.mediator.answers_by_provider.items()},
            "phones": {
                "kinds": dict(sorted(fleet.kinds().items())) if fleet else {},
                "push_types": dict(sorted(fleet.push_types().items())) if fleet else {},
                "states": dict(sorted(fleet.states().items())) if fleet else {},
                "stats": dict(sorted(fleet.stats().items())) if fleet else {},
            },
            "nodes": self.node_instances(),
        }

    def status_line(self) -> str:
        states = self.instance_states()
        held = sum(len(core.calls.held) for core in self.cores if core.calls is not None)
        pushes, _, _ = self.push_verdicts()
        outcomes = self.callers.outcomes if self.callers is not None else Counter()
        calls = " ".join(f"{k} {v}" for k, v in outcomes.most_common())
        return (f"[{time.monotonic() - (self.running_since or self.started_at):5.0f}s] "
                + " ".join(f"{s} {states[s]}" for s in STATES)
                + f" | held {held} | calls {sum(outcomes.values())}: {calls or '-'}"
                + " | pushes " + " ".join(f"{k} {v}" for k, v in pushes.items()))


def _by_verdict(groups: Iterable[tuple[str, Counter[str]]]) -> dict[str, dict[str, int]]:
    return {k: {v: c.get(v, 0) for v in PUSH_VERDICTS} for k, c in groups}


# ====================================================================== running it


async def run_demo(options: DemoOptions, *, stop: asyncio.Event | None = None,
                   workdir: Path | None = None) -> dict[str, Any]:
    """Headless: run for ``options.duration`` (or until ``stop``), return :meth:`DemoLab.summary`."""
    own = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="sipis-demo-")) if workdir is None else workdir
    try:
        async with DemoLab(options, folder) as lab:
            await _wait(stop or asyncio.Event(), options.duration)
            await lab.stop_load()
            return lab.summary()
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)


async def _wait(stop: asyncio.Event, duration: float | None) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), duration)


def console_available() -> bool:
    """``console.app`` and the ``sipis-console`` command line are installed (looked up, not imported:
    the lab runs the console only as a child process)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("console.app", "sipis_console.cli"))
    except (ImportError, ValueError):
        return False


async def _run_console(lab: DemoLab, stop: asyncio.Event, duration: float | None) -> int | None:
    """The console as a child process on this terminal until it quits, ``stop`` or ``duration``;
    its exit status (0 when we ended it), or None when it cannot run here."""
    socket = lab.operator_socket
    if socket is None or not console_available() or not sys.stdin.isatty():
        return None
    child = await asyncio.create_subprocess_exec(sys.executable, "-m", "sipis_console", "console", "--socket",
                                                 socket)
    waiter = asyncio.ensure_future(child.wait())
    stopper = asyncio.ensure_future(stop.wait())
    status: int | None = None
    try:
        await asyncio.wait({waiter, stopper}, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        status = child.returncode
    finally:
        stopper.cancel()
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            try:
                await asyncio.wait_for(waiter, 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await waiter
    return status or 0


async def _status_loop(lab: DemoLab, stop: asyncio.Event, duration: float | None, out: TextIO) -> None:
    loop = asyncio.get_running_loop()
    until = None if duration is None else loop.time() + duration
    while not stop.is_set():
        wait = STATUS_INTERVAL if until is None else min(STATUS_INTERVAL, until - loop.time())
        if wait <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
        print(lab.status_line(), file=out, flush=True)


async def run_cli(options: DemoOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """What ``sipis-console demo`` runs: signals, the console or the status line, the summary."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    folder = Path(tempfile.mkdtemp(prefix="sipis-demo-"))
    logging.basicConfig(level=options.log_level.upper(), stream=err,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lab = DemoLab(options, folder)
    try:
        print(f"sipis-console demo: starting {options.apps} apps, {options.call_rate:g} calls/s, "
              f"seed {lab.seed} (state folder {folder}, removed at exit)", file=err, flush=True)
        await lab.start()
        print(f"sipis-console demo: running (PBX udp/tcp {lab.pbx.udp_port}, app API "
              f"{lab.core.listening.api_url if lab.core else '?'}); Ctrl+C stops", file=err, flush=True)
        if options.headless:
            await _wait(stop, options.duration)
        else:
            status: int | None = None
            if lab.operator_socket is not None and console_available() and sys.stdin.isatty():
                _log_to_file(folder / "demo.log")  # the console owns the terminal now
                status = await _run_console(lab, stop, options.duration)
                if status:
                    print(f"sipis-console demo: the console exited with status {status}; stopping", file=err)
            if status is None:
                print("sipis-console demo: the console is not available here "
                      f"({_why_no_console(lab)}); printing a status line every {STATUS_INTERVAL:g} s",
                      file=err, flush=True)
                await _status_loop(lab, stop, options.duration, out)
        # a signal (Ctrl+C, SIGTERM) wants the demo gone now: the calls in progress get a moment only
        await lab.stop_load(min(options.drain, SIGNAL_DRAIN) if stop.is_set() else None)
        summary = lab.summary()
    except Exception as exc:
        log.exception("demo failed")
        print(f"sipis-console demo: failed: {exc}", file=err)
        return 1
    finally:
        with contextlib.suppress(Exception):
            await lab.stop()
        shutil.rmtree(folder, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if options.json:
        print(format_summary(summary), file=err)
        print(json.dumps(summary, separators=(",", ":")), file=out, flush=True)
    else:
        print(format_summary(summary), file=out, flush=True)
    return 0


def _why_no_console(lab: DemoLab) -> str:
    if not console_available():
        return "console.app or the 'sipis-console console' command is not there yet"
    if lab.operator_socket is None:
        return "the core exposes no operator socket"
    return "stdin is not a terminal"


def _log_to_file(path: Path) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable summary: one line per group, zero counts left out."""

    def counts(values: dict[str, Any]) -> str:
        shown = [f"{k} {v}" for k, v in values.items() if v]
        return ", ".join(shown) or "none"

    def groups(values: dict[str, dict[str, Any]]) -> str:
        return "; ".join(f"{name}: {counts(group)}" for name, group in values.items()) or "none"

    calls = f"calls ({summary['calls_total']}):"
    lines = [
        f"demo summary: {summary['apps']} apps, {summary['call_rate']:g} calls/s, "
        f"{summary['duration_s']:g} s (+{summary['startup_s']:g} s start-up), seed {summary['seed']}",
        f"  instances now:      {counts(summary['instances'])}",
        f"  states seen:        {counts(summary['instance_states_seen'])}",
        f"  {calls:<18}  {counts(summary['calls'])}"
        + (f" (+{summary['calls_unfinished']} unfinished)" if summary["calls_unfinished"] else ""),
        f"  held calls (core):  {counts(summary['held_calls'])}",
        f"  pushes:             {counts(summary['pushes'])}",
        f"  ... by provider:    {groups(summary.get('pushes_by_provider', {}))}",
        f"  provider answers:   {counts(summary['push_attempts'])}",
        f"  ... by provider:    {groups(summary.get('push_attempts_by_provider', {}))}",
        f"  phones:             {counts(summary['phones']['kinds'])}",
        f"  phones' push:       {counts(summary['phones'].get('push_types', {}))}",
    ]
    if len(summary.get("nodes", {})) > 1:
        lines.append(f"  nodes (instances):  {counts(summary['nodes'])}")
    return "\n".join(lines + _terms(summary))


def _terms(summary: dict[str, Any]) -> list[str]:
    """What the calls' outcomes that occurred mean, and whose counts the two call lines are."""
    from lab.callers import OUTCOME_MEANINGS

    used = [name for name, count in summary["calls"].items() if count]
    return ["  terms: 'calls' are the callers' view of every call, 'held calls (core)' the core's of those it held",
            "         for a sleeping app; 'unfinished' calls were still ringing when the demo stopped",
            *(f"    {name:<18}  {OUTCOME_MEANINGS[name]}" for name in used if name in OUTCOME_MEANINGS)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's description and options."""
    from sipis.config.model import LOG_LEVELS

    parser.description = ("Start the real core with a throwaway state folder, the lab PBX, the lab push mediator, "
                          "simulated apps and callers, all on loopback on free ports. Ctrl+C stops everything "
                          "cleanly.")
    parser.add_argument("--apps", type=_positive_int, default=40, metavar="N", help="simulated apps (default 40)")
    parser.add_argument("--call-rate", type=_non_negative, default=0.5, metavar="R",
                        help="new calls per second (default 0.5)")
    parser.add_argument("--duration", type=_positive, default=None, metavar="S",
                        help="stop after S seconds (default: run until Ctrl+C)")
    parser.add_argument("--seed", type=int, default=None, metavar="N", help="seed for every random choice")
    parser.add_argument("--headless", action="store_true", help="no console; print a summary at the end")
    parser.add_argument("--nodes", type=_positive_int, default=1, metavar="N",
                        help="run N cores as one cluster on a throwaway PostgreSQL (default 1: embedded SQLite)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON line on stdout (the text goes to stderr)")
    parser.add_argument("--wake-timeout", type=_positive, default=15.0, metavar="S", help="T1 (default 15)")
    parser.add_argument("--answer-timeout", type=_positive, default=15.0, metavar="S", help="T2 (default 15)")
    parser.add_argument("--wake-delay", type=_distribution, default=None, metavar="DIST",
                        help="phones' wake-up delay (default lognormal:1.5,0.5)")
    parser.add_argument("--never-wake-rate", type=_fraction, default=0.1, metavar="F",
                        help="share of phones that never wake (default 0.1)")
    parser.add_argument("--dead-token-rate", type=_fraction, default=0.05, metavar="F",
                        help="share of phones with a dead push token (default 0.05)")
    parser.add_argument("--transient-rate", type=_fraction, default=0.05, metavar="F",
                        help="share of push requests the lab's push endpoints answer 503/429 (default 0.05)")
    parser.add_argument("--fcm-rate", type=_fraction, default=0.2, metavar="F",
                        help="share of apps pushed through the lab's FCM (Android; default 0.2)")
    parser.add_argument("--apns-rate", type=_fraction, default=0.2, metavar="F",
                        help="share of apps pushed through the lab's APNs (iOS; default 0.2); "
                             "the rest use the Acrobits mediator")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="error",
                        help="log level of the core and the lab on stderr (default error)")


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    return DemoOptions(
        apps=args.apps, call_rate=args.call_rate, duration=args.duration, seed=args.seed, headless=args.headless,
        json=args.json, nodes=args.nodes, wake_timeout=args.wake_timeout, answer_timeout=args.answer_timeout,
        never_wake_rate=args.never_wake_rate, dead_token_rate=args.dead_token_rate,
        fcm_rate=args.fcm_rate, apns_rate=args.apns_rate,
        mediator=MediatorPolicy(transient_rate=args.transient_rate), wake_delay=args.wake_delay,
        log_level=args.log_level,
    )


def main(args: argparse.Namespace) -> int:
    """Entry point for ``sipis-console demo`` (parsed arguments from :func:`add_arguments`)."""
    options = options_from_args(args)
    try:
        return asyncio.run(run_cli(options))
    except KeyboardInterrupt:
        return 130


def _number(text: str, kind: type[float] | type[int], check: Callable[[float], bool], what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not check(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return int(_number(text, int, lambda v: v >= 1, "an integer >= 1"))


def _positive(text: str) -> float:
    return float(_number(text, float, lambda v: v > 0, "a number > 0"))


def _non_negative(text: str) -> float:
    return float(_number(text, float, lambda v: v >= 0, "a number >= 0"))


def _fraction(text: str) -> float:
    return float(_number(text, float, lambda v: 0.0 <= v <= 1.0, "a fraction between 0 and 1"))


def _distribution(text: str) -> Distribution:
    try:
        return Distribution.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


__all__ = ["DemoLab", "DemoOptions", "add_arguments", "core_config", "format_summary", "main",
           "options_from_args", "run_cli", "run_demo"]
