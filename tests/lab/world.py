"""The lab world the end-to-end lab tests share: lab PBX, lab mediator, the real core and its app API.

The ``lab`` fixture in ``conftest.py`` builds it; a test module opts in by defining a ``lab_settings``
fixture (which also names the module's :class:`LabWorld` subclass carrying its own helpers).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx

from lab.callers import CallerLoad
from lab.demo import DemoOptions
from lab.mediator import LabMediator, MediatorPolicy
from lab.pbx import LabPbx
from lab.phones import LabPhone, PhoneProfile
from sipis.core import Core
from sipis.instance import Instance


@dataclass
class LabWorld:
    pbx: LabPbx
    mediator: LabMediator
    core: Core
    api: httpx.AsyncClient
    callers: CallerLoad  # rate 0: calls only when a test places them
    enroll_token: str
    phones: list[LabPhone] = field(default_factory=list)  # stopped at teardown

    async def start_phone(self, user: str, profile: PhoneProfile) -> LabPhone:
        phone = LabPhone(user, "loadpw", pbx=self.pbx, api=self.api, enroll_token=self.enroll_token,
                         mediator=self.mediator, profile=profile, rng=random.Random(user))
        self.phones.append(phone)  # before start(): a half-started phone is stopped too
        await phone.start()
        return phone

    def instance(self, phone: LabPhone) -> Instance | None:
        """The core's instance for this (enrolled) phone."""
        assert self.core.service is not None and phone.selector is not None
        return self.core.service.get(phone.selector)


@dataclass(frozen=True)
class LabSettings:
    """What differs between the modules using the lab world."""

    world: type[LabWorld]
    enroll_token: str
    policy: MediatorPolicy
    options: DemoOptions  # only the core timers are used
    fcm: bool = False  # also run the lab's FCM- and APNs-shaped endpoints
    apns: bool = False
