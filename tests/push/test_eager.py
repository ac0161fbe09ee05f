"""``start_eagerly``: the coroutine runs in the caller's stack up to its first suspension, then as a
task — results, exceptions, cancellation and context variables as with ``asyncio.ensure_future``."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from sipis.push.eager import start_eagerly

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="outer")


async def test_runs_at_once_until_it_waits_then_as_a_task() -> None:
    steps: list[str] = []
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def work() -> int:
        steps.append("before")
        value = await gate
        steps.append("after")
        await asyncio.sleep(0)  # a bare yield too
        return value + 1

    task = start_eagerly(work())
    assert steps == ["before"] and not task.done()
    gate.set_result(41)
    assert await task == 42 and steps == ["before", "after"]


async def test_finished_at_once_or_failed_at_once() -> None:
    async def value() -> str:
        return "done"

    async def failing() -> None:
        raise ValueError("boom")

    done = start_eagerly(value())
    assert done.done() and done.result() == "done"
    failed = start_eagerly(failing())
    assert failed.done() and isinstance(failed.exception(), ValueError)

    async def failing_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    with pytest.raises(KeyError):
        await start_eagerly(failing_later())


async def test_cancel_reaches_the_coroutine_where_it_waits() -> None:
    cleaned: list[str] = []
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        try:
            await gate
        finally:
            cleaned.append("finally")

    task = start_eagerly(work())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally"] and task.cancelled() and gate.cancelled()

    # cancelled before the task's first step, with the awaited future already done
    done_gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def guarded() -> str:
        try:
            await done_gate
        except asyncio.CancelledError:
            return "saw the cancellation"
        return "not cancelled"

    early = start_eagerly(guarded())
    done_gate.set_result(None)
    early.cancel()
    assert await early == "saw the cancellation"


async def test_context_variables_stay_with_the_coroutine() -> None:
    async def work() -> str:
        VAR.set("inner")
        await asyncio.sleep(0)
        return VAR.get()

    task = start_eagerly(work())
    assert VAR.get() == "outer"  # the eager part did not leak into the caller's context
    assert await task == "inner"
