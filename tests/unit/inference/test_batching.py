"""Input collection, the worker-process decode pipeline, and the prediction table writers."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marrowscope.config import PreprocessConfig
from marrowscope.inference import batching
from marrowscope.inference.batching import (
    GRAYSCALE_WARNING,
    InputError,
    collect_image_paths,
    collect_inputs,
    iter_loaded,
    prediction_records,
    write_predictions,
)

CFG = PreprocessConfig(size=16)


def _img(path: Path, value: int = 100, size: tuple[int, int] = (20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------ collect paths


def test_collect_folders_recursive_files_globs_in_order_without_duplicates(tmp_path: Path) -> None:
    a = _img(tmp_path / "d" / "b.png")
    b = _img(tmp_path / "d" / "sub" / "a.JPG")
    (tmp_path / "d" / "notes.txt").write_text("not an image")
    c = _img(tmp_path / "e" / "x.tif")
    explicit = tmp_path / "odd.dat"
    explicit.write_bytes(b"named explicitly: kept, fails later with an error row")

    got = collect_image_paths(
        [str(tmp_path / "d"), str(explicit), str(tmp_path / "e" / "*.tif"), a]
    )
    assert got == [a, b, explicit, c]


def test_collect_names_the_files_it_leaves_out_and_takes_upper_case_extensions(
    tmp_path: Path,
) -> None:
    """The reviewed case: a.JPG and b.jpeg are read, c.webp and d.jfif were left out without a
    word; now they are listed (and a glob's non-image matches too)."""
    d = tmp_path / "cells"
    a, b = _img(d / "a.JPG"), _img(d / "b.jpeg")
    for name in ("c.webp", "d.jfif"):
        (d / name).write_bytes(b"RIFF....")
    got = collect_inputs([str(d)])
    assert got.paths == [a, b]
    assert got.skipped == [d / "c.webp", d / "d.jfif"]
    line = got.skipped_summary()
    assert line is not None
    assert "skipped 2 file(s)" in line and "c.webp, d.jfif" in line and ".jpg" in line
    assert collect_image_paths([str(d)]) == [a, b]
    # glob matches and explicitly named files
    got = collect_inputs([str(d / "*"), str(d / "c.webp")])
    assert got.paths == [a, b, d / "c.webp"]  # named explicitly: kept, as before
    assert got.skipped == [d / "d.jfif"]
    assert "(c.webp and 1 more)" in (collect_inputs([str(d)]).skipped_summary(shown=1) or "")
    assert collect_inputs([str(a)]).skipped_summary() is None
    # a folder of other files only: the error says what it found
    only = tmp_path / "webp"
    only.mkdir()
    (only / "e.webp").write_bytes(b"x")
    with pytest.raises(InputError, match=r"found 1 other file\(s\), e\.g\. e\.webp"):
        collect_inputs([str(only)])


def test_records_carry_a_warning_per_image() -> None:
    recs = prediction_records(
        [("g.png", np.array([0.9, 0.1]), None), ("c.png", np.array([0.2, 0.8]), None)],
        ["P", "Q"],
        warnings=[GRAYSCALE_WARNING, None],
    )
    assert recs[0]["warning"].startswith("grayscale image") and recs[1]["warning"] == ""
    with pytest.raises(ValueError, match="1 warnings for 2 results"):
        prediction_records(
            [("a", np.array([1.0]), None), ("b", np.array([1.0]), None)], ["P"], warnings=[""]
        )


def test_collect_glob_recursive_and_missing_inputs(tmp_path: Path) -> None:
    deep = _img(tmp_path / "x" / "y" / "z.png")
    assert collect_image_paths([str(tmp_path / "**" / "*.png")]) == [deep]
    with pytest.raises(InputError, match="no such file or folder"):
        collect_image_paths([str(tmp_path / "missing.png")])
    with pytest.raises(InputError, match="matches no image"):
        collect_image_paths([str(tmp_path / "*.jpg")])
    with pytest.raises(InputError, match="no input"):
        collect_image_paths([])


def test_collect_skips_hidden_files_and_macosx_like_count_does(tmp_path: Path) -> None:
    """predict used to list ._x.jpg resource forks and __MACOSX copies that count skipped."""
    from marrowscope.explain.sheets import list_images

    real = _img(tmp_path / "s" / "cell.jpg")
    fork = tmp_path / "s" / "._cell.jpg"
    fork.write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork, not a JPEG")
    _img(tmp_path / "s" / "__MACOSX" / "cell.jpg")
    _img(tmp_path / "s" / ".thumbs" / "cell.jpg")
    assert collect_image_paths([tmp_path / "s"]) == [real]
    assert collect_image_paths([str(tmp_path / "s" / "**" / "*.jpg")]) == [real]
    assert collect_image_paths([str(tmp_path / "s" / "*")]) == [real]
    assert list_images(tmp_path / "s")[0] == [real]  # what `count` reads
    assert collect_image_paths([fork]) == [fork]  # named explicitly: kept (then an error row)


def test_collect_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match=r"empty: no image files"):
        collect_image_paths([tmp_path / "empty"])


