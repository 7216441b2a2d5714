"""The accuracy levers end to end: EMA, MixUp/CutMix, stain jitter, TTA + temperature in the
bundle, and k-fold cross-validation (resumable) with the final fit on every image (refit). Resume with EMA: tests/integration/test_train.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from marrowscope.config import ConfigError, from_dict
from marrowscope.data import DataError
from marrowscope.engine.cv import cross_validate, out_of_fold_probs
from marrowscope.engine.pretrained import pack_pretrained
from marrowscope.engine.train import fit
from marrowscope.inference.predictor import Predictor
from marrowscope.metrics.classification import classification_metrics, expected_calibration_error
from marrowscope.models import bundle as bundle_mod
from marrowscope.models.bundle import read_metadata
from marrowscope.models.registry import ModelError

from .test_train import tiny_config

pytestmark = pytest.mark.integration

LEVERS = {"ema_decay": 0.99}
AUG = {"zoom": [0.9, 1.0], "stain": 0.05, "mixup_alpha": 0.2, "cutmix_alpha": 1.0}


def test_fit_with_ema_mix_stain_tta_writes_calibrated_bundle(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    raw = tiny_config(synthetic_tree, epochs=4, **LEVERS)
    raw["augment"] = AUG
    raw["inference"] = {"tta": "d8", "calibrate": True}
    cfg = from_dict(raw)
    fit(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    meta = json.loads((run / "best" / "metadata.json").read_text())
    inf = meta["inference"]
    assert inf["tta"] == "d8"
    assert inf["temperature"] > 0 and inf["temperature"] != 1.0
    cal = inf["calibration"]
    # the fitted temperature minimises the validation NLL: never worse than T = 1
    assert cal["after"]["nll"] <= cal["before"]["nll"] + 1e-9
    summary = json.loads((run / "summary.json").read_text())
    assert summary["calibration"]["temperature"] == pytest.approx(inf["temperature"])
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    # with EMA the saved weights and the raw weights are scored separately
    assert all(r["val_macro_f1_raw"] != "" for r in rows)
    # the predictor applies the bundle's TTA and temperature
    p = Predictor.from_checkpoint(run / "best", device="cpu", precision="fp32")
    assert p.tta_ == "d8" and p.temperature_ == pytest.approx(inf["temperature"])
    imgs = [np.asarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3)), np.uint8)]
    probs = p.predict_preprocessed(imgs)
    views = p.view_logits_preprocessed(imgs)
    assert views.shape == (8, 1, 3)
    z = views / inf["temperature"]
    expect = (np.exp(z) / np.exp(z).sum(-1, keepdims=True)).mean(0)
    np.testing.assert_allclose(probs, expect, atol=1e-5)
    plain = Predictor.from_checkpoint(run / "best", device="cpu", precision="fp32", tta="none")
    assert plain.view_logits_preprocessed(imgs).shape == (1, 1, 3)


def test_cross_validation_scores_every_image_once_and_resumes(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    cfg = from_dict(tiny_config(synthetic_tree, epochs=2))
    out = tmp_path / "cv"
    summary = cross_validate(cfg, out, folds=3, progress=False)
    folds = list(csv.DictReader((out / "folds.csv").open()))
    assert len(folds) == 36
    assert {r["fold"] for r in folds} == {"0", "1", "2"}
    seen: list[str] = []
    for k in range(3):
        with np.load(out / f"fold-{k}" / "oof.npz") as z:
            assert z["logits"].shape[0] == 8 and z["logits"].shape[2] == 3
            seen += z["paths"].tolist()
        # no validation image of fold k was trained on in fold k
        split = list(csv.DictReader((out / f"fold-{k}" / "split.csv").open()))
        val = {r["path"] for r in split if r["split"] == "val"}
        assert val == {r["path"] for r in folds if r["fold"] == str(k)}
    assert sorted(seen) == sorted(r["path"] for r in folds)
    for tta in ("none", "flips", "d8"):
        v = summary["variants"][tta]
        assert v["pooled"]["n"] == 36
        assert len(v["folds"]) == 3
        assert 0.0 <= v["mean_std"]["macro_f1"]["mean"] <= 1.0
        assert np.sum(v["pooled"]["confusion_matrix"]) == 36
        assert summary["last_checkpoint"][tta]["pooled"]["n"] == 36
    assert summary["n_train"] == [24, 24, 24]
    # the last epoch's weights are scored too: the same logits where the best epoch is the last
    for k in range(3):
        fit_summary = json.loads((out / f"fold-{k}" / "summary.json").read_text())
        with np.load(out / f"fold-{k}" / "oof.npz") as z:
            same = np.array_equal(z["logits"], z["logits_last"])
        assert same == (fit_summary["best_epoch"] == fit_summary["epochs_run"])
    assert "Last epoch's weights" in (out / "cv_report.md").read_text()
    assert (out / "cv_report.md").read_text().startswith("# Cross-validation")
    # a second call reuses the finished folds (no retraining)
    stamp = os.path.getmtime(out / "fold-0" / "oof.npz")
    again = cross_validate(cfg, out, folds=3, progress=False)
    assert os.path.getmtime(out / "fold-0" / "oof.npz") == stamp
    assert again["variants"]["none"]["pooled"] == summary["variants"]["none"]["pooled"]
    # the same folder with another recipe is refused instead of mixing results
    other = from_dict(tiny_config(synthetic_tree, epochs=3))
    with pytest.raises(FileExistsError, match="another config"):
        cross_validate(other, out, folds=3, progress=False)


def test_layer_decay_trains_each_backbone_layer_at_its_own_rate(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    raw = tiny_config(synthetic_tree, epochs=1, layer_decay=0.5)
    raw["model"] = {"name": "resnet18", "pretrained": False}
    fit(from_dict(raw), tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "state.pt", map_location="cpu", weights_only=False)
    groups = state["optimizer"]["param_groups"]
    peak = [g["initial_lr"] for g in groups if "no_decay" not in g.get("name", "")]
    # stem ... last block, then the head: each layer twice the rate of the one below it
    assert len(peak) >= 6
    assert peak[-1] == pytest.approx(0.003)
    assert np.allclose(np.array(peak[1:]) / np.array(peak[:-1]), 2.0)


def test_layer_decay_on_a_model_without_layers_is_a_clear_error(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    cfg = from_dict(tiny_config(synthetic_tree, epochs=1, layer_decay=0.8))
    with pytest.raises(ModelError, match="paper_cnn trains from scratch"):
        fit(cfg, tmp_path / "run", progress=False)


def test_cross_validation_fold_seed_and_train_fraction(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    """Another training seed on the same folds; a learning-curve point trains on a stratified
    half of each fold's training images and scores the same folds."""
    reference = tmp_path / "ref"
    cross_validate(
        from_dict(tiny_config(synthetic_tree, epochs=1)), reference, folds=3, progress=False
    )
    raw = tiny_config(synthetic_tree, epochs=1)
    raw["seed"] = 8
    out = tmp_path / "half"
    summary = cross_validate(
        from_dict(raw), out, folds=3, fold_seed=7, train_fraction=0.5, progress=False
    )
    assert (out / "folds.csv").read_text() == (reference / "folds.csv").read_text()
    assert summary["fold_seed"] == 7 and summary["train_fraction"] == 0.5
    assert summary["n_train"] == [12, 12, 12]
    for k in range(3):
        split = list(csv.DictReader((out / f"fold-{k}" / "split.csv").open()))
        train_labels = [r["label"] for r in split if r["split"] == "train"]
        # 8 training images per class in a fold; half of each class is kept
        assert sorted({train_labels.count(c) for c in set(train_labels)}) == [4]
        ref_split = list(csv.DictReader((reference / f"fold-{k}" / "split.csv").open()))
        assert {r["path"] for r in split if r["split"] == "val"} == {
            r["path"] for r in ref_split if r["split"] == "val"
        }
        assert {r["path"] for r in split if r["split"] == "train"} < {
            r["path"] for r in ref_split if r["split"] == "train"
        }
    assert summary["variants"]["d8"]["pooled"]["n"] == 36
    # resuming with another fraction is refused, not mixed
    with pytest.raises(FileExistsError, match="training fraction"):
        cross_validate(
            from_dict(raw), out, folds=3, fold_seed=7, train_fraction=0.25, progress=False
        )
    with pytest.raises(ValueError, match="train_fraction must be in"):
        cross_validate(
            from_dict(raw), tmp_path / "bad", folds=3, train_fraction=1.5, progress=False
        )


