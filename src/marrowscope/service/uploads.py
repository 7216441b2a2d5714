"""Checks on uploaded files: names, types, sizes, pixel counts, decompression and zip bombs.

Every file is judged on its own; a refused file becomes a :class:`Rejected` whose message names
it and says why (and what to do), and the other files of the same upload go through. A zip file
is opened only after its directory passes the limits (member count, total uncompressed size,
per-member compression ratio); each member is then read with a hard size cap and judged like an
uploaded file, named ``archive.zip:member.jpg``.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
import stat
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from marrowscope.service.settings import Settings
from marrowscope.service.storage import ImageStore
from marrowscope.utils.image import IMAGE_EXTENSIONS, ImageReadError, decode_image

__all__ = [
    "FORMATS",
    "Accepted",
    "Rejected",
    "check_image",
    "check_name",
    "expand_zip",
    "read_capped",
    "validate_files",
]

FORMATS = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp"}
"""Accepted image formats (as Pillow names them) and the extension they are stored with."""

ZIP_EXT = ".zip"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Accepted:
    """An image that passed every check.

    Attributes:
        name: the file name as uploaded (``archive.zip:member`` for zip members).
        data: the file's bytes (``b""`` once stored: :func:`validate_files` with a store).
        ext: the stored extension (from the real format, not the name).
        width: pixels.
        height: pixels.
        sha256: the SHA-256 of the bytes, once stored.
        stored_path: where the image store keeps them, once stored.
    """

    name: str
    data: bytes
    ext: str
    width: int
    height: int
    sha256: str | None = None
    stored_path: str | None = None

    def keep(self, store: ImageStore) -> tuple[str, str]:
        """``(sha256, stored path)``: the image in ``store`` (stored now unless it was already).

        Raises:
            OSError: the store cannot write it.
        """
        if self.sha256 is not None and self.stored_path is not None:
            return self.sha256, self.stored_path
        return store.put(self.data, self.ext)


@dataclass(frozen=True)
class Rejected:
    """A refused file and why."""

    name: str
    reason: str

    @property
    def message(self) -> str:
        """``name: reason``."""
        return f"{self.name}: {self.reason}"


def check_name(name: str) -> str | None:
    """Why ``name`` is not acceptable as an uploaded file name, or ``None`` when it is.

    Refused: empty names, absolute paths, ``..`` parts, backslashes, drive letters and control
    characters (path traversal and zip-slip attempts).
    """
    if not name or not name.strip():
        return "empty file name; give the file a name"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "file name contains control characters; rename the file"
    if "\\" in name or (len(name) > 1 and name[1] == ":"):
        return "unsafe file name (Windows path); upload the file itself, not a path"
    if name.startswith("/"):
        return "unsafe file name (absolute path); upload the file itself, not a path"
    if ".." in name.split("/"):
        return "unsafe file name ('..' path traversal); rename the file"
    if len(name) > 255:
        return "file name longer than 255 characters; rename the file"
    return None


def _kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith(ZIP_EXT):
        return "zip"
    if low.endswith(IMAGE_EXTENSIONS):
        return "image"
    return None


def _type_hint() -> str:
    return f"upload images ({', '.join(IMAGE_EXTENSIONS)}) or a {ZIP_EXT} of them"


def read_capped(stream: BinaryIO, limit: int) -> bytes | None:
    """Read at most ``limit`` bytes; ``None`` when the stream holds more."""
    buf = bytearray()
    while True:
        block = stream.read(min(_CHUNK, limit + 1 - len(buf)))
        if not block:
            return bytes(buf)
        buf += block
        if len(buf) > limit:
            return None


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n:,} bytes"


def check_image(
    name: str, data: bytes, settings: Settings, *, field: bool = False
) -> Accepted | Rejected:
    """Judge one image file's bytes (type, size, pixel count, full decode).

    Args:
        name: the file's name (for messages).
        data: its bytes.
        settings: the limits.
        field: a whole field of view (limit ``settings.max_field_pixels``), not a cell crop.
    """
    from PIL import Image, UnidentifiedImageError

    max_pixels = settings.max_field_pixels if field else settings.max_pixels
    advice = "cut it into smaller fields" if field else "upload single-cell crops"

    if len(data) > settings.max_file_bytes:
        return Rejected(
            name, f"file is {_mb(len(data))}, above the {_mb(settings.max_file_bytes)} limit"
        )
    if not data:
        return Rejected(name, "file is empty (0 bytes)")
    try:
        # Pillow itself refuses more than 2x Image.MAX_IMAGE_PIXELS and warns above it; the
        # limit below (lower than Pillow's) is what refuses a large image. (No
        # warnings.catch_warnings(): requests are handled in several threads at once.)
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            fmt, (w, h) = im.format, im.size
    except UnidentifiedImageError:
        return Rejected(name, f"not an image (unknown format); {_type_hint()}")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Rejected(name, f"refused as a possible decompression bomb ({e}); {advice}")
    except Exception as e:  # Pillow raises many types for damaged headers
        return Rejected(name, f"damaged image header ({type(e).__name__}); re-export the file")
    if fmt not in FORMATS:
        return Rejected(name, f"{fmt} images are not accepted; {_type_hint()}")
    if w * h > max_pixels:
        return Rejected(
            name,
            f"image is {w}x{h} = {w * h:,} pixels, above the "
            + (
                f"{max_pixels:,}-pixel limit of a field"
                if field
                else f"{max_pixels:,} limit (possible decompression bomb)"
            )
            + f"; {advice}",
        )
    try:
        rgb = decode_image(data, name, max_pixels=max_pixels, what="field" if field else "image")
    except ImageReadError as e:
        return Rejected(name, e.reason)
    # the decoded size: an EXIF orientation of 5-8 swaps the header's width and height, and
    # every box, crop and drawing is made on the decoded (upright) pixels
    h, w = rgb.shape[:2]
    return Accepted(name=name, data=data, ext=FORMATS[fmt], width=int(w), height=int(h))


def expand_zip(
    name: str, stream: BinaryIO, settings: Settings, *, fields: bool = False
) -> Iterator[Accepted | Rejected]:
    """Judge a zip file and then each of its members (``fields``: as whole fields of view).

    The whole archive is refused (one :class:`Rejected` naming it) when it is not a zip, is too
    large, has too many members, a total uncompressed size above the limit or a member whose
    compression ratio is above the limit (zip bomb). Folders, hidden files and macOS
    ``__MACOSX/`` entries are skipped.
    """
    source: BinaryIO
    if stream.seekable():  # an upload spooled to a temporary file: read from it, not a copy
        size = stream.seek(0, io.SEEK_END)
        stream.seek(0)
        source = stream
    else:
        data = read_capped(stream, settings.max_request_bytes)
        size = -1 if data is None else len(data)
        source = io.BytesIO(data or b"")
    if size > settings.max_request_bytes or size < 0:
        yield Rejected(name, f"zip file above the {_mb(settings.max_request_bytes)} limit")
        return
    try:
        zf = zipfile.ZipFile(source)
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as e:
        yield Rejected(name, f"not a valid zip file ({e}); re-create the archive")
        return
    with zf:
        if len(infos) > settings.max_zip_members:
            yield Rejected(
                name,
                f"zip has {len(infos):,} entries, above the {settings.max_zip_members:,} limit; "
                "split it into smaller archives",
            )
            return
        total = sum(i.file_size for i in infos)
        if total > settings.max_zip_total_bytes:
            yield Rejected(
                name,
                f"zip would unpack to {_mb(total)}, above the {_mb(settings.max_zip_total_bytes)} "
                "limit (possible zip bomb); split it into smaller archives",
            )
            return
        for info in infos:
            ratio = info.file_size / max(1, info.compress_size)
            if ratio > settings.max_zip_ratio:
                yield Rejected(
                    name,
                    f"zip member {info.filename!r} is compressed {ratio:,.0f}:1, above the "
                    f"{settings.max_zip_ratio:g}:1 limit (possible zip bomb); the archive was "
                    "refused",
                )
                return
        for info in infos:
            member = f"{name}:{info.filename}"
            base = posixpath.basename(info.filename.rstrip("/"))
            if info.is_dir() or info.filename.startswith("__MACOSX/") or base.startswith("."):
                continue
            why = check_name(info.filename)
            if why:
                yield Rejected(member, why)
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                yield Rejected(member, "symbolic links are not accepted; zip the image itself")
                continue
            if info.flag_bits & 0x1:
                yield Rejected(member, "encrypted zip members are not accepted")
                continue
            kind = _kind(info.filename)
            if kind != "image":
                what = "nested zip files are" if kind == "zip" else "only images are"
                yield Rejected(member, f"{what} accepted inside a zip; {_type_hint()}")
                continue
            if info.file_size > settings.max_file_bytes:
                yield Rejected(
                    member,
                    f"file is {_mb(info.file_size)}, above the {_mb(settings.max_file_bytes)} limit",
                )
                continue
            try:
                with zf.open(info) as f:
                    body = read_capped(f, settings.max_file_bytes)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
                yield Rejected(member, f"cannot unpack ({e}); re-create the archive")
                continue
            if body is None:
                yield Rejected(member, f"file is above the {_mb(settings.max_file_bytes)} limit")
                continue
            yield check_image(member, body, settings, field=fields)


def validate_files(
    files: Iterable[tuple[str, BinaryIO]],
    settings: Settings,
    *,
    fields: bool = False,
    store: ImageStore | None = None,
) -> tuple[list[Accepted], list[Rejected]]:
    """Judge every uploaded file (images and zips); returns the accepted and the refused ones.

    ``fields``: the images are whole fields of view (their own pixel limit,
    ``settings.max_field_pixels``), not single-cell crops.

    ``store``: each accepted image is stored as soon as it is judged and kept only as its
    SHA-256 and stored path (:attr:`Accepted.stored_path`), so an upload holds one image in
    memory at a time and the caller stores nothing while it holds a database lock. Files that
    end up unused (a duplicate, a failed request) are removed by the startup sweep.

    At most ``settings.max_files`` images are accepted per upload; the rest are refused by name.
    """
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []

    def take(item: Accepted | Rejected) -> None:
        if isinstance(item, Accepted) and len(accepted) >= settings.max_files:
            item = Rejected(
                item.name,
                f"more than {settings.max_files:,} images in one upload; upload the "
                "rest separately",
            )
        if isinstance(item, Accepted) and store is not None:
            try:
                sha, rel = item.keep(store)
            except OSError as e:
                item = Rejected(
                    item.name,
                    f"the server could not store it ({e.strerror or e}); try again later or "
                    "tell the administrator",
                )
            else:
                item = dataclasses.replace(item, data=b"", sha256=sha, stored_path=rel)
        (accepted if isinstance(item, Accepted) else rejected).append(item)

    for raw_name, stream in files:
        name = raw_name or ""
        why = check_name(name)
        if why:
            take(Rejected(name or "(unnamed file)", why))
            continue
        kind = _kind(name)
        if kind == "zip":
            for item in expand_zip(name, stream, settings, fields=fields):
                take(item)
        elif kind == "image":
            data = read_capped(stream, settings.max_file_bytes)
            if data is None:
                take(Rejected(name, f"file is above the {_mb(settings.max_file_bytes)} limit"))
            else:
                take(check_image(name, data, settings, field=fields))
        else:
            take(Rejected(name, f"not an accepted file type; {_type_hint()}"))
    return accepted, rejected
