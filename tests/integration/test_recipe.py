"""The accuracy levers end to end: EMA, MixUp/CutMix, stain jitter, TTA + temperature in the
bundle, and k-fold cross-validation (resumable). Resume with EMA: tests/integration/test_train.py."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from marrowscope.config import from_dict
from marrowscope.engine.cv import cross_validate
from marrowscope.engine.train import fit
from marrowscope.inference.predictor import Predictor
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
