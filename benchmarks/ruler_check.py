"""How far the red-cell ruler reads from the annotated red-cell size, per field (docs/fields.md).

For every field of field-dev's train and val splits with an annotated red cell not cut by the
border: the annotated size (median longer box side of those red cells), and the ruler's reading
as the code has it now and with the nucleus check of 2026-11-30 switched off (the ruler before
it). Writes one row per field and a summary per split and origin (median and 5th-95th percentile
of measured / annotated, fields read more than 1.6x off, fields outside 0.8-1.25x).

    python benchmarks/ruler_check.py --out docs/results/ruler-check.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope.data.fields import annotated_rbc_px, read_field_manifest
from marrowscope.inference.fields import load_field
from marrowscope.preprocess import fields as ruler

OFF = 1.6


def _reading(rgb: np.ndarray, share: float) -> float | None:
    saved = ruler._NUCLEUS_SHARE
    ruler._NUCLEUS_SHARE = share
    try:
        s = ruler.estimate_scale(rgb)
    finally:
        ruler._NUCLEUS_SHARE = saved
    return None if s is None else float(s.rbc_px)


def _summary(ratios: list[float | None]) -> dict[str, Any]:
    v = np.array([np.nan if r is None else r for r in ratios], np.float64)
    ok = v[np.isfinite(v)]
    return {
        "fields": len(v),
        "unmeasured": int((~np.isfinite(v)).sum()),
        "median": round(float(np.median(ok)), 3),
        "p5": round(float(np.percentile(ok, 5)), 3),
        "p95": round(float(np.percentile(ok, 95)), 3),
        f"off_{OFF}x": int(((ok > OFF) | (ok < 1 / OFF)).sum()),
        "outside_0.8_1.25x": int(((ok > 1.25) | (ok < 0.8)).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/field-dev")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for split in ("train", "val"):
        for r in read_field_manifest(args.data, split=split):
            annotated = annotated_rbc_px(r.rbc, r.width, r.height)
            if annotated is None:
                continue
            rgb = load_field(r.path)
            now, before = _reading(rgb, ruler._NUCLEUS_SHARE), _reading(rgb, 1.0)
            rows.append(
                {
                    "field": Path(r.path).name,
                    "split": split,
                    "origin": r.origin,
                    "annotated_px": round(annotated, 1),
                    "ruler_px": None if now is None else round(now, 1),
                    "ruler_before_px": None if before is None else round(before, 1),
                }
            )
    summary: dict[str, Any] = {}
    for split in ("train", "val"):
        for origin in ["all", *sorted({r["origin"] for r in rows})]:
            sel = [r for r in rows if r["split"] == split and origin in ("all", r["origin"])]
            for key, col in (("now", "ruler_px"), ("before", "ruler_before_px")):
                ratios = [None if r[col] is None else r[col] / r["annotated_px"] for r in sel]
                summary.setdefault(split, {}).setdefault(origin, {})[key] = _summary(ratios)

        def off(x: float | None, a: float) -> bool:
            return x is None or not (1 / OFF <= x / a <= OFF)

        sel = [r for r in rows if r["split"] == split]
        summary[split]["fixed"] = [
            r["field"] for r in sel
            if off(r["ruler_before_px"], r["annotated_px"]) and not off(r["ruler_px"], r["annotated_px"])
        ]  # fmt: skip
        summary[split]["made_worse"] = [
            r["field"] for r in sel
            if off(r["ruler_px"], r["annotated_px"]) and not off(r["ruler_before_px"], r["annotated_px"])
        ]  # fmt: skip
        s = summary[split]
        print(
            f"{split}: off by more than {OFF}x: {s['all']['before'][f'off_{OFF}x']} -> "
            f"{s['all']['now'][f'off_{OFF}x']} of {s['all']['now']['fields']} "
            f"({len(s['fixed'])} fixed, {len(s['made_worse'])} made worse); outside 0.8-1.25x: "
            f"{s['all']['before']['outside_0.8_1.25x']} -> {s['all']['now']['outside_0.8_1.25x']}"
        )
        for origin, v in s.items():
            if origin not in ("all", "fixed", "made_worse"):
                n = v["now"]
                print(f"  {origin:<11} median {n['median']:.2f} ({n['p5']:.2f}-{n['p95']:.2f})")
    if args.out:
        write(args.out, summary, rows)


def write(path: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The summary indented, then one line per field."""
    head = json.dumps(summary, indent=1)
    body = ",\n".join(json.dumps(r) for r in rows)
    path.write_text(f'{{"summary": {head},\n"fields": [\n{body}\n]}}\n', encoding="utf-8")


if __name__ == "__main__":
    main()
