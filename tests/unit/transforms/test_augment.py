"""Augmentation and evaluation transforms: contract, magnitudes, seeded reproducibility."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from marrowscope.config import AugmentConfig
from marrowscope.transforms.augment import (
    RandomRot90,
    eval_transform,
    to_tensor_image,
    train_transform,
)

torch.set_num_threads(1)
SIZE = 24
OFF = AugmentConfig(
    hflip=0.0, vflip=0.0, rot90=False, rotation=0.0, zoom=(1.0, 1.0), brightness=0.0, contrast=0.0
)


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def _float(img: np.ndarray) -> torch.Tensor:
    """The reference [0, 1] conversion (torchvision's scaling: x * (1 / 255))."""
    ref = v2.functional.to_dtype(torch.from_numpy(img).permute(2, 0, 1), torch.float32, scale=True)
    torch.testing.assert_close(ref * 255, torch.from_numpy(img).permute(2, 0, 1).float())
    return ref


def test_to_tensor_image(image: np.ndarray) -> None:
    t = to_tensor_image(image)
    assert t.shape == (3, SIZE, SIZE) and t.dtype == torch.uint8
    assert t[1, 5, 7] == image[5, 7, 1]
    with pytest.raises(ValueError, match="uint8"):
        to_tensor_image(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        to_tensor_image(image[:, :, 0])


def test_train_transform_output_contract(image: np.ndarray) -> None:
    tf = train_transform(AugmentConfig(rotation=15.0, saturation=0.1, hue=0.05), SIZE)
    out = tf(to_tensor_image(image))
    assert type(out) is torch.Tensor
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_train_transform_is_reproducible_with_a_seed(image: np.ndarray) -> None:
    tf = train_transform(AugmentConfig(rotation=10.0), SIZE)
    x = to_tensor_image(image)
    torch.manual_seed(7)
    a = tf(x)
    torch.manual_seed(7)
    b = tf(x)
    torch.manual_seed(8)
    c = tf(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_numpy_and_tensor_inputs_agree(image: np.ndarray) -> None:
    tf = train_transform(AugmentConfig(), SIZE)
    torch.manual_seed(3)
    a = tf(image)
    torch.manual_seed(3)
    b = tf(to_tensor_image(image))
    assert torch.equal(a, b)


def test_everything_off_is_just_scaling(image: np.ndarray) -> None:
    tf = train_transform(OFF, SIZE)
    assert not any(isinstance(t, v2.ColorJitter | RandomRot90) for t in tf.transforms)
    torch.testing.assert_close(tf(image), _float(image), rtol=0, atol=0)


def test_flips_follow_the_config(image: np.ndarray) -> None:
    h = train_transform(dataclasses.replace(OFF, hflip=1.0), SIZE)(image)
    v = train_transform(dataclasses.replace(OFF, vflip=1.0), SIZE)(image)
    torch.testing.assert_close(h, _float(image).flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(v, _float(image).flip(-2), rtol=0, atol=0)


def test_rot90_is_lossless_and_uses_all_four_angles(image: np.ndarray) -> None:
    tf = train_transform(dataclasses.replace(OFF, rot90=True), SIZE)
    ref = _float(image)
    rotations = [torch.rot90(ref, k, dims=(-2, -1)) for k in range(4)]
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = tf(image)
        matches = [k for k, r in enumerate(rotations) if torch.equal(out, r)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_zoom_and_colour_jitter_change_the_image(image: np.ndarray) -> None:
    zoom = train_transform(dataclasses.replace(OFF, zoom=(0.5, 0.6)), SIZE)
    jitter = train_transform(dataclasses.replace(OFF, brightness=0.5), SIZE)
    assert any(isinstance(t, v2.RandomResizedCrop) for t in zoom.transforms)
    cj = [t for t in jitter.transforms if isinstance(t, v2.ColorJitter)]
    assert len(cj) == 1 and cj[0].brightness == (0.5, 1.5) and cj[0].contrast is None
    torch.manual_seed(0)
    assert zoom(image).shape == (3, SIZE, SIZE)
    assert not torch.equal(zoom(image), _float(image))
    assert not torch.equal(jitter(image), _float(image))


def test_train_transform_resizes_when_zoom_is_off(image: np.ndarray) -> None:
    assert train_transform(OFF, 16)(image).shape == (3, 16, 16)


def test_invalid_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match="augment.zoom"):
        train_transform(dataclasses.replace(OFF, zoom=(0.9, 0.5)), SIZE)
    with pytest.raises(ValueError, match="augment.hflip"):
        train_transform(dataclasses.replace(OFF, hflip=1.5), SIZE)


def test_eval_transform_is_deterministic_scaling(image: np.ndarray) -> None:
    tf = eval_transform(SIZE)
    a, b = tf(image), tf(to_tensor_image(image))
    assert a.dtype == torch.float32 and type(a) is torch.Tensor
    torch.testing.assert_close(a, _float(image), rtol=0, atol=0)
    assert torch.equal(a, b)


def test_eval_transform_resizes_only_when_needed(image: np.ndarray) -> None:
    out = eval_transform(12)(image)
    assert out.shape == (3, 12, 12)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
