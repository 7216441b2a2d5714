"""``marrowscope serve`` (the review app) and ``marrowscope users`` (accounts and API tokens).

Registered by :mod:`marrowscope.cli.main`; the web stack is imported inside the commands so
``--help`` stays instant.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from marrowscope.defaults import DEFAULT_DETECTOR

__all__ = ["serve", "users_app"]

T = TypeVar("T")

users_app = typer.Typer(
    help="Accounts of the review app: create, list, disable and enable users; issue and revoke "
    "API tokens.",
    no_args_is_help=True,
)

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="MARROWSCOPE_DATA_DIR",
        help="Folder for uploaded images, the SQLite database and the cookie key.",
    ),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="MARROWSCOPE_DATABASE_URL",
        help="SQLAlchemy URL (default: SQLite in the data folder), e.g. "
        "postgresql+psycopg://user:pass@host/db.",
    ),
]
DEFAULT_DATA_DIR = Path("marrowscope-data")
MAX_ID = 2**31 - 1
"""The largest id the database holds (as ``marrowscope.service.web.MAX_ID``; not imported from
there so ``--help`` stays instant)."""


def _run(fn: Callable[[], T]) -> T:
    """The CLI's error handling, plus the review app's own user errors."""
    from marrowscope.cli.main import _run as run_command
    from marrowscope.cli.main import err_console
    from marrowscope.service.review import AppError
    from marrowscope.service.settings import ServiceError

    def body() -> T:
        try:
            return fn()
        except (ServiceError, AppError) as e:
            err_console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    return run_command(body)


def serve(
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint",
            "-c",
            help="Checkpoint bundle folder (RUN_DIR/best) or a shipped model name (bm8).",
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    backend: Annotated[
        str,
        typer.Option(
            help="torch, onnx (after `marrowscope export CK`) or int8 (after `marrowscope "
            "export CK --format int8`; needs marrowscope\\[int8]). Grad-CAM needs torch."
        ),
    ] = "torch",
    threshold: Annotated[
        float, typer.Option(help="Top probability below which a cell is unidentified.")
    ] = 0.5,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    secure_cookies: Annotated[
        bool, typer.Option(help="Send the login cookie over HTTPS only (behind a TLS proxy).")
    ] = False,
    detector: Annotated[
        str,
        typer.Option(
            help="Field detector for samples uploaded as whole fields of view: a shipped name "
            "('marrowscope models' lists them), classical, or a detector bundle folder."
        ),
    ] = DEFAULT_DETECTOR,
) -> None:
    """Start the clinician review app (web pages + JSON API) on the given checkpoint."""

    def body() -> None:
        import uvicorn

        from marrowscope.cli.main import console
        from marrowscope.inference.fields import FieldDetector
        from marrowscope.inference.predictor import Predictor
        from marrowscope.service.app import create_app
        from marrowscope.service.settings import ServiceError, Settings

        try:  # checked now (it loads in a fraction of a second), not at the first field
            FieldDetector.load(detector)
        except Exception as e:
            raise ServiceError(
                f"--detector {detector}: {e}; use a shipped name ('marrowscope models' lists "
                "them), classical or a detector bundle folder"
            ) from None
        settings = Settings(
            detector=detector,
            checkpoint=checkpoint,
            data_dir=data_dir,
            database_url=database_url,
            device=device,
            backend=backend,
            threshold=threshold,
            batch_size=batch_size,
            secure_cookies=secure_cookies,
        )
        predictor = Predictor.from_checkpoint(
            checkpoint, device=device, backend=backend, batch_size=batch_size
        )
        app = create_app(settings, predictor=predictor)
        model = predictor.model_name_
        if model != predictor.arch:
            model = f"{model}, {predictor.arch}"
        console.print(
            f"marrowscope review on http://{host}:{port}  (model {model}; classes "
            f"{', '.join(predictor.classes_)}; data in {Path(data_dir).resolve()})"
        )
        if not _has_users(data_dir, database_url):
            store = "--database-url (the same)" if database_url else f"--data-dir {data_dir}"
            console.print(
                "no account yet: create the first one with marrowscope users create NAME "
                f"--role admin {store}"
            )
        uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)

    _run(body)


def _has_users(data_dir: Path, database_url: str | None) -> bool:
    """Whether the review app's database holds any account (else serve says how to make one)."""
    from sqlalchemy import func, select

    from marrowscope.service.models import User

    with _database(data_dir, database_url) as db, db.read() as s:
        return bool(s.scalar(select(func.count(User.id))))


@contextlib.contextmanager
def _database(data_dir: Path, database_url: str | None):  # type: ignore[no-untyped-def]
    """The review app's database, migrated; disposed of when the block ends."""
    from marrowscope.service.db import Database, migrate
    from marrowscope.service.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=database_url)
    if database_url is None:
        settings = settings.resolved()
    db = Database(settings.url)
    try:
        migrate(db)
        yield db
    finally:
        db.dispose()


