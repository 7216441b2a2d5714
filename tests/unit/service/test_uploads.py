"""Upload checks without a server: names, types, sizes, pixels, zips."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from marrowscope.service.settings import Settings
from marrowscope.service.storage import ImageStore
from marrowscope.service.uploads import Accepted, Rejected, check_image, check_name, validate_files

SETTINGS = Settings(max_file_bytes=100_000, max_pixels=10_000, max_zip_members=5)


def _img(w: int = 20, h: int = 20, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 200)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty file name"),
        ("../x.jpg", "path traversal"),
        ("a/../../x.jpg", "path traversal"),
        ("/etc/x.jpg", "absolute path"),
        ("C:\\x.jpg", "Windows path"),
        ("c:x.jpg", "Windows path"),
        ("a\x00.jpg", "control characters"),
        ("x" * 256 + ".jpg", "longer than 255"),
    ],
)
def test_unsafe_names_are_refused(name: str, why: str) -> None:
    assert why in (check_name(name) or "")


@pytest.mark.parametrize("name", ["cell.jpg", "slide 2/cell_01.PNG", "a..b.tif", "é.bmp"])
def test_ordinary_names_pass(name: str) -> None:
    assert check_name(name) is None


def test_formats_are_judged_by_content_not_name() -> None:
    ok = check_image("looks.jpg", _img(fmt="PNG"), SETTINGS)
    assert isinstance(ok, Accepted) and ok.ext == "png" and (ok.width, ok.height) == (20, 20)
    for fmt, ext in (("JPEG", "jpg"), ("TIFF", "tif"), ("BMP", "bmp")):
        got = check_image(f"x.{ext}", _img(fmt=fmt), SETTINGS)
        assert isinstance(got, Accepted) and got.ext == ext
    gif = check_image("x.png", _img(fmt="GIF"), SETTINGS)
    assert isinstance(gif, Rejected) and "GIF images are not accepted" in gif.reason


def test_size_pixels_empty_and_truncated() -> None:
    big = check_image("big.png", _img(200, 100), SETTINGS)
    assert isinstance(big, Rejected) and "20,000 pixels, above the 10,000 limit" in big.reason
    assert "empty" in check_image("e.png", b"", SETTINGS).reason  # type: ignore[union-attr]
    data = _img(fmt="JPEG")
    cut = check_image("cut.jpg", data[: len(data) // 2], SETTINGS)
    assert isinstance(cut, Rejected) and cut.message.startswith("cut.jpg: ")
    heavy = check_image("heavy.png", _img() + b"\0" * 100_001, SETTINGS)
    assert isinstance(heavy, Rejected) and "above the" in heavy.reason


def _zip(members: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    buf.seek(0)
    return buf


def test_zip_members_are_judged_one_by_one() -> None:
    z = _zip({"a/one.png": _img(), "two.jpg": _img(fmt="JPEG"), "../up.png": _img(), "x.txt": b"t"})
    accepted, rejected = validate_files([("s.zip", z), ("plain.png", io.BytesIO(_img()))], SETTINGS)
    assert [a.name for a in accepted] == ["s.zip:a/one.png", "s.zip:two.jpg", "plain.png"]
    assert {r.name for r in rejected} == {"s.zip:../up.png", "s.zip:x.txt"}


def test_zip_limits_refuse_the_whole_archive() -> None:
    many = _zip({f"{i}.png": _img() for i in range(6)})
    _, rejected = validate_files([("many.zip", many)], SETTINGS)
    assert [r.name for r in rejected] == ["many.zip"] and "6 entries" in rejected[0].reason
    bomb = _zip({"z.png": b"\0" * 1_000_000})
    _, rejected = validate_files([("bomb.zip", bomb)], SETTINGS)
    assert "zip bomb" in rejected[0].reason
    total = Settings(max_zip_total_bytes=1000, max_zip_ratio=1e9)
    _, rejected = validate_files([("t.zip", _zip({"a.png": b"\0" * 2000}))], total)
    assert "would unpack to 2,000 bytes" in rejected[0].reason


def test_max_files_per_upload() -> None:
    s = Settings(max_files=2)
    files = [(f"{i}.png", io.BytesIO(_img())) for i in range(3)]
    accepted, rejected = validate_files(files, s)
    assert len(accepted) == 2 and rejected[0].name == "2.png"
    assert "more than 2 images" in rejected[0].reason


def test_fields_have_their_own_pixel_limit_named_in_the_refusal() -> None:
    """A whole field of view is judged against ``max_field_pixels`` (not the crop limit), and
    a refused one names that limit and says to cut the field; the rest of the upload goes on."""
    settings = Settings(max_file_bytes=100_000, max_pixels=10_000, max_field_pixels=40_000)
    assert isinstance(check_image("f.png", _img(150, 150), settings, field=True), Accepted)
    crop = check_image("f.png", _img(150, 150), settings)
    assert isinstance(crop, Rejected) and "single-cell crops" in crop.reason
    big = check_image("big.png", _img(250, 200), settings, field=True)
    assert isinstance(big, Rejected)
    assert "250x200 = 50,000 pixels, above the 40,000-pixel limit of a field" in big.reason
    assert "cut it into smaller fields" in big.reason
    ok, refused = validate_files(
        [("a.png", io.BytesIO(_img(150, 150))), ("big.png", io.BytesIO(_img(250, 200)))],
        settings,
        fields=True,
    )
    assert [a.name for a in ok] == ["a.png"] and [r.name for r in refused] == ["big.png"]


def test_the_field_limit_is_the_detectors() -> None:
    from marrowscope.preprocess.fields import MAX_FIELD_PIXELS
    from marrowscope.service import settings

    assert settings.MAX_FIELD_PIXELS == MAX_FIELD_PIXELS
    assert Settings().max_field_pixels == MAX_FIELD_PIXELS
    with pytest.raises(ValueError, match="max_field_pixels must be at most 50,000,000"):
        Settings(max_field_pixels=MAX_FIELD_PIXELS + 1)


class _Unseekable(io.RawIOBase):
    """A stream that can only be read forward (as a socket would be)."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        chunk = self._buf.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_with_a_store_each_accepted_image_is_stored_as_judged_and_not_kept_in_memory(
    tmp_path: Path,
) -> None:
    """Given the image store, every accepted image (a plain file or a zip member, the zip read
    from its spooled file or from a forward-only stream) is stored at once and comes back as its
    SHA-256 and stored path, without its bytes; an image the store cannot write is refused by
    name with the reason, and the rest of the upload goes through."""
    import hashlib
    import tempfile

    store = ImageStore(tmp_path)
    one, two, three = _img(20, 20), _img(21, 20), _img(fmt="JPEG")
    spooled = tempfile.SpooledTemporaryFile()  # noqa: SIM115 (what the framework hands over)
    spooled.write(_zip({"a/one.png": one, "two.png": two}).getvalue())
    spooled.seek(0)
    forward = _Unseekable(_zip({"three.jpg": three}).getvalue())
    accepted, rejected = validate_files(
        [("s.zip", spooled), ("f.zip", forward)],  # type: ignore[list-item]
        SETTINGS,
        store=store,
    )
    assert rejected == []
    assert [a.name for a in accepted] == ["s.zip:a/one.png", "s.zip:two.png", "f.zip:three.jpg"]
    for a, body in zip(accepted, (one, two, three), strict=True):
        assert a.data == b"" and a.sha256 == hashlib.sha256(body).hexdigest()
        assert a.stored_path is not None and (tmp_path / a.stored_path).read_bytes() == body
        assert a.keep(store) == (a.sha256, a.stored_path)  # stored once, not again

    too_big = Settings(max_file_bytes=100_000, max_request_bytes=100)
    spooled.seek(0)
    _, refused = validate_files([("big.zip", spooled)], too_big, store=store)  # type: ignore[list-item]
    assert [r.name for r in refused] == ["big.zip"] and "zip file above the" in refused[0].reason

    class FullStore(ImageStore):
        def put(self, data: bytes, ext: str) -> tuple[str, str]:
            raise OSError(28, "No space left on device")

    ok, refused = validate_files(
        [("a.png", io.BytesIO(one))], SETTINGS, store=FullStore(tmp_path / "full")
    )
    assert ok == [] and [r.name for r in refused] == ["a.png"]
    assert "the server could not store it (No space left on device)" in refused[0].reason


def test_an_exif_rotated_image_is_recorded_at_its_upright_size() -> None:
    """A camera JPEG stored landscape with EXIF orientation 6 (shown portrait) is recorded
    portrait: the size every box and crop of it is measured in."""
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 120, 200)).save(buf, format="JPEG", exif=exif)
    accepted = check_image("rotated.jpg", buf.getvalue(), SETTINGS)
    assert isinstance(accepted, Accepted)
    assert (accepted.width, accepted.height) == (20, 40)
