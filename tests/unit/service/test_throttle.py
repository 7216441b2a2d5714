"""The failed-login sliding window (:class:`marrowscope.service.throttle.LoginThrottle`)."""

from __future__ import annotations

from marrowscope.service.throttle import Attempt, LoginThrottle, Refusal


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_window_slides_and_a_burst_is_reported_once() -> None:
    clock = Clock()
    t = LoginThrottle(window=10, per_account=2, per_address=50, clock=clock)
    assert isinstance(t.attempt("a", "ip"), Attempt)
    clock.now = 4
    assert isinstance(t.attempt("a", "ip"), Attempt)
    refusals = [t.attempt("a", "ip") for _ in range(3)]
    assert [r.first for r in refusals if isinstance(r, Refusal)] == [True, False, False]
    assert refusals[0] == Refusal("account", 6, True, 2)
    clock.now = 10  # the first failure has left the window: one more try
    assert isinstance(t.attempt("a", "ip"), Attempt)
    again = t.attempt("a", "ip")
    assert isinstance(again, Refusal) and again.first  # a new burst, reported again
    assert again.retry_after == 4
    assert isinstance(t.attempt("b", "ip"), Attempt)  # another account


def test_a_right_password_clears_the_account_and_frees_the_address() -> None:
    t = LoginThrottle(window=60, per_account=2, per_address=2, clock=Clock())
    first = t.attempt("a", "proxy")
    assert isinstance(first, Attempt)
    ok = t.attempt("a", "proxy")
    assert isinstance(ok, Attempt)
    t.succeeded(ok)
    assert isinstance(t.attempt("a", "proxy"), Attempt)  # the account's window was cleared
    refused = t.attempt("b", "proxy")  # the address holds 2 failures now
    assert isinstance(refused, Refusal) and refused.scope == "address"


def test_tracked_names_and_addresses_are_bounded() -> None:
    t = LoginThrottle(window=60, per_account=1, per_address=10**9, max_keys=100, clock=Clock())
    for i in range(1000):
        t.attempt(f"name-{i}", "ip")
    assert len(t._windows) <= 100
    assert isinstance(t.attempt("name-0", "ip"), Attempt)  # forgotten (least recently used)
    assert isinstance(t.attempt("name-999", "ip"), Refusal)  # still tracked
