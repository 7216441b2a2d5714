"""Content-addressed image store: ``DATA_DIR/images/ab/abcdef....ext`` by SHA-256, never
overwritten.

A new file is written to a temporary name, fsynced and *linked* to its final name (a link never
replaces an existing file), so a crash leaves either no file or the complete one, and the same
content uploaded twice is stored once.

A process killed during an upload can leave ``.upload-*`` temporaries, and images stored but
never recorded (the cells are committed after their files are stored): :meth:`ImageStore.sweep`
removes both when the app starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SWEEP_GRACE_SECONDS", "ImageStore", "SweepReport"]

log = logging.getLogger(__name__)

TEMPORARY_PREFIX = ".upload-"
"""Name prefix of a file being written (:meth:`ImageStore.put`)."""

SWEEP_GRACE_SECONDS = 600.0
"""The startup sweep leaves alone files modified less than this long before the app started.

Assumption: another server process sharing the store (a second worker, a rolling restart) may
be in the middle of an upload, between storing its files and committing their cells; such an
upload is assumed to take less than this between its first stored file and its commit: the
app stores each image as soon as it is judged, so that span is judging the whole upload (at most
``max_files`` images of at most ``max_file_bytes``) plus the wait for the sample's lock (an upload
that stores a file already there refreshes its modification time, see :meth:`ImageStore.put`).
Files it keeps are looked at again at the next start.
"""

_STORED_NAME = re.compile(r"[0-9a-f]{64}\.[a-z0-9]{1,8}")


@dataclass(frozen=True)
class SweepReport:
    """What :meth:`ImageStore.sweep` removed."""

    temporaries: int = 0
    temporary_bytes: int = 0
    orphans: int = 0
    orphan_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.temporaries or self.orphans)


def _plural(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


class ImageStore:
    """Stores image bytes under their SHA-256.

    Args:
        root: the data folder (images go to ``root/images``).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.images = self.root / "images"

    def relative(self, sha256: str, ext: str) -> str:
        """The stored path of ``sha256`` relative to the data folder (POSIX separators)."""
        return f"images/{sha256[:2]}/{sha256}.{ext}"

    def put(self, data: bytes, ext: str) -> tuple[str, str]:
        """Store ``data``; returns ``(sha256, relative path)``. An existing file is kept as is."""
        sha = hashlib.sha256(data).hexdigest()
        rel = self.relative(sha, ext)
        final = self.root / rel
        if final.is_file():
            # Refreshed so that a startup sweep of another process (which removes unreferenced
            # files older than its grace period) does not remove it before this upload commits.
            with contextlib.suppress(OSError):
                os.utime(final)
            return sha, rel
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            # FileExistsError: stored meanwhile by another request (same bytes): keep that one.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, final)
        finally:
            os.unlink(tmp)
        return sha, rel

    def path(self, rel: str) -> Path:
        """The absolute path of a stored file (refuses paths outside ``images/``).

        Raises:
            ValueError: ``rel`` points outside the image store.
        """
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.images.resolve()):
            raise ValueError(f"{rel!r} is not inside the image store")
        return target

    def cache_path(self, kind: str, name: str) -> Path:
        """A file in ``DATA_DIR/cache/<kind>/`` (derived pictures such as Grad-CAM overlays)."""
        folder = self.root / "cache" / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def sweep(self, referenced: Iterable[str], before: float) -> SweepReport:
        """Remove what killed uploads left: ``.upload-*`` temporaries, and stored images that no
        cell refers to. Logs what was removed (INFO; nothing when nothing was).

        Only files directly in the store's two-character folders (``images/ab/``) are looked at,
        links are never followed, and only files last modified before ``before`` (a
        ``time.time()``) are removed, so a file being written by another process is left alone
        (see :data:`SWEEP_GRACE_SECONDS`). A file whose name is not a stored image's
        (``<sha256>.<ext>``) or a temporary's is left alone.

        Args:
            referenced: the ``stored_path`` of every cell (of deleted samples too); these files
                are never removed.
            before: only files modified before this moment are removed.
        """
        images = self.images.resolve()
        keep: set[Path] = set()
        for rel in referenced:
            with contextlib.suppress(ValueError, OSError):
                keep.add(self.path(rel))
        counts = {"temporaries": 0, "temporary_bytes": 0, "orphans": 0, "orphan_bytes": 0}
        try:
            folders = [e for e in os.scandir(images) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return SweepReport()
        for folder in folders:
            if len(folder.name) != 2:
                continue
            with os.scandir(folder.path) as entries:
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    name = entry.name
                    if name.startswith(TEMPORARY_PREFIX):
                        kind = "temporary"
                    elif (
                        _STORED_NAME.fullmatch(name)
                        and name[:2] == folder.name
                        and Path(entry.path) not in keep
                    ):
                        kind = "orphan"
                    else:
                        continue
                    try:
                        info = entry.stat(follow_symlinks=False)
                        if info.st_mtime >= before:
                            continue
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        continue
                    if kind == "orphan":
                        counts["orphans"] += 1
                        counts["orphan_bytes"] += info.st_size
                    else:
                        counts["temporaries"] += 1
                        counts["temporary_bytes"] += info.st_size
        report = SweepReport(**counts)
        if report:
            log.info(
                "startup sweep of %s removed %s (%s bytes) and %s (%s bytes) left by "
                "interrupted uploads",
                images,
                _plural(report.temporaries, "upload temporary", "upload temporaries"),
                f"{report.temporary_bytes:,}",
                _plural(report.orphans, "unreferenced image", "unreferenced images"),
                f"{report.orphan_bytes:,}",
            )
        return report
