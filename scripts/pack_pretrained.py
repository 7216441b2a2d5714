"""Pack a trained run as a model that ships with marrowscope (``src/marrowscope/pretrained/NAME``).

The run's last-epoch bundle (no checkpoint selection on the validation cells that score it) gets
its softmax temperature fitted on the run's validation split, then
:func:`marrowscope.engine.pretrained.pack_pretrained` evaluates it on that split, checks float16
storage against float32, writes the fp16 bundle, its model card and the sha256 index. The card's
prose is in ``scripts/pretrained/cards.yaml``.

With ``--cv``, RUN is a cross-validation run with ``--refit`` (``marrowscope cv ... --refit --out
RUN``): the model packed is ``RUN/refit/last``, trained on every cell and calibrated on the
folds' out-of-fold logits, and its measured results are the cross-validation's pooled
out-of-fold scores of the folds' last epochs.

    python scripts/pack_pretrained.py bm8 runs/ship-bm8
    python scripts/pack_pretrained.py pbc6 runs/cv2-pbc/default --cv
    python scripts/pack_pretrained.py - runs/candidate --calibrate-only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from rich.console import Console

from marrowscope.config import load_config
from marrowscope.data.manifest import read_manifest
from marrowscope.engine.data import prepare_data
from marrowscope.engine.pretrained import pack_pretrained, update_card
from marrowscope.engine.train import finalize_inference
from marrowscope.models.bundle import read_metadata
from marrowscope.utils.runtime import resolve_device

CARDS = Path(__file__).with_name("pretrained") / "cards.yaml"


def calibrate_last(run: Path, console: Console) -> None:
    """Fit the temperature of ``run/last`` on the run's validation split, as ``fit`` does for the
    best bundle (nothing happens if it is already calibrated)."""
    bundle = run / "last"
    if read_metadata(bundle).inference.calibration:
        return
    cfg = load_config(run / "config.yaml")
    rows = read_manifest(run / "split.csv")
    if not any(r.split == "val" for r in rows):
        raise SystemExit(
            f"{run} has no validation split (a final fit on every cell): pack it with --cv from "
            "the cross-validation that measures it (marrowscope cv --refit)"
        )
    data = prepare_data(cfg, rows=rows, progress=False)
    finalize_inference(bundle, data, cfg, device=resolve_device("cpu"), console=console)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="shipped name, a key of scripts/pretrained/cards.yaml")
    ap.add_argument("run_dir", type=Path, help="the training run folder")
    ap.add_argument("--checkpoint", default="last", choices=["last", "best"])
    ap.add_argument(
        "--cv",
        action="store_true",
        help="RUN is a cross-validation with --refit: pack RUN/refit/last, measured by the "
        "out-of-fold predictions",
    )
    ap.add_argument(
        "--card-only",
        action="store_true",
        help="only replace the packed model's card prose from cards.yaml (no re-evaluation)",
    )
    ap.add_argument(
        "--calibrate-only",
        action="store_true",
        help="only fit the temperature of the run's last-epoch bundle (to compare candidates "
        "with benchmarks/paired_bundles.py before packing one); NAME is not used",
    )
    args = ap.parse_args()
    console = Console()
    if args.calibrate_only:
        if args.card_only or args.checkpoint != "last":
            ap.error("--calibrate-only works on the last-epoch bundle alone")
        calibrate_last(args.run_dir, console)
        return
    card = yaml.safe_load(CARDS.read_text(encoding="utf-8"))[args.name]
    if args.card_only:
        update_card(args.name, description=card.pop("description"), card=card)
        return
    run = args.run_dir
    measured_by: dict[str, Path]
    if args.cv:
        if args.checkpoint != "last":
            ap.error("--cv packs the refit's last epoch (a final fit chooses no checkpoint)")
        if not (run / "refit" / "summary.json").is_file():
            ap.error(f"{run}/refit has not finished: run marrowscope cv with --refit --out {run}")
        bundle, measured_by = run / "refit" / "last", {"cv_dir": run}
        label = f"last epoch of the final fit on every cell, cv --refit in {run}"
    else:
        if args.checkpoint == "last":
            calibrate_last(run, console)
        bundle, measured_by = run / args.checkpoint, {"val_source": run / "split.csv"}
        label = f"{args.checkpoint} epoch of {run.name}"
    pack_pretrained(
        bundle,
        args.name,
        **measured_by,
        description=card.pop("description"),
        card=card,
        checkpoint_label=label,
        console=console,
    )


if __name__ == "__main__":
    main()