def test_cross_validation_refit_trains_on_every_image_and_ships_with_the_cv_estimate(
    synthetic_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cv --refit: the recipe trained on all 36 images, calibrated on the out-of-fold logits of
    the folds' last epochs, then packed as a shipped model measured by that cross-validation."""
    raw = tiny_config(synthetic_tree, epochs=2)
    raw["inference"] = {"tta": "d8", "calibrate": True}
    out = tmp_path / "cv"
    summary = cross_validate(from_dict(raw), out, folds=3, refit=True, progress=False)
    refit = out / "refit"
    split = list(csv.DictReader((refit / "split.csv").open()))
    assert len(split) == 36 and {r["split"] for r in split} == {"train"}
    rows = list(csv.DictReader((refit / "metrics.csv").open()))
    assert len(rows) == 2
    assert all(r["val_macro_f1"] == "" and r["train_loss"] != "" for r in rows)
    # nothing to choose on: best/ and last/ hold the last epoch's weights
    assert (refit / "best" / "model.safetensors").read_bytes() == (
        refit / "last" / "model.safetensors"
    ).read_bytes()
    fit_summary = json.loads((refit / "summary.json").read_text())
    assert fit_summary["best_epoch"] == 2 and "out-of-fold" in fit_summary["calibration"]["source"]
    inf = json.loads((refit / "last" / "metadata.json").read_text())["inference"]
    cal = inf["calibration"]
    assert inf["tta"] == "d8" and cal["val_images"] == 36
    assert "out-of-fold" in cal["source"]
    assert inf["temperature"] != 1.0
    assert cal["after"]["nll"] <= cal["before"]["nll"] + 1e-9
    p = Predictor.from_checkpoint(refit / "last", device="cpu", precision="fp32")
    assert p.temperature_ == pytest.approx(inf["temperature"])

    oof = out_of_fold_probs(out, "d8")
    assert oof["probs"].shape == (36, 3) and oof["folds"] == 3
    np.testing.assert_allclose(oof["probs"].sum(1), 1.0, atol=1e-6)
    folds = list(csv.DictReader((out / "folds.csv").open()))
    assert sorted(oof["paths"]) == sorted(r["path"] for r in folds)
    # the folds calibrated on each other, as the summary scores them
    pooled = summary["last_checkpoint"]["d8"]["pooled"]
    assert expected_calibration_error(oof["probs"], oof["labels"]) == pytest.approx(
        pooled["ece_calibrated"]
    )

    # a second call reuses the folds and the refit
    stamp = os.path.getmtime(refit / "summary.json")
    cross_validate(from_dict(raw), out, folds=3, refit=True, progress=False)
    assert os.path.getmtime(refit / "summary.json") == stamp
    with pytest.raises(ConfigError, match="refit trains on every image"):
        cross_validate(
            from_dict(raw), tmp_path / "x", folds=3, train_fraction=0.5, refit=True, progress=False
        )

    # packed as a shipped model: the card's numbers are the cross-validated ones
    root = tmp_path / "pretrained"
    monkeypatch.setattr(bundle_mod, "PRETRAINED_DIR", root)
    card = {"results_note": "Tiny.", "limits": ["Synthetic."], "license": "CC-BY-4.0"}
    with pytest.raises(ValueError, match="exactly one"):
        pack_pretrained(refit / "last", "tiny", description="t", card=card, out_root=root)
    packed = pack_pretrained(
        refit / "last",
        "tiny",
        cv_dir=out,
        description="a refitted tiny model",
        card=card,
        out_root=root,
        console=Console(quiet=True),
    )
    ev = read_metadata(packed).pretrained["evaluation"]
    assert ev["source"] == "cross-validation" and ev["n"] == 36 and ev["folds"] == 3
    assert ev["macro_f1"] == pytest.approx(
        classification_metrics(oof["labels"], oof["probs"].argmax(1), oof["classes"])["macro_f1"]
    )
    text = (packed / "MODEL_CARD.md").read_text()
    assert "Cross-validated: 3 models of this recipe, one per fold, each trained on ~24" in text
    assert "each of the 36 cells is scored once by a model that never saw it" in text
    assert "This model was then trained on all 36 cells" in text
    assert "fitted on the pooled out-of-fold logits of the 3 fold models" in text
    assert "validation split" not in text
    # an unfinished refit, or one of another recipe, is refused
    shutil.copytree(refit, tmp_path / "cv2" / "refit")
    shutil.copy(out / "cv_config.json", tmp_path / "cv2" / "cv_config.json")
    (tmp_path / "cv2" / "refit" / "summary.json").unlink()
    with pytest.raises(ValueError, match="not a finished refit"):
        pack_pretrained(
            tmp_path / "cv2" / "refit" / "last",
            "tiny",
            cv_dir=out,
            description="t",
            card=card,
            out_root=root,
        )
    other = tmp_path / "other"
    shutil.copytree(out, other)
    saved = json.loads((other / "cv_config.json").read_text())
    saved["config"]["train"]["epochs"] = 9
    (other / "cv_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="train differ"):
        pack_pretrained(
            refit / "last", "tiny", cv_dir=other, description="t", card=card, out_root=root
        )


def test_a_final_fit_cannot_stop_early(synthetic_tree: Path, tmp_path: Path) -> None:
    raw = tiny_config(synthetic_tree, epochs=2, early_stopping_patience=2)
    raw["data"]["split"] = {"val": 0.0, "test": 0.0}
    with pytest.raises(ConfigError, match="early_stopping_patience=2 needs a validation split"):
        fit(from_dict(raw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="no validation split to stop early on"):
        cross_validate(from_dict(raw), tmp_path / "cv", folds=3, refit=True, progress=False)
    assert not (tmp_path / "cv" / "fold-0").exists()


def test_a_manifest_without_validation_rows_is_still_refused(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    """Only data.split.val = 0 asks for a final fit; a validation split that came out empty
    (every row train in a manifest) is an error, not a silent run without validation."""
    rows = [
        {"path": str(p), "label": p.parent.name, "split": "train"}
        for p in sorted(synthetic_tree.rglob("*"))
        if p.suffix in {".png", ".jpg"}
    ]
    manifest = tmp_path / "all_train.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    raw = tiny_config(synthetic_tree, epochs=1)
    raw["data"] = {**raw["data"], "root": None, "manifest": str(manifest)}
    with pytest.raises(DataError, match="no usable image in the val split"):
        fit(from_dict(raw), tmp_path / "run", progress=False)
