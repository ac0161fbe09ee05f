"""Master key file handling, SecretBox and bearer token helpers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipis.crypto import (
    KEY_SIZE,
    DecryptionError,
    KeyFileError,
    SecretBox,
    hash_token,
    load_or_create_key,
    new_token,
    tokens_equal,
)

# One fixed key for property tests (hypothesis does not mix with function-scoped fixtures).
BOX = SecretBox(bytes(range(32)))


def test_key_file_is_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "master.key"
    old_umask = os.umask(0o000)  # even a permissive umask must not widen the mode
    try:
        key = load_or_create_key(path)
    finally:
        os.umask(old_umask)
    assert len(key) == KEY_SIZE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == key
    assert [p.name for p in path.parent.iterdir()] == ["master.key"]  # no temp file left behind


def test_key_file_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    assert load_or_create_key(path) == load_or_create_key(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    key = load_or_create_key(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=r"chmod 600") as caught:
        load_or_create_key(path)
    assert f"{mode:04o}" in str(caught.value)
    assert key.hex() not in str(caught.value)
    assert path.read_bytes() == key  # refused, not replaced


@pytest.mark.parametrize("size", [0, 16, 33])
def test_key_file_of_wrong_length_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "master.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"k" * size)
    os.close(fd)
    with pytest.raises(KeyFileError, match=rf"holds {min(size, KEY_SIZE + 1)} bytes, expected 32"):
        load_or_create_key(path)


def test_key_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.mkdir(mode=0o700)
    with pytest.raises((KeyFileError, IsADirectoryError)):
        load_or_create_key(path)


def test_round_trip() -> None:
    blob = BOX.encrypt("s3cr3t-pässword", context="sel-1")
    assert BOX.decrypt(blob, context="sel-1") == "s3cr3t-pässword"


def test_blobs_are_versioned_and_randomised() -> None:
    first = BOX.encrypt("same", context="sel-1")
    second = BOX.encrypt("same", context="sel-1")
    assert first != second  # fresh nonce each time
    assert first[0] == 1
    assert len(first) == 1 + 12 + len("same") + 16


@given(plaintext=st.text(min_size=4), context=st.text(min_size=1))
def test_blob_never_contains_the_plaintext(plaintext: str, context: str) -> None:
    blob = BOX.encrypt(plaintext, context=context)
    assert plaintext.encode("utf-8") not in blob
    assert BOX.decrypt(blob, context=context) == plaintext


def test_wrong_context_fails() -> None:
    blob = BOX.encrypt("secret", context="sel-1")
    with pytest.raises(DecryptionError):
        BOX.decrypt(blob, context="sel-2")


def test_wrong_key_fails() -> None:
    blob = BOX.encrypt("secret", context="sel-1")
    with pytest.raises(DecryptionError):
        SecretBox(os.urandom(32)).decrypt(blob, context="sel-1")


@given(data=st.data())
def test_any_flipped_bit_fails(data: st.DataObject) -> None:
    blob = bytearray(BOX.encrypt("secret", context="sel-1"))
    index = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    blob[index] ^= 1 << bit
    with pytest.raises(DecryptionError):
        BOX.decrypt(bytes(blob), context="sel-1")


def test_truncated_blob_fails() -> None:
    blob = BOX.encrypt("secret", context="sel-1")
    for size in (0, 1, 13, len(blob) - 1):
        with pytest.raises(DecryptionError):
            BOX.decrypt(blob[:size], context="sel-1")


def test_errors_and_repr_reveal_nothing() -> None:
    key = os.urandom(32)
    box = SecretBox(key)
    blob = box.encrypt("hunter2", context="sel-1")
    with pytest.raises(DecryptionError) as caught:
        box.decrypt(blob, context="sel-2")
    message = str(caught.value)
    assert "hunter2" not in message and "sel-2" not in message
    assert key.hex() not in repr(box) and repr(key) not in repr(box)


def test_bad_key_and_empty_context_are_rejected() -> None:
    with pytest.raises(ValueError):
        SecretBox(b"short")
    with pytest.raises(ValueError):
        BOX.encrypt("secret", context="")


def test_tokens() -> None:
    token = new_token()
    assert len(token) >= 43 and all(c.isalnum() or c in "-_" for c in token)
    assert len({new_token() for _ in range(100)}) == 100
    digest = hash_token(token)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert token not in digest
    assert hash_token(token) == digest
    assert tokens_equal(digest, hash_token(token))
    assert not tokens_equal(digest, hash_token(new_token()))
    assert not tokens_equal("abc", "abcd")
    assert tokens_equal("päss", "päss")  # non-ASCII does not raise
