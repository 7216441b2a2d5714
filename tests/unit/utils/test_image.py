"""read_image: supported files become RGB HWC uint8; bad files raise a clear ImageReadError."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from marrowscope.utils import image as image_mod
from marrowscope.utils.image import ImageReadError, is_image_file, read_image


def _check_contract(arr: np.ndarray, h: int, w: int) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (h, w, 3)
    assert arr.dtype == np.uint8


def _rgb_pattern(h: int = 6, w: int = 8) -> np.ndarray:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)  # left half red
    arr[:, w // 2 :] = (0, 0, 255)  # right half blue
    return arr


@pytest.mark.parametrize("ext", ["png", "bmp", "tif"])
def test_lossless_rgb_formats_round_trip_exactly(tmp_path: Path, ext: str) -> None:
    src = _rgb_pattern()
    path = tmp_path / f"img.{ext}"
    Image.fromarray(src).save(path)
    out = read_image(path)
    _check_contract(out, 6, 8)
    np.testing.assert_array_equal(out, src)


def test_rgb_jpeg_keeps_channel_order(tmp_path: Path) -> None:
    src = np.zeros((16, 16, 3), np.uint8)
    src[:, :8] = (220, 20, 20)
    src[:, 8:] = (20, 20, 220)
    path = tmp_path / "img.jpg"
    Image.fromarray(src).save(path, quality=95)
    out = read_image(path)
    _check_contract(out, 16, 16)
    # lossy, but the left stays red and the right stays blue (no BGR swap)
    assert out[8, 2, 0] > 180 and out[8, 2, 2] < 60
    assert out[8, 13, 2] > 180 and out[8, 13, 0] < 60


def test_grayscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)
    out = read_image(path)
    _check_contract(out, 3, 4)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_rgba_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    rgba[1, 1] = (0, 255, 0, 255)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = read_image(path)
    _check_contract(out, 2, 2)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[1, 0]) == (127, 127, 127)
    assert tuple(out[1, 1]) == (0, 255, 0)


def test_palette_image(tmp_path: Path) -> None:
    im = Image.new("P", (3, 2))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    im.putdata([0, 1, 0, 1, 1, 0])
    path = tmp_path / "pal.png"
    im.save(path)
    out = read_image(path)
    _check_contract(out, 2, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (0, 255, 0)


def test_16bit_grayscale_png_is_scaled_to_8bit(tmp_path: Path) -> None:
    g16 = np.array([[0, 65535], [32896, 257]], np.uint16)
    path = tmp_path / "g16.png"
    assert cv2.imwrite(str(path), g16)
    out = read_image(path)
    _check_contract(out, 2, 2)
    np.testing.assert_array_equal(out[:, :, 0], [[0, 255], [128, 1]])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_16bit_rgb_png_is_scaled_with_rounding_and_rgb_order(tmp_path: Path) -> None:
    bgr16 = np.zeros((2, 2, 3), np.uint16)
    bgr16[0, 0] = (0, 0, 65535)  # BGR: pure red
    bgr16[0, 1] = (65535, 0, 0)  # pure blue
    bgr16[1, 0] = (0, 32896, 0)  # green 128
    bgr16[1, 1] = (200, 200, 200)  # 200/257 = 0.78 -> rounds to 1 (Pillow alone truncates to 0)
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), bgr16)
    out = read_image(path)
    _check_contract(out, 2, 2)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (0, 0, 255)
    assert tuple(out[1, 0]) == (0, 128, 0)
    assert tuple(out[1, 1]) == (1, 1, 1)


def test_uppercase_extension_is_an_image_file() -> None:
    assert is_image_file("a/B.JPG") and is_image_file("x.TiFf")
    assert not is_image_file("notes.txt")


def _expect_error(path: Path) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert path.name in str(info.value)
    return info.value


def test_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty" in str(_expect_error(path))


def test_text_file_named_jpg_raises(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    assert "not a readable image" in str(_expect_error(path))


def test_truncated_jpeg_raises(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert ok
    data = buf.tobytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in str(_expect_error(path))


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
    monkeypatch.setattr(image_mod, "MAX_PIXELS", 100)
    assert "decompression bomb" in str(_expect_error(path))


def test_missing_file_raises(tmp_path: Path) -> None:
    assert "not found" in str(_expect_error(tmp_path / "missing.png"))


def _with_orientation(rgb: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    """``rgb`` encoded with an EXIF Orientation tag."""
    import io

    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_a_jpeg_with_exif_orientation_6_is_read_upright(tmp_path: Path) -> None:
    """Orientation 6 (a camera held sideways): viewers turn it 90 degrees clockwise, and so must
    every reader, or boxes land in a frame the user never sees."""
    stored = np.zeros((40, 60, 3), np.uint8)  # 60 wide as stored
    stored[:10, :20] = (255, 0, 0)  # red block at the stored top-left
    path = tmp_path / "sideways.jpg"
    path.write_bytes(_with_orientation(stored, 6))
    out = read_image(path)
    _check_contract(out, 60, 40)  # upright: 40 wide, 60 high
    # turned clockwise, the stored top-left ends at the top-right
    assert out[2:8, 32:38, 0].min() > 200 and out[2:8, 32:38, 2].max() < 60
    assert out[52:58, 2:8].max() < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_what_pillow_exif_transpose_gives(
    orientation: int,
) -> None:
    import io

    from PIL import ImageOps

    rng = np.random.default_rng(orientation)
    data = _with_orientation(rng.integers(0, 255, (7, 11, 3), dtype=np.uint8), orientation, "PNG")
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(image_mod.decode_image(data), want)
    # a PIL image handed over directly is turned the same way
    np.testing.assert_array_equal(image_mod.pil_to_rgb(Image.open(io.BytesIO(data))), want)


def _header_only_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height pixels."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_a_huge_field_header_gets_the_field_limit_message_not_pillows(tmp_path: Path) -> None:
    """20000 x 20000 is more than twice Pillow's own limit, so Pillow refuses it on opening; the
    message is still marrowscope's: the size, the field limit and the fix."""
    path = _header_only_png(tmp_path / "huge.png", 20_000, 20_000)
    data = path.read_bytes()
    with pytest.raises(ImageReadError) as err:
        image_mod.decode_image(data, path, max_pixels=50_000_000, what="field")
    msg = str(err.value)
    assert "20000x20000 = 400,000,000 pixels, above the 50,000,000-pixel limit of a field" in msg
    assert "cut it into smaller fields" in msg and "DOS attack" not in msg
    with pytest.raises(ImageReadError, match=r"400,000,000 pixels, above the 50,000,000 limit"):
        read_image(path)  # a cell image: its own advice


def test_folder_listing_skips_marrowscopes_own_output_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An earlier run's overlays (marked) below the input folder are not inputs; the folder
    given itself is always listed, and the log says how many folders were skipped."""
    for rel in ("a.png", "run/overlays/00000_a.png", "run/cells/00_x/1.jpg", "sub/b.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb_pattern()).save(tmp_path / rel)
    (tmp_path / "run" / "overlays" / image_mod.OUTPUT_MARKER).write_text("x")
    (tmp_path / "run" / "cells" / ".marrowscope-count").write_text("x")
    with caplog.at_level("WARNING"):
        images, _ = image_mod.list_image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["a.png", "sub/b.png"]
    assert "skipped 2 folder(s) of marrowscope's own output" in caplog.text
    listed, _ = image_mod.list_image_files(tmp_path / "run" / "overlays")
    assert [p.name for p in listed] == ["00000_a.png"]
