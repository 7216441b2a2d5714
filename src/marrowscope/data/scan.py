"""Scan a folder-per-class image tree: classes, usable files, sizes, unreadable, ignored and
byte-identical (duplicate) files.

Layout: ``root/<CLASS>/**/<image>``. Classes are the immediate, non-hidden sub-folders of
``root`` (sorted); each class's images are found recursively, so the TCIA layout
``BLA/0001-1000/BLA_00001.jpg`` works. Hidden files and folders (and ``__MACOSX``) are skipped;
files directly in ``root`` and non-image files are reported as ``ignored``.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from marrowscope.data import DataError
from marrowscope.data.duplicates import DuplicateGroup, find_duplicates
from marrowscope.preprocess.cache import process_context, resolve_workers
from marrowscope.utils.image import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    is_hidden,
    list_image_files,
    read_image,
)
from marrowscope.utils.io import printable
from marrowscope.utils.progress import make_progress

POOL_MIN_FILES = 64
"""Below this many files the image check runs in-process (a pool costs more than it saves)."""


@dataclass(frozen=True)
class ScanResult:
    """What :func:`scan_folder` found.

    Attributes:
        root: the scanned folder.
        counts: usable images per class (every class folder, sorted; 0 for empty ones).
        files: usable image paths per class, sorted.
        sizes: ``(width, height) -> number of images`` (only with ``check_images=True``).
        unreadable: ``(path, message)`` of image files that cannot be used.
        empty_classes: class folders without a usable image.
        ignored: non-image files, and files directly in ``root``.
        duplicates: groups of usable images with identical bytes (only with
            ``find_duplicates=True``; ``None`` when not looked for): within one class training
            keeps one copy, across classes (a label conflict) training refuses the data.
    """

    root: Path
    counts: dict[str, int]
    files: dict[str, list[Path]]
    sizes: dict[tuple[int, int], int]
    unreadable: list[tuple[Path, str]]
    empty_classes: list[str]
    ignored: list[Path]
    duplicates: list[DuplicateGroup] | None = None

    @property
    def classes(self) -> list[str]:
        """Class names (sorted folder names)."""
        return list(self.counts)

    @property
    def total(self) -> int:
        """Usable images over all classes."""
        return sum(self.counts.values())


def _layout_hint(root: Path) -> str:
    return (
        f"expected one sub-folder per class, e.g. {root / 'BLA' / 'BLA_00001.jpg'} "
        f"(images: {', '.join(IMAGE_EXTENSIONS)}; nested sub-folders allowed)"
    )


def utf8_name_problem(path: str) -> str | None:
    """The message for a file name that UTF-8 text cannot hold (bytes that are not UTF-8 in the
    name), or ``None`` for a good name: a manifest, split or fold file could not name the file."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return (
            f"{printable(path)}: the file name is not valid UTF-8 (shown with its odd bytes "
            "escaped); rename the file (marrowscope's manifests, splits and folds are UTF-8 "
            "text that must name the real files)"
        )
    return None


def _check_file(path: str) -> tuple[str, tuple[int, int] | None, str | None]:
    """Decode ``path`` fully: ``(path, (width, height), None)`` or ``(path, None, message)``."""
    try:
        arr = read_image(path)
    except ImageReadError as e:
        return path, None, str(e)
    return path, (int(arr.shape[1]), int(arr.shape[0])), None


