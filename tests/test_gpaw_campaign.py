"""Campaigns with the GPAW parent: chunk jobs as MPI GPAW runs submitted to the single-node Slurm
cluster through `site_configs/slurm.py`, and a chunk whose SCF cannot converge recorded failed
while the campaign goes on with the others.

The physics is the cheapest that still runs GPAW: LCAO with a single-zeta basis, coarse grid, Al
clusters of a few atoms (3 valence electrons each) and H2.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from pipeline.campaign.config import load_config
from pipeline.campaign.training_set import training_structures
from pipeline.execution.parents import GPAW_LOG_NAME, parent_for
from pipeline.science.structures import atoms_to_payload
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import run_nft, toml_text
from tests.test_gpaw_jobs import gpaw_installed  # noqa: F401  (fixture: skip, or fail in CI, without GPAW)

pytestmark = [pytest.mark.gpaw, pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.usefixtures("gpaw_installed")]

TINY_LCAO = {"mode": "lcao", "basis": "sz(dzp)", "h": 0.3}
TINY_MODEL = {"cutoff": 4.0, "hidden": [3], "ensemble": 2, "epochs": 20, "optimizer": "lbfgs", "lbfgs_steps": 0, "seed": 1}
# select_fraction = 1 makes every atom a candidate and a 2-member ensemble never agrees to 1e-6 eV/Å,
# so the first iteration always carves chunks (chunks.max_per_iteration); the second trains on them and stops.
ALWAYS_SELECT = {"threshold": 1e-6, "select_fraction": 1.0, "max_iterations": 2}


def rattled(symbol: str, positions, seed: int, vacuum: float | None = None) -> Atoms:
    """A small non-periodic cluster, rattled by 0.05 Å; in a box of `vacuum` Å when given (GPAW needs a cell)."""
    atoms = Atoms(symbol * len(positions), positions=positions, pbc=False)
    atoms.positions += np.random.default_rng(seed).normal(0.0, 0.05, size=atoms.positions.shape)
    if vacuum is not None:
        atoms.center(vacuum=vacuum)
    return atoms


def aluminium_octahedron(seed: int = 5) -> Atoms:
    """Al6, edge 2.8 Å: a chunk of radius 3.2 Å holds an atom and its four neighbours, not the fifth vertex."""
    d = 2.8 / np.sqrt(2)
    return rattled("Al", [(d, 0, 0), (-d, 0, 0), (0, d, 0), (0, -d, 0), (0, 0, d), (0, 0, -d)], seed)


def aluminium_triangle(seed: int, vacuum: float | None = None) -> Atoms:
    return rattled("Al", [(0, 0, 0), (2.6, 0, 0), (1.3, 2.25, 0)], seed, vacuum)


def aluminium_tetrahedron(seed: int, vacuum: float | None = None) -> Atoms:
    return rattled("Al", [(0, 0, 0), (2.7, 0, 0), (1.35, 2.34, 0), (1.35, 0.78, 2.2)], seed, vacuum)


def hydrogen_molecule(bond_angstrom: float, vacuum: float | None = None) -> Atoms:
    atoms = Atoms("H2", positions=[(0, 0, 0), (0, 0, bond_angstrom)], pbc=False)
    if vacuum is not None:
        atoms.center(vacuum=vacuum)
    return atoms


def write_gpaw_campaign(directory: Path, targets: list[Atoms], initial: list[Atoms], sections: dict) -> Path:
    """target.traj, initial.traj and config.toml for a GPAW campaign; `sections` adds to the config."""
    directory.mkdir(parents=True, exist_ok=True)
    write(directory / "target.traj", targets)
    write(directory / "initial.traj", initial)
    config = {
        "campaign": {"name": "gpaw-test", "workdir": "run", "database": "sqlite:///nft.db"},
        "data": {"targets": ["target.traj"], "initial": ["initial.traj"]},
        "model": TINY_MODEL,
        "active": ALWAYS_SELECT,
        **sections,
    }
    (directory / "config.toml").write_text(toml_text(config))
    return directory / "config.toml"


def processes_using(directory: Path) -> list[int]:
    """Process ids (Parsl interchange, workers, MPI ranks) whose command line or working directory is
    inside `directory`: what a campaign there started and should have stopped."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(directory) in cmdline or Path(cwd).is_relative_to(directory):
            found.append(int(entry.name))
    return found


def wait_until_gone(directory: Path, timeout_s: float = 30.0) -> list[int]:
    """Wait for the processes using `directory` to end; kill those still there after `timeout_s` and return them."""
    deadline = time.monotonic() + timeout_s
    while processes_using(directory) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = processes_using(directory)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


