"""``marrowscope serve`` (the review app) and ``marrowscope users`` (accounts and API tokens).

Registered by :mod:`marrowscope.cli.main`; the web stack is imported inside the commands so
``--help`` stays instant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

__all__ = ["serve", "users_app"]

T = TypeVar("T")

users_app = typer.Typer(
    help="Accounts of the review app: create users, issue API tokens.", no_args_is_help=True
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
        Path, typer.Option("--checkpoint", "-c", help="Checkpoint bundle folder (RUN_DIR/best) or a shipped model name (bm8).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threshold: Annotated[
        float, typer.Option(help="Top probability below which a cell is unidentified.")
    ] = 0.5,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    secure_cookies: Annotated[
        bool, typer.Option(help="Send the login cookie over HTTPS only (behind a TLS proxy).")
    ] = False,
) -> None:
    """Start the clinician review app (web pages + JSON API) on the given checkpoint."""

    def body() -> None:
        import uvicorn

        from marrowscope.cli.main import console
        from marrowscope.inference.predictor import Predictor
        from marrowscope.service.app import create_app
        from marrowscope.service.settings import Settings

        settings = Settings(
            checkpoint=checkpoint,
            data_dir=data_dir,
            database_url=database_url,
            device=device,
            threshold=threshold,
            batch_size=batch_size,
            secure_cookies=secure_cookies,
        )
        predictor = Predictor.from_checkpoint(checkpoint, device=device, batch_size=batch_size)
        app = create_app(settings, predictor=predictor)
        console.print(
            f"marrowscope review on http://{host}:{port}  (model {predictor.arch}, classes "
            f"{', '.join(predictor.classes_)}; data in {Path(data_dir).resolve()})"
        )
        console.print(
            "first time? create an account: marrowscope users create NAME --role admin "
            f"--data-dir {data_dir}"
        )
        uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)

    _run(body)


def _database(data_dir: Path, database_url: str | None):  # type: ignore[no-untyped-def]
    from marrowscope.service.db import Database, migrate
    from marrowscope.service.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=database_url)
    if database_url is None:
        settings = settings.resolved()
    db = Database(settings.url)
    migrate(db)
    return db


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
        db = _database(data_dir, database_url)
        try:
            with db.write() as s:
                user = create_user(s, username, role, password)
                review.audit(
                    s, None, "user.create", new={"username": user.username, "role": role},
                    username="cli",
                )  # fmt: skip
        finally:
            db.dispose()
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

        db = _database(data_dir, database_url)
        try:
            with db.write() as s:
                user = find_user(s, username)
                token = issue_token(s, user, name)
                review.audit(
                    s, None, "token.create", new={"username": username, "name": name},
                    username="cli",
                )  # fmt: skip
        finally:
            db.dispose()
        typer.echo(token)

    _run(body)
