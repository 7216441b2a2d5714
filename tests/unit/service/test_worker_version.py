"""The model version the review app records on every classified cell."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from marrowscope.service.worker import _weights_digest
from marrowscope.utils.io import file_sha256


def test_an_int8_model_loaded_from_its_bundle_has_its_own_version(tmp_path: Path) -> None:
    """``serve CK --backend int8`` must not record the fp32 weights' version: the int8 model
    calls some cells differently, and the audit trail has to say which model called them."""
    bundle = tmp_path / "best"
    (bundle / "int8").mkdir(parents=True)
    (bundle / "model.safetensors").write_bytes(b"fp32 weights")
    (bundle / "int8" / "model.bin").write_bytes(b"int8 weights")
    fp32 = SimpleNamespace(checkpoint=str(bundle))
    int8 = SimpleNamespace(checkpoint=str(bundle), int8_path_=bundle / "int8" / "model.bin")
    assert _weights_digest(fp32) == file_sha256(bundle / "model.safetensors")
    assert _weights_digest(int8) == file_sha256(bundle / "int8" / "model.bin")
