"""Disk full under ``state_dir``, for real: the core's state lives on a small tmpfs this test mounts
(and always unmounts); Kamailio is the PBX.

While the disk is full every app change answers ``503`` with ``Retry-After`` within the commit bound
and takes no effect: the ``active`` report leaves our binding at the PBX in place and the refused
enrolment is never stored, not even once space frees. The core raises ``storage-failing`` (one
WARNING saying "disk full"), clears it by itself once space frees, and a start-up on a full disk
says "disk full" instead of "disk I/O error".
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contract.events import Alarm
from contract.kinds import AlarmKind, AlarmState
from lab.kamailio import Kamailio, free_port
from lab.push_servers import MediatorServer
from sipis.config import Config, parse_config
from sipis.core import Core
from sipis.events import Event
from sipis.operations import Operator
from storage.database import DiskFullError
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

ENROL = "hostile-enrol-token"
SELECTOR = "REFUSED-WHILE-FULL"


@contextlib.contextmanager
def small_disk(where: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the duration."""
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the filesystem refuses more (bounded by the tmpfs' size)."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as out:
        for _ in range(10_000):
            try:
                out.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        else:
            raise AssertionError("the small disk never filled up")
    # the last partial blocks too, so the very next write of the database fails
    with filler.open("ab", buffering=0) as out, contextlib.suppress(OSError):
        for _ in range(64):
            out.write(b"\0" * 512)
    return filler


def make_config(state: Path) -> Config:
    sip_port = free_port()
    return parse_config({
        "state_dir": str(state),
        "sip": {"listen": [f"udp:127.0.0.1:{sip_port}", f"tcp:127.0.0.1:{sip_port}"], "register_expires": 300},
        "api": {"listen": "127.0.0.1:0", "enroll_tokens": [ENROL]},
        "push": {"mediator": {"type": "acrobits", "url": "https://127.0.0.1:9/pnm"}},
    }, state.parent)


@pytest.fixture
async def full_disk_world(tmp_path: Path) -> AsyncIterator[tuple[Kamailio, Core, httpx.AsyncClient, Path]]:
    with Kamailio() as kam, small_disk(tmp_path / "state") as state:
        core = Core(make_config(state))
        listening = await core.start()
        assert listening.api_url is not None
        trust = ssl.create_default_context(cafile=str(state / "api-tls.crt"))
        api = httpx.AsyncClient(base_url=listening.api_url, verify=trust, timeout=15)
        try:
            yield kam, core, api, state
        finally:
            await api.aclose()
            with contextlib.suppress(FileNotFoundError):
                (state / "filler").unlink()
            await core.stop()


def enrolment(kam: Kamailio, user: str, password: str, selector: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "account": {"aor": f"sip:{user}@{kam.domain}", "username": user, "password": password,
                    "registrar": f"sip:{kam.host}:{kam.udp_port};transport=tcp"},
        "push": {"provider": "mediator", "app_id": "com.example.phone", "token": f"push-{user}-0123456789"}}
    if selector is not None:
        body["selector"] = selector
    return body


def ours(kam: Kamailio, user: str) -> bool:
    return any(contact.startswith("sip:sipis-") for contact in kam.registered_contacts(user))


async def test_disk_full_refuses_changes_with_503_and_applies_none(
    full_disk_world: tuple[Kamailio, Core, httpx.AsyncClient, Path], caplog: pytest.LogCaptureFixture
) -> None:
    kam, core, api, state = full_disk_world
    caplog.set_level(logging.INFO)
    alarms: list[tuple[AlarmKind, AlarmState]] = []

    def on_event(event: Event) -> None:
        if isinstance(event.payload, Alarm):
            alarms.append((event.payload.alarm, event.payload.state))

    core.bus.subscribe(on_event)
    enrol = {"Authorization": f"Bearer {ENROL}"}
    created = await api.post("/v1/instances", headers=enrol, json=enrolment(kam, "alice", "alicepw"))
    assert created.status_code == 201, created.text
    selector, bearer = created.json()["selector"], created.json()["token"]
    mine = {"Authorization": f"Bearer {bearer}"}
    asleep = await api.put(f"/v1/instances/{selector}/state", headers=mine, json={"state": "inactive"})
    assert asleep.status_code == 200, asleep.text
    await wait_for(lambda: ours(kam, "alice"), what="alice proxied")

    filler = fill(state)
    answers: list[tuple[str, float, httpx.Response]] = []
    for what, call in (
        ("active", lambda: api.put(f"/v1/instances/{selector}/state", headers=mine, json={"state": "active"})),
        ("push", lambda: api.put(f"/v1/instances/{selector}/push", headers=mine,
                                 json={"provider": "mediator", "app_id": "com.example.phone",
                                       "token": "push-alice-new-0123456789"})),
        ("enrol", lambda: api.post("/v1/instances", headers=enrol,
                                   json=enrolment(kam, "bob", "bobpw", selector=SELECTOR))),
        ("delete", lambda: api.delete(f"/v1/instances/{selector}", headers=mine)),
    ):
        started = time.monotonic()
        response = await call()
        answers.append((what, time.monotonic() - started, response))
    print("answer times while the disk is full:", ", ".join(f"{w} {t:.2f} s" for w, t, _ in answers))
    for what, _, response in answers:
        assert response.status_code == 503, (what, response.text)
        assert response.headers["Retry-After"].isdigit()
        assert response.json()["error"] == "storage_unavailable" and "storage" in response.json()["detail"]

    # Nothing took effect: still ours at the PBX, same push target, bob unknown.
    alice = core.service.get(selector) if core.service else None
    assert alice is not None and alice.state.value == "proxied" and alice.push.token == "push-alice-0123456789"
    assert ours(kam, "alice")
    assert core.service is not None and core.service.get(SELECTOR) is None
    assert alarms == [(AlarmKind.STORAGE_FAILING, AlarmState.RAISED)]
    for logger in ("storage.writer", "sipis.alarms"):  # the writer's line and the alarm's, once each
        full_lines = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == logger
                      and "disk full" in r.getMessage()]
        assert len(full_lines) == 1, [r.getMessage() for r in caplog.records]

    filler.unlink()
    await wait_for(lambda: (AlarmKind.STORAGE_FAILING, AlarmState.CLEARED) in alarms, what="storage recovered")
    assert alarms == [(AlarmKind.STORAGE_FAILING, AlarmState.RAISED), (AlarmKind.STORAGE_FAILING, AlarmState.CLEARED)]
    assert core.stores is not None and await core.stores.instances.get(SELECTOR) is None  # never stored later
    stored = await core.stores.instances.get(selector)
    assert stored is not None and stored.push_token == "push-alice-0123456789" and stored.state == "proxied"
    assert ours(kam, "alice")
    awake = await api.put(f"/v1/instances/{selector}/state", headers=mine, json={"state": "active"})
    assert awake.status_code == 200, awake.text
    await wait_for(lambda: not ours(kam, "alice"), what="our binding removed once storage works")


