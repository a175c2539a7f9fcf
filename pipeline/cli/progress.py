"""Progress of the long commands: a rich bar on a terminal, plain timestamped lines without one (at
most one every `PLAIN_INTERVAL_S`, and the last), so that a log or a pipe sees the work go on."""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Self

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from pipeline.science.optimisers import TrainingProgress

PLAIN_INTERVAL_S = 5.0
"""Seconds between two progress lines without a terminal (a stage's or a batch's last line is always shown)."""
BAR_INTERVAL_S = 0.1
"""Seconds between two updates of a bar (each reads the losses off the training device)."""


def plain_line(console: Console, started: float, text: str) -> None:
    """One line with the seconds since `started` (perf_counter), as `nft run` prints without a terminal."""
    console.print(f"[{time.perf_counter() - started:7.1f}s] {text}", highlight=False, markup=False, soft_wrap=True)


class _Bar:
    """A rich bar on a terminal, nothing otherwise; entered and left with the command's work."""

    def __init__(self, console: Console, *columns: TextColumn | BarColumn | TimeElapsedColumn) -> None:
        self.console = console
        self.started = time.perf_counter()
        self.bar = Progress(*columns, console=console, disable=not console.is_terminal)
        self._last_plain = -float("inf")

    def __enter__(self) -> Self:
        self.bar.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.bar.__exit__(kind, error, traceback)

    def _plain(self, text: str, last: bool) -> None:
        """A plain line (no terminal only), at most every `PLAIN_INTERVAL_S` unless it is the `last`."""
        now = time.perf_counter()
        if self.console.is_terminal or (not last and now - self._last_plain < PLAIN_INTERVAL_S):
            return
        self._last_plain = now
        plain_line(self.console, self.started, text)


class TrainingBar(_Bar):
    """The `progress` callback of `train_ensemble` for a command: the stage, its steps and the summed
    loss on a bar, or a line now and then and at the end of every stage."""

    def __init__(self, console: Console) -> None:
        super().__init__(
            console,
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
        self.task = self.bar.add_task("training", total=None, loss="-")
        self._stage: tuple[str, bool] | None = None
        self._last_bar = -float("inf")

    def __call__(self, progress: TrainingProgress) -> None:
        from pipeline.campaign.campaign_log import progress_text

        if self.console.is_terminal:
            now, stage = time.perf_counter(), (progress.stage, progress.refit)
            if stage == self._stage and not progress.done and now - self._last_bar < BAR_INTERVAL_S:
                return
            self._last_bar, self._stage = now, stage
            label = f"training: {progress.stage}" + (" (outlier refit)" if progress.refit else "")
            loss = f"{sum(progress.member_losses()):.4e}"
            self.bar.update(self.task, description=label, total=progress.steps, completed=progress.step, loss=loss)
        elif progress.done or time.perf_counter() - self._last_plain >= PLAIN_INTERVAL_S:  # the losses are read only then
            self._plain(f"training: {progress_text(progress, per_member=progress.done)}", last=progress.done)


class JobsBar(_Bar):
    """The `progress(done, total)` callback of a batch of reference jobs: a bar, or lines."""

    def __init__(self, console: Console, label: str = "reference jobs", total: int | None = None) -> None:
        super().__init__(console, TextColumn(label), BarColumn(), TextColumn("{task.fields[counts]}"), TimeElapsedColumn())
        self.label = label
        self.task = self.bar.add_task(label, total=total, counts="starting" if total is None else f"0/{total}")

    def __call__(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total, counts=f"{done}/{total}")
        self._plain(f"{self.label}: {done} of {total} done", last=done == total)
