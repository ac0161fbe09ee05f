"""A headless ``sipis-console demo`` run, in-process: the real core, the lab PBX, the lab mediator,
12 simulated apps and callers at 3 calls/s for 15 s (seeded), with short core timers. A quarter of
the apps push through the lab's FCM and a quarter through its APNs (the core's real ``fcm`` and
``apns`` providers), the rest through the Acrobits mediator; every provider gets pushes accepted
and delivered to its phones.

Every instance state, every push outcome and every call outcome the lab is built to produce must
show up in the summary: ``active``/``inactive``/``proxied`` (apps coming and going) and ``off``
(an app enrolled with a stale password ages out); pushes ``accepted``, ``rejected-permanent`` (dead
token) and ``rejected-transient`` (a 503 whose Retry-After outlasts the wake timer); calls released
and answered, rejected by the app, ``no-response`` from a never-waking phone (T1), cancelled by the
caller and ``device-unreachable``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from lab.demo import DemoOptions, format_summary, options_from_args, run_demo
from lab.mediator import Distribution, MediatorPolicy
from lab.phones import PhoneProfile
from sipis_console.cli import build_parser

SEED = 2


def demo_options() -> DemoOptions:
    return DemoOptions(
        apps=12, call_rate=3.0, duration=15.0, seed=SEED, headless=True, drain=2.0,
        wake_timeout=4.0, answer_timeout=4.0, not_registered_max_age=4.0, ageing_interval=1.0,
        never_wake_rate=0.17, dead_token_rate=0.17, stale_password_rate=0.08, cancel_rate=0.2,
        fcm_rate=0.25, apns_rate=0.25,
        mediator=MediatorPolicy(transient_rate=0.3, retry_after=Distribution.choice(None, 30)),
        profile=PhoneProfile(background=Distribution.exponential(20.0), foreground=Distribution.exponential(4.0),
                             reject_rate=0.4),
    )


async def test_headless_demo_shows_every_state_and_outcome() -> None:
    summary = await run_demo(demo_options())

    assert summary["seed"] == SEED and summary["apps"] == 12
    assert summary["phones"]["kinds"] == {"dead-token": 2, "never-wakes": 2, "normal": 7, "stale-password": 1}
    assert sum(summary["instances"].values()) == 12

    seen = summary["instance_states_seen"]
    assert all(seen[state] >= 1 for state in ("active", "inactive", "proxied", "off")), seen

    pushes = summary["pushes"]
    assert all(pushes[verdict] >= 1 for verdict in ("accepted", "rejected-permanent", "rejected-transient")), pushes
    assert summary["pushes_by_kind"]["call"]["accepted"] >= 1
    attempts = summary["push_attempts"]
    assert attempts["rejected-transient"] >= pushes["rejected-transient"]

    assert summary["phones"]["push_types"] == {"acrobits": 6, "apns": 3, "fcm": 3}
    by_provider, attempts_by_provider = summary["pushes_by_provider"], summary["push_attempts_by_provider"]
    assert set(by_provider) == set(attempts_by_provider) == {"mediator", "fcm", "apns"}
    for name in ("mediator", "fcm", "apns"):  # the core's real providers, accepted by the lab's endpoints
        assert by_provider[name]["accepted"] >= 1 and attempts_by_provider[name]["accepted"] >= 1, (
            name, by_provider, attempts_by_provider)
    assert sum(group["accepted"] for group in by_provider.values()) == pushes["accepted"]

    calls = summary["calls"]
    for outcome in ("released-answered", "released-rejected", "no-response", "cancelled-held", "device-unreachable"):
        assert calls[outcome] >= 1, (outcome, calls)
    assert summary["calls_total"] == sum(calls.values()) >= 10
    held = summary["held_calls"]
    assert all(held.get(outcome, 0) >= 1 for outcome in ("released", "no-response", "push-rejected")), held

    stats = summary["phones"]["stats"]
    assert stats["woken"] >= 1 and stats["answered"] >= 1 and stats["pushes_ignored"] >= 1
    assert all(stats[f"pushes_via_{kind}"] >= 1 for kind in ("acrobits", "fcm", "apns")), stats

    assert json.loads(json.dumps(summary)) == summary  # the --json line
    text = format_summary(summary)
    assert "released-answered" in text and "seed 2" in text and "fcm: accepted" in text
    # every outcome shown is explained
    assert "terms:" in text and "released-rejected   held by the SIPIS, released to the app" in text


def test_demo_command_line() -> None:
    args = build_parser("demo").parse_args(["demo", "--apps", "7", "--call-rate", "0.25", "--headless", "--duration",
                                            "9", "--seed", "4", "--json", "--wake-delay", "lognormal:2,0.4"])
    options = options_from_args(args)
    assert (options.apps, options.call_rate, options.headless, options.duration, options.seed, options.json) == (
        7, 0.25, True, 9.0, 4, True)
    assert options.wake_delay == Distribution.lognormal(2.0, 0.4)
    assert (options.fcm_rate, options.apns_rate) == (0.2, 0.2)
    mix = options_from_args(build_parser("demo").parse_args(["demo", "--fcm-rate", "0.5", "--apns-rate", "0"]))
    assert (mix.fcm_rate, mix.apns_rate) == (0.5, 0.0)
    defaults = options_from_args(build_parser("demo").parse_args(["demo"]))
    assert not defaults.headless and defaults.duration is None and defaults.wake_timeout == 15.0
    assert defaults.nodes == 1  # embedded SQLite


def test_demo_with_two_nodes_runs_a_cluster_on_a_throwaway_postgresql() -> None:
    result = subprocess.run([sys.executable, "-m", "sipis_console", "demo", "--headless", "--nodes", "2", "--apps",
                             "12", "--call-rate", "1", "--duration", "10", "--seed", "1", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["nodes"].keys() == {"lab-1", "lab-2"}
    assert all(held > 0 for held in summary["nodes"].values()), summary["nodes"]  # both nodes serve
    assert sum(summary["nodes"].values()) == 12 == sum(summary["instances"].values())
    assert summary["pushes"]["accepted"] > 0 and summary["held_calls"].get("released", 0) > 0
    assert "nodes (instances):  lab-1" in result.stderr
