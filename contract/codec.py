"""JSON to and from the contract's types: the wire shapes of ``docs/operator-api.md``.

:func:`to_json` turns any contract object into JSON-ready values; :func:`from_json` builds one from
what a peer sent, tolerantly: unknown fields are ignored, a missing field takes its default (or
``None``, or the type's zero), so a console keeps working against a core one version apart. Each
type's decoder and encoder are worked out once from its annotations and compiled into one plain
function each (a console decodes 100k instance rows at a time, the core encodes them: a generic loop
over the fields costs twice as much).
A type's ``SHARED`` fields (values that repeat across many objects: states, reasons, providers)
are decoded into one interned string object per value.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

from contract.events import PAYLOADS, Event, Payload, StreamNotice, UnknownPayload
from contract.kinds import EventKind, StreamNoticeKind

T = TypeVar("T")

Convert = Callable[[Any], Any]
#: (field name, converter or None for "as is", value when missing, factory for a missing value)
_Step = tuple[str, Convert | None, Any, Callable[[], Any] | None]

_DECODERS: dict[type[Any], Callable[[dict[str, Any]], Any]] = {}
_ENCODERS: dict[type[Any], Callable[[Any], dict[str, Any]]] = {}
_OPTIONAL: dict[type[Any], tuple[str, ...]] = {}
_FIELD_NAMES: dict[type[Any], frozenset[str]] = {}
_EVENT_KINDS: dict[str, EventKind] = {kind.value: kind for kind in EventKind}
_NOTICE_KINDS: dict[str, StreamNoticeKind] = {kind.value: kind for kind in StreamNoticeKind}
_MISSING = dataclasses.MISSING


# ---------------------------------------------------------------------------------------------- encoding


def to_json(obj: Any) -> Any:
    """A contract object (or a list/dict of them) as plain JSON values; enum members become their
    plain values (so the result also suits ``marshal``)."""
    if isinstance(obj, Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, Event):
            return encode_event(obj)
        return encoder(type(obj))(obj)
    if isinstance(obj, list | tuple):
        return [to_json(item) for item in obj]
    if isinstance(obj, dict):
        return {key: to_json(value) for key, value in obj.items()}
    return obj


def encoder(cls: type[Any]) -> Callable[[Any], dict[str, Any]]:
    """The compiled encoder of the dataclass ``cls``: what :func:`to_json` runs for one of its
    objects (the core encodes 100k instance rows for a console's first load)."""
    encode = _ENCODERS.get(cls)
    if encode is None:
        encode = _ENCODERS[cls] = _compile_encoder(cls)
    return encode


def payload_data(payload: Payload | UnknownPayload) -> dict[str, Any]:
    """An event's ``data``: the payload's fields, optional ones left out while ``None`` where the
    payload says so."""
    if isinstance(payload, UnknownPayload):
        return dict(payload.data)
    data = encoder(type(payload))(payload)
    if payload.OMIT_NONE:
        for name in _optional_fields(type(payload)):
            if data[name] is None:
                del data[name]
    return data


def _optional_fields(cls: type[Any]) -> tuple[str, ...]:
    """The fields of ``cls`` that default to ``None`` (worked out once per class)."""
    names = _OPTIONAL.get(cls)
    if names is None:
        names = _OPTIONAL[cls] = tuple(f.name for f in dataclasses.fields(cls) if f.default is None)
    return names


def encode_event(event: Event) -> dict[str, Any]:
    line = {"seq": event.seq, "at": event.at, "kind": str(event.kind), "selector": event.selector,
            "data": payload_data(event.payload)}
    if event.node is not None:  # a cluster's event; one node's stay as they always were
        line["node"] = event.node
    return line


def encode_notice(notice: StreamNotice) -> dict[str, Any]:
    line: dict[str, Any] = {"kind": notice.kind.value, "at": notice.at}
    for name in ("seq", "since", "first_available", "dropped"):
        value = getattr(notice, name)
        if value is not None or (name == "first_available" and notice.kind is StreamNoticeKind.GAP):
            line[name] = value
    return line


# ---------------------------------------------------------------------------------------------- decoding


def from_json(cls: type[T], data: Any) -> T:
    """Build a ``cls`` (a contract dataclass) from a JSON object."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    return decoder(cls)(data)


def decoder(cls: type[T]) -> Callable[[dict[str, Any]], T]:
    """The compiled decoder of ``cls``: what :func:`from_json` runs, without its checks, for
    decoding many objects of one type (the caller makes sure each is a JSON object)."""
    decode = _DECODERS.get(cls)
    if decode is None:
        decode = _DECODERS[cls] = _compile(cls)
    return decode


def decode_payload(kind: str, data: dict[str, Any], selector: str | None = None) -> Payload | UnknownPayload:
    """The payload of an event of ``kind``; a kind this version does not know stays raw."""
    known = _EVENT_KINDS.get(kind)
    if known is None:
        return UnknownPayload(kind, dict(data))
    cls = PAYLOADS[known]
    if selector is not None and "selector" in _field_names(cls) and "selector" not in data:
        data = {**data, "selector": selector}
    return from_json(cls, data)


def decode_event(line: dict[str, Any]) -> Event:
    selector = line.get("selector")
    data = line.get("data")
    node = line.get("node")
    return Event(seq=int(line.get("seq") or 0), at=float(line.get("at") or 0.0),
                 selector=None if selector is None else str(selector),
                 payload=decode_payload(str(line.get("kind") or ""), data if isinstance(data, dict) else {},
                                        None if selector is None else str(selector)),
                 node=None if node is None else str(node))


def decode_stream_line(line: dict[str, Any]) -> Event | StreamNotice:
    """One line of ``GET /v1/events``: an event, or a heartbeat/gap/overflow notice."""
    notice = _NOTICE_KINDS.get(str(line.get("kind") or ""))
    if notice is None:
        return decode_event(line)
    return StreamNotice(kind=notice, at=float(line.get("at") or 0.0), seq=_opt_int(line.get("seq")),
                        since=_opt_int(line.get("since")), first_available=_opt_int(line.get("first_available")),
                        dropped=_opt_int(line.get("dropped")))


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _field_names(cls: type[Any]) -> frozenset[str]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    return names


def _compile(cls: type[Any]) -> Callable[[dict[str, Any]], Any]:
    """One function that reads every field of ``cls`` from a JSON object: for each field a ``get``,
    the missing-or-null test and the conversion, then the constructor with positional arguments."""
    shared = frozenset(getattr(cls, "SHARED", ()))
    names: dict[str, Any] = {"cls": cls, "shared": _shared}
    lines = ["def decode(data):", "    get = data.get"]
    args = []
    for k, (name, convert, missing, factory) in enumerate(_plan(cls)):
        value = f"v{k}"
        if factory is not None:
            names[f"f{k}"] = factory
            default = f"f{k}()"
        else:
            names[f"m{k}"] = missing
            default = f"m{k}"
        converted = value
        if convert is not None:
            names[f"c{k}"] = convert
            converted = f"c{k}({value})"
        if name in shared:
            converted = f"shared({converted})"
        lines.append(f"    {value} = get({name!r})")
        lines.append(f"    if {value} is None: {value} = {default}")
        if converted != value:
            lines.append(f"    else: {value} = {converted}")
        args.append(value)
    lines.append(f"    return cls({', '.join(args)})")
    exec("\n".join(lines), names)  # our own source, built from the class's annotations
    decode: Callable[[dict[str, Any]], Any] = names["decode"]
    return decode


def _compile_encoder(cls: type[Any]) -> Callable[[Any], dict[str, Any]]:
    """One function that builds the JSON object of a ``cls``: numbers, booleans and strings are
    taken as they are (a ``str`` field holding an enum member gets its value), anything else goes
    through :func:`to_json`."""
    hints = typing.get_type_hints(cls)
    names: dict[str, Any] = {"to_json": to_json}
    lines = ["def encode(obj):"]
    items = []
    for k, f in enumerate(dataclasses.fields(cls)):
        value = f"v{k}"
        lines.append(f"    {value} = obj.{f.name}")
        plain = _plain(hints[f.name])
        if plain is str:
            expr = f"{value} if {value} is None or type({value}) is str else to_json({value})"
        elif plain is not None:
            expr = value
        else:
            expr = f"to_json({value})"
        items.append(f"{f.name!r}: {expr}")
    lines.append(f"    return {{{', '.join(items)}}}")
    exec("\n".join(lines), names)  # our own source, built from the class's annotations
    encode: Callable[[Any], dict[str, Any]] = names["encode"]
    return encode


def _plain(hint: Any) -> type | None:
    """``str``, ``int``, ``float`` or ``bool`` when that (or that or None) is the annotation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    return hint if hint in (str, int, float, bool) else None


def _shared(value: Any) -> Any:
    return sys.intern(value) if type(value) is str else value


def _plan(cls: type[Any]) -> list[_Step]:
    hints = typing.get_type_hints(cls)
    steps: list[_Step] = []
    for f in dataclasses.fields(cls):
        convert, zero = _converter(hints[f.name])
        if f.default is not _MISSING:
            steps.append((f.name, convert, f.default, None))
        elif f.default_factory is not _MISSING:
            steps.append((f.name, convert, None, f.default_factory))
        else:
            steps.append((f.name, convert, zero, None))
    return steps


def _converter(hint: Any) -> tuple[Convert | None, Any]:
    """How to turn a JSON value into ``hint``, and the value a missing required field takes."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        convert, _ = _converter(inner[0]) if len(inner) == 1 else (None, None)
        return convert, None
    if origin is list:
        (item,) = typing.get_args(hint)
        item_convert, _ = _converter(item)
        if item_convert is None:
            return list, []
        return (lambda value: [item_convert(v) for v in value]), []
    if origin is dict:
        return dict, {}
    if hint is Event:
        return decode_event, None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return (lambda value: from_json(hint, value)), None
    if isinstance(hint, type) and issubclass(hint, Enum):
        return _enum_converter(hint), None
    if hint is float:
        return float, 0.0
    if hint is int:
        return int, 0
    if hint is bool:
        return bool, False
    if hint is str:
        return None, ""
    return None, None


def _enum_converter(enum: type[Enum]) -> Convert:
    members = {member.value: member for member in enum}

    def convert(value: Any) -> Any:
        # a value this version does not know stays a plain string rather than failing the event
        return members.get(value, value)

    return convert
