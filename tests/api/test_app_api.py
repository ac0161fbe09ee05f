"""The app API through httpx's ASGI transport, against an in-memory service (API layer only)."""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.types import Message

from sipis.api import InstanceGone, SelectorTaken, ServiceError, create_app
from sipis.api.models import EnrollIn, PushIn
from sipis.crypto import hash_token, new_token, tokens_equal
from sipis.instance import Account, AppState, Instance, PushTarget

ENROL_TOKEN = "enrol-" + "E" * 40
PASSWORD = "pa55-w0rd-that-must-never-leak"
PUSH_TOKEN = "fcm-token-" + "P" * 60
VOIP_TOKEN = "voip-token-" + "V" * 60


class FakeService:
    """Just enough of the real service: instances in a dict, tokens stored as hashes."""

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self.fail_with: Exception | None = None

    def check_enroll_token(self, token: str) -> bool:
        return tokens_equal(token, ENROL_TOKEN)

    def check_instance_token(self, selector: str, token: str) -> bool:
        instance = self.instances.get(selector)
        return instance is not None and tokens_equal(instance.token_hash, hash_token(token))

    async def enroll(self, request: EnrollIn, *, by_owner: bool = False) -> tuple[Instance, str]:
        selector = request.selector or f"{secrets.token_hex(20).upper()}:{secrets.token_hex(4).upper()}"
        token = new_token()
        a, p = request.account, request.push
        account = Account(aor=a.aor, username=a.username, password=a.password.get_secret_value(),
                          auth_username=a.auth_username, registrar=a.registrar,
                          display_name=a.display_name)
        push = PushTarget(provider=p.provider, app_id=p.app_id, token=p.token, voip_token=p.voip_token)
        instance = self.instances.get(selector)
        if instance is not None and not by_owner:
            raise SelectorTaken("selector is taken")
        if instance is None:
            instance = Instance(selector=selector, account=account, push=push, token_hash=hash_token(token))
            if request.instance_id is not None:
                instance.instance_id = str(request.instance_id)
            self.instances[selector] = instance
        else:
            instance.account, instance.push, instance.token_hash = account, push, hash_token(token)
        return instance, token

    def get(self, selector: str) -> Instance | None:
        return self.instances.get(selector)

    async def set_state(self, selector: str, state: str, contact: str | None) -> Instance:
        if self.fail_with is not None:
            raise self.fail_with
        instance = self.instances[selector]
        instance.state = AppState(state)
        instance.app_contact = contact
        return instance

    async def update_push(self, selector: str, push: PushIn) -> Instance:
        instance = self.instances.get(selector)
        if instance is None:
            raise InstanceGone("instance no longer exists")
        instance.push = PushTarget(provider=push.provider, app_id=push.app_id, token=push.token,
                                   voip_token=push.voip_token)
        return instance

    async def delete(self, selector: str) -> None:
        self.instances.pop(selector, None)

    def seed(self, selector: str, token: str) -> Instance:
        """Make sure ``selector`` exists with bearer ``token`` (for the schemathesis run)."""
        instance = self.instances.get(selector)
        if instance is None:
            account = Account(aor="sip:alice@pbx.example.com", username="alice", password=PASSWORD)
            push = PushTarget(provider="fcm", app_id="com.example.app", token=PUSH_TOKEN)
            instance = Instance(selector=selector, account=account, push=push, token_hash="")
            self.instances[selector] = instance
        instance.token_hash = hash_token(token)
        return instance


