"""The instance list as an HTTP answer (``GET /v1/instances``): one JSON document
``{"total", "matched", "counts", "items": [row]}`` or, asked for with ``Accept: application/x-ndjson``,
NDJSON: the same head as the first line, then one row per line (``docs/operator-api.md``).

Rows come from the index's per-instance JSON cache. Pages over :data:`STREAM_ROWS_OVER` rows are sent
in slices of about :data:`SLICE_SECONDS` of work (the rows are checked against the clock every
:data:`SLICE_CHECK` rows), the core's loop served in between, so SIP keeps its timing while a
console loads 100k rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi.responses import Response, StreamingResponse

from contract.codec import to_json
from contract.documents import InstancePage
from sipis.operator_api.index import InstanceIndex
from sipis.operator_api.responses import JSON, NDJSON, dumps

STREAM_ROWS_OVER = 200
SLICE_SECONDS = 0.0005
SLICE_CHECK = 32


def instance_list(index: InstanceIndex, *, ndjson: bool, q: str = "", state: str = "", sort: str = "aor",
                  desc: bool = False, offset: int = 0, limit: int = 200) -> Response:
    total, matched, counts, page = index.query_entries(q=q, state=state, sort=sort, desc=desc, offset=offset,
                                                       limit=limit)
    head = to_json(InstancePage(total, matched, counts, items=[]))
    del head["items"]
    if ndjson:
        start, separator, end, media = dumps(head) + b"\n", b"\n", b"\n" if page else b"", NDJSON
    else:
        start, separator, end, media = dumps(head)[:-1] + b',"items":[', b",", b"]}", JSON
    row_json = index.row_json
    if len(page) <= STREAM_ROWS_OVER:
        return Response(b"".join((start, separator.join([row_json(e) for e in page]), end)), media_type=media)

    async def chunks() -> AsyncIterator[bytes]:
        """Slices of about SLICE_SECONDS of work, the loop served in between."""
        yield start
        clock, budget, rows, n = time.perf_counter, SLICE_SECONDS, len(page), 0
        while n < rows:
            began, parts = clock(), []
            while n < rows:
                stop = min(rows, n + SLICE_CHECK)
                parts.extend([row_json(e) for e in page[n:stop]])
                n = stop
                if clock() - began >= budget:
                    break
            yield separator.join(parts) + (separator if n < rows else b"")
            await asyncio.sleep(0)
        yield end

    return StreamingResponse(chunks(), media_type=media)
