"""Record factories with plausible values."""

from __future__ import annotations

from typing import Any

from contract.documents import AuditEntry, PushRecord
from contract.events import Event, UnknownPayload
from storage.records import InstanceRecord


def make_instance(selector: str = "sel-1", **changes: Any) -> InstanceRecord:
    values: dict[str, Any] = {
        "selector": selector,
        "aor": f"sip:{selector}@pbx.example.org",
        "username": selector,
        "auth_username": None,
        "password_blob": b"\x01" + b"\x00" * 40,
        "registrar": "sips:pbx.example.org:5061",
        "display_name": "Alice",
        "instance_id": "8a3c1b0e-4c8f-4f1e-9d3b-2f6a7c1d0e9f",
        "reg_id": 1,
        "push_provider": "fcm",
        "push_app_id": "org.example.phone",
        "push_token": f"push-token-{selector}",
        "push_voip_token": None,
        "token_hash": f"hash-{selector}",
        "state": "proxied",
        "reg_status": "registered",
        "last_code": 200,
        "last_reason": "OK",
        "expires_at": 1_800_000_600.5,
        "failure_count": 0,
        "app_contact": None,
        "app_last_seen": 1_800_000_000.25,
        "created_at": 1_799_999_000.0,
        "updated_at": 1_800_000_000.0,
        "unregistered_since": None,
        "push_unreachable": False,
        "disabled": False,
    }
    values.update(changes)
    return InstanceRecord(**values)


def make_event(seq: int, selector: str | None = "sel-1", kind: str = "reg.refreshed") -> Event:
    """An event of a kind this version does not know: stored and read back raw."""
    return Event(seq=seq, at=1_800_000_000.0 + seq, selector=selector, payload=UnknownPayload(kind, {"n": seq}))


def make_audit(n: int, operator: str = "alice") -> AuditEntry:
    return AuditEntry(
        id=f"audit-{n}",
        at=1_800_000_000.0 + n,
        operator=operator,
        role="operator",
        action="push.test",
        target=f"sel-{n}",
        detail={"n": n},
        outcome="ok",
    )


def make_push(push_id: str = "push-1", selector: str = "sel-1", **changes: Any) -> PushRecord:
    values: dict[str, Any] = {
        "push_id": push_id,
        "selector": selector,
        "call_id": "call-1",
        "provider": "fcm",
        "kind": "call",
        "request_summary": {"priority": "high", "token": "abcd…wxyz"},
        "outcome": "pending",
        "provider_code": None,
        "attempt": 1,
        "replay_of": None,
        "stages": {"created": 1_800_000_000.0},
        "latency_ms": None,
        "error": None,
    }
    values.update(changes)
    return PushRecord(**values)