def enrol_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "account": {"aor": "sip:alice@pbx.example.com", "username": "alice", "password": PASSWORD,
                    "registrar": "sips:pbx.example.com:5061", "display_name": "Alice A."},
        "push": {"provider": "fcm", "app_id": "com.example.app", "token": PUSH_TOKEN,
                 "voip_token": VOIP_TOKEN},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            body[section][field] = value
        else:
            body[section] = value
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
async def client(service: FakeService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://sipis.test") as http:
        yield http


async def enrol(client: httpx.AsyncClient, **overrides: Any) -> tuple[str, str]:
    response = await client.post("/v1/instances", json=enrol_body(**overrides), headers=bearer(ENROL_TOKEN))
    assert response.status_code == 201, response.text
    data = response.json()
    return data["selector"], data["token"]


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == code
    for fragment in fragments:
        assert fragment in body["detail"]


# --------------------------------------------------------------------------- happy paths


async def test_health_needs_no_auth(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_health_says_503_with_the_reasons_while_the_node_cannot_serve(service: FakeService) -> None:
    reasons: list[str] = []
    app = create_app(service, readiness=lambda: list(reasons))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sipis.test") as http:
        assert (await http.get("/v1/health")).json() == {"status": "ok"}
        reasons.append("storage failing: disk full")
        response = await http.get("/v1/health")
        assert response.status_code == 503
        assert response.json() == {"status": "unavailable", "reasons": ["storage failing: disk full"]}
        live = await http.get("/v1/health/live")  # liveness: the process answers
        assert live.status_code == 200 and live.json() == {"status": "ok"}


async def test_enrolment_creates_instance(client: httpx.AsyncClient, service: FakeService) -> None:
    instance_id = str(uuid.uuid4())
    response = await client.post("/v1/instances", json={**enrol_body(), "instance_id": instance_id},
                                 headers=bearer(ENROL_TOKEN))
    assert response.status_code == 201
    data = response.json()
    assert set(data) == {"selector", "token", "state"}
    assert data["state"] == "active"
    assert response.headers["location"] == f"/v1/instances/{data['selector']}"
    instance = service.instances[data["selector"]]
    assert instance.instance_id == instance_id
    assert instance.account.password == PASSWORD  # handed to the service, not dropped

    view = await client.get(f"/v1/instances/{data['selector']}", headers=bearer(data["token"]))
    assert view.status_code == 200
    shown = view.json()
    assert shown["aor"] == "sip:alice@pbx.example.com"
    assert shown["push"]["token"] != PUSH_TOKEN and shown["push"]["token"].startswith("fcm-")


async def test_enrolment_with_new_selector_uses_it(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/instances", json={**enrol_body(), "selector": "ABC123:7C3A0D14"},
                                 headers=bearer(ENROL_TOKEN))
    assert response.status_code == 201
    assert response.json()["selector"] == "ABC123:7C3A0D14"


async def test_re_enrolment_updates_and_rotates_token(client: httpx.AsyncClient,
                                                      service: FakeService) -> None:
    selector, old_token = await enrol(client)
    body = {**enrol_body(account__username="alice2"), "selector": selector}
    response = await client.post("/v1/instances", json=body, headers=bearer(old_token))
    assert response.status_code == 200
    data = response.json()
    assert data["selector"] == selector and data["token"] != old_token
    assert service.instances[selector].account.username == "alice2"
    assert len(service.instances) == 1
    stale = await client.get(f"/v1/instances/{selector}", headers=bearer(old_token))
    assert_error(stale, 403, "forbidden")
    fresh = await client.get(f"/v1/instances/{selector}", headers=bearer(data["token"]))
    assert fresh.status_code == 200


async def test_re_enrolment_with_the_enrolment_token_alone_is_409(client: httpx.AsyncClient,
                                                                   service: FakeService) -> None:
    selector, token = await enrol(client)
    body = {**enrol_body(push__token="attacker-push-target"), "selector": selector}
    response = await client.post("/v1/instances", json=body, headers=bearer(ENROL_TOKEN))
    assert_error(response, 409, "selector_taken")
    assert service.instances[selector].push.token == PUSH_TOKEN
    # another instance's token is no better than a wrong one
    _, other_token = await enrol(client, account__aor="sip:bob@pbx.example.com")
    assert_error(await client.post("/v1/instances", json=body, headers=bearer(other_token)), 403, "forbidden")
    assert (await client.get(f"/v1/instances/{selector}", headers=bearer(token))).status_code == 200


async def test_state_and_push_updates(client: httpx.AsyncClient) -> None:
    selector, token = await enrol(client)
    response = await client.put(f"/v1/instances/{selector}/state", headers=bearer(token),
                                json={"state": "inactive"})
    assert response.status_code == 200 and response.json()["state"] == "inactive"
    response = await client.put(f"/v1/instances/{selector}/state", headers=bearer(token),
                                json={"state": "active", "contact": "sip:alice@10.0.0.7:5060;transport=tcp;ob"})
    assert response.status_code == 200
    assert response.json()["app_contact"] == "sip:alice@10.0.0.7:5060;transport=tcp;ob"
    new_push = {"provider": "apns", "app_id": "com.example.voip", "token": "a" * 64}
    response = await client.put(f"/v1/instances/{selector}/push", headers=bearer(token), json=new_push)
    assert response.status_code == 200
    assert response.json()["push"]["provider"] == "apns"
    assert "a" * 64 not in response.text


async def test_delete_then_token_is_refused(client: httpx.AsyncClient, service: FakeService) -> None:
    selector, token = await enrol(client)
    response = await client.delete(f"/v1/instances/{selector}", headers=bearer(token))
    assert response.status_code == 204 and response.content == b""
    assert selector not in service.instances
    assert_error(await client.get(f"/v1/instances/{selector}", headers=bearer(token)), 403, "forbidden")
    assert_error(await client.delete(f"/v1/instances/{selector}", headers=bearer(token)), 403, "forbidden")


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": f"Basic {ENROL_TOKEN}"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
])
async def test_missing_auth_is_401(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await client.post("/v1/instances", json=enrol_body(), headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("token", ["two words", "tok\u00e9n", "x" * 600, "a=b"])
async def test_malformed_token_is_401(client: httpx.AsyncClient, token: str) -> None:
    response = await client.post("/v1/instances", json=enrol_body(),
                                 headers=[(b"Authorization", f"Bearer {token}".encode())])
    assert_error(response, 401, "unauthorized")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_wrong_enrolment_token_is_403(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/instances", json=enrol_body(), headers=bearer("not-the-token"))
    assert_error(response, 403, "forbidden")
    _, instance_token = await enrol(client)
    response = await client.post("/v1/instances", json=enrol_body(), headers=bearer(instance_token))
    assert_error(response, 403, "forbidden")


async def test_instance_routes_need_own_token(client: httpx.AsyncClient) -> None:
    alice, alice_token = await enrol(client)
    bob, bob_token = await enrol(client, account__aor="sip:bob@pbx.example.com")
    attempts = [
        ("GET", f"/v1/instances/{bob}", None),
        ("PUT", f"/v1/instances/{bob}/state", {"state": "inactive"}),
        ("PUT", f"/v1/instances/{bob}/push", {"provider": "fcm", "app_id": "x", "token": "y"}),
        ("DELETE", f"/v1/instances/{bob}", None),
    ]
    for method, path, body in attempts:
        response = await client.request(method, path, json=body, headers=bearer(alice_token))
        assert_error(response, 403, "forbidden")
        response = await client.request(method, path, json=body)
        assert_error(response, 401, "unauthorized")
    # The enrolment token opens nothing but enrolment.
    assert_error(await client.get(f"/v1/instances/{alice}", headers=bearer(ENROL_TOKEN)), 403, "forbidden")
    # Unknown and malformed selectors look exactly like someone else's instance.
    for selector in ("DEADBEEF:00000000", "no%20such", "x" * 65):
        response = await client.get(f"/v1/instances/{selector}", headers=bearer(alice_token))
        assert_error(response, 403, "forbidden", "token not valid for this instance")
    assert (await client.get(f"/v1/instances/{bob}", headers=bearer(bob_token))).status_code == 200


async def test_auth_is_checked_before_body_validation(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/instances", json={"nonsense": True})
    assert_error(response, 401, "unauthorized")
    response = await client.post("/v1/instances", json={"nonsense": True}, headers=bearer("wrong"))
    assert_error(response, 403, "forbidden")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"account__aor": "http://alice@example.com"}, "account.aor: not a sip: or sips: URI"),
    ({"account__aor": "sip:pbx.example.com"}, "account.aor: URI has no user part"),
    ({"account__aor": "sip:alice:secret@pbx.example.com"}, "account.aor: URI must not carry a password"),
    ({"account__aor": "sip:alice@pbx.example.com:99999"}, "account.aor: malformed sip: URI"),
    ({"account__registrar": "sip:pbx.example.com;transport=sctp"},
     "account.registrar: transport must be udp, tcp or tls"),
    ({"account__registrar": "sips:pbx.example.com;transport=udp"}, "account.registrar: sips: URI cannot"),
    ({"account__registrar": "sip:pbx.example.com\r\nX-Evil: 1"}, "account.registrar: whitespace or control"),
    ({"account__username": "ali ce"}, "account.username: String should match pattern"),
    ({"account__username": "a" * 200}, "account.username: String should have at most 128 characters"),
    ({"account__password": ""}, "account.password: "),
    ({"account__registar": "sip:pbx.example.com"}, "account.registar: unknown field"),
    ({"push__provider": ""}, "push.provider: "),
    ({"push__token": "t" * 5000}, "push.token: String should have at most 4096 characters"),
    ({"push": {"provider": "fcm", "app_id": "x"}}, "push.token: field required"),
    ({"selector": "bad selector!"}, "selector: String should match pattern"),
    ({"instance_id": "not-a-uuid"}, "instance_id: "),
    ({"extra": 1}, "extra: unknown field"),
])
async def test_validation_errors_name_the_field(client: httpx.AsyncClient, overrides: dict[str, Any],
                                                fragment: str) -> None:
    body = enrol_body()
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            body[section][field] = value
        else:
            body[section] = value
    response = await client.post("/v1/instances", json=body, headers=bearer(ENROL_TOKEN))
    assert_error(response, 422, "validation_error", fragment)
    assert PASSWORD not in response.text and PUSH_TOKEN not in response.text


