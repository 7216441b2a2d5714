"""Which failed rank a --nproc run names when torchrun reports several, and the error file a
failed worker leaves for torchrun."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def test_a_torchrun_error_file_is_written_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun reads a failed worker's error file as soon as the worker ends, and stops the
    others with SIGTERM: a worker stopped while writing must leave no file, not an empty one."""
    from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

    from marrowscope.cli import main

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    try:
        raise ValueError("the cells folder is empty")
    except ValueError as e:
        main._record_for_torchrun(e)
    data = json.loads(path.read_text())
    assert data["message"]["message"] == "ValueError: the cells folder is empty"
    assert os.environ["TORCHELASTIC_ERROR_FILE"] == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error.json"]

    # stopped halfway through the write (the file opened, nothing written yet)
    path.unlink()

    def stopped(self: ErrorHandler, e: BaseException) -> None:
        open(self._get_error_file_path() or "", "w").close()
        raise SystemExit(-15)

    monkeypatch.setattr(ErrorHandler, "record_exception", stopped)
    with pytest.raises(SystemExit):
        main._record_for_torchrun(ValueError("x"))
    assert not path.exists()
    assert os.environ["TORCHELASTIC_ERROR_FILE"] == str(path)


def test_an_unwritable_error_file_leaves_the_users_error_standing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from marrowscope.cli import main

    path = tmp_path / "missing-folder" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    main._record_for_torchrun(ValueError("x"))  # warns instead of raising an OSError
    assert not path.exists() and not path.parent.exists()
    assert os.environ["TORCHELASTIC_ERROR_FILE"] == str(path)
