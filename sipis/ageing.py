"""Ageing (Acrobits' MaxAge / NotRegisteredMaxAge): instances nobody looks after any more go off.

* the app has been silent (no API call) for ``max_age`` (3 days default), or
* we were meant to hold its registration but it stayed unregistered for ``not_registered_max_age``
  (12 hours default)

→ our binding is removed, the credentials are wiped and the instance goes ``off``. The decision is
a pure function of the instance and the wall clock (:func:`ageing_reason`), so it is tested alone.
"""

from __future__ import annotations

import asyncio
import logging

from contract.masking import mask
from sipis.clock import Clock
from sipis.cluster import ChangeSignal
from sipis.config import AgeingConfig
from sipis.instance import AppState, Instance
from sipis.lifecycle import InstanceLifecycle, is_usable
from sipis.tasks import cancel_and_wait

log = logging.getLogger(__name__)


def ageing_reason(instance: Instance, now: float, policy: AgeingConfig) -> str | None:
    """Why this instance must go off now, or None."""
    if not is_usable(instance):
        return None
    if now - instance.app_last_seen > policy.max_age:
        return f"app silent for more than {policy.max_age:.0f} s (max_age)"
    since = instance.registration.unregistered_since
    if instance.state is AppState.INACTIVE and since is not None and now - since > policy.not_registered_max_age:
        return f"unregistered for more than {policy.not_registered_max_age:.0f} s (not_registered_max_age)"
    return None


class Ageing:
    def __init__(self, lifecycle: InstanceLifecycle, clock: Clock, policy: AgeingConfig) -> None:
        self.lifecycle = lifecycle
        self.clock = clock
        self.policy = policy
        #: the other nodes' copies follow each instance that went off (None: one node)
        self.signal: ChangeSignal | None = None
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        """Retire every instance that aged out; returns how many."""
        now = self.clock.wall()
        owns = self.lifecycle.owns  # each node ages the instances it owns
        due = [(i, r) for i in list(self.lifecycle.instances.values())
               if (r := ageing_reason(i, now, self.policy)) is not None and owns(i.selector)]
        for instance, reason in due:
            log.info("instance %s goes off: %s", mask(instance.selector), reason)
            await self.lifecycle.retire(instance, reason=reason, delete=False)
            if self.signal is not None:
                await self.signal.changed(instance.selector)
        return len(due)

    def start(self, interval: float) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self.sweep()
                except Exception:
                    log.exception("ageing sweep failed")

        self._task = asyncio.create_task(loop(), name="ageing")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
