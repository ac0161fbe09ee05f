"""PostgreSQL URLs: never with a password (libpq's PGPASSWORD or passfile supply it), never logged
with one. Apart from the driver, so reading a config file does not load it."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


class PasswordInUrlError(ValueError):
    """A storage URL carries a password (it must come from PGPASSWORD or the passfile)."""


def check_url(url: str) -> str:
    """``url`` if it is a PostgreSQL URL without a password; else a clear ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"storage url must start with postgresql:// (got {parts.scheme or 'no'} scheme)")
    if parts.password is not None or "password=" in parts.query:
        raise PasswordInUrlError(
            f"storage url {redact_url(url)} contains a password: put it in PGPASSWORD or the passfile instead"
        )
    return url


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and errors."""
    parts = urlsplit(url)
    query = "&".join("password=***" if p.startswith("password=") else p for p in parts.query.split("&")) \
        if parts.query else ""
    if parts.password is None:
        return urlunsplit(parts._replace(query=query))
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))
