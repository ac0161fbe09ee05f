"""The instance query language: one filter syntax for the operator API's ``q`` and the console's
filter box (``docs/operator-api.md``, "Instance queries").

A query is words separated by blanks, compared case-insensitively; an instance matches when every
word matches:

* ``field:value``, field one of ``state``, ``status`` (or ``reg``), ``code``, ``push``, ``provider``:
  the field's text starts with ``value`` (``state:prox``, ``code:40``, ``push:rej``); ``push`` reads
  ``unreachable`` while the instance's push token is dead, else its last push outcome;
* any other word (``alice``, ``pbx2``, ``state`` without a colon, ``foo:bar`` with an unknown
  field): a substring of the instance's selector, AOR, user or registrar.

The matcher reads the fields of an :class:`~contract.documents.InstanceRow`; anything with those
attributes (:class:`Filterable`) will do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, cast


class Filterable(Protocol):
    """The row fields a query reads."""

    @property
    def selector(self) -> str: ...

    @property
    def aor(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def registrar(self) -> str | None: ...

    @property
    def state(self) -> str: ...

    @property
    def reg_status(self) -> str: ...

    @property
    def last_code(self) -> int | None: ...

    @property
    def push_unreachable(self) -> bool: ...

    @property
    def last_push_outcome(self) -> str | None: ...

    @property
    def push_provider(self) -> str | None: ...


#: (field, lower-case value) of a ``field:value`` word; (None, lower-case word) of any other
Term = tuple[str | None, str]
T = TypeVar("T")

#: the fields of ``field:value`` words: each one's text (compared by prefix)
FIELDS: dict[str, Callable[[Filterable], str]] = {
    "state": lambda r: r.state,
    "status": lambda r: r.reg_status,
    "reg": lambda r: r.reg_status,
    "code": lambda r: "" if r.last_code is None else str(r.last_code),
    "push": lambda r: "unreachable" if r.push_unreachable else (r.last_push_outcome or ""),
    "provider": lambda r: (r.push_provider or "").lower(),
}
#: the row fields plain words search (see :func:`haystack`)
HAYSTACK_FIELDS = frozenset({"selector", "aor", "user", "registrar"})
#: the row fields ``field:value`` words read
FIELD_SOURCES = frozenset({"state", "reg_status", "last_code", "push_unreachable", "last_push_outcome",
                           "push_provider"})


def parse_query(text: str) -> list[Term]:
    """``alice state:proxied`` → ``[(None, "alice"), ("state", "proxied")]``."""
    terms: list[Term] = []
    for word in text.lower().split():
        name, sep, value = word.partition(":")
        terms.append((name, value) if sep and name in FIELDS else (None, word))
    return terms


def haystack(row: Filterable) -> str:
    """What plain words search: selector, AOR, user and registrar, lower-case, NUL-separated (so a
    word does not match across two of them)."""
    return f"{row.selector}\0{row.aor}\0{row.user}\0{row.registrar or ''}".lower()


def matches(terms: Sequence[Term], row: Filterable, hay: str | None = None) -> bool:
    """Whether ``row`` matches every term (``hay``: its :func:`haystack`, when the caller keeps it)."""
    if hay is None:
        hay = haystack(row)
    return all(value in hay if name is None else FIELDS[name](row).startswith(value) for name, value in terms)


def select(terms: Sequence[Term], items: Sequence[T], hay_of: Callable[[T], str],
           row_of: Callable[[T], Filterable] | None = None) -> list[T]:
    """The items matching every term, in their order: what the console's filter and the API's ``q``
    run over 100k instances. One pass per term, plain words first (a substring test on each item's
    kept :func:`haystack`, ``hay_of(item)``: cheap, and usually the narrowest); then the fields, read
    from ``row_of(item)`` (None: the item is the row)."""
    result = list(items)
    for name, value in sorted(terms, key=lambda term: term[0] is not None):
        if name is None:
            result = [item for item in result if value in hay_of(item)]
        elif row_of is None:
            text = FIELDS[name]
            result = [item for item in result if text(cast(Filterable, item)).startswith(value)]
        else:
            text = FIELDS[name]
            result = [item for item in result if text(row_of(item)).startswith(value)]
    return result


def refines(new: Sequence[Term], old: Sequence[Term]) -> bool:
    """Whether every row matching ``new`` also matches ``old`` (so a kept result of ``old`` may be
    narrowed instead of searching everything again): ``new`` extends ``old``'s terms."""
    if len(new) < len(old):
        return False
    return all(n[0] == o[0] and (o[1] in n[1] if n[0] is None else n[1].startswith(o[1]))
               for n, o in zip(new, old, strict=False))
