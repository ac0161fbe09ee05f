"""The core on PostgreSQL ([storage] url): what the app API stores survives a restart, a server
that is down at start is waited for (boundedly), and the config never takes a password."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lab.kamailio import free_port
from sipis.config import Config, ConfigError, parse_config
from sipis.core import Core
from sipis.crypto import KeyFileError
from storage.postgres import PgDatabase, StorageUnreachable

ENROL = "enrol-" + "P" * 30


@pytest.fixture
def root() -> Iterator[Path]:
    # A short directory: the operator socket's path is limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="pgcore-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(root: Path, url: str, **storage: Any) -> Config:
    return parse_config({
        "state_dir": str(root / "state"),
        "node_name": "node-a",
        "storage": {"url": url, **storage},
        "sip": {"listen": ["udp:127.0.0.1:0"]},
        "api": {"listen": "127.0.0.1:0", "tls": False, "enroll_tokens": [ENROL]},
        "operator": {"socket": str(root / "op.sock")},
        "push": {"mediator": {"type": "webhook", "url": "https://127.0.0.1:9/push"}},
    }, root)


async def enrol(core: Core) -> dict[str, Any]:
    assert core.listening.api_url is not None
    body = {"account": {"aor": "sip:alice@pbx.example.com", "username": "alice", "password": "pw-alice-secret"},
            "push": {"provider": "mediator", "app_id": "com.example.app", "token": "push-alice-0123456789"}}
    async with httpx.AsyncClient(base_url=core.listening.api_url, timeout=10) as api:
        answer = await api.post("/v1/instances", content=json.dumps(body).encode(),
                                headers={"Authorization": f"Bearer {ENROL}", "Content-Type": "application/json"})
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


async def test_an_enrolled_app_is_found_after_a_restart(root: Path, pg_url: str) -> None:
    config = make_config(root, pg_url)
    core = Core(config)
    await core.start()
    try:
        assert isinstance(core.db, PgDatabase)
        created = await enrol(core)
    finally:
        await core.stop()

    core = Core(config)
    await core.start()
    try:
        assert core.listening.api_url is not None
        async with httpx.AsyncClient(base_url=core.listening.api_url, timeout=10) as api:
            found = await api.get(f"/v1/instances/{created['selector']}",
                                  headers={"Authorization": f"Bearer {created['token']}"})
        assert found.status_code == 200, found.text
        assert core.stores is not None
        record = await core.stores.instances.get(created["selector"])
        assert record is not None and record.password_blob is not None
        assert b"pw-alice-secret" not in record.password_blob  # encrypted as on SQLite
    finally:
        await core.stop()

    # another node without the cluster's key file must not start (it would write a key of its own)
    config.storage.key_file.unlink()
    core = Core(config)
    with pytest.raises(KeyFileError, match="copy the cluster's key file"):
        await core.start()
    await core.stop()


async def test_a_server_that_stays_down_is_given_up_on_with_a_clear_error(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"postgresql://sipis@127.0.0.1:{free_port(udp=False)}/sipis"  # nothing listens there
    core = Core(make_config(root, url, connect_timeout=0.3))
    with caplog.at_level(logging.WARNING, logger="storage.postgres"), \
            pytest.raises(StorageUnreachable, match=r"still unreachable after 0\.3 s"):
        await core.start()
    await core.stop()
    assert "is not reachable" in caplog.text and "retrying" in caplog.text


def test_the_config_refuses_a_password_in_the_url(root: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(root, "postgresql://sipis:hunter2@db.example:5432/sipis")
    assert "PGPASSWORD" in str(caught.value) and "hunter2" not in str(caught.value)
    default = parse_config({"api": {"listen": ""}}, root)
    assert default.storage.url is None and default.storage.key_file == root / "var" / "credentials.key"