# ------------------------------------------------------------------------------ decode pipeline


@pytest.mark.parametrize("decode", ["auto", "processes", "threads"])
def test_iter_loaded_keeps_order_across_workers_and_reports_bad_files(
    tmp_path: Path, decode: str
) -> None:
    paths = [_img(tmp_path / f"{i:02d}.png", value=i * 10) for i in range(11)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths[3:3] = [bad]
    paths[8:8] = [empty]
    out = list(iter_loaded(paths, CFG, 16, workers=2, chunk_size=2, prefetch=3, decode=decode))
    assert len(out) == len(paths)
    for p, (arr, err) in zip(paths, out, strict=True):
        if p in (bad, empty):
            assert arr is None and str(p) in err
        else:
            assert err is None and arr.shape == (16, 16, 3) and arr.dtype == np.uint8
            assert arr[0, 0, 0] == int(p.stem) * 10  # the right image in the right place
    assert "empty" in out[8][1] and "not a readable image" in out[3][1]


def test_iter_loaded_threads_decode_in_this_process_and_unknown_mode_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    seen: set[str] = set()
    real = batching.load_and_preprocess

    def recording(path, cfg, size):  # type: ignore[no-untyped-def]
        seen.add(f"{os.getpid()}:{threading.current_thread().name}")
        return real(path, cfg, size)

    monkeypatch.setattr(batching, "load_and_preprocess", recording)
    paths = [_img(tmp_path / f"{i}.png", value=i) for i in range(8)]
    out = list(iter_loaded(paths, CFG, 16, workers=2, chunk_size=2, decode="threads"))
    assert [int(a[0, 0, 0]) for a, _ in out] == list(range(8))
    # every file was decoded here (a forked worker's calls would not reach this set)
    assert seen and all(s.startswith(f"{os.getpid()}:marrowscope-decode") for s in seen)
    with pytest.raises(
        ValueError, match="decode must be one of auto, processes, threads, got 'gpu'"
    ):
        next(iter_loaded(paths, CFG, 16, decode="gpu"))


@pytest.mark.parametrize(("decode", "suffix"), [("processes", ".png"), ("auto", ".bmp")])
def test_iter_loaded_survives_a_crashing_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decode: str, suffix: str
) -> None:
    """A worker killed by a file (as a decoder segfault would) costs that file only, also when
    the pool dies while the consumer is busy and more chunks are still to be submitted; ``auto``
    decodes a BMP in a worker process, so it keeps that protection."""
    real = batching.load_and_preprocess

    def crashing(path, cfg, size):  # type: ignore[no-untyped-def]
        if "crash" in str(path):
            os._exit(11)
        return real(path, cfg, size)

    monkeypatch.setattr(batching, "load_and_preprocess", crashing)  # inherited by forked workers
    paths = [_img(tmp_path / f"{i}{suffix}", value=i) for i in range(9)]
    crash = _img(tmp_path / f"crash{suffix}")
    paths.insert(2, crash)
    out = []
    for item in iter_loaded(paths, CFG, 16, workers=1, chunk_size=1, prefetch=3, decode=decode):
        if not out:
            time.sleep(0.5)  # busy: the worker dies now, before the next chunk is submitted
        out.append(item)
    assert [e is None for _, e in out] == [p != crash for p in paths]
    assert "crashed" in out[2][1] and str(crash) in out[2][1]
    assert [int(a[0, 0, 0]) for a, _ in out if a is not None] == list(range(9))


