"""versioned_folder: writers and readers of one folder at the same time (an export cache).

Each test would fail with a folder replaced whole by two renames (``atomic_folder``): a second
writer removed the first one's staging folder, and a reader between the renames found nothing.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ended_pid

import marrowscope.utils.io as io_mod
from marrowscope.utils.io import (
    VERSION_LINK,
    current_version,
    is_versioned_folder,
    staging_folder,
    versioned_folder,
)

FILES = ("model.xml", "model.bin", "metadata.json")


def _writer(tag: str, names: tuple[str, ...] = FILES, pause: float = 0.0) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        for name in names:
            (folder / name).write_text(tag)
            time.sleep(pause)

    return write


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".v-*"))


def _staging(folder: Path) -> list[Path]:
    return list(folder.parent.glob(f".{folder.name}.tmp-*"))


def _read_whole(folder: Path) -> dict[str, str]:
    """What a reader does: one version, every file read from it."""
    snap = current_version(folder)
    return {name: (snap / name).read_text() for name in FILES}


def test_each_write_is_a_new_version_read_through_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "int8"
    assert versioned_folder(out, _writer("1")) == out
    first = current_version(out)
    assert first.parent == out and first.name.startswith(".v-")
    assert os.readlink(out / VERSION_LINK) == first.name and is_versioned_folder(out)
    for name in FILES:  # the files where they always were, as links through .current
        assert (out / name).is_symlink() and (out / name).read_text() == "1"
        assert os.readlink(out / name) == f"{VERSION_LINK}/{name}"
    assert _read_whole(out) == dict.fromkeys(FILES, "1")

    # a version with other files: links follow, links to files it lacks go
    versioned_folder(out, _writer("2", ("model.xml", "model.bin", "model_fp32.xml")))
    second = current_version(out)
    assert second != first and (out / "model_fp32.xml").read_text() == "2"
    assert not (out / "metadata.json").exists() and not (out / "metadata.json").is_symlink()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "model.bin",
        "model.xml",
        "model_fp32.xml",
    ]
    # the replaced version stays a while (a reader may be loading it), then goes
    assert (first / "metadata.json").read_text() == "1" and len(_versions(out)) == 2
    monkeypatch.setattr(io_mod, "SUPERSEDED_GRACE_S", 0.0)
    versioned_folder(out, _writer("3"))
    assert _versions(out) == [current_version(out).name] and _read_whole(out)["model.xml"] == "3"
    assert not _staging(out) and not list(out.glob(".*.tmp-*"))


def test_a_failed_write_keeps_the_current_version_and_leaves_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "int8"

    def fails(folder: Path) -> None:
        (folder / "model.xml").write_text("half")
        (folder / "model.bin").write_text("half")
        raise RuntimeError("quantiser crashed")

    with pytest.raises(RuntimeError, match="quantiser crashed"):
        versioned_folder(out, fails)
    assert not out.exists() and not _staging(out)  # a first export that fails: nothing at all

    versioned_folder(out, _writer("good"))
    version = current_version(out)
    with pytest.raises(RuntimeError, match="quantiser crashed"):
        versioned_folder(out, fails)
    assert current_version(out) == version and _versions(out) == [version.name]
    assert _read_whole(out) == dict.fromkeys(FILES, "good")
    assert all((out / n).read_text() == "good" for n in FILES) and not _staging(out)


def test_concurrent_writers_all_succeed_and_readers_always_see_one_whole_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four writers inside their writer at once, each rename slowed down (a gap between two
    renames would be found), and readers reading all the while."""
    out = tmp_path / "int8"
    versioned_folder(out, _writer("0"))
    real_replace = os.replace

    def slow_replace(src: object, dst: object) -> None:
        time.sleep(0.02)
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(io_mod.os, "replace", slow_replace)
    n = 4
    inside = threading.Barrier(n)
    done = threading.Event()
    errors: list[BaseException] = []
    seen: set[str] = set()
    reads = 0

    def write(i: int) -> None:
        def body(folder: Path) -> None:
            _writer(str(i), pause=0.01)(folder)
            inside.wait(timeout=30)  # every writer has written its files before any finishes

        try:
            versioned_folder(out, body)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    def read() -> None:
        nonlocal reads
        while not done.is_set():
            try:
                whole = _read_whole(out)
                assert len(set(whole.values())) == 1, f"a mixture of versions: {whole}"
                seen.add(whole["model.xml"])
                assert (out / "metadata.json").read_text()  # the link is always there
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            reads += 1

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(i,)) for i in range(1, n + 1)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(timeout=60)
    done.set()
    for t in readers:
        t.join(timeout=60)
    assert not errors, errors
    final = _read_whole(out)
    assert len(set(final.values())) == 1 and final["model.xml"] in {"1", "2", "3", "4"}
    assert reads > 0 and seen <= {"0", "1", "2", "3", "4"}
    assert len(_versions(out)) == n + 1  # the replaced ones kept for now (grace period)
    assert not _staging(out) and not list(out.glob(".*.tmp-*"))


