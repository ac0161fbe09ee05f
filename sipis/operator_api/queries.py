"""The operator API's reads, as the contract's documents (``contract/``): what the routes answer.

Pushes, the audit log and an instance's timeline are partly in memory (the delivery's recent push
traces, the event ring) and partly in storage (older ones, and everything from before a restart);
:func:`memory_then_storage` merges the two, the one way all of them do (storage keeps the same
contract types).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, TypeVar

from contract.documents import (
    AuditEntry,
    CallsSnapshot,
    CallTrace,
    NodeList,
    NodeRow,
    PushRecord,
    Summary,
    WriterStatus,
)
from contract.events import InstanceDetail
from sipis.instance import Instance
from sipis.operator_api.context import OperatorContext
from sipis.operator_api.health import pbx_status, push_stats
from storage.repositories import Stores

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMELINE_LIMIT = 200
DETAIL_PUSHES = 50
ALARM_WINDOW = 3600.0


async def memory_then_storage(memory: list[T], stores: Stores | None, read: Callable[[Stores], Awaitable[Iterable[T]]],
                              *, key: Callable[[T], Hashable], what: str, limit: int | None = None,
                              order: Callable[[T], Any] | None = None) -> list[T]:
    """What memory holds, completed from storage: what ``read`` returns that memory does not have
    (by ``key``) comes first (it is the older), then ``order`` sorts the lot when given, and the last
    ``limit`` are kept. Storage is read only when there is one and memory has fewer than ``limit``
    (memory holds the newest); when reading fails, memory's items are the answer."""
    items = list(memory)
    if stores is not None and (limit is None or len(items) < limit):
        known = {key(item) for item in items}
        try:
            stored = [item for item in await read(stores) if key(item) not in known]
        except Exception:
            log.exception("reading %s failed", what)
            stored = []
        items = stored + items
    if order is not None:
        items.sort(key=order)
    return items if limit is None else items[-limit:]


def _push_id(push: PushRecord) -> str:
    return push.push_id


# --------------------------------------------------------------------------- the reads


async def summary(ctx: OperatorContext) -> Summary:
    counts, statuses = await ctx.summary_counts()
    now = ctx.clock.wall()
    calls = ctx.calls
    minute_ago = now - 60.0
    calls_per_min = sum(1 for c in calls.recent if c.received_at >= minute_ago)
    calls_per_min += sum(1 for c in calls.held.values() if c.received_at >= minute_ago)
    return Summary(
        node=ctx.node, version=ctx.version, started_at=ctx.started_at, now=now, counts=counts, reg_status=statuses,
        held_calls=len(calls.held), calls_per_min=calls_per_min, outcomes=dict(calls.outcomes),
        push=push_stats(ctx.delivery), pbx=pbx_status(ctx.targets),
        writer=ctx.writer_status() if ctx.writer_status is not None else WriterStatus(0, None),
        alarms=ctx.ring.alarms_since(now - ALARM_WINDOW),
        nodes_up=ctx.cluster.nodes_up() if ctx.cluster is not None else 1,
    )


async def nodes(ctx: OperatorContext) -> NodeList:
    """The cluster's nodes (one node: itself, up, with every instance)."""
    if ctx.cluster is not None:
        return NodeList(await ctx.cluster.nodes())
    return NodeList([NodeRow(ctx.node, "up", len(ctx.service.instances), 0.0, ctx.started_at)])


async def instance_detail(ctx: OperatorContext, instance: Instance) -> InstanceDetail:
    """The instance, its row, its last events (oldest first), pushes and SIP messages."""
    selector = instance.selector
    timeline = await memory_then_storage(
        ctx.ring.for_selector(selector, TIMELINE_LIMIT), ctx.stores,
        lambda stores: stores.events.recent(TIMELINE_LIMIT, selector=selector), key=lambda e: e.seq,
        order=lambda e: e.seq, limit=TIMELINE_LIMIT, what=f"the timeline of {selector}")
    return InstanceDetail(
        instance=instance.view(), row=ctx.index.instance_row(instance),
        timeline=timeline, pushes=await instance_pushes(ctx, selector),
        sip=[m.view() for m in ctx.trace.instance_messages(selector)])


async def instance_pushes(ctx: OperatorContext, selector: str) -> list[PushRecord]:
    memory = [t.record() for t in ctx.delivery.traces.values() if t.selector == selector]
    return await memory_then_storage(memory, ctx.stores, lambda stores: stores.pushes.recent(DETAIL_PUSHES, selector),
                                     key=_push_id, limit=DETAIL_PUSHES, what=f"pushes of {selector}")


async def recent_pushes(ctx: OperatorContext, limit: int, selector: str | None) -> list[PushRecord]:
    """The last ``limit`` pushes (of ``selector``, when given), newest last."""
    memory = [t.record() for t in ctx.delivery.traces.values() if not selector or t.selector == selector]
    return await memory_then_storage(memory[-limit:], ctx.stores, lambda stores: stores.pushes.recent(limit, selector),
                                     key=_push_id, limit=limit, what="pushes")


async def call_pushes(ctx: OperatorContext, call_id: str) -> list[PushRecord]:
    memory = [t.record() for t in ctx.delivery.traces.values() if t.call_id == call_id]
    return await memory_then_storage(memory, ctx.stores, lambda stores: stores.pushes.for_call(call_id),
                                     key=_push_id, what=f"pushes of call {call_id}")


async def audit(ctx: OperatorContext, limit: int) -> list[AuditEntry]:
    """The last ``limit`` audit rows, oldest first."""
    memory = [e.payload for e in ctx.ring.audit if isinstance(e.payload, AuditEntry)]
    return await memory_then_storage(memory, ctx.stores, lambda stores: stores.audit.recent(limit),
                                     key=lambda a: a.id, order=lambda a: a.at, limit=limit, what="the audit log")


def calls(ctx: OperatorContext) -> CallsSnapshot:
    return CallsSnapshot(held=ctx.calls.views(), recent=[call.view(ctx.clock) for call in ctx.calls.recent])


async def call_trace(ctx: OperatorContext, call_id: str) -> CallTrace:
    return CallTrace(call_id=call_id, selector=ctx.trace.selector_of_call(call_id),
                     messages=[m.view() for m in ctx.trace.call_messages(call_id)],
                     pushes=await call_pushes(ctx, call_id))
