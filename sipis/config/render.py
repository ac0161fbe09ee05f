"""The starter file and the docs tables, both made from the declarations in :mod:`sipis.config.model`.

``python -m sipis.config docs`` rewrites the generated part of ``docs/configuration.md`` (between
:data:`DOCS_BEGIN` and :data:`DOCS_END`; the prose around it is hand-written).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import Field
from pathlib import Path
from typing import Any, Final

from sipis.config.kinds import Entries, NamedTables, Section, toml_string
from sipis.config.model import STARTER_TOKEN_PLACEHOLDER, Config
from sipis.config.schema import Setting, default_of, has_default, rules_of, settings_of

#: Where the starter file's comments start, and how wide its lines may get.
COMMENT_COLUMN: Final = 35
WIDTH: Final = 110

DOCS_BEGIN: Final = "<!-- BEGIN settings: made by `python -m sipis.config docs` from sipis/config/model.py -->"
DOCS_END: Final = "<!-- END settings -->"

_STARTER_HEAD: Final = """\
# sipis-console configuration (TOML). Durations are seconds; fractions are allowed.
# Relative paths resolve against this file's folder. Reference: docs/configuration.md
"""


def meaning(cls: type, f: Field[Any], decl: Setting) -> str:
    """A key's doc text with what the section's rules add to it (markdown)."""
    parts = [decl.doc]
    parts += [text for rule in rules_of(cls) if (text := rule.doc().get(f.name))]
    if decl.unique:
        parts.append("unique")
    return "; ".join(parts)


# --------------------------------------------------------------------------- starter file


def _plain(markdown: str) -> str:
    return markdown.replace("`", "")


def _commented(head: str, comment: str) -> Iterator[str]:
    """``head`` with ``comment`` beside it from :data:`COMMENT_COLUMN`, wrapped at :data:`WIDTH`."""
    line = head.ljust(COMMENT_COLUMN - 2) + "  # "
    first = True
    for word in comment.split():
        if not first and len(line) + 1 + len(word) > WIDTH:
            yield line
            line = " " * COMMENT_COLUMN + "#  "
        line += ("" if first else " ") + word
        first = False
    yield line


def _key_lines(cls: type, prefix: str, only_own: bool = False) -> Iterator[str]:
    """One line per plain key of ``cls``: set to its default, or a commented-out example."""
    own = vars(cls).get("__annotations__", {})
    for f, decl in settings_of(cls):
        if isinstance(decl.kind, Section | Entries | NamedTables) or (only_own and f.name not in own):
            continue
        if decl.starter is not None:
            value, commented = decl.starter, False
        elif not has_default(f):
            value, commented = decl.example, False
        elif decl.example is not None:
            value, commented = decl.example, True
        else:
            value, commented = default_of(f), False
        comment = meaning(cls, f, decl)
        if hint := decl.kind.hint(comment):
            comment += f" ({hint})"
        if commented and (default := _default(f, decl)) != "—":
            comment += f"; default: {default}"
        comment = _plain(comment)
        yield from _commented(f"{prefix}{'# ' if commented else ''}{f.name} = {decl.kind.toml(value)}", comment)


def _table_lines(name: str, cls: type, doc: str) -> Iterator[str]:
    yield ""
    yield from _commented(f"[{name}]", _plain(doc))
    yield from _key_lines(cls, "")
    for f, decl in settings_of(cls):
        if isinstance(decl.kind, Entries):
            yield "#"
            yield from _commented(f"# [[{name}.{f.name}]]", _plain(decl.doc))
            yield from _key_lines(decl.kind.cls, "# ")


def _named_table_lines(name: str, kind: NamedTables[Any], doc: str) -> Iterator[str]:
    yield ""
    yield f"# Tables [{name}.NAME]: {_plain(doc)}."  # not "# [": that reads as a commented-out table
    yield "# Examples (uncomment and fill in):"
    for i, cls in enumerate(kind.types.values()):
        yield "#"
        yield f"# [{name}.{cls.example_name}]"
        yield from _commented(f"# type = {toml_string(cls.type)}", _plain(cls.title))
        yield from _key_lines(cls, "# ", only_own=i > 0)  # the shared keys once, with the first type


def starter_config() -> str:
    """A commented starter file: every key, lab-safe values, loopback listeners only, and the
    placeholder enroll token :data:`STARTER_TOKEN_PLACEHOLDER`."""
    lines = [*_STARTER_HEAD.splitlines(), ""]
    lines += _key_lines(Config, "")
    for f, decl in settings_of(Config):
        if isinstance(decl.kind, Section):
            lines += _table_lines(f.name, decl.kind.cls, decl.doc)
        elif isinstance(decl.kind, NamedTables):
            lines += _named_table_lines(f.name, decl.kind, decl.doc)
    return "\n".join(lines) + "\n"


def write_starter_config(path: Path, force: bool = False) -> None:
    """Write :func:`starter_config` with a fresh random enroll token, mode 0600 (it holds secrets).

    Refuses to replace an existing file (FileExistsError) unless ``force``.
    """
    path = Path(path).expanduser()
    token = secrets.token_urlsafe(24)
    text = starter_config().replace(f'"{STARTER_TOKEN_PLACEHOLDER}"', f'"{token}"', 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not force:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            message = f"{path} already exists; not overwriting it (use force to replace it)"
            raise FileExistsError(message) from None
        _write_private(fd, text)
        return
    # Replace through a private temp file: the result is 0600 even if the old file was not.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        _write_private(fd, text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_private(fd: int, text: str) -> None:
    os.fchmod(fd, 0o600)  # the umask may have been stricter, never looser; make it exact
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------- docs tables


def _row(*cells: str) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _default(f: Field[Any], decl: Setting) -> str:
    if decl.default_doc is not None:
        return decl.default_doc
    if not has_default(f):
        return "**required**"
    return decl.kind.doc_default(default_of(f))


_HEAD: Final = ("| key | type | default | meaning |", "|---|---|---|---|")


def _rows(cls: type, prefix: str = "") -> Iterator[str]:
    """A row per key; sections and named tables get headings of their own instead."""
    for f, decl in settings_of(cls):
        if isinstance(decl.kind, Entries):
            yield _row(f"`[[{prefix}{f.name}]]`", decl.kind.doc, "none", f"{decl.doc} (below)")
        elif not isinstance(decl.kind, Section | NamedTables):
            yield _row(f"`{f.name}`", decl.kind.doc, _default(f, decl), meaning(cls, f, decl))


def _section_docs(name: str, cls: type, doc: str) -> Iterator[str]:
    yield from (f"## `[{name}]` — {doc}", "", *_HEAD)
    yield from _rows(cls, f"{name}.")
    for f, decl in settings_of(cls):
        if isinstance(decl.kind, Entries):
            yield from ("", f"### `[[{name}.{f.name}]]` — {decl.doc}", "", *_HEAD)
            yield from _rows(decl.kind.cls)


def _named_tables_docs(name: str, kind: NamedTables[Any], doc: str) -> Iterator[str]:
    yield from (f"## `[{name}.NAME]` — {doc}", "", "| key | for | type | default | meaning |", "|---|---|---|---|---|")
    types = "; ".join(f"`{t}`: {cls.title}" for t, cls in kind.types.items())
    yield _row("`type`", "all", kind.type_kind.doc, "**required**", types)
    for f, decl in settings_of(kind.base):
        by_type = {t: _default(next(g for g, _ in settings_of(cls) if g.name == f.name), decl)
                   for t, cls in kind.types.items()}
        same = len(set(by_type.values())) == 1
        default = next(iter(by_type.values())) if same else "; ".join(f"{t}: {d}" for t, d in by_type.items())
        yield _row(f"`{f.name}`", "all", decl.kind.doc, default, meaning(kind.base, f, decl))
    for t, cls in kind.types.items():
        own = kind.own_keys(cls)
        for f, decl in settings_of(cls):
            if f.name in own:
                yield _row(f"`{f.name}`", t, decl.kind.doc, _default(f, decl), meaning(cls, f, decl))


def docs_tables() -> str:
    """The generated part of ``docs/configuration.md``: one table per section (markdown)."""
    lines = ["## Top level", "", *_HEAD, *_rows(Config)]
    for f, decl in settings_of(Config):
        if isinstance(decl.kind, Section):
            lines += ["", *_section_docs(f.name, decl.kind.cls, decl.doc)]
        elif isinstance(decl.kind, NamedTables):
            lines += ["", *_named_tables_docs(f.name, decl.kind, decl.doc)]
    return "\n".join(lines) + "\n"


def update_docs(text: str) -> str:
    """``text`` (docs/configuration.md) with its generated part made anew."""
    begin, end = text.find(DOCS_BEGIN), text.find(DOCS_END)
    if begin < 0 or end < begin:
        raise ValueError(f"no generated part: the file needs the lines {DOCS_BEGIN!r} and {DOCS_END!r}")
    return f"{text[:begin]}{DOCS_BEGIN}\n\n{docs_tables()}\n{text[end:]}"
