"""The campaign database's operations: the few reads and writes the NFT loop needs, and nothing of its rules.

`CampaignStore.open(url, campaign)` opens (or creates) the database behind any SQLAlchemy URL (see
`engine`) for one campaign: it reads only the structures and jobs that campaign registered, and what
it writes joins that campaign. Structures, jobs and results themselves are shared, so a result another
campaign computed for the same geometry and parent physics is reused, not recomputed. Every method
runs in its own short transaction, so the driver can write as each future completes and a kill loses
nothing already returned; writes that only make sense together (a chunk, its job and the iteration
that carved it) go in one `transaction()`, so a kill leaves all of them or none. Model files are
recorded relative to the campaign's folder (`files_root`), so a copied campaign reads its own. Structures go in as `ase.Atoms`; everything returned is a frozen record
(see `records`), never a live ORM object.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy.exc as sa_exc
from ase import Atoms
from sqlalchemy import Engine, Select, delete, func, select, update
from sqlalchemy.orm import Session

from pipeline.errors import BadInput, RunFailed
from pipeline.storage.engine import DatabaseError, error_reason, open_engine, write_engine
from pipeline.storage.records import (
    IterationRecord,
    JobRecord,
    ModelRecord,
    ResultRecord,
    StoreSummary,
    StructureRecord,
    iteration_record,
    job_record,
    model_record,
    result_record,
    structure_record,
)
from pipeline.storage.schema import (
    JOB_STATUSES,
    STRUCTURE_KINDS,
    CampaignJobRow,
    CampaignRow,
    CampaignStructureRow,
    IterationRow,
    ModelRow,
    ReferenceJobRow,
    ReferenceResultRow,
    StructureRow,
    canonical_json,
    geometry_hash,
    pack_array,
    params_hash,
    utc_now,
)

__all__ = [
    "CLAIMED", "ELSEWHERE", "CampaignBusy", "CampaignStore", "JobAlreadyDone", "LeaseLost", "ModelFileChanged",
    "UnknownCampaign", "atoms_geometry_hash", "file_sha256",
]

RADIUS_DECIMALS = 6
"""Chunk radii (Å) are rounded to 1e-6 Å so that the same radius from a config always matches."""

LEASE_STALE_S = 60.0
"""A driver lease without a heartbeat for this long (s) is taken over by the next driver."""

CLAIMED = "claimed"
"""`claim_job`: the job is now running under this campaign; compute it."""
ELSEWHERE = "elsewhere"
"""`claim_job`: another campaign's live driver is computing the job; wait for its result."""


class UnknownCampaign(DatabaseError):
    """The database holds no campaign of the name asked for (only when reading, `create=False`)."""


class CampaignBusy(BadInput):
    """Another live driver holds the campaign's lease (exit 2: one line naming it and since when)."""


class LeaseLost(RunFailed):
    """This driver's lease was taken over (no heartbeat for `LEASE_STALE_S`); its writes are refused."""


class ModelFileChanged(BadInput):
    """A model file's bytes differ from the sha256 its campaign recorded (overwritten or edited)."""


class JobAlreadyDone(ValueError):
    """A result or a start for a job that already has its result (a result is final)."""


def atoms_geometry_hash(atoms: Atoms) -> str:
    """The geometry hash the database uses: numbers, positions/cell rounded to 1e-6 Å, pbc."""
    return geometry_hash(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)


