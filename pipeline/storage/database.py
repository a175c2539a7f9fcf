"""The campaign database: the single source of truth of a campaign, written by the driver only.

`CampaignStore(url)` opens (or creates) the database behind any SQLAlchemy URL — SQLite by default,
in WAL mode with foreign keys on — and offers the few operations the NFT loop needs. Every method
runs in its own short transaction, so the driver can write as each future completes and a kill loses
nothing already returned. Structures go in and come out as `ase.Atoms`; everything returned is plain
frozen records, never live ORM objects.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy.exc as sa_exc
from ase import Atoms
from sqlalchemy import Engine, create_engine, event, func, inspect, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from pipeline.errors import BadInput
from pipeline.storage.schema import (
    APPLICATION,
    JOB_STATUSES,
    SCHEMA_VERSION,
    STRUCTURE_KINDS,
    Base,
    CampaignRow,
    IterationRow,
    MetadataRow,
    ModelRow,
    ReferenceJobRow,
    ReferenceResultRow,
    StructureRow,
    canonical_json,
    geometry_hash,
    pack_array,
    params_hash,
    unpack_array,
    utc_now,
)

__all__ = [
    "CampaignStore",
    "DatabaseError",
    "IterationRecord",
    "JobRecord",
    "ModelRecord",
    "ResultRecord",
    "StoreSummary",
    "StructureRecord",
    "atoms_geometry_hash",
    "resolve_database_url",
]

RADIUS_DECIMALS = 6
"""Chunk radii (Å) are rounded to 1e-6 Å so that the same radius from a config always matches."""


class DatabaseError(BadInput):
    """The database cannot be used: missing, not a database, not nft's, or another schema version.

    A `BadInput`, so the CLI exits 2 with the one-line message (it names the file or URL)."""


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


@dataclass(frozen=True)
class ResultRecord:
    job_id: int
    energy: float
    forces: np.ndarray


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


@dataclass(frozen=True)
class StoreSummary:
    """Counts for `nft status`: jobs by status, structures by kind, atoms computed by the parent."""

    jobs: dict[str, int]
    targets: int
    initial: int
    chunks: int
    reference_atoms: int
    iterations: int
    models: int


def atoms_geometry_hash(atoms: Atoms) -> str:
    """The geometry hash the database uses: numbers, positions/cell rounded to 1e-6 Å, pbc."""
    return geometry_hash(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)


def resolve_database_url(url: str, workdir: str | os.PathLike[str]) -> str:
    """A relative SQLite path resolved inside `workdir`; other URLs and absolute paths unchanged."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not _is_sqlite_file(parsed):
        return url
    if Path(parsed.database).is_absolute():
        return url
    path = Path(workdir).resolve() / parsed.database
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def _is_sqlite_file(url: URL) -> bool:
    database = url.database or ""
    return database not in ("", ":memory:") and not database.startswith("file:")


