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


def test_two_writers_of_one_file_at_once_both_succeed_and_leave_one_whole_file(
    tmp_path: Path,
) -> None:
    """What the ONNX export relies on (``$MARROWSCOPE_CACHE/onnx/NAME/model.onnx``): each writer
    has a temporary file of its own, and the file is replaced in one rename."""
    import threading

    from marrowscope.utils.io import atomic_write

    target = tmp_path / "onnx" / "bm8" / "model.onnx"
    both_inside = threading.Barrier(2)
    errors: list[BaseException] = []

    def write(tag: bytes) -> None:
        def body(tmp: Path) -> None:
            tmp.write_bytes(tag * 1000)
            both_inside.wait(timeout=30)  # both temporary files written before either is renamed

        try:
            atomic_write(target, body)
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert target.read_bytes() in (b"a" * 1000, b"b" * 1000)
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]


def test_a_killed_writers_temporary_file_goes_with_the_next_write_but_not_a_running_ones(
    tmp_path: Path,
) -> None:
    """An ONNX export killed half-way leaves ``.model.onnx.tmp-HOST-PID-RANDOM``; the next export
    of the same file removes it once its process has ended (an hour unchanged, as for staging
    folders), and never the temporary file of a writer still running."""
    import time

    from conftest import ended_pid

    import marrowscope.utils.io as io_mod
    from marrowscope.utils.io import atomic_write

    target = tmp_path / "model.onnx"
    dead, host = ended_pid(), io_mod._HOST
    killed = tmp_path / f".model.onnx.tmp-{host}-{dead}-0123abcd"
    running = tmp_path / f".model.onnx.tmp-{host}-{os.getppid()}-89abcdef"
    other_file = tmp_path / f".metadata.json.tmp-{host}-{dead}-0123abcd"
    for p in (killed, running, other_file):
        p.write_bytes(b"half an export")
        hour_ago = time.time() - io_mod.DEAD_WRITER_AFTER_S - 60
        os.utime(p, (hour_ago, hour_ago))
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"onnx")

    atomic_write(target, write)
    assert target.read_bytes() == b"onnx"
    assert seen[0].name.startswith(f".model.onnx.tmp-{host}-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.onnx", running.name, other_file.name]  # another file's is that file's writer's
    )
    umask = io_mod._umask()
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    from marrowscope.utils.io import atomic_write

    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def _replace_folder_twice(tmp_path: Path) -> Path:
    from marrowscope.utils.io import atomic_folder

    out = tmp_path / "best"

    def write(tag: str):  # type: ignore[no-untyped-def]
        def fill(folder: Path) -> None:
            (folder / "model.safetensors").write_text(tag)
            (folder / "metadata.json").write_text(tag)

        return fill

    atomic_folder(out, write("epoch 1"))
    atomic_folder(out, write("epoch 2"))
    return out


def test_a_folder_is_replaced_without_ever_being_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server reading RUN/best while training replaces it each epoch: the live folder is never
    renamed away (on Linux the new and the old folder swap names in one step), so no reader can
    find it missing, or 'restore' DIR.old under the writer."""
    import sys

    import marrowscope.utils.io as io_mod

    moved: list[tuple[str, str]] = []
    real = os.replace

    def spy(src, dst):  # type: ignore[no-untyped-def]
        moved.append((str(src), str(dst)))
        return real(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", spy)
    out = _replace_folder_twice(tmp_path)
    assert (out / "model.safetensors").read_text() == "epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no DIR.old, no staging
    if sys.platform == "linux":  # renameat2 (glibc >= 2.28) on a local file system
        assert str(out) not in [src for src, _ in moved], moved


def test_without_a_one_step_swap_the_folder_is_replaced_by_two_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import marrowscope.utils.io as io_mod

    monkeypatch.setattr(io_mod, "_exchange", lambda a, b: False)
    out = _replace_folder_twice(tmp_path)
    assert (out / "metadata.json").read_text() == "epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
