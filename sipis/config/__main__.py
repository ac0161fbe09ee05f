"""``python -m sipis.config docs [PATH]``: rewrite the generated tables of docs/configuration.md;
``python -m sipis.config starter``: print a starter file (with the placeholder enroll token)."""

from __future__ import annotations

import sys
from pathlib import Path

from sipis.config.render import starter_config, update_docs

USAGE = "usage: python -m sipis.config docs [PATH (default: docs/configuration.md)] | starter"


def main(argv: list[str]) -> int:
    match argv:
        case ["docs", *rest] if len(rest) <= 1:
            path = Path(rest[0] if rest else "docs/configuration.md")
            old = path.read_text(encoding="utf-8")
            new = update_docs(old)
            if new != old:
                path.write_text(new, encoding="utf-8")
            print(f"{path}: {'updated' if new != old else 'up to date'}")
            return 0
        case ["starter"]:
            sys.stdout.write(starter_config())
            return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
