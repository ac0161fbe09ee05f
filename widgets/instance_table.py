"""The instance table: every instance on one Line-API table, countdowns computed at render time.

Fed with the contract's :class:`~contract.documents.InstanceRow` (a ``Sequence`` the console owns,
already filtered and sorted); colour-codes state, registration status, last code and last push
result.
"""

from __future__ import annotations

from contract.documents import InstanceRow
from widgets.format import ago, countdown
from widgets.table import Column, VirtualTable

STATE_TONE = {"proxied": "ok", "active": "info", "inactive": "warn", "off": "dim"}
REG_TONE = {
    "registered": "ok",
    "registering": "info",
    "unregistering": "info",
    "idle": "dim",
    "unauthorized": "bad",
    "error": "bad",
}
PUSH_TEXT = {
    "accepted": "accepted",
    "rejected-permanent": "rejected",
    "rejected-transient": "transient",
    "pending": "pending",
}
PUSH_TONE = {"accepted": "ok", "rejected-permanent": "bad", "rejected-transient": "warn", "pending": "info"}


def short_uri(uri: str) -> str:
    """``sip:alice@pbx`` → ``alice@pbx`` (the scheme is the same on every row)."""
    return uri[4:] if uri.startswith("sip:") else uri


def _code_tone(row: InstanceRow, now: float) -> str:
    code = row.last_code
    if code is None:
        return "dim"
    if code < 300:
        return "ok"
    if code < 400:
        return "info"
    return "bad"


def _refresh_text(row: InstanceRow, now: float) -> str:
    return countdown(row.next_refresh_at, now)


def _refresh_tone(row: InstanceRow, now: float) -> str:
    if row.backoff_until is not None and row.backoff_until > now:
        return "warn"
    if row.next_refresh_at is not None and row.next_refresh_at <= now:
        return "warn"
    return ""


def _expires_text(row: InstanceRow, now: float) -> str:
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return countdown(row.expires_at, now)


def _expires_tone(row: InstanceRow, now: float) -> str:
    if row.expires_at is None:
        return "dim"
    left = row.expires_at - now
    if left <= 0:
        return "bad"
    if left < 60:
        return "warn"
    return ""


def _push_text(row: InstanceRow, now: float) -> str:
    if row.push_unreachable:
        return "unreachable"
    if row.last_push_outcome is None:
        return "-"
    return PUSH_TEXT.get(row.last_push_outcome, row.last_push_outcome)


def _push_tone(row: InstanceRow, now: float) -> str:
    if row.push_unreachable:
        return "bad"
    if row.last_push_outcome is None:
        return "dim"
    return PUSH_TONE.get(row.last_push_outcome, "")


INSTANCE_COLUMNS: list[Column[InstanceRow]] = [
    Column("state", "State", 8, lambda r, now: r.state, lambda r, now: STATE_TONE.get(r.state, "")),
    Column("aor", "AOR", 18, lambda r, now: short_uri(r.aor), flex=1),
    Column("reg", "Reg", 12, lambda r, now: r.reg_status, lambda r, now: REG_TONE.get(r.reg_status, "")),
    Column("code", "Code", 4, lambda r, now: "-" if r.last_code is None else str(r.last_code), _code_tone,
           align="right", priority=1),
    Column("refresh", "Refresh", 7, _refresh_text, _refresh_tone, align="right", priority=1),
    Column("expires", "Expires", 7, _expires_text, _expires_tone, align="right", priority=1),
    Column("push", "Push", 11, _push_text, _push_tone, priority=1),
    Column("fail", "Fail", 4, lambda r, now: str(r.failure_count) if r.failure_count else "",
           lambda r, now: "bad" if r.failure_count else "", align="right", priority=2),
    Column("provider", "Provider", 8, lambda r, now: r.push_provider or "-", priority=3),
    Column("pushed", "Pushed", 8, lambda r, now: ago(r.last_push_at, now), lambda r, now: "dim",
           align="right", priority=4),
    Column("registrar", "Registrar", 20, lambda r, now: short_uri(r.registrar or ""), priority=5),
    Column("selector", "Selector", 12, lambda r, now: r.selector, lambda r, now: "dim", priority=6),
]

#: column keys in display order (the console sorts by these keys)
INSTANCE_COLUMN_KEYS = tuple(c.key for c in INSTANCE_COLUMNS)


class InstanceTable(VirtualTable[InstanceRow]):
    """All instances; the cursor follows the selector across re-sorts and filtering."""

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(
            INSTANCE_COLUMNS,
            key=lambda row: row.selector,
            empty_text="no instances match",
            name=name,
            id=id,
            classes=classes,
        )

    @property
    def selected(self) -> InstanceRow | None:
        return self.cursor_value
