"""The shipped detectors' model cards: rendered from their metadata, so a card says what its
weights were measured to do (per-origin val scores, touching cells, recipe, licences)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from marrowscope.engine.detector_card import CARD_NAME, render_detector_card, touching_summary
from marrowscope.models.detector import detector_index, pretrained_detector, read_detector_metadata

SHIPPED = sorted(detector_index())


def test_both_detectors_ship() -> None:
    assert SHIPPED == ["wbc1", "wbc2"]


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_card_is_what_its_metadata_renders(name: str) -> None:
    folder = pretrained_detector(name)
    meta = read_detector_metadata(folder)
    card = (folder / CARD_NAME).read_text(encoding="utf-8")
    assert card == render_detector_card(meta), (
        f"{name}'s card is stale: python scripts/train_detector.py card {name} --touching ..."
    )
    # its own val scores, per origin, and its touching-cells measurement
    for origin, s in meta.extra["evaluation"]["iou_0.5"].items():
        assert f"| {origin} | {s['fields']} | {s['recall']:.3f} | {s['precision']:.3f} |" in card
    assert "## Touching cells" in card and meta.extra["touching"]["split"] == "val"
    assert "Not a diagnostic device" in card and "CC BY 4.0" in card and "MIT" in card
    assert f"Score threshold {meta.min_score:g}" in card
    assert ("it is the default" in card) == (name == "wbc2")


def test_the_card_says_what_was_not_measured() -> None:
    meta = read_detector_metadata(pretrained_detector("wbc2"))
    bare = replace(meta, extra={k: v for k, v in meta.extra.items() if k != "touching"})
    card = render_detector_card(replace(bare, extra={**bare.extra, "evaluation": {}}))
    assert "Not measured (packed without `--val`)" in card
    assert "## Touching cells" not in card and "not measured for this card" in card


def test_touching_summary_keeps_each_gap() -> None:
    result = {
        "split": "tune",
        "fields": 3,
        "gaps": {
            "0": {"found_both": 1.0, "merged": 0.0, "mean_count_error": 0.0, "misses": []},
            "-0.2": {
                "found_both": 0.667,
                "merged": 0.333,
                "mean_count_error": 0.33,
                "misses": ["a"],
            },
        },
    }
    s = touching_summary(result, "x.json")
    assert s["split"] == "tune" and s["pairs"] == 3 and s["source"] == "x.json"
    assert s["gaps"]["-0.2"] == {"found_both": 0.667, "merged": 0.333, "count_error": 0.33}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_detector_files_are_readable_by_everyone(name: str) -> None:
    """A wheel keeps the files' modes: a 0600 file would be unreadable to all but its installer."""
    folder = pretrained_detector(name)
    for file in [*detector_index()[name]["files"], CARD_NAME]:
        mode = (folder / file).stat().st_mode
        assert mode & 0o444 == 0o444, f"{name}/{file}: mode {oct(mode & 0o777)}"
