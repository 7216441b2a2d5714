"""Passwords (argon2), random tokens and their stored digests, CSRF token comparison."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = [
    "MIN_PASSWORD",
    "check_password_rules",
    "digest",
    "hash_password",
    "new_token",
    "same_token",
    "verify_password",
]

MIN_PASSWORD = 10
"""Shortest accepted password."""

_hasher = PasswordHasher()
# A fixed hash to verify against when a username does not exist (same time as a real check).
_DUMMY = _hasher.hash("marrowscope-no-such-user")


def check_password_rules(password: str) -> None:
    """Raise ``ValueError`` naming the rule a new password breaks."""
    if len(password) < MIN_PASSWORD:
        raise ValueError(
            f"the password must have at least {MIN_PASSWORD} characters (got {len(password)})"
        )
    if password.strip() != password:
        raise ValueError("the password must not start or end with spaces")


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (salted; the string includes the parameters)."""
    return _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """True when ``password`` matches the ``stored`` hash; ``stored=None`` (no such user) takes
    as long as a real check and returns False."""
    try:
        return _hasher.verify(stored or _DUMMY, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_token(nbytes: int = 32) -> str:
    """A URL-safe random token (``nbytes`` of entropy)."""
    return secrets.token_urlsafe(nbytes)


def digest(token: str) -> str:
    """Hex SHA-256 of a token: what the database stores instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def same_token(a: str | None, b: str | None) -> bool:
    """Constant-time comparison; False when either is missing."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
