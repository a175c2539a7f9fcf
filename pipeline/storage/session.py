"""The plumbing every part of `CampaignStore` stands on: the engine, short read and write
transactions (fenced by the driver lease), `transaction()` for writes that go together, and the
campaign's view of the shared rows (which structures and jobs it registered)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import sqlalchemy.exc as sa_exc
from sqlalchemy import Engine, Select, select
from sqlalchemy.orm import Session

from pipeline.storage import lease
from pipeline.storage.engine import error_reason, open_engine, write_engine
from pipeline.storage.schema import (
    CampaignJobRow,
    CampaignStructureRow,
    ReferenceJobRow,
    StructureRow,
)

__all__ = ["StoreSession"]


class StoreSession:
    """A connection to one campaign database, for one campaign or (campaign None) for all of them.

    The base of `CampaignStore` and of its parts (structures, jobs, iterations, summary): they
    read and write only through `_read` and `_write`, and see only the campaign's own rows through
    `_own_structures` and `_own_jobs`."""

    def __init__(self, url: str, *, create: bool = True, files_root: str | os.PathLike[str] | None = None) -> None:
        self._engine, self.name, self.migration_note = open_engine(url, create=create)
        self._write_engine = write_engine(self._engine)
        self._campaign_id: int | None = None
        self._campaign_name: str | None = None
        self._lease_id: str | None = None
        self._batch = threading.local()  # the session of this thread's open `transaction()`, if any
        self.files_root = _files_root(self._engine, files_root)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release every connection; the store must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
            lease.check_fence(session, self._campaign_id, self._lease_id)
            self._batch.session = session
            try:
                yield
            finally:
                self._batch.session = None

    # -- transactions --------------------------------------------------------------------------

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
                lease.check_fence(session, self._campaign_id, self._lease_id)
            yield session

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

    # -- the campaign's view -------------------------------------------------------------------

    def _campaign(self) -> int:
        """The id of the campaign the store was opened for."""
        if self._campaign_id is None:
            raise ValueError(f"{self.name}: no campaign chosen; open the store with CampaignStore.open(url, campaign)")
        return self._campaign_id

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
            (CampaignStructureRow.structure_id == StructureRow.id) & (CampaignStructureRow.campaign_id == self._campaign_id),
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
                    select(membership.id).where(membership.campaign_id == self._campaign_id, getattr(membership, column) == value)
                )
                if exists is not None:
                    return
                row = membership(campaign_id=self._campaign_id, **key)
                if isinstance(row, CampaignJobRow):
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


def _files_root(engine: Engine, files_root: str | os.PathLike[str] | None) -> Path | None:
    """The folder model paths are recorded relative to: `files_root`, else an SQLite file's folder."""
    if files_root is not None:
        return Path(files_root).resolve()
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if database and database != ":memory:" and not database.startswith("file:"):
        return Path(database).resolve().parent
    return None
