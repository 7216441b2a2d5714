"""``marrowscope`` under torchrun, with a probe for tests/integration/test_distributed.py.

Run as ``python -m torch.distributed.run ... ddp_probe.py train --config ...``. Each rank runs the
real command line; the probe wraps ``train_one_epoch`` (nothing else changes) and records, in
``$MARROWSCOPE_TEST_TRACE/rank<R>.json`` after every epoch:

* the sample indices the epoch's sampler gives this rank, the wrapper type and the batch size;
* a SHA-256 digest of the (unwrapped) model's parameters after every optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from marrowscope.cli.main import main
from marrowscope.engine import train as train_mod

TRACE = Path(os.environ["MARROWSCOPE_TEST_TRACE"])
RANK = int(os.environ["RANK"])
records: dict[str, list[Any]] = {"epochs": [], "steps": []}
real_train_one_epoch = train_mod.train_one_epoch


def digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def probe(model: nn.Module, loader: Any, optimizer: Any, **kwargs: Any) -> Any:
    inner = getattr(model, "module", model)
    records["epochs"].append(
        {
            "indices": [int(i) for i in loader.sampler],
            "wrapper": type(model).__name__,
            "batch_size": loader.batch_size,
        }
    )
    on_step = kwargs.get("on_step")

    def step() -> None:
        if on_step is not None:
            on_step()
        records["steps"].append(digest(inner))

    kwargs["on_step"] = step
    out = real_train_one_epoch(model, loader, optimizer, **kwargs)
    TRACE.mkdir(parents=True, exist_ok=True)
    (TRACE / f"rank{RANK}.json").write_text(json.dumps(records))
    return out


train_mod.train_one_epoch = probe  # type: ignore[assignment]

if __name__ == "__main__":
    main(sys.argv[1:])