class CampaignStore:
    """Read and write one campaign database.

    `url` is any SQLAlchemy URL. With `create=True` a missing or empty database is created with the
    current schema; with `create=False` (e.g. `nft status`) it must already exist. Opening a
    database of another schema version, another application's database or a file that is no
    database raises `DatabaseError` with a one-line message naming the file or URL.

    A store opened for one campaign (`CampaignStore.open`) reads only the structures and jobs that
    campaign registered, registers what it adds with that campaign, and alone reads and writes
    models, iterations and the campaign's driver lease. A store opened on the database alone
    (`CampaignStore(url)`, for tools and tests) sees every structure and job and registers nothing.
    """

    def __init__(self, url: str, *, create: bool = True, files_root: str | os.PathLike[str] | None = None) -> None:
        self._engine, self.name, self.migration_note = open_engine(url, create=create)
        self._write_engine = write_engine(self._engine)
        self._campaign_id: int | None = None
        self._campaign_name: str | None = None
        self._lease_id: str | None = None
        self._batch = threading.local()  # the session of this thread's open `transaction()`, if any
        self.files_root = _files_root(self._engine, files_root)

    @classmethod
    def open(
        cls,
        url: str,
        campaign: str,
        config: Mapping[str, Any] | None = None,
        *,
        create: bool = True,
        files_root: str | os.PathLike[str] | None = None,
    ) -> CampaignStore:
        """The database at `url`, opened for campaign `campaign`: its models and iterations.

        With `create=True` a new campaign is created with `config` (an existing one keeps its own);
        with `create=False` the database and the campaign must exist (`UnknownCampaign` otherwise).
        Model files are recorded relative to `files_root` (the campaign's workdir; by default the
        folder of an SQLite file, where the default database lives).
        """
        store = cls(url, create=create, files_root=files_root)
        store._campaign_name = campaign
        try:
            campaign_id = store.ensure_campaign(campaign, config or {}) if create else store.campaign_id(campaign)
            if campaign_id is None:
                raise UnknownCampaign(f"no campaign {campaign!r} in {store.name}")
        except BaseException:
            store.close()
            raise
        store._campaign_id = campaign_id
        return store

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release every connection; the store must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> CampaignStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CampaignStore({self.name!r})"

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for inspection in tests and tools; write through the methods."""
        return self._engine

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run every store call inside the block (in this thread) in one transaction: all of its
        writes are stored or, if the block raises or the process dies, none. Nested blocks join
        the outer one. Used where a partial write would leave the campaign inconsistent, e.g. chunks
        without their jobs or without the iteration that carved them."""
        if getattr(self._batch, "session", None) is not None:
            yield
            return
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            self._check_fence(session)
            self._batch.session = session
            try:
                yield
            finally:
                self._batch.session = None

    # -- campaigns -----------------------------------------------------------------------------

    def ensure_campaign(self, name: str, config: Mapping[str, Any]) -> int:
        """The id of campaign `name`, created with `config` if new (an existing config is kept)."""
        row = CampaignRow(name=name, config=_plain_json(config))
        try:
            with self._write() as session:
                session.add(row)
                session.flush()
                return row.id
        except sa_exc.IntegrityError:
            campaign_id = self.campaign_id(name)
            if campaign_id is None:
                raise
            return campaign_id

    def campaign_id(self, name: str) -> int | None:
        """The id of campaign `name`, or None."""
        with self._read() as session:
            return session.scalar(select(CampaignRow.id).where(CampaignRow.name == name))

    def campaign_config(self, name: str) -> dict[str, Any] | None:
        """The config stored with campaign `name` when it was created, or None."""
        with self._read() as session:
            return session.scalar(select(CampaignRow.config).where(CampaignRow.name == name))

    def campaigns(self) -> list[str]:
        with self._read() as session:
            return list(session.scalars(select(CampaignRow.name).order_by(CampaignRow.id)))

    # -- structures ----------------------------------------------------------------------------

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
        chunk_fields = (parent_id, center_in_parent, center_in_chunk, radius)
        if kind == "chunk" and any(value is None for value in chunk_fields):
            raise ValueError("a chunk needs parent_id, center_in_parent, center_in_chunk and radius")
        if kind != "chunk" and any(value is not None for value in (*chunk_fields, vacuum)):
            raise ValueError(f"a {kind} structure has no parent, centre, radius or vacuum")
        n_atoms = len(atoms)
        if kind == "chunk" and not float(radius) > 0:  # type: ignore[arg-type]
            raise ValueError(f"chunk radius must be positive, not {radius}")
        if kind == "chunk" and not 0 <= int(center_in_chunk) < n_atoms:  # type: ignore[arg-type]
            raise ValueError(f"center_in_chunk {center_in_chunk} is outside a chunk of {n_atoms} atoms")
        digest = atoms_geometry_hash(atoms)
        if kind == "chunk":
            radius = round(float(radius), RADIUS_DECIMALS)  # type: ignore[arg-type]
            identity = _chunk_identity(int(parent_id), int(center_in_parent), radius)  # type: ignore[arg-type]
        else:
            identity = f"{kind}:{digest}"
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

    def _insert_or_find(self, row: Any, existing: Any, refusal: str) -> int:
        """Insert `row` and return its id; when a unique key already holds it (stored by us earlier,
        by another campaign or by a racing writer), the stored row's id. Any other constraint is a
        ValueError starting with `refusal`."""
        try:
            with self._write() as session:
                session.add(row)
                session.flush()
                row_id = row.id
        except sa_exc.IntegrityError as exc:
            with self._read() as session:
                found = session.scalar(existing)
            if found is None:  # another constraint, e.g. an unknown parent or structure id
                raise ValueError(f"{refusal}: {error_reason(exc)}") from exc
            row_id = found
        return int(row_id)

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
            query = self._own_jobs(
                query.join(ReferenceJobRow, ReferenceJobRow.structure_id == StructureRow.id), ordered=False
            ).where(ReferenceJobRow.calculator == calculator)
            if params is not None:
                query = query.where(ReferenceJobRow.params_hash == params_hash(_plain_json(params)))
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
                StructureRow.identity
                == _chunk_identity(int(parent_id), int(center_in_parent), round(float(radius), RADIUS_DECIMALS)),
                ReferenceJobRow.calculator == calculator,
                ReferenceJobRow.params_hash == params_hash(_plain_json(params)),
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
            return int(result.rowcount or 0)

    # -- reference jobs ------------------------------------------------------------------------

    def add_job(self, structure_id: int, calculator: str, params: Mapping[str, Any] | None = None) -> int:
        """Register a pending reference job (or find the stored one, maybe done by another campaign)
        with the campaign and return its id; idempotent per (structure, calculator, params)."""
        plain = _plain_json(params or {})
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
            query = query.join(StructureRow, ReferenceJobRow.structure_id == StructureRow.id).where(
                StructureRow.kind == kind
            )
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
                if holder is not None and _lease_live(holder, utc_now(), stale_after_s):
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
            n_atoms = session.scalar(select(StructureRow.n_atoms).where(StructureRow.id == row.structure_id))
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
                query.values(status="pending", error=None, started_at=None, external_id=None), execution_options={"synchronize_session": False}
            )
            return int(result.rowcount or 0)

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
            query = query.where(ReferenceJobRow.params_hash == params_hash(_plain_json(params)))
        with self._read() as session:
            return [
                (structure_record(structure), result_record(result))
                for structure, result in session.execute(query)
            ]

    # -- models and iterations -----------------------------------------------------------------

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
            row = session.scalar(
                select(ModelRow).where(ModelRow.campaign_id == campaign, ModelRow.iteration == int(iteration))
            )
            if row is None:
                row = ModelRow(campaign_id=campaign, iteration=int(iteration))
                session.add(row)
            row.path = _stored_path(Path(path), self.files_root)
            row.sha256 = digest
            row.metrics = _plain_json(metrics or {})
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

    def best_model(self) -> ModelRecord | None:
        """The model of the iteration with the lowest max δ (later wins ties); the latest if none has δ."""
        campaign = self._campaign()
        scored = (
            select(ModelRow)
            .join(
                IterationRow,
                (IterationRow.campaign_id == ModelRow.campaign_id) & (IterationRow.iteration == ModelRow.iteration),
            )
            .where(ModelRow.campaign_id == campaign)
            .order_by(IterationRow.max_delta, ModelRow.iteration.desc())
            .limit(1)
        )
        latest = (
            select(ModelRow).where(ModelRow.campaign_id == campaign).order_by(ModelRow.iteration.desc()).limit(1)
        )
        with self._read() as session:
            row = session.scalar(scored) or session.scalar(latest)
            return None if row is None else self._model_record(row)

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
            row = session.scalar(
                select(IterationRow).where(
                    IterationRow.campaign_id == campaign, IterationRow.iteration == int(iteration)
                )
            )
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

    # -- status --------------------------------------------------------------------------------

    def summary(self) -> StoreSummary:
        """Counts over the campaign's own structures, jobs, iterations and models (the whole database
        for a store opened on it alone); `reference_atoms` sums the atoms of done reference jobs,
        `reused` counts done jobs another campaign computed."""
        campaign = self._campaign_id
        with self._read() as session:
            jobs = dict.fromkeys(JOB_STATUSES, 0)
            job_statuses = self._own_jobs(select(ReferenceJobRow.status, func.count()), ordered=False)
            for status, count in session.execute(job_statuses.group_by(ReferenceJobRow.status)):
                jobs[status] = int(count)
            kinds = dict.fromkeys(STRUCTURE_KINDS, 0)
            structure_kinds = self._own_structures(select(StructureRow.kind, func.count()), ordered=False)
            for kind, count in session.execute(structure_kinds.group_by(StructureRow.kind)):
                kinds[kind] = int(count)
            reference_atoms = session.scalar(
                self._own_jobs(
                    select(func.coalesce(func.sum(StructureRow.n_atoms), 0)).join(
                        ReferenceJobRow, ReferenceJobRow.structure_id == StructureRow.id
                    ),
                    ordered=False,
                ).where(ReferenceJobRow.status == "done")
            )
            reused = 0
            if campaign is not None:
                reused = session.scalar(
                    self._own_jobs(select(func.count()).select_from(ReferenceJobRow), ordered=False).where(
                        ReferenceJobRow.status == "done", CampaignJobRow.reused.is_(True)
                    )
                )
            iterations = select(func.count()).select_from(IterationRow)
            models = select(func.count()).select_from(ModelRow)
            if campaign is not None:
                iterations = iterations.where(IterationRow.campaign_id == campaign)
                models = models.where(ModelRow.campaign_id == campaign)
            iteration_count = session.scalar(iterations)
            model_count = session.scalar(models)
        return StoreSummary(
            jobs=jobs,
            targets=kinds["target"],
            initial=kinds["initial"],
            chunks=kinds["chunk"],
            reference_atoms=int(reference_atoms or 0),
            iterations=int(iteration_count or 0),
            models=int(model_count or 0),
            reused=int(reused or 0),
        )

    # -- the driver lease ----------------------------------------------------------------------

    def acquire_lease(
        self,
        owner: str,
        stale_after_s: float = LEASE_STALE_S,
        owner_is_gone: Callable[[str], bool] = lambda owner: False,
    ) -> str | None:
        """Take the campaign's driver lease for `owner` (e.g. host:pid), compare-and-set; returns the
        owner of a stale lease taken over (no heartbeat for `stale_after_s`, or `owner_is_gone`), else
        None. A live lease of another driver raises `CampaignBusy`. This store's later writes are
        refused (`LeaseLost`) once another driver takes the lease over."""
        campaign = self._campaign()
        lease_id = secrets.token_hex(16)
        now = utc_now()
        with self._write(fenced=False) as session:
            row = session.get(CampaignRow, campaign, with_for_update=True)
            previous = row.lease_owner if row.lease_id is not None else None
            if previous is not None and _lease_live(row, now, stale_after_s) and not owner_is_gone(previous):
                heartbeat = (now - _aware(row.lease_heartbeat)).total_seconds()
                raise CampaignBusy(
                    f"campaign {row.name!r} in {self.name} is being run by {previous} since "
                    f"{_aware(row.lease_since):%Y-%m-%d %H:%M:%S} UTC (last heartbeat {heartbeat:.0f} s ago): "
                    "one driver per campaign; wait for it to end, or stop it"
                )
            row.lease_id, row.lease_owner, row.lease_since, row.lease_heartbeat = lease_id, owner, now, now
        self._lease_id = lease_id
        return previous

    def renew_lease(self) -> bool:
        """Refresh this store's lease heartbeat; False when the lease is no longer ours."""
        campaign = self._campaign()
        with self._write(fenced=False) as session:
            result = session.execute(
                update(CampaignRow)
                .where(CampaignRow.id == campaign, CampaignRow.lease_id == self._lease_id)
                .values(lease_heartbeat=utc_now()),
                execution_options={"synchronize_session": False},
            )
            return bool(result.rowcount)

    def release_lease(self) -> None:
        """Give the lease back (if it is still ours): the next driver need not wait for it to go stale."""
        campaign, lease_id = self._campaign(), self._lease_id
        self._lease_id = None
        if lease_id is None:
            return
        with self._write(fenced=False) as session:
            session.execute(
                update(CampaignRow)
                .where(CampaignRow.id == campaign, CampaignRow.lease_id == lease_id)
                .values(lease_id=None, lease_owner=None, lease_since=None, lease_heartbeat=None),
                execution_options={"synchronize_session": False},
            )

    # -- internals -----------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """A read transaction, or inside `transaction()` its session (which sees its own writes)."""
        batch = getattr(self._batch, "session", None)
        if batch is not None:
            yield batch
            return
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _write(self, fenced: bool = True) -> Iterator[Session]:
        """A write transaction; with a lease held (and `fenced`), refused unless the lease is still ours.
        Inside `transaction()`, a savepoint of its session: a refused write (e.g. a unique key
        already held) undoes only itself, the caller decides."""
        batch = getattr(self._batch, "session", None)
        if batch is not None:
            with batch.begin_nested():
                yield batch
            return
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            if fenced:
                self._check_fence(session)
            yield session

    def _check_fence(self, session: Session) -> None:
        """LeaseLost unless this store's lease (if it holds one) is still the campaign's."""
        if self._lease_id is None:
            return
        holder = session.get(CampaignRow, self._campaign_id)
        if holder is None or holder.lease_id != self._lease_id:
            owner = holder.lease_owner if holder is not None else None
            raise LeaseLost(
                f"campaign {holder.name if holder else self._campaign_id!r}: the driver lease was taken over by "
                f"{owner or 'another driver'} (no heartbeat from this one for {LEASE_STALE_S:.0f} s); this run stops"
            )

    def _own_jobs(self, query: Select, ordered: bool = True) -> Select:
        """`query` (over reference_jobs) limited to the campaign's jobs, in its registration order."""
        if self._campaign_id is None:
            return query.order_by(ReferenceJobRow.id) if ordered else query
        query = query.join(
            CampaignJobRow,
            (CampaignJobRow.job_id == ReferenceJobRow.id) & (CampaignJobRow.campaign_id == self._campaign_id),
        )
        return query.order_by(CampaignJobRow.id) if ordered else query

    def _own_structures(self, query: Select, ordered: bool = True) -> Select:
        """`query` (over structures) limited to the campaign's structures, in its registration order."""
        if self._campaign_id is None:
            return query.order_by(StructureRow.id) if ordered else query
        query = query.join(
            CampaignStructureRow,
            (CampaignStructureRow.structure_id == StructureRow.id)
            & (CampaignStructureRow.campaign_id == self._campaign_id),
        )
        return query.order_by(CampaignStructureRow.id) if ordered else query

    def _register(self, membership: type[CampaignStructureRow] | type[CampaignJobRow], **key: int) -> None:
        """Record that the campaign needs a structure or job (idempotent; nothing without a campaign).
        A job already done by another campaign's driver is recorded as reused."""
        if self._campaign_id is None:
            return
        ((column, value),) = key.items()
        try:
            with self._write() as session:
                exists = session.scalar(
                    select(membership.id).where(
                        membership.campaign_id == self._campaign_id, getattr(membership, column) == value
                    )
                )
                if exists is not None:
                    return
                row = membership(campaign_id=self._campaign_id, **key)
                if membership is CampaignJobRow:
                    job = self._job_row(session, value, lock=False)
                    row.reused = job.status == "done" and job.claimed_by != self._campaign_id
                session.add(row)
        except sa_exc.IntegrityError:  # a racing writer of the same campaign registered it first
            pass

    def _job_row(self, session: Session, job_id: int, lock: bool = True) -> ReferenceJobRow:
        """The job's row; with `lock`, locked for the transaction where the backend locks rows
        (PostgreSQL; an SQLite writer holds the whole file), so a read-check-write is a compare-and-set."""
        row = session.get(ReferenceJobRow, int(job_id), with_for_update=lock)
        if row is None:
            raise KeyError(f"no reference job with id {job_id}")
        return row

    def _campaign(self) -> int:
        """The id of the campaign the store was opened for."""
        if self._campaign_id is None:
            raise ValueError(f"{self.name}: no campaign chosen; open the store with CampaignStore.open(url, campaign)")
        return self._campaign_id


