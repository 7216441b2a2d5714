"""The inner loops: one training epoch and batched inference. Explicit collaborators, small records."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from marrowscope.utils.runtime import Precision


@dataclass(frozen=True)
class EpochStats:
    """What one training epoch measured."""

    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    precision: Precision,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    progress: Progress | None = None,
    task_name: str = "train",
    total: int | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    | None = None,
    on_step: Callable[[], None] | None = None,
) -> EpochStats:
    """Run one epoch of training; step the scheduler every batch.

    Args:
        batch_transform: applied to each ``(images, labels)`` batch on the device (MixUp /
            CutMix); it may return soft labels ``(N, K)``, which ``loss_fn`` must accept.
        on_step: called after every optimizer step (e.g. to update an EMA of the weights).

    Returns:
        Mean loss and running accuracy over the epoch (on augmented images), and throughput.
    """
    model.train()
    total_loss = 0.0
    correct = 0
    seen = 0
    start = time.perf_counter()
    task = None
    if progress is not None:
        task = progress.add_task(task_name, total=total, stats="")
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        target = y
        if batch_transform is not None:
            x, target = batch_transform(x, y)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device):
            logits = model(x)
            loss = loss_fn(logits.float(), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} (diverged); lower train.lr or use precision=fp32"
            )
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step()
        n = y.shape[0]
        total_loss += float(loss.detach()) * n
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += n
        if progress is not None and task is not None:
            progress.update(
                task, advance=n, stats=f"loss {total_loss / seen:.3f} acc {correct / seen:.3f}"
            )
    if progress is not None and task is not None:
        progress.remove_task(task)
    seconds = time.perf_counter() - start
    if seen == 0:
        raise ValueError("the training loader yielded no batch; the train split is empty")
    return EpochStats(loss=total_loss / seen, accuracy=correct / seen, images=seen, seconds=seconds)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    precision: Precision,
    progress: Progress | None = None,
    task_name: str = "eval",
    total: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32, N x K) and labels (N,) for every batch of ``loader``."""
    model.eval()
    outs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    task = progress.add_task(task_name, total=total, stats="") if progress is not None else None
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(device):
            logits = model(x)
        outs.append(logits.float().cpu().numpy())
        labels.append(np.asarray(y))
        if progress is not None and task is not None:
            progress.update(task, advance=len(y))
    if progress is not None and task is not None:
        progress.remove_task(task)
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(outs), np.concatenate(labels).astype(np.int64)
