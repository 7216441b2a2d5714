"""Upload checks without a server: names, types, sizes, pixels, zips."""

from __future__ import annotations

import io
import zipfile

import pytest
from PIL import Image

from marrowscope.service.settings import Settings
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
