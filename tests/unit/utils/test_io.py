"""Atomic writes: what a report and what a file marrowscope reads back do with a file name that
is not UTF-8."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from marrowscope.utils.io import atomic_write_json, atomic_write_text


def test_names_that_are_not_utf8_are_escaped_in_reports_and_kept_exactly_elsewhere(
    tmp_path: Path,
) -> None:
    """A file name with a Latin-1 byte: a report (``escape=True``) shows the byte as ``\\xe9``
    and stays valid UTF-8; JSON without it keeps the exact name (it reads back to the same
    file); text without it refuses to write a name it cannot keep."""
    name = os.fsdecode(b"caf\xe9.jpg")
    atomic_write_text(tmp_path / "r.csv", f"path\n{name}\n", escape=True)
    assert (tmp_path / "r.csv").read_text(encoding="utf-8") == "path\ncaf\\xe9.jpg\n"
    atomic_write_json(tmp_path / "r.json", {"path": name}, escape=True)
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {"path": "caf\\xe9.jpg"}
    atomic_write_json(tmp_path / "m.json", {"path": name})
    back = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["path"]
    assert os.fsencode(back) == b"caf\xe9.jpg"
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(tmp_path / "m.csv", name)
    assert not (tmp_path / "m.csv").exists()
