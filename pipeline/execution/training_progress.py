"""A training job's progress, carried from its worker to the driver through a file.

A training job runs on a worker (another process, maybe another node) that the driver reaches only
through its future; the job writes its `TrainingProgress` reports as JSON lines to a file beside
the model it trains (the workdir is shared, as the model file is), at most one line every
`WRITE_INTERVAL_S` and every stage's last; the driver reads the new lines while it waits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.science.optimisers import TrainingProgress

WRITE_INTERVAL_S = 1.0
"""Seconds between two progress lines a worker writes (a stage's last line is always written)."""
PROGRESS_SUFFIX = ".progress.jsonl"
"""models/iteration-NNN.nft's progress is models/iteration-NNN.progress.jsonl while it trains."""


def progress_path(model_path: str | Path) -> Path:
    """The progress file of the training that writes `model_path`."""
    path = Path(model_path)
    return path.with_name(path.stem + PROGRESS_SUFFIX)


def progress_record(progress: TrainingProgress) -> dict[str, Any]:
    """`progress` as plain data (reads its losses off the device)."""
    return {
        "stage": progress.stage,
        "step": progress.step,
        "steps": progress.steps,
        "losses": progress.member_losses(),
        "seeds": list(progress.seeds),
        "refit": progress.refit,
        "done": progress.done,
    }


def progress_from_record(record: Mapping[str, Any]) -> TrainingProgress:
    """The `TrainingProgress` a `progress_record` holds (losses on the CPU)."""
    return TrainingProgress(
        stage=str(record["stage"]),
        step=int(record["step"]),
        steps=int(record["steps"]),
        losses=torch.tensor([float(value) for value in record["losses"]], dtype=torch.float64),
        seeds=tuple(int(seed) for seed in record["seeds"]),
        refit=bool(record.get("refit", False)),
        done=bool(record.get("done", False)),
    )


class ProgressWriter:
    """The `progress` callback of a training job: appends a line to `path` now and then (the device
    is read only for the lines written, so the training pays nothing in between). Progress is for
    watching: a file that cannot be written loses the line, never the training."""

    def __init__(self, path: str | Path, interval_s: float = WRITE_INTERVAL_S) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self._last = -float("inf")

    def __call__(self, progress: TrainingProgress) -> None:
        now = time.monotonic()
        if not progress.done and now - self._last < self.interval_s:
            return
        self._last = now
        line = json.dumps(progress_record(progress)) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(line)
        except OSError:
            pass


class ProgressReader:
    """The driver's side: the reports written to `path` since the last look."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offset = 0

    def restart(self) -> None:
        """Forget the file and its reports (a training job submitted again writes a fresh one)."""
        self.path.unlink(missing_ok=True)
        self._offset = 0

    def new_reports(self) -> list[TrainingProgress]:
        """The reports of the whole lines written since the last call (none while there is no file)."""
        try:
            with open(self.path, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return []
        whole = data[: data.rfind(b"\n") + 1]
        self._offset += len(whole)
        reports = []
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                reports.append(progress_from_record(json.loads(line)))
            except (ValueError, KeyError, TypeError):  # a line a killed worker left half-written
                continue
        return reports
