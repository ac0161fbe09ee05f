"""build_providers: one live provider per [push.NAME] table, every problem reported together."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from lab.push_servers import make_service_account
from sipis.config import AcrobitsPush, ApnsPush, FcmPush, WebhookPush, parse_config
from sipis.push.acrobits import AcrobitsProvider
from sipis.push.base import PushOutcome, PushRequest, Verdict
from sipis.push.fcm import FcmProvider
from sipis.push.registry import KNOWN_TYPES, ProviderBuildError, build_providers
from sipis.push.webhook import WebhookProvider


class StubApnsProvider:
    """Stands in for sipis.push.apns.ApnsProvider (written separately) to check the lazy import."""

    type = "apns"
    built: ClassVar[list[ApnsPush]] = []

    def __init__(self, config: ApnsPush) -> None:
        self.name = config.name
        self.config = config
        StubApnsProvider.built.append(config)

    async def send(self, request: PushRequest) -> PushOutcome:
        return PushOutcome(Verdict.ACCEPTED)

    async def close(self) -> None:
        return None


@pytest.fixture
def stub_apns(monkeypatch: pytest.MonkeyPatch) -> type[StubApnsProvider]:
    module = types.ModuleType("sipis.push.apns")
    module.ApnsProvider = StubApnsProvider  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sipis.push.apns", module)
    StubApnsProvider.built = []
    return StubApnsProvider


def apns_config(tmp_path: Path) -> ApnsPush:
    return ApnsPush(name="ios", url="https://api.sandbox.push.apple.com", team_id="ABCDE12345",
                    key_id="KEY1234567", key_file=tmp_path / "AuthKey.p8", topic="com.example.phone")


async def test_builds_every_type(tmp_path: Path, stub_apns: type[StubApnsProvider]) -> None:
    make_service_account(tmp_path / "sa.json", "https://oauth2.googleapis.com/token", project_id="prj")
    configs: dict[str, Any] = {
        "pnm": AcrobitsPush(name="pnm", url="https://pnm.cloudsoftphone.com/pnm2/send"),
        "android": FcmPush(name="android", url="https://fcm.googleapis.com",
                           service_account_file=tmp_path / "sa.json"),
        "ios": apns_config(tmp_path),
        "hook": WebhookPush(name="hook", url="https://hooks.example/push", timeout=2.5),
    }
    providers = build_providers(configs)
    try:
        assert list(providers) == ["pnm", "android", "ios", "hook"]
        assert isinstance(providers["pnm"], AcrobitsProvider)
        assert isinstance(providers["android"], FcmProvider)
        assert isinstance(providers["ios"], StubApnsProvider)
        assert isinstance(providers["hook"], WebhookProvider)
        assert {name: p.type for name, p in providers.items()} == {
            "pnm": "acrobits", "android": "fcm", "ios": "apns", "hook": "webhook"}
        assert all(p.name == name for name, p in providers.items())
        assert stub_apns.built == [configs["ios"]]
        android = providers["android"]
        assert isinstance(android, FcmProvider)
        assert android.project_id == "prj" and android.token_uri == "https://oauth2.googleapis.com/token"
        assert android.send_url == "https://fcm.googleapis.com/v1/projects/prj/messages:send"
    finally:
        for provider in providers.values():
            await provider.close()


async def test_builds_from_a_parsed_config_file(tmp_path: Path) -> None:
    make_service_account(tmp_path / "sa.json", "https://oauth2.googleapis.com/token")
    config = parse_config({
        "api": {"listen": ""},
        "push": {
            "pnm": {"type": "acrobits"},
            "fcm": {"type": "fcm", "service_account_file": "sa.json", "project_id": "override"},
            "hook": {"type": "webhook", "url": "https://hooks.example/push",
                     "headers": {"Authorization": "Bearer x"}},
        },
    }, tmp_path)
    providers = build_providers(config.push)
    try:
        assert {name: type(p) for name, p in providers.items()} == {
            "pnm": AcrobitsProvider, "fcm": FcmProvider, "hook": WebhookProvider}
        fcm = providers["fcm"]
        assert isinstance(fcm, FcmProvider) and fcm.project_id == "override"
    finally:
        for provider in providers.values():
            await provider.close()


@dataclass(frozen=True)
class PigeonPush:
    type: ClassVar[str] = "carrier-pigeon"
    name: str


def test_unknown_types_and_broken_providers_are_all_reported(tmp_path: Path) -> None:
    configs: dict[str, Any] = {
        "coo": PigeonPush(name="coo"),
        "android": FcmPush(name="android", url="https://fcm.googleapis.com",
                           service_account_file=tmp_path / "nowhere.json"),
        "pnm": AcrobitsPush(name="pnm", url="https://pnm.cloudsoftphone.com/pnm2/send"),
        "odd": object(),
    }
    with pytest.raises(ProviderBuildError) as caught:
        build_providers(configs)
    problems = caught.value.problems
    assert problems[0] == ("push.coo: unknown provider type 'carrier-pigeon' "
                           "(known types: acrobits, fcm, apns, webhook)")
    assert problems[1].startswith("push.android: ") and "cannot read the service account file" in problems[1]
    assert problems[2] == "push.odd: unknown provider type None (known types: acrobits, fcm, apns, webhook)"
    assert len(problems) == 3
    assert "cannot build push providers" in str(caught.value)
    assert KNOWN_TYPES == ("acrobits", "fcm", "apns", "webhook")


def test_wrong_config_class_for_a_type() -> None:
    @dataclass(frozen=True)
    class FakeFcm:
        type: ClassVar[str] = "fcm"
        name: str

    with pytest.raises(ProviderBuildError, match=r"push.x: type 'fcm' needs a FcmPush configuration, got FakeFcm"):
        build_providers({"x": FakeFcm(name="x")})  # type: ignore[dict-item]


def test_apns_module_missing_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sipis.push.apns", None)  # import fails like a missing module
    with pytest.raises(ProviderBuildError, match=r"push.ios: provider type 'apns' is not available"):
        build_providers({"ios": apns_config(tmp_path)})


def test_no_providers() -> None:
    assert build_providers({}) == {}
