"""The HTTPS app API: apps enrol, report foreground/background and update their push target.

Routes (all JSON; errors are ``{"error": <code>, "detail": <text naming the field>}``):

* ``GET    /v1/health``                     no auth → 200 ``{"status": "ok"}`` when this node can serve
  (readiness, :mod:`sipis.readiness`), else 503 ``{"status": "unavailable", "reasons": [...]}``
* ``GET    /v1/health/live``                no auth → 200 ``{"status": "ok"}`` while the process answers
* ``POST   /v1/instances``                  enrolment token → 201 created / 200 updated
* ``GET    /v1/instances/{selector}``       instance token → 200 public view (no secrets)
* ``PUT    /v1/instances/{selector}/state`` instance token → 200 public view
* ``PUT    /v1/instances/{selector}/push``  instance token → 200 public view
* ``DELETE /v1/instances/{selector}``       instance token → 204

Authentication: a missing or malformed ``Authorization: Bearer`` header is 401 with
``WWW-Authenticate``; a well-formed token that is wrong, belongs to another instance or names an
unknown selector is 403 in every case, so selectors cannot be probed. Authentication runs before
body validation (FastAPI solves dependencies before it validates the body); only the transport-level
guards (413 size, 415 content type, 400 broken JSON) answer earlier, and they reveal nothing.

Re-enrolment (``selector`` given and known) updates the instance, issues a fresh instance token and
invalidates the old one. It takes that instance's own token as the bearer: with the shared enrolment
token an existing selector is ``409 selector_taken``, so no install can take over another's instance.
An app that lost its token enrols anew without a selector; its old instance ages out, or an
operator disables it.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.codec import to_json
from contract.documents import HeldCall, InstanceView
from sipis.api.limits import RateLimitMiddleware, RateLimits
from sipis.api.models import (
    SELECTOR_PATTERN,
    EnrollIn,
    EnrollOut,
    ErrorOut,
    HealthOut,
    PushIn,
    StateIn,
    error_body,
)
from sipis.api.service_protocol import InstanceService, ServiceError
from sipis.instance import Instance
from storage.writer import StorageUnavailable

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_ERRORS_SHOWN = 10
#: Seconds an app waits before retrying a change storage could not commit.
STORAGE_RETRY_AFTER = 5
# RFC 6750 b64token, bounded: anything else is "malformed" (401), not "wrong" (403).
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]{1,512}=*")
_SELECTOR_RE = re.compile(SELECTOR_PATTERN)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "validation_error", 500: "internal_error",
                 503: "storage_unavailable"}
_RESPONSE_TEXT = {400: "Malformed request (broken JSON, bad Content-Length)",
                  401: "Missing or malformed bearer token",
                  403: "Token not valid for this operation or instance",
                  404: "Instance vanished during the request",
                  409: "The service refused the change (selector_taken: re-enrolment needs the "
                       "instance's own token)",
                  413: "Body larger than 64 KiB",
                  415: "Body is not application/json",
                  422: "Validation failed; detail names the field",
                  500: "Internal error (logged)",
                  503: "Storage could not commit the change in time; nothing changed, retry after Retry-After"}


class ApiError(Exception):
    """An error answer with our JSON body; raised anywhere below the routes."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def _error_response(status: int, detail: str, headers: dict[str, str] | None = None,
                    code: str | None = None) -> JSONResponse:
    code = code or _STATUS_CODES.get(status, "error")
    return JSONResponse(error_body(code, detail), status_code=status, headers=headers)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for our error statuses."""
    return {s: {"model": ErrorOut, "description": _RESPONSE_TEXT[s]} for s in statuses}


# --------------------------------------------------------------------------- guard middleware


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class GuardMiddleware:
    """Outermost app middleware: body size cap, JSON-only bodies, and the last-resort 500.

    The body is buffered here (at most ``max_body`` bytes) so an oversized request is refused
    whether or not it announced its length. Unexpected exceptions are logged by type and traceback
    only: exception messages might quote request data, which may contain secrets.
    """

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self._guarded(scope, receive, tracking_send)
        except Exception as exc:
            log.error("app API: unhandled %s on %s %s\n%s", type(exc).__name__, scope.get("method"),
                      scope.get("path"), "".join(traceback.format_tb(exc.__traceback__)))
            if not started:
                await _error_response(500, "internal error")(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                await _error_response(400, "Content-Length is not a number")(scope, receive, send)
                return
            if int(length) > self.max_body:
                await self._too_large(scope, receive, send)
                return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nobody to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await self._too_large(scope, receive, send)
                return
        if body and scope["method"] in _BODY_METHODS and not _is_json(headers.get("content-type")):
            await _error_response(415, "body must be application/json")(scope, receive, send)
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"body larger than {self.max_body} bytes"
        await _error_response(413, detail, headers={"Connection": "close"})(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the buffered body once, then defers to the real one."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


# --------------------------------------------------------------------------- error handlers


def _field(loc: Sequence[int | str]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "path", "query", "header", "cookie"):
        where = parts.pop(0)
        if not parts:
            return str(where)
    return ".".join(str(p) for p in parts)


def _message(error: dict[str, Any]) -> str:
    kind = error.get("type")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "field required"
    msg = str(error.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


def _validation_detail(errors: Sequence[Any]) -> str:
    shown = [f"{_field(e.get('loc', ()))}: {_message(e)}" for e in errors[:MAX_ERRORS_SHOWN]]
    if len(errors) > MAX_ERRORS_SHOWN:
        shown.append(f"… and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "; ".join(shown)


async def _on_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if broken is not None:
        reason = broken.get("ctx", {}).get("error", "JSON decode error")
        pos = broken.get("loc", ("body", "?"))[-1]
        return _error_response(400, f"body is not valid JSON: {reason} at position {pos}",
                               code="bad_json")
    return _error_response(422, _validation_detail(errors))


async def _on_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc.status, exc.detail, exc.headers)


async def _on_service_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return _error_response(exc.status_code, exc.detail, code=exc.code)


async def _on_storage_unavailable(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StorageUnavailable)
    return _error_response(503, f"storage did not commit the change ({exc.reason}); nothing changed, retry later",
                           {"Retry-After": str(STORAGE_RETRY_AFTER)})


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        # Starlette names only the first route matching the path; a path served by several routes
        # (GET and DELETE /v1/instances/{selector}) allows the methods of all of them.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return _error_response(exc.status_code, detail, headers or None)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


# --------------------------------------------------------------------------- authentication

_enrol_scheme = HTTPBearer(auto_error=False, scheme_name="EnrolmentToken",
                           description="Deployment-wide enrolment token, only for POST /v1/instances; "
                                       "re-enrolling an existing selector takes that instance's own token")
_instance_scheme = HTTPBearer(auto_error=False, scheme_name="InstanceToken",
                              description="The token returned by enrolment; valid for one selector")


def _bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise ApiError(401, "Authorization: Bearer <token> required",
                       {"WWW-Authenticate": 'Bearer realm="sipis"'})
    if not _TOKEN_RE.fullmatch(credentials.credentials):
        raise ApiError(401, "malformed bearer token",
                       {"WWW-Authenticate": 'Bearer realm="sipis", error="invalid_token"'})
    return credentials.credentials


def _body_selector(body: bytes) -> str | None:
    """The ``selector`` of a raw enrolment body, read before validation (None if there is none)."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    selector = document.get("selector") if isinstance(document, dict) else None
    return selector if isinstance(selector, str) and _SELECTOR_RE.fullmatch(selector) else None


