"""Packing a trained bundle as a shipped model: fp16 storage with a parity check, the model card,
the sha256 index, and resolving the name wherever a checkpoint is expected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLE_CLASSES, make_bundle, write_synthetic_tree
from rich.console import Console
from safetensors import safe_open

from marrowscope.engine.pretrained import CARD_NAME, pack_pretrained, update_card
from marrowscope.inference.predictor import Predictor
from marrowscope.models import bundle as bundle_mod
from marrowscope.models.bundle import BundleError, load_bundle, pretrained_bundle, read_metadata

CARD = {
    "intended_use": ["Research only."],
    "data": ["Synthetic cells."],
    "attribution": ["Nobody's."],
    "limits": ["No hairy cells."],
    "license": "CC-BY-4.0",
    "train_command": "marrowscope train --config tiny.yaml",
    "results_note": "Tiny.",
}


@pytest.fixture
def packed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A tiny bundle packed as the shipped model ``tiny`` in a temporary model folder."""
    root = tmp_path / "pretrained"
    monkeypatch.setattr(bundle_mod, "PRETRAINED_DIR", root)
    val = write_synthetic_tree(tmp_path / "val", per_class=4, size=40)  # classes AAA, BBB, CCC
    src = make_bundle(tmp_path / "bundle")
    out = pack_pretrained(
        src,
        "tiny",
        val_source=val,
        description="a tiny test model",
        card=CARD,
        out_root=root,
        console=Console(quiet=True),
    )
    return src, out


def test_pack_writes_fp16_weights_card_and_index(packed: tuple[Path, Path]) -> None:
    src, out = packed
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    assert "torch.float16" in {str(d) for d in dtypes}
    assert "torch.float32" not in {str(d) for d in dtypes}
    meta = read_metadata(out)
    assert meta.weights_dtype == "float16"
    pre = meta.pretrained
    assert pre["name"] == "tiny" and pre["evaluation"]["n"] == 12
    assert 0 <= pre["fp16_parity"]["max_abs_diff"] <= 1e-3
    assert pre["fp16_parity"]["images"] == 12
    index = json.loads((out.parent / "index.json").read_text())
    assert set(index["tiny"]["files"]) == {"model.safetensors", "metadata.json"}
    card = (out / CARD_NAME).read_text()
    assert "# tiny: a tiny test model" in card
    for cls in BUNDLE_CLASSES:
        assert f"| {cls} |" in card  # per-class row
    assert "No hairy cells." in card and "marrowscope train --config tiny.yaml" in card
    # the shipped fp16 model predicts what the fp32 original predicts, to within 1e-3
    cells = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8) for i in range(6)]
    a = Predictor.from_checkpoint(src, device="cpu", precision="fp32").predict_proba(cells)
    b = Predictor.from_checkpoint(out, device="cpu", precision="fp32").predict_proba(cells)
    assert np.abs(a - b).max() <= 1e-3
    model, _ = load_bundle(out)
    assert all(
        p.dtype.is_floating_point and str(p.dtype) == "torch.float32" for p in model.parameters()
    )


def test_a_shipped_name_works_wherever_a_checkpoint_does(packed: tuple[Path, Path]) -> None:
    _, out = packed
    p = Predictor.from_pretrained("tiny", device="cpu")
    assert p.classes_ == BUNDLE_CLASSES
    assert Predictor.from_checkpoint("tiny", device="cpu").classes_ == BUNDLE_CLASSES
    assert read_metadata("tiny").pretrained["name"] == "tiny"
    assert pretrained_bundle("tiny") == out


def test_unknown_pretrained_name_lists_the_shipped_ones(packed: tuple[Path, Path]) -> None:
    with pytest.raises(BundleError, match=r"unknown pretrained model 'bm9'; shipped models: tiny"):
        Predictor.from_pretrained("bm9")
    with pytest.raises(BundleError, match=r"no shipped model of that name \(tiny\)"):
        Predictor.from_checkpoint("bm9")


def test_a_damaged_shipped_file_is_refused_by_sha256(packed: tuple[Path, Path]) -> None:
    _, out = packed
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"sha256 .* shipped model 'tiny'.*reinstall"):
        Predictor.from_pretrained("tiny")
    # by its folder in the package too, on every backend that loads it (torch here)
    with pytest.raises(BundleError, match=r"sha256 .* shipped model 'tiny'.*reinstall"):
        Predictor.from_checkpoint(out, device="cpu")
    with pytest.raises(BundleError, match=r"sha256 .* shipped model 'tiny'"):
        load_bundle(str(out))
    # by any path to it: a symbolic link, or its bare name from inside the package folder
    link = out.parent.parent / "my-model"
    link.symlink_to(out, target_is_directory=True)
    with pytest.raises(BundleError, match=r"sha256 .* shipped model 'tiny'"):
        Predictor.from_checkpoint(link, device="cpu")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(out.parent)
        with pytest.raises(BundleError, match=r"sha256 .* shipped model 'tiny'"):
            Predictor.from_checkpoint("tiny", device="cpu")
    # a copy elsewhere is a plain bundle folder: the user's own, loaded as it is
    copy = out.parent.parent / "copy-of-tiny"
    shutil.copytree(out, copy)
    assert Predictor.from_checkpoint(copy, device="cpu").classes_ == BUNDLE_CLASSES
    weights.unlink()
    with pytest.raises(BundleError, match="missing; reinstall"):
        Predictor.from_checkpoint("tiny")


