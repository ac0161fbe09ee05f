"""What ``contrib/`` ships: the alert rules pass ``promtool check rules`` and their own unit tests
(``promtool test rules``), the Grafana dashboard and the rules query only metrics the core exposes,
and the systemd unit is valid (``systemd-analyze verify`` where it exists) and hardened."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.metrics.test_metrics import METRICS

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
NAME = re.compile(r"\bsipis_[a-z_]+")
SUFFIXES = ("_bucket", "_count", "_sum")


def metric_names(expr: str) -> set[str]:
    names = set()
    for name in NAME.findall(expr):
        for suffix in SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in METRICS:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool is missing: scripts/test installs Debian's prometheus package"
    done = subprocess.run([tool, *args], cwd=CONTRIB / "prometheus", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_alert_rules_cover_the_documented_alerts_with_existing_metrics() -> None:
    text = (CONTRIB / "prometheus" / "alerts.yml").read_text()
    alerts = re.findall(r"- alert: (\w+)", text)
    assert {"SipisPbxDown", "SipisPushFailureRatioHigh", "SipisCallsHeldTooLong", "SipisStorageFailing",
            "SipisEventLoopLag"} <= set(alerts)
    exprs = re.findall(r"expr: \|?\n?((?:.+\n)+?)\s+for:", text)
    assert len(exprs) == len(alerts)
    assert set().union(*(metric_names(expr) for expr in exprs)) <= set(METRICS)


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads((CONTRIB / "grafana" / "sipis.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= len(dashboard["panels"])
    used = set().union(*(metric_names(expr) for expr in exprs))
    assert used <= set(METRICS), used - set(METRICS)
    assert len(used) >= 12  # the dashboard shows nearly everything
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_systemd_unit_is_valid_and_hardened(tmp_path: Path) -> None:
    unit = (CONTRIB / "systemd" / "sipis.service").read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        # verify checks that ExecStart exists: point it at this checkout's command
        command = str(Path(sys.executable).parent / "sipis-console")
        copy = tmp_path / "sipis.service"
        copy.write_text(unit.replace("/opt/sipis-console/bin/sipis-console", command))
        done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit)
    service = parser["Service"]
    assert service["ExecStart"].split()[1:] == ["serve", "--config", "${CREDENTIALS_DIRECTORY}/sipis.toml"]
    expected = {"DynamicUser": "yes", "StateDirectory": "sipis", "NoNewPrivileges": "yes",
                "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": "",
                "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}
    assert {key: service.get(key) for key in expected} == expected
    assert parser["Install"]["WantedBy"] == "multi-user.target"
