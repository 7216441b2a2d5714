"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

An interrupted process therefore leaves either the old file or the new one, never a torn file
that a later run would trust. Folders: :func:`atomic_folder` (replaced whole, for one writer at
a time) and :func:`versioned_folder` (several writers and readers at the same time).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, writer: Callable[[Path], object], *, sweep: bool = True) -> None:
    """Call ``writer(tmp_path)`` then atomically rename ``tmp_path`` onto ``path``.

    The temporary file is a hidden sibling named after its owner (``.NAME.tmp-HOST-PID-RANDOM``)
    with the usual permissions (``0666`` less the umask). One left by a killed writer (a large
    ONNX export stopped half-way) is removed by a later write of the same file, by the rule of
    :func:`staging_folder`; that of a writer still running is kept.

    Args:
        path: destination file.
        writer: writes the complete content to the path it is given.
        sweep: look for a killed writer's temporary file first (one listing of the folder);
            ``False`` for many small writes into large folders, where the listing would cost
            more than the write (the preprocessing cache).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        _remove_stale(path.parent, f"{glob.escape('.' + path.name)}.tmp-*")
    tmp_path = path.parent / _temp_name(f".{path.name}")
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        writer(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def old_folder(directory: Path) -> Path:
    """Where :func:`atomic_folder` parks the previous version of ``directory`` (``DIR.old``)
    while it renames the new one in; a crash in between leaves only this folder."""
    return directory.with_name(f"{directory.name}.old")


def atomic_folder(directory: Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_folder)``, then put ``tmp_folder`` in place of ``directory``.

    The new folder is filled in a hidden sibling (``.DIR.tmp-...``, see :func:`staging_folder`);
    then, on Linux, it and an existing ``directory`` swap names in one step (``renameat2`` with
    ``RENAME_EXCHANGE``) and the old content is deleted, so a reader always finds a whole folder.
    Where the system or file system cannot swap, an existing ``directory`` is renamed to
    ``DIR.old``, the new folder renamed to ``directory`` and ``DIR.old`` deleted; a crash then
    leaves the old folder, the new one, or only ``DIR.old`` (a reader may restore it: see
    ``marrowscope.models.bundle``). Never a folder with some new and some old files. Temp folders
    left by a crashed earlier call are removed (those of a writer still running are not). Every
    file written gets the usual permissions (``0666`` less the umask, as :func:`atomic_write`
    gives), also those a library created private (safetensors' ``0600``).

    For one writer at a time: two writers replacing the same folder at once can fail, and
    without the one-step swap a reader between the two renames finds no folder. A folder that
    several processes may write and read at the same time (a shared export cache) is a
    :func:`versioned_folder`.

    Args:
        directory: the folder to create or replace (its parent is created).
        writer: writes every file of the new folder into the folder it is given.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    tmp = staging_folder(directory)
    old = old_folder(directory)
    try:
        writer(tmp)
        _finish_files(tmp)
        _swap_folder(directory, tmp, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _swap_folder(directory: Path, tmp: Path, old: Path) -> None:
    """Put ``tmp`` in place of ``directory``: where the system can exchange two paths in one
    step (Linux), the two folders swap names and ``old`` receives the previous content, so a
    reader never finds ``directory`` missing; elsewhere ``directory`` (if any) is renamed to
    ``old``, then ``tmp`` to ``directory``."""
    if directory.exists() and old.exists():
        shutil.rmtree(old)
    if directory.is_dir() and not directory.is_symlink() and _exchange(tmp, directory):
        os.replace(tmp, old)  # the previous content, removed by the caller
    else:
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
    _fsync_dir(directory.parent)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` in one step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); ``False`` where the system or file system cannot (the caller falls back
    to two renames)."""
    if sys.platform != "linux":
        return False
    rename2 = getattr(_libc(), "renameat2", None)
    if rename2 is None:  # a C library without it (glibc < 2.28, some musl builds)
        return False
    if rename2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _finish_files(folder: Path) -> None:
    """The usual permissions for every file under ``folder``, and each one fsynced."""
    mode = 0o666 & ~_umask()
    for f in folder.rglob("*"):
        if f.is_file():
            if not f.is_symlink():
                os.chmod(f, mode)
            _fsync(f)


