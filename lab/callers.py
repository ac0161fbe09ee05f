"""Callers: INVITEs to the lab PBX from our own SIP endpoint, at a rate, with realistic endings.

:class:`CallerLoad` places calls to random users (Poisson arrivals at :attr:`CallerSettings.rate`
per second) through the lab PBX over UDP, using our :class:`~sipis.sip.endpoint.SipEndpoint`:

* ``INVITE`` via ``endpoint.request(..., on_provisional=...)``: every ``180`` is seen, including
  the SIPIS's ``X-Sipis-Push-Status`` stages;
* a ``2xx`` is acknowledged (``ACK`` straight to the callee's Contact: the PBX does not
  Record-Route), the call is held for :attr:`CallerSettings.hold`, then ``BYE``;
* a share of callers hang up early (:attr:`CallerSettings.cancel_rate`, after
  :attr:`CallerSettings.cancel_after`): ``CANCEL`` built with
  :func:`sipis.sip.transaction.build_cancel`, sent after the first provisional (RFC 3261 §9.1).

Every call ends in a :class:`CallRecord` with one outcome: :data:`OUTCOME_MEANINGS` says what each one
means (the demo's summary prints it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lab.mediator import Distribution
from lab.pbx import LabPbx
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.message import Headers, NameAddr, Request, Response, SipParseError, new_call_id, new_tag
from sipis.sip.transaction import build_cancel
from sipis.sip.transport import Flow, ListenSpec, TransportError

log = logging.getLogger(__name__)

SDP_OFFER = (b"v=0\r\no=caller 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
             b"m=audio 40000 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n")
#: every outcome of a call, in the summary's order, and what it means
OUTCOME_MEANINGS = {
    "released-answered": "held by the SIPIS (its 180s were seen), released to the app, answered there",
    "released-rejected": "held by the SIPIS, released to the app, which then declined (486/603)",
    "answered": "answered directly (the app was in the foreground)",
    "rejected": "declined directly by the app",
    "no-response": "480 No-Response-From-Device: the app never woke (T1)",
    "not-answered": "480 Device-Did-Not-Answer: the app woke but did not answer (T2)",
    "device-unreachable": "480 Device-Unreachable: its push token is dead",
    "instance-off": "480 Instance-Off",
    "cancelled-held": "the caller hung up (CANCEL, 487; also when the demo stopped) while the SIPIS held the "
                      "call: the core counts it 'cancelled' too",
    "cancelled": "the caller hung up before an answer while the call was not held by the SIPIS",
    "unavailable": "480 without a SIPIS reason: nobody registered, or the released app was not there",
    "timeout": "408: the PBX's INVITE timer ran out, or no answer at all",
    "not-found": "404: the PBX knows no such user",
    "failed": "anything else",
}
OUTCOMES = tuple(OUTCOME_MEANINGS)
_SIPIS_REASONS = {"No-Response-From-Device": "no-response", "Device-Did-Not-Answer": "not-answered",
                  "Device-Unreachable": "device-unreachable", "Instance-Off": "instance-off"}


@dataclass(frozen=True)
class CallerSettings:
    rate: float = 1.0  # new calls per second (Poisson)
    cancel_rate: float = 0.1  # share of callers that hang up early
    cancel_after: Distribution = field(default_factory=lambda: Distribution.uniform(0.5, 4.0))
    hold: Distribution = field(default_factory=lambda: Distribution.uniform(1.0, 5.0))
    max_in_flight: int = 500  # calls beyond this are not placed (counted as ``skipped``)
    caller_user: str = "caller"


@dataclass
class CallRecord:
    call_id: str
    user: str
    started: float  # monotonic
    outcome: str | None = None
    status: int | None = None
    detail: str = ""
    push_statuses: list[str] = field(default_factory=list)  # X-Sipis-Push-Status of the 180s seen
    push_id: str | None = None
    provisional: list[int] = field(default_factory=list)
    cancel_sent: bool = False
    first_ringing: float | None = None
    answered_at: float | None = None
    ended_at: float | None = None

    @property
    def via_sipis(self) -> bool:
        return bool(self.push_statuses)

    @property
    def setup_time(self) -> float | None:
        """INVITE → final response (answer, rejection, ...)."""
        end = self.answered_at or self.ended_at
        return None if end is None else end - self.started

    def as_dict(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "user": self.user, "outcome": self.outcome, "status": self.status,
                "detail": self.detail, "push_statuses": self.push_statuses, "push_id": self.push_id,
                "cancel_sent": self.cancel_sent, "setup_time": self.setup_time}


def cancelled(record: CallRecord) -> str:
    return "cancelled-held" if record.via_sipis else "cancelled"


def classify(record: CallRecord, response: Response) -> str:
    """The outcome of a call from its final response (and what was seen before it)."""
    status = response.status
    if 200 <= status < 300:
        return "released-answered" if record.via_sipis else "answered"
    if status == 487 and record.cancel_sent:
        return cancelled(record)
    reason = response.headers.get("X-Sipis-Reason")
    if reason in _SIPIS_REASONS:
        return _SIPIS_REASONS[reason]
    if status in (486, 600, 603):
        return "released-rejected" if record.via_sipis else "rejected"
    if status == 480:
        return "unavailable"
    if status == 408:
        return "timeout"
    if status == 404:
        return "not-found"
    return "failed"


class CallerLoad:
    """Places calls to users from ``targets`` (a list, or a function returning the current list)."""

    def __init__(self, pbx: LabPbx, targets: Sequence[str] | Callable[[], Sequence[str]], *,
                 settings: CallerSettings | None = None, rng: random.Random | None = None) -> None:
        self.pbx = pbx
        self._targets = targets
        self.settings = settings or CallerSettings()
        self.rng = rng or random.Random()
        self.endpoint = SipEndpoint(EndpointSettings(listen=[ListenSpec("udp", pbx.host, 0)],
                                                     user_agent="sipis-lab-caller"))
        self.records: list[CallRecord] = []
        self.outcomes: Counter[str] = Counter()
        self.skipped = 0
        self.abandoned = 0  # calls still in progress when the load stopped
        self._in_flight: dict[asyncio.Task[CallRecord], CallRecord] = {}
        self._generator: asyncio.Task[None] | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if not self._started:
            await self.endpoint.start()
            self._started = True

    async def start(self) -> None:
        """Open the endpoint and start placing calls at :attr:`CallerSettings.rate`."""
        await self.open()
        if self.settings.rate > 0:
            self._generator = asyncio.create_task(self._generate(), name="caller-load")

    def stop_placing(self) -> None:
        if self._generator is not None:
            self._generator.cancel()

    async def stop(self, drain: float = 0.0) -> None:
        """Stop placing calls, give calls in progress up to ``drain`` seconds, abandon the rest."""
        self.stop_placing()
        if self._generator is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._generator
            self._generator = None
        if drain > 0 and self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=drain)
        pending = dict(self._in_flight)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.abandoned += sum(1 for record in pending.values() if record.outcome is None)
        if self._started:
            await self.endpoint.close()
            self._started = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def ringing(self) -> list[CallRecord]:
        """The calls in progress that have seen a provisional response."""
        return [record for record in self._in_flight.values() if record.provisional]

    def targets(self) -> Sequence[str]:
        return self._targets() if callable(self._targets) else self._targets

    async def _generate(self) -> None:
        while True:
            await asyncio.sleep(self.rng.expovariate(self.settings.rate))
            targets = self.targets()
            if not targets:
                continue
            if len(self._in_flight) >= self.settings.max_in_flight:
                self.skipped += 1
                continue
            self.place(self.rng.choice(list(targets)))

    def place(self, user: str) -> asyncio.Task[CallRecord]:
        """Start one call in the background; the record is in :attr:`records` once it ends."""
        cancel_after = (self.settings.cancel_after.sample(self.rng)
                        if self.rng.random() < self.settings.cancel_rate else None)
        hold = self.settings.hold.sample(self.rng)
        record = CallRecord(new_call_id(), user, time.monotonic())
        task = asyncio.create_task(self.call(user, cancel_after=cancel_after, hold=hold, record=record))
        self._in_flight[task] = record
        task.add_done_callback(lambda t: self._in_flight.pop(t, None))
        return task

    # ------------------------------------------------------------------ one call

    async def call(self, user: str, *, cancel_after: float | None = None, hold: float = 1.0,
                   record: CallRecord | None = None) -> CallRecord:
        """Call ``user`` and see it through: ACK + BYE after ``hold`` when answered, CANCEL after
        ``cancel_after`` seconds when given. Returns (and records) the :class:`CallRecord`."""
        await self.open()
        record = record or CallRecord(new_call_id(), user, time.monotonic())
        try:
            await self._call(record, cancel_after, hold)
        except TransportError as exc:
            self._finish(record, "failed", None, f"transport: {exc}")
        return record

    async def _call(self, record: CallRecord, cancel_after: float | None, hold: float) -> None:
        pbx, settings = self.pbx, self.settings
        flow = await self.endpoint.transport.flow_to("udp", pbx.host, pbx.udp_port)
        host, port = flow.local
        invite = Request("INVITE", f"sip:{record.user}@{pbx.domain}", Headers([
            ("From", f'"Lab caller" <sip:{settings.caller_user}@{pbx.domain}>;tag={new_tag()}'),
            ("To", f"<sip:{record.user}@{pbx.domain}>"),
            ("Call-ID", record.call_id), ("CSeq", "1 INVITE"),
            ("Contact", f"<sip:{settings.caller_user}@{host}:{port}>"),
            ("Content-Type", "application/sdp"),
        ]), SDP_OFFER)
        self.endpoint.add_via(invite, flow)
        ringing = asyncio.Event()

        def provisional(response: Response) -> None:
            record.provisional.append(response.status)
            ringing.set()
            stage = response.headers.get("X-Sipis-Push-Status")
            if stage:
                record.push_statuses.append(stage)
                record.push_id = response.headers.get("X-Push-ID") or record.push_id
            if response.status == 180 and record.first_ringing is None:
                record.first_ringing = time.monotonic()

        canceller = (asyncio.create_task(self._cancel_later(invite, flow, cancel_after, ringing, record))
                     if cancel_after is not None else None)
        try:
            response = await self.endpoint.request(invite, flow, on_provisional=provisional)
        except asyncio.CancelledError:
            if ringing.is_set():  # the load stops: a caller hangs up instead of vanishing
                # counted as the core counts it (a cancelled held call), not as unfinished
                record.cancel_sent = True
                self._finish(record, cancelled(record), None, "hung up: the load stopped")
                with contextlib.suppress(TransportError, TimeoutError):
                    await asyncio.wait_for(self.endpoint.request(build_cancel(invite), flow), 2.0)
            raise
        finally:
            if canceller is not None and not canceller.done():
                canceller.cancel()
        if 200 <= response.status < 300:
            record.answered_at = time.monotonic()
            await self._answered(record, invite, response, hold)
            return
        self._finish(record, classify(record, response), response,
                     response.headers.get("X-Sipis-Reason") or f"{response.status} {response.reason}")

    async def _cancel_later(self, invite: Request, flow: Flow, delay: float, ringing: asyncio.Event,
                            record: CallRecord) -> None:
        await asyncio.sleep(delay)
        await ringing.wait()  # RFC 3261 §9.1: not before a provisional response
        record.cancel_sent = True
        with contextlib.suppress(TransportError):
            await self.endpoint.request(build_cancel(invite), flow)

    async def _answered(self, record: CallRecord, invite: Request, response: Response, hold: float) -> None:
        outcome = classify(record, response)
        try:
            contact = NameAddr.parse(response.headers.get("Contact") or "").uri
            target = await self.endpoint.transport.flow_to("udp", contact.host, contact.port)
        except (SipParseError, ValueError, TransportError) as exc:
            self._finish(record, outcome, response, f"answered, but no usable Contact: {exc}")
            return
        to = response.headers.get("To") or ""
        sender = invite.headers.get("From") or ""

        def in_dialog(method: str, cseq: int) -> Request:
            request = Request(method, str(contact), Headers([
                ("From", sender), ("To", to), ("Call-ID", record.call_id), ("CSeq", f"{cseq} {method}")]))
            self.endpoint.add_via(request, target)
            return request

        target.send(in_dialog("ACK", 1).to_bytes())  # the ACK for a 2xx is ours, not the transaction's
        detail = "answered"
        try:
            await asyncio.sleep(hold)
            with contextlib.suppress(TransportError, TimeoutError):
                answer = await asyncio.wait_for(self.endpoint.request(in_dialog("BYE", 2), target), 5.0)
                detail = f"BYE {answer.status}"
        finally:  # also when the load stops mid-call: the call was answered all the same
            self._finish(record, outcome, response, detail)

    def _finish(self, record: CallRecord, outcome: str, response: Response | None, detail: str) -> None:
        if record.outcome is not None:
            return
        record.outcome = outcome
        record.status = response.status if response is not None else None
        record.detail = f"status-{response.status} {detail}" if outcome == "failed" and response else detail
        record.ended_at = time.monotonic()
        self.records.append(record)
        self.outcomes[outcome] += 1


__all__ = ["OUTCOMES", "OUTCOME_MEANINGS", "CallRecord", "CallerLoad", "CallerSettings", "classify"]
