"""Readiness (sipis/readiness.py): the reasons a node cannot serve."""

from __future__ import annotations

from sipis.readiness import MAX_LOOP_LAG, Readiness


def test_ready_only_when_storage_commits_sip_listens_the_loop_is_on_time_and_not_shutting_down() -> None:
    storage: list[str | None] = [None]
    listening = [True]
    lag = [0.0]
    ready = Readiness(storage_error=lambda: storage[0], sip_listening=lambda: listening[0], loop_lag=lambda: lag[0])
    assert ready.reasons() == []
    storage[0] = "disk full"
    listening[0] = False
    lag[0] = MAX_LOOP_LAG + 0.5
    ready.draining = True
    assert ready.reasons() == ["storage failing: disk full", "SIP not listening", "event loop 1.5 s late",
                               "shutting down"]
    storage[0], listening[0], lag[0], ready.draining = None, True, 0.2, False
    assert ready.reasons() == []
