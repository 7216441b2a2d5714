"""Request dependencies: database session, the model, the logged-in user, CSRF and roles.

Use them through the ``Annotated`` aliases (``DB``, ``Viewer``, ``Editor``, ``Signer``,
``Admin``, ``Model``, ``PredictorDep`` ...) so a test can swap any of them with
``app.dependency_overrides``.

Authentication: a bearer token (``Authorization: Bearer ...``, API tokens made by an admin or
``marrowscope users token``) or the login cookie. The cookie is signed (itsdangerous, through
Starlette's ``SessionMiddleware``, HttpOnly, SameSite=Lax) and carries only a random session id;
the session lives in the database, so logout ends it for good. Every state-changing request
made with the cookie must carry the session's CSRF token (form field ``csrf_token`` or header
``X-CSRF-Token``); token requests need none (a browser never sends them by itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from marrowscope.service.db import Database
from marrowscope.service.models import ApiToken, LoginSession, User, utcnow
from marrowscope.service.security import digest, same_token
from marrowscope.service.settings import Settings
from marrowscope.service.storage import ImageStore
from marrowscope.service.throttle import LoginThrottle
from marrowscope.service.worker import ClassificationWorker, ModelHandle

if TYPE_CHECKING:
    from marrowscope.inference.predictor import Predictor

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "DB",
    "SAFE_METHODS",
    "DatabaseDep",
    "LoginThrottleDep",
    "Admin",
    "BearerToken",
    "CsrfFailed",
    "Editor",
    "LoginRequired",
    "Model",
    "Principal",
    "PredictorDep",
    "SettingsDep",
    "Signer",
    "Store",
    "Viewer",
    "Worker",
    "bearer_token",
    "current_principal",
    "find_principal",
    "get_db",
    "get_model",
    "get_predictor",
    "get_settings",
    "get_store",
    "get_worker",
]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SESSION_KEY = "sid"


class LoginRequired(Exception):
    """No valid login: 401 for the API, a redirect to the login page for pages."""


class CsrfFailed(Exception):
    """A cookie-authenticated change without the right CSRF token: 403."""


class RoleRequired(Exception):
    """The user's role does not allow this: 403."""


@dataclass(frozen=True)
class Principal:
    """Who makes the request.

    Attributes:
        user: the account.
        via: ``session`` (login cookie) or ``token`` (bearer token).
        csrf: the login session's CSRF token (``None`` for tokens).
        session_id: the login session's key (``None`` for tokens).
    """

    user: User
    via: str
    csrf: str | None = None
    session_id: str | None = None


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def get_database(request: Request) -> Database:
    """The app's database."""
    return request.app.state.db


def get_db(request: Request) -> Iterator[Session]:
    """A session for this request; read-only requests never take the SQLite write lock.

    Endpoints make their changes, build what they answer, then commit once; anything not
    committed is rolled back. For a change request the write transaction (the SQLite write
    lock) starts at the first query, so slow work goes before it; reads after the commit run
    in a read-only transaction (:meth:`.db.Database.session`).
    """
    db: Database = request.app.state.db
    session = db.session(write=request.method not in SAFE_METHODS)
    try:
        yield session
    finally:
        session.close()


def get_login_throttle(request: Request) -> LoginThrottle:
    """The app's failed-login throttle."""
    return request.app.state.login_throttle


def get_model(request: Request) -> ModelHandle:
    """The model handle (the one predictor, its lock and info)."""
    return request.app.state.model


def get_predictor(request: Request) -> Predictor:
    """The one :class:`~marrowscope.inference.predictor.Predictor` of the app."""
    return request.app.state.model.predictor


def get_store(request: Request) -> ImageStore:
    """The content-addressed image store."""
    return request.app.state.store


def get_worker(request: Request) -> ClassificationWorker:
    """The background classifier."""
    return request.app.state.worker


