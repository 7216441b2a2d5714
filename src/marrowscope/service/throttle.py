"""Login throttling: a sliding window of failed logins per account name and per client address.

Each login attempt takes a place in two windows, the account name's and the client address's,
*before* its password is checked, so a burst of parallel guesses is limited as strictly as a
sequence of them. A wrong password leaves its places taken for ``window`` seconds; a right one
gives them back (and clears the account's window). When either window is full the attempt is
refused at once, without a password check (``429`` with ``Retry-After``: the seconds until the
oldest place in the full window frees up). The first refusal of a burst is flagged so the
caller audits it once, not once per attempt.

The state is in memory, per server process (a restart forgets it), and bounded: at most
``max_keys`` names and addresses are tracked; past that the least recently used are forgotten.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Attempt", "LoginThrottle", "Refusal"]

MAX_KEYS = 100_000
"""Most account names plus client addresses tracked at once (about 200 bytes each, plus their
window's timestamps)."""


@dataclass(frozen=True)
class Attempt:
    """A login attempt that may check its password; pass it to :meth:`LoginThrottle.succeeded`
    when the password was right."""

    account: str
    address: str
    at: float


@dataclass(frozen=True)
class Refusal:
    """A refused attempt.

    Attributes:
        scope: ``account`` (too many failures for this account name) or ``address`` (for this
            client address).
        retry_after: whole seconds until one more attempt is allowed.
        first: the first refusal of this burst (audit it; later ones are not audited).
        failures: the failures in the full window.
    """

    scope: str
    retry_after: int
    first: bool
    failures: int


@dataclass
class _Window:
    times: deque[float] = field(default_factory=deque)
    announced: bool = False  # a refusal of the current burst was reported


class LoginThrottle:
    """Sliding-window limits on failed logins (thread-safe).

    Args:
        window: seconds a failed attempt counts.
        per_account: most failed attempts per account name within ``window``.
        per_address: most failed attempts per client address within ``window``.
        max_keys: most names and addresses tracked.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        *,
        window: float,
        per_account: int,
        per_address: int,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.limits = {"account": per_account, "address": per_address}
        self.max_keys = max_keys
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: OrderedDict[tuple[str, str], _Window] = OrderedDict()

    def attempt(self, account: str, address: str) -> Attempt | Refusal:
        """Take a place for one login attempt, or refuse it (nothing is taken then)."""
        now = self.clock()
        with self._lock:
            keys = {"account": ("account", account), "address": ("address", address)}
            windows = {scope: self._window(key, now) for scope, key in keys.items()}
            for scope in ("account", "address"):
                w = windows[scope]
                if len(w.times) >= self.limits[scope]:
                    first = not w.announced
                    w.announced = True
                    wait = w.times[len(w.times) - self.limits[scope]] + self.window - now
                    return Refusal(scope, max(1, math.ceil(wait)), first, len(w.times))
            for w in windows.values():
                w.times.append(now)
                w.announced = False
            self._trim()
            return Attempt(account, address, now)

    def succeeded(self, attempt: Attempt) -> None:
        """The attempt's password was right: clear the account's window and give the address
        its place back (a shared address, such as a proxy, is not blocked by good logins)."""
        with self._lock:
            self._windows.pop(("account", attempt.account), None)
            w = self._windows.get(("address", attempt.address))
            if w is not None:
                with contextlib.suppress(ValueError):  # gone already: out of the window
                    w.times.remove(attempt.at)

    def _window(self, key: tuple[str, str], now: float) -> _Window:
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window()
        else:
            self._windows.move_to_end(key)
        while w.times and w.times[0] <= now - self.window:
            w.times.popleft()
        return w

    def _trim(self) -> None:
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)
