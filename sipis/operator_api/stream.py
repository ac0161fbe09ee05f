"""``GET /v1/events``: the event stream, NDJSON. Replay from the ring (``since``), then live events;
a heartbeat when idle. Lines that are not events are the contract's stream notices: ``heartbeat``
(with the last seq sent, to resume from), ``gap`` (events after ``since`` already left the ring:
resynchronise from the snapshot routes) and ``overflow`` (this client fell behind and ``dropped``
events were lost)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from contract.codec import encode_event, encode_notice
from contract.events import StreamNotice
from contract.kinds import StreamNoticeKind
from sipis.events import EventQueue
from sipis.operator_api.context import OperatorContext
from sipis.operator_api.responses import json_line

STREAM_QUEUE = 10_000
#: At most this many events go into one chunk of the stream.
STREAM_BATCH = 500


def _notice(ctx: OperatorContext, kind: StreamNoticeKind, **fields: int | None) -> bytes:
    return json_line(encode_notice(StreamNotice(kind, ctx.clock.wall(), **fields)))


async def event_stream(ctx: OperatorContext, since: int | None) -> AsyncIterator[bytes]:
    queue = EventQueue(ctx.events, maxsize=STREAM_QUEUE)
    ctx.streams.add(queue)
    try:
        last = ctx.ring.last_seq
        if since is not None:
            replay, gap = ctx.ring.since(since)
            if gap:
                yield _notice(ctx, StreamNoticeKind.GAP, since=since, first_available=ctx.ring.first_seq)
            if replay:
                yield b"".join(json_line(encode_event(e)) for e in replay)
                last = replay[-1].seq
        else:
            yield _notice(ctx, StreamNoticeKind.HEARTBEAT, seq=last)
        dropped = 0
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=ctx.heartbeat)
            except TimeoutError:
                yield _notice(ctx, StreamNoticeKind.HEARTBEAT, seq=last)
                continue
            batch = [event]
            while len(batch) < STREAM_BATCH and not queue.queue.empty():
                batch.append(queue.queue.get_nowait())
            lines: list[bytes] = []
            if queue.dropped != dropped:
                lines.append(_notice(ctx, StreamNoticeKind.OVERFLOW, dropped=queue.dropped - dropped))
                dropped = queue.dropped
            closing = False
            for item in batch:
                if item is None:  # the server stops (EventQueue.close_stream)
                    closing = True
                    break
                if item.seq <= last:
                    continue  # already replayed from the ring
                last = item.seq
                lines.append(json_line(encode_event(item)))
            if lines:
                yield b"".join(lines)
            if closing:
                return
    finally:
        ctx.streams.discard(queue)
        queue.close()
