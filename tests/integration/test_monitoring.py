"""A real Prometheus (Debian's ``prometheus``) scraping the real core (``sipis-console serve``)
while instances register against a real Kamailio: what an operator's monitoring sees."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lab.core_process import CoreProcess
from lab.kamailio import Kamailio, free_port
from lab.outage import enrol_sleeping
from tests.integration.test_core_kamailio import enrol, our_contacts, set_state, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def kamailio() -> Iterator[Kamailio]:
    with Kamailio() as kam:
        yield kam


@pytest.fixture
def core(tmp_path: Path) -> Iterator[CoreProcess]:
    port = free_port(udp=False)
    (tmp_path / "core").mkdir()
    with CoreProcess(tmp_path / "core", extra_config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n') as proc:
        proc.metrics_port = port  # type: ignore[attr-defined]
        yield proc


class Prometheus:
    """One Prometheus scraping ``target`` every second, its storage in a temporary folder."""

    def __init__(self, workdir: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary is not None, "prometheus is missing: scripts/test installs Debian's prometheus package"
        workdir.mkdir(parents=True)
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
                          f"scrape_configs:\n  - job_name: sipis\n    static_configs:\n      - targets: ['{target}']\n")
        self.port = free_port(udp=False)
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """The instant vector ``expr`` evaluates to now (empty when Prometheus is not ready yet)."""
        try:
            response = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expr}, timeout=2.0)
        except httpx.HTTPError:
            return []
        if response.status_code != 200:
            return []
        return [(item["metric"], float(item["value"][1])) for item in response.json()["data"]["result"]]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return result[0][1] if result else None

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(tmp_path: Path, core: CoreProcess) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{core.metrics_port}")  # type: ignore[attr-defined]
    yield server
    server.close()


def test_prometheus_sees_registrations_grow(kamailio: Kamailio, core: CoreProcess, prometheus: Prometheus) -> None:
    wait_for(lambda: prometheus.value('up{job="sipis"}') == 1, timeout=30.0, what="the first successful scrape")
    assert prometheus.value("sipis_build_info") == 1
    assert prometheus.value('sum(sipis_registrations_total{result="registered"})') is None

    with core.client() as client:
        for expected, (user, password) in enumerate((("alice", "alicepw"), ("bob", "bobpw")), start=1):
            selector, token = enrol(client, kamailio, user, password)
            set_state(client, selector, token, "inactive")
            wait_for(lambda u=user: u in our_contacts(kamailio), what=f"{user} registered")
            wait_for(lambda n=expected: prometheus.value('sum(sipis_registrations_total{result="registered"})') == n,
                     timeout=15.0, what=f"{expected} registrations in Prometheus")

    assert prometheus.value('sipis_instances{state="proxied"}') == 2
    assert prometheus.value('sipis_registration_status{status="registered"}') == 2
    assert prometheus.value("sum(sipis_register_duration_seconds_count)") == 2
    # PBX health comes from the core's health events: once it publishes them, the target is up
    for labels, up in prometheus.query("sipis_pbx_up"):
        assert labels["pbx"].endswith(f":{kamailio.udp_port}") and up == 1


def test_prometheus_sees_the_pbx_go_down(kamailio: Kamailio, core: CoreProcess, prometheus: Prometheus) -> None:
    with core.client() as client:
        enrol_sleeping(client, kamailio, 1)  # over TCP: a stopped Kamailio drops the flow at once
    target = f'sipis_pbx_up{{pbx="tcp:{kamailio.host}:{kamailio.udp_port}"}}'
    wait_for(lambda: prometheus.value(target) == 1, timeout=30.0, what="the registrar target up in Prometheus")
    kamailio.stop()
    wait_for(lambda: prometheus.value(target) == 0, timeout=40.0, what="the registrar target down in Prometheus")
    wait_for(lambda: prometheus.value('sipis_alarms_active{alarm="pbx-down"}') == 1, timeout=20.0,
             what="the pbx-down alarm active in Prometheus")