def gpaw_free_energy_and_forces(log: Path) -> tuple[float, np.ndarray]:
    """The free energy (eV) and the force table (eV/Å, 5 decimals) that GPAW printed last in its text output."""
    text = log.read_text()
    energy = float(re.findall(r"^\s*Free energy:\s+(-?\d+\.\d+)", text, re.MULTILINE)[-1])
    table = text.rsplit("Forces  # eV/Ang", 1)[1]
    rows = re.findall(r"^\|\s*(-?\d+\.\d+)\s*\|\s*(-?\d+\.\d+)\s*\|\s*(-?\d+\.\d+)\s*\|\s*#", table, re.MULTILINE)
    return energy, np.array(rows, dtype=float)


def job_dir(config: Path, job_id: int) -> Path:
    return config.parent / "run" / "jobs" / f"job-{job_id:06d}"


def assert_result_is_what_gpaw_printed(store: CampaignStore, job, directory: Path) -> None:
    """The stored energy and forces of a done job are those in its own GPAW text output."""
    energy, forces = gpaw_free_energy_and_forces(directory / GPAW_LOG_NAME)
    result = store.result(job.id)
    assert result.energy == pytest.approx(energy, abs=2e-6)
    np.testing.assert_allclose(result.forces, forces, atol=1e-5)  # GPAW prints 5 decimals


# ---------------------------------------------------------------------------------------------
# On the Slurm cluster.


