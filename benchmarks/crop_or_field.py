"""How often does ``detect`` take a single-cell crop for a field, and a field for a crop?

``FieldDetector.detect`` warns when an image given as a field looks like a single-cell crop (one
centred white cell filling the frame, ``preprocess.fields.looks_like_crop``). This counts the
images it flags in each set: real Matek crops (the shipped sample and a random sample of
bm-cells-dev), PBC crops (pbc-cells-dev: these *are* PBC fields, 360 x 363, and should not be
flagged), and every field of field-dev and of tests/data/fields (none should be). The warning
depends on the detector's boxes, so it is measured per detector (docs/fields.md, *Crops and
fields told apart*).

    python benchmarks/crop_or_field.py --detector wbc2 --out docs/results/crop-or-field-wbc2.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from marrowscope.data.fields import read_field_manifest
from marrowscope.inference.fields import FieldDetector
from marrowscope.utils.image import list_image_files

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path) -> list[Path]:
    return list_image_files(folder)[0]


def image_sets(shared: Path, n: int, seed: int) -> dict[str, list[Path]]:
    """The image sets, each a sorted list (random samples drawn from the sorted file list)."""
    bm = _images(shared / "bm-cells-dev")
    pbc = _images(shared / "pbc-cells-dev")
    fields = read_field_manifest(shared / "field-dev")
    return {
        "Matek crops, sample_data/bm": _images(ROOT / "src" / "marrowscope" / "sample_data" / "bm"),
        f"Matek crops, bm-cells-dev ({n} at random)": random.Random(seed).sample(bm, n),
        f"PBC crops, pbc-cells-dev ({n} at random)": random.Random(seed).sample(pbc, n),
        "field-dev val fields": [Path(r.path) for r in fields if r.split == "val"],
        "field-dev train fields": [Path(r.path) for r in fields if r.split == "train"],
        "tests/data/fields": _images(ROOT / "tests" / "data" / "fields"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default="wbc2")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    det = FieldDetector.load(args.detector)
    t0 = time.perf_counter()
    result: dict[str, object] = {"detector": det.name_, "sets": {}}
    for label, paths in image_sets(Path(args.shared), args.n, args.seed).items():
        flagged = [
            p.name
            for p in paths
            if any("single-cell crop" in w for w in det.detect(p, name=str(p)).warnings)
        ]
        result["sets"][label] = {"images": len(paths), "flagged": len(flagged), "which": flagged}  # type: ignore[index]
        print(f"{label}: {len(flagged)} of {len(paths)} flagged", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
