"""A re-enrolment flood from one client against the real core and a real Kamailio (loopback):
the REGISTERs Kamailio receives stay within ``register_rate`` however fast the client re-enrols.

The app API's own limits are off here so that what is measured is the engine's pacing alone: every
re-enrolment changes the password, so each one asks for a new REGISTER, which Kamailio challenges
(a REGISTER and its retry: two transactions). Bounded: 4 s of flood, 4000 requests at most.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lab.core_process import ENROL_TOKEN, CoreProcess
from lab.kamailio import Kamailio

pytestmark = pytest.mark.integration

RATE = 50  # register_rate: low enough that a single client on a loaded machine outruns it unpaced
FLOOD_SECONDS = 4.0
MAX_REQUESTS = 4000


@pytest.fixture
def kamailio() -> Iterator[Kamailio]:
    with Kamailio() as kam:
        yield kam


@pytest.fixture
def core(tmp_path: Path) -> Iterator[CoreProcess]:
    with CoreProcess(tmp_path, sip_options={"register_rate": RATE},
                     extra_config="rate_per_source = 0\nrate_per_token = 0") as proc:
        yield proc


def registers_received(kam: Kamailio) -> int:
    out = kam.kamcmd("stats.get_statistics", "rcv_requests_register")
    match = re.search(r"rcv_requests_register\s*=\s*(\d+)", out)
    assert match is not None, out
    return int(match.group(1))


def enrol_body(kam: Kamailio, password: str, selector: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {
        "account": {"aor": f"sip:alice@{kam.domain}", "username": "alice", "password": password,
                    "registrar": f"sip:{kam.host}:{kam.udp_port};transport=tcp"},
        "push": {"provider": "mediator", "app_id": "com.example.app", "token": "push-alice"}}
    if selector is not None:
        body["selector"] = selector
    return body


def wait_for_state(client: httpx.Client, selector: str, token: str, state: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get(f"/v1/instances/{selector}", headers={"Authorization": f"Bearer {token}"})
        if answer.json()["state"] == state:
            return
        time.sleep(0.1)
    raise AssertionError(f"not {state} within {timeout} s")


def test_a_re_enrolment_flood_from_one_client_stays_within_register_rate(
        kamailio: Kamailio, core: CoreProcess) -> None:
    with core.client() as client:
        enrolled = client.post("/v1/instances", json=enrol_body(kamailio, "alicepw"),
                               headers={"Authorization": f"Bearer {ENROL_TOKEN}"})
        assert enrolled.status_code == 201, enrolled.text
        selector, token = enrolled.json()["selector"], enrolled.json()["token"]
        client.put(f"/v1/instances/{selector}/state", json={"state": "inactive"},
                   headers={"Authorization": f"Bearer {token}"}).raise_for_status()
        wait_for_state(client, selector, token, "proxied")
        time.sleep(1.0)  # the bucket is full again: the flood starts with its whole burst

        # Re-enrolment takes the instance's own token where the API asks for it, else the
        # enrolment token (both are what one client holds).
        bearer = token
        before = registers_received(kamailio)
        started = time.monotonic()
        sent = accepted = 0
        while time.monotonic() - started < FLOOD_SECONDS and sent < MAX_REQUESTS:
            answer = client.post("/v1/instances", json=enrol_body(kamailio, f"changed-{sent}", selector),
                                 headers={"Authorization": f"Bearer {bearer}"})
            sent += 1
            if answer.status_code == 403 and bearer == token and not accepted:
                bearer = ENROL_TOKEN  # this API re-enrols with the enrolment token
                continue
            assert answer.status_code == 200, answer.text
            accepted += 1
            if bearer != ENROL_TOKEN:
                bearer = answer.json()["token"]
        elapsed = time.monotonic() - started
        registers = registers_received(kamailio) - before

    per_second = registers / elapsed
    print(f"\n{accepted} re-enrolments in {elapsed:.2f} s ({accepted / elapsed:.0f}/s) made Kamailio receive "
          f"{registers} REGISTERs: {per_second:.0f}/s with register_rate = {RATE}")
    assert accepted / elapsed > 2 * RATE, "the flood was too slow to say anything about pacing"
    # the bucket's burst (one second's worth) plus the rate, and the exchange in flight at the end
    assert registers <= RATE * (1.0 + elapsed) + 4, f"{per_second:.0f} REGISTERs/s"
