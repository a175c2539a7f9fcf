"""The campaign database on real SQLite files: round trips, idempotence, chunk uniqueness, resume,
schema checks, and a second process reading while the driver writes."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy.exc as sa_exc
from ase import Atoms
from ase.build import bulk
from ase.cluster import Octahedron
from sqlalchemy import text
from sqlalchemy.orm import Session

from pipeline.campaign.history import best_model
from pipeline.errors import BadInput
from pipeline.storage.engine import DatabaseError, resolve_database_url
from pipeline.storage.hashing import atoms_geometry_hash
from pipeline.storage.schema import StructureRow, pack_array
from pipeline.storage.store import CampaignStore, UnknownCampaign

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
EMT = ("emt", {})


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nft.db"


@pytest.fixture
def store(db_path: Path):
    with CampaignStore.open(f"sqlite:///{db_path}", "test", {"chunks": {"radius": 8.0}}) as opened:
        yield opened


def rattled_particle(seed: int = 0) -> Atoms:
    atoms = Octahedron("Pt", 4, 1)
    atoms.rattle(0.05, seed=seed)
    return atoms


def triclinic_cell(seed: int = 1) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms = bulk("Pt", "fcc", a=3.92) * (2, 1, 1)
    atoms.set_cell(atoms.cell.array + rng.normal(scale=0.1, size=(3, 3)), scale_atoms=True)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    atoms.pbc = (True, True, False)
    return atoms


def chunk_of(parent: Atoms, center: int, radius: float = 8.0, vacuum: float = 6.0) -> tuple[Atoms, int]:
    """A crude non-periodic chunk (enough for storage tests): atoms within `radius` of `center`."""
    inside = np.flatnonzero(np.linalg.norm(parent.positions - parent.positions[center], axis=1) <= radius)
    chunk = parent[inside]
    chunk.pbc = False
    chunk.center(vacuum=vacuum)
    return chunk, int(np.flatnonzero(inside == center)[0])


def add_chunk(store: CampaignStore, parent_id: int, parent: Atoms, center: int, radius: float = 8.0) -> int:
    chunk, center_in_chunk = chunk_of(parent, center, radius)
    return store.add_structure(
        "chunk",
        chunk,
        parent_id=parent_id,
        center_in_parent=center,
        center_in_chunk=center_in_chunk,
        radius=radius,
        vacuum=6.0,
    )


def test_structures_and_results_round_trip_bit_exact(store: CampaignStore):
    cell = triclinic_cell()
    structure_id = store.add_structure("initial", cell)
    record = store.structure(structure_id)
    assert record.kind == "initial" and record.n_atoms == len(cell)
    assert record.geometry_hash == atoms_geometry_hash(cell)
    back = store.atoms(structure_id)
    assert np.array_equal(back.numbers, cell.numbers)
    assert back.positions.tobytes() == cell.positions.tobytes()
    assert back.cell.array.tobytes() == cell.cell.array.tobytes()
    assert list(back.pbc) == [True, True, False]

    job_id = store.add_job(structure_id, *EMT)
    forces = np.random.default_rng(2).normal(size=(len(cell), 3))
    energy = -12.345678901234567
    store.mark_running(job_id, host="node-1", external_id=4242)
    store.store_result(job_id, energy, forces, wall_time_s=1.5, host="node-1")
    result = store.result(job_id)
    assert result is not None and result.energy == energy
    assert result.forces.dtype == np.float64 and result.forces.tobytes() == forces.tobytes()
    job = store.job(job_id)
    assert (job.status, job.attempts, job.host, job.external_id, job.wall_time_s) == ("done", 1, "node-1", "4242", 1.5)
    assert job.started_at is not None and job.finished_at is not None


def test_adds_are_idempotent(store: CampaignStore):
    particle = rattled_particle()
    target_id = store.add_structure("target", particle)
    assert store.add_structure("target", particle.copy()) == target_id
    moved = particle.copy()
    moved.positions[0, 0] += 1e-3
    assert store.add_structure("target", moved) != target_id
    assert store.add_structure("initial", particle) != target_id, "same geometry, other kind: another row"

    job_id = store.add_job(target_id, "emt", {"asap_cutoff": False, "b": 1})
    assert store.add_job(target_id, "emt", {"b": 1, "asap_cutoff": False}) == job_id, "key order is irrelevant"
    assert store.add_job(target_id, "emt", {"b": np.int64(1), "asap_cutoff": False}) == job_id
    assert store.add_job(target_id, "emt", {"b": 2, "asap_cutoff": False}) != job_id
    assert store.add_job(target_id, "gpaw", {"b": 1, "asap_cutoff": False}) != job_id

    assert store.ensure_campaign("test", {"other": "config"}) == store.campaign_id("test")
    assert store.campaign_config("test") == {"chunks": {"radius": 8.0}}
    assert len(store.structures("target")) == 2 and len(store.jobs()) == 3


def test_same_chunk_cannot_be_stored_twice(store: CampaignStore, db_path: Path):
    parent = rattled_particle()
    parent_id = store.add_structure("target", parent)
    chunk_id = add_chunk(store, parent_id, parent, center=7)
    # The same key with a (slightly) different geometry is still the same chunk.
    chunk, center_in_chunk = chunk_of(parent, 7)
    chunk.positions += 0.01
    again = store.add_structure("chunk", chunk, parent_id=parent_id, center_in_parent=7, center_in_chunk=center_in_chunk, radius=8.0)
    assert again == chunk_id
    assert add_chunk(store, parent_id, parent, center=7, radius=6.0) != chunk_id
    assert add_chunk(store, parent_id, parent, center=8) != chunk_id

    job_id = store.add_job(chunk_id, *EMT)
    assert store.add_job(chunk_id, *EMT) == job_id
    found = store.find_chunk(parent_id, 7, 8.0, *EMT)
    assert found is not None and found.id == job_id and found.structure_id == chunk_id
    assert store.find_chunk(parent_id, 7, 8.0, "gpaw", {}) is None
    assert store.find_chunk(parent_id, 9, 8.0, *EMT) is None
    assert store.chunk_centers(parent_id, 8.0) == {7, 8}
    assert store.chunk_centers(parent_id, 8.0, *EMT) == {7}

    # The unique constraint itself (not only the lookup) forbids a second row for the key.
    with Session(store.engine) as session, pytest.raises(sa_exc.IntegrityError):
        session.add(
            StructureRow(
                kind="chunk",
                identity="bypassing-the-api",
                geometry_hash="x",
                n_atoms=1,
                numbers=pack_array(np.array([78])),
                positions=pack_array(np.zeros((1, 3))),
                cell=pack_array(np.zeros((3, 3))),
                pbc=pack_array(np.zeros(3, dtype=bool)),
                parent_id=parent_id,
                center_in_parent=7,
                center_in_chunk=0,
                radius=8.0,
            )
        )
        session.commit()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT count(*) FROM structures WHERE kind = 'chunk'").fetchone()[0] == 3
        assert raw.execute("SELECT count(*) FROM reference_jobs").fetchone()[0] == 1


def test_racing_writers_store_one_chunk(db_path: Path):
    """Two stores on one file and several threads add the same chunk: one row, one id for all."""
    parent = rattled_particle()
    stores = [CampaignStore(f"sqlite:///{db_path}") for _ in range(2)]
    parent_id = stores[0].add_structure("target", parent)
    ids: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def add(store: CampaignStore) -> None:
        try:
            for _ in range(5):
                chunk_id = add_chunk(store, parent_id, parent, center=3)
                ids.append((chunk_id, store.add_job(chunk_id, *EMT)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(stores[i % 2],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(ids) == 30 and len(set(ids)) == 1
    assert stores[1].summary().chunks == 1 and len(stores[1].jobs()) == 1
    for store in stores:
        store.close()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(store: CampaignStore, db_path: Path):
    with store.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    with sqlite3.connect(db_path) as raw:  # WAL is a property of the file, seen by any client
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="structure 999"):
        store.add_job(999, *EMT)
    with pytest.raises(ValueError, match="FOREIGN KEY"):
        chunk, _ = chunk_of(rattled_particle(), 0)
        store.add_structure("chunk", chunk, parent_id=999, center_in_parent=0, center_in_chunk=0, radius=8.0)


def test_labelled_structures_are_done_initial_and_chunk_results(store: CampaignStore):
    parent = rattled_particle()
    parent_id = store.add_structure("target", parent)
    initial = triclinic_cell()
    initial_job = store.add_job(store.add_structure("initial", initial), *EMT)
    chunk, center_in_chunk = chunk_of(parent, 5)
    chunk_id = store.add_structure("chunk", chunk, parent_id=parent_id, center_in_parent=5, center_in_chunk=center_in_chunk, radius=8.0)
    chunk_job = store.add_job(chunk_id, *EMT)
    pending_chunk_job = store.add_job(add_chunk(store, parent_id, parent, center=9), *EMT)
    target_job = store.add_job(parent_id, *EMT)

    rng = np.random.default_rng(3)
    initial_forces = rng.normal(size=(len(initial), 3))
    chunk_forces = rng.normal(size=(len(chunk), 3))
    store.store_result(initial_job, -3.0, initial_forces)
    store.store_result(chunk_job, -50.0, chunk_forces)
    store.store_result(target_job, -100.0, rng.normal(size=(len(parent), 3)))
    assert store.job(pending_chunk_job).status == "pending"

    labelled = store.labelled_structures()
    assert [structure.kind for structure, _ in labelled] == ["initial", "chunk"], "targets and unfinished jobs are not training data"
    (full, full_result), (carved, carved_result) = labelled
    assert full_result.energy == -3.0 and full_result.forces.tobytes() == initial_forces.tobytes()
    assert carved.id == chunk_id and carved.center_in_chunk == center_in_chunk and carved.parent_id == parent_id
    assert carved_result.forces.tobytes() == chunk_forces.tobytes()
    assert store.labelled_structures(calculator="gpaw") == []


def test_store_result_is_atomic_and_final(store: CampaignStore, db_path: Path):
    cell = triclinic_cell()
    job_id = store.add_job(store.add_structure("initial", cell), *EMT)
    with pytest.raises(ValueError, match="shape"):
        store.store_result(job_id, -1.0, np.zeros((len(cell) + 1, 3)))
    assert store.job(job_id).status == "pending" and store.result(job_id) is None
    store.store_result(job_id, -1.0, np.zeros((len(cell), 3)))
    with pytest.raises(ValueError, match="already done"):
        store.store_result(job_id, -2.0, np.zeros((len(cell), 3)))
    with pytest.raises(ValueError, match="already done"):
        store.mark_running(job_id)
    assert store.result(job_id).energy == -1.0
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT count(*) FROM reference_results").fetchone()[0] == 1


def test_reset_unfinished_puts_running_jobs_back(store: CampaignStore):
    particle = rattled_particle()
    parent_id = store.add_structure("target", particle)
    job_ids = [store.add_job(add_chunk(store, parent_id, particle, center), *EMT) for center in range(4)]
    done, running, failed, pending = job_ids
    for job_id in (done, running, failed):
        store.mark_running(job_id, host="h", external_id="slurm-1")
    chunk_atoms = store.atoms(store.job(done).structure_id)
    store.store_result(done, -1.0, np.zeros((len(chunk_atoms), 3)))
    store.mark_failed(failed, "Traceback ...\nRuntimeError: SCF did not converge")

    assert store.reset_unfinished() == 1
    assert [job.id for job in store.jobs("pending")] == [running, pending]
    assert store.job(running).attempts == 1 and store.job(running).external_id is None
    assert store.job(failed).status == "failed" and "SCF" in store.job(failed).error
    assert store.reset_unfinished(include_failed=True) == 1
    assert store.job(done).status == "done"
    store.mark_running(running)
    assert store.job(running).attempts == 2
    summary = store.summary()
    assert summary.jobs == {"pending": 2, "running": 1, "done": 1, "failed": 0}
    assert summary.chunks == 4 and summary.targets == 1
    assert summary.reference_atoms == len(chunk_atoms)


def test_models_and_iterations(store: CampaignStore, tmp_path: Path):
    targets = [store.add_structure("target", rattled_particle(seed)) for seed in range(2)]
    for iteration, deltas in enumerate([(0.9, 0.5), (0.4, 0.3), (0.6, 0.2)]):
        model = tmp_path / f"model-{iteration}.nft"
        model.write_bytes(os.urandom(1000))
        store.record_model(iteration, model, {"train_force_mae": 0.1 / (iteration + 1)})
        store.record_iteration(
            iteration,
            dict(zip(targets, deltas)),
            chunks_added=3,
            train_force_mae=0.05,
            wall_time={"training": 2.0, "prediction": 0.5, "reference": 4.0, "overhead": 0.1},
        )
    history = store.iterations()
    assert [record.max_delta for record in history] == [0.9, 0.4, 0.6]
    assert history[1].delta_per_target == {targets[0]: 0.4, targets[1]: 0.3}
    assert history[0].wall_time["reference"] == 4.0
    best = best_model(store.models(), store.iterations())
    assert best is not None and best.iteration == 1
    assert best.sha256 == hashlib.sha256(Path(best.path).read_bytes()).hexdigest()

    store.record_iteration(2, {targets[0]: 0.1}, chunks_added=0)  # recorded again after a resume
    assert len(store.iterations()) == 3 and best_model(store.models(), store.iterations()).iteration == 2
    assert store.summary().iterations == 3 and store.summary().models == 3


def test_models_and_iterations_are_those_of_the_campaign_the_store_was_opened_for(store: CampaignStore, db_path: Path):
    """The campaign is chosen when the store is opened; looking up another campaign's id changes nothing."""
    url = f"sqlite:///{db_path}"
    store.record_iteration(1, {}, chunks_added=0, max_delta=0.5)
    with CampaignStore.open(url, "other", {}) as other:
        assert other.iterations() == [] and best_model(other.models(), other.iterations()) is None
        other.record_iteration(1, {}, chunks_added=0, max_delta=0.2)
    assert store.campaign_id("other") is not None
    assert [record.max_delta for record in store.iterations()] == [0.5]
    with CampaignStore.open(url, "other", create=False) as other:
        assert [record.max_delta for record in other.iterations()] == [0.2]

    with pytest.raises(UnknownCampaign) as caught:
        CampaignStore.open(url, "absent", create=False)
    assert str(caught.value) == f"no campaign 'absent' in {db_path}" and isinstance(caught.value, DatabaseError)
    assert store.campaigns() == ["test", "other"]
    with CampaignStore(url, create=False) as unopened, pytest.raises(ValueError, match="CampaignStore.open"):
        unopened.iterations()


