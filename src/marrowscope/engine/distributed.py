"""Data-parallel training over several processes and machines: all the plumbing, in one place.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or per share of
the CPU cores) and tells each its ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. :func:`setup` joins
the process group they form and returns a :class:`DistContext`; the training code asks that one
object everything that differs between one process and many:

* the device this process trains on (``cuda:LOCAL_RANK``, or the CPU) and the model wrapper for
  the training forward/backward (:class:`~torch.nn.parallel.DistributedDataParallel`, built on
  the *unwrapped* model, which keeps the optimizer's parameter groups, EMA and SWA; SyncBatchNorm
  when asked for, CUDA only);
* the training samples this process sees (:class:`~torch.utils.data.DistributedSampler`, or
  :class:`DistributedWeightedSampler` for class-balanced sampling), reshuffled every epoch by
  ``set_epoch``;
* the validation images it scores (:meth:`DistContext.shard`: contiguous, no padding) and how
  its counts are added to the other processes' (:meth:`DistContext.all_sum`), so the metrics are
  those of one process scoring every image;
* who writes files (:meth:`DistContext.main_only`: rank 0 writes, atomically; every rank then
  has its result, or its error) and who prints (:meth:`DistContext.console`).

In a single process (no ``torchrun``, or ``--nproc-per-node 1``) the context has
``world_size == 1`` and every method does exactly what the single-process code did before.

Collectives on CPU tensors go through gloo, on CUDA tensors through NCCL (one process group
with both backends, ``cpu:gloo,cuda:nccl``, where CUDA is available). A collective waits at most
``$MARROWSCOPE_DIST_TIMEOUT`` seconds (default 1800) for the other processes; when a process
dies, ``torchrun`` stops the others at once and reports the failed rank (:func:`launch` turns
that report into one line).
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from marrowscope.config import ConfigError
from marrowscope.engine.loops import EpochStats
from marrowscope.utils.runtime import resolve_device

__all__ = [
    "TIMEOUT_ENV",
    "DistContext",
    "DistributedError",
    "DistributedWeightedSampler",
    "launch",
    "launched_by_torchrun",
    "resolve_nproc",
    "setup",
]

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)

TIMEOUT_ENV = "MARROWSCOPE_DIST_TIMEOUT"
"""Environment variable: seconds a collective waits for the other processes (default 1800)."""
DEFAULT_TIMEOUT_S = 1800.0
RANK_SEED_STRIDE = 100_003
"""Rank ``r`` seeds its augmentation/dropout stream with ``seed * 1000 + epoch + r * stride``:
rank 0 keeps the single-process stream, other ranks draw different augmentations."""


class DistributedError(RuntimeError):
    """A multi-process run cannot start or has failed; the message names the process and the fix."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(
            f"environment variable {name}={raw!r} is not an integer; launch with torchrun, "
            "which sets it"
        ) from None


