"""The browser fixture drives Debian's Chromium (not a downloaded one) against a local page."""

from __future__ import annotations

import functools
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from harness.browser import find_chromium

pytestmark = [pytest.mark.integration, pytest.mark.browser]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>harness</title></head>
<body>
  <p id="status">waiting</p>
  <button id="go" type="button">Load</button>
  <script>
    let clicks = 0;
    document.getElementById("go").addEventListener("click", async () => {
      clicks += 1;
      const data = await (await fetch("data.json")).json();   // a second request to the server
      document.getElementById("status").textContent = `${data.word} ${clicks}`;
    });
  </script>
</body></html>
"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass


@pytest.fixture
def static_site(tmp_path: Path) -> Iterator[str]:
    """An index page and a JSON file served by http.server from a thread; yields the base URL."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(PAGE, encoding="utf-8")
    (site / "data.json").write_text('{"word": "clicked"}', encoding="utf-8")
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_click_changes_the_page_through_javascript(page, static_site: str) -> None:
    page.goto(static_site)
    assert page.title() == "harness"
    assert page.text_content("#status") == "waiting"

    page.click("#go")
    page.wait_for_function("document.getElementById('status').textContent !== 'waiting'")
    assert page.text_content("#status") == "clicked 1"

    page.click("#go")
    page.wait_for_function("document.getElementById('status').textContent === 'clicked 2'")
    assert page.text_content("#status") == "clicked 2"


def test_the_browser_is_the_system_chromium(browser) -> None:
    printed = subprocess.run(
        [str(find_chromium()), "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    # "Chromium 156.0.8078.108 built on Debian ..." -> the launched browser reports the same build
    assert browser.version in printed.split()