def test_version_mismatch_is_refused(db_path: Path):
    CampaignStore(f"sqlite:///{db_path}").close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE nft_metadata SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(DatabaseError) as caught:
        CampaignStore(f"sqlite:///{db_path}")
    message = str(caught.value)
    assert str(db_path) in message and "version 0" in message and "\n" not in message
    assert isinstance(caught.value, BadInput)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"this is a config file, not a database\n" * 20, "cannot open as a database"),
        ("sqlite", "not an nft database"),
    ],
    ids=["text-file", "foreign-sqlite"],
)
def test_foreign_files_are_refused(tmp_path: Path, content, reason):
    path = tmp_path / "other.db"
    if content == "sqlite":
        with sqlite3.connect(path) as raw:
            raw.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(DatabaseError) as caught:
        CampaignStore(f"sqlite:///{path}")
    message = str(caught.value)
    assert str(path) in message and reason in message and "\n" not in message
    assert path.read_bytes() == before


def test_missing_database_is_not_created_when_only_reading(tmp_path: Path):
    path = tmp_path / "absent.db"
    with pytest.raises(DatabaseError, match="no such database file"):
        CampaignStore(f"sqlite:///{path}", create=False)
    assert not path.exists()
    with pytest.raises(DatabaseError, match="absent-dir"):
        CampaignStore(f"sqlite:///{tmp_path / 'absent-dir' / 'nft.db'}")


