"""Stain (HED) jitter and batch MixUp/CutMix."""

from __future__ import annotations

import pytest
import torch

from marrowscope.config import AugmentConfig
from marrowscope.transforms.augment import BatchMix, RandomStainJitter, train_transform


def _image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(30, 230, (3, 24, 24), dtype=torch.uint8, generator=g)


def test_stain_jitter_changes_colour_repeatably_and_keeps_uint8() -> None:
    x = _image()
    t = RandomStainJitter(0.1)
    torch.manual_seed(1)
    a = t(x)
    torch.manual_seed(1)
    b = t(x)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b)
    assert (a.int() - x.int()).abs().float().mean() > 1.0


def test_stain_jitter_of_zero_strength_is_identity_up_to_rounding() -> None:
    x = _image()
    y = RandomStainJitter(1e-12)(x)
    assert (y.int() - x.int()).abs().max() <= 1
    assert RandomStainJitter(0.0)(x) is x


def test_stain_strength_is_validated() -> None:
    with pytest.raises(ValueError, match="augment.stain"):
        train_transform(AugmentConfig(stain=2.0), 24)


def test_batch_mix_gives_soft_labels_that_sum_to_one() -> None:
    mix = BatchMix(AugmentConfig(mixup_alpha=0.4, cutmix_alpha=1.0), num_classes=4)
    x = torch.rand(8, 3, 16, 16)
    y = torch.arange(8) % 4
    torch.manual_seed(0)
    xm, ym = mix(x, y)
    assert xm.shape == x.shape and ym.shape == (8, 4)
    torch.testing.assert_close(ym.sum(1), torch.ones(8))
    assert not torch.equal(xm, x)


def test_batch_mix_with_probability_zero_passes_the_batch_through() -> None:
    mix = BatchMix(AugmentConfig(mixup_alpha=0.4, mix_prob=0.0), num_classes=3)
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    xm, ym = mix(x, y)
    assert torch.equal(xm, x)
    assert torch.equal(ym.argmax(1), y) and torch.equal(ym.sum(1), torch.ones(4))


def test_batch_mix_needs_an_alpha() -> None:
    assert not BatchMix.enabled(AugmentConfig())
    with pytest.raises(ValueError, match="mixup_alpha"):
        BatchMix(AugmentConfig(), num_classes=3)
