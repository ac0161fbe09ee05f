"""A headless ``sipis-console demo`` run, in-process: the real core, the lab PBX, the lab mediator,
12 simulated apps and callers at 2 calls/s for 15 s (seeded), with short core timers.

Every instance state, every push outcome and every call outcome the lab is built to produce must
show up in the summary: ``active``/``inactive``/``proxied`` (apps coming and going) and ``off``
(an app enrolled with a stale password ages out); pushes ``accepted``, ``rejected-permanent`` (dead
token) and ``rejected-transient`` (a 503 whose Retry-After outlasts the wake timer); calls released
and answered, rejected by the app, ``no-response`` from a never-waking phone (T1), cancelled by the
caller and ``device-unreachable``.
"""

from __future__ import annotations

import json

from console.cli import build_parser
from lab.demo import DemoOptions, format_summary, options_from_args, run_demo
from lab.mediator import Distribution, MediatorPolicy
from lab.phones import PhoneProfile

SEED = 2


def demo_options() -> DemoOptions:
    return DemoOptions(
        apps=12, call_rate=2.0, duration=15.0, seed=SEED, headless=True, drain=2.0,
        wake_timeout=4.0, answer_timeout=4.0, not_registered_max_age=4.0, ageing_interval=1.0,
        never_wake_rate=0.17, dead_token_rate=0.17, stale_password_rate=0.08, cancel_rate=0.2,
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

    calls = summary["calls"]
    for outcome in ("released-answered", "released-rejected", "no-response", "cancelled", "device-unreachable"):
        assert calls[outcome] >= 1, (outcome, calls)
    assert summary["calls_total"] == sum(calls.values()) >= 10
    held = summary["held_calls"]
    assert all(held.get(outcome, 0) >= 1 for outcome in ("released", "no-response", "push-rejected")), held

    stats = summary["phones"]["stats"]
    assert stats["woken"] >= 1 and stats["answered"] >= 1 and stats["pushes_ignored"] >= 1

    assert json.loads(json.dumps(summary)) == summary  # the --json line
    text = format_summary(summary)
    assert "released-answered" in text and "seed 2" in text


def test_demo_command_line() -> None:
    args = build_parser().parse_args(["demo", "--apps", "7", "--call-rate", "0.25", "--headless", "--duration", "9",
                                      "--seed", "4", "--json", "--wake-delay", "lognormal:2,0.4"])
    options = options_from_args(args)
    assert (options.apps, options.call_rate, options.headless, options.duration, options.seed, options.json) == (
        7, 0.25, True, 9.0, 4, True)
    assert options.wake_delay == Distribution.lognormal(2.0, 0.4)
    defaults = options_from_args(build_parser().parse_args(["demo"]))
    assert not defaults.headless and defaults.duration is None and defaults.wake_timeout == 15.0
