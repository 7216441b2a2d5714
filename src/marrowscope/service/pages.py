"""The HTML pages: login, samples, the review gallery (reject a cell that is not to be counted),
a field of view (its cells' boxes drawn; reject a detection, click to add a missed cell), audit
trail, report and user admin.

Server-rendered Jinja2 (autoescaped) with one small script (``static/app.js``, no build step)
for progress polling, keyboard re-classification and bulk selection; every action also works
as a plain form post. Errors are shown as messages on the page, never as a traceback.

The forms that change a sample or its cells are judged by the very pydantic models the JSON API
uses (:mod:`.schemas`: ``SampleIn``, ``SampleUpdate``, ``Reclassify``), so a form accepts
exactly what the API accepts; a refused form is a message on the page naming each bad field
with the API's own wording (see :func:`form_model`).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

import marrowscope
from marrowscope.defaults import DEFAULT_CAM_LABEL, DEFAULT_CAM_METHOD
from marrowscope.reports.count_report import CELL_NAMES, DISCLAIMER, count_bar_chart_svg
from marrowscope.service import accounts, review
from marrowscope.service.deps import (
    DB,
    SESSION_KEY,
    Admin,
    DatabaseDep,
    Editor,
    LoginThrottleDep,
    Model,
    Principal,
    SettingsDep,
    Store,
    Viewer,
    Worker,
)
from marrowscope.service.models import AGE_BANDS, REFERRAL_QUESTIONS, ROLES
from marrowscope.service.schemas import Point, Reclassify, SampleIn, SampleUpdate
from marrowscope.service.security import new_token, same_token
from marrowscope.service.storage import ImageStore
from marrowscope.service.throttle import Refusal
from marrowscope.service.uploads import validate_files
from marrowscope.service.web import Id, report_download

__all__ = ["SHORTCUT_KEYS", "form_model", "invalid_form_message", "render", "router", "templates"]

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(files("marrowscope.service") / "templates"))
templates.env.filters["pct"] = lambda v, d=1: f"{float(v):.{d}f}%"
templates.env.filters["prob"] = lambda v: "—" if v is None else f"{int(float(v) * 100 + 1e-9)}%"
templates.env.filters["dt"] = lambda v: "" if v is None else f"{v:%Y-%m-%d %H:%M} UTC"
templates.env.globals["cam_label"] = DEFAULT_CAM_LABEL

SHORTCUT_KEYS = "1234567890qwertyuiopasdfghlzxcvbnm"
"""Keys that re-classify the selected cells, assigned to the classes in model order."""

FLASH_MAX = 50
"""Refused files named one by one on the page after a form upload (the rest are counted)."""
COOKIE_FLASH_MAX = 3
COOKIE_FLASH_CHARS = 200
LOGIN_CSRF = "login_csrf"


def flash(request: Request, who: Principal | None, message: str, level: str = "info") -> None:
    """Queue a message for the user's next page.

    With a login session the messages stay on the server (:class:`.web.FlashStore`, keyed by
    the session), so the cookie never grows. Without one (a bearer token on a page) at most
    :data:`COOKIE_FLASH_MAX` short messages go in the cookie and the rest are only counted.
    """
    if who is not None and who.session_id:
        request.app.state.flash.add(who.session_id, message, level)
        return
    items = list(request.session.get("flash", []))
    if len(items) < COOKIE_FLASH_MAX:
        request.session["flash"] = [*items, [level, message[:COOKIE_FLASH_CHARS]]]
    else:
        request.session["flash_more"] = int(request.session.get("flash_more", 0)) + 1


def _messages(request: Request, who: Principal | None) -> list[list[str]]:
    """The queued messages for this page (taken: each is shown once)."""
    messages = list(request.session.pop("flash", []))
    more = request.session.pop("flash_more", 0)
    if more:
        messages.append(["error", f"... and {more} more message(s)"])
    if who is not None and who.session_id:
        messages += request.app.state.flash.pop(who.session_id)
    return messages


def render(
    request: Request, name: str, who: Principal | None, status_code: int = 200, **ctx: Any
) -> HTMLResponse:
    """Render a page with the user, CSRF token and queued messages."""
    context = {
        "user": who.user if who else None,
        "csrf": who.csrf if who else None,
        "version": marrowscope.__version__,
        "cell_names": CELL_NAMES,
        **ctx,
    }
    if "messages" not in context:
        context["messages"] = _messages(request, who)
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


@contextmanager
def _shown_on_page(request: Request, db: Session, who: Principal) -> Iterator[None]:
    """Turn a refused form change into a message on the next page instead of an error page.

    An :class:`~marrowscope.service.review.AppError` raised in the block rolls the transaction
    back, is flashed, and is swallowed, so the handler goes on after the ``with`` block, where it
    redirects back to the form's page::

        with _shown_on_page(request, db, who):
            ...  # change through the review service, db.commit(), flash, maybe return
        return _redirect(back)
    """
    try:
        yield
    except review.AppError as e:
        db.rollback()
        flash(request, who, str(e), "error")


def _safe_next(target: str | None) -> str:
    """Only same-site paths (no scheme, no host, no //) are followed after login."""
    if not target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


M = TypeVar("M", bound=BaseModel)

_MAX_PROBLEMS = 5


def invalid_form_message(err: ValidationError) -> str:
    """A refused form as one line: each bad field (``collected on``, ``cell ids (item 2)``)
    with the message the API gives for it in its 422 answer."""
    problems = []
    for e in err.errors():
        loc = e.get("loc") or ()
        field = str(loc[0]).replace("_", " ") if loc else "form"
        if len(loc) > 1 and isinstance(loc[1], int):
            field += f" (item {loc[1] + 1})"
        problems.append(f"{field}: {str(e['msg']).removeprefix('Value error, ')}")
    more = len(problems) - _MAX_PROBLEMS
    text = "; ".join(problems[:_MAX_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
    return f"not saved: {text}"


def form_model(model: type[M], data: dict[str, Any]) -> M:
    """``data`` (a form's fields) judged by ``model``, the API's request model.

    Raises:
        Invalid: a field the API would refuse (422); the message names each bad field, and
            :func:`_shown_on_page` shows it on the form's page.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise review.Invalid(invalid_form_message(e)) from None


def _clean(value: str | None) -> str | None:
    if value is not None and ("\x00" in value or re.search(r"[\ud800-\udfff]", value)):
        raise review.Invalid("text must not contain NUL characters or invalid Unicode")
    return value


# ------------------------------------------------------------------------------------- login


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/") -> HTMLResponse:
    token = request.session.get(LOGIN_CSRF) or new_token(16)
    request.session[LOGIN_CSRF] = token
    return render(request, "login.html", None, login_csrf=token, next=_safe_next(next))


def client_address(request: Request) -> str:
    """The client's IP address as the server sees it (behind a proxy: the proxy's)."""
    return request.client.host if request.client else "unknown"


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    database: DatabaseDep,
    settings: SettingsDep,
    throttle: LoginThrottleDep,
    username: Annotated[str, Form(max_length=200)] = "",
    password: Annotated[str, Form(max_length=1000)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    """Check the password, start a login session (audited), go to ``next``.

    Too many failed logins for the account name or from the client address within the window
    (:class:`.throttle.LoginThrottle`) are answered 429 with ``Retry-After`` before any password
    check; the first refusal of a burst is audited (``login.throttled``). No database
    transaction is open while the password is checked (:func:`.accounts.log_in`).
    """
    if not same_token(csrf_token, request.session.get(LOGIN_CSRF)):
        return Response("missing or wrong CSRF token; reload the login page", status_code=403)
    address = client_address(request)
    token = new_token(16)
    request.session[LOGIN_CSRF] = token
    attempt = throttle.attempt(username.strip(), address)
    if isinstance(attempt, Refusal):
        if attempt.first:
            accounts.record_throttled(
                database, username, scope=attempt.scope, address=address,
                failures=attempt.failures, retry_after=attempt.retry_after,
            )  # fmt: skip
        whose = "this account" if attempt.scope == "account" else "your address"
        message = f"too many failed logins for {whose}; try again in {attempt.retry_after} seconds"
        page = render(
            request, "login.html", None, 429, login_csrf=token, next=_safe_next(next),
            messages=[["error", message]],
        )  # fmt: skip
        page.headers["Retry-After"] = str(attempt.retry_after)
        return page
    sid = accounts.log_in(
        database, username, password, hours=settings.session_hours, address=address
    )
    if sid is None:
        return render(
            request, "login.html", None, 401, login_csrf=token, next=_safe_next(next),
            messages=[["error", "wrong user name or password"]],
        )  # fmt: skip
    throttle.succeeded(attempt)
    request.session.clear()
    request.session[SESSION_KEY] = sid
    return _redirect(_safe_next(next))


@router.post("/logout")
def logout(request: Request, who: Editor, db: DB) -> RedirectResponse:
    """End the login session (audited)."""
    accounts.end_session(db, who.user, who.session_id)
    db.commit()
    if who.session_id:
        request.app.state.flash.pop(who.session_id)  # messages never shown are dropped
    request.session.clear()
    return _redirect("/login")


# ----------------------------------------------------------------------------------- samples


@router.get("/", response_class=HTMLResponse)
def samples_page(request: Request, who: Viewer, db: DB) -> HTMLResponse:
    return render(
        request,
        "samples.html",
        who,
        samples=review.list_samples(db),
        age_bands=AGE_BANDS,
        referrals=REFERRAL_QUESTIONS,
    )


@router.post("/samples")
def create_sample_form(
    request: Request,
    who: Editor,
    db: DB,
    code: Annotated[str, Form()] = "",
    collected_on: Annotated[str, Form()] = "",
    age_band: Annotated[str, Form()] = "unknown",
    referral_question: Annotated[str, Form()] = "",
    notes: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """Create a sample; the fields are judged by the API's ``SampleIn`` (an empty date or
    referral question = none)."""
    with _shown_on_page(request, db, who):
        body = form_model(
            SampleIn,
            {
                "code": code.strip(),
                "collected_on": collected_on or None,
                "age_band": age_band,
                "referral_question": referral_question or None,
                "notes": notes,
            },
        )
        sample = review.create_sample(db, who.user, review.SampleFields(**body.model_dump()))
        db.commit()
        flash(request, who, f"sample {sample.code} created; now upload its cell images")
        return _redirect(f"/samples/{sample.id}")
    return _redirect("/")


def _groups(cells: list[Any], classes: tuple[str, ...], threshold: float) -> list[dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = {c: [] for c in classes}
    extra: dict[str, list[dict[str, Any]]] = {
        "unidentified": [],
        "pending": [],
        "failed": [],
        "rejected": [],
    }
    for cell in cells:
        view = review.cell_view(cell, classes, threshold)
        label = view["label"]
        if view["rejected"]:
            extra["rejected"].append(view)
        elif label:
            by[label].append(view)
        elif cell.status == "pending":
            extra["pending"].append(view)
        elif cell.status == "error":
            extra["failed"].append(view)
        else:
            extra["unidentified"].append(view)
    groups = [
        {
            "key": "unidentified",
            "title": f"Unidentified (top probability below {int(threshold * 100)}%)",
            "cells": sorted(extra["unidentified"], key=lambda v: -(v["confidence"] or 0)),
        }
    ]
    for c in classes:
        groups.append(
            {
                "key": c,
                "title": f"{c} · {CELL_NAMES.get(c, '')}".rstrip(" ·"),
                "cells": sorted(by[c], key=lambda v: -(v["confidence"] or 0)),
            }
        )
    groups.append({"key": "pending", "title": "Being classified", "cells": extra["pending"]})
    groups.append({"key": "failed", "title": "Model could not read", "cells": extra["failed"]})
    groups.append(
        {
            "key": "rejected",
            "title": "Rejected (not counted)",
            "cells": extra["rejected"],
        }
    )
    return groups


@router.get("/samples/{sample_id}", response_class=HTMLResponse)
def sample_page(
    request: Request, sample_id: Id, who: Viewer, db: DB, model: Model, settings: SettingsDep
) -> HTMLResponse:
    sample = review.get_sample(db, sample_id)
    cells = review.sample_cells(db, sample)
    fields = review.sample_fields(db, sample)
    summary = review.summary(sample, cells, model.classes, settings, fields=fields)
    keys = dict(zip(SHORTCUT_KEYS, model.classes, strict=False))
    of_field: dict[int, list[Any]] = {}
    for c in cells:
        if c.field_id is not None:
            of_field.setdefault(c.field_id, []).append(c)
    return render(
        request,
        "sample.html",
        who,
        sample=sample,
        summary=summary,
        groups=_groups(cells, model.classes, settings.threshold),
        fields=[review.field_view(f, of_field.get(f.id, [])) for f in fields],
        details_json=json.dumps(review.sample_details(sample)),
        classes=model.classes,
        keys=keys,
        key_of={c: k for k, c in keys.items()},
        age_bands=AGE_BANDS,
        referrals=REFERRAL_QUESTIONS,
        model=model.info,
    )


def _lines(text: Any) -> Any:
    """Text with the line breaks a browser sends (``\r\n``) as ``\n``, so that notes written
    through the API compare equal to the same notes sent back by the form; other values as they
    are."""
    return text.replace("\r\n", "\n") if isinstance(text, str) else text


def _shown_details(was: str | None) -> dict[str, Any] | None:
    """The sample details the edit form was rendered with (its hidden ``was`` field), or
    ``None`` when the form did not send them (then every sent field is saved)."""
    if not was:
        return None
    try:
        shown = json.loads(was)
    except ValueError:
        raise review.Invalid("the form's hidden state is damaged; reload the page") from None
    if not isinstance(shown, dict):
        raise review.Invalid("the form's hidden state is damaged; reload the page")
    return shown


@router.post("/samples/{sample_id}/edit")
def edit_sample_form(
    request: Request,
    sample_id: Id,
    who: Editor,
    db: DB,
    collected_on: Annotated[str, Form()] = "",
    age_band: Annotated[str, Form()] = "unknown",
    referral_question: Annotated[str, Form()] = "",
    notes: Annotated[str, Form()] = "",
    was: Annotated[str | None, Form()] = None,
) -> RedirectResponse:
    """Change the sample's details; the fields are judged by the API's ``SampleUpdate`` (an
    empty date or referral question empties it).

    ``was`` (a hidden field of the form): the details as the page showed them, as JSON. Only
    the fields the editor changed are saved, and none when one of those was changed by someone
    else since the page was loaded (the editor is told to reload). A post without it (a page
    rendered before it existed) saves every value sent but leaves an empty date alone.
    """
    with _shown_on_page(request, db, who):
        body = form_model(
            SampleUpdate,
            {
                "collected_on": collected_on or None,
                "age_band": age_band,
                "referral_question": referral_question or None,
                "notes": notes,
            },
        )
        sent = {
            "collected_on": body.collected_on.isoformat() if body.collected_on else None,
            "age_band": body.age_band,
            "referral_question": body.referral_question or None,
            "notes": _lines(body.notes),
        }
        shown = _shown_details(was)
        if shown is None:  # a form without its state: every value sent, an empty date kept
            changed = {k for k, v in sent.items() if v is not None or k == "referral_question"}
        else:
            changed = {k for k, v in sent.items() if _lines(shown.get(k)) != v}
        sample = review.get_sample(db, sample_id, lock=True)
        review.update_sample(
            db,
            who.user,
            sample,
            review.SampleFields(
                collected_on=body.collected_on if "collected_on" in changed else None,
                age_band=body.age_band if "age_band" in changed else None,
                referral_question=body.referral_question
                if "referral_question" in changed
                else None,
                notes=sent["notes"] if "notes" in changed else None,
                clear=frozenset(k for k in changed if sent[k] is None),
                seen=None if shown is None else {k: shown.get(k) for k in changed},
            ),
        )
        db.commit()
        flash(request, who, "sample details saved")
    return _redirect(f"/samples/{sample_id}")


@router.post("/samples/{sample_id}/upload")
def upload_form(
    request: Request,
    sample_id: Id,
    who: Editor,
    db: DB,
    database: DatabaseDep,
    settings: SettingsDep,
    store: Store,
    worker: Worker,
    files: Annotated[list[UploadFile], File()],
    kind: Annotated[str, Form(max_length=16)] = "cells",
) -> RedirectResponse:
    """Upload cell images, or (``kind=fields``) whole fields of view whose white cells the
    detector finds in the background."""
    with _shown_on_page(request, db, who):
        if kind not in ("cells", "fields"):
            raise review.Invalid(f"upload kind {kind!r} is not cells or fields")
        review.check_uploadable(database, sample_id)
        fields = kind == "fields"
        accepted, rejected = validate_files(
            ((f.filename or "", f.file) for f in files), settings, fields=fields, store=store
        )
        sample = review.get_sample(db, sample_id, lock=True)
        added: list[Any]
        if fields:
            added, duplicates = review.add_fields(db, who.user, sample, accepted, store)
        else:
            added, duplicates = review.add_cells(db, who.user, sample, accepted, store)
        db.commit()
        if added:
            worker.notify()
        refused = rejected + duplicates
        done = (
            f"{len(added)} field(s) added; their white cells are found and classified in the "
            "background"
            if fields
            else f"{len(added)} cell image(s) added; classification runs in the background"
        )
        flash(request, who, done)
        for r in refused[:FLASH_MAX]:
            flash(request, who, f"refused {r.message}", "error")
        if len(refused) > FLASH_MAX:
            flash(request, who, f"... and {len(refused) - FLASH_MAX} more refused file(s)", "error")
    return _redirect(f"/samples/{sample_id}")


@router.post("/samples/{sample_id}/reclassify")
def reclassify_form(
    request: Request,
    sample_id: Id,
    who: Editor,
    db: DB,
    model: Model,
    settings: SettingsDep,
    cell_ids: Annotated[list[str] | None, Form()] = None,
    label: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """Re-classify the ticked cells; judged by the API's ``Reclassify`` (an empty label =
    confirm each cell's current label)."""
    with _shown_on_page(request, db, who):
        body = form_model(Reclassify, {"cell_ids": cell_ids or [], "label": label or None})
        sample = review.get_sample(db, sample_id, lock=True)
        n = review.reclassify(
            db,
            who.user,
            sample,
            body.cell_ids,
            body.label,
            model.classes,
            threshold=settings.threshold,
        )
        db.commit()
        flash(request, who, f"{n} cell(s) re-classified")
    return _redirect(f"/samples/{sample_id}")


@router.post("/samples/{sample_id}/signoff")
def signoff_form(
    request: Request, sample_id: Id, who: Editor, db: DB, settings: SettingsDep
) -> RedirectResponse:
    with _shown_on_page(request, db, who):
        sample = review.get_sample(db, sample_id, lock=True)
        review.signoff(db, who.user, sample, settings.threshold)
        db.commit()
        flash(request, who, f"sample {sample.code} signed off; it is read-only now")
    return _redirect(f"/samples/{sample_id}")


# -------------------------------------------------------------------------------- cell views


@router.get("/samples/{sample_id}/cells/{cell_id}/panel", response_class=HTMLResponse)
def cell_panel(
    request: Request,
    sample_id: Id,
    cell_id: Id,
    who: Viewer,
    db: DB,
    model: Model,
    settings: SettingsDep,
) -> HTMLResponse:
    sample = review.get_sample(db, sample_id)
    cell = review.get_cell(db, sample, cell_id)
    keys = dict(zip(SHORTCUT_KEYS, model.classes, strict=False))
    return render(
        request,
        "cell_panel.html",
        who,
        sample=sample,
        cell=review.cell_view(cell, model.classes, settings.threshold),
        reject_as=review.reject_reason(cell),
        classes=model.classes,
        key_of={c: k for k, c in keys.items()},
        gradcam=model.info.backend == "torch",
    )


_MEDIA = {"jpg": "image/jpeg", "png": "image/png"}


@router.get("/samples/{sample_id}/cells/{cell_id}/image")
def cell_image(sample_id: Id, cell_id: Id, who: Viewer, db: DB, store: Store) -> Response:
    """The uploaded image (TIFF/BMP are served as PNG, which every browser shows)."""
    sample = review.get_sample(db, sample_id)
    cell = review.get_cell(db, sample, cell_id)
    return _image_response(store, cell.stored_path, cell.sha256)


def _image_response(store: ImageStore, stored_path: str, sha256: str) -> Response:
    """A stored image as the browser shows it: JPEG and PNG as they are, TIFF and BMP converted
    once to PNG and cached."""
    path = store.path(stored_path)
    ext = path.suffix.lstrip(".")
    headers = {"Cache-Control": "private, max-age=86400, immutable"}
    if ext in _MEDIA:
        return FileResponse(path, media_type=_MEDIA[ext], headers=headers)
    cached = store.cache_path("display", f"{sha256}.upright.png")  # EXIF orientation applied
    if not cached.is_file():
        from PIL import Image

        from marrowscope.utils.image import read_image
        from marrowscope.utils.io import atomic_write_bytes

        buf = io.BytesIO()
        Image.fromarray(read_image(path)).save(buf, format="PNG")
        atomic_write_bytes(cached, buf.getvalue())
    return FileResponse(cached, media_type="image/png", headers=headers)


@router.get("/samples/{sample_id}/cells/{cell_id}/gradcam.png")
def cell_gradcam(
    sample_id: Id, cell_id: Id, who: Viewer, db: DB, store: Store, model: Model
) -> Response:
    """The Grad-CAM overlay for the model's predicted class (computed once, then cached)."""
    sample = review.get_sample(db, sample_id)
    cell = review.get_cell(db, sample, cell_id)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", model.info.version)
    from marrowscope.explain.gradcam import ExplainError

    cached = store.cache_path("gradcam", f"{cell.sha256}-{tag}-{DEFAULT_CAM_METHOD}.png")
    if not cached.is_file():
        from marrowscope.utils.io import atomic_write_bytes

        try:
            png = model.gradcam_png(store.path(cell.stored_path))
        except ExplainError as e:
            raise review.Conflict(f"no Grad-CAM for this model: {e}") from None
        atomic_write_bytes(cached, png)
    return FileResponse(
        cached, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
    )


# ------------------------------------------------------------------------------------ fields


@router.get("/samples/{sample_id}/fields/{field_id}", response_class=HTMLResponse)
def field_page(
    request: Request, sample_id: Id, field_id: Id, who: Viewer, db: DB, model: Model
) -> HTMLResponse:
    """A field with every cell's box drawn (rejected ones struck out); a reviewer rejects a
    detection as not a white cell, or clicks on a missed cell to add it."""
    sample = review.get_sample(db, sample_id)
    field = review.get_field(db, sample, field_id)
    cells = review.field_cells(db, field)
    return render(
        request,
        "field.html",
        who,
        sample=sample,
        field=review.field_view(field, cells),
        classes=model.classes,
    )


@router.get("/samples/{sample_id}/fields/{field_id}/image")
def field_image(sample_id: Id, field_id: Id, who: Viewer, db: DB, store: Store) -> Response:
    """The uploaded field (TIFF/BMP are served as PNG, which every browser shows)."""
    sample = review.get_sample(db, sample_id)
    field = review.get_field(db, sample, field_id)
    return _image_response(store, field.stored_path, field.sha256)


@router.post("/samples/{sample_id}/fields/{field_id}/add")
def add_cell_form(
    request: Request,
    sample_id: Id,
    field_id: Id,
    who: Editor,
    database: DatabaseDep,
    db: DB,
    store: Store,
    worker: Worker,
    x: Annotated[str, Form(max_length=32)] = "",
    y: Annotated[str, Form(max_length=32)] = "",
) -> RedirectResponse:
    """Add the cell centred on the point (x, y) of the field (judged by the API's ``Point``)."""
    with _shown_on_page(request, db, who):
        point = form_model(Point, {"x": x or None, "y": y or None})
        cell = review.add_cell_at_point(
            database, db, who.user, sample_id, field_id, (point.x, point.y), store,
            worker.crop_spec(),
        )  # fmt: skip
        db.commit()
        worker.notify()
        flash(request, who, f"cell {cell.id} added; it is classified in the background")
    return _redirect(f"/samples/{sample_id}/fields/{field_id}")


def _back(sample_id: int, field_id: str) -> str:
    return (
        f"/samples/{sample_id}/fields/{int(field_id)}"
        if field_id.isdigit() and len(field_id) < 12
        else f"/samples/{sample_id}"
    )


@router.post("/samples/{sample_id}/cells/{cell_id}/reject")
def reject_form(
    request: Request,
    sample_id: Id,
    cell_id: Id,
    who: Editor,
    db: DB,
    field: Annotated[str, Form(max_length=16)] = "",
) -> RedirectResponse:
    """Reject a cell: a field's cell as not a white cell, an uploaded crop as not a countable
    cell (back to its field page, or the sample)."""
    with _shown_on_page(request, db, who):
        sample = review.get_sample(db, sample_id, lock=True)
        cell = review.reject_cell(db, who.user, sample, cell_id, rejected=True)
        reason = review.reject_reason(cell)
        db.commit()
        flash(request, who, f"cell {cell_id} rejected as {reason}; it is not counted")
    return _redirect(_back(sample_id, field))


@router.post("/samples/{sample_id}/cells/{cell_id}/restore")
def restore_form(
    request: Request,
    sample_id: Id,
    cell_id: Id,
    who: Editor,
    db: DB,
    field: Annotated[str, Form(max_length=16)] = "",
) -> RedirectResponse:
    """Take a rejection back: the cell counts again."""
    with _shown_on_page(request, db, who):
        sample = review.get_sample(db, sample_id, lock=True)
        review.reject_cell(db, who.user, sample, cell_id, rejected=False)
        db.commit()
        flash(request, who, f"cell {cell_id} restored; it counts again")
    return _redirect(_back(sample_id, field))


# ------------------------------------------------------------------------- audit and report


@router.get("/samples/{sample_id}/audit", response_class=HTMLResponse)
def audit_page(request: Request, sample_id: Id, who: Viewer, db: DB) -> HTMLResponse:
    sample = review.get_sample(db, sample_id)
    return render(request, "audit.html", who, sample=sample, events=review.audit_trail(db, sample))


@router.get("/samples/{sample_id}/report", response_class=HTMLResponse)
def report_page(
    request: Request, sample_id: Id, who: Viewer, db: DB, model: Model, settings: SettingsDep
) -> HTMLResponse:
    """The print-ready report of the signed count."""
    sample = review.get_sample(db, sample_id)
    data = review.report_data(db, sample, model.classes, settings, model.info.to_dict())
    rows = [
        {"class": r["class"], "count": r["reviewed_count"], "percent": r["reviewed_percent"]}
        for r in data["differential"]
    ]
    chart = Markup(
        count_bar_chart_svg(rows, highlight=data["flag"]["hac_class"], xlabel="% of reviewed cells")
    )
    return render(
        request, "report.html", who, sample=sample, r=data, chart=chart, disclaimer=DISCLAIMER
    )


@router.get("/samples/{sample_id}/report.csv")
def report_csv_page(
    sample_id: Id, who: Viewer, db: DB, model: Model, settings: SettingsDep
) -> Response:
    """The signed report as a CSV download (the same file as ``/api/...report?format=csv``)."""
    sample = review.get_sample(db, sample_id)
    return report_download(
        review.report_data(db, sample, model.classes, settings, model.info.to_dict())
    )


# ------------------------------------------------------------------------------------- admin


@router.get("/admin/users", response_class=HTMLResponse)
def users_page(request: Request, who: Admin, db: DB) -> HTMLResponse:
    users = accounts.list_users(db)
    return render(request, "admin.html", who, users=users, roles=ROLES, new_token=None)


AUDIT_PAGE_LIMIT = 500


@router.get("/admin/audit", response_class=HTMLResponse)
def account_audit_page(request: Request, who: Admin, db: DB) -> HTMLResponse:
    """Audit events not tied to a sample (logins, logouts, users, tokens), newest first."""
    events = review.account_events(db, limit=AUDIT_PAGE_LIMIT)
    return render(request, "admin_audit.html", who, events=events, limit=AUDIT_PAGE_LIMIT)


@router.post("/admin/users")
def create_user_form(
    request: Request,
    who: Admin,
    db: DB,
    username: Annotated[str, Form(max_length=64)] = "",
    role: Annotated[str, Form(max_length=16)] = "reviewer",
    password: Annotated[str, Form(max_length=1000)] = "",
) -> RedirectResponse:
    with _shown_on_page(request, db, who):
        user = accounts.create_user(db, username, role, password)
        review.audit(db, who.user, "user.create", new={"username": user.username, "role": role})
        db.commit()
        flash(request, who, f"user {user.username} ({role}) created")
    return _redirect("/admin/users")


@router.post("/admin/users/{user_id}/token", response_class=HTMLResponse)
def create_token_form(
    request: Request,
    user_id: Id,
    who: Admin,
    db: DB,
    name: Annotated[str, Form(max_length=100)] = "",
) -> HTMLResponse:
    user = accounts.get_user(db, user_id)
    token = accounts.issue_token(db, user, _clean(name) or "")
    review.audit(db, who.user, "token.create", new={"username": user.username, "name": name})
    users = accounts.list_users(db)
    db.commit()
    return render(
        request,
        "admin.html",
        who,
        users=users,
        roles=ROLES,
        new_token={"user": user.username, "token": token},
    )
