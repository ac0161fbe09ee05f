"""Start a coroutine *now*, in the caller's stack, and let a task take over at its first suspension.

``asyncio.ensure_future`` only schedules a coroutine: its first step runs in a later turn of the
event loop, after every callback already queued. For a push that is a wait behind whatever else
the loop has to do when an INVITE arrives. :func:`start_eagerly` runs the coroutine synchronously
up to its first real ``await`` (for a push over :class:`~sipis.push.transport.Http11Transport`:
the request is written by then) and hands the rest to a task, like Python 3.12's eager tasks.

Only for coroutines whose synchronous prefix does not depend on running inside a task of its own:
anything that ties state to ``asyncio.current_task()`` before its first suspension (anyio cancel
scopes, ``asyncio.timeout``) would attach it to the caller's task instead.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def start_eagerly(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run ``coro`` until it first suspends, then continue it as a task (which is returned; a
    coroutine that finished at once gives a finished future). Exceptions end up in the result,
    as with a task."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    try:
        pending = context.run(coro.send, None)
    except StopIteration as stop:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except (KeyboardInterrupt, SystemExit):
        raise
    except asyncio.CancelledError:
        done = loop.create_future()
        done.cancel()
        return done
    except BaseException as exc:
        done = loop.create_future()
        done.set_exception(exc)
        return done
    return loop.create_task(_Resumed(coro, pending), context=context)


class _Resumed(Coroutine[Any, Any, T]):
    """A started coroutine, as the task that takes it over sees it: its first step hands the task
    what the coroutine suspended on (a future, or ``None`` for a bare yield); everything else —
    the values sent in, exceptions thrown in (cancellation, even before that first step), close —
    goes straight to the coroutine, exactly as if the task had run it from the start."""

    __slots__ = ("_coro", "_handed", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, T], pending: Any) -> None:
        self._coro = coro
        self._pending = pending
        self._handed = False

    def send(self, value: Any) -> Any:
        if not self._handed:
            self._handed = True
            pending, self._pending = self._pending, None
            return pending  # a future keeps its "blocking" flag: the task waits for it
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._handed = True
        self._pending = None
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # pragma: no cover - the old three-argument form

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, T]:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = self.throw(error) if error is not None else self.send(value)
            except StopIteration as stop:
                result: T = stop.value
                return result
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # handed on to the coroutine, as awaiting it would
                value, error = None, exc