def test_relative_sqlite_urls_resolve_inside_the_workdir(tmp_path: Path):
    assert resolve_database_url("sqlite:///nft.db", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'nft.db'}"
    assert resolve_database_url("sqlite:////abs/nft.db", tmp_path) == "sqlite:////abs/nft.db"
    assert resolve_database_url("sqlite://", tmp_path) == "sqlite://"
    assert resolve_database_url("postgresql://u:p@host/nft", tmp_path) == "postgresql://u:p@host/nft"


READER = """
import json, sys, time
from pipeline.storage.store import CampaignStore
store = CampaignStore(sys.argv[1], create=False)
deadline = time.monotonic() + float(sys.argv[2])
seen = []
while True:
    summary = store.summary()
    seen.append(summary.jobs["done"])
    assert len(store.labelled_structures()) >= summary.jobs["done"]
    if time.monotonic() > deadline:
        break
print(json.dumps(seen))
"""


def run_reader(url: str, seconds: float) -> list[int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, "-c", READER, url, str(seconds)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_second_process_reads_while_the_driver_writes(store: CampaignStore, db_path: Path):
    url = f"sqlite:///{db_path}"
    cells = [triclinic_cell(seed) for seed in range(40)]
    job_ids = [store.add_job(store.add_structure("initial", cell), *EMT) for cell in cells]

    # An uncommitted write transaction does not block the reader; it sees the committed state.
    with store.engine.connect().execution_options(nft_sqlite_begin="IMMEDIATE") as writer:
        with writer.begin():
            writer.execute(text("UPDATE reference_jobs SET status = 'running'"))
            started = time.monotonic()
            assert run_reader(url, 0.0) == [0]
            assert time.monotonic() - started < 20

    # The driver stores results while the reader polls: the reader only ever sees whole results.
    finished = threading.Event()

    def drive() -> None:
        for job_id, cell in zip(job_ids, cells):
            store.store_result(job_id, -1.0, np.ones((len(cell), 3)))
            time.sleep(0.02)
        finished.set()

    driver = threading.Thread(target=drive)
    driver.start()
    seen = run_reader(url, 1.5)
    driver.join()
    assert finished.is_set()
    assert seen == sorted(seen) and len(seen) > 5
    assert run_reader(url, 0.0) == [len(cells)]


def test_a_result_records_the_batch_job_id_known_only_after_the_run(tmp_path):
    """The Slurm job id of a reference job comes back with its result and is kept with the job."""
    from ase.build import bulk

    store = CampaignStore(f"sqlite:///{tmp_path / 'ids.db'}")
    cell = bulk("Pt", "fcc", 3.92)
    job_id = store.add_job(store.add_structure("initial", cell), "emt", {})
    store.mark_running(job_id)
    store.store_result(job_id, -1.0, np.zeros((1, 3)), wall_time_s=0.1, host="node-7", external_id=77)
    job = store.job(job_id)
    assert (job.status, job.host, job.external_id) == ("done", "node-7", "77")


# ---------------------------------------------------------------------------------------------
# One transaction for what only makes sense together (issue 25, item 6), model files recorded
# relative to the campaign's folder and checked against their sha256 (items 7 and 17).


def _chunk_of(store: CampaignStore, target: int, centre: int) -> int:
    atoms = rattled_particle()
    return store.add_structure("chunk", atoms, parent_id=target, center_in_parent=centre, center_in_chunk=0, radius=6.0)


def test_a_transaction_stores_all_of_its_writes_or_none(store: CampaignStore):
    target = store.add_structure("target", rattled_particle())
    with pytest.raises(RuntimeError, match="cut short"):
        with store.transaction():
            for centre in range(3):
                store.add_job(_chunk_of(store, target, centre), *EMT)
            assert len(store.structures("chunk")) == 3  # the transaction reads its own writes
            raise RuntimeError("cut short")
    assert store.structures("chunk") == [] and store.jobs() == []
    with store.transaction():
        with store.transaction():  # a nested block joins the outer one
            store.add_job(_chunk_of(store, target, 0), *EMT)
        store.add_job(_chunk_of(store, target, 0), *EMT)  # idempotent inside one transaction too
        store.record_iteration(1, {target: 0.5}, chunks_added=1)
    assert len(store.structures("chunk")) == 1 and len(store.jobs()) == 1 and len(store.iterations()) == 1


KILLED_IN_A_TRANSACTION = """
import os, signal, sys
from ase.cluster import Octahedron
from pipeline.storage.store import CampaignStore
with CampaignStore.open(sys.argv[1], "test", {}) as store:
    target = store.add_structure("target", Octahedron("Pt", 4, 1))
    with store.transaction():
        for centre in range(4):
            chunk = store.add_structure("chunk", Octahedron("Pt", 4, 1), parent_id=target, center_in_parent=centre,
                                        center_in_chunk=0, radius=6.0)
            if centre == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: the driver dies between a chunk and its job
            store.add_job(chunk, "emt", {})
"""


def test_a_process_killed_inside_a_transaction_leaves_none_of_it(db_path: Path):
    url = f"sqlite:///{db_path}"
    process = subprocess.run([sys.executable, "-c", KILLED_IN_A_TRANSACTION, url], cwd=REPO, timeout=60)
    assert process.returncode == -9
    with CampaignStore.open(url, "test", create=False) as store:
        assert len(store.structures("target")) == 1
        assert store.structures("chunk") == [] and store.jobs() == []


def test_forgotten_structures_leave_the_campaign_and_come_back_with_their_results(store: CampaignStore, db_path: Path):
    target = store.add_structure("target", rattled_particle())
    chunks = [_chunk_of(store, target, centre) for centre in range(3)]
    jobs = [store.add_job(chunk, *EMT) for chunk in chunks]
    store.store_result(jobs[2], -1.0, np.zeros((len(rattled_particle()), 3)))
    assert store.forget_structures(chunks[1:]) == 2
    assert [record.id for record in store.structures("chunk")] == chunks[:1] and [job.id for job in store.jobs()] == jobs[:1]
    with CampaignStore(f"sqlite:///{db_path}", create=False) as whole:  # the shared rows stay
        assert len(whole.structures("chunk")) == 3
    assert _chunk_of(store, target, 2) == chunks[2] and store.add_job(chunks[2], *EMT) == jobs[2]
    assert store.job(jobs[2]).status == "done"  # carved again: its result is reused, not recomputed


def test_model_paths_are_recorded_relative_to_the_campaign_folder(tmp_path: Path):
    workdir = tmp_path / "a" / "run"
    (workdir / "models").mkdir(parents=True)
    model = workdir / "models" / "iteration-001.nft"
    model.write_bytes(b"model one")
    url = f"sqlite:///{workdir / 'nft.db'}"
    with CampaignStore.open(url, "a", {}, files_root=workdir) as store:
        store.record_model(1, model)
        assert store.models()[0].path == str(model)
    with sqlite3.connect(workdir / "nft.db") as raw:
        assert raw.execute("SELECT path FROM models").fetchall() == [("models/iteration-001.nft",)]
    copy = tmp_path / "b" / "run"
    import shutil

    shutil.copytree(workdir, copy)
    (copy / "models" / "iteration-001.nft").write_bytes(b"model one")  # the copy's own file
    model.write_bytes(b"the original goes on")  # the original campaign trains on
    with CampaignStore.open(f"sqlite:///{copy / 'nft.db'}", "a", create=False, files_root=copy) as store:
        [record] = store.models()
        assert record.path == str(copy / "models" / "iteration-001.nft")
        assert store.model_file(record).read_bytes() == b"model one"


def test_an_absolute_model_path_of_an_older_nft_resolves_to_the_copied_campaigns_file(tmp_path: Path):
    original, copy = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for workdir in (original, copy):
        (workdir / "models").mkdir(parents=True)
        (workdir / "models" / "iteration-001.nft").write_bytes(b"model one")
    url = f"sqlite:///{copy / 'nft.db'}"
    with CampaignStore.open(url, "a", {}, files_root=copy) as store:
        store.record_model(1, copy / "models" / "iteration-001.nft")
    with sqlite3.connect(copy / "nft.db") as raw:  # as an older nft recorded it: the original's absolute path
        raw.execute("UPDATE models SET path = ?", (str(original / "models" / "iteration-001.nft"),))
    with CampaignStore.open(url, "a", create=False, files_root=copy) as store:
        assert store.models()[0].path == str(copy / "models" / "iteration-001.nft")
    (copy / "models" / "iteration-001.nft").unlink()  # no copy of its own: the recorded file
    with CampaignStore.open(url, "a", create=False, files_root=copy) as store:
        assert store.models()[0].path == str(original / "models" / "iteration-001.nft")


def test_a_model_file_that_differs_from_its_recorded_sha256_is_refused_in_one_line(store: CampaignStore, tmp_path: Path):
    from pipeline.storage.iterations import ModelFileChanged

    model = tmp_path / "models" / "iteration-001.nft"
    model.parent.mkdir()
    model.write_bytes(b"campaign test's model")
    store.record_model(1, model)
    [record] = store.models()
    assert store.model_file(record) == model
    model.write_bytes(b"another campaign's model")
    with pytest.raises(ModelFileChanged) as refused:
        store.model_file(record)
    message = str(refused.value)
    assert isinstance(refused.value, BadInput) and "\n" not in message
    assert str(model) in message and "campaign 'test'" in message and "iteration 1" in message
