"""Readiness (sipis/readiness.py): the reasons a node cannot serve."""

from __future__ import annotations

from sipis.clock import FakeClock
from sipis.readiness import MAX_LOOP_LAG, Readiness


def test_ready_only_when_storage_commits_sip_listens_the_loop_is_on_time_and_not_shutting_down() -> None:
    storage: list[str | None] = [None]
    listening = [True]
    ready = Readiness(FakeClock(), storage_error=lambda: storage[0], sip_listening=lambda: listening[0])
    assert ready.reasons() == []
    storage[0] = "disk full"
    listening[0] = False
    ready.loop_lag = MAX_LOOP_LAG + 0.5
    ready.draining = True
    assert ready.reasons() == ["storage failing: disk full", "SIP not listening", "event loop 1.5 s late",
                               "shutting down"]
    storage[0], listening[0], ready.loop_lag, ready.draining = None, True, 0.2, False
    assert ready.reasons() == []