# ----------------------------------------------------------------- temporary names and owners

STALE_AFTER_S = 24 * 3600.0
"""A temporary folder or link whose writer cannot be checked (another machine) is removed only
once it has not changed for this long."""
DEAD_WRITER_AFTER_S = 3600.0
"""A temporary folder or link of an ended process of this machine is removed once it has not
changed for this long."""

_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
"""This machine, as it appears in the names of temporary folders and links."""
_OWNER = re.compile(r"\.tmp-([0-9a-f]{8})-([0-9]+)-[0-9a-f]{8}$")


def _temp_name(base: str) -> str:
    """``base.tmp-HOST-PID-RANDOM``: unique, and it says which process on which machine owns it."""
    return f"{base}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # pragma: no cover - os.kill(pid, 0) would end the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _is_stale(path: Path) -> bool:
    """True when the temporary folder or link ``path`` is left over: its name records no owner
    (an older marrowscope's, removed as before); it is unchanged for :data:`STALE_AFTER_S`
    (another machine's, a process id used again, or where liveness cannot be checked); or its
    process on this machine has ended and it is unchanged for :data:`DEAD_WRITER_AFTER_S` (a
    host name is not unique to one process namespace: containers may share one, so a process
    id alone is not trusted with a writer that is still running)."""
    m = _OWNER.search(path.name)
    if m is None:
        return True
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    if age > STALE_AFTER_S:
        return True
    return m[1] == _HOST and age > DEAD_WRITER_AFTER_S and not _pid_alive(int(m[2]))


def _remove_stale(folder: Path, pattern: str) -> None:
    """Remove the left-over temporary entries ``folder/PATTERN`` (see :func:`_is_stale`)."""
    for stale in folder.glob(pattern):
        if not _is_stale(stale):
            continue
        if stale.is_symlink() or not stale.is_dir():
            stale.unlink(missing_ok=True)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def staging_folder(directory: Path) -> Path:
    """A new empty folder beside ``directory`` to write its next version in
    (``.DIR.tmp-HOST-PID-RANDOM``; the parent is created). Staging folders left by a crashed
    writer are removed first; those of writers still running are kept."""
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(parent, f"{glob.escape('.' + directory.name)}.tmp-*")
    tmp = parent / _temp_name(f".{directory.name}")
    tmp.mkdir()
    return tmp


# ------------------------------------------------------------------------- versioned folders

VERSION_LINK = ".current"
"""The symbolic link inside a :func:`versioned_folder` naming its current version."""
VERSION_PREFIX = ".v-"
"""Version folders of a :func:`versioned_folder` are named ``.v-<random>``."""
SUPERSEDED_GRACE_S = 600.0
"""A replaced version is kept at least this long (a reader that started on it can finish), then
removed by a later write."""


