"""How a setting is declared: name, type, default, bounds and doc text in one place.

A config section is a frozen dataclass made with :func:`section`; each of its fields that is a TOML
key is made with :func:`setting`, which records the field's :class:`Kind` (how the value is written
in TOML, checked and worded in problems) and its doc text as field metadata. The reader
(:mod:`sipis.config.reader`), the starter file and the docs tables (:mod:`sipis.config.render`) all
walk these declarations, so nothing about a setting is written twice. Rules that tie keys of one
section together (:class:`Order`, :class:`Together`, :class:`Check`) are declared with the section.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar, dataclass_transform, overload

if TYPE_CHECKING:
    from sipis.config.reader import TableReader

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
C = TypeVar("C")


class Invalid(Exception):
    """A value a kind cannot take; the message follows the dotted key in the problem list."""


class Reported(Invalid):
    """The value is unusable and its problems are already listed (a table with problems inside)."""


class Kind(Generic[T_co]):
    """The TOML type of a setting: how it is read (with the wording of its problems) and written."""

    #: the wording of problems: ``expected {what}, got …`` and ``required ({what})``
    what: str = "a value"
    #: the type as the docs table shows it (markdown)
    doc: str = "value"

    def read(self, value: object, table: TableReader, name: str) -> T_co:
        """The value for a present key; raises :class:`Invalid`, or reports problems on parts of
        the value itself (``table.error(name, …, part=…)``) and returns what was usable."""
        raise NotImplementedError

    def default(self, value: Any, table: TableReader, name: str) -> Any:
        """The declared default as the section holds it (paths resolve here)."""
        return value

    def missing(self, table: TableReader, name: str) -> T_co:
        """The value for an absent key without a declared default: by default it is required."""
        raise Invalid(f"required ({self.what})")

    def toml(self, value: Any) -> str:
        """``value`` written as TOML (starter file, docs)."""
        raise NotImplementedError

    def doc_default(self, value: Any) -> str:
        """The docs' default column for a declared default (markdown)."""
        return "—" if value is None else f"`{self.toml(value)}`"

    def hint(self, doc: str) -> str:
        """What the starter file adds to the doc text ``doc`` (e.g. the choices); may be empty."""
        return ""

    def identity(self, value: Any) -> object:
        """What makes two values the same, for settings declared ``unique``."""
        return value


@dataclass(frozen=True)
class Setting:
    """The metadata :func:`setting` attaches to a field."""

    kind: Kind[Any]
    doc: str
    #: the default in words, when the declared one is computed (a host name, a version)
    default_doc: str | None = None
    #: the starter file shows this value commented out (``# key = example``)
    example: object = None
    #: the starter file sets this value instead of the default
    starter: object = None
    #: never echoed in problems nor in ``repr()``
    secret: bool = False
    #: no two entries of an array of tables may share it
    unique: bool = False


_META = "sipis.setting"


@overload
def setting(kind: Kind[T], doc: str, *, default: T, default_doc: str | None = None, example: T | None = None,
            starter: T | None = None, secret: bool = False) -> T: ...
@overload
def setting(kind: Kind[T], doc: str, *, default_factory: Callable[[], T], default_doc: str,
            example: T | None = None, secret: bool = False) -> T: ...
@overload
def setting(kind: Kind[T], doc: str, *, example: T | None = None, secret: bool = False,
            unique: bool = False) -> T: ...
def setting(kind: Kind[Any], doc: str, *, default: Any = MISSING, default_factory: Any = MISSING,
            default_doc: str | None = None, example: Any = None, starter: Any = None, secret: bool = False,
            unique: bool = False) -> Any:
    """Declare a TOML key: its kind, doc text and default (no default: the key is required)."""
    meta = Setting(kind, doc, default_doc, example, starter, secret, unique)
    return field(default=default, default_factory=default_factory, repr=not secret, metadata={_META: meta})


