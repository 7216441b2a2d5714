"""Manifests: one row per image (path, label, split, group), built from a scan or read from CSV.

:func:`build_manifest` applies the paper's subset rules (chosen classes in a given order, a seeded
cap per class, a minimum per class). A manifest CSV has a header with at least ``path`` and
``label``; ``split`` (train/val/test) and ``group`` (patient/slide id) are optional.
"""

from __future__ import annotations

import csv
import io
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marrowscope.data import DataError
from marrowscope.data.scan import ScanResult, utf8_name_problem
from marrowscope.utils.io import atomic_write_text

SPLIT_NAMES = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "split", "group")


@dataclass(frozen=True)
class ManifestRow:
    """One image: absolute ``path``, class ``label``, optional ``split`` and ``group``."""

    path: str
    label: str
    split: str | None = None
    group: str | None = None


def class_rng(seed: int, name: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and the class name.

    Each class gets its own stream, so a class's draw does not change when other classes are
    added, removed or reordered.
    """
    return np.random.default_rng([int(seed) % 2**63, zlib.crc32(name.encode("utf-8"))])


def _check_limits(max_per_class: int | None, min_per_class: int) -> None:
    """The per-class cap and minimum are in range (else a DataError naming the option)."""
    if max_per_class is not None and max_per_class < 1:
        raise DataError(
            f"max_per_class must be >= 1 (or unset for no cap), got {max_per_class}; "
            "fix --max-per-class / data.max_per_class"
        )
    if min_per_class < 0:
        raise DataError(f"min_per_class must be >= 0, got {min_per_class}; fix data.min_per_class")


def build_manifest(
    scan: ScanResult,
    *,
    classes: Sequence[str] | None = None,
    max_per_class: int | None = None,
    min_per_class: int = 1,
    seed: int = 0,
) -> list[ManifestRow]:
    """Select the images to use from a scan (the paper's subset rules).

    Args:
        scan: result of :func:`~marrowscope.data.scan.scan_folder`.
        classes: classes to keep, in this order; ``None`` keeps every class folder (sorted).
        max_per_class: keep at most this many images per class, drawn at random with
            :func:`class_rng` (``seed``, class name); ``None`` keeps all.
        min_per_class: a class with fewer usable images is an error.
        seed: seed of the draw.

    Returns:
        Rows sorted by (class order, path), paths absolute, no split yet.

    Raises:
        DataError: a requested class is missing, a class folder is empty, a class has fewer than
            ``min_per_class`` images, or an argument is out of range.
    """
    _check_limits(max_per_class, min_per_class)
    available = list(scan.counts)
    if classes is None:
        chosen = available
        fix_empty = "delete the folder or list the classes to keep with --classes / data.classes"
    else:
        chosen = list(classes)
        if not chosen:
            raise DataError(
                "the class list is empty; name at least one class in --classes / data.classes "
                f"(available in {scan.root}: {', '.join(available)})"
            )
        dupes = sorted({c for c in chosen if chosen.count(c) > 1})
        if dupes:
            raise DataError(
                f"class {dupes[0]} is listed twice in --classes / data.classes; list it once"
            )
        missing = [c for c in chosen if c not in scan.counts]
        if missing:
            raise DataError(
                f"class {missing[0]} was asked for but there is no folder "
                f"{scan.root / missing[0]}; "
                f"available classes: {', '.join(available)} (fix --classes / data.classes)"
            )
        fix_empty = "remove it from --classes / data.classes"

    rows: list[ManifestRow] = []
    for name in chosen:
        files = scan.files[name]
        n = len(files)
        if n == 0:
            raise DataError(f"class {name} has no usable image in {scan.root / name}; {fix_empty}")
        if n < min_per_class:
            raise DataError(
                f"class {name} has only {n} usable image(s), fewer than min_per_class="
                f"{min_per_class}; lower it (train, cv: --set data.min_per_class={n}; data "
                f"manifest: --min-per-class {n}), or drop the class (--set data.classes=[...] / "
                "--classes)"
            )
        picked = [Path(os.path.abspath(p)) for p in files]
        if max_per_class is not None and n > max_per_class:
            picked = [picked[i] for i in _capped(n, max_per_class, seed, name)]
        rows.extend(ManifestRow(path=str(p), label=name) for p in sorted(picked))
    return rows


def _capped(n: int, max_per_class: int, seed: int, name: str) -> list[int]:
    """The seeded cap draw: sorted indices of the ``max_per_class`` of ``n`` (path-sorted) images
    of class ``name`` that are kept; one rule for folders and manifests."""
    idx = class_rng(seed, name).choice(n, size=max_per_class, replace=False)
    return sorted(idx.tolist())


def limit_rows(
    rows: Sequence[ManifestRow],
    *,
    max_per_class: int | None,
    min_per_class: int,
    seed: int,
    source: str | Path,
) -> list[ManifestRow]:
    """Apply ``max_per_class`` / ``min_per_class`` to a manifest's rows, as :func:`build_manifest`
    does to a folder's images.

    The cap is the same seeded per-class draw (:func:`class_rng` over the class's rows sorted by
    path), so a manifest listing exactly a folder's images keeps the same images as the folder.
    Rows that carry a split (a recorded split, e.g. a run's ``split.csv``) are never thinned:
    that would change the recorded split, so a cap that would drop any of them is an error; a cap
    they already meet (a split made under the same cap) changes nothing.

    Args:
        rows: the manifest's rows (after the class selection).
        max_per_class: keep at most this many rows per class; ``None`` keeps all.
        min_per_class: a class with fewer rows is an error.
        seed: seed of the draw.
        source: the manifest, for messages.

    Returns:
        The kept rows, in input order.

    Raises:
        DataError: an argument is out of range, a class has fewer than ``min_per_class`` rows, or
            a cap would thin a recorded split; the message names the class, the file and the fix.
    """
    _check_limits(max_per_class, min_per_class)
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_class.setdefault(r.label, []).append(i)
    recorded = any(r.split is not None for r in rows)
    keep: list[int] = []
    for name, idx in by_class.items():
        n = len(idx)
        if n < min_per_class:
            raise DataError(
                f"class {name} has only {n} row(s) in manifest {source}, fewer than "
                f"min_per_class={min_per_class}; lower it (train, cv: --set "
                f"data.min_per_class={n}; data manifest: --min-per-class {n}), or drop the class "
                "(--set data.classes=[...] / --classes)"
            )
        if max_per_class is None or n <= max_per_class:
            keep.extend(idx)
            continue
        if recorded:
            raise DataError(
                f"manifest {source} records a split (its split column) and class {name} has {n} "
                f"rows, more than max_per_class={max_per_class}; a cap would change the recorded "
                "split: unset the cap (--set data.max_per_class=null / no --max-per-class), or "
                "clear the split column to split anew"
            )
        order = sorted(idx, key=lambda i: Path(rows[i].path))
        keep.extend(order[j] for j in _capped(n, max_per_class, seed, name))
    return [rows[i] for i in sorted(keep)]


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def read_manifest(path: str | Path, *, group_column: str | None = None) -> list[ManifestRow]:
    """Read a manifest CSV.

    Args:
        path: CSV with a header row; required columns ``path`` and ``label``; optional
            ``split`` (train/val/test, empty = none) and ``group``. Other columns are ignored.
            Relative image paths are resolved against the CSV's folder.
        group_column: column to read into :attr:`ManifestRow.group` (e.g. ``"patient"``);
            default ``"group"`` if present.

    Raises:
        DataError: the file is missing or empty, a column is missing, a row lacks a path or
            label, a split value is unknown, or a path appears twice. The message names the
            file, the line and the fix.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"manifest {p} does not exist; check the path (data.manifest)")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"manifest {p} is not UTF-8 text ({e}); save it as UTF-8 CSV") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header or not any(header):
        raise DataError(
            f"manifest {p} is empty; it needs a header line 'path,label[,split][,group]'"
        )
    reader.fieldnames = header
    for col in ("path", "label"):
        if col not in header:
            raise DataError(
                f"manifest {p} line 1: no '{col}' column (header: {','.join(header)}); the header "
                "must name at least the columns path,label"
            )
    gcol = group_column or "group"
    if group_column is not None and group_column not in header:
        raise DataError(
            f"manifest {p} line 1: no '{group_column}' column for the groups (header: "
            f"{','.join(header)}); add it or fix data.split.group_column"
        )
    base = p.parent.absolute()
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    for rec in reader:
        line = reader.line_num
        if all(_clean(v) is None for v in rec.values() if isinstance(v, str)):
            continue  # blank line
        img = _clean(rec.get("path"))
        label = _clean(rec.get("label"))
        if img is None or label is None:
            what = "path" if img is None else "label"
            raise DataError(f"manifest {p} line {line}: empty {what}; fill it in or delete the row")
        split = _clean(rec.get("split"))
        if split is not None:
            split = split.lower()
            if split not in SPLIT_NAMES:
                raise DataError(
                    f"manifest {p} line {line}: unknown split {split!r}; use train, val or test "
                    "(or leave it empty to split automatically)"
                )
        img_path = Path(img).expanduser()
        if not img_path.is_absolute():
            img_path = base / img_path
        full = os.path.normpath(img_path)
        if full in seen:
            raise DataError(
                f"manifest {p} line {line}: {full} is already listed on line {seen[full]}; "
                "list each image once"
            )
        seen[full] = line
        rows.append(ManifestRow(path=full, label=label, split=split, group=_clean(rec.get(gcol))))
    if not rows:
        raise DataError(f"manifest {p} has a header but no rows; add one line per image")
    return rows


def require_utf8_paths(paths: Iterable[str]) -> None:
    """Refuse a file name that UTF-8 text cannot hold (bytes that are not UTF-8 in the name):
    a manifest, split or fold file naming it could not name the real file.

    Raises:
        DataError: naming the first such file and the fix.
    """
    for p in paths:
        msg = utf8_name_problem(p)
        if msg is not None:
            raise DataError(msg)


def write_manifest(rows: Iterable[ManifestRow], path: str | Path) -> None:
    """Write ``rows`` atomically as CSV with the columns path,label,split,group.

    Raises:
        DataError: a path is not valid UTF-8 (:func:`require_utf8_paths`).
    """
    rows = list(rows)
    require_utf8_paths(r.path for r in rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for r in rows:
        writer.writerow([r.path, r.label, r.split or "", r.group or ""])
    atomic_write_text(Path(path), buf.getvalue())


def class_names(rows: Iterable[ManifestRow]) -> list[str]:
    """Labels in order of first appearance."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r.label, None)
    return list(seen)
