"""Debian's Chromium, driven by Playwright (the PyPI package; no browser is ever downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from playwright.sync_api import Browser, Playwright

__all__ = ["CHROMIUM_ARGS", "DEFAULT_CHROMIUM", "BrowserUnavailable", "find_chromium", "launch"]

DEFAULT_CHROMIUM = "/usr/bin/chromium"
"""Where Debian's ``chromium`` package puts the browser."""

CHROMIUM_ARGS = (
    "--no-sandbox",  # Chromium's sandbox cannot start as root (CI runs as root) or in most containers
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm; use /tmp instead
    "--disable-gpu",  # no GPU on the test machines
)
"""Extra switches; Playwright adds its own (no first run, no background networking, no sync...)."""


class BrowserUnavailable(RuntimeError):
    """Chromium or Playwright is missing; the message names what to install."""


def find_chromium() -> Path:
    """The Chromium executable: ``$MARROWSCOPE_CHROMIUM``, else Debian's ``/usr/bin/chromium``.

    Raises:
        BrowserUnavailable: it is not there (the message names the Debian package).
    """
    configured = os.environ.get("MARROWSCOPE_CHROMIUM")
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrowserUnavailable(f"MARROWSCOPE_CHROMIUM={configured} is not an executable file")
        return path
    if os.access(DEFAULT_CHROMIUM, os.X_OK):
        return Path(DEFAULT_CHROMIUM)
    found = shutil.which("chromium")
    if found:
        return Path(found)
    raise BrowserUnavailable(
        f"Chromium not found at {DEFAULT_CHROMIUM}: install Debian's package "
        "(apt-get install chromium) or set MARROWSCOPE_CHROMIUM to a Chromium executable"
    )


def check_playwright() -> None:
    """Raises :class:`BrowserUnavailable` when the ``playwright`` package cannot be imported."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        raise BrowserUnavailable(
            f"the Python package 'playwright' is not installed ({err}): pip install -e '.[dev]'"
        ) from err


def launch(playwright: Playwright, *, executable: Path | None = None, **kwargs: Any) -> Browser:
    """Launch headless Chromium (the system one) with the switches a root container needs.

    Args:
        playwright: a started ``sync_playwright()`` object.
        executable: the browser; default :func:`find_chromium`.
        **kwargs: more ``BrowserType.launch`` options (``args`` are appended to ours).

    Returns:
        The Playwright ``Browser``.
    """
    args = [*CHROMIUM_ARGS, *kwargs.pop("args", [])]
    return playwright.chromium.launch(
        executable_path=str(executable or find_chromium()),
        headless=kwargs.pop("headless", True),
        args=args,
        **kwargs,
    )
