"""Device and precision choice: a wrong name is a DeviceError (one line on the command line)."""

from __future__ import annotations

import pytest
import torch

from marrowscope.utils.runtime import DeviceError, resolve_device, resolve_precision


def test_unknown_device_is_a_config_error() -> None:
    with pytest.raises(DeviceError, match="unknown device 'gpu'; use --device auto, cpu or cuda"):
        resolve_device("gpu")


def test_cuda_without_a_gpu_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA GPU is visible; use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_bad_precision_is_a_config_error() -> None:
    with pytest.raises(DeviceError, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(DeviceError, match="fp16 is for CUDA"):
        resolve_precision("fp16", torch.device("cpu"))
