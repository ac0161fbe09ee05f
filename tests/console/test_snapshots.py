"""Deterministic SVG snapshots of key screens (frozen clock, fixed FakeFeed data, UTC times).

Baselines live in ``tests/console/snapshots/``. After an intended visual change, regenerate them
with ``SIPIS_SNAPSHOT_UPDATE=1 .venv/bin/pytest tests/console/test_snapshots.py`` and review the SVGs
(open them in a browser). On a mismatch the new rendering is written beside the test's tmp dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from console.app import SipisConsole
from widgets.ladder import Ladder

from .fake_feed import FakeFeed
from .helpers import NOW, make_console, ready, until

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("SIPIS_SNAPSHOT_UPDATE") == "1"


def assert_snapshot(name: str, svg: str, tmp_path: Path) -> None:
    baseline = SNAPSHOTS / f"{name}.svg"
    if UPDATE:
        SNAPSHOTS.mkdir(exist_ok=True)
        baseline.write_text(svg, encoding="utf-8")
        return
    if not baseline.exists():
        pytest.fail(f"no baseline {baseline}; create it with SIPIS_SNAPSHOT_UPDATE=1")
    if baseline.read_text(encoding="utf-8") != svg:
        actual = tmp_path / f"{name}.actual.svg"
        actual.write_text(svg, encoding="utf-8")
        pytest.fail(f"{name} differs from {baseline}; new rendering in {actual}")


def console_for_snapshots(**kwargs: object) -> SipisConsole:
    app = make_console(FakeFeed(now=NOW), **kwargs)  # type: ignore[arg-type]
    app.animation_level = "none"
    return app


async def seed_history(app: SipisConsole) -> None:
    for _ in range(23):  # fill the sparklines with the fake's deterministic series
        await app.refresh_now()


@pytest.mark.parametrize(("name", "size", "theme"), [
    ("dashboard_120x40", (120, 40), None),
    ("dashboard_80x24", (80, 24), None),
    ("dashboard_80x24_high_contrast", (80, 24), "sipis-high-contrast"),
])
async def test_dashboard(name: str, size: tuple[int, int], theme: str | None, tmp_path: Path) -> None:
    app = console_for_snapshots(theme=theme)
    async with app.run_test(size=size) as pilot:
        await ready(pilot, app)
        await seed_history(app)
        await pilot.pause()
        assert_snapshot(name, app.export_screenshot(), tmp_path)


async def test_instance_detail_with_ladder(tmp_path: Path) -> None:
    app = console_for_snapshots()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        await seed_history(app)
        await pilot.press("enter")
        ladder = app.screen.query_one(Ladder)
        await until(pilot, lambda: ladder.row_count > 0)
        for _ in range(5):  # the INVITE from the PBX
            await pilot.press("down")
        await pilot.pause()
        assert_snapshot("instance_detail_120x40", app.export_screenshot(), tmp_path)
