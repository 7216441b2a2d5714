"""Training augmentation and evaluation transforms (torchvision.transforms.v2).

Contract: input is an image already at the preprocessed size, as a CHW ``uint8`` tensor or an HWC
``uint8`` numpy array (RGB); output is a plain ``float32`` CHW tensor in [0, 1] (the model
normalises it itself). Geometric and colour operations run on ``uint8``; the conversion to float
comes last.

Randomness comes from torch's global RNG, so ``torch.manual_seed(s)`` before a call makes the
output repeatable (DataLoader workers are seeded from it too).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from marrowscope.config import AugmentConfig, validate

__all__ = [
    "BatchMix",
    "RandomRot90",
    "RandomStainJitter",
    "eval_transform",
    "to_tensor_image",
    "train_transform",
]


def to_tensor_image(arr: np.ndarray) -> torch.Tensor:
    """RGB HWC ``uint8`` array -> CHW ``uint8`` tensor (contiguous copy).

    Raises:
        ValueError: not an ``(H, W, 3)`` ``uint8`` array.
    """
    a = np.asarray(arr)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(
            f"expected an RGB image as an (H, W, 3) uint8 array, got shape {a.shape} dtype "
            f"{a.dtype}; read images with marrowscope.utils.image.read_image"
        )
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


class RandomRot90(v2.Transform):
    """Rotate by a random multiple of 90 degrees (k uniform in 0..3); lossless, no interpolation."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or params["k"] == 0:
            return inpt
        out = torch.rot90(inpt, params["k"], dims=(-2, -1))
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


# Ruifrok & Johnston colour deconvolution matrix (rows: haematoxylin, eosin, DAB optical-density
# vectors), the one scikit-image's rgb2hed uses. Romanowsky-type stains (May-Gruenwald-Giemsa)
# are also a blue/purple + pink pair, so jittering along these axes mimics stain variation.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


class RandomStainJitter(v2.Transform):
    """Random stain variation in HED optical-density space (Tellez et al. 2018, "HED-light").

    The image is converted to optical density ``-log(I / 255)``, projected on the three stain
    vectors, each stain channel is multiplied by ``U(1 - strength, 1 + strength)`` and shifted by
    ``U(-strength, strength)``, then converted back. ``uint8`` CHW in, ``uint8`` CHW out.

    Args:
        strength: jitter magnitude (0.05 is "light"); 0 returns the input unchanged.
    """

    def __init__(self, strength: float) -> None:
        super().__init__()
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"augment.stain must be in [0, 1]; got {strength}")
        self.strength = strength

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        s = self.strength
        return {
            "alpha": 1.0 + (torch.rand(3) * 2 - 1) * s,
            "beta": (torch.rand(3) * 2 - 1) * s,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or self.strength == 0:
            return inpt
        x = inpt.to(torch.float32).clamp_(min=1.0).div_(255.0)
        od = -torch.log(x)  # (3, H, W)
        hed = torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB)
        hed = hed * params["alpha"][:, None, None] + params["beta"][:, None, None]
        od = torch.einsum("dhw,dc->chw", hed, _RGB_FROM_HED)
        out = torch.exp(-od).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class BatchMix:
    """MixUp / CutMix on whole training batches (torchvision ``v2.MixUp`` / ``v2.CutMix``).

    Called with a float image batch and integer labels, it returns the (possibly) mixed batch and
    soft labels ``(N, K)``; with probability ``1 - mix_prob`` the batch passes unmixed (one-hot
    labels). When both alphas are > 0, one of the two is picked per batch.
    """

    def __init__(self, aug: AugmentConfig, num_classes: int) -> None:
        validate(aug)  # the alphas and mix_prob are checked with the config (AugmentConfig)
        ops: list[Any] = []
        if aug.mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
        if aug.cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
        if not ops:
            raise ValueError("BatchMix needs augment.mixup_alpha or augment.cutmix_alpha > 0")
        self.num_classes = num_classes
        self.prob = aug.mix_prob
        self.op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    @staticmethod
    def enabled(aug: AugmentConfig) -> bool:
        return aug.mixup_alpha > 0 or aug.cutmix_alpha > 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if float(torch.rand(())) >= self.prob:
            return x, torch.nn.functional.one_hot(y, self.num_classes).to(x.dtype)
        return self.op(x, y)


class _EnsureImage(v2.Transform):
    """HWC uint8 numpy array or CHW tensor -> ``tv_tensors.Image`` (CHW)."""

    _transformed_types = (torch.Tensor, np.ndarray)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, np.ndarray):
            return v2.functional.to_image(to_tensor_image(inpt))
        if isinstance(inpt, torch.Tensor):
            if inpt.ndim != 3 or inpt.shape[0] != 3:
                raise ValueError(
                    f"expected a CHW image tensor with 3 channels, got shape {tuple(inpt.shape)}"
                )
            return v2.functional.to_image(inpt)
        raise TypeError(f"expected a numpy array or a torch tensor, got {type(inpt).__name__}")


def train_transform(aug: AugmentConfig, size: int) -> v2.Compose:
    """Random augmentation for training, with magnitudes from ``aug``.

    Steps (each only when enabled): horizontal/vertical flip, random rot90, random rotation
    (+/- ``aug.rotation`` degrees, bilinear, black corners), random resized crop (area
    ``aug.zoom``, aspect 0.9-1.1, antialiased; otherwise a resize to ``size`` if needed), colour
    jitter, stain (HED) jitter, then float32 in [0, 1]. MixUp/CutMix act on
    whole batches: see :class:`BatchMix`.

    Raises:
        ConfigError: an out-of-range setting (named ``augment.<key>``; the ranges are those of
            :class:`~marrowscope.config.AugmentConfig`, checked here too for a config built in
            code).
    """
    validate(aug)
    steps: list[Any] = [_EnsureImage()]
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        steps.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rot90:
        steps.append(RandomRot90())
    if aug.rotation > 0:
        steps.append(v2.RandomRotation(aug.rotation, interpolation=v2.InterpolationMode.BILINEAR))
    if tuple(aug.zoom) != (1.0, 1.0):
        steps.append(
            v2.RandomResizedCrop(size, scale=tuple(aug.zoom), ratio=(0.9, 1.1), antialias=True)
        )
    else:
        steps.append(v2.Resize((size, size), antialias=True))  # no-op at the right size
    if any(v > 0 for v in (aug.brightness, aug.contrast, aug.saturation, aug.hue)):
        steps.append(
            v2.ColorJitter(
                brightness=aug.brightness or None,
                contrast=aug.contrast or None,
                saturation=aug.saturation or None,
                hue=aug.hue or None,
            )
        )
    if aug.stain > 0:
        steps.append(RandomStainJitter(aug.stain))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]
    return v2.Compose(steps)


def eval_transform(size: int) -> v2.Compose:
    """Deterministic evaluation transform: to float32 in [0, 1], resized only if not ``size``."""
    return v2.Compose(
        [
            _EnsureImage(),
            v2.Resize((size, size), antialias=True),  # returns the input when already at size
            v2.ToDtype(torch.float32, scale=True),
            v2.ToPureTensor(),
        ]
    )
