"""Turn the ``[push.NAME]`` tables of the configuration into live providers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sipis import config as cfg
from sipis.push.base import PushProvider

KNOWN_TYPES: tuple[str, ...] = cfg.PUSH_TYPES


class ProviderBuildError(ValueError):
    """One or more providers could not be built; :attr:`problems` has one line per provider."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot build push providers:\n{lines}")


def _acrobits(config: Any) -> PushProvider:
    from sipis.push.acrobits import AcrobitsProvider
    return AcrobitsProvider(config)


def _fcm(config: Any) -> PushProvider:
    from sipis.push.fcm import FcmProvider
    return FcmProvider(config)


def _webhook(config: Any) -> PushProvider:
    from sipis.push.webhook import WebhookProvider
    return WebhookProvider(config)


def _apns(config: Any) -> PushProvider:
    from sipis.push.apns import ApnsProvider  # lazily: written separately, needed only with APNs
    provider: PushProvider = ApnsProvider(config)
    return provider


_BUILDERS: dict[str, tuple[type[Any], Callable[[Any], PushProvider]]] = {
    "acrobits": (cfg.AcrobitsPush, _acrobits),
    "fcm": (cfg.FcmPush, _fcm),
    "apns": (cfg.ApnsPush, _apns),
    "webhook": (cfg.WebhookPush, _webhook),
}


def build_providers(push: Mapping[str, cfg.PushProvider]) -> dict[str, PushProvider]:
    """One provider per configured ``[push.NAME]`` table, keyed by NAME.

    Every problem (unknown type, unreadable key file, missing module ...) is collected and raised
    together as :class:`ProviderBuildError`, each line naming ``push.NAME``. Building opens no
    connection; call ``close()`` on each provider at shutdown.
    """
    providers: dict[str, PushProvider] = {}
    problems: list[str] = []
    for name, config in push.items():
        kind = getattr(config, "type", None)
        entry = _BUILDERS.get(kind) if isinstance(kind, str) else None
        if entry is None:
            problems.append(f"push.{name}: unknown provider type {kind!r} "
                            f"(known types: {', '.join(KNOWN_TYPES)})")
            continue
        config_class, build = entry
        if not isinstance(config, config_class):
            problems.append(f"push.{name}: type {kind!r} needs a {config_class.__name__} configuration, "
                            f"got {type(config).__name__}")
            continue
        try:
            providers[name] = build(config)
        except ImportError as exc:
            problems.append(f"push.{name}: provider type {kind!r} is not available: {exc}")
        except (ValueError, OSError) as exc:
            problems.append(f"push.{name}: {exc}")
    if problems:
        raise ProviderBuildError(problems)
    return providers