_PROCESS_WRITER = """
import sys, time
from pathlib import Path
from marrowscope.utils.io import versioned_folder
out, tag, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
def write(folder):
    for name in ("model.xml", "model.bin", "metadata.json"):
        (folder / name).write_text(tag)
    (go.parent / f"ready-{tag}").touch()
    while len(list(go.parent.glob("ready-*"))) < int(sys.argv[4]):  # all inside at once
        time.sleep(0.01)
versioned_folder(out, write)
print("ok", tag)
"""


def test_concurrent_writer_processes_all_succeed(tmp_path: Path) -> None:
    """As two ``marrowscope export`` runs: separate processes, each inside its writer while the
    others are, so each sees the others' staging folders when it starts."""
    out = tmp_path / "cache" / "int8" / "bm8"
    sync = tmp_path / "sync"
    sync.mkdir()
    n = 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_WRITER, str(out), str(i), str(sync / "go"), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [r[1][-2000:] for r in results]
    final = _read_whole(out)
    assert len(set(final.values())) == 1 and final["model.xml"] in {"0", "1", "2"}
    assert len(_versions(out)) == n and not _staging(out)


def test_a_folder_written_before_versions_is_read_as_is_then_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "int8"
    out.mkdir()
    for name in (*FILES, "model_fp32.xml"):
        (out / name).write_text("old")
    assert current_version(out) == out and not is_versioned_folder(out)
    assert _read_whole(out) == dict.fromkeys(FILES, "old")
    versioned_folder(out, _writer("new"))
    assert current_version(out) != out and _read_whole(out) == dict.fromkeys(FILES, "new")
    assert all((out / n).is_symlink() for n in FILES)
    assert not (out / "model_fp32.xml").exists()  # the old export's file is gone with it


def test_left_over_staging_folders_go_but_not_a_running_writers(tmp_path: Path) -> None:
    out = tmp_path / "int8"
    host = io_mod._HOST
    pid = ended_pid()
    # its process ended an hour ago: gone; just now: kept for an hour (a host name can be shared
    # by containers, each with its own process ids, so a dead-looking id may be someone else's)
    crashed = tmp_path / f".int8.tmp-{host}-{pid}-0123abcd"
    crashed_now = tmp_path / f".int8.tmp-{host}-{pid}-4567abcd"
    older = tmp_path / ".int8.tmp-0123abcd"  # an older marrowscope's: no owner recorded
    running = tmp_path / f".int8.tmp-{host}-{os.getppid()}-89abcdef"  # a live process
    reused = tmp_path / f".int8.tmp-{host}-{os.getppid()}-fedcba98"  # live id, a day unchanged
    remote = tmp_path / ".int8.tmp-ffffffff-1-89abcdef"  # another machine's, recent
    remote_old = tmp_path / ".int8.tmp-eeeeeeee-1-89abcdef"  # another machine's, a day old
    for p in (crashed, crashed_now, older, running, reused, remote, remote_old):
        p.mkdir()
        (p / "model.bin").write_text("x")
    day_ago = time.time() - io_mod.STALE_AFTER_S - 60
    hour_ago = time.time() - io_mod.DEAD_WRITER_AFTER_S - 60
    for p, when in ((remote_old, day_ago), (reused, day_ago), (crashed, hour_ago)):
        os.utime(p, (when, when))
    tmp = staging_folder(out)
    assert tmp.parent == tmp_path and tmp.name.startswith(f".int8.tmp-{host}-{os.getpid()}-")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {tmp.name, crashed_now.name, running.name, remote.name}


