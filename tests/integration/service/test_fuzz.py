"""A bounded schemathesis fuzz of the API's OpenAPI schema (authenticated): no 5xx anywhere."""

from __future__ import annotations

import pytest
import schemathesis
from field_samples import PBC
from hypothesis import HealthCheck, Phase, given, settings

from .conftest import Service, files_of, sample_images

pytestmark = pytest.mark.integration

EXAMPLES = 12
"""Generated requests per operation (keeps the whole fuzz to a few seconds)."""


def test_openapi_fuzz_finds_no_server_error(service: Service) -> None:
    admin = service.auth("admin")
    sid = service.new_sample(admin, "FUZZ-1")  # something real to hit: sample 1, cells 1-2
    service.upload(sid, files_of(sample_images(2)), admin)
    r = service.client.post(
        f"/api/samples/{sid}/fields",
        files=[("files", (PBC.name, PBC.read_bytes(), "image/jpeg"))],
        headers=admin,
    )  # and a whole field of view (its detected cell is cell 3)
    assert r.status_code == 201, r.text
    service.wait()
    served = service.client.get("/api/openapi.json", headers=admin)
    assert served.status_code == 200
    schema = schemathesis.openapi.from_dict(served.json())
    schema.app = service.app  # calls go straight to the ASGI app
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    cell = service.cells(sid, admin)[0]["id"]
    field = r.json()["accepted"][0]["id"]
    real = {"sample_id": sid, "cell_id": cell, "field_id": field}

    def pinned(case):  # type: ignore[no-untyped-def]
        """The same generated request, aimed at the real sample, cell and field."""
        case.path_parameters = {k: real[k] for k in case.path_parameters or {}}
        return case

    strategies = []
    for operation in operations:
        strategies.append((operation, operation.as_strategy()))
        if "{" in operation.path and operation.method.upper() != "DELETE":
            strategies.append((operation, operation.as_strategy().map(pinned)))
    failures: list[str] = []
    statuses: set[int] = set()
    for _operation, strategy in strategies:

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(headers=admin)
            statuses.add(response.status_code)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:300]}"
                )

        run()
    assert not failures, "\n".join(failures[:20])
    assert {200, 201, 404, 409, 422} <= statuses  # it reached real data, not only 404s
    assert service.client.get("/api/health").json() == {"status": "ok"}
