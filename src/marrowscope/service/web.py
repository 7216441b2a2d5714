"""HTTP pieces shared by the JSON API (:mod:`.api`) and the HTML pages (:mod:`.pages`): the id
path parameter and file downloads (the report CSV)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Path, Response

from marrowscope.service.review import report_csv

__all__ = ["MAX_ID", "Id", "attachment", "report_download"]

MAX_ID = 2**31 - 1
"""The largest id the database holds (a 32-bit integer column)."""

Id = Annotated[int, Path(ge=1, le=MAX_ID)]
"""A sample, cell or user id in the path (out of range: 422, before any database call)."""


def attachment(filename: str) -> str:
    """A ``Content-Disposition`` value that saves the response as ``filename`` (RFC 6266).

    A name of printable ASCII goes in the quoted ``filename`` parameter as it is. Any other name
    gets an ASCII stand-in there (``"`` and ``\\`` escaped; non-ASCII, control characters and
    ``%`` replaced by ``_``) and the exact name, UTF-8 and percent-encoded (RFC 8187), in
    ``filename*``, which browsers prefer. The value is plain ASCII either way, so no name can
    break the header or inject another one.

    Args:
        filename: the name to save as (any text).
    """
    fallback = "".join(c if " " <= c <= "~" and c != "%" else "_" for c in filename)
    quoted = fallback.replace("\\", "\\\\").replace('"', '\\"')
    value = f'attachment; filename="{quoted}"'
    if quoted != filename:
        value += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return value


def report_download(data: dict[str, Any]) -> Response:
    """The signed report as a CSV download named ``<sample id>-report.csv``.

    Args:
        data: the report, as :func:`~marrowscope.service.review.report_data` returns it.
    """
    return Response(
        report_csv(data),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": attachment(f"{data['sample']['code']}-report.csv")},
    )
