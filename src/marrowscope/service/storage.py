"""Content-addressed image store: ``DATA_DIR/images/ab/abcdef....ext`` by SHA-256, never
overwritten.

A new file is written to a temporary name, fsynced and *linked* to its final name (a link never
replaces an existing file), so a crash leaves either no file or the complete one, and the same
content uploaded twice is stored once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["ImageStore"]


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
            return sha, rel
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=final.parent)
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
