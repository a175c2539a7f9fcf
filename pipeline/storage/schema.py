"""Tables of the campaign database (SQLAlchemy 2.x ORM) and the compact codecs for arrays in them.

The schema carries `SCHEMA_VERSION` in the `nft_metadata` table; bump it with any change to the
tables below, since a database of another version is refused rather than silently misread (engine.py
migrates version-2 databases, and version-1 databases of one campaign).

Structures, reference jobs and their results are content-addressed and shared by the campaigns of a
database; `campaign_structures` and `campaign_jobs` say which campaign registered which, so every
query of a campaign reads only its own. Models, iterations and the driver lease are a campaign's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Optional, overload

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 3
APPLICATION = "nft"

STRUCTURE_KINDS = ("target", "initial", "chunk", "snapshot", "prototype")
"""target: what a campaign makes certain; initial: a training cell; chunk: carved around an atom of
its parent; snapshot: a frame of a relaxation that chunks are carved from; prototype: a crystal
before its cell relaxation (the relaxation job's result holds the relaxed geometry)."""
STRUCTURE_KINDS_V2 = ("target", "initial", "chunk")
"""The kinds a version-2 database allows (engine.py widens its check on migration)."""
JOB_STATUSES = ("pending", "running", "done", "failed")

POSITION_DECIMALS = 6
"""Positions and cell are rounded to 1e-6 Å before hashing: equal geometries hash equal."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@overload
def as_utc(moment: datetime) -> datetime: ...
@overload
def as_utc(moment: None) -> None: ...
@overload
def as_utc(moment: datetime | None) -> datetime | None: ...
def as_utc(moment: datetime | None) -> datetime | None:
    """A timestamp read back as an aware UTC datetime (SQLite hands them back naive)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


def pack_array(array: np.ndarray) -> bytes:
    """An array as `.npy` bytes: dtype, shape and values, bit-exact and self-describing."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def unpack_array(blob: bytes) -> np.ndarray:
    """Inverse of `pack_array`."""
    return np.load(io.BytesIO(blob), allow_pickle=False)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, numpy scalars and arrays as plain numbers/lists."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def plain_json(value: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping reduced to plain JSON types (numpy scalars become numbers), so hashes are stable."""
    return json.loads(canonical_json(dict(value)))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def params_hash(params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of calculator parameters (key order does not matter)."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()


def geometry_hash(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> str:
    """sha256 of atomic numbers, positions and cell rounded to 1e-6 Å, and periodicity."""
    scale = 10.0**POSITION_DECIMALS
    digest = hashlib.sha256()
    for array in (
        np.asarray(numbers, dtype=np.int64),
        np.rint(np.asarray(positions, dtype=float) * scale).astype(np.int64),
        np.rint(np.asarray(cell, dtype=float) * scale).astype(np.int64),
        np.asarray(pbc, dtype=np.int64),
    ):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array, dtype="<i8").tobytes())
    return digest.hexdigest()


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    pass


class MetadataRow(Base):
    """Key/value facts about the database itself: `application` = nft, `schema_version`."""

    __tablename__ = "nft_metadata"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class CampaignRow(Base):
    """A campaign, and the lease of the one driver allowed to run it (`lease_id` None: nobody runs it)."""

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    lease_id: Mapped[Optional[str]] = mapped_column(String(64))
    lease_owner: Mapped[Optional[str]] = mapped_column(String(255))
    lease_since: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    lease_heartbeat: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))


