"""A registrar outage against the real core: N sleeping apps registered through a real Kamailio,
Kamailio stopped for a while and started again; how long until every binding is back.

Used by ``tests/integration/test_pbx_outage.py`` (small N) and ``bench/pbx_outage.py`` (the
issue's 300 instances at ``register_rate = 50``, Kamailio stopped 60 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from lab.core_process import ENROL_TOKEN, CoreProcess
from lab.kamailio import Kamailio

#: ``extra_config`` for the core (its ``[api]`` section): the scenario enrols and polls many apps
#: from one address, more than the app API's per-address and per-token limits allow
NO_API_LIMITS = "rate_per_source = 0\nrate_per_token = 0"


@dataclass
class OutageResult:
    instances: int
    outage_s: float
    #: from Kamailio's start until it holds every binding again
    recovery_s: float
    #: from Kamailio's start until it holds the first one
    first_s: float
    #: app states seen during the outage (once pbx-down was logged)
    states_during: dict[str, int] = field(default_factory=dict)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> float:
    """Seconds it took ``predicate`` to hold; AssertionError after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def enrol_sleeping(client: httpx.Client, kam: Kamailio, n: int) -> list[tuple[str, str]]:
    """``n`` apps ``load00001``… (Kamailio's load-test users) enrolled over TCP and put to sleep."""
    apps = []
    for k in range(1, n + 1):
        user = f"load{k:05d}"
        response = client.post(
            "/v1/instances", headers={"Authorization": f"Bearer {ENROL_TOKEN}"},
            json={"account": {"aor": f"sip:{user}@{kam.domain}", "username": user, "password": "loadpw",
                              "registrar": f"sip:{kam.host}:{kam.udp_port};transport=tcp"},
                  "push": {"provider": "mediator", "app_id": "com.example.app", "token": f"push-{user}"}})
        response.raise_for_status()
        selector, token = response.json()["selector"], response.json()["token"]
        client.put(f"/v1/instances/{selector}/state", headers={"Authorization": f"Bearer {token}"},
                   json={"state": "inactive"}).raise_for_status()
        apps.append((selector, token))
    return apps


def app_states(client: httpx.Client, apps: list[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for selector, token in apps:
        state = client.get(f"/v1/instances/{selector}", headers={"Authorization": f"Bearer {token}"}).json()["state"]
        counts[state] = counts.get(state, 0) + 1
    return counts


def run_outage(kam: Kamailio, core: CoreProcess, n: int, outage_s: float, *, recovery_timeout: float) -> OutageResult:
    """Register ``n`` apps, stop Kamailio for ``outage_s``, start it, time the recovery."""
    with core.client() as client:
        apps = enrol_sleeping(client, kam, n)
        wait_for(lambda: kam.contact_count() == n, 30 + n / 10, f"{n} contacts")
        wait_for(lambda: app_states(client, apps).get("proxied", 0) == n, 30, "every app proxied", poll=0.5)
        kam.stop()  # usrloc is in memory: every binding is lost with it
        stopped = time.monotonic()
        wait_for(lambda: "alarm pbx-down raised" in core.log_text(), 20, "pbx-down raised")
        wait_for(lambda: "proxied" not in app_states(client, apps), 20, "no app proxied", poll=0.5)
        states = app_states(client, apps)
        time.sleep(max(0.0, outage_s - (time.monotonic() - stopped)))
        kam.start()
        back = time.monotonic()
        wait_for(lambda: kam.contact_count() > 0, recovery_timeout, "the first binding", poll=0.05)
        first = time.monotonic() - back
        wait_for(lambda: kam.contact_count() == n, recovery_timeout, f"{n} bindings back", poll=0.05)
        return OutageResult(n, round(back - stopped, 1), round(time.monotonic() - back, 2), round(first, 2), states)
