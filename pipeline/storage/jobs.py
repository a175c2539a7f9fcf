"""The reference-job state machine: pending → running → done or failed, claimed by one driver at a
time across the campaigns sharing a database, a result final once stored and reused by every
campaign that needs it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from sqlalchemy import select, update

from pipeline.storage.engine import rows_changed
from pipeline.storage.lease import LEASE_STALE_S, lease_live
from pipeline.storage.records import (
    JobRecord,
    ResultRecord,
    StructureRecord,
    job_record,
    result_record,
    structure_record,
)
from pipeline.storage.schema import (
    JOB_STATUSES,
    CampaignJobRow,
    CampaignRow,
    ReferenceJobRow,
    ReferenceResultRow,
    StructureRow,
    pack_array,
    params_hash,
    plain_json,
    utc_now,
)
from pipeline.storage.session import StoreSession

__all__ = ["CLAIMED", "ELSEWHERE", "JobAlreadyDone", "JobStore"]

CLAIMED = "claimed"
"""`claim_job`: the job is now running under this campaign; compute it."""
ELSEWHERE = "elsewhere"
"""`claim_job`: another campaign's live driver is computing the job; wait for its result."""


class JobAlreadyDone(ValueError):
    """A result or a start for a job that already has its result (a result is final)."""


class JobStore(StoreSession):
    """The reference-jobs part of `CampaignStore`: add, claim, start, settle and list the campaign's jobs."""

    def add_job(self, structure_id: int, calculator: str, params: Mapping[str, Any] | None = None) -> int:
        """Register a pending reference job (or find the stored one, maybe done by another campaign)
        with the campaign and return its id; idempotent per (structure, calculator, params)."""
        plain = plain_json(params or {})
        digest = params_hash(plain)
        row = ReferenceJobRow(
            structure_id=int(structure_id),
            calculator=calculator,
            params=plain,
            params_hash=digest,
            status="pending",
            attempts=0,
        )
        query = select(ReferenceJobRow.id).where(
            ReferenceJobRow.structure_id == int(structure_id),
            ReferenceJobRow.calculator == calculator,
            ReferenceJobRow.params_hash == digest,
        )
        job_id = self._insert_or_find(row, query, f"cannot add a {calculator} job for structure {structure_id}")
        self._register(CampaignJobRow, job_id=job_id)
        return job_id

    def job(self, job_id: int) -> JobRecord:
        with self._read() as session:
            return job_record(self._job_row(session, job_id, lock=False))

    def jobs(self, status: str | None = None, kind: str | None = None) -> list[JobRecord]:
        """The campaign's reference jobs, optionally of one status and of one structure kind, in the
        order it registered them."""
        if status is not None and status not in JOB_STATUSES:
            raise ValueError(f"job status must be one of {JOB_STATUSES}, not {status!r}")
        query = self._own_jobs(select(ReferenceJobRow))
        if status is not None:
            query = query.where(ReferenceJobRow.status == status)
        if kind is not None:
            query = query.join(StructureRow, ReferenceJobRow.structure_id == StructureRow.id).where(StructureRow.kind == kind)
        with self._read() as session:
            return [job_record(row) for row in session.scalars(query)]

    def mark_running(self, job_id: int, host: str | None = None, external_id: str | None = None) -> None:
        """The job was submitted: status running, one more attempt, start time, host, external id.

        Unconditional (but a done job stays done: `JobAlreadyDone`); a driver claims with `claim_job`."""
        with self._write() as session:
            row = self._job_row(session, job_id)
            if row.status == "done":
                raise JobAlreadyDone(f"reference job {job_id} is already done")
            self._start(row, host, external_id)

    def claim_job(self, job_id: int, stale_after_s: float = LEASE_STALE_S) -> str:
        """Compare-and-set start of a job for this campaign's driver, so no job is computed by two.

        Returns `CLAIMED` (it was pending, or running under a driver without a live lease: now
        running under this campaign, one more attempt), "done" or "failed" (settled, by anyone), or
        `ELSEWHERE` (another campaign's live driver is computing it: wait for its result)."""
        campaign = self._campaign()
        with self._write() as session:
            row = self._job_row(session, job_id)
            if row.status in ("done", "failed"):
                return row.status
            if row.status == "running" and row.claimed_by not in (None, campaign):
                holder = session.get(CampaignRow, row.claimed_by)
                if holder is not None and lease_live(holder, utc_now(), stale_after_s):
                    return ELSEWHERE
            self._start(row, None, None)
            return CLAIMED

    def _start(self, row: ReferenceJobRow, host: str | None, external_id: str | int | None) -> None:
        row.status = "running"
        row.attempts += 1
        row.error = None
        row.started_at = utc_now()
        row.finished_at = None
        row.host = host
        row.external_id = None if external_id is None else str(external_id)
        if self._campaign_id is not None:
            row.claimed_by = self._campaign_id

    def store_result(
        self,
        job_id: int,
        energy: float,
        forces: np.ndarray,
        wall_time_s: float | None = None,
        host: str | None = None,
        external_id: str | None = None,
        final_positions: np.ndarray | None = None,
        final_cell: np.ndarray | None = None,
    ) -> None:
        """Store energy (eV) and forces (eV/Å) and mark the job done, in one transaction; the
        external id is the batch system's job id (e.g. `SLURM_JOB_ID`) when the job ran under one.
        A relaxation job also gives the geometry it ended at (positions (n, 3) and cell (3, 3), Å).

        A result is final: a second one raises `JobAlreadyDone`; a non-finite energy or force is never
        data (`ValueError`). Every other campaign that needs the job is recorded as reusing it."""
        with self._write() as session:
            row = self._job_row(session, job_id)
            if row.status == "done":
                raise JobAlreadyDone(f"reference job {job_id} is already done")
            n_atoms = session.execute(select(StructureRow.n_atoms).where(StructureRow.id == row.structure_id)).scalar_one()
            forces = np.asarray(forces, dtype=np.float64)
            if forces.shape != (n_atoms, 3):
                raise ValueError(f"forces of job {job_id} have shape {forces.shape}, expected ({n_atoms}, 3)")
            if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
                raise ValueError(f"result of job {job_id} is not finite (energy {energy}); not stored")
            geometry = _final_geometry(job_id, n_atoms, final_positions, final_cell)
            session.add(ReferenceResultRow(job_id=row.id, energy=float(energy), forces=pack_array(forces), **geometry))
            row.status = "done"
            row.error = None
            row.finished_at = utc_now()
            if wall_time_s is not None:
                row.wall_time_s = float(wall_time_s)
            if host is not None:
                row.host = host
            if external_id is not None:
                row.external_id = str(external_id)
            if self._campaign_id is not None:
                row.claimed_by = self._campaign_id
            computed_by = row.claimed_by
            if computed_by is not None:
                session.execute(
                    update(CampaignJobRow)
                    .where(CampaignJobRow.job_id == row.id, CampaignJobRow.campaign_id != computed_by)
                    .values(reused=True)
                )

    def mark_failed(self, job_id: int, error: str, wall_time_s: float | None = None) -> None:
        """The job raised: status failed with the error text (a later run may retry it); a job
        already done (by another driver) keeps its result."""
        with self._write() as session:
            row = self._job_row(session, job_id)
            if row.status == "done":
                return
            row.status = "failed"
            row.error = str(error)
            row.finished_at = utc_now()
            if wall_time_s is not None:
                row.wall_time_s = float(wall_time_s)

    def reset_unfinished(self, include_failed: bool = False) -> int:
        """On resume: the campaign's running jobs (and failed ones if asked) back to pending, error
        cleared and attempts kept; returns how many. Only jobs its own earlier driver ran (or
        nobody's): another campaign's are its own."""
        statuses = ("running", "failed") if include_failed else ("running",)
        query = update(ReferenceJobRow).where(ReferenceJobRow.status.in_(statuses))
        if self._campaign_id is not None:
            own = select(CampaignJobRow.job_id).where(CampaignJobRow.campaign_id == self._campaign_id)
            query = query.where(
                ReferenceJobRow.id.in_(own),
                (ReferenceJobRow.claimed_by == self._campaign_id) | ReferenceJobRow.claimed_by.is_(None),
            )
        with self._write() as session:
            result = session.execute(
                query.values(status="pending", error=None, started_at=None, external_id=None),
                execution_options={"synchronize_session": False},
            )
            return rows_changed(result)

    def result(self, job_id: int) -> ResultRecord | None:
        """Energy and forces of a done job, or None."""
        with self._read() as session:
            row = session.get(ReferenceResultRow, job_id)
            return None if row is None else result_record(row)

    def labelled_structures(
        self, calculator: str | None = None, params: Mapping[str, Any] | None = None
    ) -> list[tuple[StructureRecord, ResultRecord]]:
        """The campaign's initial structures and chunks with a done reference job (computed by it or
        reused), and their results, in the order it registered the jobs.

        Optionally only one calculator (and parameters). What a result trains is the campaign's rule.
        """
        query = self._own_jobs(
            select(StructureRow, ReferenceResultRow)
            .join(ReferenceJobRow, ReferenceJobRow.structure_id == StructureRow.id)
            .join(ReferenceResultRow, ReferenceResultRow.job_id == ReferenceJobRow.id)
            .where(ReferenceJobRow.status == "done", StructureRow.kind.in_(("initial", "chunk")))
        )
        if calculator is not None:
            query = query.where(ReferenceJobRow.calculator == calculator)
        if params is not None:
            query = query.where(ReferenceJobRow.params_hash == params_hash(plain_json(params)))
        with self._read() as session:
            return [(structure_record(structure), result_record(result)) for structure, result in session.execute(query)]


def _final_geometry(job_id: int, n_atoms: int, positions: np.ndarray | None, cell: np.ndarray | None) -> dict[str, bytes | None]:
    """The packed end geometry of a relaxation job (both or neither; finite; shapes (n, 3) and (3, 3))."""
    if positions is None and cell is None:
        return {"final_positions": None, "final_cell": None}
    if positions is None or cell is None:
        raise ValueError(f"result of job {job_id} gives only one of final_positions and final_cell")
    positions, cell = np.asarray(positions, dtype=np.float64), np.asarray(cell, dtype=np.float64)
    if positions.shape != (n_atoms, 3) or cell.shape != (3, 3):
        raise ValueError(
            f"final geometry of job {job_id} has shapes {positions.shape} and {cell.shape}, expected ({n_atoms}, 3) and (3, 3)"
        )
    if not (np.all(np.isfinite(positions)) and np.all(np.isfinite(cell))):
        raise ValueError(f"final geometry of job {job_id} is not finite; not stored")
    return {"final_positions": pack_array(positions), "final_cell": pack_array(cell)}
