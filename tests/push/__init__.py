"""Push providers against provider-shaped HTTPS servers on loopback (``lab.push_servers``)."""

from __future__ import annotations

import time
from typing import Any

from sipis.push.base import PushKind, PushRequest

DEVICE_TOKEN = "dEvIcEtOkEn-" + "x" * 40 + "-tail"  # long enough to be masked as dEvI…tail


def push_request(**overrides: Any) -> PushRequest:
    """A call push with every optional field set; override what a test needs."""
    fields: dict[str, Any] = {
        "push_id": "5f0c2a9e-push", "kind": PushKind.CALL, "selector": "sel-0001", "app_id": "com.example.phone",
        "token": DEVICE_TOKEN, "voip": False, "sent_at": time.time(), "ttl": 29.9,
        "call_id": "a84b4c76e66710@pbx", "caller": "sip:alice@example.com", "caller_display_name": "Alice",
        "user_name": "bob", "user_display_name": "Bob B.",
    }
    fields.update(overrides)
    return PushRequest(**fields)
