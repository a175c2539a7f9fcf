"""How the NFT loop reports progress: events a display can show (the loop itself never prints)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.science.optimisers import TrainingProgress


class CampaignObserver:
    """What the loop reports while it runs; the CLI's display subclasses it. Does nothing by default."""

    def message(self, text: str) -> None:
        """A line worth showing (set-up steps, resume information, the final MAE)."""

    def phase(self, iteration: int, name: str) -> None:
        """The loop entered a phase of an iteration: training, prediction, selection, reference jobs."""

    def jobs(self, done: int, running: int, failed: int, total: int) -> None:
        """Progress of the reference jobs of the current batch."""

    def training_progress(self, iteration: int, progress: TrainingProgress) -> None:
        """Where iteration `iteration`'s training is (stage, step, each member's loss): about once a
        second while it trains, and at the end of every stage (`progress.done`). A distributed
        training reports its first rank's members."""

    def iteration_done(self, entry: Mapping[str, Any]) -> None:
        """One iteration finished (an entry of summary.json's history)."""
