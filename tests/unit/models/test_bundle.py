"""Checkpoint bundle: round trip, atomic replace, crash recovery, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import marrowscope
from marrowscope.config import ModelConfig
from marrowscope.models.bundle import (
    BUNDLE_FORMAT,
    BundleError,
    load_bundle,
    read_metadata,
    save_bundle,
)
from marrowscope.models.registry import Classifier, build_model

torch.set_num_threads(1)
CLASSES = ["BLA", "LYT", "NGS"]


def _model(name: str = "paper_cnn", seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=name, pretrained=False), len(CLASSES), input_size=32)
    # Non-trivial BatchNorm statistics, so the round trip covers buffers too.
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    return model.eval()


def _x() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", ["paper_cnn", "tf_efficientnet_lite0"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, name: str) -> None:
    model = _model(name)
    extra = {
        "classes": CLASSES,
        "epoch": 3,
        "metrics": {"f1": np.float32(0.5)},
        "preprocess": {"size": 32},
    }
    out = save_bundle(tmp_path / "best", model, extra)
    assert out == tmp_path / "best"
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.safetensors"]
    loaded, meta = load_bundle(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), model(_x()), rtol=0, atol=0)
    assert not loaded.training and loaded.classes == tuple(CLASSES)
    assert loaded.arch == name and loaded.mean == model.mean and loaded.std == model.std
    assert meta.format == BUNDLE_FORMAT
    assert meta.marrowscope_version == marrowscope.__version__
    assert meta.architecture.name == name and meta.arch == name
    assert meta.classes == tuple(CLASSES) and meta.input_size == 32
    assert meta.mean == model.mean and meta.epoch == 3 and meta.weights_dtype == "float32"
    assert meta.metrics == {"f1": 0.5} and meta.preprocess == {"size": 32}
    assert read_metadata(out) == meta
    on_disk = json.loads((out / "metadata.json").read_text())
    assert on_disk["architecture"]["name"] == name and on_disk["classes"] == CLASSES
    assert not list(tmp_path.glob(".best.tmp-*")) and not (tmp_path / "best.old").exists()


def test_weights_are_contiguous_cpu_fp32(tmp_path: Path) -> None:
    model = _model("tf_efficientnet_lite0").to(memory_format=torch.channels_last)
    save_bundle(tmp_path / "b", model, {"classes": CLASSES})
    tensors = load_file(str(tmp_path / "b" / "model.safetensors"))
    floats = [t for t in tensors.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 and t.is_contiguous() for t in floats)
    assert set(tensors) == set(model.state_dict())


def test_classes_from_the_model_and_count_checked(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(ValueError, match="class names"):
        save_bundle(tmp_path / "b", model, {})
    with pytest.raises(ValueError, match="2 class names"):
        save_bundle(tmp_path / "b", model, {"classes": CLASSES[:2]})
    model.classes = tuple(CLASSES)
    save_bundle(tmp_path / "b", model, {})
    assert read_metadata(tmp_path / "b").classes == tuple(CLASSES)


def test_save_replaces_an_existing_bundle(tmp_path: Path) -> None:
    save_bundle(tmp_path / "last", _model(seed=0), {"classes": CLASSES, "epoch": 1})
    second = _model(seed=1)
    save_bundle(tmp_path / "last", second, {"classes": CLASSES, "epoch": 2})
    loaded, meta = load_bundle(tmp_path / "last")
    assert meta.epoch == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), second(_x()), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_crash_recovery_from_old_folder(tmp_path: Path) -> None:
    model = _model()
    save_bundle(tmp_path / "best", model, {"classes": CLASSES})
    # A crash between "rename old away" and "rename new in" leaves only best.old (+ a temp dir).
    (tmp_path / "best").rename(tmp_path / "best.old")
    (tmp_path / ".best.tmp-dead").mkdir()
    loaded, _ = load_bundle(tmp_path / "best")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), model(_x()), rtol=0, atol=0)
    assert (tmp_path / "best").is_dir() and not (tmp_path / "best.old").exists()
    save_bundle(tmp_path / "best", model, {"classes": CLASSES})  # cleans the stale temp dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_usual_permissions_like_atomic_write(
    tmp_path: Path, umask: int
) -> None:
    """safetensors creates its file 0600; a saved bundle (trained, or packed to ship) must be
    readable as any file marrowscope writes: 0666 less the umask."""
    import os

    from marrowscope.utils.io import atomic_write_text

    old = os.umask(umask)
    try:
        save_bundle(tmp_path / "b", _model(), {"classes": CLASSES})
        atomic_write_text(tmp_path / "plain.txt", "x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == want
    for name in ("model.safetensors", "metadata.json"):
        assert (tmp_path / "b" / name).stat().st_mode & 0o777 == want, name


def test_saving_never_changes_the_process_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the umask with os.umask set it to 0 for a moment on every save, and a file
    another thread (the review service) created then got mode 0666; it is now read without
    being set, and still follows a umask set after import."""
    import os

    from marrowscope.utils import io

    if io._proc_umask() is None:
        pytest.skip("no Umask line in /proc/self/status on this system")
    old = os.umask(0o027)
    calls: list[int] = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or real_umask(m))
    try:
        save_bundle(tmp_path / "b", _model(), {"classes": CLASSES})
        io.atomic_write_text(tmp_path / "plain.txt", "x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert calls == []
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b" / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="refusing to replace"):
        save_bundle(run, _model(), {"classes": CLASSES})
    assert (run / "notes.txt").read_text() == "keep me"


def test_unserialisable_metadata_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON"):
        save_bundle(tmp_path / "b", _model(), {"classes": CLASSES, "bad": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return save_bundle(tmp_path / "best", _model(), {"classes": CLASSES})


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no checkpoint bundle") as e:
        load_bundle(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_weights_file_instead_of_folder(bundle: Path) -> None:
    with pytest.raises(BundleError, match="pass the folder"):
        load_bundle(bundle / "model.safetensors")


def test_missing_metadata(bundle: Path) -> None:
    (bundle / "metadata.json").unlink()
    with pytest.raises(BundleError, match=r"metadata\.json: missing"):
        load_bundle(bundle)


def test_corrupt_metadata(bundle: Path) -> None:
    (bundle / "metadata.json").write_text('{"format": 1, "classes": [')
    with pytest.raises(BundleError, match="corrupt JSON"):
        load_bundle(bundle)


def test_metadata_without_required_keys(bundle: Path) -> None:
    meta = json.loads((bundle / "metadata.json").read_text())
    del meta["classes"]
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="classes"):
        read_metadata(bundle)


def test_newer_format_asks_for_an_upgrade(bundle: Path) -> None:
    meta = json.loads((bundle / "metadata.json").read_text())
    meta.update(format=BUNDLE_FORMAT + 1, marrowscope_version="9.0.0")
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"written by marrowscope 9\.0\.0.*upgrade"):
        load_bundle(bundle)


def test_missing_weights(bundle: Path) -> None:
    (bundle / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors: missing"):
        load_bundle(bundle)


def test_corrupt_weights(bundle: Path) -> None:
    path = bundle / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BundleError, match="corrupt weights"):
        load_bundle(bundle)


def test_weights_that_do_not_match_the_architecture(bundle: Path) -> None:
    meta = json.loads((bundle / "metadata.json").read_text())
    meta["classes"] = [*CLASSES, "EXTRA"]
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="do not match architecture 'paper_cnn'"):
        load_bundle(bundle)


def test_unknown_architecture_key(bundle: Path) -> None:
    meta = json.loads((bundle / "metadata.json").read_text())
    meta["architecture"]["future_option"] = 1
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="invalid 'architecture'"):
        load_bundle(bundle)
