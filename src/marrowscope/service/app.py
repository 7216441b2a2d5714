"""The app factory: ``create_app(settings)`` builds the FastAPI app of the review service.

The lifespan opens the database (running the Alembic migrations), loads the Predictor once
(unless one is passed in: tests inject a tiny model), and starts the background classifier,
which first picks up any cells a previous run left pending. Routes: :mod:`.pages` (HTML) and
:mod:`.api` (JSON under ``/api``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import marrowscope
from marrowscope.service import api, pages
from marrowscope.service.db import Database, migrate
from marrowscope.service.deps import CsrfFailed, LoginRequired, RoleRequired
from marrowscope.service.review import AppError
from marrowscope.service.settings import Settings
from marrowscope.service.storage import ImageStore
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


class _Guard:
    """Pure ASGI middleware: refuses bodies over the limit (413) and adds security headers."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            body = json.dumps(
                {"detail": f"request body above the {self.max_body:,}-byte limit; upload fewer "
                 "or smaller files at a time"}
            ).encode()  # fmt: skip
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    return {"type": "http.disconnect"}
            return message

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"content-security-policy", _CSP.encode()),
                ]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, counted, secured)


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
        db = Database(settings.url)
        try:
            if settings.migrate:
                migrate(db)
            pred = predictor
            if pred is None:
                from marrowscope.inference.predictor import Predictor

                assert settings.checkpoint is not None
                pred = Predictor.from_checkpoint(
                    settings.checkpoint, device=settings.device, batch_size=settings.batch_size
                )
            model = ModelHandle(pred)
            store = ImageStore(settings.data_dir)
            worker = ClassificationWorker(db, store, model, settings.batch_size)
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
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.secret_key or "",
        session_cookie=COOKIE,
        max_age=int(settings.session_hours * 3600),
        same_site="lax",
        https_only=settings.secure_cookies,
    )
    app.add_middleware(_Guard, max_body=settings.max_request_bytes)
    app.mount("/static", StaticFiles(packages=[("marrowscope.service", "static")]), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    _install_handlers(app)
    return app
