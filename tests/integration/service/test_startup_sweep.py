"""The startup sweep: files a killed upload left in the image store are removed when the app
starts (before the classifier starts); a file a cell refers to, or one younger than the grace
period (another server process may be mid-upload), is kept."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from marrowscope.inference.predictor import Predictor
from marrowscope.service.app import create_app
from marrowscope.service.settings import Settings
from marrowscope.service.storage import SWEEP_GRACE_SECONDS

from .conftest import Service, files_of, sample_images

_LOGGER = "marrowscope.service.storage"


def _start(data_dir: Path, database_url: str, predictor: Predictor) -> TestClient:
    settings = Settings(
        data_dir=data_dir, database_url=database_url, secret_key="test-secret-key-" + "x" * 32
    )
    return TestClient(create_app(settings, predictor=predictor))


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _plant(images: Path, name: str, data: bytes) -> Path:
    path = images / name[:2] / name if not name.startswith(".") else images / "ab" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_startup_sweep_removes_temporaries_and_orphans_but_keeps_referenced_images(
    tmp_path: Path,
    database_url: str,
    hac_predictor: Predictor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = tmp_path / "data"
    with _start(data, database_url, hac_predictor) as client:
        svc = Service(client.app, client)
        rev = svc.user("rev", "reviewer")
        sid = svc.new_sample(rev)
        stored = svc.upload(sid, files_of(sample_images(1)), rev)["accepted"]
        assert len(stored) == 1
        svc.wait()
    images = data / "images"
    (referenced,) = [p for p in images.rglob("*") if p.is_file()]
    orphan = _plant(images, "c" * 64 + ".png", b"o" * 1000)  # a killed upload's image
    temporary = _plant(images, ".upload-x1y2z3", b"t" * 500)  # a killed upload's temporary
    fresh = _plant(images, "d" * 64 + ".jpg", b"f" * 10)  # another process, mid-upload
    other = _plant(images, "not-a-stored-name.txt", b"?")  # not the store's: left alone
    outside = tmp_path / ("e" * 64 + ".png")  # outside the store (reached by a link)
    outside.write_bytes(b"x")
    (images / "ee").mkdir()
    (images / "ee" / outside.name).symlink_to(outside)
    for path in (referenced, orphan, temporary, other, outside):
        _age(path, SWEEP_GRACE_SECONDS + 120)

    caplog.set_level(logging.INFO, logger=_LOGGER)
    with _start(data, database_url, hac_predictor) as client:
        assert not orphan.exists() and not temporary.exists()
        assert referenced.is_file() and fresh.is_file() and other.is_file()
        assert outside.is_file() and (images / "ee" / outside.name).is_symlink()
        records = [r for r in caplog.records if r.name == _LOGGER]
        assert len(records) == 1 and records[0].levelno == logging.INFO
        message = records[0].getMessage()
        assert "1 upload temporary (500 bytes)" in message, message
        assert "1 unreferenced image (1,000 bytes)" in message, message
        # the referenced image is still served
        token = {"Authorization": f"Bearer {svc.tokens['rev']}"}
        (cell,) = client.get(f"/api/samples/{sid}/cells", headers=token).json()
        assert (
            client.get(f"/samples/{sid}/cells/{cell['id']}/image", headers=token).status_code == 200
        )

    caplog.clear()
    with _start(data, database_url, hac_predictor):  # nothing left to remove: nothing logged
        assert [r for r in caplog.records if r.name == _LOGGER] == []
    assert referenced.is_file() and fresh.is_file()
