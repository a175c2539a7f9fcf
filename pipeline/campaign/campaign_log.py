"""A campaign's log and metrics files: WORKDIR/nft.log, every event of every run with its time
(iterations, reference jobs, trainings with their steps and losses, decisions), and
WORKDIR/metrics.csv, one row per iteration rebuilt from the database.

The campaign layer writes its events to the `nft` logger (Python `logging`); `campaign_log` puts a
file handler on it for the length of a run, and `LoggingObserver` logs what the loop tells its
display. What the terminal shows is the CLI's display; nothing here prints.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.campaign.observer import CampaignObserver
from pipeline.errors import BadInput, RunFailed, error_text
from pipeline.science.optimisers import TrainingProgress
from pipeline.storage.atomic import write_text_atomically

LOGGER_NAME = "nft"
LOG_NAME = "nft.log"
METRICS_NAME = "metrics.csv"
LOG_PROGRESS_INTERVAL_S = 10.0
"""Seconds between two training-progress lines in the log (every stage's last line is logged)."""

log = logging.getLogger(LOGGER_NAME)
log.addHandler(logging.NullHandler())  # a library's logger: silent unless someone attaches a handler


class _IsoFormatter(logging.Formatter):
    """Lines as ``2025-06-01T12:00:03.123+02:00 INFO message``: local time with its offset."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class _CampaignFileHandler(logging.FileHandler):
    """WORKDIR/nft.log, appended to; takes the records of the thread that runs the campaign only
    (two campaigns driven from threads of one process keep their logs apart)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.thread = threading.get_ident()
        self.setFormatter(_IsoFormatter("%(asctime)s %(levelname)s %(message)s"))
        self.addFilter(lambda record: record.thread == self.thread)


@contextmanager
def campaign_log(workdir: Path, heading: str) -> Iterator[None]:
    """Log to WORKDIR/nft.log (created, or appended to by a resumed run) while the block runs: the
    `heading` first, then every record of the `nft` logger, and how the block ended (an error, an
    interruption). Within another `campaign_log` of the same file, adds nothing (one line per event)."""
    path = (Path(workdir) / LOG_NAME).resolve()
    here = threading.get_ident()
    if any(isinstance(h, _CampaignFileHandler) and h.baseFilename == str(path) and h.thread == here for h in log.handlers):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _CampaignFileHandler(path)
    previous_level = log.level
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.info(heading)
    try:
        yield
    except KeyboardInterrupt:
        log.warning("interrupted (a stopping signal or Ctrl-C): run the same command again to resume")
        raise
    except BadInput as error:
        log.error("refused: %s", error)
        raise
    except RunFailed as error:
        log.error("failed: %s", error)
        raise
    except Exception as error:
        log.error("failed: %s", error_text(error))
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
        if not any(isinstance(h, _CampaignFileHandler) for h in log.handlers):
            log.setLevel(previous_level)


def progress_text(progress: TrainingProgress, per_member: bool = False) -> str:
    """One line for a training report: stage, step, the summed loss and its spread over the
    members (with `per_member`, every member's loss by seed). Reads the losses off the device."""
    losses = progress.member_losses()
    stage = f"{progress.stage} (outlier refit)" if progress.refit else progress.stage
    where = f"done after {progress.step} step(s)" if progress.done else f"step {progress.step}/{progress.steps}"
    spread = f"{min(losses):.3e} to {max(losses):.3e}" if losses else "-"
    text = f"{stage} {where}: loss {sum(losses):.4e} over {len(losses)} member(s) ({spread})"
    if per_member:
        text += "; by seed: " + ", ".join(f"{seed} {loss:.3e}" for seed, loss in zip(progress.seeds, losses))
    return text


def logging_observer(display: CampaignObserver | None) -> LoggingObserver:
    """`display` with its events logged: a `LoggingObserver` around it (itself when it is one)."""
    return display if isinstance(display, LoggingObserver) else LoggingObserver(display)


class LoggingObserver(CampaignObserver):
    """Logs every event the loop reports (`nft` logger), then hands it to `display`."""

    def __init__(self, display: CampaignObserver | None = None) -> None:
        self.display = display or CampaignObserver()
        self._last_progress = -float("inf")

    def message(self, text: str) -> None:
        log.log(logging.WARNING if text.startswith("warning") else logging.INFO, text)
        self.display.message(text)

    def phase(self, iteration: int, name: str) -> None:
        log.info("iteration %d: %s", iteration, name)
        self.display.phase(iteration, name)

    def jobs(self, done: int, running: int, failed: int, total: int) -> None:
        self.display.jobs(done, running, failed, total)  # each job is logged by itself (reference_jobs)

    def training_progress(self, iteration: int, progress: TrainingProgress) -> None:
        now = time.monotonic()
        if progress.done or now - self._last_progress >= LOG_PROGRESS_INTERVAL_S:
            self._last_progress = now
            log.info("iteration %d: training: %s", iteration, progress_text(progress, per_member=progress.done))
        self.display.training_progress(iteration, progress)

    def iteration_done(self, entry: Mapping[str, Any]) -> None:
        wall = entry.get("wall_time") or {}
        log.info(
            "iteration %d done: max δ %s eV/Å, %d chunk(s) added, train force MAE %s eV/Å, %.1f s "
            "(training %.1f, prediction %.1f, reference %.1f)",
            entry["iteration"],
            _number(entry.get("uncertainty")),
            entry.get("chunks_added") or 0,
            _number(entry.get("train_force_mae")),
            wall.get("total", 0.0),
            wall.get("training", 0.0),
            wall.get("prediction", 0.0),
            wall.get("reference", 0.0),
        )
        self.display.iteration_done(entry)


# ---------------------------------------------------------------------------------------------
# WORKDIR/metrics.csv


METRICS_COLUMNS = (
    "iteration",
    "max_delta_eV_per_A",
    "max_energy_delta_eV",
    "chunks_added",
    "chunks_total",
    "train_force_mae_eV_per_A",
    "validation_force_mae_eV_per_A",
    "train_energy_rmse_eV_per_atom",
    "final_loss",
    "epochs_run",
    "training_structures",
    "warm_started",
    "refitted_members",
    "selectable_atoms",
    "selected_atoms",
    "training_s",
    "prediction_s",
    "reference_s",
    "overhead_s",
    "total_s",
)
"""The columns of metrics.csv: one row per recorded iteration (a summary.json history entry and its
model's training metrics); an empty cell where a value is missing (a relaxation's iteration selects
nothing on the targets, an older database lacks a metric)."""


def metrics_rows(entries: Sequence[Mapping[str, Any]], model_metrics: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows of metrics.csv from summary.json's history `entries` and each iteration's recorded
    model metrics (iteration → metrics)."""
    rows = []
    chunks_total = 0
    for entry in entries:
        metrics = model_metrics.get(entry["iteration"]) or {}
        wall = entry.get("wall_time") or {}
        selection = entry.get("selection") or {}
        chunks_total += int(entry.get("chunks_added") or 0)
        values = (
            entry["iteration"],
            entry.get("uncertainty"),
            entry.get("energy_uncertainty"),
            entry.get("chunks_added"),
            chunks_total,
            entry.get("train_force_mae"),
            metrics.get("validation_force_mae"),
            metrics.get("train_energy_rmse_per_atom"),
            metrics.get("final_loss"),
            metrics.get("epochs_run"),
            metrics.get("training_structures"),
            metrics.get("warm_started"),
            len(metrics.get("reset_members") or ()),
            selection.get("selectable"),
            selection.get("selected"),
            *(wall.get(part) for part in ("training", "prediction", "reference", "overhead", "total")),
        )
        rows.append(dict(zip(METRICS_COLUMNS, values)))
    return rows


def write_metrics_csv(path: Path, entries: Sequence[Mapping[str, Any]], model_metrics: Mapping[int, Mapping[str, Any]]) -> None:
    """Write metrics.csv whole (`write_text_atomically`: a kill leaves the old file or the new one)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in metrics_rows(entries, model_metrics):
        writer.writerow({key: _cell(value) for key, value in row.items()})
    write_text_atomically(path, buffer.getvalue())


def _cell(value: Any) -> Any:
    """A CSV cell: empty for None, floats in full precision, booleans as true/false."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return value


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
