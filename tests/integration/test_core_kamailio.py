"""The core as a real process against a real Kamailio: enrol over HTTPS, registrations on the
apps' behalf, hand-back, wrong password, a registrar outage and a SIGKILL of the core."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from lab.core_process import ENROL_TOKEN, CoreProcess
from lab.kamailio import Kamailio
from sipis.sip.register import EPOCH_SHIFT

pytestmark = pytest.mark.integration

APPS = [("alice", "alicepw"), ("bob", "bobpw"), ("carol", "carolpw")]


@pytest.fixture
def kamailio() -> Iterator[Kamailio]:
    with Kamailio() as kam:
        yield kam


@pytest.fixture
def core(tmp_path: Path) -> Iterator[CoreProcess]:
    with CoreProcess(tmp_path) as proc:
        yield proc


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def enrol(client: httpx.Client, kam: Kamailio, user: str, password: str) -> tuple[str, str]:
    response = client.post(
        "/v1/instances", headers={"Authorization": f"Bearer {ENROL_TOKEN}"},
        json={"account": {"aor": f"sip:{user}@{kam.domain}", "username": user, "password": password,
                          "registrar": f"sip:{kam.host}:{kam.udp_port};transport=tcp"},
              "push": {"provider": "mediator", "app_id": "com.example.app", "token": f"push-{user}"}},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return body["selector"], body["token"]


def get(client: httpx.Client, selector: str, token: str) -> dict:  # type: ignore[type-arg]
    response = client.get(f"/v1/instances/{selector}", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def set_state(client: httpx.Client, selector: str, token: str, state: str) -> None:
    response = client.put(f"/v1/instances/{selector}/state", headers={"Authorization": f"Bearer {token}"},
                          json={"state": state})
    assert response.status_code == 200, response.text


def our_contacts(kam: Kamailio) -> dict[str, dict]:  # type: ignore[type-arg]
    return {c["aor"]: c for c in kam.ul_dump() if c["contact"].startswith("sip:sipis-")}


def test_sleeping_apps_are_registered_and_handed_back(kamailio: Kamailio, core: CoreProcess) -> None:
    with core.client() as client:
        apps = {user: enrol(client, kamailio, user, pw) for user, pw in APPS}
        for selector, token in apps.values():
            set_state(client, selector, token, "inactive")
        wait_for(lambda: set(our_contacts(kamailio)) == {"alice", "bob", "carol"}, what="three contacts")
        contacts = our_contacts(kamailio)
        assert all(c["instance"] and c["instance"].startswith("<urn:uuid:") for c in contacts.values())
        assert all(c["reg_id"] == 1 for c in contacts.values())
        for selector, token in apps.values():
            wait_for(lambda s=selector, t=token: get(client, s, t)["state"] == "proxied", what="proxied")

        alice_selector, alice_token = apps["alice"]
        set_state(client, alice_selector, alice_token, "active")
        wait_for(lambda: "alice" not in our_contacts(kamailio), what="alice's binding removed")
        assert set(our_contacts(kamailio)) == {"bob", "carol"}
        body = get(client, alice_selector, alice_token)
        assert body["state"] == "active" and body["registration"]["status"] == "idle"
        assert "password" not in body["registration"] and "alicepw" not in str(body)


def test_wrong_password_shows_unauthorized(kamailio: Kamailio, core: CoreProcess) -> None:
    with core.client() as client:
        selector, token = enrol(client, kamailio, "carol", "not-the-password")
        set_state(client, selector, token, "inactive")
        wait_for(lambda: get(client, selector, token)["registration"]["status"] == "unauthorized",
                 what="unauthorized")
        body = get(client, selector, token)
        assert body["registration"]["last_code"] == 401
        assert body["state"] == "inactive"
        assert "carol" not in our_contacts(kamailio)


def test_registrations_come_back_after_a_registrar_outage(kamailio: Kamailio, core: CoreProcess) -> None:
    with core.client() as client:
        apps = {user: enrol(client, kamailio, user, pw) for user, pw in APPS}
        for selector, token in apps.values():
            set_state(client, selector, token, "inactive")
        wait_for(lambda: len(our_contacts(kamailio)) == 3, what="three contacts")
        kamailio.stop()  # usrloc is in memory: every binding is lost with it
        time.sleep(0.5)
        kamailio.start()
        # backoff_max is 1 s in this config: one backoff cycle plus the REGISTER round trips
        wait_for(lambda: len(our_contacts(kamailio)) == 3, timeout=10.0, what="re-registration")


def test_everything_is_back_after_sigkill(kamailio: Kamailio, core: CoreProcess) -> None:
    with core.client() as client:
        apps = {user: enrol(client, kamailio, user, pw) for user, pw in APPS}
        for selector, token in apps.values():
            set_state(client, selector, token, "inactive")
        wait_for(lambda: len(our_contacts(kamailio)) == 3, what="three contacts")
        before = {aor: c["cseq"] or 0 for aor, c in our_contacts(kamailio).items()}
    core.kill()
    core.start()
    with core.client() as client:
        for selector, token in apps.values():  # instances and their tokens survived the crash
            assert get(client, selector, token)["state"] in ("inactive", "proxied")
        # every registration was taken over again by the new process: the same Call-ID (derived from
        # the instance, for fencing) and +sip.instance/reg-id, so the registrar replaced each binding
        # instead of adding one; the CSeqs it used are unknown, so it counts in a new epoch
        wait_for(lambda: all(c["cseq"] is not None and c["cseq"] >> EPOCH_SHIFT > before[aor] >> EPOCH_SHIFT
                             for aor, c in our_contacts(kamailio).items())
                 and len(our_contacts(kamailio)) == 3, what="re-registration after restart")
        for selector, token in apps.values():
            wait_for(lambda s=selector, t=token: get(client, s, t)["state"] == "proxied", what="proxied")


def test_delete_unregisters_and_forgets(kamailio: Kamailio, core: CoreProcess) -> None:
    with core.client() as client:
        selector, token = enrol(client, kamailio, "bob", "bobpw")
        set_state(client, selector, token, "inactive")
        wait_for(lambda: "bob" in our_contacts(kamailio), what="bob registered")
        response = client.delete(f"/v1/instances/{selector}", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 204
        assert "bob" not in our_contacts(kamailio)
        assert client.get(f"/v1/instances/{selector}", headers={"Authorization": f"Bearer {token}"}).status_code in (
            403, 404)


def test_sigterm_unregisters_cleanly(kamailio: Kamailio, core: CoreProcess) -> None:
    with core.client() as client:
        selector, token = enrol(client, kamailio, "alice", "alicepw")
        set_state(client, selector, token, "inactive")
        wait_for(lambda: "alice" in our_contacts(kamailio), what="alice registered")
    assert core.stop() == 0
    assert "alice" not in our_contacts(kamailio)
    lines = core.log_path.read_text().splitlines()
    assert lines[-1] == "sipis-console: core stopped"  # the last word is that it stopped
    assert not any("DeprecationWarning" in line for line in lines)  # asyncssh's DSA warning is not printed
