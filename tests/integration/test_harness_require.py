"""CI cannot pass by skipping: the REQUIRE variables turn a missing database or browser into a
failed session; without them the same tests skip and say why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HARNESS_PARENT = Path(__file__).resolve().parents[1]  # tests/, which holds harness/

INNER_TESTS = """
def test_needs_postgres(postgres_url):
    assert postgres_url

def test_needs_browser(browser):
    assert browser.version
"""


def _run_inner_session(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest in a subprocess on two tests using the fixtures, with only the harness plugin."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (tmp_path / "test_inner.py").write_text(INNER_TESTS, encoding="utf-8")
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MARROWSCOPE_TEST_", "MARROWSCOPE_REQUIRE_", "MARROWSCOPE_CHROMIUM"))
    }
    clean["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = (
        "1"  # only the harness: faster, nothing else interferes
    )
    clean["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(HARNESS_PARENT), clean.get("PYTHONPATH")])
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "harness.plugin",
            "-p",
            "no:cacheprovider",
            "-rs",
            "-q",
            "test_inner.py",
        ],
        cwd=tmp_path,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_requirements_missing_things_are_skipped_with_the_reason(tmp_path: Path) -> None:
    result = _run_inner_session(tmp_path, MARROWSCOPE_CHROMIUM=str(tmp_path / "no-chromium"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 skipped" in result.stdout
    assert "MARROWSCOPE_TEST_DATABASE_URL is not set" in result.stdout
    assert "is not an executable file" in result.stdout


def test_required_postgres_without_a_url_fails_the_session(tmp_path: Path) -> None:
    result = _run_inner_session(tmp_path, MARROWSCOPE_REQUIRE_POSTGRES="1")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "MARROWSCOPE_REQUIRE_POSTGRES=1 but MARROWSCOPE_TEST_DATABASE_URL is not set" in (
        result.stderr
    )


def test_required_postgres_that_does_not_answer_fails_the_session(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    result = _run_inner_session(
        tmp_path,
        MARROWSCOPE_REQUIRE_POSTGRES="1",
        MARROWSCOPE_TEST_DATABASE_URL="postgresql+psycopg://u:topsecret@127.0.0.1:1/db",
    )
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "cannot connect to postgresql+psycopg://u:***@127.0.0.1:1/db" in result.stderr
    assert "topsecret" not in result.stdout + result.stderr


def test_required_browser_that_is_missing_fails_the_session(tmp_path: Path) -> None:
    result = _run_inner_session(
        tmp_path,
        MARROWSCOPE_REQUIRE_BROWSER="1",
        MARROWSCOPE_CHROMIUM=str(tmp_path / "no-chromium"),
    )
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "MARROWSCOPE_REQUIRE_BROWSER=1 but MARROWSCOPE_CHROMIUM=" in result.stderr