def test_packing_again_replaces_a_shipped_model_and_its_sha256(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    """Re-packing a shipped name rewrites its files: the old index entry must not refuse them
    half-way (the folder is off the index until the new sha256 is recorded)."""
    _, out = packed
    old = json.loads((out.parent / "index.json").read_text())["tiny"]["files"]
    val = write_synthetic_tree(tmp_path / "val2", per_class=2, size=40)
    other = make_bundle(tmp_path / "other", size=40)
    pack_pretrained(
        other, "tiny", val_source=val, description="again", card=CARD, out_root=out.parent,
        console=Console(quiet=True),
    )  # fmt: skip
    new = json.loads((out.parent / "index.json").read_text())["tiny"]["files"]
    assert new["model.safetensors"] != old["model.safetensors"]
    assert Predictor.from_checkpoint(out, device="cpu").metadata["input_size"] == 40
    assert Predictor.from_pretrained("tiny", device="cpu").metadata["input_size"] == 40


def test_a_model_left_off_the_index_by_an_interrupted_pack_says_so(
    packed: tuple[Path, Path],
) -> None:
    _, out = packed
    index_file = out.parent / "index.json"
    index_file.write_text(json.dumps({}))  # as an interrupted pack leaves it
    hint = (
        r"tiny is there but .*index.json does not list it .*pack_pretrained.py. run was interrupted"
    )
    with pytest.raises(BundleError, match=r"unknown pretrained model 'tiny'.*" + hint):
        Predictor.from_pretrained("tiny")
    with pytest.raises(BundleError, match=r"unknown shipped model 'builtin:tiny'.*" + hint):
        read_metadata("builtin:tiny")
    with pytest.raises(BundleError, match=r"no shipped model of that name.*" + hint):
        read_metadata("tiny")
    with pytest.raises(BundleError) as e:
        read_metadata("tiny2")  # a name that never was: no hint
    assert "does not list it" not in str(e.value)


def test_a_local_folder_wins_over_a_shipped_name(
    packed: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_bundle(tmp_path / "tiny", size=40)  # a user's own bundle that happens to be named tiny
    assert Predictor.from_checkpoint("tiny", device="cpu").metadata["input_size"] == 40


def test_fp16_that_changes_probabilities_ships_float32_or_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "pretrained"
    monkeypatch.setattr(bundle_mod, "PRETRAINED_DIR", root)
    val = write_synthetic_tree(tmp_path / "val", per_class=2, size=40)
    src = make_bundle(tmp_path / "bundle")
    kw = dict(val_source=val, description="x", card=CARD, out_root=root, tolerance=0.0)
    with pytest.raises(ValueError, match="keep this model in float32"):
        pack_pretrained(src, "tiny", allow_float32=False, console=Console(quiet=True), **kw)
    assert not (root / "tiny").exists() and not (root / "index.json").exists()

    out = pack_pretrained(src, "tiny", console=Console(quiet=True), **kw)
    meta = read_metadata(out)
    assert meta.weights_dtype == "float32"
    assert meta.pretrained["fp16_parity"]["stored_as"] == "float32"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} >= {"torch.float32"}  # noqa: SIM118
    cells = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8) for i in range(4)]
    a = Predictor.from_checkpoint(src, device="cpu", precision="fp32").predict_proba(cells)
    b = Predictor.from_checkpoint(out, device="cpu", precision="fp32").predict_proba(cells)
    np.testing.assert_array_equal(a, b)  # float32 storage: exactly the trained model
    assert "ship in float32" in (out / CARD_NAME).read_text()


def test_update_card_replaces_the_prose_and_keeps_weights_and_numbers(
    packed: tuple[Path, Path],
) -> None:
    _, out = packed
    before = read_metadata(out)
    weights = (out / "model.safetensors").read_bytes()
    update_card(
        "tiny",
        description="a renamed tiny model",
        card={**CARD, "limits": ["Only synthetic cells."]},
        out_root=out.parent,
    )
    after = read_metadata("tiny")  # resolves through the index: the new sha256 must match
    assert after.pretrained["evaluation"] == before.pretrained["evaluation"]
    assert after.pretrained["card"]["limits"] == ["Only synthetic cells."]
    card = (out / CARD_NAME).read_text()
    assert "Only synthetic cells." in card and "No hairy cells." not in card
    assert "# tiny: a renamed tiny model" in card
    assert (out / "model.safetensors").read_bytes() == weights
