r"""Train, measure and ship the white-cell detector (see docs/fields.md).

# train wbc2 (frozen ImageNet trunk in ONNX Runtime + trained CenterNet head, pasted touching
# neighbours; ~5 min on 2 quiet cores, 30-45 min on busy ones; --set paste=0 --set name=wbc1: wbc1's)
python scripts/train_detector.py train --config configs/detect-fields.yaml --out runs/wbc2
# score a detector per origin on a split (a bundle folder, a shipped name, or classical)
python scripts/train_detector.py evaluate runs/wbc2/bundle --split val --out runs/wbc2/val.json
# ship it: copy into src/marrowscope/pretrained/wbc2, write its MODEL_CARD.md, record its sha256
python scripts/train_detector.py pack runs/wbc2/bundle --name wbc2 --val runs/wbc2/val.json \
    --touching docs/results/fields-touching-wbc2.json
# rewrite a shipped detector's card (and the touching-cells result it shows)
python scripts/train_detector.py card wbc2 --touching docs/results/fields-touching-wbc2.json
# refit the classical detector's thresholds / the ruler's gain on the train split
python scripts/train_detector.py fit-classical
python scripts/train_detector.py fit-ruler
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import yaml

DATA = "../shared/data/field-dev"


def _overrides(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def cmd_train(args: argparse.Namespace) -> None:
    from marrowscope.engine.detector_train import load_train_config, train_detector

    cfg = load_train_config(args.config, _overrides(args.set or []))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False), encoding="utf-8")
    train_detector(cfg, out, log=lambda m: print(m, flush=True))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from marrowscope.data.fields import duplicate_boxes, read_field_manifest
    from marrowscope.engine.detector_train import evaluate_fields, format_scores
    from marrowscope.inference.fields import FieldDetector, load_field

    det = FieldDetector.load(args.detector)
    records = read_field_manifest(args.data, split=args.split)
    t0 = time.perf_counter()
    results = []
    for r in records:
        d = det.detect(load_field(r.path))
        results.append((d.boxes, d.scores))
    secs = time.perf_counter() - t0
    report = {"detector": str(args.detector), "split": args.split, "fields": len(records)}
    for iou in (0.5, 0.3):
        per = evaluate_fields(results, records, iou=iou)
        report[f"iou_{iou}"] = {g: s.to_dict() for g, s in per.items()}
        print(f"{args.detector} on {args.split} ({len(records)} fields), IoU >= {iou}:")
        print(format_scores(per))
    report["seconds_per_field_incl_decode"] = secs / max(1, len(records))
    # one cell boxed twice in the labels: a detector boxing it once matches one box of the pair
    twice = [
        {"field": r.path, "origin": r.origin, "boxes": [i, j]}
        for r in records
        for i, j in duplicate_boxes(r.wbc)
    ]
    report["labels_boxed_twice"] = twice
    for t in twice:
        print(
            f"note: {t['field']} ({t['origin']}): white-cell boxes {t['boxes'][0]} and "
            f"{t['boxes'][1]} overlap by more than half, one cell boxed twice? It caps the "
            "recall of its origin by one cell"
        )
    if args.pictures:
        _failure_pictures(results, records, Path(args.pictures), str(args.detector))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")


def _failure_pictures(results, records, folder: Path, label: str, per_origin: int = 4) -> None:  # type: ignore[no-untyped-def]
    """One JPEG per origin: its worst fields at IoU 0.5 (annotation green, found magenta with
    score; a missed cell's box is drawn thick), tiles 256 px high."""
    import cv2

    from marrowscope.inference.fields import load_field
    from marrowscope.metrics.detection import match_boxes

    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() else "-" for ch in Path(label).name)
    for origin in sorted({r.origin for r in records}):
        bad = []
        for (boxes, scores), r in zip(results, records, strict=True):
            if r.origin != origin:
                continue
            counts, matched = match_boxes(boxes, scores, r.wbc, iou=0.5)
            if counts.fp or counts.fn:
                bad.append((counts.fp + counts.fn, r, boxes, scores, matched))
        bad.sort(key=lambda t: (-t[0], t[1].path))
        tiles = []
        for _, r, boxes, scores, matched in bad[:per_origin]:
            rgb = load_field(r.path).copy()
            t = max(2, round(min(rgb.shape[:2]) / 150))
            hit = set(matched[matched >= 0].tolist())
            for j, b in enumerate(r.wbc):
                x0, y0, x1, y1 = (int(round(v)) for v in b)
                cv2.rectangle(rgb, (x0, y0), (x1, y1), (0, 200, 0), t if j in hit else 3 * t)
            for b, s, m in zip(boxes, scores, matched, strict=True):
                x0, y0, x1, y1 = (int(round(v)) for v in b)
                colour = (200, 0, 200) if m < 0 else (60, 60, 255)
                cv2.rectangle(rgb, (x0, y0), (x1, y1), colour, t)
                cv2.putText(
                    rgb,
                    f"{s:.2f}",
                    (x0 + 3, y0 + 12 * t),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * t,
                    colour,
                    t,
                )
            scale = 256 / rgb.shape[0]
            tiles.append(
                cv2.resize(rgb, (round(rgb.shape[1] * scale), 256), interpolation=cv2.INTER_AREA)
            )
        if not tiles:
            continue
        sheet = np.hstack(
            [np.pad(tile, ((0, 0), (0, 4), (0, 0)), constant_values=255) for tile in tiles]
        )
        out = folder / f"fields-{safe}-{origin.lower()}-failures.jpg"
        cv2.imwrite(
            str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88]
        )
        print(f"wrote {out} ({len(bad)} fields with an error, {len(tiles)} shown)")
    _error_sheet(results, records, folder / f"fields-{safe}-errors.jpg")


