"""Settings of the review app: one frozen dataclass, built by ``marrowscope serve`` or a test."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

from marrowscope.defaults import DEFAULT_DETECTOR
from marrowscope.metrics.counting import (
    DEFAULT_EVIDENCE,
    DEFAULT_HAC_MIN_COUNT,
    DEFAULT_HAC_MIN_PERCENT,
    DEFAULT_THRESHOLD,
    check_settings,
)

__all__ = ["DB_NAME", "SECRET_NAME", "ServiceError", "Settings", "default_database_url"]

DB_NAME = "marrowscope.db"
"""The SQLite file inside the data folder (used when no --database-url is given)."""

MAX_FIELD_PIXELS = 50_000_000
"""The detector's own field limit (:data:`marrowscope.preprocess.fields.MAX_FIELD_PIXELS`,
repeated here so that settings import no image code; a unit test keeps the two equal)."""

SECRET_NAME = "secret_key"
"""File inside the data folder holding the cookie-signing key (created on first start, 0600)."""


class ServiceError(ValueError):
    """The app cannot start or a request cannot be served as asked; the message says why."""


def default_database_url(data_dir: Path) -> str:
    """``sqlite:///DATA_DIR/marrowscope.db`` (absolute path)."""
    return f"sqlite:///{(Path(data_dir).expanduser().resolve() / DB_NAME).as_posix()}"


