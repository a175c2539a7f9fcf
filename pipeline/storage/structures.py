"""Structures in the campaign database and the identity of a chunk: targets, initial structures and
snapshots are the same when their geometry hash matches; a chunk is the same as one carved from the
same parent around the same atom at the same radius, whatever its geometry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ase import Atoms
from sqlalchemy import delete, select

from pipeline.storage.engine import rows_changed
from pipeline.storage.hashing import atoms_geometry_hash
from pipeline.storage.records import (
    JobRecord,
    StructureRecord,
    job_record,
    structure_record,
)
from pipeline.storage.schema import (
    STRUCTURE_KINDS,
    CampaignJobRow,
    CampaignStructureRow,
    ReferenceJobRow,
    StructureRow,
    pack_array,
    params_hash,
    plain_json,
)
from pipeline.storage.session import StoreSession

__all__ = ["RADIUS_DECIMALS", "StructureStore"]

RADIUS_DECIMALS = 6
"""Chunk radii (Å) are rounded to 1e-6 Å so that the same radius from a config always matches."""


class StructureStore(StoreSession):
    """The structures part of `CampaignStore`: store, find, list and forget the campaign's structures."""

    def add_structure(
        self,
        kind: str,
        atoms: Atoms,
        *,
        parent_id: int | None = None,
        center_in_parent: int | None = None,
        center_in_chunk: int | None = None,
        radius: float | None = None,
        vacuum: float | None = None,
    ) -> int:
        """Store a structure (or find the stored one), register it with the campaign, return its id.

        Idempotent. Targets and initial structures are the same when kind and geometry hash match; a chunk is
        the same as one with equal parent, central index in the parent and radius (Å), whatever its
        geometry. Chunks need `parent_id`, `center_in_parent`, `center_in_chunk` and `radius`.
        """
        if kind not in STRUCTURE_KINDS:
            raise ValueError(f"structure kind must be one of {STRUCTURE_KINDS}, not {kind!r}")
        n_atoms = len(atoms)
        digest = atoms_geometry_hash(atoms)
        identity = f"{kind}:{digest}"
        if kind == "chunk":
            if parent_id is None or center_in_parent is None or center_in_chunk is None or radius is None:
                raise ValueError("a chunk needs parent_id, center_in_parent, center_in_chunk and radius")
            if not float(radius) > 0:
                raise ValueError(f"chunk radius must be positive, not {radius}")
            if not 0 <= int(center_in_chunk) < n_atoms:
                raise ValueError(f"center_in_chunk {center_in_chunk} is outside a chunk of {n_atoms} atoms")
            radius = round(float(radius), RADIUS_DECIMALS)
            identity = _chunk_identity(int(parent_id), int(center_in_parent), radius)
        elif any(value is not None for value in (parent_id, center_in_parent, center_in_chunk, radius, vacuum)):
            raise ValueError(f"a {kind} structure has no parent, centre, radius or vacuum")
        row = StructureRow(
            kind=kind,
            identity=identity,
            geometry_hash=digest,
            n_atoms=n_atoms,
            numbers=pack_array(np.asarray(atoms.numbers, dtype=np.int64)),
            positions=pack_array(np.asarray(atoms.positions, dtype=np.float64)),
            cell=pack_array(np.asarray(atoms.cell.array, dtype=np.float64)),
            pbc=pack_array(np.asarray(atoms.pbc, dtype=bool)),
            parent_id=None if parent_id is None else int(parent_id),
            center_in_parent=None if center_in_parent is None else int(center_in_parent),
            center_in_chunk=None if center_in_chunk is None else int(center_in_chunk),
            radius=radius,
            vacuum=None if vacuum is None else float(vacuum),
        )
        structure_id = self._insert_or_find(
            row, select(StructureRow.id).where(StructureRow.identity == identity), f"cannot store {kind} structure"
        )
        self._register(CampaignStructureRow, structure_id=structure_id)
        return structure_id

    def structure(self, structure_id: int) -> StructureRecord:
        with self._read() as session:
            row = session.get(StructureRow, structure_id)
            if row is None:
                raise KeyError(f"no structure with id {structure_id}")
            return structure_record(row)

    def atoms(self, structure_id: int) -> Atoms:
        """The stored geometry of a structure (bit-exact)."""
        return self.structure(structure_id).atoms

    def structures(self, kind: str | None = None) -> list[StructureRecord]:
        """The campaign's structures of one kind (or all), in the order it registered them."""
        query = self._own_structures(select(StructureRow))
        if kind is not None:
            query = query.where(StructureRow.kind == kind)
        with self._read() as session:
            return [structure_record(row) for row in session.scalars(query)]

    def chunk_centers(
        self,
        parent_id: int,
        radius: float,
        calculator: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> set[int]:
        """Central indices (in the parent) of the campaign's chunks carved from a parent at a radius.

        With `calculator` (and `params`), only chunks that have a reference job of that calculator.
        The selection skips these atoms.
        """
        query = self._own_structures(select(StructureRow.center_in_parent)).where(
            StructureRow.kind == "chunk",
            StructureRow.parent_id == parent_id,
            StructureRow.radius == round(float(radius), RADIUS_DECIMALS),
        )
        if calculator is not None:
            query = self._own_jobs(query.join(ReferenceJobRow, ReferenceJobRow.structure_id == StructureRow.id), ordered=False).where(
                ReferenceJobRow.calculator == calculator
            )
            if params is not None:
                query = query.where(ReferenceJobRow.params_hash == params_hash(plain_json(params)))
        with self._read() as session:
            return {int(center) for center in session.scalars(query)}

    def find_chunk(
        self,
        parent_id: int,
        center_in_parent: int,
        radius: float,
        calculator: str,
        params: Mapping[str, Any],
    ) -> JobRecord | None:
        """The campaign's reference job of the chunk (parent, centre, radius Å) with this calculator, or None."""
        query = (
            self._own_jobs(select(ReferenceJobRow), ordered=False)
            .join(StructureRow, ReferenceJobRow.structure_id == StructureRow.id)
            .where(
                StructureRow.identity == _chunk_identity(int(parent_id), int(center_in_parent), round(float(radius), RADIUS_DECIMALS)),
                ReferenceJobRow.calculator == calculator,
                ReferenceJobRow.params_hash == params_hash(plain_json(params)),
            )
        )
        with self._read() as session:
            row = session.scalar(query)
            return None if row is None else job_record(row)

    def forget_structures(self, structure_ids: Sequence[int]) -> int:
        """The campaign no longer registers these structures nor their jobs (one transaction);
        returns how many it forgot. The shared rows stay: another campaign may use them, and a
        structure registered again later finds its job and any result already computed."""
        ids = [int(structure_id) for structure_id in structure_ids]
        if not ids:
            return 0
        campaign = self._campaign()
        jobs = select(ReferenceJobRow.id).where(ReferenceJobRow.structure_id.in_(ids))
        with self._write() as session:
            session.execute(
                delete(CampaignJobRow).where(CampaignJobRow.campaign_id == campaign, CampaignJobRow.job_id.in_(jobs)),
                execution_options={"synchronize_session": False},
            )
            result = session.execute(
                delete(CampaignStructureRow).where(
                    CampaignStructureRow.campaign_id == campaign, CampaignStructureRow.structure_id.in_(ids)
                ),
                execution_options={"synchronize_session": False},
            )
            return rows_changed(result)


def _chunk_identity(parent_id: int, center_in_parent: int, radius: float) -> str:
    """What makes a chunk the same chunk: its parent, its centre in the parent, its radius (Å)."""
    return f"chunk:{parent_id}:{center_in_parent}:{radius:.{RADIUS_DECIMALS}f}"
