"""What the benchmarks share: the event-loop lag sampler and the ``main()`` envelope around a run."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

Outcome = tuple[dict[str, Any], bool]  # (the JSON document, whether the run stayed within its limits)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task (a sampler, a reader) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def end_child(proc: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """End a helper child that quits when its stdin closes; killed after ``grace`` seconds."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        proc.kill()
        await proc.wait()


class LoopLag:
    """How late the event loop wakes a task that sleeps ``interval``: what delays every timer.

    A late wake-up is either the loop busy with other work or the whole process not scheduled (shared
    cores, other benchmarks running). ``busy`` is the part of a lag this thread spent on the CPU
    (``time.thread_time``): the stall the loop's own work caused.

    Always kept: ``max``, ``over_100ms`` and ``over_1s`` since the last :meth:`reset`. With
    ``keep=True`` also every wake-up with its time (``at``, ``lag``, ``busy``), so windows can be cut out
    afterwards; off by default because a long run at a coarse interval needs only the running figures
    (and its memory measurements should not see the samples).
    """

    def __init__(self, interval: float, *, keep: bool = False) -> None:
        self.interval = interval
        self.keep = keep
        self.max = 0.0
        self.over_100ms = 0
        self.over_1s = 0
        self.at: list[float] = []  # when the wake-up happened (time.monotonic)
        self.lag: list[float] = []  # seconds late
        self.busy: list[float] = []  # of that, seconds this thread ran (bounded by the lag)
        self._epoch = 0
        self._task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        """Start the running figures afresh (kept samples stay); a sleep under way now is not counted."""
        self.max, self.over_100ms, self.over_1s = 0.0, 0, 0
        self._epoch += 1

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="bench-loop-lag")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        # locals: at a 1 ms interval this loop's own cost would show up in what it measures
        interval, keep, at, lag, busy = self.interval, self.keep, self.at, self.lag, self.busy
        clock, cpu = time.monotonic, time.thread_time
        while True:
            before, cpu_before, epoch = clock(), cpu(), self._epoch
            await asyncio.sleep(interval)
            woke, ran = clock(), cpu() - cpu_before
            late = max(0.0, woke - before - interval)
            if keep:
                at.append(woke)
                lag.append(late)
                busy.append(min(late, ran))
            if epoch == self._epoch:
                self.max = max(self.max, late)
                self.over_100ms += late > 0.1
                self.over_1s += late > 1.0

    def began(self, k: int) -> float:
        """When the ``k``-th kept wake-up was due: the loop was blocked (or not scheduled) from about then."""
        return self.at[k] - self.lag[k] - self.interval / 2

    def window(self, start: float, end: float, *, busy: bool = False) -> list[float]:
        """The kept lags (or their busy parts) of the wake-ups between ``start`` and ``end``."""
        lo, hi = bisect.bisect_left(self.at, start), bisect.bisect_right(self.at, end)
        return (self.busy if busy else self.lag)[lo:hi]

    def worst(self, start: float, end: float, *, busy: bool = False) -> tuple[float, float]:
        """(lag, when it began) of the worst kept wake-up in the window."""
        lo, hi = bisect.bisect_left(self.at, start), bisect.bisect_right(self.at, end)
        if lo >= hi:
            return 0.0, start
        values = self.busy if busy else self.lag
        k = max(range(lo, hi), key=values.__getitem__)
        return values[k], self.began(k)


def stderr_logging() -> None:
    """Log warnings to stderr unless the caller set logging up: stdout carries only the JSON line."""
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")


def error_line(benchmark: str, error: str) -> int:
    """Print the one JSON line of a benchmark that could not run; its exit status."""
    print(json.dumps({"benchmark": benchmark, "error": error}))
    return 2


def run_main(benchmark: str, log: logging.Logger, run: Callable[[], Outcome], *,
             unavailable: str | None = None) -> int:
    """The envelope of every benchmark's ``main()`` after its arguments are parsed: progress on stderr,
    exactly one JSON line on stdout, exit status 0 (within limits), 1 (not) or 2 (could not run:
    ``unavailable`` says why up front, or ``run`` raised)."""
    stderr_logging()
    log.setLevel(logging.INFO)
    if unavailable is not None:
        return error_line(benchmark, unavailable)
    try:
        doc, within_limits = run()
    except Exception as exc:  # a peer missing or broken: say so in the one JSON line
        log.exception("benchmark could not run")
        return error_line(benchmark, f"{type(exc).__name__}: {exc}")
    print(json.dumps(doc, separators=(",", ":")))
    return 0 if within_limits else 1