def _error_sheet(results, records, out: Path, side: int = 200) -> None:  # type: ignore[no-untyped-def]
    """Every missed annotated cell (green) and every false box (magenta), one tile each: the
    region around it (twice its size) with the field's id, origin and the box's score."""
    import cv2

    from marrowscope.inference.fields import load_field
    from marrowscope.metrics.detection import match_boxes

    tiles = []
    for (boxes, scores), r in zip(results, records, strict=True):
        counts, matched = match_boxes(boxes, scores, r.wbc, iou=0.5)
        if not (counts.fp or counts.fn):
            continue
        hit = set(matched[matched >= 0].tolist())
        errors = [("missed", b, None) for j, b in enumerate(r.wbc) if j not in hit]
        errors += [("false", b, s) for b, s, m in zip(boxes, scores, matched, strict=True) if m < 0]
        rgb = load_field(r.path)
        for kind, b, s in errors:
            img = rgb.copy()
            t = max(2, round(min(img.shape[:2]) / 200))
            for o in r.wbc:
                cv2.rectangle(
                    img, tuple(int(v) for v in o[:2]), tuple(int(v) for v in o[2:]), (0, 200, 0), t
                )
            for o in boxes:
                cv2.rectangle(
                    img,
                    tuple(int(v) for v in o[:2]),
                    tuple(int(v) for v in o[2:]),
                    (200, 0, 200),
                    t,
                )
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            half = max(b[2] - b[0], b[3] - b[1], 60)
            x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
            x1, y1 = int(min(img.shape[1], cx + half)), int(min(img.shape[0], cy + half))
            tile = cv2.resize(img[y0:y1, x0:x1], (side, side), interpolation=cv2.INTER_AREA)
            label = f"{Path(r.path).stem[:8]} {r.origin[:6]} {kind}" + (
                "" if s is None else f" {s:.2f}"
            )
            cv2.rectangle(tile, (0, 0), (side - 1, 14), (255, 255, 255), -1)
            cv2.putText(
                tile, label, (2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA
            )
            tiles.append(tile)
    if not tiles:
        return
    per_row = 6
    while len(tiles) % per_row:
        tiles.append(np.full((side, side, 3), 255, np.uint8))
    rows = [np.hstack(tiles[i : i + per_row]) for i in range(0, len(tiles), per_row)]
    cv2.imwrite(
        str(out), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88]
    )
    print(f"wrote {out} ({len(tiles)} tiles)")