def slurm_jobs_under(cluster, directory: Path) -> list[str]:
    """Ids of the cluster's queued or running jobs whose batch script lies inside `directory` (Parsl blocks)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %o"], env=cluster.env(), capture_output=True, text=True, timeout=30, check=False).stdout
    return [line.split()[0] for line in out.splitlines() if len(line.split()) > 1 and str(directory) in line.split(None, 1)[1]]


def completion_records(cluster) -> dict[str, tuple[str, str]]:
    """Ended jobs in the cluster's job-completion log (`sacct -c`): job id -> (job name, state)."""
    out = subprocess.run(
        ["sacct", "-c", "-n", "-P", "-o", "jobid,jobname,state"], env=cluster.env(), capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return {job_id: (name, state) for job_id, name, state in (line.split("|") for line in out.splitlines() if line)}


@pytest.mark.slurm
def test_a_gpaw_campaign_on_the_slurm_cluster_runs_its_chunk_jobs_as_slurm_jobs(slurm_cluster, tmp_path):
    """`nft run --site slurm`: the initial set and two 5-atom chunks computed by 2-rank GPAW runs
    (srun inside a Parsl block), training and prediction in the same block (training_executor =
    "shared": the one node cannot hold two exclusive blocks)."""
    config = write_gpaw_campaign(
        tmp_path / "campaign",
        targets=[aluminium_octahedron()],
        initial=[aluminium_triangle(1, vacuum=3.0), aluminium_tetrahedron(2, vacuum=3.0)],  # unlabelled: GPAW computes them
        sections={
            "parent": {"calculator": "gpaw", "gpaw": {**TINY_LCAO, "ranks": 2}},
            "chunks": {"radius": 3.2, "vacuum": 3.0, "max_per_iteration": 2, "min_separation": 0.0},
            "model": TINY_MODEL,
            "site": {
                "name": "slurm",
                "options": {"partition": slurm_cluster.partition, "walltime": "00:10:00", "training_executor": "shared"},
            },
        },
    )
    try:
        result = run_nft("run", config, "--site", "slurm")
    finally:
        for job_id in slurm_jobs_under(slurm_cluster, tmp_path):
            slurm_cluster.cancel(job_id)
        leftovers = wait_until_gone(tmp_path)
    assert result.returncode == 0, result.stderr
    assert leftovers == [], "nft run left processes behind"
    assert slurm_jobs_under(slurm_cluster, tmp_path) == [], "nft run left Parsl blocks in the queue"

    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["stop_reason"] == "max_iterations"
    assert summary["history"][0]["chunks_added"] == 2 and summary["chunks"] == 2
    campaign = load_config(config)
    with CampaignStore(campaign.database_url, create=False) as store:
        jobs = store.jobs()
        chunks = store.structures("chunk")
        assert len(jobs) == 4 and all(job.status == "done" for job in jobs), [(job.id, job.status, job.error) for job in jobs]
        assert {chunk.id for chunk in chunks} <= {job.structure_id for job in jobs}
        assert [len(chunk.atoms) for chunk in chunks] == [5, 5]
        for job in jobs:
            directory = job_dir(config, job.id)
            assert_result_is_what_gpaw_printed(store, job, directory)
            log = (directory / GPAW_LOG_NAME).read_text()
            assert re.search(r"(domain|band|kpt):\s+2\b", log), f"job {job.id}: GPAW did not run on 2 ranks"
            assert (directory / "launcher.log").read_text().startswith("$ srun ")

    external_ids = {job.external_id for job in jobs}
    assert all(job_id and job_id.isdigit() for job_id in external_ids), external_ids
    deadline = time.monotonic() + 30  # the blocks were cancelled at the end of the run; their records follow
    while not external_ids <= set(completion_records(slurm_cluster)) and time.monotonic() < deadline:
        time.sleep(0.5)
    records = completion_records(slurm_cluster)
    for job_id in external_ids:
        assert job_id in records, f"Slurm job {job_id} is not in the job-completion log"
        assert records[job_id][0].startswith("parsl.reference"), records[job_id]


# ---------------------------------------------------------------------------------------------
# A failure inside a campaign (this machine; no Slurm needed).


def test_a_chunk_whose_scf_cannot_converge_is_recorded_failed_and_the_campaign_goes_on(tmp_path):
    """maxiter = 7: the closed-shell H2 chunks converge (GPAW needs 5 SCF steps), the metallic Al3
    chunks do not (about 10). Both targets get chunks in the first iteration; the Al chunks fail with
    GPAW's reason, the H2 chunks are trained on in the second iteration."""
    limited = {**TINY_LCAO, "maxiter": 7}
    initial = [hydrogen_molecule(0.70, vacuum=3.0), aluminium_triangle(3, vacuum=3.0)]
    for k, atoms in enumerate(initial):  # labelled in the file (the Al cell would not converge within maxiter)
        labels = parent_for("gpaw", TINY_LCAO).run(atoms_to_payload(atoms), str(tmp_path / f"initial-{k}"))
        atoms.calc = SinglePointCalculator(atoms, energy=labels["energy"], forces=np.array(labels["forces"]))
    config = write_gpaw_campaign(
        tmp_path / "campaign",
        targets=[hydrogen_molecule(0.80), aluminium_triangle(4)],
        initial=initial,
        sections={
            "parent": {"calculator": "gpaw", "gpaw": limited},
            "chunks": {"radius": 3.0, "vacuum": 3.0, "max_per_iteration": 5, "min_separation": 0.0},
            "model": TINY_MODEL,
            "site": {"name": "local", "options": {"workers": 2, "worker_init": "export OMP_NUM_THREADS=1"}},
        },
    )
    try:
        result = run_nft("run", config)
    finally:
        leftovers = wait_until_gone(tmp_path)
    assert result.returncode == 0, result.stderr
    assert leftovers == [], "nft run left processes behind"

    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["stop_reason"] == "max_iterations"
    assert summary["history"][0]["chunks_added"] == 5
    assert summary["jobs"]["failed"] == 3 and summary["jobs"]["done"] == 4  # 2 initial + the 2 H2 chunks
    campaign = load_config(config)
    with CampaignStore(campaign.database_url, create=False) as store:
        targets = store.structures("target")
        symbol_of_target = {target.id: target.atoms.get_chemical_symbols()[0] for target in targets}
        chunk_target = {chunk.id: symbol_of_target[chunk.parent_id] for chunk in store.structures("chunk")}
        chunk_jobs = store.jobs(kind="chunk")
        assert sorted(chunk_target[job.structure_id] for job in chunk_jobs) == ["Al"] * 3 + ["H"] * 2
        for job in chunk_jobs:
            directory = job_dir(config, job.id)
            assert (directory / GPAW_LOG_NAME).is_file(), f"job {job.id} kept no GPAW output"
            if chunk_target[job.structure_id] == "Al":
                assert job.status == "failed"
                assert "KohnShamConvergenceError" in job.error and "maxiter=7" in job.error
                assert f"last lines of {directory / GPAW_LOG_NAME}" in job.error
                assert store.result(job.id) is None
            else:
                assert job.status == "done", job.error
                assert_result_is_what_gpaw_printed(store, job, directory)
        trained = training_structures(store, campaign.parent.name, campaign.parent.physics())  # what iteration 2 trained on
        trained_chunks = [item for item in trained if item.energy is None]  # the H2 chunks share their target's environment
        assert len(trained) == 2 + len(trained_chunks)
        assert all(set(item.atoms.get_chemical_symbols()) == {"H"} for item in trained_chunks)
        assert sum(int(item.force_mask.sum()) for item in trained_chunks) == 2, "only the two H2 chunks are trained"

    status = run_nft("status", config, "--json", timeout=120)
    report = json.loads(status.stdout)
    assert report["jobs"]["failed"] == 3
    assert all("gpaw: KohnShamConvergenceError" in job["error"] for job in report["failed_jobs"])
