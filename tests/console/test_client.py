"""The operator API client's NDJSON instance list: rows decoded while the bytes arrive, in any
chunking; broken or short answers refused; a core that answers with one JSON document still read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from console.client import Forbidden as ClientForbidden
from console.client import OperatorApiError, OperatorClient, RowLines
from console.feed import OperatorFeed

ROWS = [{"selector": f"S{i:04d}", "aor": f"sip:u{i}@pbx", "state": "active", "note": "a\nb}{\u00e9\U0001d11e"}
        for i in range(3000)]
HEAD = {"total": 3000, "matched": 3000, "counts": {"active": 3000}}


def ndjson(head: dict[str, Any], rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in [head, *rows])


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096, 1 << 30])
def test_row_lines_decode_any_chunking(size: int) -> None:
    rows = ROWS[:120]
    for head, body in ((HEAD | {"matched": 120}, rows), ({"total": 0, "matched": 0, "counts": {}}, [])):
        got: list[Any] = []
        lines = RowLines(got.extend)
        for chunk in chunks(ndjson(head, body), size):
            lines.feed(chunk)
        assert lines.close() == head and got == body
    unterminated = ndjson(HEAD | {"matched": 2}, rows[:2])[:-1]  # no newline after the last row
    got = []
    lines = RowLines(got.extend)
    for chunk in chunks(unterminated, size):
        lines.feed(chunk)
    assert lines.close()["matched"] == 2 and got == rows[:2]


@pytest.mark.parametrize("bad", [b"", b"[1]\n", b'{"matched": 2}\n{"a": 1}\n', b'{"matched": 1}\n{"a": }\n',
                                 b'{"matched": 1}\n[1]\n', b'{"matched": 1}\n{"a": 1}{"a": 2}\n'])
def test_row_lines_refuse_broken_or_short_lists(bad: bytes) -> None:
    lines = RowLines(lambda rows: None)
    with pytest.raises(ValueError):
        lines.feed(bad)
        lines.close()


def test_row_lines_count_what_a_page_should_hold() -> None:
    lines = RowLines(lambda rows: None)
    lines.feed(ndjson({"matched": 10}, [{"a": n} for n in range(3)]))
    assert lines.close(offset=2, limit=3)["matched"] == 10


class Chunked(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in chunks(self.data, 5000):
            yield chunk


async def test_the_client_streams_the_instance_list_in_batches() -> None:
    body = ndjson(HEAD, ROWS)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.params.get("q") == "forbidden":
            return httpx.Response(403, json={"error": "forbidden", "detail": "no"})
        if request.url.params.get("q") == "broken":
            return httpx.Response(200, stream=Chunked(body[:-40]), headers={"content-type": "application/x-ndjson"})
        if request.url.params.get("q") == "old":  # a core that only knows the JSON document
            return httpx.Response(200, json={**HEAD, "items": ROWS})
        return httpx.Response(200, stream=Chunked(body), headers={"content-type": "application/x-ndjson"})

    client = OperatorClient(transport=httpx.MockTransport(handler))
    batches: list[int] = []
    got: list[dict[str, Any]] = []

    def take(items: list[Any]) -> None:
        batches.append(len(items))
        got.extend(items)

    assert await client.stream_instances(take) == HEAD
    assert got == ROWS and len(batches) > 1
    assert seen[0].url.params["limit"] == "0" and seen[0].headers["accept"] == "application/x-ndjson"
    with pytest.raises(ClientForbidden):
        await client.stream_instances(take, q="forbidden")
    with pytest.raises(OperatorApiError) as short:
        await client.stream_instances(take, q="broken")
    assert short.value.code == "bad_response"
    got.clear()
    assert await client.stream_instances(take, q="old") == HEAD and got == ROWS
    feed = OperatorFeed(client)
    assert [r.selector for r in await feed.instances()] == [r["selector"] for r in ROWS]
    await client.aclose()
