"""The SIP trace recorder: every message the endpoint sends or receives, kept per call and per instance.

The endpoint calls :meth:`TraceRecorder.observe` for each message (``"in"`` / ``"out"``); the
recorder snapshots it as bytes (about a microsecond) and files it in two bounded stores:

* per **Call-ID** — every method but REGISTER and OPTIONS (those are per-binding housekeeping that
  would push real calls out): the last ``max_calls`` calls, ``per_call`` messages each;
* per **instance** (selector) — everything that names one: REGISTER by the user part of our
  Contact (``sipis-<uuid>``), requests to us by their Request-URI user, responses and later
  requests of the same Call-ID by the mapping learnt from the request; the ``max_instances`` most
  recently active instances, ``per_instance`` messages each.

Each store also has a byte budget; when over it, the least recently active call or instance goes
first. Decoding (first line, CSeq, masking of ``Authorization`` / ``Proxy-Authorization``) happens
only when somebody looks. Exports: :meth:`text_ladder` (readable ladder PBX ⇄ SIPIS ⇄ push plus the
raw messages) and :meth:`pcap` (libpcap, linktype 101 raw IP, each message as one UDP datagram
between the flow's addresses — also for TCP/TLS flows, so Wireshark's SIP dissector reads them).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, cast

from contract.codec import to_json
from contract.documents import SipMessage
from sipis.clock import Clock, SystemClock
from sipis.sip.message import Message, Request
from sipis.sip.transport import Flow

#: Methods not filed per Call-ID (they are kept per instance only).
NOT_CALLS = frozenset({"REGISTER", "OPTIONS"})
#: Bytes a stored message costs besides its text (object, tuples, deque slot), for the budget.
OVERHEAD = 200
MASKED = "<masked>"
_MASKED_BYTES = MASKED.encode()

_AUTH_LINE = re.compile(r"(?im)^((?:proxy-)?authorization[ \t]*:[ \t]*)(\S+)[^\r\n]*")
_AUTH_LINE_BYTES = re.compile(rb"(?im)^((?:proxy-)?authorization[ \t]*:[ \t]*)(\S+)[^\r\n]*")
_CSEQ_LINE = re.compile(r"(?im)^cseq[ \t]*:[ \t]*(\d+)[ \t]+(\S+)")

SelectorLookup = Callable[[str], "str | None"]
PushSource = Callable[[str], "list[dict[str, Any]]"]


class TracedMessage:
    """One SIP message as it went over the wire (raw bytes; decoded on demand)."""

    __slots__ = ("at", "call_id", "direction", "local", "raw", "remote", "selector", "transport")

    def __init__(self, at: float, direction: str, transport: str, local: tuple[str, int],
                 remote: tuple[str, int], raw: bytes, call_id: str, selector: str | None) -> None:
        self.at = at
        self.direction = direction
        self.transport = transport
        self.local = local
        self.remote = remote
        self.raw = raw
        self.call_id = call_id
        self.selector = selector

    @property
    def size(self) -> int:
        return len(self.raw) + OVERHEAD

    def text(self) -> str:
        """The message as text with credentials masked."""
        return mask_credentials(self.raw.decode("utf-8", "replace"))

    def first_line(self) -> str:
        end = self.raw.find(b"\r\n")
        return self.raw[: end if end >= 0 else 200].decode("utf-8", "replace")

    def summary(self) -> tuple[str, int | None, str | None, int | None]:
        """(first line, CSeq number, method, status) — the method of a response is its CSeq's."""
        first = self.first_line()
        head_end = self.raw.find(b"\r\n\r\n")
        head = self.raw[: head_end if head_end >= 0 else len(self.raw)].decode("utf-8", "replace")
        match = _CSEQ_LINE.search(head)
        cseq = int(match.group(1)) if match else None
        cseq_method = match.group(2) if match else None
        if first.startswith("SIP/2.0 "):
            code = first[8:11]
            return first, cseq, cseq_method, int(code) if code.isdigit() else None
        return first, cseq, first.split(" ", 1)[0] or cseq_method, None

    def view(self) -> SipMessage:
        first, cseq, method, status = self.summary()
        return SipMessage(at=self.at, direction=self.direction, transport=self.transport,
                          local=_hostport(self.local), remote=_hostport(self.remote), first_line=first,
                          call_id=self.call_id, cseq=cseq, method=method, status=status,
                          selector=self.selector, raw=self.text())

    def as_dict(self) -> dict[str, Any]:
        """:meth:`view` as JSON."""
        return cast(dict[str, Any], to_json(self.view()))


def mask_credentials(text: str) -> str:
    """Replace the value of every Authorization / Proxy-Authorization header (the scheme stays)."""
    return _AUTH_LINE.sub(lambda m: f"{m.group(1)}{m.group(2)} {MASKED}", text)


