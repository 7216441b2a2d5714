"""Pure preprocessing operations on tiny arrays."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from marrowscope.config import PreprocessConfig
from marrowscope.preprocess.ops import (
    PAPER_SHARPEN_KERNEL,
    PREPROCESS_VERSION,
    apply_preprocess,
    center_crop,
    config_from_params,
    denoise,
    params_key,
    preprocess_params,
    resize,
    sharpen,
)

FAST_DENOISE = {"h": 15.0, "h_color": 15.0, "template_window": 3, "search_window": 7}


def _noisy(
    shape: tuple[int, int], base: tuple[int, int, int], sigma: float, seed: int = 0
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.asarray(base, np.float32) + rng.normal(0, sigma, (*shape, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def test_kernel_is_the_papers() -> None:
    assert PAPER_SHARPEN_KERNEL.dtype == np.float32
    assert PAPER_SHARPEN_KERNEL[1, 1] == 9 and PAPER_SHARPEN_KERNEL.sum() == 1


def test_sharpen_leaves_a_constant_image_unchanged() -> None:
    img = np.full((7, 9, 3), (120, 60, 200), np.uint8)
    np.testing.assert_array_equal(sharpen(img), img)


def test_sharpen_matches_hand_computed_interior_pixel() -> None:
    img = np.zeros((3, 3, 3), np.uint8)
    img[:, :, 0] = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    img[:, :, 1] = [[0, 0, 0], [0, 100, 0], [0, 0, 0]]
    img[:, :, 2] = [[200, 200, 200], [200, 10, 200], [200, 200, 200]]
    out = sharpen(img)
    # R: 9*50 - (10+20+30+40+60+70+80+90) = 450 - 400 = 50
    # G: 9*100 - 0 = 900 -> saturates at 255;  B: 9*10 - 1600 -> saturates at 0
    assert tuple(out[1, 1]) == (50, 255, 0)
    assert out.dtype == np.uint8 and out.shape == img.shape


def test_resize_shapes_and_interpolation() -> None:
    img = _noisy((40, 30), (100, 100, 100), 20)
    small = resize(img, 10)
    big = resize(img, 64)
    assert small.shape == (10, 10, 3) and big.shape == (64, 64, 3)
    assert small.dtype == np.uint8 and big.dtype == np.uint8
    np.testing.assert_array_equal(small, cv2.resize(img, (10, 10), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(big, cv2.resize(img, (64, 64), interpolation=cv2.INTER_CUBIC))
    same = np.zeros((5, 5, 3), np.uint8)
    assert resize(same, 5) is not same  # always a new array


def test_resize_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        resize(np.zeros((4, 4, 3), np.uint8), 0)


def test_denoise_reduces_noise_on_a_flat_image() -> None:
    img = _noisy((32, 32), (128, 128, 128), 12)
    out = denoise(img, **FAST_DENOISE)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert out.astype(np.float32).std() < 0.5 * img.astype(np.float32).std()
    assert abs(float(out.mean()) - float(img.mean())) < 3


def test_denoise_keeps_rgb_channel_order() -> None:
    red = _noisy((24, 24), (220, 20, 20), 6, seed=1)
    out = denoise(red, **FAST_DENOISE)
    mean = out.reshape(-1, 3).mean(axis=0)
    assert mean[0] > 200 and mean[1] < 40 and mean[2] < 40
    # The result is OpenCV's denoiser applied in BGR order, which differs from feeding RGB as BGR.
    colourful = _noisy((24, 24), (200, 90, 30), 15, seed=2)
    expected = cv2.cvtColor(
        cv2.fastNlMeansDenoisingColored(
            cv2.cvtColor(colourful, cv2.COLOR_RGB2BGR), None, 15, 15, 3, 7
        ),
        cv2.COLOR_BGR2RGB,
    )
    wrong = cv2.fastNlMeansDenoisingColored(colourful, None, 15, 15, 3, 7)
    got = denoise(colourful, **FAST_DENOISE)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, wrong)


def test_denoise_rejects_even_window() -> None:
    with pytest.raises(ValueError, match="denoise_template_window"):
        denoise(np.zeros((8, 8, 3), np.uint8), h=3, h_color=3, template_window=4, search_window=7)


def test_apply_preprocess_runs_resize_then_denoise_then_sharpen() -> None:
    img = _noisy((30, 30), (150, 100, 80), 10, seed=3)
    cfg = PreprocessConfig(
        size=16,
        denoise=True,
        denoise_h=15,
        denoise_h_color=15,
        denoise_template_window=3,
        denoise_search_window=7,
        sharpen=True,
    )
    out = apply_preprocess(img, cfg)
    expected = sharpen(denoise(resize(img, 16), **FAST_DENOISE))
    np.testing.assert_array_equal(out, expected)
    other_order = resize(denoise(sharpen(img), **FAST_DENOISE), 16)
    assert not np.array_equal(out, other_order)


def test_apply_preprocess_steps_can_be_switched_off() -> None:
    img = _noisy((12, 10), (90, 90, 90), 10)
    out = apply_preprocess(img, PreprocessConfig(resize=False))
    np.testing.assert_array_equal(out, img)
    assert out is not img
    only_sharpen = apply_preprocess(img, PreprocessConfig(resize=False, sharpen=True))
    np.testing.assert_array_equal(only_sharpen, sharpen(img))


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (np.zeros((8, 8), np.uint8), "(8, 8)"),
        (np.zeros((8, 8, 4), np.uint8), "(8, 8, 4)"),
        (np.zeros((8, 8, 3), np.float32), "float32"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_apply_preprocess_validates_the_array_contract(bad: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        apply_preprocess(bad, PreprocessConfig(size=4))  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_preprocess_params_holds_pixel_fields_and_version_only() -> None:
    cfg = PreprocessConfig(size=32, denoise=True, cache_dir="/somewhere", workers=3)
    params = preprocess_params(cfg)
    assert params["version"] == PREPROCESS_VERSION
    assert params["size"] == 32 and params["denoise"] is True
    assert "cache_dir" not in params and "workers" not in params
    rebuilt = config_from_params(params)
    assert rebuilt == dataclasses.replace(cfg, cache_dir=None, workers=0)
    with pytest.raises(ValueError, match="version"):
        config_from_params({**params, "version": PREPROCESS_VERSION + 1})


def test_params_key_changes_only_with_pixel_changing_parameters() -> None:
    base = PreprocessConfig(size=32, denoise=True)
    key = params_key(base)
    assert len(key) == 16 and key == params_key(PreprocessConfig(size=32, denoise=True))
    same = [
        dataclasses.replace(base, cache_dir="/elsewhere"),
        dataclasses.replace(base, workers=7),
        dataclasses.replace(base, denoise_h=10),  # int vs float 10.0
    ]
    for cfg in same:
        assert params_key(cfg) == key
    different = [
        dataclasses.replace(base, size=33),
        dataclasses.replace(base, denoise_h=11.0),
        dataclasses.replace(base, denoise_search_window=11),
        dataclasses.replace(base, sharpen=True),
        dataclasses.replace(base, denoise=False),
        dataclasses.replace(base, resize=False),
    ]
    keys = {params_key(cfg) for cfg in different}
    assert key not in keys and len(keys) == len(different)
    # parameters of a switched-off step do not split the cache
    off = PreprocessConfig(size=32, denoise=False)
    assert params_key(off) == params_key(dataclasses.replace(off, denoise_h=3.0))


def test_center_crop_keeps_the_centred_square_of_the_shorter_side() -> None:
    img = np.arange(12 * 16 * 3, dtype=np.uint32).reshape(12, 16, 3).astype(np.uint8)
    out = center_crop(img, 0.5)  # side 6 of the shorter 12: rows 3..8, columns 5..10
    np.testing.assert_array_equal(out, img[3:9, 5:11])
    np.testing.assert_array_equal(center_crop(img, 1.0), img[:, 2:14])
    for bad in (0.0, 1.5, -0.2, True):
        with pytest.raises(ValueError, match="preprocess.crop"):
            center_crop(img, bad)  # type: ignore[arg-type]


def test_crop_runs_before_resize_and_never_aliases_the_input() -> None:
    img = _noisy((36, 40), (90, 140, 200), 30)
    cfg = PreprocessConfig(size=32, crop=0.75)
    np.testing.assert_array_equal(apply_preprocess(img, cfg), resize(img[4:31, 6:33], 32))
    # the crop alone of a tall image is a contiguous view of its rows; the result must still be
    # a new array
    tall = _noisy((40, 36), (90, 140, 200), 30)
    only = apply_preprocess(tall, PreprocessConfig(resize=False, crop=1.0))
    assert not np.shares_memory(only, tall) and only.flags.c_contiguous
    np.testing.assert_array_equal(only, tall[2:38])


def test_crop_is_stored_only_when_on_so_older_bundles_and_caches_read_the_same() -> None:
    off = PreprocessConfig(size=32)
    assert "crop" not in preprocess_params(off)
    # a bundle written before the crop existed (no key) rebuilds the same config and cache key
    assert config_from_params(preprocess_params(off)) == off
    on = dataclasses.replace(off, crop=0.75)
    params = preprocess_params(on)
    assert params["crop"] == 0.75 and config_from_params(params) == on
    assert params_key(on) != params_key(off)
    # 1 and 1.0 crop the same pixels: one cache entry
    assert params_key(dataclasses.replace(off, crop=1)) == params_key(
        dataclasses.replace(off, crop=1.0)
    )


def test_bundle_parameters_are_checked_when_read() -> None:
    params = preprocess_params(PreprocessConfig(size=32, crop=0.5))
    assert config_from_params({**params, "crop": "0.5"}).crop == 0.5  # hand-edited, still valid
    with pytest.raises(ValueError, match=r"preprocess.crop: must be in \(0, 1\], got 2"):
        config_from_params({**params, "crop": 2})


def test_is_grayscale_tells_gray_files_from_every_real_stained_cell(tmp_path: Path) -> None:
    """Every bundled real cell is colour; the same cells made gray (one channel repeated, or an
    RGB JPEG of a gray image) are gray, also after the paper's preprocessing (denoise,
    sharpen, resize), which is where ``predict`` looks."""
    from PIL import Image

    from marrowscope.data.sample import SAMPLE_ROOT
    from marrowscope.preprocess.ops import is_grayscale
    from marrowscope.utils.image import read_image

    files = sorted(SAMPLE_ROOT.glob("*/*.jpg"))
    assert len(files) >= 100
    paper = PreprocessConfig(size=64, denoise=True, sharpen=True)
    for i, f in enumerate(files):
        rgb = read_image(f)
        assert not is_grayscale(rgb), f
        if i % 12:
            continue
        gray = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[:, :, None], 3, axis=2)
        assert is_grayscale(gray), f
        jpeg = tmp_path / f"{f.stem}.jpg"
        Image.fromarray(gray).save(jpeg, quality=85)  # stored as a 3-channel JPEG
        assert is_grayscale(read_image(jpeg)), f
        assert is_grayscale(apply_preprocess(read_image(jpeg), paper)), f
        assert not is_grayscale(apply_preprocess(rgb, paper)), f
