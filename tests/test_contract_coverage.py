"""Core and console agree on the contract: every event kind the core publishes is one the console
decodes into its typed payload, and every alarm kind the console renders is one the core raises.

What the core publishes is read from its source (which payload types it builds, which alarm kinds
it names), so a new payload or alarm in the core without the console's side fails here.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from console.feed import decode_stream_line
from console.model import ALARM_TITLES, ConsoleModel
from contract.codec import encode_event, from_json
from contract.events import PAYLOADS, Event, UnknownPayload
from contract.kinds import AlarmKind, EventKind

CORE = Path(__file__).resolve().parent.parent / "sipis"
PAYLOAD_NAMES = {cls.__name__: kind for kind, cls in PAYLOADS.items()}


def _core_modules() -> list[ast.Module]:
    return [ast.parse(path.read_text(), str(path)) for path in sorted(CORE.rglob("*.py"))
            if "sip" not in path.relative_to(CORE).parts[:1]]


def published_kinds() -> set[EventKind]:
    """The event kinds whose payload types the core builds (under whatever name it imports them)."""
    kinds: set[EventKind] = set()
    for module in _core_modules():
        local = {alias.asname or alias.name: PAYLOAD_NAMES[alias.name]
                 for node in ast.walk(module) if isinstance(node, ast.ImportFrom)
                 and (node.module or "").startswith("contract.")
                 for alias in node.names if alias.name in PAYLOAD_NAMES}
        kinds |= {local[node.func.id] for node in ast.walk(module)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in local}
    return kinds


def raised_alarms() -> set[AlarmKind]:
    """The alarm kinds the core names (``AlarmKind.X``) in its source."""
    return {AlarmKind[node.attr] for module in _core_modules() for node in ast.walk(module)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "AlarmKind"}


def sample(kind: EventKind) -> Event:
    """An event of ``kind`` with every field filled from the payload type's own defaults/zeros."""
    payload = from_json(PAYLOADS[kind], {"alarm": AlarmKind.UNAUTHORIZED.value, "state": "proxied",
                                         "previous": "inactive", "status": "registered"})
    return Event(41, 1700000000.0, "SEL:1", payload)


def test_the_scan_sees_what_the_core_publishes() -> None:
    # a probe of the scanner itself: kinds every working core publishes
    assert {EventKind.REGISTRATION, EventKind.INSTANCE_STATE, EventKind.PUSH, EventKind.CALL,
            EventKind.AUDIT} <= published_kinds()
    assert AlarmKind.UNAUTHORIZED in raised_alarms()


def test_every_event_kind_the_core_publishes_is_decoded_by_the_console() -> None:
    published = published_kinds()
    assert published == set(EventKind), f"kinds nobody publishes: {set(EventKind) - published}"
    model = ConsoleModel()
    for kind in sorted(published):
        line = json.loads(json.dumps(encode_event(sample(kind))))  # as it crosses the wire
        decoded = decode_stream_line(line)
        assert isinstance(decoded, Event) and not isinstance(decoded.payload, UnknownPayload), kind
        assert decoded.payload == sample(kind).payload, kind
        model.apply([decoded])  # the console's model takes it without error
    assert model.last_seq == 41


def test_every_alarm_the_console_renders_is_one_the_core_raises() -> None:
    assert set(ALARM_TITLES) == raised_alarms()
