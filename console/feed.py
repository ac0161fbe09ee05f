"""Where the console's data comes from: the :class:`Feed` protocol, one method per operator API call
(``docs/operator-api.md``), answering in the contract's types (``contract/``).

:class:`OperatorFeed` is the real one, over :class:`console.client.OperatorClient`: it decodes every
answer with the contract's codec and turns the client's errors into :class:`FeedError`. Tests drive
the console with a deterministic fake (``tests/console/fake_feed.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable

from contract.codec import decode_stream_line, decoder, from_json
from contract.documents import (
    ActionResult,
    AlarmList,
    AlarmRecord,
    AuditEntry,
    CallsSnapshot,
    CallTrace,
    HealthTargets,
    InstancePage,
    InstanceRow,
    NodeList,
    NodeRow,
    PushRecord,
    PushResult,
    Summary,
    Whoami,
)
from contract.events import Event, InstanceDetail, StreamNotice
from contract.kinds import StreamNoticeKind

if TYPE_CHECKING:
    from console.client import InstanceAction, OperatorClient

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------- errors


class FeedError(Exception):
    """The core refused or failed a request (``status`` is the HTTP status when there is one)."""

    def __init__(self, detail: str, *, status: int | None = None, code: str = "error") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code


class Forbidden(FeedError):
    """403: the operator's role does not allow this (the core checks, whatever the UI shows)."""


class NotFound(FeedError):
    """404."""


# ---------------------------------------------------------------------------------------------- the protocol


@runtime_checkable
class Feed(Protocol):
    """What the console needs from the core; one method per operator API call."""

    async def whoami(self) -> Whoami: ...

    async def summary(self) -> Summary: ...

    async def health_targets(self) -> HealthTargets:
        """Registrar targets and push providers with their health (``GET /v1/health/targets``)."""
        ...

    async def nodes(self) -> list[NodeRow]:
        """The cluster's nodes (``GET /v1/nodes``; one node: itself)."""
        ...

    async def instances(self) -> list[InstanceRow]:
        """All instance rows (``GET /v1/instances?limit=0``, as NDJSON)."""
        ...

    async def instance_page(self, limit: int) -> InstancePage:
        """The first ``limit`` rows in AOR order and the list's size (``GET /v1/instances?limit=N``)."""
        ...

    async def instance(self, selector: str) -> InstanceDetail: ...

    async def calls(self) -> CallsSnapshot: ...

    async def call_trace(self, call_id: str) -> CallTrace: ...

    async def call_trace_text(self, call_id: str) -> str: ...

    async def call_trace_pcap(self, call_id: str) -> bytes: ...

    async def pushes(self, limit: int = 200, selector: str | None = None) -> list[PushRecord]: ...

    async def audit(self, limit: int = 200) -> list[AuditEntry]: ...

    def events(self, since: int | None = None) -> AsyncIterator[Event | StreamNotice]:
        """The event stream, forever: events, and gap/overflow notices (heartbeats are not yielded)."""
        ...

    async def action(self, selector: str, name: str) -> ActionResult | PushResult:
        """An instance action by its path name: a test push answers with the push, the others with
        the instance as it is once the action started."""
        ...

    async def replay_push(self, push_id: str) -> PushRecord: ...

    async def alarms(self) -> AlarmList:
        """Active alarm episodes and the last finished ones (``GET /v1/alarms``)."""
        ...

    async def acknowledge_alarm(self, alarm_id: str) -> AlarmRecord: ...


# ---------------------------------------------------------------------------------------------- the real feed