def mask_credentials_bytes(raw: bytes) -> bytes:
    """:func:`mask_credentials` on a message as it went over the wire (pcap, HEP)."""
    return _AUTH_LINE_BYTES.sub(lambda m: m.group(1) + m.group(2) + b" " + _MASKED_BYTES, raw)


#: How a message is stored: a plain tuple of the :class:`TracedMessage` fields, in its constructor's
#: order — ``(at, direction, transport, local, remote, raw, call_id, selector)``. Holding only
#: strings, numbers, bytes and address tuples, it is untracked by the cyclic garbage collector
#: after the first collection it survives, so tens of thousands of kept messages add nothing to
#: the collector's pauses (a ``TracedMessage`` object would stay tracked for its whole life).
Stored = tuple[float, str, str, tuple[Any, ...], tuple[Any, ...], bytes, str, "str | None"]


def _size(stored: Stored) -> int:
    return len(stored[5]) + OVERHEAD


class _Rings:
    """Bounded rings of messages keyed by Call-ID or selector; least recently active key goes first.

    A ring is a tuple of :data:`Stored` messages, replaced on every append (at most ``per_key``
    items are copied): like the messages it is untracked by the garbage collector, and a ring of a
    few messages takes a tenth of a deque's memory."""

    def __init__(self, max_keys: int, per_key: int, max_bytes: int) -> None:
        self.max_keys = max_keys
        self.per_key = per_key
        self.max_bytes = max_bytes
        self.bytes = 0
        self.messages = 0
        self.rings: OrderedDict[str, tuple[Stored, ...]] = OrderedDict()

    def add(self, key: str, message: Stored) -> None:
        rings = self.rings
        ring = rings.get(key)
        if ring is None:
            rings[key] = (message,)
        else:
            rings.move_to_end(key)
            if len(ring) >= self.per_key:
                drop = len(ring) - self.per_key + 1
                self.bytes -= sum(_size(m) for m in ring[:drop])
                self.messages -= drop
                ring = ring[drop:]
            rings[key] = (*ring, message)
        self.bytes += _size(message)
        self.messages += 1
        while len(rings) > self.max_keys or (self.bytes > self.max_bytes and len(rings) > 1):
            _, old = rings.popitem(last=False)
            self.bytes -= sum(_size(m) for m in old)
            self.messages -= len(old)

    def get(self, key: str) -> list[TracedMessage]:
        ring = self.rings.get(key)
        return [TracedMessage(*m) for m in ring] if ring is not None else []

    def __contains__(self, key: object) -> bool:
        return key in self.rings


class TraceRecorder:
    def __init__(self, clock: Clock | None = None, *, selector_of_user: SelectorLookup | None = None,
                 max_calls: int = 5000, per_call: int = 200, call_bytes: int = 64 * 1024 * 1024,
                 max_instances: int = 20_000, per_instance: int = 50, instance_bytes: int = 64 * 1024 * 1024,
                 max_call_ids: int = 200_000) -> None:
        self.clock = clock or SystemClock()
        #: contact user (``sipis-…``) → selector; set by the core once the instance service exists
        self.selector_of_user = selector_of_user
        #: call_id → pushes (dicts as the operator API shows them) for the ladder; set by the core
        self.push_source: PushSource | None = None
        self.calls = _Rings(max_calls, per_call, call_bytes)
        self.instances = _Rings(max_instances, per_instance, instance_bytes)
        self._call_selector: OrderedDict[str, str] = OrderedDict()
        self._max_call_ids = max_call_ids
        self.observed = 0

    # ------------------------------------------------------------------ recording (hot path)

    def observe(self, direction: str, message: Message, flow: Flow) -> None:
        self.observed += 1
        call_id = message.call_id
        if isinstance(message, Request):
            method = message.method
            selector = self._selector_of_request(message, method, call_id)
        else:
            try:
                method = message.cseq[1]
            except ValueError:
                method = ""
            selector = self._call_selector.get(call_id)
        traced: Stored = (self.clock.wall(), direction, flow.transport, flow.local, flow.remote,
                          message.to_bytes(), call_id, selector)
        if method not in NOT_CALLS and call_id:
            self.calls.add(call_id, traced)
        if selector is not None:
            self.instances.add(selector, traced)

    def _selector_of_request(self, request: Request, method: str, call_id: str) -> str | None:
        if method == "REGISTER":
            contact = request.headers.get("Contact")
            user = _uri_user(contact) if contact else None
        else:
            user = _uri_user(request.uri)
        selector = None
        if user is not None and user.startswith("sipis-") and self.selector_of_user is not None:
            selector = self.selector_of_user(user)
        mapping = self._call_selector
        if selector is None:
            return mapping.get(call_id)
        if mapping.get(call_id) != selector:
            mapping[call_id] = selector
            if len(mapping) > self._max_call_ids:
                mapping.popitem(last=False)
        return selector

    # ------------------------------------------------------------------ reading

    def selector_of_call(self, call_id: str) -> str | None:
        return self._call_selector.get(call_id)

    def call_messages(self, call_id: str) -> list[TracedMessage]:
        """The messages of one Call-ID, oldest first. REGISTER dialogs come from the instance store."""
        if call_id in self.calls:
            return self.calls.get(call_id)
        selector = self._call_selector.get(call_id)
        if selector is None:
            return []
        return [m for m in self.instances.get(selector) if m.call_id == call_id]

    def instance_messages(self, selector: str, limit: int | None = None) -> list[TracedMessage]:
        messages = self.instances.get(selector)
        return messages[-limit:] if limit else messages

    def messages(self, call_id: str) -> list[dict[str, Any]]:
        return [m.as_dict() for m in self.call_messages(call_id)]

    def stats(self) -> dict[str, int]:
        return {"observed": self.observed, "calls": len(self.calls.rings), "call_messages": self.calls.messages,
                "call_bytes": self.calls.bytes, "instances": len(self.instances.rings),
                "instance_messages": self.instances.messages, "instance_bytes": self.instances.bytes}

    # ------------------------------------------------------------------ exports

    def text_ladder(self, call_id: str, pushes: list[dict[str, Any]] | None = None) -> str:
        if pushes is None:
            pushes = self.push_source(call_id) if self.push_source is not None else []
        return render_ladder(call_id, self.call_messages(call_id), pushes, self.selector_of_call(call_id))

    def pcap(self, call_id: str) -> bytes:
        return pcap_bytes(self.call_messages(call_id))


