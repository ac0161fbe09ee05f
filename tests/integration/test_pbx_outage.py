"""A registrar outage with the real core and a real Kamailio: pbx-down is raised, no app stays
``proxied``, and once Kamailio is back every instance is registered again at once, paced by
``register_rate``, instead of each after its own grown backoff (default backoff settings)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.core_process import CoreProcess
from lab.kamailio import Kamailio
from lab.outage import NO_API_LIMITS, run_outage, wait_for
from sipis.engine import PROBE_INTERVAL

pytestmark = pytest.mark.integration

N = 30
RATE = 100.0


@pytest.fixture
def kamailio() -> Iterator[Kamailio]:
    with Kamailio() as kam:
        yield kam


@pytest.fixture
def core(tmp_path: Path) -> Iterator[CoreProcess]:
    # the defaults' backoff (2 s doubling to 300 s), not the fast one of the other core tests
    with CoreProcess(tmp_path, sip_options={"register_rate": RATE, "backoff_base": 2.0, "backoff_max": 300.0},
                     extra_config=NO_API_LIMITS) as proc:
        yield proc


def test_every_instance_is_back_soon_after_the_registrar(kamailio: Kamailio, core: CoreProcess) -> None:
    # the goal: a probe interval, every instance paced (a challenged REGISTER counts twice), slack
    bound = 10.0 + 2 * N / RATE + 5.0
    result = run_outage(kamailio, core, N, outage_s=20.0, recovery_timeout=bound)
    assert result.states_during == {"inactive": N}  # not shown as proxied while nothing holds a binding
    assert result.recovery_s <= bound and PROBE_INTERVAL <= 10.0
    wait_for(lambda: "alarm pbx-down cleared" in core.log_text(), 10.0, "pbx-down cleared")
    time.sleep(0.1)
    raised = core.log_text().count("alarm pbx-down raised")
    assert raised == 1, core.log_text()[-3000:]
