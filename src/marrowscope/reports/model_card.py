"""The model card of a shipped model (Hugging Face / MONAI style), rendered from its bundle metadata.

Everything measured (validation metrics with bootstrap CIs, per-class F1, calibration, fp16
parity, speed) comes from ``metadata.json``; the prose (data, licence, intended use, limits)
from the ``pretrained.card`` block that the packer copies into the metadata. One source: the
card is regenerated from the metadata, never edited by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marrowscope.metadata import BundleMetadata

__all__ = ["render_model_card"]


def _f(value: Any, fmt: str = ".3f") -> str:
    return "—" if value is None else format(float(value), fmt)


def _ci(ci: Mapping[str, Any] | None, key: str) -> str:
    if not ci or key not in ci:
        return ""
    lo, hi = ci[key]
    return f" [{_f(lo)}, {_f(hi)}]"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _bullets(items: Any) -> list[str]:
    if isinstance(items, str):
        return [items]
    return [f"- {item}" for item in items or []]


def _crop(meta: BundleMetadata) -> str:
    crop = (meta.preprocess or {}).get("crop")
    return f" (resized from the centred {crop:g} of each image's shorter side)" if crop else ""


def render_model_card(meta: BundleMetadata) -> str:
    """Markdown model card of a shipped bundle, from its metadata.

    Raises:
        ValueError: the metadata has no ``pretrained`` section (not a packed model).
    """
    if meta.pretrained is None:
        raise ValueError(
            "no model card without the 'pretrained' section of a packed model's metadata; pack "
            "the model with scripts/pack_pretrained.py"
        )
    pre = meta.pretrained
    card = pre.get("card", {})
    ev = pre.get("evaluation", {})
    ci = ev.get("ci95")
    train = (meta.config or {}).get("train", {})
    inference = meta.inference
    cal = inference.calibration or {}
    parity = pre.get("fp16_parity", {})
    speed = pre.get("speed", {})
    classes = list(meta.classes)
    cv = ev.get("source") == "cross-validation"  # refitted on every cell (marrowscope cv --refit)
    n_train = sum((meta.train_counts or {}).values())
    if cv:
        per_fold = ev.get("n_train_per_fold") or []
        fold_train = f"~{round(sum(per_fold) / len(per_fold)):,}" if per_fold else "?"
        n, k = ev.get("n", 0), ev.get("folds", 0)
        split_kind = "folds grouped by patient/slide" if ev.get("grouped") else "image-level folds"
        measured = (
            f"Cross-validated: {k} models of this recipe, one per fold, each trained on "
            f"{fold_train} cells and scoring the ~{round(n / max(k, 1)):,} cells it held out; "
            f"pooled, each of the {n:,} cells is scored once by a model that never saw it "
            f"({split_kind}). This model was then trained on all {n_train:,} cells, more than "
            "any fold model (more cells have helped so far, so expect these numbers or a little "
            "better). Predicted as the model predicts by default (test-time augmentation "
            f"`{ev.get('tta', inference.tta)}`, "
            "each fold calibrated by a temperature fitted on the other folds), with bootstrap "
            "95% CIs over the pooled cells. "
        )
        fitted_on = f"the pooled out-of-fold logits of the {k} fold models"
        cal_cells = (
            f"the pooled out-of-fold predictions of the {k} fold models (this model's own "
            "calibration cannot be measured: it saw every cell)"
        )
        parity_cells = "development cells (this model's training cells: a check of the storage"
        parity_cells += ", not of accuracy)"
    else:
        measured = (
            f"On the validation split ({ev.get('n', '?')} cells of the same dataset, never "
            f"trained on; image-level split), predicted as the model predicts by default "
            f"(test-time augmentation `{ev.get('tta', inference.tta)}`, the fitted temperature), "
            "with bootstrap 95% CIs. "
        )
        fitted_on = "the validation split"
        cal_cells = "the validation split"
        parity_cells = "validation cells"
    lines = [
        "---",
        f"name: {pre['name']}",
        "library_name: marrowscope",
        f"license: {card.get('license', 'see below')}",
        f"architecture: {meta.arch}",
        f"classes: [{', '.join(classes)}]",
        f"input_size: {meta.input_size}",
        "---",
        "",
        f"# {pre['name']}: {pre.get('description', '')}",
        "",
        "Use it wherever a checkpoint is expected: `marrowscope predict "
        f"{pre['name']} cells/`, `marrowscope count {pre['name']} sample/`, "
        f"`marrowscope serve --checkpoint {pre['name']}`, "
        f'`Predictor.from_pretrained("{pre["name"]}")`.',
        "",
        "## Intended use",
        "",
        *_bullets(card.get("intended_use")),
        "",
        "## Training data",
        "",
        *_bullets(card.get("data")),
        "- Cells per class used for training: "
        + ", ".join(f"{c} {n}" for c, n in (meta.train_counts or {}).items()),
        "",
        "## Licence and attribution",
        "",
        *_bullets(card.get("attribution")),
        "",
        "## Recipe",
        "",
        f"- {meta.arch} ({meta.weights_source or 'random initialisation'}), "
        f"input {meta.input_size} px{_crop(meta)}, {train.get('epochs')} epochs, batch "
        f"{train.get('batch_size')}, lr {train.get('lr')}, layer decay {train.get('layer_decay')}, "
        f"label smoothing {train.get('label_smoothing')}, imbalance: {train.get('imbalance')}.",
        f"- Trained with `{' '.join(str(card.get('train_command', '')).split())}`."
        if card.get("train_command")
        else "- Training command: see `config` in `metadata.json`.",
        f"- Checkpoint: epoch {meta.epoch} of {train.get('epochs')} "
        f"({pre.get('checkpoint', 'last')}); resolved training config in `metadata.json` "
        "(`config`).",
        f"- Test-time augmentation `{inference.tta}`, softmax temperature "
        f"{_f(inference.temperature)} (fitted on {fitted_on}).",
        "",
        "## Measured results",
        "",
        measured + str(card.get("results_note", "")),
        "",
        "| metric | value |",
        "|---|---:|",
        f"| accuracy | {_f(ev.get('accuracy'))}{_ci(ci, 'accuracy')} |",
        f"| macro-F1 | {_f(ev.get('macro_f1'))}{_ci(ci, 'macro_f1')} |",
        f"| balanced accuracy | {_f(ev.get('balanced_accuracy'))} |",
        f"| ECE (calibrated{', cross-fitted' if cv else ''}) | {_f(ev.get('ece'))} |",
        "",
        "| class | precision | recall | F1 | cells |",
        "|---|---:|---:|---:|---:|",
    ]
    for cls, row in (ev.get("per_class") or {}).items():
        lines.append(
            f"| {cls} | {_f(row['precision'])} | {_f(row['recall'])} | {_f(row['f1'])} | "
            f"{row['support']} |"
        )
    lines += [
        "",
        "## Calibration",
        "",
        f"Expected calibration error on {cal_cells}: "
        f"{_f(cal.get('before', {}).get('ece'))} "
        f"at T = 1, {_f(cal.get('after', {}).get('ece'))} with the fitted temperature "
        f"T = {_f(inference.temperature)} (NLL {_f(cal.get('before', {}).get('nll'))} → "
        f"{_f(cal.get('after', {}).get('nll'))}). The temperature was fitted on the same cells "
        "it is scored on, so these figures are optimistic"
        + (
            f"; fitted on the other folds only, as in the table above, ECE is {_f(ev.get('ece'))}."
            if cv
            else "."
        ),
        "",
        "## Storage and speed",
        "",
        f"- Weights stored as {meta.weights_dtype} "
        f"({_f(pre.get('weights_mb'), '.1f')} MB), computed in float32 or bf16. Float16 storage "
        f"was measured on {_count(parity.get('images'))} {parity_cells}, one view each: it "
        f"changes a probability by at most {_f(parity.get('max_abs_diff'), '.1e')} (top-1 "
        f"agreement {_f(parity.get('agreement'), '.4f')}), "
        + (
            "within the 1e-3 allowed, so the weights ship in float16."
            if meta.weights_dtype == "float16"
            else f"more than the {parity.get('tolerance', 1e-3):g} allowed, so they ship in "
            "float32."
        ),
    ]
    if speed:
        lines.append(
            f"- {speed.get('images_per_s_tta_none', 0):.0f} cells/s without test-time "
            f"augmentation, {speed.get('images_per_s_tta_bundle', 0):.0f} cells/s with "
            f"`{inference.tta}` ({speed.get('machine', 'this machine')}, "
            f"{speed.get('threads', '?')} threads, {speed.get('precision', '')}, network and "
            "preprocessing of decoded cells)."
        )
    lines += ["", "## Known limits", "", *_bullets(card.get("limits")), ""]
    return "\n".join(lines)