class StructureRow(Base):
    """A target, an initial training structure, a chunk carved from a parent structure, a relaxation
    snapshot or a crystal prototype (`STRUCTURE_KINDS`).

    Non-chunks are unique by (kind, geometry hash); chunks by (parent, central index in parent,
    radius Å) — `identity` holds that key so one unique index covers both on every backend.
    """

    __tablename__ = "structures"
    __table_args__ = (
        CheckConstraint(_in("kind", STRUCTURE_KINDS), name="ck_structure_kind"),
        CheckConstraint(
            "(kind = 'chunk') = (parent_id IS NOT NULL AND center_in_parent IS NOT NULL"
            " AND center_in_chunk IS NOT NULL AND radius IS NOT NULL)",
            name="ck_chunk_fields",
        ),
        UniqueConstraint("parent_id", "center_in_parent", "radius", name="uq_chunk"),
        Index("ix_structures_kind", "kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    identity: Mapped[str] = mapped_column(String(128), unique=True)
    geometry_hash: Mapped[str] = mapped_column(String(64), index=True)
    n_atoms: Mapped[int] = mapped_column(Integer)
    numbers: Mapped[bytes] = mapped_column(LargeBinary)
    positions: Mapped[bytes] = mapped_column(LargeBinary)
    cell: Mapped[bytes] = mapped_column(LargeBinary)
    pbc: Mapped[bytes] = mapped_column(LargeBinary)
    parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey("structures.id"))
    center_in_parent: Mapped[Optional[int]] = mapped_column(Integer)
    center_in_chunk: Mapped[Optional[int]] = mapped_column(Integer)
    radius: Mapped[Optional[float]] = mapped_column(Float)
    vacuum: Mapped[Optional[float]] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ReferenceJobRow(Base):
    """One parent-calculator calculation of one structure; unique by (structure, calculator, params)."""

    __tablename__ = "reference_jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="ck_job_status"),
        UniqueConstraint("structure_id", "calculator", "params_hash", name="uq_job"),
        Index("ix_reference_jobs_status", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    structure_id: Mapped[int] = mapped_column(ForeignKey("structures.id"))
    calculator: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    params_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[Optional[str]] = mapped_column(Text)
    host: Mapped[Optional[str]] = mapped_column(String(255))
    wall_time_s: Mapped[Optional[float]] = mapped_column(Float)
    external_id: Mapped[Optional[str]] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    claimed_by: Mapped[Optional[int]] = mapped_column(ForeignKey("campaigns.id"))
    """The campaign whose driver runs (or last ran) the job; None for jobs written outside a campaign."""


class ReferenceResultRow(Base):
    """Energy (eV) and forces (eV/Å, `.npy` bytes) of a finished reference job; for a relaxation
    job also the geometry it ended at (positions and cell, Å), to which energy and forces belong."""

    __tablename__ = "reference_results"

    job_id: Mapped[int] = mapped_column(ForeignKey("reference_jobs.id"), primary_key=True)
    energy: Mapped[float] = mapped_column(Float)
    forces: Mapped[bytes] = mapped_column(LargeBinary)
    final_positions: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    final_cell: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ModelRow(Base):
    """A trained ensemble file of one iteration, with its sha256 and training metrics."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("campaign_id", "iteration", name="uq_model_iteration"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    iteration: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class IterationRow(Base):
    """One NFT iteration: δ per target (eV/Å), chunks added, training force MAE, wall-time split (s).

    `carved` is False when the iteration stopped the campaign before selection (converged,
    max_iterations, patience): its zero chunks then say nothing about what is left to carve.
    """

    __tablename__ = "iterations"
    __table_args__ = (UniqueConstraint("campaign_id", "iteration", name="uq_iteration"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    iteration: Mapped[int] = mapped_column(Integer)
    delta_per_target: Mapped[dict[str, float]] = mapped_column(JSON)
    max_delta: Mapped[float] = mapped_column(Float)
    chunks_added: Mapped[int] = mapped_column(Integer)
    train_force_mae: Mapped[Optional[float]] = mapped_column(Float)
    wall_time: Mapped[dict[str, float]] = mapped_column(JSON)
    carved: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class CampaignStructureRow(Base):
    """Campaign `campaign_id` registered structure `structure_id` (a target, initial structure or chunk)."""

    __tablename__ = "campaign_structures"
    __table_args__ = (UniqueConstraint("campaign_id", "structure_id", name="uq_campaign_structure"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    structure_id: Mapped[int] = mapped_column(ForeignKey("structures.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class CampaignJobRow(Base):
    """Campaign `campaign_id` needs reference job `job_id`; `reused` when another campaign computed it.

    The id orders a campaign's jobs as it registered them (its training rows follow that order)."""

    __tablename__ = "campaign_jobs"
    __table_args__ = (UniqueConstraint("campaign_id", "job_id", name="uq_campaign_job"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    job_id: Mapped[int] = mapped_column(ForeignKey("reference_jobs.id"), index=True)
    reused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