def test_without_symbolic_links_the_folder_is_replaced_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_symlinks(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "symbolic links not supported")

    monkeypatch.setattr(io_mod.os, "symlink", no_symlinks)
    out = tmp_path / "int8"
    versioned_folder(out, _writer("1"))
    versioned_folder(out, _writer("2"))
    assert current_version(out) == out and not is_versioned_folder(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert _read_whole(out) == dict.fromkeys(FILES, "2") and not _staging(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]


def test_a_file_in_the_way_is_named(tmp_path: Path) -> None:
    (tmp_path / "int8").write_text("not a folder")
    with pytest.raises(FileExistsError, match=r"int8 is a file, not a folder"):
        versioned_folder(tmp_path / "int8", _writer("1"))
    assert not _staging(tmp_path / "int8")


def test_a_version_replaced_while_old_versions_are_cleared_stays_for_its_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer C clears old versions while writer B replaces the long-current version A: A was
    current until a moment ago, so a reader may be loading it; it must stay its grace period."""
    out = tmp_path / "int8"
    versioned_folder(out, _writer("A"))
    a = current_version(out)
    long_ago = time.time() - io_mod.SUPERSEDED_GRACE_S - 60
    os.utime(a, (long_ago, long_ago))  # current for a long time
    staging_b = staging_folder(out)
    _writer("B")(staging_b)
    real = io_mod._version_name
    switched: list[bool] = []

    def b_switches_meanwhile(directory: Path) -> str | None:
        if not switched:  # B publishes between C's look at A and C's decision
            switched.append(True)
            io_mod._publish(out, staging_b)
        return real(directory)

    monkeypatch.setattr(io_mod, "_version_name", b_switches_meanwhile)
    io_mod._remove_superseded(out)  # writer C's clean-up
    assert switched and a.is_dir() and (a / "model.bin").read_text() == "A"
    assert _read_whole(out) == dict.fromkeys(FILES, "B")


def test_a_copy_that_followed_the_links_can_be_exported_into(tmp_path: Path) -> None:
    """cp -L, scp -r or shutil.copytree turn .current into a plain folder and the links into
    files: the copy reads as the export it is, and the next export into it works."""
    import shutil

    out = tmp_path / "int8"
    versioned_folder(out, _writer("1"))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # follows the links
    assert (copy / VERSION_LINK).is_dir() and not (copy / VERSION_LINK).is_symlink()
    assert _read_whole(copy) == dict.fromkeys(FILES, "1")
    versioned_folder(copy, _writer("2"))
    assert (copy / VERSION_LINK).is_symlink() and _read_whole(copy) == dict.fromkeys(FILES, "2")
    assert all((copy / n).is_symlink() for n in FILES)


def test_a_slower_writer_leaves_no_link_to_a_file_the_current_version_lacks(
    tmp_path: Path,
) -> None:
    out = tmp_path / "int8"
    versioned_folder(out, _writer("B", (*FILES, "model_fp32.xml")))
    versioned_folder(out, _writer("C"))  # current now, without model_fp32.xml
    # B's writer, slower, only now brings the links up to date for its own entries
    io_mod._update_entry_links(out, sorted((*FILES, "model_fp32.xml")))
    assert not os.path.lexists(out / "model_fp32.xml")
    assert _read_whole(out) == dict.fromkeys(FILES, "C")
