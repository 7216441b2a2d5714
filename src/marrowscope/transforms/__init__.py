"""marrowscope.transforms: training augmentation and evaluation transforms (torchvision v2)."""

from __future__ import annotations

from marrowscope.transforms.augment import eval_transform, to_tensor_image, train_transform

__all__ = ["eval_transform", "to_tensor_image", "train_transform"]
