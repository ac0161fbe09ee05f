"""Fixtures for the lab tests: the shared lab world (see ``world.py``)."""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from lab.callers import CallerLoad, CallerSettings
from lab.demo import core_config
from lab.mediator import PROVIDER_NAMES, LabMediator
from lab.pbx import LabPbx
from sipis.core import Core
from tests.lab.world import LabSettings, LabWorld


@pytest.fixture
async def lab(tmp_path: Path, lab_settings: LabSettings) -> AsyncIterator[LabWorld]:
    """The lab PBX (UDP and TCP), the lab mediator and the real core on loopback, an HTTPS client for
    the core's app API and an idle caller load; ``lab_settings`` comes from the test module."""
    settings = lab_settings
    async with LabPbx(transports=("udp", "tcp")) as pbx, \
            LabMediator(tmp_path / "mediator", policy=settings.policy, rng=random.Random(1), fcm=settings.fcm,
                        apns=settings.apns) as mediator:
        core = Core(core_config(tmp_path / "state", mediator, settings.enroll_token, settings.options))
        listening = await core.start()
        assert listening.api_url is not None
        enabled = {"acrobits": True, "fcm": settings.fcm, "apns": settings.apns}
        assert set(core.config.push) == {PROVIDER_NAMES[kind] for kind, on in enabled.items() if on}
        trust = ssl.create_default_context(cafile=str(core.config.api.tls_cert))
        api = httpx.AsyncClient(base_url=listening.api_url, verify=trust, timeout=10)
        callers = CallerLoad(pbx, [], settings=CallerSettings(rate=0))
        await callers.open()
        value = settings.world(pbx, mediator, core, api, callers, settings.enroll_token)
        try:
            yield value
        finally:
            await callers.stop()
            for phone in value.phones:
                await phone.stop()
            await api.aclose()
            await core.stop()
