"""Which failed rank a --nproc run names when torchrun reports several."""

from __future__ import annotations

from dataclasses import dataclass

from marrowscope.engine.distributed import _root_failure


@dataclass
class _Failure:
    exitcode: int
    timestamp: int
    signal: str = ""

    def signal_name(self) -> str:
        return self.signal


class _ChildFailed:
    def __init__(self, failures: dict[int, _Failure]) -> None:
        self.failures = failures

    def get_first_failure(self) -> tuple[int, _Failure]:
        rank = min(self.failures, key=lambda r: self.failures[r].timestamp)
        return rank, self.failures[rank]


def test_a_rank_stopped_by_torchrun_is_not_named_as_the_cause() -> None:
    # rank 0 stopped by torchrun's SIGTERM, stamped before rank 1 that was SIGKILLed
    e = _ChildFailed({0: _Failure(-15, 10, "SIGTERM"), 1: _Failure(-9, 11, "SIGKILL")})
    assert _root_failure(e)[0] == 1
    # a real first failure is kept; all stopped by SIGTERM: the first one
    e = _ChildFailed({0: _Failure(1, 10), 1: _Failure(-15, 11, "SIGTERM")})
    assert _root_failure(e)[0] == 0
    e = _ChildFailed({0: _Failure(-15, 12, "SIGTERM"), 1: _Failure(-15, 11, "SIGTERM")})
    assert _root_failure(e)[0] == 1
