"""The Ray engine's inputs, decode stage and error messages, without starting Ray."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from marrowscope.cli.main import app
from marrowscope.config import PreprocessConfig
from marrowscope.engine import ray_predict
from marrowscope.engine.ray_predict import RayEngineError, decode_batch, expand_inputs

runner = CliRunner()


def test_folders_globs_manifests_and_uris_expand_to_images(
    cell_files: list[Path], tmp_path: Path
) -> None:
    folder = cell_files[0].parent
    (tmp_path / "m").mkdir()
    csv = tmp_path / "m" / "list.csv"
    csv.write_text("path,label\n../cell_files/cell_0.jpg,AAA\n" + f"{cell_files[1]},BBB\n")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    parquet = tmp_path / "m" / "list.parquet"
    pq.write_table(pa.table({"path": [str(cell_files[2])]}), parquet)
    got = expand_inputs([str(csv), str(parquet), str(folder / "*_3.*"), folder.as_uri()]).paths
    local = [str(p) for p in cell_files]
    uris = sorted(p.absolute().as_uri() for p in cell_files)
    # relative manifest paths are relative to the manifest's folder
    assert got[0] == str((tmp_path / "m" / ".." / "cell_files" / "cell_0.jpg").absolute())
    assert got[1:4] == [local[1], local[2], local[3]]
    assert got[4:] == uris  # every image below the file:// folder, through pyarrow.fs


def test_files_that_are_not_images_are_reported_as_skipped(
    cell_files: list[Path], tmp_path: Path
) -> None:
    """As with --engine local: a folder's (or a URI prefix's) other files are left out and
    named, hidden files are not, and a file named explicitly is always used."""
    folder = cell_files[0].parent
    (folder / "notes.txt").write_text("x")
    (folder / "scan.tiff.bak").write_text("x")
    (folder / ".DS_Store").write_text("x")
    got = expand_inputs([str(folder), folder.as_uri()])
    assert got.paths[:6] == [str(p) for p in cell_files]
    assert got.paths[6:] == sorted(p.absolute().as_uri() for p in cell_files)
    assert got.skipped == [
        str(folder / "notes.txt"),
        str(folder / "scan.tiff.bak"),
        (folder / "notes.txt").absolute().as_uri(),
        (folder / "scan.tiff.bak").absolute().as_uri(),
    ]
    summary = ray_predict.RayPredictionSummary(
        out="p", images=12, errors=[], seconds=1.0, actors=1, cluster={}, skipped=got.skipped
    ).skipped_summary(shown=2)
    assert summary is not None and summary.startswith(
        "skipped 4 file(s) that are not images by their extension (notes.txt, scan.tiff.bak and "
        "2 more)"
    )
    named = expand_inputs([str(folder / "notes.txt"), (folder / "notes.txt").as_uri()])
    assert named.paths == [str(folder / "notes.txt"), (folder / "notes.txt").as_uri()]
    assert named.skipped == []
    # a prefix holding files but no image says what it found
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("x")
    with pytest.raises(RayEngineError, match=r"found 1 other file\(s\), e.g. readme.md"):
        expand_inputs([(tmp_path / "docs").as_uri()])


def test_a_uri_prefix_is_listed_as_a_local_folder_is(
    cell_files: list[Path], tmp_path: Path
) -> None:
    """Through a hidden folder of the path given, without the hidden files and output folders
    below it; a name that is not UTF-8 is a clear error."""
    import os
    import shutil

    from marrowscope.inference.batching import collect_inputs

    top = tmp_path / ".cache" / "cells"  # a hidden folder above the location given: fine
    (top / "sub").mkdir(parents=True)
    (top / "overlays").mkdir()
    (top / ".thumbs").mkdir()
    for p in cell_files[:2]:
        shutil.copy(p, top / p.name)
    shutil.copy(cell_files[2], top / "sub" / cell_files[2].name)
    shutil.copy(cell_files[3], top / "overlays" / "field_1.png")  # an earlier detect's output
    (top / "overlays" / ".marrowscope-output").write_text("")
    shutil.copy(cell_files[4], top / ".thumbs" / "t.jpg")
    shutil.copy(cell_files[5], top / "._cell_0.jpg")
    got = expand_inputs([top.as_uri()])
    local = collect_inputs([top])
    assert got.paths == [p.absolute().as_uri() for p in local.paths]
    assert [Path(p).name for p in local.paths] == ["cell_0.jpg", "cell_1.png", "cell_2.jpg"]
    assert got.skipped == [] and local.skipped == []
    # the location given is listed even when it is an output folder itself
    assert len(expand_inputs([(top / "overlays").as_uri()]).paths) == 1
    try:
        with open(os.path.join(os.fsencode(top), b"caf\xe9.jpg"), "wb") as f:
            f.write(cell_files[0].read_bytes())
    except OSError:
        return  # this file system refuses names that are not UTF-8
    with pytest.raises(RayEngineError, match="not UTF-8.*give the folder as a local path"):
        expand_inputs([top.as_uri()])


@pytest.mark.parametrize(
    ("text", "message"),
    [("path\n", "lists no path"), ("file,label\nx.jpg,A\n", "needs a 'path' column")],
)
def test_bad_manifests_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(RayEngineError, match=message):
        expand_inputs([str(manifest)])


def test_bad_uris_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RayEngineError, match="pyarrow.fs cannot open"):
        expand_inputs(["nosuch://bucket/cells"])
    with pytest.raises(RayEngineError, match="no such file or folder"):
        expand_inputs([(tmp_path / "missing").as_uri()])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RayEngineError, match="no image files"):
        expand_inputs([(tmp_path / "empty").as_uri()])


def test_decode_stage_turns_bad_files_into_error_rows(
    cell_files: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 nope")
    paths = [str(cell_files[0]), str(bad), (tmp_path / "gone.png").as_uri(), cell_files[1].as_uri()]
    out = decode_batch(
        {"path": np.asarray(paths, dtype=object)}, cfg=PreprocessConfig(size=16), size=16
    )
    assert out["image"].shape == (4, 16, 16, 3) and out["image"].dtype == np.uint8
    errors = list(out["error"])
    assert errors[0] == "" and errors[3] == ""
    assert "bad.jpg" in errors[1] and "gone.png: file not found" in errors[2]
    assert not out["image"][1].any() and out["image"][3].any()


def test_ray_engine_output_must_be_a_new_parquet_folder(tmp_path: Path) -> None:
    with pytest.raises(RayEngineError, match="folder of Parquet files"):
        ray_predict._check_out(str(tmp_path / "p.csv"), None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(RayEngineError, match="already exists"):
        ray_predict._check_out(str(tmp_path / "full"), None)
    ray_predict._check_out(str(tmp_path / "new.parquet"), None)
    # through Ray Client the cluster writes: a local path of this machine would be wrong
    with pytest.raises(RayEngineError, match="Ray Client"):
        ray_predict._check_out(str(tmp_path / "new.parquet"), "ray://head:10001")
    ray_predict._check_out("s3://bucket/preds/", "ray://head:10001")


def test_without_ray_the_engine_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tiny_bundle: Path, cell_files: list[Path], tmp_path: Path
) -> None:
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    res = runner.invoke(
        app,
        ["predict", str(tiny_bundle), str(cell_files[0].parent), "--engine", "ray"]
        + ["--out", str(tmp_path / "p")],
    )
    assert res.exit_code == 2
    assert "pip install 'marrowscope[ray]'" in res.output
    bad = runner.invoke(
        app, ["predict", str(tiny_bundle), str(cell_files[0]), "--address", "auto", "-o", "x.csv"]
    )
    words = " ".join(bad.output.replace("│", " ").split())  # the usage box wraps the message
    assert bad.exit_code == 2 and "need --engine ray" in words
    for decode in ("auto", "processes"):  # any --decode given with ray is refused, not ignored
        bad = runner.invoke(
            app,
            ["predict", str(tiny_bundle), str(cell_files[0]), "--engine", "ray", "--decode", decode]
            + ["--out", str(tmp_path / "q")],
        )
        words = " ".join(bad.output.replace("│", " ").split())
        assert bad.exit_code == 2 and "--decode is for --engine local" in words


def test_int8_backend_ships_the_int8_export_to_the_actors(
    tmp_path: Path, cell_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --backend int8 the actors get the export folder the driver resolved (model.xml,
    model.bin, metadata.json), not the bundle's top-level files, which hold no int8 model."""
    bundle = tmp_path / "best"
    export = bundle / "int8"
    export.mkdir(parents=True)
    (bundle / "model.safetensors").write_bytes(b"w")
    (bundle / "metadata.json").write_text("{}")
    for name in ("model.xml", "model.bin", "metadata.json"):
        (export / name).write_bytes(name.encode())

    class Stub:
        backend = "int8"
        int8_path_ = export / "model.bin"

    shipped: list[dict[str, object]] = []
    real = ray_predict._bundle_payload

    def spy(checkpoint: Path) -> dict[str, object]:
        shipped.append(real(checkpoint))
        return shipped[-1]

    class Stop(Exception):
        pass

    def stop(*args: object) -> bool:
        raise Stop

    monkeypatch.setattr(ray_predict.Predictor, "from_checkpoint", lambda *a, **k: Stub())
    monkeypatch.setattr(ray_predict, "import_ray", lambda: object())
    monkeypatch.setattr(ray_predict, "_bundle_payload", spy)
    monkeypatch.setattr(ray_predict, "_connect", stop)
    with pytest.raises(Stop):
        ray_predict.predict_with_ray(
            bundle, [str(cell_files[0])], tmp_path / "p.parquet", backend="int8"
        )
    (payload,) = shipped
    assert payload["folder"] is True and payload["name"] == "int8"
    assert sorted(payload["files"]) == ["metadata.json", "model.bin", "model.xml"]  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["int8", "openvino"])
def test_int8_backend_on_gpu_actors_is_refused_before_ray_starts(
    tmp_path: Path, cell_files: list[Path], backend: str
) -> None:
    with pytest.raises(RayEngineError, match="int8 backend runs on the CPU"):
        ray_predict.predict_with_ray(
            tmp_path / "ck", [str(cell_files[0])], tmp_path / "p.parquet", backend=backend,
            gpus_per_worker=1,
        )  # fmt: skip
