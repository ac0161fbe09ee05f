"""Every error answer is ``{"error": code, "detail": text}`` (the contract's ErrorBody): codes
``unauthorized`` (401), ``forbidden`` (403), ``not_found`` (404), ``conflict`` (409),
``validation_error`` (422), whatever raised it — our own errors, FastAPI's validation, Starlette's
HTTP errors, or :class:`~sipis.operations.Operations` refusing an action."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.documents import ErrorBody
from sipis.operations import Conflict, Forbidden, NotFound
from sipis.operator_api.responses import json_response

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 422: "validation_error", 500: "internal_error"}


class OperatorApiError(Exception):
    def __init__(self, status: int, detail: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or STATUS_CODES.get(status, "error")
        self.headers = headers


def error_response(status: int, detail: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return json_response(ErrorBody(code or STATUS_CODES.get(status, "error"), detail), status, headers)


async def _on_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, OperatorApiError)
    return error_response(exc.status, exc.detail, exc.code, exc.headers)


async def _on_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for error in list(exc.errors())[:10]:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{loc}: {str(error.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return error_response(422, "; ".join(parts) or "invalid request")


async def _on_http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    return error_response(exc.status_code, detail, headers=dict(exc.headers) if exc.headers else None)


async def _on_forbidden(_: Request, exc: Exception) -> Response:
    return error_response(403, str(exc), "forbidden")


async def _on_not_found(_: Request, exc: Exception) -> Response:
    return error_response(404, f"no such item: {exc}", "not_found")


async def _on_conflict(_: Request, exc: Exception) -> Response:
    return error_response(409, str(exc), "conflict")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OperatorApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Forbidden, _on_forbidden)
    app.add_exception_handler(NotFound, _on_not_found)
    app.add_exception_handler(Conflict, _on_conflict)