def launched_by_torchrun() -> bool:
    """True in a worker process of a multi-process ``torchrun`` job (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def timeout_seconds() -> float:
    """How long a collective waits for the other processes (``$MARROWSCOPE_DIST_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: give a number of seconds > 0, e.g. 1800")
    return value


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel job (``world_size == 1``: alone).

    Attributes:
        rank: this process's index among all processes (0 = the one that writes).
        world_size: number of processes.
        local_rank: index among the processes on this machine (its GPU index).
        local_world_size: processes on this machine.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0

    # ------------------------------------------------------------------------ devices, model

    def device(self, name: str) -> torch.device:
        """The device this process trains on for ``train.device`` = ``name``: ``cuda:LOCAL_RANK``
        under torchrun with CUDA, else what :func:`~marrowscope.utils.runtime.resolve_device`
        says.

        Raises:
            DistributedError: more processes on this machine than visible GPUs.
        """
        dev = resolve_device(name)
        if dev.type != "cuda" or not self.distributed:
            return dev
        n = torch.cuda.device_count()
        if self.local_rank >= n:
            raise DistributedError(
                f"{self.local_world_size} processes on this machine but only {n} GPU(s) are "
                f"visible; start one process per GPU (torchrun --nproc-per-node {n})"
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def per_rank_batch(self, batch_size: int) -> int:
        """This process's share of the global ``train.batch_size``.

        Raises:
            ConfigError: the global batch does not divide evenly among the processes.
        """
        if batch_size % self.world_size:
            lower = max(self.world_size, batch_size - batch_size % self.world_size)
            raise ConfigError(
                f"train.batch_size={batch_size} is the global batch (all processes together) and "
                f"must divide evenly among the {self.world_size} processes; use e.g. "
                f"train.batch_size={lower} or {lower + self.world_size}"
            )
        return batch_size // self.world_size

    def samples_per_rank(self, n: int) -> int:
        """Training samples each process draws per epoch (``DistributedSampler`` pads to this)."""
        return math.ceil(n / self.world_size)

    def check_sync_batchnorm(self, wanted: bool, device: torch.device) -> None:
        """SyncBatchNorm is opt-in and CUDA only.

        Raises:
            ConfigError: ``train.sync_batchnorm`` in a multi-process run on the CPU.
        """
        if wanted and self.distributed and device.type != "cuda":
            raise ConfigError(
                "train.sync_batchnorm=true synchronises batch-norm statistics over NCCL and needs "
                "CUDA GPUs; on the CPU set train.sync_batchnorm=false"
            )

    def prepare_model(self, model: M, *, sync_batchnorm: bool) -> M:
        """Before the optimizer, EMA and SWA are built: BatchNorm -> SyncBatchNorm when asked
        for in a multi-process run (the parameters stay the same objects; the state-dict keys
        do not change, so bundles load into a plain model)."""
        if sync_batchnorm and self.distributed:
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-any-return]
        return model

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``DistributedDataParallel(model)`` for the training forward/backward (``model`` itself
        in one process). DDP averages the gradients of the parameters that require gradients
        *now*: build the wrapper again when freezing changes them. Construction broadcasts rank
        0's parameters and buffers to every rank."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            return DistributedDataParallel(
                model, device_ids=[device.index], output_device=device.index
            )
        return DistributedDataParallel(model)  # CPU: no device_ids

    def sync_buffers(self, *modules: nn.Module | None) -> None:
        """Copy rank 0's buffers (batch-norm statistics, EMA/SWA counters) to every rank.

        During an epoch each process updates its batch-norm statistics from its own batches
        (DDP broadcasts rank 0's at the start of each forward, the backward changes nothing); at
        the end of the epoch this makes every rank hold rank 0's model, which is the one saved.
        """
        if not self.distributed:
            return
        for module in modules:
            if module is None:
                continue
            for buf in module.buffers():
                if buf.is_contiguous():
                    dist.broadcast(buf, src=0)
                else:
                    tmp = buf.contiguous()
                    dist.broadcast(tmp, src=0)
                    buf.copy_(tmp)

    # ---------------------------------------------------------------------------- sampling

    def train_sampler(
        self,
        dataset: Dataset[Any],
        *,
        seed: int,
        epoch: int,
        weights: Sequence[float] | np.ndarray | None = None,
    ) -> Sampler[int]:
        """This rank's sampler for ``epoch``: a shuffled ``DistributedSampler`` (``weights`` None)
        or a class-balanced :class:`DistributedWeightedSampler`; ``set_epoch(epoch)`` is called,
        so every epoch reshuffles and a resumed run draws what the uninterrupted run would have.
        """
        sampler: DistributedSampler[Any] | DistributedWeightedSampler
        if weights is None:
            sampler = DistributedSampler(
                dataset,
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=True,
                seed=seed,
                drop_last=False,
            )
        else:
            sampler = DistributedWeightedSampler(
                weights, num_replicas=self.world_size, rank=self.rank, seed=seed
            )
        sampler.set_epoch(epoch)
        return sampler

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``n`` evaluation items, without padding: the shares of
        all ranks are disjoint, cover ``range(n)`` and differ in size by at most one."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    # ------------------------------------------------------------------------ collectives

    def barrier(self) -> None:
        """Wait until every rank got here."""
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled); ``obj`` itself in one process."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def main_only(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only (writes, reports); every rank returns its result.

        The other ranks wait for it (this is the barrier after a write). When ``fn`` fails on
        rank 0, rank 0 raises the error and every other rank raises a
        :class:`DistributedError` naming it, so no process waits forever for a dead one.
        """
        if not self.distributed:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # re-raised below, after telling the other ranks
                error = e
        message = None if error is None else f"{type(error).__name__}: {error}"
        box: list[Any] = [(None if error is not None else result, message)]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        value, message = box[0]
        if message is not None:
            raise DistributedError(f"rank 0 failed ({message}); rank {self.rank} stops too")
        return value  # type: ignore[no-any-return]

    def all_sum(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """Element-wise sum over all ranks (float64; whole counts stay exact up to 2**53)."""
        arr = np.asarray(values, dtype=np.float64)
        if not self.distributed:
            return arr
        t = torch.from_numpy(arr.copy())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # a CPU tensor: gloo
        return t.numpy()

    def reduce_stats(self, stats: EpochStats) -> EpochStats:
        """One epoch's training statistics over all ranks: mean loss and accuracy over every
        image seen, images summed, seconds of the slowest rank (so images/s is the job's)."""
        if not self.distributed:
            return stats
        seconds = np.zeros(self.world_size)
        seconds[self.rank] = stats.seconds
        total = self.all_sum(
            [stats.loss * stats.images, round(stats.accuracy * stats.images), stats.images]
        )
        loss_sum, correct, images = total
        return EpochStats(
            loss=float(loss_sum / images),
            accuracy=float(correct / images),
            images=int(images),
            seconds=float(self.all_sum(seconds).max()),
        )

    # ---------------------------------------------------------------------------- output

    def console(self, console: Console) -> Console:
        """``console`` on rank 0, a silent one elsewhere (one set of messages per job)."""
        return console if self.is_main else Console(quiet=True)


class DistributedWeightedSampler(Sampler[int]):
    """Class-balanced sampling (with replacement, by ``weights``) shared among ranks.

    Every rank draws the same ``num_replicas * ceil(len(weights) / num_replicas)`` indices from
    one generator seeded with ``seed + epoch``, then takes every ``num_replicas``-th one from
    position ``rank``: together the ranks draw exactly what one process would draw with that
    generator, each a disjoint share of the positions, and each epoch draws anew.

    Args:
        weights: one non-negative weight per dataset item (e.g. 1 / its class count).
        num_replicas: number of ranks.
        rank: this rank.
        seed: base seed, the same on every rank.
    """

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray,
        *,
        num_replicas: int,
        rank: int,
        seed: int = 0,
    ) -> None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.double)
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError("weights must be a non-empty 1-D sequence, one per dataset item")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.weights = w
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(w.numel() / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Draw the indices of ``epoch`` (call before iterating, every epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(drawn[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


# ------------------------------------------------------------------------------ process group

_CONTEXT: DistContext | None = None


def setup() -> DistContext:
    """This process's data-parallel context; under torchrun, joins the process group (once).

    Outside torchrun (``WORLD_SIZE`` unset or 1) this is a one-process context and nothing is
    initialised. A process group the caller initialised already is used as it is.

    Raises:
        DistributedError: torch was built without distributed support, or the rendezvous
            failed (the message names the address and the fix).
    """
    global _CONTEXT
    if not launched_by_torchrun():
        return DistContext()
    if _CONTEXT is not None and dist.is_initialized():
        return _CONTEXT
    if not dist.is_available():
        raise DistributedError(
            "this PyTorch build has no torch.distributed; install the standard torch wheel"
        )
    local_rank = _env_int("LOCAL_RANK", 0)
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)  # NCCL object collectives use the current device
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()))
        except (RuntimeError, ValueError) as e:
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise DistributedError(
                f"cannot join the process group at {where} ({e}); check that every node reaches "
                "the rendezvous endpoint (torchrun --rdzv-endpoint HOST:PORT) and, for gloo, "
                "set GLOO_SOCKET_IFNAME to the network interface the nodes share"
            ) from None
        atexit.register(_shutdown)
    _CONTEXT = DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=_env_int("LOCAL_WORLD_SIZE", dist.get_world_size()),
    )
    return _CONTEXT


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- launcher


