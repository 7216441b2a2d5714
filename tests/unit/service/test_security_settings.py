"""Passwords, tokens, settings and the image store."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from marrowscope.service.security import (
    check_password_rules,
    digest,
    hash_password,
    same_token,
    verify_password,
)
from marrowscope.service.settings import SECRET_NAME, ServiceError, Settings
from marrowscope.service.storage import ImageStore


def test_argon2_hashes_verify_and_are_salted() -> None:
    h1, h2 = hash_password("correct horse battery"), hash_password("correct horse battery")
    assert h1 != h2 and h1.startswith("$argon2id$")
    assert verify_password(h1, "correct horse battery")
    assert not verify_password(h1, "wrong horse battery")
    assert not verify_password(None, "correct horse battery")
    assert not verify_password("not a hash", "x")


def test_password_rules_and_tokens() -> None:
    with pytest.raises(ValueError, match="at least 10 characters"):
        check_password_rules("short")
    check_password_rules("long enough pw")
    assert digest("abc") == hashlib.sha256(b"abc").hexdigest()
    assert same_token("a", "a") and not same_token("a", "b") and not same_token(None, "a")


def test_settings_validate_and_keep_a_secret_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threshold must be a probability"):
        Settings(threshold=2.0)
    with pytest.raises(ServiceError, match="max_file_bytes must be a positive"):
        Settings(max_file_bytes=0)
    s = Settings(data_dir=tmp_path / "d").resolved()
    assert s.data_dir.is_absolute() and s.url == f"sqlite:///{s.data_dir / 'marrowscope.db'}"
    key_file = s.data_dir / SECRET_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert Settings(data_dir=tmp_path / "d").resolved().secret_key == s.secret_key  # reused


def test_image_store_is_content_addressed_and_never_overwrites(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    sha, rel = store.put(b"abc", "png")
    assert sha == hashlib.sha256(b"abc").hexdigest() and rel == f"images/{sha[:2]}/{sha}.png"
    path = store.path(rel)
    assert path.read_bytes() == b"abc" and not (path.stat().st_mode & 0o222)  # read-only
    assert store.put(b"abc", "png") == (sha, rel)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    with pytest.raises(ValueError, match="not inside the image store"):
        store.path("../secret_key")


def test_uploads_in_flight_setting_is_validated() -> None:
    assert Settings().max_uploads_in_flight == 4
    assert Settings(max_uploads_in_flight=1).max_uploads_in_flight == 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ServiceError, match="max_uploads_in_flight must be a positive"):
            Settings(max_uploads_in_flight=bad)  # type: ignore[arg-type]
