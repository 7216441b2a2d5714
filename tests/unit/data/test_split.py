"""assign_splits: stratified proportions, reproducibility, grouped splits, errors."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from marrowscope.data import DataError
from marrowscope.data.manifest import ManifestRow
from marrowscope.data.split import assign_splits, split_sizes


def _rows(counts: dict[str, int]) -> list[ManifestRow]:
    return [ManifestRow(f"/d/{c}/{c}_{i:04d}.jpg", c) for c, n in counts.items() for i in range(n)]


def _per_class(rows: list[ManifestRow]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        out[r.label][r.split or "-"] += 1
    return out


def test_split_sizes_rounding_and_minimums() -> None:
    assert split_sizes(100, 0.15, 0.15) == (70, 15, 15)
    assert split_sizes(10, 0.15, 0.15) == (6, 2, 2)  # 1.5 rounds half up
    assert split_sizes(3, 0.15, 0.15) == (1, 1, 1)  # small class: still one in each
    assert split_sizes(5, 0.0, 0.2) == (4, 0, 1)


def test_stratified_proportions_per_class() -> None:
    rows = _rows({"AAA": 100, "BBB": 20, "CCC": 3})
    out = assign_splits(rows, val=0.15, test=0.15, seed=0)
    assert [r.path for r in out] == [r.path for r in rows]  # input order kept
    counts = _per_class(out)
    assert counts["AAA"] == Counter(train=70, val=15, test=15)
    assert counts["BBB"] == Counter(train=14, val=3, test=3)
    assert counts["CCC"] == Counter(train=1, val=1, test=1)


def test_zero_fraction_gives_no_such_split() -> None:
    out = assign_splits(_rows({"AAA": 10}), val=0.0, test=0.3, seed=0)
    assert _per_class(out)["AAA"] == Counter(train=7, test=3)


def test_reproducible_with_seed_and_different_with_another() -> None:
    rows = _rows({"AAA": 40, "BBB": 40})
    a = assign_splits(rows, val=0.2, test=0.2, seed=7)
    b = assign_splits(list(reversed(rows)), val=0.2, test=0.2, seed=7)
    c = assign_splits(rows, val=0.2, test=0.2, seed=8)
    assert {r.path: r.split for r in a} == {r.path: r.split for r in b}  # order-independent too
    assert [r.split for r in a] != [r.split for r in c]


def test_existing_splits_are_kept_and_partial_splits_rejected() -> None:
    rows = [ManifestRow("/a", "A", "test"), ManifestRow("/b", "A", "train")]
    assert assign_splits(rows, val=0.5, test=0.2, seed=0) == rows
    partial = [ManifestRow("/a", "A", "test"), ManifestRow("/b", "A", None)]
    with pytest.raises(DataError, match="1 of 2 .*/b"):
        assign_splits(partial, val=0.1, test=0.1, seed=0)


def test_too_few_images_names_class_count_and_fix() -> None:
    with pytest.raises(DataError) as info:
        assign_splits(_rows({"AAA": 30, "NGB": 2}), val=0.15, test=0.15, seed=0)
    msg = str(info.value)
    assert "class NGB" in msg and "only 2 image" in msg and "data.classes" in msg
    assert "min_per_class" not in msg  # raising the minimum would only make NGB fail it
    assert "data.split" in msg


def test_bad_fractions() -> None:
    with pytest.raises(DataError, match="below 1"):
        assign_splits(_rows({"A": 10}), val=0.5, test=0.5, seed=0)
    with pytest.raises(DataError, match="data.split.val"):
        assign_splits(_rows({"A": 10}), val=-0.1, test=0.2, seed=0)


def _grouped_rows(n_groups: int, seed_sizes: int = 0) -> list[ManifestRow]:
    rows = []
    for g in range(n_groups):
        for c, n in (("AAA", 3 + (g * 7 + seed_sizes) % 5), ("BBB", 1 + (g * 3) % 4)):
            rows += [
                ManifestRow(f"/d/{c}/p{g:02d}_{i}.jpg", c, None, f"p{g:02d}") for i in range(n)
            ]
    return rows


def test_grouped_split_never_puts_a_group_on_two_sides() -> None:
    rows = _grouped_rows(20)
    out = assign_splits(rows, val=0.15, test=0.15, seed=3, grouped=True)
    sides: dict[str, set[str]] = defaultdict(set)
    for r in out:
        sides[r.group or ""].add(r.split or "")
    assert all(len(s) == 1 for s in sides.values())
    counts = _per_class(out)
    for c in ("AAA", "BBB"):
        total = sum(counts[c].values())
        assert set(counts[c]) == {"train", "val", "test"}
        assert counts[c]["train"] > 0.5 * total  # train stays the majority
    again = assign_splits(rows, val=0.15, test=0.15, seed=3, grouped=True)
    assert again == out
    other = assign_splits(rows, val=0.15, test=0.15, seed=4, grouped=True)
    assert [r.split for r in other] != [r.split for r in out]


def test_grouped_split_needs_groups() -> None:
    rows = _grouped_rows(5)
    rows[2] = ManifestRow(rows[2].path, rows[2].label, None, None)
    with pytest.raises(DataError, match="no group.*group_column"):
        assign_splits(rows, val=0.2, test=0.2, seed=0, grouped=True)


def test_grouped_split_too_few_groups_names_class() -> None:
    rows = _grouped_rows(6)
    rows += [
        ManifestRow(f"/d/RAR/{i}.jpg", "RAR", None, "p00" if i < 5 else "p01") for i in range(9)
    ]
    with pytest.raises(DataError) as info:
        assign_splits(rows, val=0.2, test=0.2, seed=0, grouped=True)
    msg = str(info.value)
    assert "class RAR" in msg and "2 group" in msg and "data.classes" in msg
    assert "min_per_class" not in msg


def test_assign_folds_is_stratified_deterministic_and_grouped() -> None:
    from marrowscope.data.split import assign_folds

    rows = [ManifestRow(f"/d/{c}/{i}.jpg", c) for c in "AB" for i in range(10 if c == "A" else 7)]
    f = assign_folds(rows, folds=3, seed=1)
    assert f == assign_folds(rows, folds=3, seed=1)
    assert f != assign_folds(rows, folds=3, seed=2)
    for c in "AB":
        per = Counter(fi for r, fi in zip(rows, f, strict=True) if r.label == c)
        assert max(per.values()) - min(per.values()) <= 1 and len(per) == 3
    grouped = [ManifestRow(r.path, r.label, group=f"p{i % 6}") for i, r in enumerate(rows)]
    g = assign_folds(grouped, folds=3, seed=1, grouped=True)
    by_group: dict[str, set[int]] = {}
    for r, fi in zip(grouped, g, strict=True):
        by_group.setdefault(str(r.group), set()).add(fi)
    assert all(len(s) == 1 for s in by_group.values())
    with pytest.raises(DataError, match="every fold"):
        assign_folds(rows[:2] + rows[10:], folds=3, seed=1)
    with pytest.raises(DataError, match="at least 2"):
        assign_folds(rows, folds=1, seed=1)
