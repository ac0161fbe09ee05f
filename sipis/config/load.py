"""Reading a config file into a :class:`Config`, and what a started core warns about."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sipis.config.model import Config
from sipis.config.reader import ConfigError, Context, TableReader
from sipis.config.schema import Reported


def parse_config(data: Mapping[str, Any], base_dir: Path, *, source: Path | None = None) -> Config:
    """Validate parsed TOML; relative paths resolve against ``base_dir``. Raises ConfigError."""
    ctx = Context(base_dir.expanduser().absolute())
    root = TableReader(data, "", ctx)
    # first: the defaults of generated files (certificates, socket, host key) live in it
    ctx.state_dir = root.value(Config, "state_dir")
    try:
        config = root.read(Config, given={"state_dir": ctx.state_dir, "source": source})
    except Reported:
        raise ConfigError(ctx.problems, source) from None
    if ctx.problems:
        raise ConfigError(ctx.problems, source)
    return config


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file. Raises ConfigError (also for I/O and syntax)."""
    given, path = path, Path(path).expanduser().absolute()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"file not found (create one with: sipis-console init {given})"], path) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax error: {exc}"], path) from None
    return parse_config(data, path.parent, source=path)


def insecure_settings(config: Config) -> list[str]:
    """Lab-only settings in use, for a start-up warning."""
    found = []
    if not config.sip.tls_verify:
        found.append("sip.tls_verify = false: the PBX's TLS certificate is not checked")
    if config.api.listen is not None and not config.api.tls:
        found.append("api.tls = false: the app API (credentials, tokens) runs over plain HTTP")
    found += [
        f"push.{p.name}.verify = false: the provider's TLS certificate is not checked"
        for p in config.push.values()
        if not p.verify
    ]
    return found
