"""Secrets at rest and bearer tokens.

* :func:`load_or_create_key` manages the one 32-byte master key in the state folder.
* :class:`SecretBox` encrypts SIP credentials with AES-256-GCM. The caller's ``context`` (the instance
  selector) is bound in as associated data, so a blob copied onto another row fails to decrypt.
* Bearer tokens are only ever stored as :func:`hash_token` digests and compared with
  :func:`tokens_equal`.

Nothing here puts key material, plaintext or tokens into a ``repr`` or an exception message.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
BLOB_VERSION = 1
_HEADER = bytes([BLOB_VERSION])
# Key bytes and ciphertext both live on disk; only the owner may read either.
_FORBIDDEN_MODE_BITS = stat.S_IRWXG | stat.S_IRWXO


class KeyFileError(Exception):
    """The key file exists but must not be used (permissions, type or length)."""


class DecryptionError(Exception):
    """A blob failed authentication: wrong key, wrong context, unknown version or tampering."""


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """Return the master key at ``path``, creating a fresh random one (mode 0600) if there is none.

    An existing file is refused, not repaired: if it is readable by group/others the key may already
    have leaked, and an operator has to decide what to do about that.
    """
    key_path = Path(path)
    try:
        return _read_key(key_path)
    except FileNotFoundError:
        pass
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(KEY_SIZE)
    if _create_exclusive(key_path, key):
        return key
    # Another process created the key between our read and our create: use theirs.
    return _read_key(key_path)


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & _FORBIDDEN_MODE_BITS:
            raise KeyFileError(
                f"key file {path} has mode {mode:04o}; it must be accessible by its owner only "
                f"(chmod 600 {path}, and consider the key compromised)"
            )
        data = _read_all(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_SIZE:
        raise KeyFileError(f"key file {path} holds {len(data)} bytes, expected {KEY_SIZE}")
    return data


def _read_all(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _create_exclusive(path: Path, key: bytes) -> bool:
    """Write ``key`` to a private temp file, then hard-link it into place.

    O_CREAT|O_EXCL means the temp file is ours and born 0600; ``os.link`` never overwrites, so
    ``path`` appears complete or not at all (a crash cannot leave a short key behind).
    Returns False if ``path`` already existed.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits; be explicit regardless
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    # Make the new directory entry durable; best effort where directories cannot be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SecretBox:
    """AES-256-GCM with a random nonce per blob.

    Blob layout: ``version (1) | nonce (12) | ciphertext + tag``. The associated data is the version
    byte plus the UTF-8 ``context``, so neither can be altered without failing authentication.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a SecretBox key must be {KEY_SIZE} bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> SecretBox:
        return cls(load_or_create_key(path))

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def encrypt(self, plaintext: str, *, context: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), _associated_data(context))
        return _HEADER + nonce + sealed

    def decrypt(self, blob: bytes, *, context: str) -> str:
        if len(blob) < 1 + NONCE_SIZE + TAG_SIZE:
            raise DecryptionError("encrypted blob is truncated")
        if blob[0] != BLOB_VERSION:
            raise DecryptionError(f"encrypted blob has unknown version {blob[0]}")
        nonce = blob[1 : 1 + NONCE_SIZE]
        try:
            plaintext = self._aead.decrypt(nonce, blob[1 + NONCE_SIZE :], _associated_data(context))
        except InvalidTag:
            raise DecryptionError(
                "encrypted blob failed authentication (wrong key, wrong context or tampered)"
            ) from None
        return plaintext.decode("utf-8")


def _associated_data(context: str) -> bytes:
    if not context:
        # An empty context would let a blob decrypt on any row that also forgot to pass one.
        raise ValueError("context must not be empty")
    return _HEADER + context.encode("utf-8")


def new_token() -> str:
    """A fresh bearer token: URL-safe text carrying 32 bytes of entropy."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a bearer token (SHA-256, hex). Tokens are random, so no salt is needed."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two tokens or token hashes."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