@dataclass(frozen=True)
class Settings:
    """Everything the app needs to start.

    Attributes:
        checkpoint: the model bundle folder (``None`` only when a predictor is passed to
            :func:`~marrowscope.service.app.create_app`).
        data_dir: where uploaded images, the SQLite file and the cookie key live.
        database_url: SQLAlchemy URL; default SQLite in ``data_dir``. PostgreSQL:
            ``postgresql+psycopg://user:pass@host/db``.
        secret_key: cookie-signing key; default read from (or created in) ``data_dir``.
        device: ``auto``, ``cpu`` or ``cuda`` for the model.
        backend: ``torch``, ``onnx`` or ``int8`` (the model's exported copy; Grad-CAM needs
            ``torch``).
        batch_size: images per forward pass of the background classifier.
        threshold: top probability below which a cell goes to the unidentified bin.
        hac_min_percent: hairy-cell flag percentage rule (as ``marrowscope count``).
        hac_min_count: hairy-cell flag count rule.
        evidence: HAC cells shown as evidence for the flag.
        max_file_bytes: largest accepted image file (also per zip member).
        max_pixels: largest accepted image (width x height).
        max_field_pixels: largest accepted whole field of view (width x height); at most the
            detector's own limit, 50,000,000 pixels. Larger fields are refused with the limit
            named (the detector processes big fields in overlapping tiles).
        detector: the field detector: a shipped name (``wbc2``, the default, or ``wbc1``),
            ``classical`` or a detector bundle folder.
        max_request_bytes: largest accepted request body of an upload route (all files of one
            upload), from a logged-in client.
        max_form_body: largest accepted request body of any other route (JSON, forms), from a
            logged-in client.
        max_anonymous_body: largest accepted request body without a valid login (the login
            form included); a larger one is refused before it is read.
        max_uploads_in_flight: most logged-in uploads (requests to an upload route) the server
            receives and processes at once; a further one is answered 503 with ``Retry-After``
            before its body is read.
        max_files: most images in one upload (zip members included).
        max_zip_members: most entries in one zip file.
        max_zip_total_bytes: largest total uncompressed size of one zip file.
        max_zip_ratio: largest compression ratio of a zip member (zip bombs compress ~1000:1).
        session_hours: how long a login lasts.
        secure_cookies: send the session cookie over HTTPS only (behind a TLS proxy).
        migrate: run the Alembic migrations (``upgrade head``) on start.
        db_lock_timeout: seconds a database write waits for a lock (the SQLite write lock, a
            PostgreSQL row lock) before the request fails.
        db_connections: most database connections the app opens (more than the server's 40
            request threads plus the background classifier, so no request waits for one).
        login_window_seconds: how long a failed login counts against its account name and its
            client address.
        login_failures_per_account: most failed logins for one account name within the window;
            further tries are answered 429 without checking the password.
        login_failures_per_address: most failed logins from one client address within the
            window (all names together).
    """

    checkpoint: Path | None = None
    data_dir: Path = Path("marrowscope-data")
    database_url: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    device: str = "auto"
    backend: str = "torch"
    batch_size: int = 32
    threshold: float = DEFAULT_THRESHOLD
    hac_min_percent: float = DEFAULT_HAC_MIN_PERCENT
    hac_min_count: int = DEFAULT_HAC_MIN_COUNT
    evidence: int = DEFAULT_EVIDENCE
    max_file_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_field_pixels: int = MAX_FIELD_PIXELS
    detector: str = DEFAULT_DETECTOR
    max_request_bytes: int = 1024 * 1024 * 1024
    max_form_body: int = 1024 * 1024
    max_anonymous_body: int = 16 * 1024
    max_uploads_in_flight: int = 4
    max_files: int = 5000
    max_zip_members: int = 5000
    max_zip_total_bytes: int = 2 * 1024 * 1024 * 1024
    max_zip_ratio: float = 100.0
    session_hours: float = 12.0
    secure_cookies: bool = False
    migrate: bool = True
    db_lock_timeout: float = 30.0
    db_connections: int = 60
    login_window_seconds: float = 300.0
    login_failures_per_account: int = 5
    login_failures_per_address: int = 30

    def __post_init__(self) -> None:
        check_settings(self.threshold, self.hac_min_percent, self.hac_min_count, self.evidence)
        for name in (
            "batch_size",
            "max_file_bytes",
            "max_pixels",
            "max_field_pixels",
            "max_request_bytes",
            "max_form_body",
            "max_anonymous_body",
            "max_uploads_in_flight",
            "max_files",
            "max_zip_members",
            "max_zip_total_bytes",
            "db_connections",
            "login_failures_per_account",
            "login_failures_per_address",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServiceError(f"setting {name} must be a positive whole number; got {value!r}")
        if self.max_field_pixels > MAX_FIELD_PIXELS:
            raise ServiceError(
                f"setting max_field_pixels must be at most {MAX_FIELD_PIXELS:,} (the detector's "
                f"limit); got {self.max_field_pixels!r}"
            )
        if not self.max_zip_ratio > 1:
            raise ServiceError(f"setting max_zip_ratio must be > 1; got {self.max_zip_ratio!r}")
        if not self.login_window_seconds > 0:
            raise ServiceError(
                f"setting login_window_seconds must be > 0; got {self.login_window_seconds!r}"
            )
        if not self.db_lock_timeout > 0:
            raise ServiceError(f"setting db_lock_timeout must be > 0; got {self.db_lock_timeout!r}")
        if not self.session_hours > 0:
            raise ServiceError(f"setting session_hours must be > 0; got {self.session_hours!r}")

    @property
    def url(self) -> str:
        """The database URL in use."""
        return self.database_url or default_database_url(self.data_dir)

    def resolved(self) -> Settings:
        """A copy with ``data_dir`` absolute and created, and a ``secret_key`` (from the data
        folder; a new random key is written there, readable by the owner only, on first start).
        """
        data_dir = Path(self.data_dir).expanduser().resolve()
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ServiceError(
                f"cannot create the data folder {data_dir} ({e.strerror}); pass a writable "
                "--data-dir"
            ) from None
        key = self.secret_key or os.environ.get("MARROWSCOPE_SECRET_KEY") or _stored_key(data_dir)
        return replace(self, data_dir=data_dir, secret_key=key)


def _stored_key(data_dir: Path) -> str:
    path = data_dir / SECRET_NAME
    if path.is_file():
        key = path.read_text(encoding="ascii").strip()
        if len(key) >= 32:
            return key
    key = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key + "\n")
    return key