def versioned_folder(directory: Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(staging)``, then make what it wrote the current content of ``directory``,
    safely with other writers and readers of the same folder at the same time.

    Layout: ``directory`` is a real folder holding version folders ``.v-<random>``, a symbolic
    link ``.current`` naming the current one, and, for each of its entries, a link
    ``NAME -> .current/NAME`` (so ``directory/NAME`` opens the current file, and tools and
    older readers see the folder as before). Steps:

    1. ``writer`` fills a fresh staging folder beside ``directory`` (:func:`staging_folder`);
       an exception removes it and leaves ``directory`` untouched.
    2. The complete staging folder becomes ``directory/.v-<random>``; then ``.current`` is
       replaced atomically (a new link renamed over it) to name it. A reader therefore finds the
       previous version or the new one, never a mixture: :func:`current_version` gives the
       folder of one version, to read every file from.
    3. The per-entry links are brought up to date, and versions replaced more than
       :data:`SUPERSEDED_GRACE_S` ago are removed. A folder written before versions (real
       files) has its files replaced one by one by links: a reader that started on it just
       before could read files of both exports, once per such folder.

    Two writers at the same time both succeed; the one that renames its link last is current.
    Where the file system cannot hold symbolic links the folder is replaced whole, as by
    :func:`atomic_folder`.

    Args:
        directory: the folder to create or update (its parent is created).
        writer: writes every file of the new version into the folder it is given.

    Returns:
        ``directory``.

    Raises:
        FileExistsError: ``directory`` is a file.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(
            f"{directory} is a file, not a folder; remove it or write somewhere else"
        )
    staging = staging_folder(directory)
    try:
        writer(staging)
        _finish_files(staging)
        _fsync_dir(staging)  # its entries on disk before a link names it
        if not _symlinks_work(staging):
            old = old_folder(directory)
            _swap_folder(directory, staging, old)
            shutil.rmtree(old, ignore_errors=True)
            return directory
        _publish(directory, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove_superseded(directory)
    return directory


def current_version(directory: Path) -> Path:
    """The folder to read every file of ``directory``'s current content from: its current
    version folder for a :func:`versioned_folder`, else ``directory`` itself (a folder written
    whole, e.g. before versions). Read all files from the one folder returned: reading
    ``directory/NAME`` file by file could mix two versions if a writer finishes in between."""
    directory = Path(directory)
    name = _version_name(directory)
    return directory / name if name is not None else directory


def is_versioned_folder(directory: Path) -> bool:
    """True when ``directory`` holds a version folder or ``.current`` link of
    :func:`versioned_folder` (also while a writer is putting its first version in)."""
    try:
        return any(
            p.name == VERSION_LINK or p.name.startswith(VERSION_PREFIX)
            for p in Path(directory).iterdir()
        )
    except OSError:
        return False


def _version_name(directory: Path) -> str | None:
    """The name ``directory/.current`` points to, when it is a version of this folder."""
    try:
        target = os.readlink(directory / VERSION_LINK)
    except OSError:
        return None
    if not target.startswith(VERSION_PREFIX) or "/" in target or os.sep in target:
        return None
    return target


def _symlinks_work(folder: Path) -> bool:
    """True when symbolic links can be made in ``folder``'s file system."""
    probe = folder / _temp_name(".probe")
    try:
        os.symlink(VERSION_LINK, probe)
    except (OSError, NotImplementedError):
        return False
    probe.unlink()
    return True


def _replace_link(path: Path, target: str) -> None:
    """Make ``path`` a symbolic link to ``target`` in one rename (a file there is replaced)."""
    tmp = path.with_name(_temp_name(f".{path.name.lstrip('.')}"))
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish(directory: Path, staging: Path) -> None:
    """Steps 2 and 3 of :func:`versioned_folder` (without the removal of old versions)."""
    if directory.is_symlink() and not directory.exists():  # a dangling link: replaced
        directory.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{VERSION_PREFIX}{uuid.uuid4().hex[:12]}"
    version = directory / name
    shutil.move(staging, version)  # a rename (a copy when directory is on another disk)
    now = time.time()
    os.utime(version, (now, now))  # kept by other writers' clean-up until it is current
    previous = _version_name(directory)
    if previous is not None:  # (about) the time it is replaced: kept SUPERSEDED_GRACE_S longer
        with contextlib.suppress(OSError):
            os.utime(directory / previous, (now, now))
    link = directory / VERSION_LINK
    if link.is_dir() and not link.is_symlink():
        # a copy that followed the links (cp -L, scp -r, copytree): its .current is a plain
        # folder, which no link can be renamed over; the files beside it are a full copy
        shutil.rmtree(link)
    try:
        _replace_link(link, name)
    except BaseException:
        if _version_name(directory) != name:  # interrupted after the rename: it is current
            shutil.rmtree(version, ignore_errors=True)
        raise
    _fsync_dir(directory)
    _update_entry_links(directory, sorted(p.name for p in version.iterdir()))
    _fsync_dir(directory)


def _update_entry_links(directory: Path, names: list[str]) -> None:
    """``directory/NAME -> .current/NAME`` for each entry of the new version; other top-level
    files and links (of an export written before versions, or of an older version) removed
    unless the current version has them."""
    current = directory / VERSION_LINK
    for entry in names:
        path = directory / entry
        target = f"{VERSION_LINK}/{entry}"
        if not os.path.lexists(current / entry):
            # another writer's version is current now and has no such entry: no link to it
            if path.is_symlink():
                path.unlink(missing_ok=True)
            continue
        if path.is_symlink() and os.readlink(path) == target:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)  # a folder of a pre-version export
        _replace_link(path, target)
    for path in directory.iterdir():
        if path.name.startswith(".") or path.name in names:
            continue
        if (current / path.name).exists():  # another writer's version, current now
            continue
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
    _remove_stale(directory, ".*.tmp-*")


def _remove_superseded(directory: Path) -> None:
    """Remove version folders that are not current and were replaced (or, never current,
    written) more than :data:`SUPERSEDED_GRACE_S` ago; also left-over temporary links."""
    cutoff = time.time() - SUPERSEDED_GRACE_S
    for path in directory.glob(f"{glob.escape(VERSION_PREFIX)}*"):
        if path.is_symlink() or not path.is_dir():
            continue
        # current first, age second: a writer refreshes the age of the version it replaces
        # before it switches .current, so a version seen as no longer current has its new age
        if path.name == _version_name(directory):
            continue
        try:
            if path.stat().st_mtime > cutoff:
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _proc_umask() -> int | None:
    """The process umask from ``/proc/self/status`` (Linux 4.7+), else ``None``."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _initial_umask() -> int:
    mask = _proc_umask()
    if mask is None:
        mask = os.umask(0)  # sets it to 0 for a moment: done once, at import
        os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _initial_umask()
"""The umask when this module was imported (used where ``/proc`` cannot tell it)."""


def _umask() -> int:
    """The process umask, read without changing it.

    ``os.umask`` can only read the umask by setting it (to 0, then back), and a file another
    thread creates in between (the review service saving an upload) would get mode 0666 or 0777.
    The umask is therefore read from ``/proc/self/status``, so a later ``os.umask`` call is
    followed; where that file does not say it, the value read once at import is used.
    """
    mask = _proc_umask()
    return _UMASK_AT_IMPORT if mask is None else mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    atomic_write(path, lambda p: p.write_bytes(data))


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode written as backslash escapes.

    A file name that is not valid UTF-8 reaches Python with its undecodable bytes as lone
    surrogates (``os.fsdecode(b"caf\\xe9.jpg") == "caf\\udce9.jpg"``); each such byte becomes
    the four characters ``\\xe9``, so a CSV, JSON or HTML file naming it is still valid UTF-8 and
    shows the byte. Any other lone surrogate becomes ``\\udXXX``. Text UTF-8 can encode is
    returned unchanged.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def printable_data(obj: Any) -> Any:
    """``obj`` (dicts, lists, tuples, strings, paths; anything else kept) with every string and
    path made :func:`printable`, keys included: what :func:`atomic_write_json` writes."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, Path):
        return printable(str(obj))
    if isinstance(obj, dict):
        return {printable_data(k): printable_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [printable_data(v) for v in obj]
    return obj


def atomic_write_text(path: Path, text: str, *, escape: bool = False) -> None:
    """Atomically write ``text`` to ``path`` as UTF-8.

    ``escape``: write what UTF-8 cannot encode (the bytes of a file name that is not UTF-8)
    escaped by :func:`printable`, for reports a person reads; without it such text raises
    ``UnicodeEncodeError`` (files marrowscope reads back, such as manifests, must name the real
    files or fail).
    """
    atomic_write_bytes(path, (printable(text) if escape else text).encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, *, escape: bool = False) -> None:
    """Atomically write ``obj`` as indented JSON.

    Without ``escape`` a file name that is not UTF-8 is kept exactly (as a ``\\udcXX`` escape
    that reads back to the same name); with it, strings are made :func:`printable`, as in the
    CSV and HTML reports written beside the JSON.
    """
    data = printable_data(obj) if escape else obj
    text = json.dumps(data, indent=2, sort_keys=False, default=json_default)
    atomic_write_text(path, text + "\n")


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays, paths, sets and tuples."""
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
