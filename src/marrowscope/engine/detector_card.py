"""The model card of a shipped white-cell detector (``pretrained/NAME/MODEL_CARD.md``).

Rendered from the detector's ``metadata.json`` alone (its training settings, its threshold, its
val-split scores per origin and, when measured, its touching-cells scores), as the classifiers'
cards are rendered from theirs (:mod:`marrowscope.engine.pretrained`), so a card cannot disagree
with the weights it describes: ``scripts/train_detector.py pack`` writes it, ``... card NAME``
rewrites it (adding the touching-cells measurement), and a test checks that every shipped card is
what its metadata renders.
"""

from __future__ import annotations

from typing import Any

from marrowscope.defaults import DEFAULT_DETECTOR
from marrowscope.models.detector import DetectorMetadata

__all__ = ["CARD_NAME", "render_detector_card", "touching_summary"]

CARD_NAME = "MODEL_CARD.md"

_DATA = (
    "field-dev: 1,256 real blood-smear fields of view from four origins (Raabin-WBC, PBC, BCD, "
    "BCCD: four microscopes, cameras, stains and magnifications) with boxes for white cells, red "
    "cells and platelets (YOLO format), taken from the TXL-PBC dataset (Gan Lu et al., GitHub "
    "lugan113/TXL-PBC_Dataset, commit 056d09e45403f4d1321b99cdb2cfcc3eb605edcf) with its published "
    "train / val split, minus 40 images close to images of the hold-out. A hold-out of fields "
    "from the same origins is kept outside the project."
)
_LICENCES = (
    "- Annotations and collection: TXL-PBC, MIT licence (the repository's `LICENSE.txt`).",
    "- Images: BCCD (MIT); PBC, Acevedo et al., Data in Brief 30:105474, 2020 (CC BY 4.0, cite "
    "it); Raabin-WBC, Kouzehkanan et al., Scientific Reports 12:1123, 2022 (free for research, "
    "cite it); BCD (Kaggle). Not re-verified offline: check the terms before redistributing.",
    "- ImageNet initialisation of the frozen trunk: torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 "
    "(BSD-3-Clause).",
)


def touching_summary(result: dict[str, Any], source: str) -> dict[str, Any]:
    """The part of a ``benchmarks/touching_cells.py`` result a card shows: per gap, the share of
    pairs with both cells found, with one box over the pair, and the mean count error."""
    return {
        "source": source,
        "split": result.get("split", "val"),
        "pairs": result["fields"],
        "gaps": {
            gap: {
                "found_both": g["found_both"],
                "merged": g["merged"],
                "count_error": g["mean_count_error"],
            }
            for gap, g in result["gaps"].items()
        },
    }


def _gap_label(gap: str) -> str:
    value = float(gap)
    if value >= 1:
        return "+1.0 (apart: the control)"
    if value == 0:
        return "0 (boxes touch)"
    return f"{value:+g}" + (" (boxes overlap)" if value < 0 else "")


