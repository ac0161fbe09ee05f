"""Fixtures for tests against real peers (Kamailio, sipp) on loopback.

Every Kamailio gets free ports and its own folder under pytest's tmp_path (kept after the run, so
``kamailio.log`` can be read when a test fails). Everything collected below this folder is marked
``integration`` and skipped with a reason when the Debian tools are missing (scripts/test installs
them).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from lab.kamailio import Kamailio

_HERE = Path(__file__).resolve().parent
_TOOLS = ("kamailio", "kamcmd", "sipp")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    for item in items:
        if _HERE not in item.path.resolve().parents:
            continue
        item.add_marker(pytest.mark.integration)
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"missing {', '.join(missing)} (run scripts/test)"))


class KamailioFactory(Protocol):
    def __call__(self, *, defines: Iterable[str] = (), **kwargs: Any) -> Kamailio:
        """Start a Kamailio (keyword arguments as for `Kamailio`); stopped at teardown."""
        ...


@pytest.fixture
def kamailio_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KamailioFactory]:
    """Start Kamailios with chosen switches, e.g. ``kamailio_factory(defines=["AUTH_SHA256"])``."""
    started: list[Kamailio] = []

    def make(*, defines: Iterable[str] = (), **kwargs: Any) -> Kamailio:
        kwargs.setdefault("workdir", tmp_path_factory.mktemp("kamailio"))
        kam = Kamailio(defines=defines, **kwargs)
        started.append(kam)  # before start(): a half-started one is cleaned up too
        kam.start()
        return kam

    yield make
    for kam in reversed(started):
        kam.close()


@pytest.fixture
def kamailio(kamailio_factory: KamailioFactory) -> Kamailio:
    """A fresh MD5 registrar/proxy per test (start-up takes ~0.15 s, so isolation is cheap)."""
    return kamailio_factory()