def _status_of(exc: BaseException) -> int | None:
    for name in ("status", "status_code"):
        value = getattr(exc, name, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


def _detail_of(exc: BaseException) -> str:
    detail = getattr(exc, "detail", None)
    if isinstance(detail, str) and detail:
        return detail
    return str(exc) or type(exc).__name__


def map_error(exc: Exception) -> FeedError:
    """Turn whatever the client raised into a :class:`FeedError` (403 → :class:`Forbidden`)."""
    if isinstance(exc, FeedError):
        return exc
    status = _status_of(exc)
    code = str(getattr(exc, "code", None) or getattr(exc, "error", None) or "error")
    detail = _detail_of(exc)
    if status == 403:
        return Forbidden(detail, status=403, code="forbidden")
    if status == 404:
        return NotFound(detail, status=404, code="not-found")
    if not status and (status == 0 or isinstance(exc, OSError | ConnectionError | asyncio.TimeoutError)):
        return FeedError(detail, code="unreachable")  # the client's Unreachable has status 0
    return FeedError(detail, status=status, code=code)


_decode_row = decoder(InstanceRow)


class OperatorFeed:
    """:class:`Feed` over :class:`console.client.OperatorClient` (the operator API over HTTP): the
    client's JSON answers decoded into the contract's types, its errors into :class:`FeedError`."""

    def __init__(self, client: OperatorClient) -> None:
        self.client = client

    async def _ask(self, request: Awaitable[T]) -> T:
        try:
            return await request
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc) from exc

    async def whoami(self) -> Whoami:
        return from_json(Whoami, await self._ask(self.client.whoami()))

    async def summary(self) -> Summary:
        return from_json(Summary, await self._ask(self.client.summary()))

    async def health_targets(self) -> HealthTargets:
        return from_json(HealthTargets, await self._ask(self.client.health_targets()))

    async def nodes(self) -> list[NodeRow]:
        return from_json(NodeList, await self._ask(self.client.nodes())).nodes

    async def instances(self) -> list[InstanceRow]:
        """Every row, decoded batch by batch while the NDJSON list arrives."""
        rows: list[InstanceRow] = []

        def take(items: list[dict[str, Any]]) -> None:
            rows.extend([_decode_row(item) for item in items])

        await self._ask(self.client.stream_instances(take, offset=0, limit=0, q="", state="", sort="aor",
                                                     desc=False))
        return rows

    async def instance_page(self, limit: int) -> InstancePage:
        page = await self._ask(self.client.instances(offset=0, limit=max(1, limit), q="", state="", sort="aor",
                                                     desc=False))
        return from_json(InstancePage, page)

    async def instance(self, selector: str) -> InstanceDetail:
        return from_json(InstanceDetail, await self._ask(self.client.instance(selector)))

    async def calls(self) -> CallsSnapshot:
        return from_json(CallsSnapshot, await self._ask(self.client.calls()))

    async def call_trace(self, call_id: str) -> CallTrace:
        return from_json(CallTrace, await self._ask(self.client.call_trace(call_id)))

    async def call_trace_text(self, call_id: str) -> str:
        return await self._ask(self.client.call_trace_text(call_id))

    async def call_trace_pcap(self, call_id: str) -> bytes:
        return await self._ask(self.client.call_trace_pcap(call_id))

    async def pushes(self, limit: int = 200, selector: str | None = None) -> list[PushRecord]:
        return [from_json(PushRecord, p) for p in await self._ask(self.client.pushes(limit=limit, selector=selector))]

    async def audit(self, limit: int = 200) -> list[AuditEntry]:
        return [from_json(AuditEntry, a) for a in await self._ask(self.client.audit(limit=limit))]

    async def events(self, since: int | None = None) -> AsyncIterator[Event | StreamNotice]:
        try:
            async for line in self.client.events(since=since):
                item = decode_stream_line(line)
                if isinstance(item, StreamNotice) and item.kind is StreamNoticeKind.HEARTBEAT:
                    continue
                yield item
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc) from exc

    async def action(self, selector: str, name: str) -> ActionResult | PushResult:
        answer = await self._ask(self.client.action(selector, cast("InstanceAction", name)))
        if "push" in answer:
            return from_json(PushResult, answer)
        return from_json(ActionResult, answer)

    async def replay_push(self, push_id: str) -> PushRecord:
        return from_json(PushResult, await self._ask(self.client.replay_push(push_id))).push

    async def alarms(self) -> AlarmList:
        return from_json(AlarmList, await self._ask(self.client.alarms()))

    async def acknowledge_alarm(self, alarm_id: str) -> AlarmRecord:
        return from_json(AlarmRecord, await self._ask(self.client.acknowledge_alarm(alarm_id)))
