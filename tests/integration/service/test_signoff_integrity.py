"""A signed sample is final: no sign-off while the model still classifies a cell, and the
background classifier never writes into a sample that was signed off meanwhile."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from sqlalchemy import select

from marrowscope.service import review
from marrowscope.service.accounts import find_user
from marrowscope.service.models import AuditEvent, Cell, Sample, utcnow
from marrowscope.service.worker import ClassificationWorker

from .conftest import Service, files_of, sample_images

pytestmark = pytest.mark.integration


def _paused(service: Service) -> ClassificationWorker:
    """Stop the app's background classifier (uploaded cells stay pending) and return a worker
    on the same database, store and model that the test drives by hand."""
    app = service.app
    app.state.worker.stop()
    return ClassificationWorker(app.state.db, app.state.store, app.state.model, batch_size=16)


def test_signoff_is_refused_while_any_cell_is_being_classified(service: Service) -> None:
    c, rev, sig = service.client, service.auth("rev"), service.auth("sig")
    worker = _paused(service)
    sid = service.new_sample(rev, "RACE-1")
    service.upload(sid, files_of(sample_images(2)), rev)
    cells = service.cells(sid, rev)
    ids = [x["id"] for x in cells]
    assert [x["status"] for x in cells] == ["pending", "pending"]

    # A reviewer may label a cell before the model has answered ...
    r = c.post(
        f"/api/samples/{sid}/cells/reclassify", json={"cell_ids": ids, "label": "LYT"}, headers=rev
    )
    assert r.status_code == 200 and r.json()["changed"] == 2
    summary = r.json()["summary"]
    assert summary["blocking"]["unreviewed"] == 0 and summary["blocking"]["pending"] == 2
    assert summary["can_sign"] is False

    # ... but nobody can sign the sample off until the model has classified every cell.
    r = c.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 409, r.text
    assert "2 of 2 cells are still being classified" in r.json()["detail"]
    r = c.post(f"/api/samples/{sid}/signoff", headers=service.auth("admin"))
    assert r.status_code == 409
    csrf = service.login("sig")
    page = c.post(f"/samples/{sid}/signoff", data={"csrf_token": csrf}, follow_redirects=True)
    assert page.status_code == 200 and "2 of 2 cells are still being classified" in page.text
    c.cookies.clear()
    assert not c.get(f"/api/samples/{sid}", headers=rev).json()["signed"]

    # One cell classified, one still pending: still refused, naming the one.
    with service.app.state.db.write() as s:
        first = s.get(Cell, ids[0])
        first.status, first.predicted_label, first.confidence = "done", "HAC", 0.99
    r = c.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 409 and "1 of 2 cells is still being classified" in r.json()["detail"]

    # Once the model has answered, the reviewed sample can be signed off.
    while worker.process_batch():
        pass
    r = c.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 200 and r.json()["signed"], r.text
    assert {x["reviewed_label"] for x in service.cells(sid, rev)} == {"LYT"}


def test_classifier_drops_results_for_a_sample_signed_off_meanwhile(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    rev = service.auth("rev")
    app = service.app
    worker = _paused(service)
    signed = service.new_sample(rev, "SIGNED-1")
    service.upload(signed, files_of(sample_images(2)), rev)
    other = service.new_sample(rev, "OPEN-1")
    service.upload(other, files_of(sample_images(1, "LYT")), rev)

    def sign_off_behind_the_workers_back() -> None:
        """What a sign-off that lands between the worker's read and its write does (written
        directly: the sign-off rule itself refuses a sample with pending cells)."""
        with app.state.db.write() as s:
            sig = find_user(s, "sig")
            for cell in s.scalars(select(Cell).where(Cell.sample_id == signed)):
                cell.reviewed_label, cell.reviewed_by_id, cell.reviewed_at = "LYT", sig.id, utcnow()
            sample = s.get(Sample, signed)
            sample.signed_at, sample.signed_by_id = utcnow(), sig.id

    classify = worker._classify

    def classify_then_sign(paths):  # type: ignore[no-untyped-def]
        results = classify(paths)  # the model ran outside any transaction ...
        sign_off_behind_the_workers_back()  # ... and meanwhile the sample was signed off
        return results

    worker._classify = classify_then_sign  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="marrowscope.service.worker"):
        assert worker.process_batch() is True

    with app.state.db.read() as s:
        cells = s.scalars(select(Cell).where(Cell.sample_id == signed)).all()
        actions = s.scalars(
            select(AuditEvent.action).where(AuditEvent.sample_id == signed).order_by(AuditEvent.id)
        ).all()
        kept = s.scalars(select(Cell).where(Cell.sample_id == other)).all()
        other_actions = s.scalars(
            select(AuditEvent.action).where(AuditEvent.sample_id == other)
        ).all()
    assert len(cells) == 2
    for cell in cells:  # nothing of the model's was written into the signed record
        assert cell.status == "pending"
        assert cell.predicted_label is None and cell.confidence is None
        assert cell.probabilities is None and cell.model_version is None and cell.error is None
        assert cell.reviewed_label == "LYT"
    assert actions == ["sample.create", "cells.upload"]  # no cells.classified event
    assert "SIGNED-1" in caplog.text and "signed off" in caplog.text
    # The unsigned sample in the same batch got its results.
    assert [(c.status, c.predicted_label) for c in kept] == [("done", "HAC")]
    assert kept[0].model_version == app.state.model.info.version
    assert "cells.classified" in other_actions
    # The dropped cells are not picked up again and again: the worker goes idle.
    worker._classify = classify  # type: ignore[method-assign]
    assert worker.process_batch() is False


def test_classifier_write_waits_for_the_signoff_lock_then_drops(service: Service) -> None:
    """The worker's write takes the sample's lock first: while a sign-off holds it, the write
    waits; once the sign-off commits, the results are dropped (nothing written, no audit)."""
    rev = service.auth("rev")
    app = service.app
    worker = _paused(service)
    sid = service.new_sample(rev, "LOCK-1")
    service.upload(sid, files_of(sample_images(1)), rev)
    with app.state.db.read() as s:
        rows = s.execute(
            select(Cell.id, Cell.stored_path, Cell.sample_id).where(Cell.sample_id == sid)
        ).all()
    results = [(np.array([0.05, 0.9, 0.05], dtype=np.float32), None)]

    signer = app.state.db.session()  # the sign-off's transaction: sample row locked
    try:
        sample = review.get_sample(signer, sid, lock=True)
        written: list[int] = []
        writer = threading.Thread(target=lambda: written.append(worker.save_results(rows, results)))
        writer.start()
        writer.join(1.0)
        assert writer.is_alive(), "the classifier wrote while the sign-off held the sample lock"
        sig = find_user(signer, "sig")
        for cell in review.sample_cells(signer, sample):
            cell.reviewed_label, cell.reviewed_by_id = "LYT", sig.id
        sample.signed_at, sample.signed_by_id = utcnow(), sig.id
        signer.commit()
    finally:
        signer.close()
    writer.join(60)
    assert not writer.is_alive() and written == [0]
    with app.state.db.read() as s:
        cell = s.get(Cell, rows[0].id)
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.sample_id == sid)).all()
    assert (cell.status, cell.predicted_label, cell.model_version) == ("pending", None, None)
    assert "cells.classified" not in actions
