"""Deleting a sample: only its creator or an admin may delete an (unsigned) sample, and the
sample id (code) of a deleted sample may be given to a new sample; two live samples never share
one, which the database itself enforces."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from marrowscope.service.accounts import find_user
from marrowscope.service.models import AuditEvent, Sample, utcnow

from .conftest import Service, files_of, sample_images

pytestmark = pytest.mark.integration


def _actions(service: Service, sample_id: int) -> list[str]:
    with service.app.state.db.read() as s:
        return list(
            s.scalars(
                select(AuditEvent.action)
                .where(AuditEvent.sample_id == sample_id)
                .order_by(AuditEvent.id)
            )
        )


def test_only_the_creator_or_an_admin_can_delete_a_sample(service: Service) -> None:
    c = service.client
    admin, sig, rev = service.auth("admin"), service.auth("sig"), service.auth("rev")
    theirs = service.new_sample(admin, "BM-ADMIN")
    for who in (rev, sig):  # neither created it nor is an admin
        r = c.delete(f"/api/samples/{theirs}", headers=who)
        assert r.status_code == 403, r.text
        assert "only its creator (admin) or an admin can delete" in r.json()["detail"]
    assert c.get(f"/api/samples/{theirs}", headers=rev).status_code == 200
    assert _actions(service, theirs) == ["sample.create"]

    own = service.new_sample(rev, "BM-REV")
    assert c.delete(f"/api/samples/{own}", headers=rev).status_code == 204  # the creator
    other = service.new_sample(rev, "BM-REV-2")
    assert c.delete(f"/api/samples/{other}", headers=admin).status_code == 204  # an admin
    assert c.delete(f"/api/samples/{theirs}", headers=admin).status_code == 204
    assert c.get("/api/samples", headers=rev).json() == []
    with service.app.state.db.read() as s:
        deleted_by = {
            e.sample_id: e.username
            for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "sample.delete"))
        }
    assert deleted_by == {own: "rev", other: "admin", theirs: "admin"}


def test_the_code_of_a_deleted_sample_can_be_reused(service: Service) -> None:
    c, rev = service.client, service.auth("rev")
    old = service.new_sample(rev, "BM-1")
    service.upload(old, files_of(sample_images(1)), rev)
    service.wait()
    assert c.delete(f"/api/samples/{old}", headers=rev).status_code == 204

    new = service.new_sample(rev, "BM-1")  # the same sample id, a new sample
    assert new != old
    one = c.get(f"/api/samples/{new}", headers=rev).json()
    assert one["code"] == "BM-1" and one["summary"]["progress"]["total"] == 0
    assert _actions(service, new) == ["sample.create"]  # its own trail ...
    assert _actions(service, old)[-1] == "sample.delete"  # ... and the old one is kept
    assert c.get(f"/api/samples/{old}", headers=rev).status_code == 404

    # two live samples still never share an id: through the API ...
    r = c.post("/api/samples", json={"code": "BM-1"}, headers=rev)
    assert r.status_code == 409 and "exists already" in r.json()["detail"]
    second = service.new_sample(rev, "BM-2")
    r = c.patch(f"/api/samples/{second}", json={"code": "BM-1"}, headers=rev)
    assert r.status_code == 409
    # ... a form ...
    csrf = service.login("rev")
    page = c.post("/samples", data={"csrf_token": csrf, "code": "BM-1"}, follow_redirects=True)
    assert "sample id &#39;BM-1&#39; exists already" in page.text
    # ... nor behind the app's back (the database refuses it)
    with service.app.state.db.session() as s:
        user = find_user(s, "rev")
        s.add(Sample(code="BM-1", created_by_id=user.id, created_at=utcnow(), notes=""))
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
    # renaming a sample to a deleted sample's id is fine too
    third = service.new_sample(rev, "BM-3")
    assert c.delete(f"/api/samples/{third}", headers=rev).status_code == 204
    r = c.patch(f"/api/samples/{second}", json={"code": "BM-3"}, headers=rev)
    assert r.status_code == 200 and r.json()["code"] == "BM-3"
