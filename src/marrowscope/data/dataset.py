"""Torch dataset over preprocessed, in-memory cell images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class CellDataset(Dataset):
    """Pairs of (image tensor, label index) built from preprocessed RGB HWC uint8 arrays.

    Args:
        images: preprocessed images (RGB, HWC, uint8), all the same size.
        labels: class index per image.
        transform: callable on a CHW uint8 tensor, returning a float CHW tensor in [0, 1].
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = list(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        return self.transform(img), int(self.labels[index])
