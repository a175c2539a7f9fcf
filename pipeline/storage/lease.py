"""The driver lease kept alive: one `nft run` per campaign, whatever host it runs on.

`held_lease(store)` takes the campaign's lease in the database for this process (owner host:pid),
refreshes its heartbeat from a background thread every `HEARTBEAT_S` seconds while the driver runs,
and gives it back on exit. A driver killed outright leaves a lease that the next driver takes over
once it has had no heartbeat for `LEASE_STALE_S` — at once when that driver ran on the same host and
its process is gone. Hosts' clocks must agree to well within `LEASE_STALE_S` (NTP does).

The lease itself is three columns of the campaign's row, taken by compare-and-set (`acquire`),
kept alive (`renew`) and given back (`release`) inside a store's write transaction; `check_fence`
refuses the writes of a driver whose lease was taken over (`LeaseLost`).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy.exc as sa_exc
from sqlalchemy import update
from sqlalchemy.orm import Session

from pipeline.errors import BadInput, RunFailed
from pipeline.storage.engine import rows_changed
from pipeline.storage.schema import CampaignRow, as_utc, utc_now

if TYPE_CHECKING:
    from pipeline.storage.store import CampaignStore

__all__ = [
    "HEARTBEAT_S",
    "LEASE_STALE_S",
    "CampaignBusy",
    "LeaseLost",
    "acquire",
    "check_fence",
    "held_lease",
    "lease_live",
    "release",
    "renew",
    "this_process",
]

LEASE_STALE_S = 60.0
"""A driver lease without a heartbeat for this long (s) is taken over by the next driver."""

HEARTBEAT_S = 5.0
"""Seconds between two heartbeats of a running driver."""


class CampaignBusy(BadInput):
    """Another live driver holds the campaign's lease (exit 2: one line naming it and since when)."""


class LeaseLost(RunFailed):
    """This driver's lease was taken over (no heartbeat for `LEASE_STALE_S`); its writes are refused."""


# ---------------------------------------------------------------------------------------------
# The lease in the database: each function runs inside the caller's write transaction.


def acquire(
    session: Session,
    campaign_id: int,
    owner: str,
    stale_after_s: float,
    owner_is_gone: Callable[[str], bool],
    database: str,
) -> tuple[str, str | None]:
    """Take campaign `campaign_id`'s lease for `owner`, compare-and-set: returns the new lease id and
    the owner of a stale lease taken over (no heartbeat for `stale_after_s`, or `owner_is_gone`), else
    None. A live lease of another driver raises `CampaignBusy` (naming `database`)."""
    lease_id = secrets.token_hex(16)
    now = utc_now()
    row = session.get_one(CampaignRow, campaign_id, with_for_update=True)
    previous = row.lease_owner if row.lease_id is not None else None
    heartbeat = row.lease_heartbeat
    if previous is not None and heartbeat is not None and lease_live(row, now, stale_after_s) and not owner_is_gone(previous):
        age = (now - as_utc(heartbeat)).total_seconds()
        since = as_utc(row.lease_since or heartbeat)
        raise CampaignBusy(
            f"campaign {row.name!r} in {database} is being run by {previous} since "
            f"{since:%Y-%m-%d %H:%M:%S} UTC (last heartbeat {age:.0f} s ago): "
            "one driver per campaign; wait for it to end, or stop it"
        )
    row.lease_id, row.lease_owner, row.lease_since, row.lease_heartbeat = lease_id, owner, now, now
    return lease_id, previous


def renew(session: Session, campaign_id: int, lease_id: str | None) -> bool:
    """Refresh the heartbeat of lease `lease_id`; False when it is no longer the campaign's."""
    result = session.execute(
        update(CampaignRow).where(CampaignRow.id == campaign_id, CampaignRow.lease_id == lease_id).values(lease_heartbeat=utc_now()),
        execution_options={"synchronize_session": False},
    )
    return rows_changed(result) > 0


def release(session: Session, campaign_id: int, lease_id: str) -> None:
    """Clear the campaign's lease if it is still `lease_id`."""
    session.execute(
        update(CampaignRow)
        .where(CampaignRow.id == campaign_id, CampaignRow.lease_id == lease_id)
        .values(lease_id=None, lease_owner=None, lease_since=None, lease_heartbeat=None),
        execution_options={"synchronize_session": False},
    )


def check_fence(session: Session, campaign_id: int | None, lease_id: str | None) -> None:
    """LeaseLost unless `lease_id` (when a store holds one) is still the campaign's."""
    if lease_id is None:
        return
    holder = session.get(CampaignRow, campaign_id)
    if holder is None or holder.lease_id != lease_id:
        owner = holder.lease_owner if holder is not None else None
        raise LeaseLost(
            f"campaign {holder.name if holder else campaign_id!r}: the driver lease was taken over by "
            f"{owner or 'another driver'} (no heartbeat from this one for {LEASE_STALE_S:.0f} s); this run stops"
        )


def lease_live(campaign: CampaignRow, now: datetime, stale_after_s: float) -> bool:
    """Whether the campaign's driver lease is held and had a heartbeat within `stale_after_s`."""
    if campaign.lease_id is None or campaign.lease_heartbeat is None:
        return False
    return (now - as_utc(campaign.lease_heartbeat)).total_seconds() < stale_after_s


# ---------------------------------------------------------------------------------------------
# The lease held by a running driver.


def this_process() -> str:
    """The lease owner name of this process: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_gone(owner: str) -> bool:
    """Whether `owner` (host:pid) is a process of this host that no longer runs."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextmanager
def held_lease(store: CampaignStore, heartbeat_s: float = HEARTBEAT_S) -> Iterator[str | None]:
    """Hold the campaign's driver lease while the block runs; yields the owner of a stale lease that
    was taken over (None if it was free). Raises `CampaignBusy` when another live driver holds it."""
    taken_over = store.acquire_lease(this_process(), LEASE_STALE_S, owner_is_gone)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            try:
                if not store.renew_lease():
                    return  # taken over: the store now refuses this driver's writes
            except sa_exc.SQLAlchemyError:
                continue  # the database is briefly unreachable: try at the next beat

    thread = threading.Thread(target=beat, name="nft-lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield taken_over
    finally:
        stop.set()
        thread.join()
        try:
            store.release_lease()
        except sa_exc.SQLAlchemyError:
            pass  # unreachable now: the lease goes stale and the next driver takes it over
