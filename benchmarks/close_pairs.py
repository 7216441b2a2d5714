"""Real touching white cells in field-dev's train split: how many does each cross-validated
detector recipe find? (docs/fields.md, "Touching cells")

A cell is *close* when another annotated white cell of its field lies within a tenth of their
mean box side (the boxes' gap along x or y, whichever is larger, below 0.1 x the mean side;
overlapping boxes have a negative gap; two boxes overlapping by more than half are one cell boxed
twice, ``duplicate_boxes``, and left out). Reads the per-cell found / missed of
``benchmarks/detector_cv.py run`` files (every train-split field scored out of fold) and pairs two
recipes on the close cells (exact McNemar).

    python benchmarks/close_pairs.py docs/results/detector-cv/base-ruler2.json \\
        docs/results/detector-cv/paste50.json --out docs/results/detector-cv/close-pairs.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from marrowscope.data.fields import duplicate_boxes, read_field_manifest


def close_cells(root: str, gap: float = 0.1) -> set[tuple[str, int]]:
    """``(field file name, cell index)`` of every train-split white cell with a close neighbour."""
    out: set[tuple[str, int]] = set()
    for r in read_field_manifest(root, split="train"):
        b = np.asarray(r.wbc, np.float64).reshape(-1, 4)
        duplicates = set(duplicate_boxes(b))  # one cell boxed twice (BCD), not two cells
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                side = (
                    (b[i, 2] - b[i, 0])
                    + (b[i, 3] - b[i, 1])
                    + (b[j, 2] - b[j, 0])
                    + (b[j, 3] - b[j, 1])
                ) / 4
                gx = max(b[i, 0], b[j, 0]) - min(b[i, 2], b[j, 2])
                gy = max(b[i, 1], b[j, 1]) - min(b[i, 3], b[j, 3])
                if max(gx, gy) < gap * side and (i, j) not in duplicates:
                    out |= {(Path(r.path).name, i), (Path(r.path).name, j)}
    return out


def found(run: dict, cells: set[tuple[str, int]]) -> dict[tuple[str, int], bool]:
    c = run["cells"]
    return {
        (f, int(i)): bool(ok)
        for f, i, ok in zip(c["field"], c["cell"], c["found"], strict=True)
        if (f, int(i)) in cells
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("base", type=Path)
    ap.add_argument("other", type=Path)
    ap.add_argument("--data", default="../shared/data/field-dev")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cells = close_cells(args.data)
    a = found(json.loads(args.base.read_text()), cells)
    b = found(json.loads(args.other.read_text()), cells)
    gained = sorted(k for k in a if b[k] and not a[k])
    lost = sorted(k for k in a if a[k] and not b[k])
    n = len(gained) + len(lost)
    result = {
        "close_cells": len(a),
        args.base.stem: {"found": sum(a.values())},
        args.other.stem: {"found": sum(b.values())},
        "gained": [f"{f} #{i}" for f, i in gained],
        "lost": [f"{f} #{i}" for f, i in lost],
        "mcnemar_p": binomtest(len(gained), n).pvalue if n else 1.0,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
