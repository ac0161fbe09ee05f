"""Naming the listener that could not open: "app API cannot listen on 0.0.0.0:24998: Address already
in use" instead of a bare ``[Errno 98]``, which leaves the operator guessing which of four it was."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class ListenError(OSError):
    """A listener could not open its address (in use, not this host's, not allowed)."""


@contextlib.contextmanager
def opening(listener: str, address: str) -> Iterator[None]:
    """Turn an address's ``OSError`` inside the block into a :class:`ListenError` naming ``listener``
    and ``address``. An error with a file name (a certificate, a host key) is about that file, not the
    address, and passes through as it is."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or isinstance(exc, ListenError):
            raise
        # asyncio's own text for a bind error repeats the address: the errno's is enough
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"{listener} cannot listen on {address}: {reason}") from exc
