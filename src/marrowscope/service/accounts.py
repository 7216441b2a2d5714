"""Accounts: creating users and API tokens (shared by the admin page and the CLI)."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from marrowscope.service.models import ROLES, ApiToken, User
from marrowscope.service.review import Conflict, Invalid, NotFound
from marrowscope.service.security import check_password_rules, digest, hash_password, new_token

__all__ = ["create_user", "find_user", "issue_token"]


def create_user(db: Session, username: str, role: str, password: str) -> User:
    """Create an account (shared by the admin page and ``marrowscope users create``).

    Raises:
        Invalid: a bad user name, role or password. Conflict: the user exists.
    """
    name = username.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", name):
        raise Invalid(
            f"user name {username!r} is not accepted: use 1-64 letters, digits, '.', '_', '@' or '-'"
        )
    if role not in ROLES:
        raise Invalid(f"role {role!r} is not one of: {', '.join(ROLES)}")
    try:
        check_password_rules(password)
    except ValueError as e:
        raise Invalid(str(e)) from None
    if db.scalar(select(User.id).where(User.username == name)) is not None:
        raise Conflict(f"user {name!r} exists already")
    user = User(username=name, password_hash=hash_password(password), role=role, active=True)
    db.add(user)
    db.flush()
    return user


def issue_token(db: Session, user: User, name: str = "") -> str:
    """A new API token for ``user``; only its digest is stored, so show it now or never."""
    token = new_token()
    db.add(ApiToken(user_id=user.id, token_hash=digest(token), name=name[:100]))
    db.flush()
    return token


def find_user(db: Session, username: str) -> User:
    """The user called ``username``.

    Raises:
        NotFound: no such user.
    """
    user = db.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user {username!r}; create it with: marrowscope users create {username}")
    return user
