"""The one progress-bar style of marrowscope (rich): count, percentage, rate, live stats, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second; the unit is the task's ``unit`` field (default ``img``)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "img")
        return Text(
            f"-- {unit}/s" if speed is None else f"{speed:,.1f} {unit}/s",
            style="progress.data.speed",
        )


class StatsColumn(ProgressColumn):
    """Free text a task carries in its ``stats`` field (e.g. running loss and accuracy)."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("stats", "")))


def make_progress(
    *, enabled: bool = True, transient: bool = False, console: Console | None = None
) -> Progress:
    """A rich progress bar (on stderr) with count, percentage, rate, optional stats and ETA.

    Args:
        enabled: ``False`` draws nothing (tasks can still be added and advanced).
        transient: remove the bar when done.
        console: where to draw; default stderr.
    """
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        StatsColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=transient,
        disable=not enabled,
    )
