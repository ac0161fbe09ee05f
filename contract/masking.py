"""How secrets and identifiers are shown wherever they must be named (views, logs): only their ends."""

from __future__ import annotations


def mask(secret: str | None) -> str | None:
    """Show only the ends of a token: ``abcd…wxyz``."""
    if secret is None:
        return None
    return "…" if len(secret) <= 10 else f"{secret[:4]}…{secret[-4:]}"