def _auth_dependencies(
    service: InstanceService,
) -> tuple[Callable[..., Awaitable[bool]], Callable[..., Awaitable[str]]]:
    async def enrolment_auth(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_enrol_scheme),
    ) -> bool:
        """False for the enrolment token; True for the owner re-enrolling its own selector."""
        token = _bearer_token(credentials)
        if service.check_enroll_token(token):
            return False
        # The body is already buffered (GuardMiddleware); reading it here keeps auth before validation.
        selector = _body_selector(await request.body())
        if selector is not None and service.check_instance_token(selector, token):
            return True
        raise ApiError(403, "enrolment token not accepted")

    async def instance_auth(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_instance_scheme),
    ) -> str:
        token = _bearer_token(credentials)
        # Read the raw path value so auth answers before path validation: junk selectors get 403
        # like unknown ones instead of revealing which selectors are syntactically possible.
        selector = str(request.path_params.get("selector", ""))
        if not _SELECTOR_RE.fullmatch(selector) or not service.check_instance_token(selector, token):
            raise ApiError(403, "token not valid for this instance")
        return selector

    return enrolment_auth, instance_auth


# --------------------------------------------------------------------------- the app


def _provider_check(providers: Collection[str] | None) -> Callable[[str, str], None]:
    """Refuses a push provider that is not configured: its calls would never be pushed. With no
    provider configured at all (labs, tests) every name passes, as nothing is pushed anyway."""
    known = sorted(providers or ())

    def check(field: str, provider: str) -> None:
        if known and provider not in known:
            raise ApiError(422, f"{field}: unknown push provider; configured: {', '.join(known)}")

    return check