def _card_extras(extra: dict, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    """``extra`` with the touching-cells result (``--touching``) and the card's note (``--note``)."""
    from marrowscope.engine.detector_card import touching_summary

    extra = dict(extra)
    if args.touching:
        result = json.loads(Path(args.touching).read_text(encoding="utf-8"))
        extra["touching"] = touching_summary(result, args.touching)
    if args.note:
        extra["card_note"] = args.note
    return extra


def _publish(meta, description: str) -> None:  # type: ignore[no-untyped-def]
    """Write a shipped detector's ``metadata.json`` and ``MODEL_CARD.md`` and record the sha256
    of its files in ``pretrained/detectors.json`` (checked on every load)."""
    from marrowscope.engine.detector_card import CARD_NAME, render_detector_card
    from marrowscope.models.bundle import PRETRAINED_DIR
    from marrowscope.models.detector import (
        DETECTORS_INDEX,
        METADATA_FILE,
        ONNX_FILE,
        WEIGHTS_FILE,
        DetectorMetadata,
        detector_index,
    )
    from marrowscope.utils.io import atomic_write_json, atomic_write_text, file_sha256

    dst = PRETRAINED_DIR / meta.name
    atomic_write_json(dst / METADATA_FILE, DetectorMetadata.to_dict(meta))
    atomic_write_text(dst / CARD_NAME, render_detector_card(meta))
    index = detector_index()
    index[meta.name] = {
        "description": description,
        "files": {f: file_sha256(dst / f) for f in (ONNX_FILE, WEIGHTS_FILE, METADATA_FILE)},
    }
    atomic_write_json(PRETRAINED_DIR / DETECTORS_INDEX, dict(sorted(index.items())))


def cmd_pack(args: argparse.Namespace) -> None:
    from marrowscope.models.bundle import PRETRAINED_DIR
    from marrowscope.models.detector import ONNX_FILE, WEIGHTS_FILE, read_detector_metadata

    src = Path(args.bundle)
    meta = read_detector_metadata(src)
    extra = dict(meta.extra)
    if args.val:
        extra["evaluation"] = json.loads(Path(args.val).read_text(encoding="utf-8"))
    meta = replace(meta, name=args.name, extra=_card_extras(extra, args))
    if args.min_score is not None:
        meta = replace(meta, min_score=args.min_score)
    dst = PRETRAINED_DIR / args.name
    dst.mkdir(parents=True, exist_ok=True)
    for f in (WEIGHTS_FILE, ONNX_FILE):
        shutil.copyfile(src / f, dst / f)
    _publish(meta, args.description)
    print(f"packed {src} as {dst}")


def cmd_card(args: argparse.Namespace) -> None:
    from marrowscope.models.detector import (
        detector_index,
        pretrained_detector,
        read_detector_metadata,
    )

    meta = read_detector_metadata(pretrained_detector(args.name))  # checks its sha256
    meta = replace(meta, extra=_card_extras(dict(meta.extra), args))
    _publish(meta, detector_index()[args.name]["description"])
    print(f"wrote the card of {args.name}")


def cmd_fit_classical(args: argparse.Namespace) -> None:
    from marrowscope.data.fields import read_field_manifest
    from marrowscope.engine.detector_train import evaluate_fields, format_scores
    from marrowscope.inference.fields import load_field, resolve_scale
    from marrowscope.preprocess.fields import ClassicalParams, detect_classical

    records = read_field_manifest(args.data, split="train")
    fields = [(load_field(r.path), r) for r in records]
    scales = [resolve_scale(rgb).um_per_px for rgb, _ in fields]
    best = None
    for thr in (45.0, 50.0, 55.0, 60.0, 65.0):
        for grow in (1.15, 1.2, 1.25, 1.3, 1.35, 1.4):
            p = ClassicalParams(stain_threshold=thr, grow=grow)
            res = [
                detect_classical(rgb, um_per_px=u, params=p)
                for (rgb, _), u in zip(fields, scales, strict=True)
            ]
            per = evaluate_fields(res, records)
            worst = min(s.f1 for g, s in per.items() if g != "all")
            print(f"threshold {thr} grow {grow}: worst-origin F1 {worst:.3f}", flush=True)
            if best is None or worst > best[0]:
                best = (worst, p, per)
    assert best is not None
    print(f"best on train: {best[1]}\n{format_scores(best[2])}")


def cmd_fit_ruler(args: argparse.Namespace) -> None:
    from marrowscope.data.fields import annotated_rbc_px, read_field_manifest
    from marrowscope.inference.fields import load_field
    from marrowscope.preprocess.fields import RULER_GAIN, estimate_scale

    ratios = []
    for r in read_field_manifest(args.data, split="train"):
        truth = annotated_rbc_px(r.rbc, r.width, r.height, min_cells=2)
        s = estimate_scale(load_field(r.path))
        if s is None or truth is None:
            continue
        ratios.append(truth / s.rbc_px)
    print(
        f"{len(ratios)} fields: annotated / measured red-cell size, median {np.median(ratios):.3f}; "
        f"RULER_GAIN {RULER_GAIN} -> {RULER_GAIN * np.median(ratios):.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--config", default="configs/detect-fields.yaml")
    t.add_argument("--out", required=True)
    t.add_argument("--set", action="append", help="override a setting: key=value")
    e = sub.add_parser("evaluate")
    e.add_argument("detector", help="a bundle folder, a shipped name, or classical")
    e.add_argument("--data", default=DATA)
    e.add_argument("--split", default="val")
    e.add_argument("--out")
    e.add_argument(
        "--pictures", help="folder for a failure sheet per origin and a sheet of every error (JPEG)"
    )
    p = sub.add_parser("pack")
    p.add_argument("bundle")
    p.add_argument(
        "--name", required=True, help="the shipped name (wbc2 ...); an existing one is replaced"
    )
    p.add_argument("--val", help="the evaluate JSON of the val split, stored in the metadata")
    p.add_argument("--min-score", type=float, help="replace the fitted score threshold")
    p.add_argument(
        "--description",
        default="white cells in blood-smear fields (CenterNet on frozen MobileNetV2), field-dev",
    )
    c = sub.add_parser("card", help="rewrite a shipped detector's MODEL_CARD.md (and metadata)")
    c.add_argument("name")
    for q in (p, c):
        q.add_argument(
            "--touching", help="a benchmarks/touching_cells.py result, stored and shown on the card"
        )
        q.add_argument("--note", help="a line for the card's recipe (e.g. how it was trained)")
    for name in ("fit-classical", "fit-ruler"):
        q = sub.add_parser(name)
        q.add_argument("--data", default=DATA)
    args = ap.parse_args(argv)
    {
        "train": cmd_train,
        "evaluate": cmd_evaluate,
        "pack": cmd_pack,
        "card": cmd_card,
        "fit-classical": cmd_fit_classical,
        "fit-ruler": cmd_fit_ruler,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