def _check_files(
    paths: list[Path], workers: int, progress: bool
) -> dict[str, tuple[tuple[int, int] | None, str | None]]:
    results: dict[str, tuple[tuple[int, int] | None, str | None]] = {}
    n_workers = min(resolve_workers(workers), max(1, len(paths)))
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("Checking images", total=len(paths))
        if n_workers <= 1 or len(paths) < POOL_MIN_FILES:
            for p in paths:
                path, size, err = _check_file(str(p))
                results[path] = (size, err)
                bar.advance(task)
        else:
            ctx = process_context()
            chunk = max(1, min(256, len(paths) // (n_workers * 4)))
            with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
                for path, size, err in pool.map(_check_file, map(str, paths), chunksize=chunk):
                    results[path] = (size, err)
                    bar.advance(task)
    return results


def scan_folder(
    root: str | Path,
    *,
    check_images: bool = True,
    workers: int = 0,
    progress: bool = True,
    utf8_names: bool = False,
    find_duplicates: bool = False,
) -> ScanResult:
    """Find the classes and images of a folder-per-class tree.

    Args:
        root: folder with one sub-folder per class.
        check_images: decode every image (finds unreadable files, gathers sizes); without it
            only empty (0-byte) files are reported unreadable.
        utf8_names: also report a file whose name is not valid UTF-8 as unreadable
            (:func:`utf8_name_problem`: rename it), as ``data scan`` does for a tree meant for
            training, whose manifests and splits must name every file; predicting on such a
            file works, so other commands leave this off.
        workers: processes for the image check; 0 = one per CPU core, 1 = in-process.
        find_duplicates: also find usable images with identical bytes
            (:attr:`ScanResult.duplicates`; only same-size files are read and hashed).
        progress: show a progress bar while checking.

    Raises:
        DataError: ``root`` does not exist, is not a folder, or has no class sub-folders.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; {_layout_hint(root)}")
    if not root.is_dir():
        raise DataError(f"data root {root} is a file, not a folder; {_layout_hint(root)}")
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    class_dirs = [p for p in entries if p.is_dir() and not is_hidden(p.name)]
    if not class_dirs:
        raise DataError(f"data folder {root} has no class sub-folders; {_layout_hint(root)}")
    ignored = [p for p in entries if not p.is_dir() and not is_hidden(p.name)]

    found: dict[str, list[Path]] = {}
    for d in class_dirs:
        images, others = list_image_files(d)
        found[d.name] = images
        ignored.extend(others)

    unreadable: list[tuple[Path, str]] = []
    sizes: dict[tuple[int, int], int] = {}
    bad_names = {
        str(p): (None, msg)
        for ps in found.values()
        for p in ps
        if utf8_names and (msg := utf8_name_problem(str(p))) is not None
    }
    if check_images:
        todo = [p for ps in found.values() for p in ps if str(p) not in bad_names]
        checked = _check_files(todo, workers, progress)
    else:
        checked = {}
        for ps in found.values():
            for p in ps:
                if str(p) not in bad_names and p.stat().st_size == 0:
                    checked[str(p)] = (
                        None,
                        f"{p}: file is empty (0 bytes); remove it or replace it with the image",
                    )
    checked.update(bad_names)

    files: dict[str, list[Path]] = {}
    for name, ps in found.items():
        usable = []
        for p in ps:
            size, err = checked.get(str(p), (None, None))
            if err is not None:
                unreadable.append((p, err))
                continue
            usable.append(p)
            if size is not None:
                sizes[size] = sizes.get(size, 0) + 1
        files[name] = usable

    counts = {name: len(ps) for name, ps in files.items()}
    duplicates = None
    if find_duplicates:
        duplicates = _find_duplicates(files)
    return ScanResult(
        root=root,
        counts=counts,
        files=files,
        sizes=dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))),
        unreadable=unreadable,
        empty_classes=[name for name, n in counts.items() if n == 0],
        ignored=sorted(ignored),
        duplicates=duplicates,
    )


def _find_duplicates(files: dict[str, list[Path]]) -> list[DuplicateGroup]:
    return find_duplicates((str(p), name) for name, ps in files.items() for p in ps)


def duplicate_counts(result: ScanResult) -> tuple[dict[str, int], dict[str, int]]:
    """Per class: extra copies of an image of the class (those training leaves out), and
    images identical to an image of another class (label conflicts)."""
    copies: dict[str, int] = {}
    conflicts: dict[str, int] = {}
    for g in result.duplicates or []:
        for name, n in Counter(g.labels).items():
            if n > 1:
                copies[name] = copies.get(name, 0) + n - 1
            if g.conflict:
                conflicts[name] = conflicts.get(name, 0) + n
    return copies, conflicts


def describe_duplicates(result: ScanResult, shown: int = 5) -> list[str]:
    """Lines on the duplicates found (none when there are none or they were not looked for):
    the label conflicts, then the copies within a class, each naming the first ``shown`` groups,
    the count and what training does about them."""
    groups = result.duplicates or []
    conflicts = [g for g in groups if g.conflict]
    within = [g for g in groups if not g.conflict]
    lines = []
    if conflicts:
        lines.append(
            f"{len(conflicts)} image(s) are byte-identical copies filed under different classes "
            "(label conflicts; training refuses them): remove one copy or correct its label"
        )
        lines += _first(conflicts, shown, lambda g: g.describe())
    if within:
        extra = sum(len(g.extra) for g in within)
        lines.append(
            f"{len(within)} image(s) have byte-identical copies in their own class ({extra} extra "
            "cop(ies); training keeps the first in path order and leaves the others out)"
        )
        lines += _first(within, shown, lambda g: f"{g.paths[0]} = {', '.join(g.extra)}")
    return lines


def _first(
    groups: list[DuplicateGroup], shown: int, line: Callable[[DuplicateGroup], str]
) -> list[str]:
    """An indented line for each of the first ``shown`` groups, then how many more there are."""
    more = [f"  and {len(groups) - shown} more"] if len(groups) > shown else []
    return [f"  {line(g)}" for g in groups[:shown]] + more


def format_scan(result: ScanResult) -> Table:
    """A rich table: class, usable images, unreadable files (plus a total row); when duplicates
    were looked for, also identical copies within a class and label conflicts
    (:func:`duplicate_counts`)."""
    bad: dict[str, int] = {}
    for p, _ in result.unreadable:
        try:
            cls = p.relative_to(result.root).parts[0]
        except ValueError:  # pragma: no cover - unreadable files always lie below root
            continue
        bad[cls] = bad.get(cls, 0) + 1
    table = Table(title=result.root.name or str(result.root))
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("unreadable", justify="right")
    dup = result.duplicates is not None
    copies, conflicts = duplicate_counts(result)
    if dup:
        table.add_column("identical copies", justify="right")
        table.add_column("label conflicts", justify="right")
    for name, n in result.counts.items():
        extra = [str(copies.get(name, 0)), str(conflicts.get(name, 0))] if dup else []
        flagged = n == 0 or conflicts.get(name, 0) or copies.get(name, 0)
        style = "yellow" if flagged else None
        table.add_row(name, str(n), str(bad.get(name, 0)), *extra, style=style)
    table.add_section()
    total = [str(sum(copies.values())), str(sum(conflicts.values()))] if dup else []
    table.add_row("total", str(result.total), str(len(result.unreadable)), *total, style="bold")
    return table
