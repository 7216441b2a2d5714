"""Accounts: users, API tokens and login sessions (shared by the pages, the API and the CLI).

Every request checks, in the database, that its login session is open and unexpired or its API
token is not revoked, and that the account is active (:func:`.deps.current_principal`), so
:func:`disable_user` and :func:`revoke_tokens` take effect on the very next request.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from marrowscope.service.db import Database
from marrowscope.service.models import ROLES, ApiToken, LoginSession, User, utcnow
from marrowscope.service.review import Conflict, Invalid, NotFound, audit
from marrowscope.service.security import (
    check_password_rules,
    digest,
    hash_password,
    new_token,
    verify_password,
)

__all__ = [
    "create_user",
    "disable_user",
    "enable_user",
    "end_session",
    "find_user",
    "get_user",
    "issue_token",
    "list_users",
    "log_in",
    "login_candidate",
    "record_throttled",
    "revoke_tokens",
    "start_session",
    "user_tokens",
]


def create_user(db: Session, username: str, role: str, password: str) -> User:
    """Create an account (shared by the admin page and ``marrowscope users create``).

    The password is hashed before the first query, so a caller that has not touched ``db`` yet
    does not hold the database's write lock during the (slow) argon2 hash.

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
    hashed = hash_password(password)  # the slow part, before this transaction's first query
    if db.scalar(select(User.id).where(User.username == name)) is not None:
        raise Conflict(f"user {name!r} exists already")
    user = User(username=name, password_hash=hashed, role=role, active=True)
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


def get_user(db: Session, user_id: int) -> User:
    """The user with id ``user_id``.

    Raises:
        NotFound: no such user.
    """
    user = db.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} does not exist")
    return user


def list_users(db: Session) -> Sequence[User]:
    """Every account, by user name."""
    return db.scalars(select(User).order_by(User.username)).all()


def login_candidate(db: Session, username: str) -> User | None:
    """The account a login form names (``None``: an empty name, a NUL, no such user); reads only."""
    name = username.strip()
    if not name or "\x00" in name:
        return None
    return db.scalar(select(User).where(User.username == name))


def log_in(
    database: Database, username: str, password: str, *, hours: float, address: str = ""
) -> str | None:
    """Check ``password`` and, when it is right, start a login session of ``hours`` (audited).

    Three steps, so no database lock is held during the slow argon2 check: the account is read
    in a short read-only transaction; the password is checked outside any transaction (an
    unknown name takes as long as a wrong password: no guessing names by timing); then one short
    write transaction starts the session (checking the account is still active) or, for an
    existing account, records the failed try (``login.failed``, with the client ``address``).

    Returns:
        The new session's random id for the login cookie, or ``None`` (wrong name or password,
        or the account is disabled).
    """
    with database.read() as db:
        user = login_candidate(db, username)
    ok = verify_password(user.password_hash if user else None, password)
    if user is None:
        return None
    with database.write() as db:
        active = db.scalar(select(User.active).where(User.id == user.id))  # as of now
        if active is None:  # the account's row was deleted meanwhile
            return None
        if ok and active:
            return start_session(db, user, hours=hours)
        audit(db, user, "login.failed", new={"address": address})
    return None


def record_throttled(database: Database, username: str, **details: Any) -> None:
    """Audit a burst of refused logins (``login.throttled``) once, under the account it aimed at
    (``anonymous`` when no such account exists); ``details`` are stored with it."""
    name = username.strip()[:200]
    with database.write() as db:
        user = login_candidate(db, name)
        audit(
            db, user, "login.throttled", new={"username": name, **details},
            username=None if user else "anonymous",
        )  # fmt: skip


def start_session(db: Session, user: User, *, hours: float) -> str:
    """Start a login session of ``hours`` for ``user`` (audited).

    Returns:
        The session's random id, for the login cookie; the database keeps only its digest.
    """
    sid = new_token()
    now = utcnow()
    db.add(
        LoginSession(
            id=digest(sid),
            user_id=user.id,
            csrf_token=new_token(),
            created_at=now,
            expires_at=now + timedelta(hours=hours),
        )
    )
    audit(db, user, "login")
    return sid


def end_session(db: Session, user: User, session_key: str | None) -> None:
    """End the login session stored under ``session_key`` (``None``: a token login, nothing to
    end) and audit the logout."""
    if session_key:
        row = db.get(LoginSession, session_key)
        if row is not None:
            row.ended_at = utcnow()
    audit(db, user, "logout")


def disable_user(db: Session, user: User) -> int | None:
    """Disable ``user``: its password, API tokens and login sessions are refused from the next
    request on. Its open login sessions are also ended for good (enabling the account again
    does not revive them); its tokens are only suspended (:func:`enable_user` restores them;
    :func:`revoke_tokens` ends them for good).

    Returns:
        How many open login sessions were ended; ``None`` when the account was disabled already
        (nothing changes).
    """
    if not user.active:
        return None
    user.active = False
    now = utcnow()
    sessions = db.scalars(
        select(LoginSession).where(LoginSession.user_id == user.id, LoginSession.ended_at.is_(None))
    ).all()
    for row in sessions:
        row.ended_at = now
    db.flush()
    return len(sessions)


def enable_user(db: Session, user: User) -> bool:
    """Enable ``user`` again (password and unrevoked tokens work again); False when it was
    active already."""
    if user.active:
        return False
    user.active = True
    db.flush()
    return True


def user_tokens(db: Session, user: User) -> Sequence[ApiToken]:
    """The user's API tokens, oldest first (revoked ones included)."""
    return db.scalars(
        select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)
    ).all()


def revoke_tokens(db: Session, user: User, token_id: int | None = None) -> list[ApiToken]:
    """Revoke the user's API token ``token_id``, or (``None``) every token of the user not
    revoked yet. A revoked token is refused from the next request on, for good.

    Returns:
        The tokens revoked now (empty when the user had no active token).

    Raises:
        NotFound: ``token_id`` is not a token of this user. Conflict: it is revoked already.
    """
    now = utcnow()
    if token_id is not None:
        token = db.scalar(
            select(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user.id)
        )
        if token is None:
            raise NotFound(
                f"user {user.username!r} has no API token {token_id}; see its tokens with: "
                "marrowscope users list"
            )
        if token.revoked_at is not None:
            raise Conflict(
                f"API token {token_id} of {user.username!r} was revoked already, on "
                f"{token.revoked_at:%Y-%m-%d %H:%M} UTC"
            )
        tokens = [token]
    else:
        tokens = [t for t in user_tokens(db, user) if t.revoked_at is None]
    for token in tokens:
        token.revoked_at = now
    db.flush()
    return tokens
