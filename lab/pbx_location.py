"""The lab PBX's location table (usrloc) and digest nonce book, sans-I/O.

Bindings are keyed by AOR user (like Kamailio with ``use_domain=0``). Within an AOR a binding is
identified (RFC 5626 §6, Kamailio's ``get_ucontact_by_instance``) by its ``+sip.instance`` and
``reg-id`` when the Contact carries an instance, otherwise by its contact URI. Every method takes
the current (monotonic) time, so expiry is tested without sleeping; the asyncio side only arms one
timer for :meth:`LocationTable.next_expiry`.
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from sipis.sip.message import SipParseError, SipURI
from sipis.sip.transport import Flow

ChangeKind = Literal["added", "refreshed", "replaced", "removed", "expired"]
ChangeListener = Callable[[ChangeKind, "PbxBinding"], None]

_ids = itertools.count(1)


def contact_identity(uri: str) -> tuple[str | None, str, int | None, str]:
    """What makes two contact URIs the same binding: user, host (any case), port, transport."""
    try:
        parsed = SipURI.parse(uri)
    except SipParseError:
        return (None, uri.strip().lower(), None, "")
    return (parsed.user, parsed.host.lower(), parsed.port, parsed.transport)


def unquote(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@dataclass(eq=False)
class PbxBinding:
    """One registered contact of one AOR."""

    user: str
    contact: str  # the contact URI as registered (no header parameters)
    expires_at: float  # monotonic
    call_id: str
    cseq: int
    transport: str  # transport the REGISTER came in over
    source: tuple[str, int]  # where it came from (received=)
    flow: Flow | None = field(default=None, repr=False)  # the registering flow (TCP/TLS: way back)
    instance: str | None = None  # +sip.instance without the quotes, e.g. "<urn:uuid:...>"
    reg_id: int | None = None
    user_agent: str | None = None
    id: int = field(default_factory=lambda: next(_ids))  # new for every new (or replacing) binding
    registered_at: float = 0.0

    @property
    def key(self) -> tuple[str, ...]:
        if self.instance is not None:
            return ("instance", self.instance, str(self.reg_id or 0))
        return ("uri", *map(str, contact_identity(self.contact)))

    def expires_in(self, now: float) -> int:
        return max(0, round(self.expires_at - now))

    def contact_header(self, now: float) -> str:
        """A Contact value for the REGISTER's 200 (RFC 3261 §10.3 step 8)."""
        value = f"<{self.contact}>;expires={self.expires_in(now)}"
        if self.instance is not None:
            value += f';+sip.instance="{self.instance}"'
        if self.reg_id is not None:
            value += f";reg-id={self.reg_id}"
        return value

    @property
    def received(self) -> str | None:
        """Kamailio's ``received`` for stream transports (fix_nated_register), None for UDP."""
        if self.transport == "udp":
            return None
        host, port = self.source
        host = f"[{host}]" if ":" in host else host
        return f"sip:{host}:{port};transport={self.transport}"


@dataclass
class ContactUpdate:
    """One Contact of a REGISTER, already checked: ``expires`` 0 means remove."""

    contact: str
    expires: int
    instance: str | None = None
    reg_id: int | None = None

    @property
    def key(self) -> tuple[str, ...]:
        if self.instance is not None:
            return ("instance", self.instance, str(self.reg_id or 0))
        return ("uri", *map(str, contact_identity(self.contact)))


class OutOfOrder(Exception):
    """A REGISTER with the Call-ID of a binding and a CSeq not above its CSeq (RFC 3261 §10.3 step 7)."""


