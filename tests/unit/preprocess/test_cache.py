"""On-disk preprocessing cache: hits, invalidation, corrupt entries, sharing, parallel fill."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import marrowscope.preprocess.cache as cache_mod
from marrowscope.config import PreprocessConfig
from marrowscope.preprocess.cache import PreprocessCache, default_cache_root
from marrowscope.preprocess.ops import apply_preprocess, params_key
from marrowscope.utils.image import ImageReadError, read_image

CFG = PreprocessConfig(
    size=16,
    denoise=True,
    denoise_h=10,
    denoise_h_color=10,
    denoise_template_window=3,
    denoise_search_window=5,
    sharpen=True,
)


def _write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts in-process calls of apply_preprocess made by the cache."""
    count: list[int] = []
    real = cache_mod.apply_preprocess

    def spy(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
        count.append(1)
        return real(img, cfg)

    monkeypatch.setattr(cache_mod, "apply_preprocess", spy)
    return count


def _entries(cache: PreprocessCache) -> list[Path]:
    return sorted(cache.dir.rglob("*.npy"))


def test_default_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MARROWSCOPE_CACHE", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    monkeypatch.delenv("MARROWSCOPE_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "marrowscope"


def test_dir_layout_uses_params_key(tmp_path: Path) -> None:
    cache = PreprocessCache(dataclasses.replace(CFG, cache_dir=str(tmp_path / "root")))
    assert cache.dir == tmp_path / "root" / "preprocess" / f"{params_key(CFG)}-d2"


def test_get_computes_once_then_hits(tmp_path: Path, calls: list[int]) -> None:
    (path,) = _write_images(tmp_path / "img", 1)
    cache = PreprocessCache(CFG)
    first = cache.get(path)
    np.testing.assert_array_equal(first, apply_preprocess(read_image(path), CFG))
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8
    (entry,) = _entries(cache)
    assert entry.parent.name == entry.stem[:2]
    mtime = entry.stat().st_mtime_ns
    second = cache.get(path)
    np.testing.assert_array_equal(second, first)
    assert len(calls) == 1
    assert entry.stat().st_mtime_ns == mtime
    assert (cache.dir / "params.json").is_file()


@pytest.mark.parametrize("change", [{"size": 18}, {"denoise_h": 12.0}, {"sharpen": False}], ids=str)
def test_changing_a_parameter_uses_a_new_dir(
    tmp_path: Path, calls: list[int], change: dict[str, object]
) -> None:
    (path,) = _write_images(tmp_path / "img", 1)
    a = PreprocessCache(CFG)
    b = PreprocessCache(dataclasses.replace(CFG, **change))
    assert a.dir != b.dir
    a.get(path)
    out = b.get(path)
    assert len(calls) == 2  # not served from a's entry
    np.testing.assert_array_equal(out, apply_preprocess(read_image(path), b.cfg))


def test_cache_dir_and_workers_do_not_change_the_key(tmp_path: Path) -> None:
    a = PreprocessCache(CFG)
    b = PreprocessCache(dataclasses.replace(CFG, workers=5))
    assert a.dir == b.dir


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_damaged_entry_is_recomputed(tmp_path: Path, calls: list[int], damage: str) -> None:
    (path,) = _write_images(tmp_path / "img", 1)
    cache = PreprocessCache(CFG)
    good = cache.get(path)
    (entry,) = _entries(cache)
    raw = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"not a numpy file at all")
    else:
        np.save(entry, np.zeros((8, 8, 3), np.uint8))
    again = cache.get(path)
    np.testing.assert_array_equal(again, good)
    assert len(calls) == 2
    np.testing.assert_array_equal(np.load(entry), good)  # repaired on disk


def test_same_bytes_under_two_paths_share_one_entry(tmp_path: Path, calls: list[int]) -> None:
    (path,) = _write_images(tmp_path / "a", 1)
    copy = tmp_path / "b" / "other_name.png"
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    cache = PreprocessCache(CFG)
    arrays, failures = cache.load_many([path, copy], workers=1, progress=False)
    assert failures == []
    assert len(calls) == 1
    assert len(_entries(cache)) == 1
    np.testing.assert_array_equal(arrays[0], arrays[1])


def test_load_many_keeps_order_and_reports_bad_files(tmp_path: Path, calls: list[int]) -> None:
    paths = _write_images(tmp_path / "img", 3)
    bad = tmp_path / "img" / "broken.jpg"
    bad.write_text("not an image")
    missing = tmp_path / "img" / "missing.png"
    cache = PreprocessCache(CFG)
    cache.get(paths[1])  # one already cached
    order = [paths[0], bad, paths[1], missing, paths[2]]
    arrays, failures = cache.load_many(order, workers=1, progress=True)
    assert [a is None for a in arrays] == [False, True, False, True, False]
    for p, a in zip(order, arrays, strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, apply_preprocess(read_image(p), CFG))
    assert [f[0] for f in failures] == [str(bad), str(missing)]
    assert "broken.jpg" in failures[0][1] and "missing.png" in failures[1][1]
    assert len(calls) == 3  # paths[1] once before, then paths[0] and paths[2]
    with pytest.raises(ImageReadError, match="broken.jpg"):
        cache.get(bad)


def test_parallel_fill_equals_serial(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "img", 6, seed=5)
    bad = tmp_path / "img" / "bad.png"
    bad.write_bytes(b"")
    inputs = [*paths, bad]
    serial = PreprocessCache(dataclasses.replace(CFG, cache_dir=str(tmp_path / "serial")))
    parallel = PreprocessCache(dataclasses.replace(CFG, cache_dir=str(tmp_path / "parallel")))
    s_arrays, s_fail = serial.load_many(inputs, workers=1, progress=False)
    p_arrays, p_fail = parallel.load_many(inputs, workers=2, progress=False)
    assert p_fail == s_fail and len(p_fail) == 1
    for s, p in zip(s_arrays[:-1], p_arrays[:-1], strict=True):
        np.testing.assert_array_equal(s, p)
    assert p_arrays[-1] is None
    assert len(_entries(parallel)) == 6  # the workers wrote the entries
