"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

An interrupted process therefore leaves either the old file or the new one, never a torn file
that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` then atomically rename ``tmp_path`` onto ``path``.

    Args:
        path: destination file.
        writer: writes the complete content to the path it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
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

    The new folder is filled in a hidden sibling (``.DIR.tmp-XXXXXXXX``); then an existing
    ``directory`` is renamed to ``DIR.old``, the new folder renamed to ``directory`` and
    ``DIR.old`` deleted. A crash therefore leaves the old folder, the new one, or only
    ``DIR.old`` (a reader may restore it: see ``marrowscope.models.bundle``), never a folder
    with some new and some old files. Temp folders left by a crashed earlier call are removed.
    Every file written gets the usual permissions (``0666`` less the umask, as
    :func:`atomic_write` gives), also those a library created private (safetensors' ``0600``).

    Args:
        directory: the folder to create or replace (its parent is created).
        writer: writes every file of the new folder into the folder it is given.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{directory.name}.tmp-*"):  # left by a crashed write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = old_folder(directory)
    try:
        writer(tmp)
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                if not f.is_symlink():
                    os.chmod(f, mode)
                _fsync(f)
        if directory.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return directory


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