class CampaignStore:
    """Read and write one campaign database.

    `url` is any SQLAlchemy URL. With `create=True` a missing or empty database is created with the
    current schema; with `create=False` (e.g. `nft status`) it must already exist. Opening a
    database of another schema version, another application's database or a file that is no
    database raises `DatabaseError` with a one-line message naming the file or URL.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        try:
            self._url = make_url(url)
        except sa_exc.ArgumentError as exc:
            raise DatabaseError(f"{url}: not a valid database URL") from exc
        self._is_sqlite = self._url.get_backend_name() == "sqlite"
        self.name = self._display_name()
        self._campaign_id: int | None = None
        if self._is_sqlite and _is_sqlite_file(self._url) and not create:
            if not Path(self._url.database).is_file():
                raise DatabaseError(f"{self.name}: no such database file")
        self._engine = self._make_engine()
        self._write_engine = self._engine.execution_options(nft_sqlite_begin="IMMEDIATE")
        try:
            self._open_schema(create)
            self._use_wal()
        except BaseException:
            self._engine.dispose()
            raise

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

    # -- campaigns -----------------------------------------------------------------------------

    def ensure_campaign(self, name: str, config: Mapping[str, Any]) -> int:
        """The id of campaign `name`, created with `config` if new (an existing config is kept).

        The campaign becomes the store's current one, used by the model and iteration methods.
        """
        row = CampaignRow(name=name, config=_plain_json(config))
        try:
            with self._write() as session:
                session.add(row)
                session.flush()
                self._campaign_id = row.id
                return row.id
        except sa_exc.IntegrityError:
            campaign_id = self.campaign_id(name)
            if campaign_id is None:
                raise
            self._campaign_id = campaign_id
            return campaign_id

    def campaign_id(self, name: str) -> int | None:
        """The id of campaign `name`, or None; makes it the current campaign when found."""
        with self._read() as session:
            campaign_id = session.scalar(select(CampaignRow.id).where(CampaignRow.name == name))
        if campaign_id is not None:
            self._campaign_id = campaign_id
        return campaign_id

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
        """Store a structure and return its id; idempotent.

        Targets and initial structures are the same when kind and geometry hash match; a chunk is
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
        try:
            with self._write() as session:
                session.add(row)
                session.flush()
                return row.id
        except sa_exc.IntegrityError as exc:
            # Already stored (by us earlier, or by a racing writer): return the stored one.
            with self._read() as session:
                existing = session.scalar(select(StructureRow.id).where(StructureRow.identity == identity))
            if existing is None:  # another constraint, e.g. an unknown parent_id
                raise ValueError(f"cannot store {kind} structure: {_reason(exc)}") from exc
            return existing

    def structure(self, structure_id: int) -> StructureRecord:
        with self._read() as session:
            row = session.get(StructureRow, structure_id)
            if row is None:
                raise KeyError(f"no structure with id {structure_id}")
            return _structure_record(row)

    def atoms(self, structure_id: int) -> Atoms:
        """The stored geometry of a structure (bit-exact)."""
        return self.structure(structure_id).atoms

    def structures(self, kind: str | None = None) -> list[StructureRecord]:
        """All structures of one kind (or all), in insertion order."""
        query = select(StructureRow).order_by(StructureRow.id)
        if kind is not None:
            query = query.where(StructureRow.kind == kind)
        with self._read() as session:
            return [_structure_record(row) for row in session.scalars(query)]

    def chunk_centers(
        self,
        parent_id: int,
        radius: float,
        calculator: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> set[int]:
        """Central indices (in the parent) of the chunks already carved from a parent at a radius.

        With `calculator` (and `params`), only chunks that have a reference job of that calculator.
        The selection skips these atoms.
        """
        query = select(StructureRow.center_in_parent).where(
            StructureRow.kind == "chunk",
            StructureRow.parent_id == parent_id,
            StructureRow.radius == round(float(radius), RADIUS_DECIMALS),
        )
        if calculator is not None:
            query = query.join(ReferenceJobRow, ReferenceJobRow.structure_id == StructureRow.id).where(
                ReferenceJobRow.calculator == calculator
            )
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
        """The reference job of the chunk (parent, centre, radius Å) with this calculator, or None."""
        query = (
            select(ReferenceJobRow)
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
            return None if row is None else _job_record(row)

    # -- reference jobs ------------------------------------------------------------------------

    def add_job(self, structure_id: int, calculator: str, params: Mapping[str, Any] | None = None) -> int:
        """Register a pending reference job and return its id; idempotent per (structure, calculator, params)."""
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
        try:
            with self._write() as session:
                session.add(row)
                session.flush()
                return row.id
        except sa_exc.IntegrityError as exc:
            query = select(ReferenceJobRow.id).where(
                ReferenceJobRow.structure_id == int(structure_id),
                ReferenceJobRow.calculator == calculator,
                ReferenceJobRow.params_hash == digest,
            )
            with self._read() as session:
                existing = session.scalar(query)
            if existing is None:  # another constraint, e.g. an unknown structure_id
                raise ValueError(f"cannot add a {calculator} job for structure {structure_id}: {_reason(exc)}") from exc
            return existing

    def job(self, job_id: int) -> JobRecord:
        with self._read() as session:
            return _job_record(self._job_row(session, job_id))

    def jobs(self, status: str | None = None, kind: str | None = None) -> list[JobRecord]:
        """Reference jobs, optionally of one status and of one structure kind, oldest first."""
        if status is not None and status not in JOB_STATUSES:
            raise ValueError(f"job status must be one of {JOB_STATUSES}, not {status!r}")
        query = select(ReferenceJobRow).order_by(ReferenceJobRow.id)
        if status is not None:
            query = query.where(ReferenceJobRow.status == status)
        if kind is not None:
            query = query.join(StructureRow, ReferenceJobRow.structure_id == StructureRow.id).where(
                StructureRow.kind == kind
            )
        with self._read() as session:
            return [_job_record(row) for row in session.scalars(query)]

    def mark_running(self, job_id: int, host: str | None = None, external_id: str | None = None) -> None:
        """The job was submitted: status running, one more attempt, start time, host, external id."""
        with self._write() as session:
            row = self._job_row(session, job_id)
            if row.status == "done":
                raise ValueError(f"reference job {job_id} is already done")
            row.status = "running"
            row.attempts += 1
            row.error = None
            row.started_at = utc_now()
            row.finished_at = None
            row.host = host
            row.external_id = None if external_id is None else str(external_id)

    def store_result(
        self,
        job_id: int,
        energy: float,
        forces: np.ndarray,
        wall_time_s: float | None = None,
        host: str | None = None,
        external_id: str | None = None,
    ) -> None:
        """Store energy (eV) and forces (eV/Å) and mark the job done, in one transaction; the
        external id is the batch system's job id (e.g. `SLURM_JOB_ID`) when the job ran under one."""
        with self._write() as session:
            row = self._job_row(session, job_id)
            if row.status == "done":
                raise ValueError(f"reference job {job_id} is already done")
            n_atoms = session.scalar(select(StructureRow.n_atoms).where(StructureRow.id == row.structure_id))
            forces = np.asarray(forces, dtype=np.float64)
            if forces.shape != (n_atoms, 3):
                raise ValueError(f"forces of job {job_id} have shape {forces.shape}, expected ({n_atoms}, 3)")
            session.add(ReferenceResultRow(job_id=row.id, energy=float(energy), forces=pack_array(forces)))
            row.status = "done"
            row.error = None
            row.finished_at = utc_now()
            if wall_time_s is not None:
                row.wall_time_s = float(wall_time_s)
            if host is not None:
                row.host = host
            if external_id is not None:
                row.external_id = str(external_id)

    def mark_failed(self, job_id: int, error: str, wall_time_s: float | None = None) -> None:
        """The job raised: status failed with the error text (a later run may retry it)."""
        with self._write() as session:
            row = self._job_row(session, job_id)
            if row.status == "done":
                raise ValueError(f"reference job {job_id} is already done")
            row.status = "failed"
            row.error = str(error)
            row.finished_at = utc_now()
            if wall_time_s is not None:
                row.wall_time_s = float(wall_time_s)

    def reset_unfinished(self, include_failed: bool = False) -> int:
        """On resume: running jobs (and failed ones if asked) back to pending; returns how many."""
        statuses = ("running", "failed") if include_failed else ("running",)
        with self._write() as session:
            result = session.execute(
                update(ReferenceJobRow)
                .where(ReferenceJobRow.status.in_(statuses))
                .values(status="pending", started_at=None, external_id=None)
            )
            return int(result.rowcount or 0)

    def result(self, job_id: int) -> ResultRecord | None:
        """Energy and forces of a done job, or None."""
        with self._read() as session:
            row = session.get(ReferenceResultRow, job_id)
            return None if row is None else ResultRecord(row.job_id, row.energy, unpack_array(row.forces))

    def labelled_structures(
        self, calculator: str | None = None, params: Mapping[str, Any] | None = None
    ) -> list[tuple[StructureRecord, ResultRecord]]:
        """Initial structures and chunks with a done reference job, and their results, oldest first.

        Optionally only one calculator (and parameters). What a result trains is the campaign's rule.
        """
        query = (
            select(StructureRow, ReferenceResultRow)
            .join(ReferenceJobRow, ReferenceJobRow.structure_id == StructureRow.id)
            .join(ReferenceResultRow, ReferenceResultRow.job_id == ReferenceJobRow.id)
            .where(ReferenceJobRow.status == "done", StructureRow.kind.in_(("initial", "chunk")))
            .order_by(ReferenceJobRow.id)
        )
        if calculator is not None:
            query = query.where(ReferenceJobRow.calculator == calculator)
        if params is not None:
            query = query.where(ReferenceJobRow.params_hash == params_hash(_plain_json(params)))
        with self._read() as session:
            return [
                (_structure_record(structure), ResultRecord(result.job_id, result.energy, unpack_array(result.forces)))
                for structure, result in session.execute(query)
            ]

    # -- models and iterations -----------------------------------------------------------------

    def record_model(
        self,
        iteration: int,
        path: str | os.PathLike[str],
        metrics: Mapping[str, Any] | None = None,
        *,
        campaign_id: int | None = None,
    ) -> int:
        """Record the model file trained in `iteration` with its sha256; replaces that iteration's entry."""
        digest = file_sha256(Path(path))
        campaign = self._current_campaign(campaign_id)
        with self._write() as session:
            row = session.scalar(
                select(ModelRow).where(ModelRow.campaign_id == campaign, ModelRow.iteration == int(iteration))
            )
            if row is None:
                row = ModelRow(campaign_id=campaign, iteration=int(iteration))
                session.add(row)
            row.path = str(path)
            row.sha256 = digest
            row.metrics = _plain_json(metrics or {})
            row.created_at = utc_now()
            session.flush()
            return row.id

    def models(self, *, campaign_id: int | None = None) -> list[ModelRecord]:
        campaign = self._current_campaign(campaign_id)
        query = select(ModelRow).where(ModelRow.campaign_id == campaign).order_by(ModelRow.iteration)
        with self._read() as session:
            return [_model_record(row) for row in session.scalars(query)]

    def best_model(self, *, campaign_id: int | None = None) -> ModelRecord | None:
        """The model of the iteration with the lowest max δ (later wins ties); the latest if none has δ."""
        campaign = self._current_campaign(campaign_id)
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
            return None if row is None else _model_record(row)

    def record_iteration(
        self,
        iteration: int,
        delta_per_target: Mapping[int, float],
        chunks_added: int,
        train_force_mae: float | None = None,
        wall_time: Mapping[str, float] | None = None,
        *,
        max_delta: float | None = None,
        campaign_id: int | None = None,
    ) -> None:
        """Record one iteration: δ (eV/Å) per target structure id, chunks added, training force MAE
        (eV/Å) and the wall-time split in seconds; recording the same iteration again replaces it."""
        deltas = {str(int(key)): float(value) for key, value in delta_per_target.items()}
        if max_delta is None:
            if not deltas:
                raise ValueError("max_delta is needed when delta_per_target is empty")
            max_delta = max(deltas.values())
        campaign = self._current_campaign(campaign_id)
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
            row.train_force_mae = None if train_force_mae is None else float(train_force_mae)
            row.wall_time = {str(key): float(value) for key, value in (wall_time or {}).items()}
            row.created_at = utc_now()

    def iterations(self, *, campaign_id: int | None = None) -> list[IterationRecord]:
        """The campaign's iterations in order."""
        campaign = self._current_campaign(campaign_id)
        query = select(IterationRow).where(IterationRow.campaign_id == campaign).order_by(IterationRow.iteration)
        with self._read() as session:
            return [_iteration_record(row) for row in session.scalars(query)]

    # -- status --------------------------------------------------------------------------------

    def summary(self) -> StoreSummary:
        """Counts over the whole database; `reference_atoms` sums the atoms of done reference jobs."""
        with self._read() as session:
            jobs = dict.fromkeys(JOB_STATUSES, 0)
            for status, count in session.execute(
                select(ReferenceJobRow.status, func.count()).group_by(ReferenceJobRow.status)
            ):
                jobs[status] = int(count)
            kinds = dict.fromkeys(STRUCTURE_KINDS, 0)
            for kind, count in session.execute(
                select(StructureRow.kind, func.count()).group_by(StructureRow.kind)
            ):
                kinds[kind] = int(count)
            reference_atoms = session.scalar(
                select(func.coalesce(func.sum(StructureRow.n_atoms), 0))
                .join(ReferenceJobRow, ReferenceJobRow.structure_id == StructureRow.id)
                .where(ReferenceJobRow.status == "done")
            )
            iterations = session.scalar(select(func.count()).select_from(IterationRow))
            models = session.scalar(select(func.count()).select_from(ModelRow))
        return StoreSummary(
            jobs=jobs,
            targets=kinds["target"],
            initial=kinds["initial"],
            chunks=kinds["chunk"],
            reference_atoms=int(reference_atoms or 0),
            iterations=int(iterations or 0),
            models=int(models or 0),
        )

    # -- internals -----------------------------------------------------------------------------

    def _display_name(self) -> str:
        if self._is_sqlite and _is_sqlite_file(self._url):
            return self._url.database  # type: ignore[return-value]
        return self._url.render_as_string(hide_password=True)

    def _make_engine(self) -> Engine:
        if not self._is_sqlite:
            return create_engine(self._url, pool_pre_ping=True)
        # One connection per transaction for files: nothing to share across threads or a fork.
        options: dict[str, Any] = {"poolclass": NullPool} if _is_sqlite_file(self._url) else {}
        engine = create_engine(self._url, connect_args={"timeout": 30}, **options)

        @event.listens_for(engine, "connect")
        def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("PRAGMA busy_timeout = 30000")
                cursor.execute("PRAGMA foreign_keys = ON")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_sqlite(connection: Any) -> None:
            # Writers take the write lock up front, so a read-then-write never fails on upgrade.
            mode = connection.get_execution_options().get("nft_sqlite_begin", "DEFERRED")
            connection.exec_driver_sql(f"BEGIN {mode}")

        return engine

    def _open_schema(self, create: bool) -> None:
        """Create the schema in an empty database, or check that this is nft's, of our version."""
        begin_mode = "IMMEDIATE" if create else "DEFERRED"
        try:
            with self._engine.connect().execution_options(nft_sqlite_begin=begin_mode) as connection:
                with connection.begin():
                    tables = set(inspect(connection).get_table_names())
                    if not tables:
                        if not create:
                            raise DatabaseError(f"{self.name}: empty database, no nft campaign in it")
                        Base.metadata.create_all(connection)
                        connection.execute(
                            MetadataRow.__table__.insert(),
                            [
                                {"key": "application", "value": APPLICATION},
                                {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                            ],
                        )
                        return
                    if MetadataRow.__tablename__ not in tables:
                        raise DatabaseError(f"{self.name}: not an nft database (no {MetadataRow.__tablename__} table)")
                    facts = {key: value for key, value in connection.execute(select(MetadataRow.key, MetadataRow.value))}
        except sa_exc.SQLAlchemyError as exc:
            raise DatabaseError(f"{self.name}: cannot open as a database ({_reason(exc)})") from exc
        if facts.get("application") != APPLICATION:
            raise DatabaseError(f"{self.name}: not an nft database")
        version = facts.get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise DatabaseError(
                f"{self.name}: nft database schema version {version}, this nft reads version {SCHEMA_VERSION}"
            )

    def _use_wal(self) -> None:
        """Put an SQLite file in WAL mode (persistent in the file): readers never block the writer.

        Done only once the file is known to be ours, so a foreign file is left untouched."""
        if not (self._is_sqlite and _is_sqlite_file(self._url)):
            return
        try:
            with self._engine.connect() as connection:
                raw = connection.connection.driver_connection
                mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    raw.execute("PRAGMA journal_mode = WAL")
        except (sa_exc.SQLAlchemyError, sqlite3.Error) as exc:
            raise DatabaseError(f"{self.name}: cannot switch to WAL mode ({exc})") from exc

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _job_row(self, session: Session, job_id: int) -> ReferenceJobRow:
        row = session.get(ReferenceJobRow, int(job_id))
        if row is None:
            raise KeyError(f"no reference job with id {job_id}")
        return row

    def _current_campaign(self, campaign_id: int | None) -> int:
        if campaign_id is not None:
            return int(campaign_id)
        if self._campaign_id is not None:
            return self._campaign_id
        with self._read() as session:
            ids = list(session.scalars(select(CampaignRow.id).limit(2)))
        if len(ids) != 1:
            raise ValueError(
                f"{self.name}: {'no' if not ids else 'several'} campaigns; call ensure_campaign or campaign_id first"
            )
        self._campaign_id = ids[0]
        return ids[0]


def _utc(moment: datetime | None) -> datetime | None:
    """Timestamps as aware UTC datetimes (SQLite hands them back naive)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


def _reason(exc: sa_exc.SQLAlchemyError) -> str:
    """The driver's one-line message of a SQLAlchemy error (no SQL, no parameters)."""
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


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


def _atoms(row: StructureRow) -> Atoms:
    return Atoms(
        numbers=unpack_array(row.numbers),
        positions=unpack_array(row.positions),
        cell=unpack_array(row.cell),
        pbc=unpack_array(row.pbc),
    )


def _structure_record(row: StructureRow) -> StructureRecord:
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
        created_at=_utc(row.created_at),
    )


def _job_record(row: ReferenceJobRow) -> JobRecord:
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
        created_at=_utc(row.created_at),
        started_at=_utc(row.started_at),
        finished_at=_utc(row.finished_at),
    )


def _model_record(row: ModelRow) -> ModelRecord:
    return ModelRecord(
        id=row.id,
        iteration=row.iteration,
        path=row.path,
        sha256=row.sha256,
        metrics=dict(row.metrics),
        created_at=_utc(row.created_at),
    )


def _iteration_record(row: IterationRow) -> IterationRecord:
    return IterationRecord(
        iteration=row.iteration,
        delta_per_target={int(key): float(value) for key, value in row.delta_per_target.items()},
        max_delta=row.max_delta,
        chunks_added=row.chunks_added,
        train_force_mae=row.train_force_mae,
        wall_time=dict(row.wall_time),
        created_at=_utc(row.created_at),
    )
