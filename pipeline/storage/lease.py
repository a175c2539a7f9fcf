"""The driver lease kept alive: one `nft run` per campaign, whatever host it runs on.

`held_lease(store)` takes the campaign's lease in the database for this process (owner host:pid),
refreshes its heartbeat from a background thread every `HEARTBEAT_S` seconds while the driver runs,
and gives it back on exit. A driver killed outright leaves a lease that the next driver takes over
once it has had no heartbeat for `LEASE_STALE_S` — at once when that driver ran on the same host and
its process is gone. Hosts' clocks must agree to well within `LEASE_STALE_S` (NTP does).
"""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy.exc as sa_exc

from pipeline.storage.store import LEASE_STALE_S, CampaignStore

__all__ = ["HEARTBEAT_S", "LEASE_STALE_S", "held_lease", "this_process"]

HEARTBEAT_S = 5.0
"""Seconds between two heartbeats of a running driver."""


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
