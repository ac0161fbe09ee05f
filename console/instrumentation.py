"""Timing marks: the console says when it reaches the steps of its start-up and of each refresh, to
whoever listens (``bench/console_scale.py`` does; nobody else by default, and then a mark costs one
test of an empty list).

An observer is ``observer(name, detail)``, called in the console's thread at the moment of the mark;
it must be quick and must not raise. The marks, in the order a console reaches them:

==================  ========================================================================
``mounted``         the app is mounted (its screen exists; nothing asked of the core yet)
``page_start``      the first page of the instance list is asked for
``page_end``        … it arrived; detail: its rows
``page_loaded``     … it is in the store, the first frame can show it; detail: the rows in the store
``fetch_start``     the whole instance list is asked for (again after a resync)
``fetch_end``       … it arrived; detail: its rows
``loaded``          … it is in the store; detail: the rows in the store
``tick``            one 1 Hz refresh is done (events applied, visible rows redrawn)
==================  ========================================================================
"""

from __future__ import annotations

from collections.abc import Callable

Observer = Callable[[str, str], None]

_observers: list[Observer] = []


def observe(observer: Observer) -> Callable[[], None]:
    """Call ``observer`` at every mark from now on; returns a function that stops it."""
    _observers.append(observer)

    def stop() -> None:
        if observer in _observers:
            _observers.remove(observer)

    return stop


def mark(name: str, detail: object = "") -> None:
    if _observers:
        text = str(detail)
        for observer in list(_observers):
            observer(name, text)