@pytest.mark.parametrize("field", ["account.password", "account.username", "account.auth_username",
                                   "account.aor", "account.registrar", "account.display_name",
                                   "push.app_id", "push.token", "push.voip_token"])
@pytest.mark.parametrize(("bad", "reason"), [("\udfff", "lone surrogate"), ("\x00", "NUL")])
async def test_text_that_cannot_be_stored_is_422(client: httpx.AsyncClient, service: FakeService,
                                                 field: str, bad: str, reason: str) -> None:
    body = enrol_body()
    section, name = field.split(".")
    body[section][name] = (body[section].get(name) or "sip:x@example.com") + bad
    # json.dumps writes \u escapes, as any client may; the server decodes them into the string.
    response = await client.post("/v1/instances", content=json.dumps(body).encode(),
                                 headers={**bearer(ENROL_TOKEN), "Content-Type": "application/json"})
    assert_error(response, 422, "validation_error", f"{field}: ")
    assert reason in response.json()["detail"]
    assert not service.instances


async def test_state_validation(client: httpx.AsyncClient) -> None:
    selector, token = await enrol(client)
    path = f"/v1/instances/{selector}/state"
    assert_error(await client.put(path, json={"state": "asleep"}, headers=bearer(token)),
                 422, "validation_error", "state: Input should be 'active' or 'inactive'")
    assert_error(await client.put(path, json={"state": "active", "contact": "tel:+123"}, headers=bearer(token)),
                 422, "validation_error", "contact: not a sip: or sips: URI")
    assert_error(await client.put(path, json=[], headers=bearer(token)), 422, "validation_error", "body")
    assert_error(await client.put(path, headers=bearer(token)), 422, "validation_error", "body: field required")


