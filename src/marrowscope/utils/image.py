"""Image reading: any supported file -> RGB, HWC, uint8 numpy array, or a clear error.

Contract: :func:`read_image` returns ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``, RGB
channel order, turned upright as the file's EXIF orientation says (as image viewers show it).
Grayscale, grayscale+alpha, RGBA, palette, CMYK, 16-bit and float images are converted. Corrupt,
truncated, empty and non-image files, and images above the pixel limit (decompression bombs),
raise :class:`ImageReadError` whose message names the file and the fix.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
"""File endings treated as images when scanning folders (case-insensitive)."""

MAX_PIXELS = 50_000_000
"""Largest accepted image (width x height); a single-cell crop is ~0.06 megapixels."""

OUTPUT_MARKER = ".marrowscope-output"
"""File that marks a folder as written by marrowscope (``detect``'s and ``count --fields``'
``overlays/``)."""

OUTPUT_MARKERS = (OUTPUT_MARKER, ".marrowscope-count")
"""Marker files of marrowscope's output folders (``count`` marks its ``cells/`` pictures with the
second); :func:`list_image_files` skips a folder holding one."""

log = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An image file cannot be used; ``str(err)`` names the file and what to do."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def is_image_file(path: str | Path) -> bool:
    """True if ``path`` has one of :data:`IMAGE_EXTENSIONS`."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


_SKIP_DIRS = frozenset({"__MACOSX"})
"""Folders that archivers add beside the real files (macOS resource forks)."""


def is_hidden(name: str) -> bool:
    """True for a hidden file or folder name (``.x``, macOS ``._x.jpg``) or ``__MACOSX``."""
    return name.startswith(".") or name in _SKIP_DIRS


def is_output_folder(folder: str | Path) -> bool:
    """True for a folder marrowscope wrote as output (it holds one of :data:`OUTPUT_MARKERS`)."""
    return any(os.path.isfile(os.path.join(folder, m)) for m in OUTPUT_MARKERS)