@users_app.command("create")
def users_create(
    username: Annotated[str, typer.Argument(help="User name (letters, digits, . _ @ -).")],
    role: Annotated[str, typer.Option(help="reviewer, signer or admin.")] = "reviewer",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a user (the first admin, say); the password is prompted for (or read from stdin)."""

    def body() -> None:
        from marrowscope.cli.main import console
        from marrowscope.service import review
        from marrowscope.service.accounts import create_user

        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        with _database(data_dir, database_url) as db, db.write() as s:
            user = create_user(s, username, role, password)
            review.audit(
                s, None, "user.create", new={"username": user.username, "role": role},
                username="cli",
            )  # fmt: skip
        console.print(f"created {role} {username}")

    _run(body)


@users_app.command("token")
def users_token(
    username: Annotated[str, typer.Argument(help="The user the token acts as.")],
    name: Annotated[str, typer.Option(help="A label for the token.")] = "cli",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Issue an API bearer token for a user and print it (only its hash is stored)."""

    def body() -> None:
        from marrowscope.service import review
        from marrowscope.service.accounts import find_user, issue_token

        with _database(data_dir, database_url) as db, db.write() as s:
            user = find_user(s, username)
            token = issue_token(s, user, name)
            review.audit(
                s, None, "token.create", new={"username": username, "name": name},
                username="cli",
            )  # fmt: skip
        typer.echo(token)

    _run(body)


def _when(value: object) -> str:
    """A stored timestamp as ``YYYY-MM-DD HH:MM UTC``."""
    return f"{value:%Y-%m-%d %H:%M} UTC"


@users_app.command("list")
def users_list(data_dir: DataDir = DEFAULT_DATA_DIR, database_url: DatabaseUrl = None) -> None:
    """List the accounts (name, role, active or disabled) and their API tokens (id, label,
    created, revoked). Never prints a password, token or token hash."""

    def body() -> None:
        from marrowscope.service.accounts import list_users, user_tokens

        lines: list[str] = []
        with _database(data_dir, database_url) as db, db.read() as s:
            users = list_users(s)
            width = max((len(u.username) for u in users), default=0)
            for user in users:
                state = "active" if user.active else "disabled"
                lines.append(
                    f"{user.username:<{width}}  {user.role:<8}  {state:<8}  "
                    f"created {_when(user.created_at)}"
                )
                tokens = user_tokens(s, user)
                if not tokens:
                    lines.append("  no API tokens")
                for t in tokens:
                    revoked = (
                        f"revoked {_when(t.revoked_at)}"
                        if t.revoked_at
                        else "active"
                        if user.active
                        else "not revoked (refused while the account is disabled)"
                    )
                    lines.append(
                        f"  token {t.id} {t.name!r}  created {_when(t.created_at)}, {revoked}"
                    )
        if not lines:
            lines.append(
                "no users yet; create the first with: marrowscope users create NAME --role admin"
            )
        typer.echo("\n".join(lines))

    _run(body)


@users_app.command("disable")
def users_disable(
    username: Annotated[str, typer.Argument(help="The user to disable.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Disable a user at once: its password and API tokens are refused from the next request
    on and its open login sessions are ended (`users enable` lets it log in again)."""

    def body() -> None:
        from marrowscope.service import review
        from marrowscope.service.accounts import disable_user, find_user

        with _database(data_dir, database_url) as db, db.write() as s:
            user = find_user(s, username)
            role = user.role
            ended = disable_user(s, user)
            if ended is not None:
                review.audit(
                    s, None, "user.disable",
                    new={"username": user.username, "sessions_ended": ended}, username="cli",
                )  # fmt: skip
        if ended is None:
            typer.echo(f"{role} {username} was disabled already")
        else:
            typer.echo(
                f"disabled {role} {username}: {ended} login session(s) ended; its password and "
                f"API tokens are refused until: marrowscope users enable {username}"
            )

    _run(body)


@users_app.command("enable")
def users_enable(
    username: Annotated[str, typer.Argument(help="The user to enable again.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Enable a disabled user again: its password and its unrevoked API tokens work again (the
    login sessions ended by `users disable` stay ended)."""

    def body() -> None:
        from marrowscope.service import review
        from marrowscope.service.accounts import enable_user, find_user

        with _database(data_dir, database_url) as db, db.write() as s:
            user = find_user(s, username)
            role = user.role
            changed = enable_user(s, user)
            if changed:
                review.audit(
                    s, None, "user.enable", new={"username": user.username}, username="cli"
                )
        typer.echo(
            f"enabled {role} {username}" if changed else f"{role} {username} is active already"
        )

    _run(body)


@users_app.command("revoke-token")
def users_revoke_token(
    username: Annotated[str, typer.Argument(help="The user whose API tokens to revoke.")],
    token_id: Annotated[
        int | None,
        typer.Option(
            "--token-id",
            min=1,
            max=MAX_ID,
            help="Revoke only this token (its id, as `marrowscope users list` shows).",
        ),
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke every API token of a user, or only the one given with --token-id. A revoked token
    is refused from the next request on, for good (issue a new one with `users token`)."""

    def body() -> None:
        from marrowscope.service import review
        from marrowscope.service.accounts import find_user, revoke_tokens

        with _database(data_dir, database_url) as db, db.write() as s:
            user = find_user(s, username)
            revoked = revoke_tokens(s, user, token_id)
            for t in revoked:
                review.audit(
                    s, None, "token.revoke",
                    new={"username": user.username, "token_id": t.id, "name": t.name},
                    username="cli",
                )  # fmt: skip
            done = [f"{t.id} ({t.name!r})" for t in revoked]
        if not done:
            typer.echo(f"{username} has no active API token; nothing to revoke")
        else:
            n = len(done)
            typer.echo(
                f"revoked {n} API token{'s' if n != 1 else ''} of {username}: {', '.join(done)}"
            )

    _run(body)