def resolve_nproc(nproc: str | int) -> int:
    """``--nproc``: a positive number, or ``auto`` = one process per visible GPU, and 1 without
    GPUs (one process already uses every CPU core through its threads).

    Raises:
        DistributedError: not a positive integer or ``auto``.
    """
    if str(nproc).strip().lower() == "auto":
        return torch.cuda.device_count() if torch.cuda.is_available() else 1
    try:
        n = int(nproc)
    except ValueError:
        n = 0
    if n < 1:
        raise DistributedError(f"--nproc must be a positive number or auto, got {nproc!r}")
    return n


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _root_failure(e: Any) -> tuple[int, Any]:
    """The failed rank that caused the others to stop: the first failure torchrun recorded,
    unless that one was killed by SIGTERM (torchrun's own stop of the survivors, which can be
    stamped before a rank that died without writing an error file) and another was not."""
    rank, failure = e.get_first_failure()
    if failure.exitcode < 0 and failure.signal_name() == "SIGTERM":
        others = [
            (r, f)
            for r, f in e.failures.items()
            if not (f.exitcode < 0 and f.signal_name() == "SIGTERM")
        ]
        if others:
            return min(others, key=lambda rf: rf[1].timestamp)
    return rank, failure


def launch(nproc: int, args: Sequence[str]) -> None:
    """Run ``marrowscope ARGS`` in ``nproc`` processes on this machine and wait for them.

    The same as ``torchrun --standalone --nproc-per-node NPROC -m marrowscope ARGS`` (through
    ``torch.distributed.run``). On the CPU each process gets ``cores // nproc`` threads unless
    ``OMP_NUM_THREADS`` is set.

    Raises:
        DistributedError: already inside a torchrun job, or a process failed (the message names
            its rank and how it ended; torchrun stopped the others).
    """
    if launched_by_torchrun():
        raise DistributedError(
            "--nproc starts its own processes; under torchrun leave it out (torchrun's "
            "--nproc-per-node sets the number of processes)"
        )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not torch.cuda.is_available() and not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // nproc))
    argv = ["--standalone", "--nproc-per-node", str(nproc), "--module", "marrowscope", *args]
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = _root_failure(e)
        if failure.exitcode < 0:
            how = f"was killed by {failure.signal_name()}"
        else:
            how = f"exited with code {failure.exitcode}"
        detail = str(failure.message or "").strip().splitlines()
        why = f": {detail[-1][:300]}" if detail and "<N/A>" not in detail[-1] else ""
        raise DistributedError(
            f"rank {rank} (pid {failure.pid}) {how}{why}; torchrun stopped the other "
            f"{nproc - 1} process(es). Its own error is printed above"
        ) from None