def render_detector_card(meta: DetectorMetadata) -> str:
    """The Markdown card of a packed detector, from its metadata."""
    extra = meta.extra
    training = extra.get("training") or {}
    cfg = training.get("config") or {}
    evaluation = extra.get("evaluation") or {}
    per = evaluation.get("iou_0.5") or {}
    name = meta.name
    default = name == DEFAULT_DETECTOR
    lines = [
        "---",
        f"name: {name}",
        "library_name: marrowscope",
        "license: MIT and source terms (training data, see below); Apache-2.0 (marrowscope)",
        f"architecture: {meta.to_dict()['arch']}",
        "task: white-cell detection in microscope fields of view",
        "---",
        "",
        f"# {name}: white (nucleated) cells in blood-smear fields of view",
        "",
        f"Use it wherever a detector is expected: `marrowscope detect CK fields/ --out det/ "
        f"--detector {name}`, `marrowscope count CK sample/ --fields --detector {name}`, "
        f'`marrowscope serve --detector {name}`, `FieldDetector.load("{name}")`'
        + (" (it is the default: no `--detector` needed)." if default else "."),
        "",
        "## Intended use",
        "",
        "- Research, and finding the white cells of a field for a classifier and for a person to "
        "review (the review app's *not a white cell* and *add a missed cell* correct it). Not a "
        "diagnostic device.",
        "- Trained on blood fields only: no public bone-marrow fields with boxes exist. In marrow, "
        "where nucleated cells touch and overlap, read the touching-cells numbers below.",
        "",
        "## Training data",
        "",
        f"- {_DATA}",
        f"- Trained on {training.get('fit_fields', '?')} fields of the train split; the score "
        f"threshold fitted on {training.get('tune_fields', '?')} other train fields (a stratified "
        f"{float(cfg.get('tune_fraction', 0.15)):.0%} of each origin, never trained on); the val "
        "split used for nothing but the numbers below.",
        "",
        "## Licence and attribution",
        "",
        *_LICENCES,
        "",
        "## Recipe",
        "",
        "- A CenterNet head (centre heat map, box size, centre offset on a stride-8 grid; Zhou et "
        "al. 2019) on the first five blocks of an ImageNet MobileNetV2, kept frozen "
        f"({training.get('backbone', 'torchvision weights')}); a two-level neck of width "
        f"{meta.width}. ONNX Runtime runs it.",
        f"- Every field is resampled to {meta.work_um_per_px:g} um/px (a red cell 32 px across) by "
        "the red-cell ruler (red cells are ~7.5 um across), or by the scale the user gives "
        "(`--um-per-px`).",
        f"- {cfg.get('epochs', '?')} epochs, batch {cfg.get('batch_size', '?')}, windows of "
        f"{cfg.get('canvas', '?')} px, AdamW lr {cfg.get('lr', '?')}, EMA "
        f"{cfg.get('ema', '?')}; scale jitter x{cfg.get('scale_jitter', '?')}, rotations, flips, "
        f"colour jitter (hue +/-{cfg.get('hue', '?')} deg), {cfg.get('gray', '?')} grayscale; "
        f"random cuts {cfg.get('cut', 0.0)}; margins {meta.pad} ({meta.margin} px); pasted "
        f"touching neighbours {cfg.get('paste', 0.0)}"
        + (
            " (a white cell of another training field pasted so that it touches or overlaps "
            "one of the window's cells)"
            if cfg.get("paste")
            else ""
        )
        + f"; {training.get('train_minutes', '?')} min of training on 2 CPU cores.",
        f"- Score threshold {meta.min_score:g} (the middle of the thresholds whose worst-origin F1 "
        f"on the tune fields is within 0.005 of the best); non-maximum suppression at IoU "
        f"{meta.nms_iou:g}.",
        *([f"- {extra['card_note']}"] if extra.get("card_note") else []),
        "- Reproduce: `python scripts/train_detector.py train --config configs/detect-fields.yaml "
        f"--out runs/{name}` with the settings above (`--set key=value`), then `... pack "
        f"runs/{name}/bundle --name {name} --val VAL.json`; see docs/fields.md.",
        "",
        "## Measured results: field-dev's val split",
        "",
    ]
    if per:
        lines += [
            f"{evaluation.get('fields', '?')} fields. A found box counts when it overlaps a free "
            "annotated white-cell box by half (IoU >= 0.5, matched best score first); count "
            "error = mean over fields of |cells found - cells annotated|.",
            "",
            "| origin | fields | recall | precision | F1 | count error | fields counted exactly |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for origin, s in per.items():
            lines.append(
                f"| {origin} | {s['fields']} | {s['recall']:.3f} | {s['precision']:.3f} | "
                f"{s['f1']:.3f} | {s['count_error']:.3f} | {s['exact_count']:.0%} |"
            )
        twice = evaluation.get("labels_boxed_twice") or []
        if twice:
            origins = ", ".join(sorted({t["origin"] for t in twice}))
            lines += [
                "",
                f"Annotated white cells of the val split boxed twice (two boxes overlapping by more "
                f"than half): {len(twice)} ({origins}); each caps its origin's recall by one cell "
                "for any detector that boxes a cell once.",
            ]
        seconds = evaluation.get("seconds_per_field_incl_decode")
        if seconds:
            lines += [
                "",
                f"Speed while scoring: {seconds * 1000:.0f} ms a field including decoding "
                "(the benchmark, 640 x 480 fields on 2 cores, is in docs/fields.md).",
            ]
    else:
        lines.append("Not measured (packed without `--val`).")
    touching = extra.get("touching")
    if touching:
        lines += [
            "",
            "## Touching cells (synthetic pairs)",
            "",
            f"Each of {touching['pairs']} {touching['split']} fields with one white cell clear of "
            "the border gets a mirrored copy of its cell blended in beside it, at a gap that is a "
            "fraction of the cell's width (`benchmarks/touching_cells.py`, "
            f"`{touching['source']}`). Synthetic: the two cells are one cell mirrored, so read it "
            "as where separation breaks down, not as an accuracy on marrow.",
            "",
            "| gap | both cells found | one box over the pair | count error |",
            "|---|---:|---:|---:|",
        ]
        for gap, g in touching["gaps"].items():
            lines.append(
                f"| {_gap_label(gap)} | {g['found_both']:.3f} | {g['merged']:.3f} | "
                f"{g['count_error']:.2f} |"
            )
    lines += [
        "",
        "## Known limits",
        "",
        "- Blood fields of four origins only; another stain, camera or magnification may lower "
        "recall and precision, and there are no marrow fields to measure on.",
        "- Cells cut by the field's edge are the commonest miss (a thin strip of a cell is too "
        "little to tell a white cell from a red one).",
        "- The red-cell ruler misreads a few fields (a few red cells, all touching a white cell); "
        "when the microscope's scale is known, give `--um-per-px`.",
        "- Overlapping cells: "
        + ("see the touching-cells table above" if touching else "not measured for this card")
        + "; in crowded marrow expect an undercount where cells overlap heavily.",
        "- The val labels carry errors (red cells boxed as white, cells boxed twice, unlabelled "
        "cells): docs/fields.md lists every error of the shipped detectors on val.",
        "",
    ]
    return "\n".join(lines)