class LocationTable:
    """AOR user → bindings. Listeners hear about every change (demo views, tests)."""

    def __init__(self) -> None:
        self._aors: dict[str, list[PbxBinding]] = {}
        self.listeners: list[ChangeListener] = []

    def _emit(self, kind: ChangeKind, binding: PbxBinding) -> None:
        for listener in list(self.listeners):
            listener(kind, binding)

    def lookup(self, user: str, now: float) -> list[PbxBinding]:
        """The live bindings of ``user``, newest registration first."""
        self.expire(now)
        return sorted(self._aors.get(user, []), key=lambda b: b.registered_at, reverse=True)

    def all(self, now: float) -> list[PbxBinding]:
        self.expire(now)
        return [b for user in sorted(self._aors) for b in self._aors[user]]

    def users(self, now: float) -> list[str]:
        self.expire(now)
        return sorted(self._aors)

    def find_contact(self, uri: str, now: float) -> PbxBinding | None:
        """The binding registered with this contact URI (any AOR), if any."""
        wanted = contact_identity(uri)
        for binding in self.all(now):
            if contact_identity(binding.contact) == wanted:
                return binding
        return None

    def save(self, user: str, updates: Iterable[ContactUpdate], *, call_id: str, cseq: int, transport: str,
             source: tuple[str, int], flow: Flow | None, user_agent: str | None, now: float) -> None:
        """Apply one REGISTER's contacts (all or nothing: :class:`OutOfOrder` changes nothing)."""
        self.expire(now)
        current = self._aors.get(user, [])
        updates = list(updates)
        by_key = {b.key: b for b in current}
        events: list[tuple[ChangeKind, PbxBinding]] = []
        for update in updates:
            existing = by_key.get(update.key)
            if existing is not None and existing.call_id == call_id and cseq <= existing.cseq:
                raise OutOfOrder(f"CSeq {cseq} not above {existing.cseq} for {existing.contact}")
        for update in updates:
            existing = by_key.pop(update.key, None)
            if update.expires <= 0:
                if existing is not None:
                    current.remove(existing)
                    events.append(("removed", existing))
                continue
            fresh = PbxBinding(
                user=user, contact=update.contact, expires_at=now + update.expires, call_id=call_id, cseq=cseq,
                transport=transport, source=source, flow=flow, instance=update.instance, reg_id=update.reg_id,
                user_agent=user_agent, registered_at=now,
            )
            if existing is None:
                current.append(fresh)
                kind: ChangeKind = "added"
            elif existing.call_id == call_id and contact_identity(existing.contact) == contact_identity(
                    update.contact) and existing.flow is flow:
                # a refresh of the same registration: same binding (keeps its id)
                existing.expires_at, existing.cseq, existing.source = fresh.expires_at, cseq, source
                existing.contact, existing.user_agent = update.contact, user_agent
                fresh, kind = existing, "refreshed"
            else:
                current[current.index(existing)] = fresh
                kind = "replaced"
            by_key[fresh.key] = fresh
            events.append((kind, fresh))
        self._store(user, current)
        for kind, binding in events:  # after storing: listeners see the table as it now is
            self._emit(kind, binding)

    def remove_all(self, user: str) -> int:
        """``Contact: *`` with ``Expires: 0``: every binding of the AOR goes."""
        removed = self._aors.pop(user, [])
        for binding in removed:
            self._emit("removed", binding)
        return len(removed)

    def remove(self, binding: PbxBinding) -> bool:
        current = self._aors.get(binding.user, [])
        if binding not in current:
            return False
        current.remove(binding)
        self._store(binding.user, current)
        self._emit("removed", binding)
        return True

    def clear(self) -> None:
        self._aors.clear()

    def _store(self, user: str, bindings: list[PbxBinding]) -> None:
        if bindings:
            self._aors[user] = bindings
        else:
            self._aors.pop(user, None)

    def expire(self, now: float) -> None:
        """Drop every binding whose expiry has passed."""
        for user in list(self._aors):
            bindings = self._aors[user]
            gone = [b for b in bindings if b.expires_at <= now]
            if not gone:
                continue
            self._store(user, [b for b in bindings if b.expires_at > now])
            for binding in gone:
                self._emit("expired", binding)

    def next_expiry(self) -> float | None:
        times = [b.expires_at for bindings in self._aors.values() for b in bindings]
        return min(times) if times else None

    def __len__(self) -> int:
        return sum(len(b) for b in self._aors.values())


class NonceBook:
    """Nonces we handed out, with their age; a bounded LRU (load tests issue thousands)."""

    def __init__(self, lifetime: float = 300.0, capacity: int = 100_000) -> None:
        self.lifetime = lifetime
        self.capacity = capacity
        self._issued: OrderedDict[str, float] = OrderedDict()
        #: highest nc seen per nonce (informational: reuse of an nc is accepted, as the brief asks)
        self.highest_nc: dict[str, int] = {}

    def issue(self, now: float) -> str:
        nonce = secrets.token_urlsafe(24)
        self._issued[nonce] = now
        while len(self._issued) > self.capacity:
            old, _ = self._issued.popitem(last=False)
            self.highest_nc.pop(old, None)
        return nonce

    def state(self, nonce: str, now: float) -> Literal["fresh", "stale", "unknown"]:
        issued = self._issued.get(nonce)
        if issued is None:
            return "unknown"
        return "fresh" if now - issued < self.lifetime else "stale"

    def used(self, nonce: str, nc: int | None) -> None:
        if nc is not None and nonce in self._issued:
            self.highest_nc[nonce] = max(nc, self.highest_nc.get(nonce, 0))

    def __len__(self) -> int:
        return len(self._issued)
