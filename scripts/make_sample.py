#!/usr/bin/env python
"""Regenerate the bundled bone-marrow sample (src/marrowscope/sample_data/bm) from a source tree.

Selection rule: for each of the 8 classes, the image files directly in ``SOURCE/<CLASS>/`` are
sorted by name and ``random.Random(2025).sample(files, PER_CLASS)`` (a fresh generator per class)
picks the sample. Files are copied byte-identical under their original names, and
``MANIFEST.csv`` (path,class,sha256) is written next to them. ``README.md`` is not touched.

Usage:
    python scripts/make_sample.py /work/shared/data/bm-cells-dev [--per-class 24]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import random
import shutil
import sys
from pathlib import Path

CLASSES = ("ART", "BLA", "EOS", "LYT", "MON", "NGS", "NIF", "PMO")
SEED = 2025
EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
MAX_BYTES = 8_000_000  # 8 MB, files only (README and MANIFEST.csv add a few kB)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "marrowscope" / "sample_data" / "bm"


def select(source: Path, cls: str, per_class: int) -> list[Path]:
    """The sample of one class: a seeded draw from the sorted file list."""
    folder = source / cls
    if not folder.is_dir():
        sys.exit(f"error: {folder} does not exist; SOURCE must hold one folder per class")
    files = sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS
        ),
        key=lambda p: p.name,
    )
    if len(files) < per_class:
        sys.exit(f"error: {folder} has {len(files)} images, fewer than --per-class {per_class}")
    return sorted(random.Random(SEED).sample(files, per_class), key=lambda p: p.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("source", type=Path, help="folder with one sub-folder per class (bm-cells-dev)")
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    picks = {cls: select(args.source, cls, args.per_class) for cls in CLASSES}
    total = sum(p.stat().st_size for ps in picks.values() for p in ps)
    if total >= MAX_BYTES:
        sys.exit(
            f"error: the sample would be {total / 1e6:.2f} MB, over the 8 MB budget; "
            f"rerun with --per-class {args.per_class - 1}"
        )

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cls, paths in picks.items():
        dest = out / cls
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir()
        for src in paths:
            shutil.copyfile(src, dest / src.name)
            data = (dest / src.name).read_bytes()
            if data != src.read_bytes():
                sys.exit(f"error: copy of {src} differs from the source")
            rows.append((f"{cls}/{src.name}", cls, hashlib.sha256(data).hexdigest()))
    with open(out / "MANIFEST.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("path", "class", "sha256"))
        w.writerows(rows)
    print(f"wrote {len(rows)} images ({args.per_class} per class, {total / 1e6:.2f} MB) to {out}")


if __name__ == "__main__":
    main()
