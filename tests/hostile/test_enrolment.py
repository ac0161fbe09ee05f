"""Hostile app-API clients against the real core (in-process, loopback, plain HTTP): taking over
another install's instance, strings that could never be stored, and the API's shape at its edges."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sipis.config import parse_config
from sipis.core import Core

ENROL = "enrol-" + "H" * 30
PROVIDERS = ("ios", "mediator")


@pytest.fixture
async def core() -> AsyncIterator[Core]:
    # A short directory: the operator socket's path is limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="hostile-", dir="/tmp"))
    config = parse_config({
        "state_dir": str(root / "state"),
        "sip": {"listen": ["udp:127.0.0.1:0"]},
        "api": {"listen": "127.0.0.1:0", "tls": False, "enroll_tokens": [ENROL]},
        "operator": {"socket": str(root / "op.sock")},
        # never reached: no call comes in during these tests
        "push": {name: {"type": "webhook", "url": "https://127.0.0.1:9/push"} for name in PROVIDERS},
    }, root)
    core = Core(config)
    await core.start()
    try:
        yield core
    finally:
        await core.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def api(core: Core) -> AsyncIterator[httpx.AsyncClient]:
    assert core.listening.api_url is not None
    async with httpx.AsyncClient(base_url=core.listening.api_url, timeout=10) as client:
        yield client


def enrolment(user: str = "alice", **account: Any) -> dict[str, Any]:
    return {"account": {"aor": f"sip:{user}@pbx.example.com", "username": user, "password": "pw", **account},
            "push": {"provider": "mediator", "app_id": "com.example.app", "token": f"push-{user}"}}


async def post_raw(api: httpx.AsyncClient, body: dict[str, Any], token: str = ENROL) -> httpx.Response:
    """JSON written with \\u escapes (as any client may), so lone surrogates reach the server."""
    return await api.post("/v1/instances", content=json.dumps(body).encode(),
                          headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- 1: re-enrolment by the owner only


async def test_the_enrolment_token_cannot_take_over_a_known_selector(core: Core, api: httpx.AsyncClient) -> None:
    victim = (await post_raw(api, enrolment())).json()
    selector, token = victim["selector"], victim["token"]
    assert len(selector) == 49 and int(selector.replace(":", ""), 16) >= 0  # 48 hex digits: 192 bits

    hijack = {**enrolment(), "selector": selector}
    hijack["push"]["token"] = "attacker-device"
    answer = await post_raw(api, hijack)
    assert answer.status_code == 409 and answer.json()["error"] == "selector_taken"
    assert core.service is not None
    instance = core.service.get(selector)
    assert instance is not None and instance.push.token == "push-alice"
    assert (await api.get(f"/v1/instances/{selector}", headers=bearer(token))).status_code == 200

    # The owner re-enrols with its own token: 200, a fresh token, the old one void.
    again = await post_raw(api, {**enrolment(), "selector": selector}, token=token)
    assert again.status_code == 200 and again.json()["selector"] == selector
    assert (await api.get(f"/v1/instances/{selector}", headers=bearer(token))).status_code == 403
    # An app that lost its token enrols anew: a new selector.
    fresh = await post_raw(api, enrolment())
    assert fresh.status_code == 201 and fresh.json()["selector"] != selector


# --------------------------------------------------------------------------- 2: every accepted string is storable


async def test_text_that_could_never_be_stored_is_refused_before_the_answer(core: Core,
                                                                            api: httpx.AsyncClient) -> None:
    """A lone surrogate in the password used to get 201 and a token; the writer then set the row
    aside and the instance was gone after a restart."""
    assert core.writer is not None and core.stores is not None and core.service is not None
    answer = await post_raw(api, enrolment(password="pw\udfff"))
    assert answer.status_code == 422 and answer.json()["detail"].startswith("account.password: ")
    answer = await post_raw(api, enrolment(password="pw\x00"))
    assert answer.status_code == 422 and answer.json()["detail"].startswith("account.password: ")

    created = (await post_raw(api, enrolment("bob"))).json()
    contact = {"state": "active", "contact": "sip:bob@192.0.2.1\udfff"}
    answer = await api.put(f"/v1/instances/{created['selector']}/state", content=json.dumps(contact).encode(),
                           headers={**bearer(created["token"]), "Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["detail"].startswith("contact: ")
    await core.writer.flush()
    assert core.writer.health().dead_lettered == 0
    assert [r.selector for r in await core.stores.instances.load_all()] == [created["selector"]]


# --------------------------------------------------------------------------- 10: the API's shape at its edges


async def test_api_shape_contact_provider_and_allow(core: Core, api: httpx.AsyncClient) -> None:
    created = (await post_raw(api, enrolment())).json()
    selector, token = created["selector"], created["token"]
    contact = '<sip:alice@192.0.2.7:5070;transport=tcp;ob>;+sip.instance="<urn:uuid:' \
              '00000000-0000-4000-8000-000000000001>";reg-id=1'
    answer = await api.put(f"/v1/instances/{selector}/state", headers=bearer(token),
                           json={"state": "active", "contact": contact})
    assert answer.status_code == 200 and answer.json()["app_contact"] == "sip:alice@192.0.2.7:5070;transport=tcp;ob"

    unknown = enrolment("bob")
    unknown["push"]["provider"] = "nowhere"
    answer = await post_raw(api, unknown)
    assert answer.status_code == 422
    assert answer.json()["detail"] == "push.provider: unknown push provider; configured: ios, mediator"

    answer = await api.patch(f"/v1/instances/{selector}", headers=bearer(token))
    assert answer.status_code == 405 and answer.headers["allow"] == "DELETE, GET"
