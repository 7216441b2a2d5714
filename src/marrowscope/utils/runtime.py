"""Seeding, device and numeric-precision selection (imports torch)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch


class DeviceError(ValueError):
    """An unknown or unavailable device or precision; the message names the value and the fix
    (the command line shows it as one line)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 matrix work natively (AVX512-BF16 or AMX)."""
    try:
        amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        avx512bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    except Exception:  # pragma: no cover - very old torch
        return False
    return amx or avx512bf16


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available else CPU.

    Raises:
        DeviceError: an unknown device name, or ``cuda`` without a visible GPU (the command line
            shows it as one line, without a traceback).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {name!r}; use --device auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu (or auto)"
        )
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    """How to run the network: autocast dtype (None = fp32) and memory format."""

    dtype: torch.dtype | None
    channels_last: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device):  # type: ignore[no-untyped-def]
        """A context manager: autocast in :attr:`dtype`, or a no-op for fp32."""
        if self.dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device, channels_last: bool = True) -> Precision:
    """Pick the autocast dtype: ``auto`` = bf16 on CUDA and on CPUs with native bf16, else fp32.

    Raises:
        DeviceError: an unknown precision, or fp16 on a CPU.
    """
    dtype: torch.dtype | None
    if name == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16 if cpu_has_native_bf16() else None
    elif name == "fp32":
        dtype = None
    elif name == "bf16":
        dtype = torch.bfloat16
    elif name == "fp16":
        if device.type == "cpu":
            raise DeviceError("precision fp16 is for CUDA; on a CPU use bf16 or fp32")
        dtype = torch.float16
    else:
        raise DeviceError(f"unknown precision {name!r}; use auto, fp32, bf16 or fp16")
    return Precision(dtype=dtype, channels_last=channels_last)


def set_threads(n: int) -> None:
    """Set torch intra-op threads when ``n > 0``."""
    if n > 0:
        torch.set_num_threads(n)
