"""The app factory: ``create_app(settings)`` builds the FastAPI app of the review service.

The lifespan opens the database (running the Alembic migrations), loads the Predictor once
(unless one is passed in: tests inject a tiny model), removes what interrupted uploads left in
the image store (:meth:`~.storage.ImageStore.sweep`), and starts the background classifier,
which first picks up any cells a previous run left pending. Routes: :mod:`.pages` (HTML) and
:mod:`.api` (JSON under ``/api``).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security.utils import get_authorization_scheme_param
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import marrowscope
from marrowscope.service import api, pages
from marrowscope.service.db import Database, migrate
from marrowscope.service.deps import (
    SAFE_METHODS,
    SESSION_KEY,
    CsrfFailed,
    LoginRequired,
    RoleRequired,
    find_principal,
)
from marrowscope.service.models import Cell, Field
from marrowscope.service.review import AppError
from marrowscope.service.settings import Settings
from marrowscope.service.storage import SWEEP_GRACE_SECONDS, ImageStore
from marrowscope.service.throttle import LoginThrottle
from marrowscope.service.web import FlashStore
from marrowscope.service.worker import ClassificationWorker, ModelHandle

if TYPE_CHECKING:
    from marrowscope.inference.predictor import Predictor

__all__ = ["COOKIE", "create_app"]

COOKIE = "marrowscope_session"
"""Name of the signed login cookie."""

_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)


_UPLOAD_ROUTES = re.compile(
    r"^/api/samples/[^/]+/(cells|fields)$|^/samples/[^/]+/upload$|^/api/predict$"
)
"""The routes that take files (``POST``): only they accept bodies up to ``max_request_bytes``."""


class _Guard:
    """Pure ASGI middleware: request body limits per route (413) and security headers.

    The limit of a request is chosen before its body is read (the middleware sits inside the
    session middleware, so it sees the login cookie's session id):

    - ``POST`` to an upload route: ``max_request_bytes`` (1 GiB by default);
    - any other route: ``max_form_body`` (1 MiB by default; the login form: the anonymous limit);
    - no valid login (no bearer token or login session, or one the database does not know):
      ``max_anonymous_body`` (16 KiB by default). The login is looked up (one short read) only
      when the body may be larger than that, before a byte of it is read.

    A body whose declared ``Content-Length`` is over the limit is refused at once, unread. A body
    without a length (chunked) is counted as it arrives; at the first byte over the limit
    reading stops and the request is answered 413 naming the limit (JSON for the API, an error
    page for pages), as for a declared length.

    At most ``max_uploads_in_flight`` logged-in uploads are received and processed at once,
    server-wide (this app): one more is answered 503 with ``Retry-After`` at once, before its
    body is read. Its slot is taken when it passes the checks above and given back when the app
    is done with it (answered, failed, or the client went away). The count is a plain integer:
    the middleware runs in the event loop, and nothing awaits between its check and its update.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_upload = settings.max_request_bytes
        self.max_form = min(settings.max_form_body, self.max_upload)
        self.max_anonymous = min(settings.max_anonymous_body, self.max_form)
        self.max_in_flight = settings.max_uploads_in_flight
        self.in_flight = 0

    def _limit(self, scope: Scope) -> tuple[int, str]:
        """The body limit of the request's route (for a logged-in client) and its advice."""
        method, path = scope["method"], scope["path"]
        if method == "POST" and _UPLOAD_ROUTES.match(path):
            return self.max_upload, "upload fewer or smaller files at a time"
        if method == "POST" and path == "/login":
            return self.max_anonymous, "this is far more than a login form holds"
        if method in SAFE_METHODS:
            return self.max_anonymous, "send no body with this method"
        return self.max_form, "send less at a time"

    async def _logged_in(self, scope: Scope) -> bool:
        """Whether the request carries a bearer token or login session the database knows."""
        headers = Headers(scope=scope)
        scheme, token = get_authorization_scheme_param(headers.get("authorization"))
        bearer = token if scheme.lower() == "bearer" and token else None
        sid = scope.get("session", {}).get(SESSION_KEY)
        if bearer is None and not sid:
            return False
        database = scope["app"].state.db
        return await run_in_threadpool(find_principal, database, bearer, sid) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message_out: Message) -> None:
            if message_out["type"] == "http.response.start":
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"content-security-policy", _CSP.encode()),
                ]
                message_out["headers"] = list(message_out.get("headers", [])) + extra
            await send(message_out)

        limit, advice = self._limit(scope)
        declared = Headers(scope=scope).get("content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if declared is not None and length is None:
            length = limit + 1  # a malformed length: refused like one over the limit
        whose = ""
        is_upload = scope["method"] == "POST" and bool(_UPLOAD_ROUTES.match(scope["path"]))
        may_be_large = length is None or length > self.max_anonymous
        # an upload's login is always looked up: only logged-in uploads take a slot
        if (
            limit > self.max_anonymous
            and (may_be_large or is_upload)
            and not await self._logged_in(scope)
        ):
            limit, whose = self.max_anonymous, " for requests without a login"
            advice = "log in first (a valid bearer token or the login cookie)"
            is_upload = False
        message = f"request body above the {limit:,}-byte limit{whose}; {advice}"
        if length is not None and length > limit:
            await JSONResponse({"detail": message}, status_code=413)(scope, receive, secured)
            return
        if is_upload and self.in_flight >= self.max_in_flight:
            await _too_many_uploads(self.max_in_flight, scope)(scope, receive, secured)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message_in = await receive()
            if message_in["type"] == "http.request":
                seen += len(message_in.get("body", b""))
                if seen > limit:
                    # Raised into the body parser: FastAPI passes an HTTPException on as it is,
                    # and the app's handler answers it (JSON or an error page).
                    raise StarletteHTTPException(413, message)
            return message_in

        if not is_upload:
            await self.app(scope, counted, secured)
            return
        self.in_flight += 1
        try:
            await self.app(scope, counted, secured)
        finally:
            self.in_flight -= 1


UPLOAD_RETRY_AFTER = 5
"""Seconds a client is asked to wait (``Retry-After``) when too many uploads are in flight (503)."""


def _too_many_uploads(cap: int, scope: Scope) -> Response:
    """The 503 for one upload over ``max_uploads_in_flight``: JSON for the API, else a page."""
    uploads = "upload is" if cap == 1 else "uploads are"
    message = (
        f"{cap} {uploads} already in progress on this server; try again in {UPLOAD_RETRY_AFTER} s"
    )
    headers = {"Retry-After": str(UPLOAD_RETRY_AFTER)}
    request = Request(scope)
    if _is_api(request):
        return JSONResponse({"detail": message}, status_code=503, headers=headers)
    response = _page_error(request, 503, message)
    response.headers.update(headers)
    return response


BUSY_RETRY_AFTER = 5
"""Seconds a client is asked to wait (``Retry-After``) when the database is busy (503)."""

_BUSY_SQLSTATES = {"55P03", "40001", "40P01"}
"""PostgreSQL: lock not available (lock_timeout), serialization failure, deadlock."""


def _is_busy(exc: OperationalError) -> bool:
    """True for a lock that was not granted in time (SQLite's "database is locked", PostgreSQL's
    lock timeout, a deadlock): the transaction was rolled back and a retry may succeed."""
    if getattr(exc.orig, "sqlstate", None) in _BUSY_SQLSTATES:
        return True
    return "database is locked" in str(exc.orig) or "database table is locked" in str(exc.orig)


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/api"


def _page_error(request: Request, status: int, message: str) -> Response:
    return pages.render(request, "error.html", None, status, status=status, message=message)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> Response:
        if _is_api(request):
            return JSONResponse(
                {"detail": f"{exc}: send 'Authorization: Bearer TOKEN' or log in at /login"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        from urllib.parse import quote

        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(CsrfFailed)
    async def _csrf(request: Request, exc: CsrfFailed) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return _page_error(request, 403, str(exc))

    @app.exception_handler(RoleRequired)
    async def _role(request: Request, exc: RoleRequired) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return _page_error(request, 403, str(exc))

    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        return _page_error(request, exc.status, str(exc))

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _busy(request: Request, exc: Exception) -> Response:
        if isinstance(exc, OperationalError) and not _is_busy(exc):
            raise exc  # a real database failure: a 500, logged with its traceback
        message = "the database is busy; nothing was changed, try again in a few seconds"
        headers = {"Retry-After": str(BUSY_RETRY_AFTER)}
        if _is_api(request):
            return JSONResponse({"detail": message}, status_code=503, headers=headers)
        response = _page_error(request, 503, message)
        response.headers.update(headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        if _is_api(request):
            return JSONResponse({"detail": errors}, status_code=422)
        text = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in errors
        )
        return _page_error(request, 422, f"the form was not filled in correctly ({text})")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if _is_api(request) or exc.status_code == 405:
            return JSONResponse(
                {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
            )
        return _page_error(request, exc.status_code, str(exc.detail))


def _sweep(db: Database, store: ImageStore, started: float) -> None:
    """The startup sweep: remove the files interrupted uploads left in the image store (never
    one a cell or a field refers to, nor one modified in the grace period before the start)."""
    with db.read() as s:
        referenced = set(s.scalars(select(Cell.stored_path)))
        referenced |= set(s.scalars(select(Field.stored_path)))
    store.sweep(referenced, before=started - SWEEP_GRACE_SECONDS)


def create_app(settings: Settings, *, predictor: Predictor | None = None) -> FastAPI:
    """Build the review app.

    Args:
        settings: see :class:`~marrowscope.service.settings.Settings`.
        predictor: an already loaded predictor (tests, or the CLI after checking the
            checkpoint); ``None`` loads ``settings.checkpoint`` in the lifespan.

    Raises:
        ServiceError: no checkpoint and no predictor; the data folder cannot be created.
    """
    from marrowscope.service.settings import ServiceError

    if predictor is None and settings.checkpoint is None:
        raise ServiceError("the review app needs a model: pass --checkpoint RUN_DIR/best")
    settings = settings.resolved()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.time()
        db = Database(
            settings.url,
            lock_timeout=settings.db_lock_timeout,
            connections=settings.db_connections,
        )
        try:
            if settings.migrate:
                migrate(db)
            pred = predictor
            if pred is None:
                from marrowscope.inference.predictor import Predictor

                assert settings.checkpoint is not None
                pred = Predictor.from_checkpoint(
                    settings.checkpoint,
                    device=settings.device,
                    backend=settings.backend,
                    batch_size=settings.batch_size,
                )
            model = ModelHandle(pred)
            store = ImageStore(settings.data_dir)
            _sweep(db, store, started)
            worker = ClassificationWorker(
                db, store, model, settings.batch_size, detector=settings.detector
            )
            app.state.db, app.state.model, app.state.store = db, model, store
            app.state.worker = worker
            worker.start()
            try:
                yield
            finally:
                worker.stop()
        finally:
            db.dispose()

    app = FastAPI(
        title="marrowscope review",
        version=marrowscope.__version__,
        summary="Review, re-classify and sign off single-cell bone-marrow differential counts.",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.flash = FlashStore()
    app.state.login_throttle = LoginThrottle(
        window=settings.login_window_seconds,
        per_account=settings.login_failures_per_account,
        per_address=settings.login_failures_per_address,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes.setdefault("bearer", {"type": "http", "scheme": "bearer"})
            schemes["cookie"] = {"type": "apiKey", "in": "cookie", "name": COOKIE}
            schema["security"] = [{"bearer": []}, {"cookie": []}]
            # A route that needs a login names the bearer token (deps.bearer_token); the login
            # cookie works wherever the token does.
            for item in schema["paths"].values():
                for operation in item.values():
                    security = operation.get("security", [])
                    if {"bearer": []} in security and {"cookie": []} not in security:
                        security.append({"cookie": []})
            schema["paths"]["/api/health"]["get"]["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Added first, so it runs inside the session middleware and sees the login cookie's session.
    app.add_middleware(_Guard, settings=settings)
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.secret_key or "",
        session_cookie=COOKIE,
        max_age=int(settings.session_hours * 3600),
        same_site="lax",
        https_only=settings.secure_cookies,
    )
    app.mount("/static", StaticFiles(packages=[("marrowscope.service", "static")]), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    _install_handlers(app)
    return app