DB = Annotated[Session, Depends(get_db)]
DatabaseDep = Annotated[Database, Depends(get_database)]
"""The app's :class:`~.db.Database`, for a handler that opens its own short transactions."""
LoginThrottleDep = Annotated[LoginThrottle, Depends(get_login_throttle)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
Model = Annotated[ModelHandle, Depends(get_model)]
PredictorDep = Annotated[Any, Depends(get_predictor)]
"""The one Predictor (typed ``Any`` so FastAPI does not try to model it)."""
Store = Annotated[ImageStore, Depends(get_store)]
Worker = Annotated[ClassificationWorker, Depends(get_worker)]


bearer_token = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API token (made by an admin, or `marrowscope users token NAME`).",
)
"""``Authorization: Bearer TOKEN`` (``None`` without one: another header, or none, means the
login cookie is checked instead). The scheme's name is the one the OpenAPI schema declares."""

BearerToken = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_token)]


def _active(user: User | None) -> User | None:
    """``user`` when it exists (its row may have been deleted under a token) and is active."""
    return user if user is not None and user.active else None


def find_principal(database: Database, token: str | None, sid: str | None) -> Principal | None:
    """Who a bearer ``token`` or a login cookie's session id ``sid`` belongs to, or ``None``.

    A token is checked alone (a wrong token is no login, whatever the cookie says). Both are
    looked up in one short read-only session; the returned user is detached with its columns
    loaded. ``None``: the token is unknown or revoked, the session is unknown, ended or
    expired, or the account is disabled or its row is gone.
    """
    with database.read() as db:
        if token is not None:
            row = db.scalar(
                select(ApiToken).where(
                    ApiToken.token_hash == digest(token), ApiToken.revoked_at.is_(None)
                )
            )
            user = _active(row.user if row is not None else None)
            return Principal(user=user, via="token") if user is not None else None
        if isinstance(sid, str) and sid:
            key = digest(sid)
            session = db.get(LoginSession, key)
            if session is not None and session.ended_at is None and session.expires_at > utcnow():
                user = _active(session.user)
                if user is not None:
                    return Principal(
                        user=user, via="session", csrf=session.csrf_token, session_id=key
                    )
    return None


def current_principal(request: Request, bearer: BearerToken) -> Principal:
    """The logged-in user (bearer token or login cookie).

    The lookup runs in its own short read-only session (:func:`find_principal`), so the
    request's own session (and, on SQLite, the write lock) starts only when the endpoint touches
    the database.

    Raises:
        LoginRequired: no valid token or login session (also when the user's account is
            deactivated or its row is gone).
    """
    token = bearer.credentials if bearer is not None else None
    principal = find_principal(request.app.state.db, token, request.session.get(SESSION_KEY))
    if principal is None:
        raise LoginRequired("invalid or revoked API token" if token else "login required")
    return principal


async def _submitted_csrf(request: Request) -> str | None:
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


async def checked_principal(
    request: Request, principal: Annotated[Principal, Depends(current_principal)]
) -> Principal:
    """The logged-in user, with the CSRF token checked for a cookie-authenticated change.

    Raises:
        CsrfFailed: missing or wrong CSRF token.
    """
    if (
        request.method not in SAFE_METHODS
        and principal.via == "session"
        and not same_token(await _submitted_csrf(request), principal.csrf)
    ):
        raise CsrfFailed(
            "missing or wrong CSRF token; reload the page and try again (API clients: send "
            f"the {CSRF_HEADER} header, or use a bearer token)"
        )
    return principal


def _role(role: str):  # type: ignore[no-untyped-def]
    def check(principal: Annotated[Principal, Depends(checked_principal)]) -> Principal:
        if not principal.user.can(role):
            raise RoleRequired(
                f"{principal.user.username} is a {principal.user.role}; this needs the {role} role"
            )
        return principal

    check.__name__ = f"require_{role}"
    return check


Viewer = Annotated[Principal, Depends(current_principal)]
"""Any logged-in user (read-only requests)."""
Editor = Annotated[Principal, Depends(checked_principal)]
"""Any logged-in user making a change (CSRF checked for cookie logins)."""
Signer = Annotated[Principal, Depends(_role("signer"))]
Admin = Annotated[Principal, Depends(_role("admin"))]