def override(base: type, name: str, *, default: Any = MISSING, example: Any = None) -> Any:
    """``base``'s declaration of ``name`` with another default or example (push URLs differ by type)."""
    declared = {f.name: f for f in fields(base)}[name]
    meta = declared.metadata[_META]
    if example is not None:
        meta = replace(meta, example=example)
    return field(default=default, repr=declared.repr, metadata={_META: meta})


_RULES: dict[type, tuple[Rule, ...]] = {}


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(setting, override, field))
def section(*, rules: Sequence[Rule] = (), kw_only: bool = True) -> Callable[[type[C]], type[C]]:
    """Make a config section: a frozen dataclass whose :func:`setting` fields are its keys."""

    def make(cls: type[C]) -> type[C]:
        made = dataclass(frozen=True, kw_only=kw_only)(cls)
        _RULES[made] = tuple(rules)
        return made

    return make


def settings_of(cls: type) -> Iterator[tuple[Field[Any], Setting]]:
    """The declared keys of a section, in declaration order."""
    for f in fields(cls):
        if (meta := f.metadata.get(_META)) is not None:
            yield f, meta


def rules_of(cls: type) -> tuple[Rule, ...]:
    """The rules of a section and of the sections it extends."""
    return tuple(rule for klass in reversed(cls.__mro__) for rule in _RULES.get(klass, ()))


def has_default(f: Field[Any]) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def default_of(f: Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


# --------------------------------------------------------------------------- rules between keys


class Rule:
    """A check across keys of one section; skipped when one of its keys has a problem already."""

    keys: tuple[str, ...] = ()

    def apply(self, values: dict[str, Any], table: TableReader) -> None:
        raise NotImplementedError

    def doc(self) -> Mapping[str, str]:
        """Text the docs add to the meaning of a key, by key."""
        return {}


_RELATIONS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "<": (operator.lt, "<"),
    ">=": (operator.ge, "≥"),
}


class Order(Rule):
    """``key`` must be ``relation`` (``<`` or ``>=``) ``other``; the problem names ``key``."""

    def __init__(self, key: str, relation: str, other: str) -> None:
        self.keys = (key, other)
        self.key, self.relation, self.other = key, relation, other

    def apply(self, values: dict[str, Any], table: TableReader) -> None:
        value, other = values[self.key], values[self.other]
        if not _RELATIONS[self.relation][0](value, other):
            message = f"must be {self.relation} {table.key(self.other)} ({other:g}), got {value:g}"
            table.error(self.key, message)

    def doc(self) -> Mapping[str, str]:
        return {self.key: f"must be {_RELATIONS[self.relation][1]} `{self.other}`"}


class Together(Rule):
    """Two keys that only work together (a certificate and its key): both or neither.

    ``flag`` names a field (no key) set to whether neither was given, i.e. the defaults stand.
    """

    def __init__(self, first: str, second: str, *, flag: str | None = None) -> None:
        self.keys = (first, second)
        self.first, self.second, self.flag = first, second, flag

    def apply(self, values: dict[str, Any], table: TableReader) -> None:
        given = table.has(self.first), table.has(self.second)
        if given[0] != given[1]:
            missing, present = (self.second, self.first) if given[0] else (self.first, self.second)
            table.error(missing, f"required together with {table.key(present)}")
        if self.flag is not None:
            values[self.flag] = not all(given)

    def doc(self) -> Mapping[str, str]:
        return {self.first: f"give it with `{self.second}`, or neither"}


class Check(Rule):
    """A condition on the section's values; ``message`` may name keys as ``{key}`` (full key),
    ``doc`` is what the docs add to the meaning of ``key``."""

    def __init__(self, key: str, fails: Callable[[Mapping[str, Any]], bool], message: str,
                 needs: tuple[str, ...] = (), doc: str | None = None) -> None:
        self.keys = (key, *needs)
        self.key, self.fails, self.message, self.doc_text = key, fails, message, doc

    def apply(self, values: dict[str, Any], table: TableReader) -> None:
        if self.fails(values):
            table.error(self.key, self.message.format(**{name: table.key(name) for name in values}))

    def doc(self) -> Mapping[str, str]:
        return {self.key: self.doc_text} if self.doc_text else {}