def test_auto_decodes_jpeg_and_png_in_threads_and_other_formats_in_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The choice follows a file's first bytes, not its name; a file that cannot be opened goes
    to a worker process, which reports it."""
    parent = os.getpid()

    def where(path, cfg, size):  # type: ignore[no-untyped-def]
        here = os.getpid() == parent
        if not Path(path).exists() or not Path(path).stat().st_size:
            return None, f"{path}: unusable, seen in a {'thread' if here else 'process'}"
        return np.full((size, size, 3), 1 if here else 2, np.uint8), None

    monkeypatch.setattr(batching, "load_and_preprocess", where)
    jpeg, png, bmp, tiff = (
        _img(tmp_path / "a.jpg"),
        _img(tmp_path / "b.png"),
        _img(tmp_path / "c.bmp"),
        _img(tmp_path / "d.tif"),
    )
    disguised = tmp_path / "e.png"  # a BMP named .png
    disguised.write_bytes(bmp.read_bytes())
    jpeg_named_tif = tmp_path / "f.tif"
    jpeg_named_tif.write_bytes(jpeg.read_bytes())
    missing, empty = tmp_path / "g.jpg", tmp_path / "h.tif"
    empty.write_bytes(b"")
    paths = [jpeg, png, bmp, tiff, disguised, jpeg_named_tif, missing, empty, jpeg]
    out = list(iter_loaded(paths, CFG, 8, workers=2, chunk_size=1, decode="auto"))
    origin = [("thread" if a[0, 0, 0] == 1 else "process") if a is not None else e for a, e in out]
    assert origin == [
        "thread", "thread", "process", "process", "process", "thread",
        f"{missing}: unusable, seen in a thread", f"{empty}: unusable, seen in a thread", "thread",
    ]  # fmt: skip
    # with processes (threads) every file is decoded there
    for decode, value in (("processes", 2), ("threads", 1)):
        out = list(iter_loaded(paths[:6], CFG, 8, workers=2, chunk_size=1, decode=decode))
        assert [int(a[0, 0, 0]) for a, _ in out] == [value] * 6


# --------------------------------------------------------------------------------------- output


def _records() -> list[dict]:
    probs = np.array([0.1, 0.7, 0.2], np.float32)
    return prediction_records(
        [("a.png", probs, None), ("b.png", None, "b.png: corrupt")],
        ["X", "Y", "Z"],
        topk=2,
        extra={"model": "m", "marrowscope_version": "1.0"},
    )


def test_records_rank_classes_and_keep_error_rows() -> None:
    ok, bad = _records()
    assert list(ok) == [
        "path", "predicted", "confidence", "top1", "p_top1", "top2", "p_top2",
        "p_X", "p_Y", "p_Z", "model", "marrowscope_version", "warning", "error",
    ]  # fmt: skip
    assert (ok["predicted"], ok["top2"], ok["error"], ok["warning"]) == ("Y", "Z", "", "")
    assert ok["confidence"] == pytest.approx(0.7) and ok["p_X"] == pytest.approx(0.1)
    assert bad["predicted"] is None and bad["p_Y"] is None and bad["error"] == "b.png: corrupt"
    assert bad["model"] == "m"
    # topk larger than the number of classes is clamped
    rec = prediction_records([("a", np.array([0.5, 0.5]), None)], ["P", "Q"], topk=5)[0]
    assert "top2" in rec and "top3" not in rec
    with pytest.raises(ValueError, match="topk"):
        prediction_records([], ["P", "Q"], topk=0)


def test_write_csv_and_json(tmp_path: Path) -> None:
    write_predictions(_records(), tmp_path / "p.csv")
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert rows[0]["predicted"] == "Y" and float(rows[0]["p_Y"]) == pytest.approx(0.7)
    assert rows[1]["predicted"] == "" and rows[1]["error"] == "b.png: corrupt"
    write_predictions(_records(), tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data[1]["p_Y"] is None and data[0]["top1"] == "Y"
    with pytest.raises(InputError, match=r"\.csv, \.json or \.parquet"):
        write_predictions(_records(), tmp_path / "p.xlsx")


def test_write_parquet(tmp_path: Path) -> None:
    import pyarrow.parquet as pq  # a dev dependency: installed by make test

    write_predictions(_records(), tmp_path / "p.parquet")
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert table[0]["predicted"] == "Y" and table[1]["confidence"] is None


def test_parquet_without_pyarrow_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails as if not installed
    with pytest.raises(InputError, match="pip install pyarrow"):
        write_predictions(_records(), tmp_path / "p.parquet")
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize("suffix", ["csv", "json", "parquet"])
def test_a_file_name_that_is_not_utf8_is_written_escaped_in_every_format(
    tmp_path: Path, suffix: str
) -> None:
    import os

    name = os.fsdecode(b"caf\xe9.png")
    probs = np.array([0.1, 0.7, 0.2], np.float32)
    records = prediction_records([(name, probs, None)], ["X", "Y", "Z"], topk=1)
    out = tmp_path / f"p.{suffix}"
    write_predictions(records, out)
    if suffix == "parquet":
        import pyarrow.parquet as pq

        assert pq.read_table(out).to_pylist()[0]["path"] == "caf\\xe9.png"
    else:
        assert "caf\\xe9.png" in out.read_text(encoding="utf-8").replace("\\\\", "\\")