def list_image_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """Image files below ``folder`` (recursive, sorted) and the other files found there.

    The one way marrowscope lists a folder: hidden files and folders (``.x``, the ``._x.jpg``
    copies macOS leaves on other file systems) and ``__MACOSX`` are skipped, so every command
    sees the same cells; so are sub-folders marrowscope wrote as output (:func:`is_output_folder`:
    the overlays of ``detect`` and ``count --fields``, the pictures of a ``count`` report), so a
    run whose ``--out`` lies inside its input folder does not take its earlier outputs for
    inputs. ``folder`` itself is always listed; the skipped folders are named in the log.
    """
    images: list[Path] = []
    others: list[Path] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        keep = []
        for d in sorted(d for d in dirnames if not is_hidden(d)):
            if is_output_folder(os.path.join(dirpath, d)):
                skipped.append(os.path.join(dirpath, d))
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if not is_hidden(name):
                p = Path(dirpath) / name
                (images if is_image_file(name) else others).append(p)
    if skipped:
        log.warning(
            "skipped %d folder(s) of marrowscope's own output below %s (%s): not inputs",
            len(skipped),
            folder,
            ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""),
        )
    return sorted(images), sorted(others)


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Convert a decoded array (gray, gray+alpha, RGB, RGBA; uint8/uint16/float) to RGB uint8.

    Channel order of colour input is taken as RGB. Alpha is dropped (composited on white).
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a.astype(np.uint32) * 255 + 32767) // 65535
        a = a.astype(np.uint8)
    elif a.dtype in (np.int32, np.int64, np.int16):
        hi = float(a.max()) if a.size else 1.0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        a = np.clip(np.rint(a.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        hi = float(np.nanmax(a)) if a.size else 1.0
        scale = 255.0 if hi <= 1.0 + 1e-6 else 1.0
        a = np.clip(np.rint(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    else:
        raise ValueError(f"unsupported pixel type {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3:
        raise ValueError(f"unsupported image shape {a.shape}")
    c = a.shape[2]
    if c == 2:  # gray + alpha
        gray, alpha = a[:, :, 0], a[:, :, 1]
        return np.repeat(_over_white(gray[:, :, None], alpha), 3, axis=2)
    if c == 3:
        return np.ascontiguousarray(a)
    if c == 4:
        return _over_white(a[:, :, :3], a[:, :, 3])
    raise ValueError(f"unsupported number of channels: {c}")


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    w = alpha.astype(np.float32)[:, :, None] / 255.0
    out = rgb.astype(np.float32) * w + 255.0 * (1.0 - w)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def decode_image(
    data: bytes,
    name: str | Path = "<bytes>",
    *,
    max_pixels: int | None = None,
    what: str = "image",
) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 (see module contract).

    Args:
        data: the encoded bytes.
        name: the file (for messages).
        max_pixels: largest accepted width x height (``None``: :data:`MAX_PIXELS`).
        what: ``"image"`` (a cell crop) or ``"field"`` (a whole field of view): the advice given
            for an oversized one differs.

    Raises:
        ImageReadError: empty, not an image, truncated/corrupt, or too many pixels.
    """
    from PIL import Image, UnidentifiedImageError

    limit = MAX_PIXELS if max_pixels is None else max_pixels
    advice = (
        "cut it into smaller fields first"
        if what == "field"
        else "crop single cells before classifying"
    )
    if len(data) == 0:
        raise ImageReadError(
            name, "file is empty (0 bytes); remove it or replace it with the image"
        )
    try:
        # Pillow refuses more than 2x Image.MAX_IMAGE_PIXELS itself (DecompressionBombError) and
        # only warns above it; the limit here is checked before anything is decoded. (No
        # warnings.catch_warnings() to turn the warning into an error: it changes process-wide
        # state, and images are decoded in several threads at once.)
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > limit:
            raise ImageReadError(
                name, _too_many_pixels(what, f"{w}x{h} = {w * h:,}", limit, advice)
            )
        high_depth = _is_high_depth_colour(im)
        im.load()  # full decode: raises on truncated data
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(
            name, "not a readable image file (unknown format); remove it"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # -W error
        # Pillow refused it on opening (more than 2x its own limit): the same message as above
        size = _header_size(data)
        pixels = f"{size[0]}x{size[1]} = {size[0] * size[1]:,}" if size else _bomb_pixels(e)
        raise ImageReadError(name, _too_many_pixels(what, pixels, limit, advice)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as e:
        # Pillow's decoders report damaged files with any of these.
        raise ImageReadError(
            name, f"corrupt or truncated image ({e}); re-export or remove it"
        ) from None

    try:
        return pil_to_rgb(im, data, high_depth=high_depth)
    except ValueError as e:
        raise ImageReadError(name, f"cannot convert to RGB: {e}") from None


def _too_many_pixels(what: str, pixels: str, limit: int, advice: str) -> str:
    """The refusal of an image above the pixel limit (worded as the review app words it)."""
    if what == "field":
        return f"field is {pixels} pixels, above the {limit:,}-pixel limit of a field; {advice}"
    return (
        f"{what} is {pixels} pixels, above the {limit:,} limit (possible decompression bomb); "
        f"{advice}"
    )


def _bomb_pixels(error: BaseException) -> str:
    """The pixel count Pillow's decompression-bomb message names (``"more than N"`` if none)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(found.group(1)):,}" if found else "too many"


def _header_size(data: bytes) -> tuple[int, int] | None:
    """An image's width and height from its header, without Pillow's decompression-bomb check
    (which refuses to open one more than twice its limit); ``None`` when no format reads it."""
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is not None and not accept(prefix):
                continue
            im = factory(io.BytesIO(data), "")  # as Image.open passes a file object's name
            return int(im.size[0]), int(im.size[1])
        except Exception:  # noqa: BLE001, S112 - not this format: try the next
            continue
    return None


def _is_high_depth_colour(im) -> bool:  # type: ignore[no-untyped-def]
    """True for a 16-bit-per-channel colour file (PNG/TIFF), which Pillow opens as 8-bit RGB(A).

    Must be called before ``im.load()`` (the tile list, which names the raw mode, is cleared then).
    """
    if im.mode not in ("RGB", "RGBA"):
        return False
    for tile in getattr(im, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else (args[0] if args else None)
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def pil_to_rgb(im, data: bytes | None = None, *, high_depth: bool = False) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Convert a loaded PIL image (any mode: 1, L, LA, P, PA, I;16, I, F, RGB, RGBA, CMYK, ...) to
    RGB uint8 (see module contract).

    The result is turned upright as the image's EXIF orientation says (:func:`upright`), as
    image viewers show it, so that every path (a file, its bytes, a PIL image) gives the pixels
    the user sees and boxes drawn on them land where the user looks.

    Args:
        im: the PIL image.
        data: the encoded bytes it came from, when known: a 16-bit-per-channel colour file
            (``high_depth``) is then decoded again with OpenCV, since Pillow truncates it to 8 bits.
        high_depth: whether the file was 16 bits per colour channel.
    """
    return upright(_pil_pixels(im, data, high_depth=high_depth), exif_orientation(im))


_ORIENTATION_TAG = 0x0112
"""EXIF Orientation (1 = upright, 2-8 = mirrored and/or rotated)."""


def exif_orientation(im) -> int:  # type: ignore[no-untyped-def]
    """A PIL image's EXIF orientation, 1 (upright) when it has none or an invalid one."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: show the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """``rgb`` (HWC) turned as EXIF ``orientation`` says, as ``PIL.ImageOps.exif_transpose``
    does (2: mirrored, 3: 180 degrees, 4: flipped, 5: transposed, 6: 90 clockwise,
    7: transversed, 8: 90 counter-clockwise); 1 or anything else: unchanged."""
    if orientation == 2:
        out = rgb[:, ::-1]
    elif orientation == 3:
        out = rgb[::-1, ::-1]
    elif orientation == 4:
        out = rgb[::-1]
    elif orientation == 5:
        out = rgb.swapaxes(0, 1)
    elif orientation == 6:
        out = np.rot90(rgb, -1)
    elif orientation == 7:
        out = rgb[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        out = np.rot90(rgb, 1)
    else:
        return rgb
    return np.ascontiguousarray(out)


def _pil_pixels(im, data: bytes | None = None, *, high_depth: bool = False) -> np.ndarray:  # type: ignore[no-untyped-def]
    """:func:`pil_to_rgb` before the EXIF orientation is applied."""
    mode = im.mode
    if high_depth and data is not None:
        # 16-bit-per-channel PNG/TIFF: Pillow drops the low byte (truncates); decode with
        # OpenCV, which keeps the full depth, so the scaling to 8 bit rounds correctly.
        arr = _cv2_decode(data)
        if arr is not None and arr.ndim == 3 and arr.shape[:2] == (im.height, im.width):
            return to_rgb_uint8(arr)
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return to_rgb_uint8(np.asarray(im).astype(np.uint16))
    if mode == "I":
        arr = np.asarray(im)
        return to_rgb_uint8(arr.astype(np.int64))
    if mode == "F":
        return to_rgb_uint8(np.asarray(im, dtype=np.float32))
    if mode in ("L", "LA", "RGBA"):
        return to_rgb_uint8(np.asarray(im))
    if mode == "1":
        return to_rgb_uint8(np.asarray(im.convert("L")))
    if mode in ("P", "PA"):
        return to_rgb_uint8(np.asarray(im.convert("RGBA")))
    # CMYK, YCbCr, LAB, HSV, ...
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _cv2_decode(data: bytes) -> np.ndarray | None:
    import cv2

    buf = np.frombuffer(data, dtype=np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None:
        return None
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, [2, 1, 0, 3]]
    return arr


def read_file_bytes(path: str | Path) -> bytes:
    """The bytes of an image file, or an :class:`ImageReadError` naming the file and the fix."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(p, "file not found; check the path") from None
    except IsADirectoryError:
        raise ImageReadError(p, "is a folder, not an image file") from None
    except OSError as e:
        raise ImageReadError(p, f"cannot read file ({e.strerror}); check its permissions") from None


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB, HWC, uint8.

    Raises:
        ImageReadError: missing, unreadable, empty, non-image, truncated, or too large.
    """
    return decode_image(read_file_bytes(path), Path(path))