async def test_start_up_on_a_full_disk_says_so(tmp_path: Path) -> None:
    with small_disk(tmp_path / "state") as state:
        config = make_config(state)
        first = Core(config)
        await first.start()
        await first.stop()
        filler = fill(state)
        again = Core(config)
        try:
            with pytest.raises(DiskFullError, match="disk full"):
                await again.start()
        finally:
            await again.stop()
            filler.unlink()
        assert not os.path.exists(filler)


async def test_no_secret_in_any_log_line_at_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Enrolment, registration at Kamailio and a push with DEBUG on for every logger: no push token,
    password, bearer token or full selector in what was logged (the storage driver logs every SQL
    call with its parameters at DEBUG)."""
    caplog.set_level(logging.DEBUG)
    password, push_token = "S3cret-Passw0rd-alice", "PUSHTOKEN-alice-0123456789abcdef"
    with Kamailio() as kam:
        mediator = MediatorServer(tmp_path / "mediator")
        await mediator.start()
        config = parse_config({
            "state_dir": str(tmp_path / "state"),
            "sip": {"listen": [f"tcp:127.0.0.1:{free_port()}"], "register_expires": 300},
            "api": {"listen": "127.0.0.1:0", "enroll_tokens": [ENROL]},
            "push": {"mediator": {"type": "acrobits", "url": mediator.send_url, "ca_file": str(mediator.ca_file),
                                  "timeout": 2}},
        }, tmp_path)
        core = Core(config)
        listening = await core.start()
        assert listening.api_url is not None
        trust = ssl.create_default_context(cafile=str(tmp_path / "state" / "api-tls.crt"))
        try:
            async with httpx.AsyncClient(base_url=listening.api_url, verify=trust, timeout=15) as api:
                body = enrolment(kam, "alice", "alicepw")
                body["account"]["password"] = password
                body["push"]["token"] = push_token
                created = await api.post("/v1/instances", headers={"Authorization": f"Bearer {ENROL}"}, json=body)
                assert created.status_code == 201, created.text
                selector, bearer = created.json()["selector"], created.json()["token"]
                asleep = await api.put(f"/v1/instances/{selector}/state", json={"state": "inactive"},
                                       headers={"Authorization": f"Bearer {bearer}"})
                assert asleep.status_code == 200, asleep.text
                # the registrar refuses this password (401 twice): the unauthorized path logs too
                await wait_for(lambda: core.service is not None and core.service.get(selector) is not None
                               and core.service.get(selector).registration.last_code is not None,  # type: ignore[union-attr]
                               what="a REGISTER answered")
                assert core.operations is not None
                await core.operations.test_push(selector, Operator("noc", "operator"))
                assert mediator.requests, "the push reached the provider"
        finally:
            await core.stop()
            await mediator.stop()
    # httpx and httpcore log this test's own requests (the app's side), not the core's
    core_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in core_records)
    assert len(core_records) > 50  # DEBUG really was on (aiosqlite alone logs every call)
    for secret in (password, push_token, bearer, selector, ENROL):
        assert secret not in logged, secret
