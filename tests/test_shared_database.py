"""One database, many campaigns, on real SQLite files and a real PostgreSQL server: each campaign
reads only its own structures and jobs, shares results of the same geometry and parent physics,
claims a job by compare-and-set, and holds a driver lease; version-1 and version-2 databases are migrated."""

from __future__ import annotations

import sqlite3
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Octahedron
from sqlalchemy import text

from pipeline.errors import BadInput, RunFailed
from pipeline.storage.engine import DatabaseError
from pipeline.storage.jobs import CLAIMED, ELSEWHERE, JobAlreadyDone
from pipeline.storage.lease import CampaignBusy, LeaseLost, held_lease, owner_is_gone, this_process
from pipeline.storage.schema import SCHEMA_VERSION, pack_array, utc_now
from pipeline.storage.store import CampaignStore

pytestmark = pytest.mark.timeout(180)

EMT = ("emt", {})
V1_SCHEMA = Path(__file__).parent / "data" / "schema_v1_sqlite.sql"
V2_SCHEMA = Path(__file__).parent / "data" / "schema_v2_sqlite.sql"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    """An empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgresql_url")


def particle(seed: int = 0):
    atoms = Octahedron("Pt", 4, 1)
    atoms.rattle(0.05, seed=seed)
    return atoms


def add_chunk(store: CampaignStore, parent_id: int, parent, center: int) -> int:
    chunk = parent[np.flatnonzero(np.linalg.norm(parent.positions - parent.positions[center], axis=1) <= 4.0)]
    center_in_chunk = int(np.argmin(np.linalg.norm(chunk.positions - parent.positions[center], axis=1)))
    return store.add_structure(
        "chunk", chunk, parent_id=parent_id, center_in_parent=center, center_in_chunk=center_in_chunk, radius=4.0, vacuum=4.0
    )


def finish(store: CampaignStore, job_id: int) -> None:
    n_atoms = store.structure(store.job(job_id).structure_id).n_atoms
    store.store_result(job_id, -1.0, np.full((n_atoms, 3), 0.5))


def test_each_campaign_reads_only_its_own_and_reuses_shared_results(database_url: str):
    target = particle()
    with CampaignStore.open(database_url, "a", {}) as a, CampaignStore.open(database_url, "b", {}) as b:
        a_target, b_target = a.add_structure("target", target), b.add_structure("target", target)
        assert a_target == b_target, "the same geometry is one shared row"
        a_shared = a.add_job(add_chunk(a, a_target, target, 7), *EMT)
        a_own = a.add_job(add_chunk(a, a_target, target, 3), *EMT)
        assert a.claim_job(a_shared) == CLAIMED
        finish(a, a_shared)
        finish(a, a_own)
        b_only = b.add_job(add_chunk(b, b_target, target, 9), *EMT)
        assert b.add_job(add_chunk(b, b_target, target, 7), *EMT) == a_shared, "same chunk, same physics: one job"
        assert b.claim_job(a_shared) == "done", "a done job is never computed again"
        assert b.claim_job(b_only) == CLAIMED

        assert a.chunk_centers(a_target, 4.0) == {7, 3} and b.chunk_centers(b_target, 4.0) == {9, 7}
        assert [s.center_in_parent for s, _ in a.labelled_structures(*EMT)] == [7, 3]
        assert [s.center_in_parent for s, _ in b.labelled_structures(*EMT)] == [7], "b's own, a's result reused"
        assert [job.id for job in b.jobs()] == [b_only, a_shared], "b's jobs in the order b registered them"
        a_counts, b_counts = a.summary(), b.summary()
        assert (a_counts.chunks, a_counts.jobs["done"], a_counts.reused) == (2, 2, 0)
        assert (b_counts.chunks, b_counts.jobs["done"], b_counts.jobs["running"], b_counts.reused) == (2, 1, 1, 1)
        assert a.reset_unfinished() == 0, "b's running job is b's driver's"
        assert b.reset_unfinished() == 1 and b.job(b_only).status == "pending"
        with CampaignStore(database_url, create=False) as whole:
            assert whole.summary().chunks == 3 and len(whole.jobs()) == 3


def test_a_result_stored_while_another_campaign_waits_counts_as_reused_by_it(database_url: str):
    with CampaignStore.open(database_url, "a", {}) as a, CampaignStore.open(database_url, "b", {}) as b:
        a.acquire_lease("host-a:1")
        cell = bulk("Pt", "fcc", 3.92)
        job_id = a.add_job(a.add_structure("initial", cell), *EMT)
        assert b.add_job(b.add_structure("initial", cell), *EMT) == job_id
        assert a.claim_job(job_id) == CLAIMED
        assert b.claim_job(job_id) == ELSEWHERE, "a's live driver computes it: b waits"
        finish(a, job_id)
        assert b.claim_job(job_id) == "done"
        assert (a.summary().reused, b.summary().reused) == (0, 1)


def test_a_job_is_claimed_once_and_a_dead_drivers_job_is_taken_over(database_url: str):
    cell = bulk("Pt", "fcc", 3.92)
    stores = [CampaignStore.open(database_url, name, {}) for name in "abcdefgh"]
    try:
        for number, store in enumerate(stores):
            store.acquire_lease(f"host:{number}")
        job_id = [store.add_job(store.add_structure("initial", cell), *EMT) for store in stores][0]
        claims: list[str] = []
        threads = [threading.Thread(target=lambda s=store: claims.append(s.claim_job(job_id))) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(claims).count(CLAIMED) == 1 and claims.count(ELSEWHERE) == len(threads) - 1
        assert stores[0].job(job_id).attempts == 1
        holder = next(
            store for store in stores if store.job(job_id).claimed_by == store.campaign_id(store.campaigns()[stores.index(store)])
        )
        other = next(store for store in stores if store is not holder)
        assert other.claim_job(job_id, stale_after_s=0.0) == CLAIMED, "the holder's lease is stale: taken over"
        assert other.job(job_id).attempts == 2
        finish(other, job_id)
        with pytest.raises(JobAlreadyDone, match="already done"):
            finish(holder, job_id)  # the late driver: its result is refused, the first one stays
        holder.mark_failed(job_id, "late failure")
        assert holder.job(job_id).status == "done"
    finally:
        for store in stores:
            store.close()


def test_one_driver_lease_per_campaign(database_url: str):
    with CampaignStore.open(database_url, "a", {}) as first, CampaignStore.open(database_url, "a", {}) as second:
        assert first.acquire_lease("node-1:100") is None
        with pytest.raises(CampaignBusy) as refused:
            second.acquire_lease("node-2:200")
        message = str(refused.value)
        assert "\n" not in message and "node-1:100" in message and " since " in message and isinstance(refused.value, BadInput)
        assert first.renew_lease()
        with first.engine.begin() as connection:  # the first driver stops beating (hung, or killed)
            connection.execute(text("UPDATE campaigns SET lease_heartbeat = :old"), {"old": utc_now() - timedelta(seconds=61)})
        assert second.acquire_lease("node-2:200") == "node-1:100", "a stale lease is taken over"
        assert not first.renew_lease()
        with pytest.raises(LeaseLost) as lost:
            first.add_structure("target", particle())
        assert "node-2:200" in str(lost.value) and isinstance(lost.value, RunFailed)
        second.release_lease()
        with CampaignStore.open(database_url, "b", {}) as other_campaign:
            other_campaign.acquire_lease("node-3:300")  # another campaign's lease is its own
        with held_lease(first) as taken_over:
            assert taken_over is None
            assert first.add_structure("target", particle()) > 0
        assert second.acquire_lease("node-2:200") is None, "released on exit"


def test_a_dead_driver_of_this_host_leaves_no_lease_to_wait_for(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'nft.db'}"
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    gone = f"{this_process().rpartition(':')[0]}:{finished.stdout.strip()}"
    assert owner_is_gone(gone) and not owner_is_gone(this_process()) and not owner_is_gone("elsewhere:1")
    with CampaignStore.open(url, "a", {}) as killed, CampaignStore.open(url, "a", {}) as next_run:
        killed.acquire_lease(gone)
        assert next_run.acquire_lease(this_process(), owner_is_gone=owner_is_gone) == gone


# -- migration from schema version 1 ------------------------------------------------------------


def version_1_database(path: Path, campaigns: tuple[str, ...]) -> None:
    """A version-1 file as nft 8057728 wrote it: one target, two chunks (one done, one running),
    an initial structure with a done job, and an iteration of the first campaign."""
    blobs = lambda atoms: (  # noqa: E731
        pack_array(np.asarray(atoms.numbers, dtype=np.int64)),
        pack_array(atoms.positions),
        pack_array(atoms.cell.array),
        pack_array(np.asarray(atoms.pbc, dtype=bool)),
    )
    target, cell = particle(), bulk("Pt", "fcc", 3.92)
    with sqlite3.connect(path) as raw:
        raw.executescript(V1_SCHEMA.read_text())
        raw.executemany("INSERT INTO nft_metadata VALUES (?, ?)", [("application", "nft"), ("schema_version", "1")])
        for name in campaigns:
            raw.execute("INSERT INTO campaigns (name, config, created_at) VALUES (?, '{}', '2024-01-01 00:00:00')", (name,))
        insert = (
            "INSERT INTO structures (id, kind, identity, geometry_hash, n_atoms, numbers, positions, cell, pbc, parent_id,"
            " center_in_parent, center_in_chunk, radius, vacuum, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,'2024-01-01')"
        )
        raw.execute(insert, (1, "target", "target:t", "t", len(target), *blobs(target), None, None, None, None, None))
        raw.execute(insert, (2, "initial", "initial:i", "i", 1, *blobs(cell), None, None, None, None, None))
        for structure_id, center in ((3, 7), (4, 9)):
            raw.execute(
                insert,
                (
                    structure_id,
                    "chunk",
                    f"chunk:1:{center}:4.000000",
                    f"c{center}",
                    len(target),
                    *blobs(target),
                    1,
                    center,
                    center,
                    4.0,
                    4.0,
                ),
            )
        jobs = [(1, 2, "done"), (2, 3, "done"), (3, 4, "running")]
        for job_id, structure_id, status in jobs:
            raw.execute(
                "INSERT INTO reference_jobs (id, structure_id, calculator, params, params_hash, status, attempts, created_at)"
                " VALUES (?, ?, 'emt', '{}', ?, ?, 1, '2024-01-01')",
                (job_id, structure_id, "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", status),
            )
        raw.execute("INSERT INTO reference_results VALUES (1, -3.0, ?, '2024-01-01')", (pack_array(np.zeros((1, 3))),))
        raw.execute("INSERT INTO reference_results VALUES (2, -9.0, ?, '2024-01-01')", (pack_array(np.ones((len(target), 3))),))
        raw.execute(
            "INSERT INTO iterations (campaign_id, iteration, delta_per_target, max_delta, chunks_added, wall_time, created_at)"
            " VALUES (1, 1, '{\"1\": 0.7}', 0.7, 2, '{}', '2024-01-01')"
        )


def test_a_version_1_database_of_one_campaign_is_migrated_in_place(tmp_path: Path):
    path = tmp_path / "old.db"
    version_1_database(path, ("old",))
    url = f"sqlite:///{path}"
    with CampaignStore.open(url, "old", create=False) as store:
        note = store.migration_note
        assert note is not None and "\n" not in note and f"version 1 to {SCHEMA_VERSION}" in note
        assert [s.kind for s in store.structures()] == ["target", "initial", "chunk", "chunk"]
        assert [s.kind for s, _ in store.labelled_structures(*EMT)] == ["initial", "chunk"]
        assert [record.max_delta for record in store.iterations()] == [0.7]
        assert store.reset_unfinished() == 1, "its interrupted job is its own"
        assert store.summary().jobs == {"pending": 1, "running": 0, "done": 2, "failed": 0}
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT value FROM nft_metadata WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    with CampaignStore.open(url, "old", create=False) as again:
        assert again.migration_note is None
    with CampaignStore.open(url, "new", {}) as newcomer:
        assert newcomer.structures() == [] and newcomer.labelled_structures() == []


def test_a_version_1_database_of_several_campaigns_or_an_unknown_version_is_refused(tmp_path: Path):
    path = tmp_path / "old.db"
    version_1_database(path, ("first", "second"))
    before = path.read_bytes()
    with pytest.raises(DatabaseError) as refused:
        CampaignStore.open(f"sqlite:///{path}", "first", create=False)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "version 1 with 2 campaigns" in message
    assert path.read_bytes() == before
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE nft_metadata SET value = '7' WHERE key = 'schema_version'")
    with pytest.raises(DatabaseError, match=f"schema version 7, this nft reads version {SCHEMA_VERSION}"):
        CampaignStore(f"sqlite:///{path}")


# -- migration from schema version 2 ------------------------------------------------------------


def write_version_2_content(store: CampaignStore) -> tuple[int, int]:
    """A target, a chunk of it with a done job and an iteration, as a version-2 campaign holds them;
    returns (target id, chunk job id)."""
    target = particle()
    target_id = store.add_structure("target", target)
    job_id = store.add_job(add_chunk(store, target_id, target, 3), *EMT)
    finish(store, job_id)
    store.record_iteration(1, {target_id: 0.5}, 1, 0.1, {"total": 1.0})
    return target_id, job_id


def downgrade_to_version_2(url: str) -> None:
    """Make a fresh version-3 database look exactly like version 2 did (on PostgreSQL, where no
    version-2 DDL file is kept): no end-geometry columns, the three-kind check, version 2."""
    from pipeline.storage.engine import open_engine

    engine, _, _ = open_engine(url, create=False)
    try:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE reference_results DROP COLUMN final_positions"))
            connection.execute(text("ALTER TABLE reference_results DROP COLUMN final_cell"))
            connection.execute(text("ALTER TABLE structures DROP CONSTRAINT ck_structure_kind"))
            connection.execute(
                text("ALTER TABLE structures ADD CONSTRAINT ck_structure_kind CHECK (kind IN ('target', 'initial', 'chunk'))")
            )
            connection.execute(text("UPDATE nft_metadata SET value = '2' WHERE key = 'schema_version'"))
    finally:
        engine.dispose()


def version_2_database(database_url: str, tmp_path: Path) -> str:
    """A version-2 database with one campaign's content: on SQLite built from the DDL nft db28e56
    created, on PostgreSQL a fresh database downgraded."""
    if database_url.startswith("sqlite"):
        path = tmp_path / "v2.db"
        with sqlite3.connect(path) as raw:
            raw.executescript(V2_SCHEMA.read_text())
            raw.executemany("INSERT INTO nft_metadata VALUES (?, ?)", [("application", "nft"), ("schema_version", "2")])
        with sqlite3.connect(path) as raw:  # what a version-2 nft wrote: write_version_2_content's rows
            target = particle()
            blobs = (
                pack_array(np.asarray(target.numbers, dtype=np.int64)),
                pack_array(target.positions),
                pack_array(target.cell.array),
                pack_array(np.asarray(target.pbc, dtype=bool)),
            )
            insert = (
                "INSERT INTO structures (id, kind, identity, geometry_hash, n_atoms, numbers, positions, cell, pbc, parent_id,"
                " center_in_parent, center_in_chunk, radius, vacuum, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,'2026-01-01')"
            )
            raw.execute("INSERT INTO campaigns (id, name, config, created_at) VALUES (1, 'old', '{}', '2026-01-01')")
            raw.execute(insert, (1, "target", "target:t", "t", len(target), *blobs, None, None, None, None, None))
            raw.execute(insert, (2, "chunk", "chunk:1:3:4.000000", "c", len(target), *blobs, 1, 3, 3, 4.0, 4.0))
            raw.execute(
                "INSERT INTO campaign_structures (campaign_id, structure_id, created_at) VALUES (1, 1, '2026-01-01'), (1, 2, '2026-01-01')"
            )
            raw.execute(
                "INSERT INTO reference_jobs (id, structure_id, calculator, params, params_hash, status, attempts, created_at, claimed_by)"
                " VALUES (1, 2, 'emt', '{}', '44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a', 'done', 1, '2026-01-01', 1)"
            )
            raw.execute("INSERT INTO campaign_jobs (campaign_id, job_id, reused, created_at) VALUES (1, 1, 0, '2026-01-01')")
            raw.execute("INSERT INTO reference_results VALUES (1, -1.0, ?, '2026-01-01')", (pack_array(np.full((len(target), 3), 0.5)),))
        return f"sqlite:///{path}"
    with CampaignStore.open(database_url, "old", {}) as store:
        write_version_2_content(store)
    downgrade_to_version_2(database_url)
    return database_url


def test_a_version_2_database_is_migrated_and_takes_snapshots_and_end_geometries(database_url: str, tmp_path: Path):
    url = version_2_database(database_url, tmp_path)
    with CampaignStore.open(url, "old", create=False) as store:
        note = store.migration_note
        assert note is not None and "\n" not in note and f"version 2 to {SCHEMA_VERSION}" in note
        assert [s.kind for s in store.structures()] == ["target", "chunk"], "every structure kept, in order"
        [(chunk, result)] = store.labelled_structures(*EMT)
        assert chunk.parent_id == store.structures("target")[0].id
        assert result.energy == -1.0 and np.all(result.forces == 0.5) and result.final_positions is None
        snapshot = particle(seed=5)
        snapshot_id = store.add_structure("snapshot", snapshot)  # the widened check
        add_chunk(store, snapshot_id, snapshot, 2)
        prototype = bulk("Cu", "fcc", 3.7)
        job_id = store.add_job(store.add_structure("prototype", prototype), "emt", {"task": "relax-cell"})
        relaxed_cell = prototype.cell.array * 0.98
        store.store_result(job_id, -0.1, np.zeros((1, 3)), final_positions=prototype.positions * 0.98, final_cell=relaxed_cell)
        stored = store.result(job_id)
        assert np.array_equal(stored.final_cell, relaxed_cell) and stored.final_positions.shape == (1, 3)
        with pytest.raises(Exception):
            store.add_structure("crystal", prototype)  # still checked
    with CampaignStore.open(url, "old", create=False) as again:
        assert again.migration_note is None
        assert [s.kind for s in again.structures()] == ["target", "chunk", "snapshot", "chunk", "prototype"]
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as raw:
            assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
            assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            indexes = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'structures'")}
            assert {"ix_structures_kind", "ix_structures_geometry_hash"} <= indexes
            raw.execute("PRAGMA foreign_keys = ON")
            with pytest.raises(sqlite3.IntegrityError):  # foreign keys still point at the rebuilt table
                raw.execute(
                    "INSERT INTO reference_jobs (structure_id, calculator, params, params_hash, status, attempts, created_at)"
                    " VALUES (999, 'emt', '{}', 'x', 'pending', 0, '2026-01-01')"
                )


def test_an_end_geometry_is_both_or_neither_finite_and_shaped(tmp_path: Path):
    with CampaignStore.open(f"sqlite:///{tmp_path / 'g.db'}", "g", {}) as store:
        cell = bulk("Cu", "fcc", 3.6)
        job_id = store.add_job(store.add_structure("prototype", cell), "emt", {"task": "relax-cell"})
        for positions, final_cell, match in (
            (cell.positions, None, "only one"),
            (np.zeros((2, 3)), cell.cell.array, "shapes"),
            (np.full((1, 3), np.nan), cell.cell.array, "not finite"),
        ):
            with pytest.raises(ValueError, match=match):
                store.store_result(job_id, -0.1, np.zeros((1, 3)), final_positions=positions, final_cell=final_cell)
        assert store.job(job_id).status == "pending", "nothing stored by a refused result"
