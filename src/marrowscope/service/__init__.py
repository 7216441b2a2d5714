"""The clinician review app: upload a sample's cells, review the model's calls, sign off.

``create_app(settings)`` builds the FastAPI app; ``marrowscope serve`` runs it with uvicorn.
Top layer (next to ``cli``): nothing in marrowscope imports it.
"""

from __future__ import annotations

from marrowscope.service.settings import ServiceError, Settings

__all__ = ["ServiceError", "Settings", "create_app"]


def create_app(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Build the app (see :func:`marrowscope.service.app.create_app`)."""
    from marrowscope.service.app import create_app as _create

    return _create(*args, **kwargs)
