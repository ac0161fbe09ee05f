"""A deterministic :class:`console.feed.Feed` for the console's tests: fixed rows around a frozen
clock, scripted events, recorded requests and actions; every answer in the contract's types."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from console.feed import FeedError, Forbidden, NotFound
from console.model import row_patch
from console.roles import ACKNOWLEDGE_ROLE, ACTIONS, REPLAY_ROLE, role_allows
from contract.codec import decode_payload
from contract.documents import (
    ActionResult,
    AlarmList,
    AlarmRecord,
    AuditEntry,
    CallsSnapshot,
    CallTrace,
    HealthTarget,
    HealthTargets,
    HeldCall,
    InstancePage,
    InstanceRow,
    InstanceView,
    NodeRow,
    PbxStatus,
    PushRecord,
    PushResult,
    PushStats,
    PushView,
    RegistrationView,
    SipMessage,
    Summary,
    Whoami,
    WriterStatus,
)
from contract.events import Event, InstanceDetail, StreamNotice
from contract.kinds import StreamNoticeKind

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar")
PROVIDERS = ("fcm", "apns", "acrobits", "webhook")


def fake_rows(n: int, now: float) -> list[InstanceRow]:
    """``n`` deterministic instance rows around the wall-clock time ``now``."""
    rows = []
    for i in range(n):
        name = f"{NAMES[i % len(NAMES)]}{i:05d}"
        pbx = f"pbx{i % 3 + 1}.example.net"
        bucket = i % 10
        state = "proxied" if bucket < 6 else "active" if bucket < 8 else "inactive" if bucket == 8 else "off"
        reg_status, code, reason, failures = "idle", None, None, 0
        expires = refresh = backoff = None
        if state == "proxied":
            reg_status, code, reason = "registered", 200, "OK"
            expires = now + 60 + (i * 37) % 3540
            refresh = expires - 30
            if i % 47 == 5:
                reg_status, code, reason, failures = "unauthorized", 403, "Forbidden", 3
                expires, refresh, backoff = None, now + 20 + i % 40, now + 20 + i % 40
            elif i % 53 == 7:
                reg_status, code, reason, failures = "error", 503, "Service Unavailable", 1
                refresh = backoff = now + 5 + i % 10
        outcome = (None, "accepted", "accepted", "accepted", "rejected-transient", "accepted",
                   "rejected-permanent", "accepted")[i % 8]
        rows.append(InstanceRow(
            selector=f"s{i:06d}",
            aor=f"sip:{name}@{pbx}",
            user=name,
            registrar=f"sip:{pbx}:5061;transport=tls",
            state=state,
            reg_status=reg_status,
            last_code=code,
            last_reason=reason,
            expires_at=expires,
            next_refresh_at=refresh,
            failure_count=failures,
            backoff_until=backoff,
            push_provider=PROVIDERS[i % len(PROVIDERS)],
            push_unreachable=i % 97 == 13,
            last_push_outcome=outcome,
            last_push_at=None if outcome is None else now - 30 - (i * 131) % 7200,
            app_last_seen=now - (i * 17) % 3600,
        ))
    return rows


def event(seq: int, at: float, event_kind: str, selector: str | None, /, **data: Any) -> Event:
    """An event as the console decodes it from the stream (``data``: its wire ``data``)."""
    return Event(seq, at, selector, decode_payload(event_kind, data, selector))


def _fake_sip(selector: str, row: InstanceRow, now: float) -> list[SipMessage]:
    aor = row.aor
    host = aor.split("@", 1)[-1]
    reg_call, inv_call = f"reg-{selector}@sipis", f"inv-{selector}@{host}"
    t0 = now - 95.0

    def msg(dt: float, direction: str, first: str, call_id: str, cseq: str, extra: str = "") -> SipMessage:
        number, cseq_method = cseq.split()
        method = first.split(" ", 1)[0] if not first.startswith("SIP/") else cseq_method
        status = int(first.split()[1]) if first.startswith("SIP/") else None
        via = "Via: SIP/2.0/TLS 192.0.2.10:5061;branch=z9hG4bK" + f"{zlib.crc32((call_id + cseq).encode()):08x}"
        raw = (f"{first}\r\n{via}\r\nFrom: <{aor}>;tag=a1\r\nTo: <{aor}>\r\nCall-ID: {call_id}\r\n"
               f"CSeq: {cseq}\r\n{extra}Content-Length: 0\r\n\r\n")
        return SipMessage(at=t0 + dt, direction=direction, transport="TLS", local="192.0.2.10:5061",
                          remote="198.51.100.20:5061", first_line=first, call_id=call_id, cseq=int(number),
                          method=method, status=status, selector=selector, raw=raw)

    return [
        msg(0.000, "out", f"REGISTER sip:{host} SIP/2.0", reg_call, "1 REGISTER", "Expires: 3600\r\n"),
        msg(0.041, "in", "SIP/2.0 401 Unauthorized", reg_call, "1 REGISTER",
            'WWW-Authenticate: Digest realm="pbx", nonce="n1", algorithm=SHA-256\r\n'),
        msg(0.045, "out", f"REGISTER sip:{host} SIP/2.0", reg_call, "2 REGISTER",
            'Authorization: Digest username="***", response="***"\r\nExpires: 3600\r\n'),
        msg(0.090, "in", "SIP/2.0 200 OK", reg_call, "2 REGISTER", "Expires: 3600\r\n"),
        msg(60.000, "in", f"INVITE {aor} SIP/2.0", inv_call, "101 INVITE"),
        msg(60.002, "out", "SIP/2.0 100 Trying", inv_call, "101 INVITE"),
        msg(60.003, "out", "SIP/2.0 180 Ringing", inv_call, "101 INVITE",
            "X-Sipis-Push-Status: Alerting-Device\r\n"),
        msg(60.150, "out", "SIP/2.0 180 Ringing", inv_call, "101 INVITE",
            "X-Sipis-Push-Status: Push-Notification-Sent\r\n"),
        msg(63.800, "out", "SIP/2.0 302 Moved Temporarily", inv_call, "101 INVITE",
            f"Contact: <{aor};transport=tls>\r\n"),
        msg(63.840, "in", f"ACK {aor} SIP/2.0", inv_call, "101 ACK"),
    ]


class FakeFeed:
    """A deterministic :class:`~console.feed.Feed`: fixed rows, scripted events, recorded actions."""

    def __init__(self, *, instances: int = 40, now: float = 1_700_000_000.0, name: str = "alice",
                 role: str = "operator", refuse_actions: bool = False, rows: list[InstanceRow] | None = None) -> None:
        self.now = now
        self.operator = Whoami(name, role)
        self.rows = rows if rows is not None else fake_rows(instances, now)
        self.refuse_actions = refuse_actions
        self.actions: list[tuple[str, str]] = []  # (selector or push id, action) that the "core" carried out
        self.requests: list[tuple[str, tuple[Any, ...]]] = []  # every call, in order
        self._queue: asyncio.Queue[Event | StreamNotice] | None = None
        self._seq = 0
        self._summaries = 0
        self._push_seq = 0
        self.pbx_reachable = True
        self.active_alarms = [AlarmRecord("pbx-down-2", "pbx-down", "udp:192.0.2.10:5060", "raised", now - 90,
                                          "408 Request Timeout")]
        self.past_alarms = [AlarmRecord("token-dead-1", "token-dead", None, "cleared", now - 4000,
                                        "12 push tokens dead within 300 s", now - 3000)]
        #: the cluster's nodes (one: the fake core itself)
        self.node_rows = [NodeRow("fake-core", "up", len(self.rows), 0.4, now - 3600)]
        self.nodes_up = 1

    # -------------------------------------------------------------- scripting

    @property
    def queue(self) -> asyncio.Queue[Event | StreamNotice]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def emit(self, kind: str, selector: str | None = None, /, *, at: float | None = None,
             **data: Any) -> Event | StreamNotice:
        """Put one line on the stream (and keep the fake's own rows in step): an event, or a
        ``gap``/``overflow`` notice (like the core's, those carry no seq of their own)."""
        when = self.now if at is None else at
        if kind in (StreamNoticeKind.GAP, StreamNoticeKind.OVERFLOW):
            notice = StreamNotice(StreamNoticeKind(kind), when, **data)
            self.queue.put_nowait(notice)
            return notice
        self._seq += 1
        item = event(self._seq, when, kind, selector, **data)
        patch = row_patch(item)
        if selector and patch:
            self.rows = [replace(r, **patch) if r.selector == selector else r for r in self.rows]
        self.queue.put_nowait(item)
        return item

    def _row(self, selector: str) -> InstanceRow:
        for row in self.rows:
            if row.selector == selector:
                return row
        raise NotFound(f"no instance {selector}", status=404, code="not-found")

    def _view(self, row: InstanceRow) -> InstanceView:
        """The row's instance as the core shows it (token masked)."""
        return InstanceView(
            selector=row.selector, state=row.state, aor=row.aor, username=row.user, auth_username=row.user,
            registrar=row.registrar, display_name=row.user.title(),
            instance_id=f"urn:uuid:00000000-0000-4000-8000-{int(row.selector[1:]):012d}", reg_id=1,
            push=PushView(row.push_provider or "fcm", "com.example.phone", "f3a9…c01d", None, row.push_unreachable),
            registration=RegistrationView(row.reg_status, row.last_code, row.last_reason, row.expires_at,
                                          row.next_refresh_at, row.failure_count, row.backoff_until,
                                          "tls:198.51.100.20:5061"),
            app_contact=f"<{row.aor};transport=tls>", app_last_seen=row.app_last_seen or self.now,
            created_at=self.now - 86400, disabled=False, credentials_stored=row.state != "off")

    def _log(self, name: str, *args: Any) -> None:
        self.requests.append((name, args))

    # -------------------------------------------------------------- the Feed protocol

    async def whoami(self) -> Whoami:
        self._log("whoami")
        return self.operator

    async def health_targets(self) -> HealthTargets:
        self._log("health_targets")
        down = not self.pbx_reachable
        return HealthTargets([
            HealthTarget("pbx", "udp:192.0.2.10:5060", "down" if down else "up", self.now - 600,
                         "408 Request Timeout" if down else None, self.now - 30 if down else None, 24),
            HealthTarget("provider", "fcm", "up", self.now - 3600, None, None, 30)])

    async def summary(self) -> Summary:
        self._log("summary")
        self._summaries += 1
        k = self._summaries
        counts: dict[str, int] = {"active": 0, "inactive": 0, "proxied": 0, "off": 0}
        reg: dict[str, int] = {}
        for row in self.rows:
            counts[row.state] = counts.get(row.state, 0) + 1
            reg[row.reg_status] = reg.get(row.reg_status, 0) + 1
        return Summary(
            node="sipis-lab-1", version="0.1.0", started_at=self.now - 3 * 86400 - 4 * 3600 - 5 * 60,
            now=self.now, counts=counts, reg_status=reg, held_calls=2, calls_per_min=(k * 7) % 13,
            outcomes={"redirected": 40 + k, "timeout": 3},
            push=PushStats(accepted=1000 + 10 * k, rejected=3 + (k * 5) % 7 // 3 + k // 4, transient=2 + k // 3,
                           success_rate=0.994, latency_p50_ms=84.0, latency_p99_ms=412.0),
            pbx=PbxStatus(self.pbx_reachable, None if self.pbx_reachable else "connect timeout",
                          up=3 if self.pbx_reachable else 2, down=0 if self.pbx_reachable else 1),
            writer=WriterStatus(0, None), alarms=0 if self.pbx_reachable else 1, nodes_up=self.nodes_up,
        )

    async def instances(self) -> list[InstanceRow]:
        self._log("instances")
        return list(self.rows)

    async def instance_page(self, limit: int) -> InstancePage:
        self._log("instance_page", limit)
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.state] = counts.get(row.state, 0) + 1
        first = sorted(self.rows, key=lambda r: r.aor.lower())[:max(1, limit)]
        return InstancePage(total=len(self.rows), matched=len(self.rows), counts=counts, items=first)

    async def instance(self, selector: str) -> InstanceDetail:
        self._log("instance", selector)
        row = self._row(selector)
        sip = _fake_sip(selector, row, self.now)
        t_invite = sip[4].at
        push = PushRecord(push_id=f"p-{selector}-1", selector=selector, kind="call",
                          provider=row.push_provider or "fcm", call_id=sip[4].call_id, attempt=1,
                          outcome="accepted", provider_code=200, latency_ms=142.0,
                          stages={"invite_received": t_invite, "push_sent": t_invite + 0.004,
                                  "provider_accepted": t_invite + 0.146, "app_active": t_invite + 3.7},
                          request_summary={"priority": "high", "type": "voip"})
        timeline = [
            event(1, sip[0].at - 1, "instance.app", selector, reported="inactive"),
            event(2, sip[3].at, "registration", selector, result="registered", code=200, reason="OK", expires=3600),
            event(3, sip[3].at, "instance.state", selector, state="proxied", previous="active"),
            event(4, t_invite, "call", selector, call_id=sip[4].call_id, push_id=push.push_id,
                  stage="Alerting-Device"),
            event(5, push.stages["provider_accepted"], "push", selector, push_id=push.push_id, kind="call",
                  provider=push.provider, outcome="accepted"),
            event(6, t_invite + 3.7, "instance.app", selector, reported="active"),
        ]
        return InstanceDetail(instance=self._view(row), row=row, timeline=timeline, pushes=[push], sip=sip)

    async def calls(self) -> CallsSnapshot:
        self._log("calls")
        held = [
            HeldCall(call_id=f"inv-{row.selector}@pbx", push_id=f"p-{row.selector}-9", selector=row.selector,
                     caller=f"sip:+4930123456{n}@pbx1.example.net", stage=stage, received_at=self.now - 8 - n,
                     t1_remaining=112 - 40 * n, t2_remaining=232 - 40 * n)
            for n, (row, stage) in enumerate(zip(self.rows[:2], ("Push-Notification-Sent", "Alerting-Device"),
                                                 strict=False))
        ]
        recent = [HeldCall(call_id="inv-old@pbx", push_id="p-old", selector=self.rows[0].selector if self.rows
                           else "", caller="sip:+493099@pbx1.example.net", stage="Ended",
                           received_at=self.now - 600, outcome="redirected", final_status=302)]
        return CallsSnapshot(held=held, recent=recent)

    async def call_trace(self, call_id: str) -> CallTrace:
        self._log("call_trace", call_id)
        selector = call_id.split("-", 1)[-1].split("@", 1)[0]
        detail = await self.instance(selector if any(r.selector == selector for r in self.rows)
                                     else self.rows[0].selector)
        return CallTrace(call_id=call_id, selector=detail.row.selector,
                         messages=[m for m in detail.sip if m.method in ("INVITE", "ACK")], pushes=detail.pushes)

    async def call_trace_text(self, call_id: str) -> str:
        self._log("call_trace_text", call_id)
        trace = await self.call_trace(call_id)
        lines = [f"call {call_id}"] + [f"{m.at:.3f} {m.direction} {m.first_line}" for m in trace.messages]
        return "\n".join(lines) + "\n"

    async def call_trace_pcap(self, call_id: str) -> bytes:
        self._log("call_trace_pcap", call_id)
        # a valid, empty libpcap file (magic, v2.4, snaplen 65535, linktype 101/RAW)
        return bytes.fromhex("d4c3b2a1020004000000000000000000ffff000065000000")

    async def pushes(self, limit: int = 200, selector: str | None = None) -> list[PushRecord]:
        self._log("pushes", limit, selector)
        rows = [r for r in self.rows if r.last_push_outcome and (selector is None or r.selector == selector)]
        pushes = [PushRecord(push_id=f"p-{r.selector}-1", selector=r.selector, kind="call" if i % 3 else "test",
                             provider=r.push_provider or "", attempt=1 + (i % 4 == 3),
                             outcome=r.last_push_outcome or "pending",
                             provider_code=200 if r.last_push_outcome == "accepted" else 410 if
                             r.last_push_outcome == "rejected-permanent" else 503,
                             latency_ms=60.0 + (i * 37) % 300, stages={"push_sent": r.last_push_at or self.now})
                  for i, r in enumerate(rows)]
        pushes.sort(key=lambda p: p.stages["push_sent"])
        return pushes[-limit:]

    async def nodes(self) -> list[NodeRow]:
        self._log("nodes")
        return list(self.node_rows)

    async def audit(self, limit: int = 200) -> list[AuditEntry]:
        self._log("audit", limit)
        return [AuditEntry(id="a1", at=self.now - 3600, operator="root", role="admin", action="take_over",
                           target=self.rows[0].selector if self.rows else None, outcome="ok")][:limit]

    async def events(self, since: int | None = None) -> AsyncIterator[Event | StreamNotice]:
        self._log("events", since)
        while True:
            yield await self.queue.get()

    def _require(self, needed: str, action: str, target: str) -> None:
        if self.refuse_actions or not role_allows(self.operator.role, needed):
            raise Forbidden(f"{action} needs the {needed} role; {self.operator.name} is {self.operator.role}",
                            status=403, code="forbidden")

    async def action(self, selector: str, name: str) -> ActionResult | PushResult:
        self._log("action", selector, name)
        if name not in ACTIONS:
            raise FeedError(f"unknown action {name}", status=404, code="not-found")
        self._require(ACTIONS[name][1], name, selector)
        row = self._row(selector)
        self.actions.append((selector, name))
        if name == "test-push":
            self._push_seq += 1
            return PushResult(PushRecord(push_id=f"test-{self._push_seq}", selector=selector, kind="test",
                                         provider="fcm", attempt=1, outcome="accepted", provider_code=200,
                                         latency_ms=90.0, stages={"push_sent": self.now}))
        return ActionResult(instance=self._view(row), row=row)

    async def alarms(self) -> AlarmList:
        self._log("alarms")
        return AlarmList(list(self.active_alarms), list(self.past_alarms))

    async def acknowledge_alarm(self, alarm_id: str) -> AlarmRecord:
        self._log("acknowledge_alarm", alarm_id)
        self._require(ACKNOWLEDGE_ROLE, "acknowledge", alarm_id)
        record = next(r for r in [*self.active_alarms, *self.past_alarms] if r.id == alarm_id)
        record.acknowledged_by, record.acknowledged_at = self.operator.name, self.now
        return record

    async def replay_push(self, push_id: str) -> PushRecord:
        self._log("replay_push", push_id)
        self._require(REPLAY_ROLE, "replay", push_id)
        self.actions.append((push_id, "replay"))
        self._push_seq += 1
        return PushRecord(push_id=f"replay-{self._push_seq}", selector="", kind="call", provider="fcm", attempt=1,
                          outcome="accepted", replay_of=push_id, stages={"push_sent": self.now})
