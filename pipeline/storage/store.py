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

Each job of the store has its module: the session plumbing and the campaign's view (`session`),
structures and chunk identity (`structures`), the reference-job state machine (`jobs`), models and
iterations (`iterations`), the counts (`summary`), the driver lease and write fencing (`lease`) and
the hashes (`hashing`). This module composes them and holds the campaigns themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy.exc as sa_exc
from sqlalchemy import select

from pipeline.storage import lease
from pipeline.storage.engine import DatabaseError
from pipeline.storage.iterations import IterationStore
from pipeline.storage.jobs import JobStore
from pipeline.storage.schema import CampaignRow, plain_json
from pipeline.storage.structures import StructureStore
from pipeline.storage.summary import SummaryStore

__all__ = ["CampaignStore", "UnknownCampaign"]


class UnknownCampaign(DatabaseError):
    """The database holds no campaign of the name asked for (only when reading, `create=False`)."""


class CampaignStore(StructureStore, JobStore, IterationStore, SummaryStore):
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

    def __repr__(self) -> str:
        return f"CampaignStore({self.name!r})"

    # -- campaigns -----------------------------------------------------------------------------

    def ensure_campaign(self, name: str, config: Mapping[str, Any]) -> int:
        """The id of campaign `name`, created with `config` if new (an existing config is kept)."""
        row = CampaignRow(name=name, config=plain_json(config))
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

    # -- the driver lease (`lease`) -----------------------------------------------------------

    def acquire_lease(
        self,
        owner: str,
        stale_after_s: float = lease.LEASE_STALE_S,
        owner_is_gone: Callable[[str], bool] = lambda owner: False,
    ) -> str | None:
        """Take the campaign's driver lease for `owner` (e.g. host:pid), compare-and-set; returns the
        owner of a stale lease taken over (no heartbeat for `stale_after_s`, or `owner_is_gone`), else
        None. A live lease of another driver raises `CampaignBusy`. This store's later writes are
        refused (`LeaseLost`) once another driver takes the lease over."""
        campaign = self._campaign()
        with self._write(fenced=False) as session:
            lease_id, previous = lease.acquire(session, campaign, owner, stale_after_s, owner_is_gone, self.name)
        self._lease_id = lease_id
        return previous

    def renew_lease(self) -> bool:
        """Refresh this store's lease heartbeat; False when the lease is no longer ours."""
        campaign = self._campaign()
        with self._write(fenced=False) as session:
            return lease.renew(session, campaign, self._lease_id)

    def release_lease(self) -> None:
        """Give the lease back (if it is still ours): the next driver need not wait for it to go stale."""
        campaign, lease_id = self._campaign(), self._lease_id
        self._lease_id = None
        if lease_id is None:
            return
        with self._write(fenced=False) as session:
            lease.release(session, campaign, lease_id)