# --------------------------------------------------------------------------- helpers


def _uri_user(text: str) -> str | None:
    """The user part of the first SIP URI in ``text`` (``<sip:user@host>;…`` or ``sip:user@host``)."""
    start = text.find("sip:")
    if start < 0:
        start = text.find("sips:")
        if start < 0:
            return None
        start += 5
    else:
        start += 4
    at = text.find("@", start)
    if at < 0:
        return None
    user = text[start:at]
    return user.split(";", 1)[0].split(":", 1)[0]


def _hostport(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _clock_text(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%H:%M:%S.%f")[:-3]


_LANE = 40


def _arrow(label: str, rightwards: bool) -> str:
    """One lane, ``_LANE`` characters: ``|--- label ---->`` or ``|<-- label -----``; the next lane
    (or the closing ``|``) supplies the bar at the far end."""
    room = _LANE - 10
    if len(label) > room:
        label = label[: room - 1] + "~"
    line = ("|--- " if rightwards else "|<-- ") + label + " "
    return line + "-" * (_LANE - len(line) - (1 if rightwards else 0)) + (">" if rightwards else "")


def _blank() -> str:
    return "|" + " " * (_LANE - 1)


_STAGE_TEXT = {
    "push_sent": ("out", "{kind} push via {provider}"),
    "provider_accepted": ("back", "accepted{code}{latency}"),
    "device_progress": ("back", "app: device making progress"),
    "app_active": ("back", "app: active (registered itself)"),
    "released": ("note", "call released to the app"),
    "ended": ("note", "call ended"),
}


def _push_rows(push: dict[str, Any]) -> list[tuple[float, str]]:
    rows: list[tuple[float, str]] = []
    stages: dict[str, float] = dict(push.get("stages") or {})
    code = f" {push['provider_code']}" if push.get("provider_code") is not None else ""
    latency = f" ({push['latency_ms']:.0f} ms)" if isinstance(push.get("latency_ms"), int | float) else ""
    for stage, at in stages.items():
        spec = _STAGE_TEXT.get(stage)
        if spec is None:
            continue
        where, template = spec
        label = template.format(kind=push.get("kind", "?"), provider=push.get("provider", "?"), code=code,
                                latency=latency)
        if where == "out":
            rows.append((at, _blank() + _arrow(label, True) + "|"))
        elif where == "back":
            rows.append((at, _blank() + _arrow(label, False) + "|"))
        else:
            rows.append((at, _blank() + f"|  ({label})"))
    outcome = str(push.get("outcome") or "")
    if outcome.startswith("rejected") and stages:
        last = max(stages.values())
        reason = push.get("error") or push.get("provider_reason") or ""
        label = f"{outcome}{code} {reason}".strip()
        rows.append((last, _blank() + _arrow(label, False) + "|"))
    return rows


def render_ladder(call_id: str, messages: list[TracedMessage], pushes: list[dict[str, Any]],
                  selector: str | None = None) -> str:
    """A readable ladder (time, PBX ⇄ SIPIS ⇄ push) followed by every message in full."""
    out = [f"SIP trace of Call-ID {call_id}"]
    if selector is not None:
        out.append(f"instance: {selector}")
    first_at = min([m.at for m in messages] + [min((p.get("stages") or {}).values(), default=float("inf"))
                                               for p in pushes] + [float("inf")])
    if first_at != float("inf"):
        out.append(f"date (UTC): {datetime.datetime.fromtimestamp(first_at, datetime.UTC):%Y-%m-%d}")
    out.append(f"SIP messages: {len(messages)}, pushes: {len(pushes)}; PBX = the SIP peer, push = provider/app")
    out.append("")
    header = f"{'time (UTC)':<14}{'PBX':<{_LANE}}{'SIPIS':<{_LANE}}push"
    out.append(header)
    rows: list[tuple[float, int, str]] = []
    for index, message in enumerate(messages):
        first, _cseq, method, status = message.summary()
        label = first if status is None else f"{status} {first[12:]}".strip()
        if status is None and " SIP/2.0" in label:
            label = label.rsplit(" SIP/2.0", 1)[0]
        if status is not None and method:
            label = f"{label} ({method})"
        arrow = _arrow(label, message.direction == "in")
        note = f"  {message.transport} {_hostport(message.remote)}"
        rows.append((message.at, index, arrow + _blank() + "|" + note))
    for push in pushes:
        for at, line in _push_rows(push):
            rows.append((at, len(messages), line))
    rows.sort(key=lambda row: (row[0], row[1]))
    for at, _, line in rows:
        out.append(f"{_clock_text(at):<14}{line}".rstrip())
    out.append("")
    for index, message in enumerate(messages, 1):
        arrow = "<-" if message.direction == "in" else "->"
        out.append(f"----- #{index} {_clock_text(message.at)} {message.direction} {message.transport} "
                   f"{_hostport(message.local)} {arrow} {_hostport(message.remote)} -----")
        out.append(message.text().replace("\r\n", "\n").rstrip("\n"))
        out.append("")
    for push in pushes:
        out.append(f"----- push {push.get('push_id')} {push.get('kind')} via {push.get('provider')}: "
                   f"{push.get('outcome')} (attempts {push.get('attempt')}) -----")
        for stage, at in (push.get("stages") or {}).items():
            out.append(f"  {_clock_text(at)} {stage}")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- pcap

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_RAW = 101
SNAPLEN = 65535
_MAX_PAYLOAD = 65535 - 48  # fits an IPv4 and an IPv6 datagram


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return ipaddress.IPv4Address("0.0.0.0")


def ip_udp_packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes, ident: int = 0) -> bytes:
    """One IPv4 (or IPv6, when both ends are v6) datagram carrying ``payload`` over UDP."""
    payload = payload[:_MAX_PAYLOAD]
    src_ip, dst_ip = _ip(src[0]), _ip(dst[0])
    if src_ip.version != dst_ip.version:  # cannot mix in one header: map v4 to v6
        src_ip = src_ip if src_ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{src_ip}")
        dst_ip = dst_ip if dst_ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst_ip}")
    udp_length = 8 + len(payload)
    if src_ip.version == 4:
        pseudo = src_ip.packed + dst_ip.packed + struct.pack("!BBH", 0, 17, udp_length)
    else:
        pseudo = src_ip.packed + dst_ip.packed + struct.pack("!I3xB", udp_length, 17)
    udp = struct.pack("!HHHH", src[1] & 0xFFFF, dst[1] & 0xFFFF, udp_length, 0) + payload
    udp_sum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_sum) + udp[8:]
    if src_ip.version == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_length, ident & 0xFFFF, 0x4000, 64, 17, 0,
                             src_ip.packed, dst_ip.packed)
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return header + udp
    return struct.pack("!IHBB16s16s", 6 << 28, udp_length, 17, 64, src_ip.packed, dst_ip.packed) + udp


def pcap_bytes(messages: Iterable[TracedMessage]) -> bytes:
    """A libpcap file (microsecond timestamps, linktype 101) with one UDP datagram per message;
    credentials are masked as in every other export."""
    parts = [struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW)]
    for ident, message in enumerate(messages, 1):
        if message.direction == "in":
            src, dst = message.remote, message.local
        else:
            src, dst = message.local, message.remote
        packet = ip_udp_packet(src, dst, mask_credentials_bytes(message.raw), ident)
        seconds = int(message.at)
        micros = min(999_999, round((message.at - seconds) * 1_000_000))
        parts.append(struct.pack("<IIII", seconds, micros, len(packet), len(packet)))
        parts.append(packet)
    return b"".join(parts)