async def test_broken_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/instances", content=b'{"account": ', headers={
        **bearer(ENROL_TOKEN), "Content-Type": "application/json"})
    assert_error(response, 400, "bad_json", "not valid JSON")
    response = await client.post("/v1/instances", content=b"\xff\xfe{", headers={
        **bearer(ENROL_TOKEN), "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"] in ("bad_json", "bad_request")


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/instances", content=json.dumps(enrol_body()).encode(),
                                 headers={**bearer(ENROL_TOKEN), "Content-Type": "text/plain"})
    assert_error(response, 415, "unsupported_media_type", "application/json")
    response = await client.post("/v1/instances", data={"a": "b"}, headers=bearer(ENROL_TOKEN))
    assert_error(response, 415, "unsupported_media_type")


async def test_huge_body_is_413(client: httpx.AsyncClient) -> None:
    huge = json.dumps({**enrol_body(), "pad": "x" * 70_000}).encode()
    response = await client.post("/v1/instances", content=huge,
                                 headers={**bearer(ENROL_TOKEN), "Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: caught while streaming
        for _ in range(20):
            yield b" " * 8192

    response = await client.post("/v1/instances", content=chunks(),
                                 headers={**bearer(ENROL_TOKEN), "Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large")


async def test_bad_content_length_is_400(service: FakeService) -> None:
    app = create_app(service)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/instances", "raw_path": b"/v1/instances",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("t", 80),
             "headers": [(b"content-length", b"-5"), (b"content-type", b"application/json")]}
    await app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"] == "bad_request"


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing"), 404, "not_found")
    response = await client.patch("/v1/health")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"
    # GET and DELETE share the path but are two routes: Allow names both
    response = await client.put("/v1/instances/ABC:1", json={})
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "DELETE, GET"
    assert (await client.get("/v1/instances")).headers["allow"] == "POST"


async def test_contact_in_name_addr_form_keeps_the_uri(client: httpx.AsyncClient) -> None:
    selector, token = await enrol(client)
    contact = '"Alice" <sip:alice@10.0.0.7:5060;transport=tcp;ob>;+sip.instance="<urn:uuid:' + str(uuid.uuid4()) \
        + '>";reg-id=1'
    response = await client.put(f"/v1/instances/{selector}/state", headers=bearer(token),
                                json={"state": "active", "contact": contact})
    assert response.status_code == 200, response.text
    assert response.json()["app_contact"] == "sip:alice@10.0.0.7:5060;transport=tcp;ob"
    for bad, fragment in [("<tel:+123>", "not a sip: or sips: URI"), ("<sip:alice@10.0.0.7", "malformed name-addr"),
                          ("<sip:alice@h>\r\nX-Evil: 1", "whitespace or control characters")]:
        response = await client.put(f"/v1/instances/{selector}/state", headers=bearer(token),
                                    json={"state": "active", "contact": bad})
        assert_error(response, 422, "validation_error", f"contact: {fragment}")


async def test_unknown_push_provider_is_422_listing_the_configured_ones(service: FakeService) -> None:
    app = create_app(service, providers=("fcm", "apns"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sipis.test") as client:
        response = await client.post("/v1/instances", json=enrol_body(push__provider="gcm"),
                                     headers=bearer(ENROL_TOKEN))
        assert_error(response, 422, "validation_error", "push.provider: unknown push provider; configured: apns, fcm")
        assert not service.instances
        selector, token = await enrol(client)
        response = await client.put(f"/v1/instances/{selector}/push", headers=bearer(token),
                                    json={"provider": "huawei", "app_id": "x", "token": "y"})
        assert_error(response, 422, "validation_error", "provider: unknown push provider; configured: apns, fcm")
        assert service.instances[selector].push.provider == "fcm"


# --------------------------------------------------------------------------- service failures, secrets


async def test_service_refusal_is_mapped(client: httpx.AsyncClient, service: FakeService) -> None:
    selector, token = await enrol(client)
    service.fail_with = ServiceError("instance is disabled by an operator")
    response = await client.put(f"/v1/instances/{selector}/state", json={"state": "inactive"},
                                headers=bearer(token))
    assert_error(response, 409, "conflict", "disabled")
    service.fail_with = InstanceGone("instance no longer exists")
    response = await client.put(f"/v1/instances/{selector}/state", json={"state": "inactive"},
                                headers=bearer(token))
    assert_error(response, 404, "not_found")


async def test_internal_error_is_500_without_secrets(client: httpx.AsyncClient, service: FakeService,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    selector, token = await enrol(client)
    service.fail_with = RuntimeError(f"boom with {PASSWORD}")
    with caplog.at_level(logging.ERROR, logger="sipis.api"):
        response = await client.put(f"/v1/instances/{selector}/state", json={"state": "inactive"},
                                    headers=bearer(token))
    assert_error(response, 500, "internal_error")
    assert PASSWORD not in response.text
    assert "RuntimeError" in caplog.text and PASSWORD not in caplog.text


async def test_secrets_never_in_responses(client: httpx.AsyncClient) -> None:
    bodies: list[str] = []
    response = await client.post("/v1/instances", json=enrol_body(), headers=bearer(ENROL_TOKEN))
    data = response.json()
    selector, token = data["selector"], data["token"]
    for method, path, body in [
        ("GET", f"/v1/instances/{selector}", None),
        ("PUT", f"/v1/instances/{selector}/state", {"state": "inactive"}),
        ("PUT", f"/v1/instances/{selector}/push", {"provider": "fcm", "app_id": "x", "token": PUSH_TOKEN,
                                                    "voip_token": VOIP_TOKEN}),
        ("PUT", f"/v1/instances/{selector}/push", {"provider": "fcm", "app_id": "x", "token": PUSH_TOKEN,
                                                    "password": PASSWORD}),
        ("POST", "/v1/instances", {**enrol_body(), "selector": selector, "bogus": PASSWORD}),
        ("POST", "/v1/instances", enrol_body(account__aor=f"sip:alice:{PASSWORD}@x")),
        ("GET", f"/v1/instances/{selector}", None),
    ]:
        auth = bearer(ENROL_TOKEN if method == "POST" else token)
        response = await client.request(method, path, json=body, headers=auth)
        bodies.append(response.text + str(response.headers))
    bodies.append((await client.get("/openapi.json")).text)
    for text in bodies:
        for secret in (PASSWORD, PUSH_TOKEN, VOIP_TOKEN, ENROL_TOKEN, token):
            assert secret not in text


async def test_openapi_documents_security_and_errors(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert {s["scheme"] for s in schemes.values()} == {"bearer"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "500" in responses, (method, path)
            if path not in ("/v1/health", "/v1/health/live"):
                assert operation["security"], (method, path)
                for status in ("401", "403", "413", "415", "422"):
                    ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorOut"), (method, path, status)
