"""What the campaign database hands back: frozen records built from its rows, never live ORM objects.

A structure's geometry comes back as `ase.Atoms` (bit-exact), forces as float64 arrays (eV/Å),
timestamps as aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from ase import Atoms

from pipeline.storage.schema import (
    IterationRow,
    ModelRow,
    ReferenceJobRow,
    ReferenceResultRow,
    StructureRow,
    as_utc,
    unpack_array,
)

__all__ = [
    "IterationRecord",
    "JobRecord",
    "ModelRecord",
    "ResultRecord",
    "StoreSummary",
    "StructureRecord",
    "iteration_record",
    "job_record",
    "model_record",
    "result_record",
    "structure_record",
]


@dataclass(frozen=True)
class StructureRecord:
    id: int
    kind: str
    atoms: Atoms
    geometry_hash: str
    n_atoms: int
    parent_id: int | None
    center_in_parent: int | None
    center_in_chunk: int | None
    radius: float | None
    vacuum: float | None
    created_at: datetime

    @property
    def chunk_center(self) -> int:
        """A chunk's central atom, its index in the chunk (`ValueError` for a structure not carved)."""
        return self._carved(self.center_in_chunk)

    @property
    def parent_center(self) -> int:
        """A chunk's central atom, its index in the parent (`ValueError` for a structure not carved)."""
        return self._carved(self.center_in_parent)

    @property
    def chunk_radius(self) -> float:
        """The radius (Å) a chunk was carved with (`ValueError` for a structure not carved)."""
        return self._carved(self.radius)

    def _carved(self, value: Any) -> Any:
        if value is None:
            raise ValueError(f"structure {self.id} ({self.kind}) was not carved from a parent")
        return value


@dataclass(frozen=True)
class JobRecord:
    id: int
    structure_id: int
    calculator: str
    params: dict[str, Any]
    params_hash: str
    status: str
    attempts: int
    error: str | None
    host: str | None
    wall_time_s: float | None
    external_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    claimed_by: int | None = None
    """The id of the campaign whose driver runs (or last ran) the job."""


@dataclass(frozen=True)
class ResultRecord:
    job_id: int
    energy: float
    forces: np.ndarray
    final_positions: np.ndarray | None = None
    """Where a relaxation job ended (Å, shape (n, 3)); None for a single point."""
    final_cell: np.ndarray | None = None
    """The cell a relaxation job ended with (Å, shape (3, 3)); None for a single point."""


@dataclass(frozen=True)
class ModelRecord:
    id: int
    iteration: int
    path: str
    sha256: str
    metrics: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class IterationRecord:
    iteration: int
    delta_per_target: dict[int, float]
    max_delta: float
    chunks_added: int
    train_force_mae: float | None
    wall_time: dict[str, float]
    created_at: datetime
    carved: bool = True  # False: the iteration stopped the campaign before selection ran


@dataclass(frozen=True)
class StoreSummary:
    """Counts for `nft status`: jobs by status, structures by kind, atoms computed by the parent,
    done jobs reused from another campaign."""

    jobs: dict[str, int]
    targets: int
    initial: int
    chunks: int
    reference_atoms: int
    iterations: int
    models: int
    reused: int = 0


def structure_record(row: StructureRow) -> StructureRecord:
    """The record of a structure row, its geometry unpacked into `ase.Atoms`."""
    return StructureRecord(
        id=row.id,
        kind=row.kind,
        atoms=_atoms(row),
        geometry_hash=row.geometry_hash,
        n_atoms=row.n_atoms,
        parent_id=row.parent_id,
        center_in_parent=row.center_in_parent,
        center_in_chunk=row.center_in_chunk,
        radius=row.radius,
        vacuum=row.vacuum,
        created_at=as_utc(row.created_at),
    )


def job_record(row: ReferenceJobRow) -> JobRecord:
    """The record of a reference-job row."""
    return JobRecord(
        id=row.id,
        structure_id=row.structure_id,
        calculator=row.calculator,
        params=dict(row.params),
        params_hash=row.params_hash,
        status=row.status,
        attempts=row.attempts,
        error=row.error,
        host=row.host,
        wall_time_s=row.wall_time_s,
        external_id=row.external_id,
        created_at=as_utc(row.created_at),
        started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at),
        claimed_by=row.claimed_by,
    )


def result_record(row: ReferenceResultRow) -> ResultRecord:
    """The record of a reference-result row: energy (eV), forces (eV/Å), a relaxation's end geometry."""
    return ResultRecord(
        row.job_id,
        row.energy,
        unpack_array(row.forces),
        None if row.final_positions is None else unpack_array(row.final_positions),
        None if row.final_cell is None else unpack_array(row.final_cell),
    )


def model_record(row: ModelRow) -> ModelRecord:
    """The record of a model row."""
    return ModelRecord(
        id=row.id,
        iteration=row.iteration,
        path=row.path,
        sha256=row.sha256,
        metrics=dict(row.metrics),
        created_at=as_utc(row.created_at),
    )


def iteration_record(row: IterationRow) -> IterationRecord:
    """The record of an iteration row, δ keyed by target structure id again (JSON keys are strings)."""
    return IterationRecord(
        iteration=row.iteration,
        delta_per_target={int(key): float(value) for key, value in row.delta_per_target.items()},
        max_delta=row.max_delta,
        chunks_added=row.chunks_added,
        train_force_mae=row.train_force_mae,
        wall_time=dict(row.wall_time),
        created_at=as_utc(row.created_at),
        carved=bool(row.carved),
    )


def _atoms(row: StructureRow) -> Atoms:
    return Atoms(
        numbers=unpack_array(row.numbers),
        positions=unpack_array(row.positions),
        cell=unpack_array(row.cell),
        pbc=unpack_array(row.pbc),
    )
