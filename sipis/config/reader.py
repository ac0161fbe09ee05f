"""Reading parsed TOML by the declarations of :mod:`sipis.config.schema`.

Problems are recorded, not raised, so every problem of a file is reported together, each naming
its full dotted key; a key with a problem keeps its default so later checks can still run, and
rules between keys skip keys that have a problem already (one problem, one message).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import Field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from sipis.config.schema import Invalid, Reported, Setting, default_of, has_default, rules_of, settings_of

C = TypeVar("C")

_NOTHING: Mapping[str, Any] = MappingProxyType({})


class ConfigError(Exception):
    """The configuration is unusable; :attr:`problems` lists every problem found, one per line."""

    def __init__(self, problems: Iterable[str], source: Path | None = None) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        self.source = source
        where = f" {source}" if source else ""
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration{where} ({count}):\n{lines}")


def describe(value: Any) -> str:
    """A value as the problem list shows it: TOML type plus a short rendering."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value}"


def expected(what: str, value: Any) -> Invalid:
    return Invalid(f"expected {what}, got {describe(value)}")


def is_number(value: Any) -> bool:
    # bool is an int subclass in Python, but `true` is no number in a config file.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Context:
    """What every table of one file shares: where relative paths start, and the problem list."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        #: where generated files go; known once the top-level ``state_dir`` is read
        self.state_dir = base_dir
        self.problems: list[str] = []


class TableReader:
    """One TOML table being read; every key asked for counts as known for :meth:`finish`."""

    def __init__(self, data: Mapping[str, Any], prefix: str, ctx: Context) -> None:
        self._data = data
        self._prefix = prefix
        self.ctx = ctx
        self._asked: set[str] = set()
        #: keys with a problem (rules between keys skip them)
        self.failed: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def error(self, name: str, message: str, *, part: str = "") -> None:
        """A problem with key ``name`` (``part``: an item of it, e.g. ``[1]`` or ``.Header``)."""
        self.failed.add(name)
        self.ctx.problems.append(f"{self.key(name)}{part}: {message}")

    def has(self, name: str) -> bool:
        return name in self._data

    def raw(self, name: str) -> Any:
        """The value, or None when absent (TOML has no null, so None always means absent)."""
        self._asked.add(name)
        return self._data.get(name)

    def names(self) -> Iterator[str]:
        """All keys of a table whose keys are names chosen by the user (``[push.NAME]``)."""
        for name in self._data:
            self._asked.add(name)
            yield name

    def sub(self, name: str, value: Any) -> TableReader:
        """The sub-table ``value`` of key ``name``; raises :class:`Invalid` if it is none."""
        if not isinstance(value, dict):
            raise expected("a table", value)
        return TableReader(value, self.key(name), self.ctx)

    def value(self, cls: type, name: str) -> Any:
        """Read the declared key ``name`` of section ``cls`` alone (see :meth:`read`)."""
        return self._value(*next((f, decl) for f, decl in settings_of(cls) if f.name == name))

    def read(self, cls: type[C], given: Mapping[str, Any] = _NOTHING, hints: Mapping[str, str] = _NOTHING) -> C:
        """Read this table as section ``cls`` (fields in ``given`` are not read but passed on);
        raises :class:`Reported` when a required key has no usable value."""
        values, complete = self.values(cls, given, hints)
        if not complete:
            raise Reported
        return cls(**values)

    def values(self, cls: type, given: Mapping[str, Any] = _NOTHING,
               hints: Mapping[str, str] = _NOTHING) -> tuple[dict[str, Any], bool]:
        """The usable values of section ``cls`` in this table, and whether they make a section."""
        values = dict(given)
        complete = True
        for f, decl in settings_of(cls):
            if f.name not in values:
                try:
                    values[f.name] = self._value(f, decl)
                except Reported:
                    complete = False
        for rule in rules_of(cls):
            if not self.failed.intersection(rule.keys):
                rule.apply(values, self)
        self.finish(hints)
        return values, complete

    def _value(self, f: Field[Any], decl: Setting) -> Any:
        """A key's value, its default when absent or wrong; raises :class:`Reported` when there
        is none (a required key absent or wrong)."""
        name, raw = f.name, self.raw(f.name)
        try:
            if raw is not None:
                return decl.kind.read(raw, self, name)
            if has_default(f):
                return decl.kind.default(default_of(f), self, name)
            return decl.kind.missing(self, name)
        except Invalid as exc:
            if isinstance(exc, Reported):
                self.failed.add(name)
            else:
                self.error(name, str(exc))
            if not has_default(f):
                raise Reported from None
            return decl.kind.default(default_of(f), self, name)

    def finish(self, hints: Mapping[str, str] = _NOTHING) -> None:
        """Report every key nobody asked for, with the closest known key as a suggestion."""
        for name, value in self._data.items():
            if name in self._asked:
                continue
            kind = "table" if isinstance(value, dict) else "key"
            message = f"unknown {kind} '{self.key(name)}'"
            if name in hints:
                message += f" ({hints[name]})"
            elif close := difflib.get_close_matches(name, sorted(self._asked), n=1):
                message += f" (did you mean '{self.key(close[0])}'?)"
            self.ctx.problems.append(message)