def create_app(service: InstanceService, *, providers: Collection[str] | None = None,
               max_body: int = MAX_BODY_BYTES, limits: RateLimits | None = None,
               readiness: Callable[[], list[str]] | None = None) -> FastAPI:
    """``providers``: the names of the configured push providers (``[push.NAME]``); ``limits``: per
    source and per token (sipis/api/limits.py), none when None; ``readiness``: why the node cannot
    serve now (empty: it can; None: always ready)."""
    app = FastAPI(title="SIPIS app API", version="1", docs_url=None, redoc_url=None,
                  description=__doc__, responses={429: {
                      "model": ErrorOut, "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                      "description": "Too many requests from this address or with this token"}})
    app.add_middleware(GuardMiddleware, max_body=max_body)
    if limits is not None:  # added last: outermost, before the body is read
        app.add_middleware(RateLimitMiddleware, limits=limits)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(StorageUnavailable, _on_storage_unavailable)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    enrolment_auth, instance_auth = _auth_dependencies(service)
    check_provider = _provider_check(providers)
    selector_path = Path(pattern=SELECTOR_PATTERN, description="The instance selector")

    def current(selector: str) -> Instance:
        instance = service.get(selector)
        if instance is None:  # deleted between authentication and now
            raise ApiError(404, "instance no longer exists")
        return instance

    @app.get("/v1/health", response_model=HealthOut, response_model_exclude_none=True,
             responses={503: {"model": HealthOut, "description": "This node cannot serve now (reasons)"},
                        **_errors(500)})
    async def health() -> HealthOut | JSONResponse:
        reasons = readiness() if readiness is not None else []
        if reasons:
            return JSONResponse({"status": "unavailable", "reasons": reasons}, status_code=503)
        return HealthOut(status="ok")

    @app.get("/v1/health/live", response_model=HealthOut, response_model_exclude_none=True,
             responses=_errors(500))
    async def live() -> HealthOut:
        return HealthOut(status="ok")

    @app.post("/v1/instances", status_code=201, response_model=EnrollOut,
              responses={200: {"model": EnrollOut, "description": "Existing selector updated"},
                         201: {"description": "Instance created"},
                         **_errors(400, 401, 403, 409, 413, 415, 422, 500, 503)})
    async def enroll(body: EnrollIn, response: Response,
                     by_owner: bool = Depends(enrolment_auth)) -> EnrollOut:
        # Single event loop: no other request can create this selector between get and enroll
        # unless enroll itself yields first; at worst two racing enrolments both say 201.
        check_provider("push.provider", body.push.provider)
        created = body.selector is None or service.get(body.selector) is None
        instance, token = await service.enroll(body, by_owner=by_owner)
        response.status_code = 201 if created else 200
        response.headers["Location"] = f"/v1/instances/{instance.selector}"
        return EnrollOut(selector=instance.selector, token=token, state=instance.state.value)

    instance_errors = _errors(400, 401, 403, 404, 409, 413, 415, 422, 500, 503)

    @app.get("/v1/instances/{selector}", responses={200: {"model": InstanceView}, **instance_errors})
    async def get_instance(selector: str = selector_path, _: str = Depends(instance_auth)) -> Response:
        return JSONResponse(current(selector).public_view())

    @app.put("/v1/instances/{selector}/state",
             responses={200: {"model": InstanceView}, **instance_errors})
    async def put_state(body: StateIn, selector: str = selector_path,
                        _: str = Depends(instance_auth)) -> Response:
        current(selector)
        instance = await service.set_state(selector, body.state, body.contact)
        return JSONResponse(instance.public_view())

    @app.put("/v1/instances/{selector}/push",
             responses={200: {"model": InstanceView}, **instance_errors})
    async def put_push(body: PushIn, selector: str = selector_path,
                       _: str = Depends(instance_auth)) -> Response:
        current(selector)
        check_provider("provider", body.provider)
        instance = await service.update_push(selector, body)
        return JSONResponse(instance.public_view())

    @app.post("/v1/instances/{selector}/calls/{push_id}/progress",
              responses={200: {"model": HeldCall}, **instance_errors})
    async def call_progress(selector: str = selector_path,
                            push_id: str = Path(pattern=r"^[A-Za-z0-9-]{1,64}$", description="The push id"),
                            _: str = Depends(instance_auth)) -> Response:
        """The app is waking up for this held call: the caller hears Device-Making-Progress and the
        answer timer (T2) replaces the wake timer (T1). Repeated reports are harmless."""
        current(selector)
        return JSONResponse(to_json(await service.call_progress(selector, push_id)))

    @app.delete("/v1/instances/{selector}", status_code=204, response_class=Response,
                responses=instance_errors)
    async def delete_instance(selector: str = selector_path, _: str = Depends(instance_auth)) -> Response:
        await service.delete(selector)
        return Response(status_code=204)

    return app
