"""A campaign's iterations and the models they trained: the model file recorded with its sha256 (and
relative to the campaign's folder, so a copied campaign reads its own copy), and each iteration's δ
per target, chunks added and wall-time split. Which model is the best is the campaign's rule
(`campaign.history.best_model`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline.errors import BadInput
from pipeline.storage.hashing import file_sha256
from pipeline.storage.records import (
    IterationRecord,
    ModelRecord,
    iteration_record,
    model_record,
)
from pipeline.storage.schema import IterationRow, ModelRow, plain_json, utc_now
from pipeline.storage.session import StoreSession

__all__ = ["IterationStore", "ModelFileChanged"]


class ModelFileChanged(BadInput):
    """A model file's bytes differ from the sha256 its campaign recorded (overwritten or edited)."""


class IterationStore(StoreSession):
    """The models-and-iterations part of `CampaignStore`: record and read the campaign's models and iterations."""

    def record_model(
        self,
        iteration: int,
        path: str | os.PathLike[str],
        metrics: Mapping[str, Any] | None = None,
    ) -> int:
        """Record the model file trained in `iteration` with its sha256; replaces that iteration's entry.
        A file inside `files_root` is recorded by its path relative to it."""
        digest = file_sha256(Path(path))
        campaign = self._campaign()
        with self._write() as session:
            row = session.scalar(select(ModelRow).where(ModelRow.campaign_id == campaign, ModelRow.iteration == int(iteration)))
            if row is None:
                row = ModelRow(campaign_id=campaign, iteration=int(iteration))
                session.add(row)
            row.path = _stored_path(Path(path), self.files_root)
            row.sha256 = digest
            row.metrics = plain_json(metrics or {})
            row.created_at = utc_now()
            session.flush()
            return row.id

    def models(self) -> list[ModelRecord]:
        """The campaign's models in iteration order."""
        campaign = self._campaign()
        query = select(ModelRow).where(ModelRow.campaign_id == campaign).order_by(ModelRow.iteration)
        with self._read() as session:
            return [self._model_record(row) for row in session.scalars(query)]

    def model_file(self, record: ModelRecord) -> Path:
        """The file of a recorded model, checked against the sha256 recorded with it, so a campaign
        never uses a model another campaign (or an edit) put in its place. `ModelFileChanged` (one
        line naming the file) when its bytes differ; a missing file is returned as is (callers say
        what they do without it)."""
        path = Path(record.path)
        if path.is_file() and file_sha256(path) != record.sha256:
            owner = f"campaign {self._campaign_name!r}" if self._campaign_name else "its campaign"
            raise ModelFileChanged(
                f"{path}: not the model {owner} recorded for iteration {record.iteration} in {self.name} "
                f"(sha256 {file_sha256(path)[:12]}…, recorded {record.sha256[:12]}…): overwritten or edited; "
                "give each campaign a workdir of its own and rerun"
            )
        return path

    def _model_record(self, row: ModelRow) -> ModelRecord:
        """The record of a model row, its stored path resolved (`_resolved_path`)."""
        record = model_record(row)
        return dataclasses.replace(record, path=str(_resolved_path(record.path, self.files_root)))

    def record_iteration(
        self,
        iteration: int,
        delta_per_target: Mapping[int, float],
        chunks_added: int,
        train_force_mae: float | None = None,
        wall_time: Mapping[str, float] | None = None,
        *,
        max_delta: float | None = None,
        carved: bool = True,
    ) -> None:
        """Record one iteration: δ (eV/Å) per target structure id, chunks added, training force MAE
        (eV/Å), the wall-time split in seconds and whether selection ran (`carved`); recording the
        same iteration again replaces it."""
        deltas = {str(int(key)): float(value) for key, value in delta_per_target.items()}
        if max_delta is None:
            if not deltas:
                raise ValueError("max_delta is needed when delta_per_target is empty")
            max_delta = max(deltas.values())
        campaign = self._campaign()
        with self._write() as session:
            row = session.scalar(select(IterationRow).where(IterationRow.campaign_id == campaign, IterationRow.iteration == int(iteration)))
            if row is None:
                row = IterationRow(campaign_id=campaign, iteration=int(iteration))
                session.add(row)
            row.delta_per_target = deltas
            row.max_delta = float(max_delta)
            row.chunks_added = int(chunks_added)
            row.carved = bool(carved)
            row.train_force_mae = None if train_force_mae is None else float(train_force_mae)
            row.wall_time = {str(key): float(value) for key, value in (wall_time or {}).items()}
            row.created_at = utc_now()

    def iterations(self) -> list[IterationRecord]:
        """The campaign's iterations in order."""
        campaign = self._campaign()
        query = select(IterationRow).where(IterationRow.campaign_id == campaign).order_by(IterationRow.iteration)
        with self._read() as session:
            return [iteration_record(row) for row in session.scalars(query)]


def _stored_path(path: Path, root: Path | None) -> str:
    """How a file is recorded: relative to `root` when inside it (a copied campaign then reads its
    own copy), else absolute."""
    absolute = path.resolve()
    if root is not None and absolute.is_relative_to(root):
        return absolute.relative_to(root).as_posix()
    return str(absolute)


def _resolved_path(stored: str, root: Path | None) -> Path:
    """A recorded file path as a usable one. Relative: inside `root`. Absolute (recorded by an older
    nft): as is when inside `root` or no file under `root` ends the same way; else that file of
    `root` (the campaign was copied or moved: its own copy, e.g. models/iteration-001.nft, not the
    original's). Whichever is chosen, `model_file` checks its sha256."""
    path = Path(stored)
    if root is None:
        return path
    if not path.is_absolute():
        return root / path
    if path.is_relative_to(root):
        return path
    parts = path.parts[1:]
    for start in range(len(parts) - 1, -1, -1):  # the shortest tail first: models/iteration-001.nft
        candidate = root.joinpath(*parts[start:])
        if start < len(parts) - 1 and candidate.is_file():
            return candidate
    return path
