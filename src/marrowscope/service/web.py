"""HTTP pieces shared by the JSON API (:mod:`.api`) and the HTML pages (:mod:`.pages`): the id
path parameter, file downloads (the report CSV) and the server-side store of the messages shown
on the next page (:class:`FlashStore`)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Path, Response

from marrowscope.service.review import report_csv

__all__ = ["MAX_ID", "FlashStore", "Id", "attachment", "report_download"]

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


class FlashStore:
    """Messages for a login session's next page ("sample created", "refused file ..."), kept on
    the server, so the login cookie carries only the session id however many there are.

    In memory, per server process, bounded: at most ``max_messages`` per session (further ones
    are counted into one "... and N more message(s)" line), messages cut to ``max_chars``, at
    most ``max_sessions`` sessions (the least recently used are dropped), and messages not shown
    within ``ttl`` seconds are dropped. Thread-safe.

    Args:
        max_sessions: most login sessions with waiting messages.
        max_messages: most messages kept per session.
        max_chars: longest message kept.
        ttl: seconds a message waits to be shown.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        *,
        max_sessions: int = 500,
        max_messages: int = 60,
        max_chars: int = 600,
        ttl: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_messages = max_messages
        self.max_chars = max_chars
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, list[list[str]], int]] = OrderedDict()

    def add(self, key: str, message: str, level: str = "info") -> None:
        """Queue ``message`` for the next page of the login session ``key``."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            _, messages, dropped = self._items.pop(key, (now, [], 0))
            if len(messages) < self.max_messages:
                messages.append([level, message[: self.max_chars]])
            else:
                dropped += 1
            self._items[key] = (now, messages, dropped)
            while len(self._items) > self.max_sessions:
                self._items.popitem(last=False)

    def pop(self, key: str) -> list[list[str]]:
        """The messages waiting for ``key`` (``[level, text]``, oldest first), now removed."""
        with self._lock:
            self._expire(self.clock())
            _, messages, dropped = self._items.pop(key, (0.0, [], 0))
        if dropped:
            messages.append(["error", f"... and {dropped} more message(s)"])
        return messages

    def _expire(self, now: float) -> None:
        while self._items:
            key, (at, _, _) = next(iter(self._items.items()))
            if at > now - self.ttl:
                break
            del self._items[key]