def _aware(moment: datetime) -> datetime:
    """A timestamp as an aware UTC datetime (SQLite hands them back naive)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _lease_live(campaign: CampaignRow, now: datetime, stale_after_s: float) -> bool:
    """Whether the campaign's driver lease is held and had a heartbeat within `stale_after_s`."""
    if campaign.lease_id is None or campaign.lease_heartbeat is None:
        return False
    return (now - _aware(campaign.lease_heartbeat)).total_seconds() < stale_after_s


def _chunk_identity(parent_id: int, center_in_parent: int, radius: float) -> str:
    return f"chunk:{parent_id}:{center_in_parent}:{radius:.{RADIUS_DECIMALS}f}"


def _plain_json(value: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping reduced to plain JSON types (numpy scalars become numbers), so hashes are stable."""
    return json.loads(canonical_json(dict(value)))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (model files are recorded with it)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _final_geometry(
    job_id: int, n_atoms: int, positions: np.ndarray | None, cell: np.ndarray | None
) -> dict[str, bytes | None]:
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


def _files_root(engine: Engine, files_root: str | os.PathLike[str] | None) -> Path | None:
    """The folder model paths are recorded relative to: `files_root`, else an SQLite file's folder."""
    if files_root is not None:
        return Path(files_root).resolve()
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if database and database != ":memory:" and not database.startswith("file:"):
        return Path(database).resolve().parent
    return None


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
