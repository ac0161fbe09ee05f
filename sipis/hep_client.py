"""HEP v3 out to a Homer collector (``[hep]``): the thin I/O shell around :mod:`sipis.hep`.

Two feeds, both synchronous and cheap: every SIP message the endpoint sends or receives (its
observer hook, as the trace recorder) goes out as a SIP packet with the flow's real addresses,
ports and transport; every push stage (the bus's ``push`` events) as a log packet (type 100)
carrying the Call-ID as correlation id, so Homer shows it with its call. Logs take the addresses
of the call's INVITE (PBX → us) when this client saw it.

The socket is a connected, non-blocking UDP socket: a send never waits. When the socket buffer is
full (``BlockingIOError``) or the collector refused an earlier datagram (ICMP port unreachable:
``ConnectionRefusedError``) the packet is dropped and counted; drops are reported by one WARNING
line per ``report_interval`` (60 s) at most, and :meth:`HepClient.stats` has the totals. Secrets
stay out: the auth key is never logged and Authorization headers are masked as in every export.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import OrderedDict
from typing import Final, TypeVar

from contract.documents import PushRecord
from contract.events import Event
from contract.masking import mask
from sipis import hep
from sipis.clock import Clock
from sipis.config.addresses import parse_sip_listen
from sipis.config.model import HepConfig
from sipis.sip.message import Message, Request
from sipis.sip.transport import Flow
from sipis.timers import LoopTimers, TimerHandle, Timers
from sipis.trace import mask_credentials_bytes

log = logging.getLogger(__name__)

#: Calls and pushes remembered for the logs' addresses and the stages already sent.
REMEMBERED: Final = 10_000
#: Requests whose flow a push stage log of the same Call-ID borrows.
_CALL_METHODS: Final = frozenset({"INVITE", "MESSAGE"})
_NOWHERE: Final = ("udp", ("0.0.0.0", 0), ("0.0.0.0", 0))

Route = tuple[str, tuple[str, int], tuple[str, int]]
V = TypeVar("V")


class HepClient:
    def __init__(self, settings: HepConfig, clock: Clock, timers: Timers | None = None, *,
                 report_interval: float = 60.0) -> None:
        if settings.collector is None:
            raise ValueError("[hep] collector is not set")
        collector = parse_sip_listen(settings.collector)
        self.collector = (collector.host, collector.port)
        self.capture_id = settings.capture_id
        self._auth_key = settings.auth_key.encode() if settings.auth_key else None
        self.clock = clock
        self.timers = timers or LoopTimers()
        self.report_interval = report_interval
        self.sock: socket.socket | None = None
        self.sent = 0
        #: drops since start: socket buffer full / collector unreachable (or another socket error)
        self.dropped_full = 0
        self.dropped_error = 0
        self._reported = (0, 0)  # the drop counts at the last report
        self._last_report = float("-inf")
        self._report: TimerHandle | None = None
        self._routes: OrderedDict[str, Route] = OrderedDict()
        self._stages_sent: OrderedDict[str, int] = OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Resolve the collector (once, without blocking the loop) and open the socket."""
        host, port = self.collector
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            sock.connect(address)  # UDP: no packet sent; later ICMP errors surface on send
        except OSError as exc:  # Homer's name not resolvable is no reason to stop taking calls
            log.warning("HEP to %s:%d off: %s (every packet is counted as dropped)", host, port, exc)
            return
        self.sock = sock
        log.info("HEP v3 to %s:%d (capture id %d)", host, port, self.capture_id)

    def close(self) -> None:
        if self._report is not None:
            self._report.cancel()
            self._report = None
            self._report_drops()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "dropped_full": self.dropped_full, "dropped_error": self.dropped_error}

    # ------------------------------------------------------------------ feeds

    def observe(self, direction: str, message: Message, flow: Flow) -> None:
        """The endpoint's observer hook: one SIP packet per message."""
        transport = flow.transport
        if direction == "in":
            src, dst = flow.remote, flow.local
        else:
            src, dst = flow.local, flow.remote
        if direction == "in" and isinstance(message, Request) and message.method in _CALL_METHODS:
            _remember(self._routes, message.call_id, (transport, src, dst))
        payload = mask_credentials_bytes(message.to_bytes())[: hep.MAX_PAYLOAD]
        self._send(hep.encode(kind=hep.SIP, transport=transport, src=src, dst=dst, at=self.clock.wall(),
                              capture_id=self.capture_id, payload=payload, auth_key=self._auth_key))

    def on_event(self, event: Event) -> None:
        """A bus subscriber: each push stage not sent yet goes out as a log packet."""
        record = event.payload
        if not isinstance(record, PushRecord):
            return
        done = self._stages_sent.get(record.push_id, 0)
        stages = list(record.stages.items())
        if len(stages) <= done:
            return
        _remember(self._stages_sent, record.push_id, len(stages))
        call_id = record.call_id
        transport, src, dst = self._routes.get(call_id, _NOWHERE) if call_id else _NOWHERE
        for stage, at in stages[done:]:
            self._send(hep.encode(kind=hep.LOG, transport=transport, src=src, dst=dst, at=at,
                                  capture_id=self.capture_id, payload=stage_log(record, stage),
                                  auth_key=self._auth_key,
                                  correlation_id=call_id.encode() if call_id else None))

    # ------------------------------------------------------------------ sending

    def _send(self, data: bytes) -> None:
        try:
            if self.sock is None:
                raise OSError("no socket")
            self.sock.send(data)
        except BlockingIOError:
            self.dropped_full += 1
            self._drop()
        except OSError:  # ICMP port unreachable from an earlier datagram, no route, …
            self.dropped_error += 1
            self._drop()
        else:
            self.sent += 1

    def _drop(self) -> None:
        if self._report is None:
            wait = self._last_report + self.report_interval - self.clock.monotonic()
            self._report = self.timers.call_later(max(0.0, wait), self._report_now)

    def _report_now(self) -> None:
        self._report = None
        self._report_drops()

    def _report_drops(self) -> None:
        full, error = self.dropped_full - self._reported[0], self.dropped_error - self._reported[1]
        self._reported = (self.dropped_full, self.dropped_error)
        self._last_report = self.clock.monotonic()
        if full or error:
            log.warning("HEP to %s:%d: %d packets dropped (socket buffer full: %d, collector unreachable "
                        "or socket error: %d); %d dropped, %d sent since start", *self.collector,
                        full + error, full, error, self.dropped_full + self.dropped_error, self.sent)


def _remember(store: OrderedDict[str, V], key: str, value: V) -> None:
    """Keep ``value`` as the most recent entry of a store bounded to :data:`REMEMBERED`."""
    store[key] = value
    store.move_to_end(key)
    if len(store) > REMEMBERED:
        store.popitem(last=False)


def stage_log(record: PushRecord, stage: str) -> bytes:
    """The text of a push stage's log packet: one JSON object, the instance's selector masked."""
    return json.dumps({
        "push": record.push_id, "stage": stage, "kind": str(record.kind), "provider": record.provider,
        "outcome": record.outcome, "attempt": record.attempt, "provider_code": record.provider_code,
        "error": record.error, "instance": mask(record.selector), "call_id": record.call_id,
    }, separators=(",", ":")).encode()
