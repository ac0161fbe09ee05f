"""Answers of the operator API: the contract's documents encoded with its codec (``contract/``)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import Response

from contract.codec import to_json

JSON = "application/json"
NDJSON = "application/x-ndjson"


def dumps(value: Any) -> bytes:
    """Compact JSON of a contract document (or list of them); a value JSON cannot hold (in free-form
    data such as an audit row's detail) is written as its text rather than failing the answer."""
    return _dumps(to_json(value))


def _dumps(values: Any) -> bytes:
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(value), status_code=status, headers=headers, media_type=JSON)


def json_line(values: Any) -> bytes:
    """One NDJSON line of values that are JSON-ready already (an encoded event or stream notice)."""
    return _dumps(values) + b"\n"
