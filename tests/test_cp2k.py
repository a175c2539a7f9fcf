"""The CP2K parent: real `cp2k_shell` jobs (Debian's cp2k) on clusters of a few Al atoms.

A chunk's forces are −dE/dx, an SCF stopped at `max_scf` fails with its reason, a campaign through
the real Parsl DAG records such chunks failed and trains on the others, and `nft locality` runs
with CP2K. The physics is the cheapest that is still CP2K DFT: a single-zeta MOLOPT basis, coarse
grids, Al (3 valence electrons) and H2 in boxes of 3 Å vacuum; every job stops its `cp2k_shell`.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.units import Hartree

from pipeline.campaign.config import load_config
from pipeline.execution.parents import CP2K_LOG_NAME, ParentConfigError, ReferenceFailed, parent_for
from pipeline.science.structures import atoms_to_payload
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import run_nft
from tests.test_gpaw_campaign import (
    TINY_MODEL,
    aluminium_octahedron,
    aluminium_triangle,
    hydrogen_molecule,
    job_dir,
    wait_until_gone,
    write_gpaw_campaign,
)
from tests.test_gpaw_jobs import _require, mpi_environment, mpiexec_installed, needs_mpiexec  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.cp2k, pytest.mark.timeout(300), pytest.mark.usefixtures("cp2k_installed")]

TINY_CP2K = {"basis_set": "SZV-MOLOPT-SR-GTH", "cutoff_ry": 150, "rel_cutoff_ry": 30}
"""Al3 in 4 s, H2 in 2 s on one core; H2 converges in 2 SCF steps, Al3 (smeared metal) in about 20."""


@pytest.fixture
def cp2k_installed():
    _require(shutil.which("cp2k_shell") is not None, "CP2K is not installed (scripts/setup.sh installs Debian's cp2k)")


def cp2k_energy_in(log: Path) -> float:
    """The total energy (eV) CP2K printed last in its output (it prints Hartree)."""
    found = re.findall(r"ENERGY\| Total FORCE_EVAL \( QS \) energy \S*:\s+(-?\d+\.\d+)", log.read_text())
    return float(found[-1]) * Hartree


def test_execution_options_do_not_change_the_physics_and_bad_options_name_the_field():
    default = parent_for("cp2k")
    launched = parent_for("cp2k", {"ranks": 4, "threads": 2, "launcher": "srun", "command": "cp2k_shell.psmp", "walltime_s": 60})
    assert launched.physics() == default.physics()
    assert parent_for("cp2k", {"cutoff_ry": 300}).physics() != default.physics()
    assert (default.xc, default.basis_set, default.pseudo_potential, default.cutoff_ry) == ("PBE", "DZVP-MOLOPT-SR-GTH", "GTH-PBE", 400.0)
    for options, field in [({"cutoff": 400}, "parent.cp2k.cutoff"), ({"poisson_solver": "fft"}, "parent.cp2k.poisson_solver")]:
        with pytest.raises(ParentConfigError) as raised:
            parent_for("cp2k", options)
        assert raised.value.field == field


def test_a_box_gets_a_non_periodic_poisson_solver_and_a_bulk_cell_its_kpoints(monkeypatch):
    monkeypatch.delenv("PARSL_MPI_PREFIX", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    parent = parent_for("cp2k", {"poisson_solver": "wavelet", "kpt_density": 12.0})
    box = parent.input_template(aluminium_triangle(3, vacuum=3.0))
    assert "PERIODIC NONE" in box and "PSOLVER WAVELET" in box and "KPOINTS" not in box
    assert "ELECTRONIC_TEMPERATURE [K] 1000" in box and "ADDED_MOS -1" in box
    sodium = bulk("Na", "bcc", a=4.23)  # primitive vectors 3.66 Å: 12/3.66 -> 4 k-points each
    assert "SCHEME MONKHORST-PACK 4 4 4" in parent.input_template(sodium) and "POISSON" not in parent.input_template(sodium)
    assert parent_for("cp2k", {"kpts": [2, 1, 1]}).kpts_for(sodium) == (2, 1, 1)
    assert parent.shell_command() == "cp2k_shell"
    assert parent_for("cp2k", {"ranks": 2}).shell_command() == "mpiexec -n 2 cp2k_shell.psmp"


def test_a_chunk_single_point_gives_forces_that_are_minus_the_energy_gradient(tmp_path):
    chunk = aluminium_triangle(3, vacuum=3.0)
    parent = parent_for("cp2k", TINY_CP2K)
    result = parent.run(atoms_to_payload(chunk), str(tmp_path / "centre"))
    forces = np.array(result["forces"])
    assert np.isfinite(result["energy"]) and np.isfinite(forces).all() and np.abs(forces).max() > 0.1
    log = Path(result["log_file"])
    assert log == tmp_path / "centre" / CP2K_LOG_NAME
    assert result["energy"] == pytest.approx(cp2k_energy_in(log), rel=1e-6)  # CP2K's Hartree is not quite ASE's
    assert "PERIODIC NONE" in (tmp_path / "centre" / "cp2k.inp").read_text()  # a non-periodic Poisson solver for a box
    step = 0.01  # Å, along x of atom 1
    energies = []
    for sign in (+1, -1):
        moved = chunk.copy()
        moved.positions[1, 0] += sign * step
        energies.append(parent.run(atoms_to_payload(moved), str(tmp_path / f"moved{sign:+d}"))["energy"])
    assert forces[1, 0] == pytest.approx(-(energies[0] - energies[1]) / (2 * step), abs=0.03)
    assert wait_until_gone(tmp_path, 15.0) == [], "a cp2k_shell outlived its job"


@needs_mpiexec
def test_two_ranks_give_the_one_rank_result(tmp_path):
    payload = atoms_to_payload(aluminium_triangle(3, vacuum=3.0))
    serial = parent_for("cp2k", TINY_CP2K).run(payload, str(tmp_path / "serial"))
    parallel = parent_for("cp2k", {**TINY_CP2K, "ranks": 2}).run(payload, str(tmp_path / "parallel"))
    assert parallel["energy"] == pytest.approx(serial["energy"], abs=1e-6)
    np.testing.assert_allclose(parallel["forces"], serial["forces"], atol=1e-5)
    assert re.search(r"Total number of message passing processes\s+2\n", (tmp_path / "parallel" / CP2K_LOG_NAME).read_text())
    assert wait_until_gone(tmp_path, 15.0) == []  # a killed group may take the kernel a moment


def test_an_scf_stopped_at_max_scf_fails_with_the_reason(tmp_path):
    chunk = aluminium_triangle(3, vacuum=3.0)
    with pytest.raises(ReferenceFailed) as raised:
        parent_for("cp2k", {**TINY_CP2K, "max_scf": 2}).run(atoms_to_payload(chunk), str(tmp_path))
    reason = raised.value.reason
    assert reason.startswith("cp2k: SCF did not converge within max_scf=2 iterations")
    assert f"last lines of {tmp_path / CP2K_LOG_NAME}" in reason
    assert "SCF run NOT converged" in (tmp_path / CP2K_LOG_NAME).read_text()  # CP2K went on; nft did not
    assert "energy" not in json.loads((tmp_path / "nft-result.json").read_text())
    assert wait_until_gone(tmp_path, 15.0) == []  # a killed group may take the kernel a moment


def test_a_job_past_its_walltime_fails_and_leaves_no_cp2k_behind(tmp_path):
    chunk = aluminium_triangle(3, vacuum=3.0)
    with pytest.raises(ReferenceFailed, match=r"^cp2k: timed out after 1.0 s \(walltime_s\)"):
        parent_for("cp2k", {**TINY_CP2K, "max_scf": 500, "eps_scf": 1e-12, "walltime_s": 1.0}).run(atoms_to_payload(chunk), str(tmp_path))
    assert wait_until_gone(tmp_path, 15.0) == []  # the process group was killed; the kernel may take a moment


def test_a_structure_without_a_cell_fails_before_cp2k_starts(tmp_path):
    with pytest.raises(ReferenceFailed, match="full cell"):
        parent_for("cp2k").run(atoms_to_payload(aluminium_triangle(3)), str(tmp_path))
    assert not (tmp_path / CP2K_LOG_NAME).exists()


def test_a_periodic_cell_runs_with_its_kpoints(tmp_path):
    cell = bulk("Al", "fcc", a=4.05) * (1, 1, 2)
    cell.rattle(0.05, seed=1)
    result = parent_for("cp2k", {**TINY_CP2K, "kpts": [3, 3, 2]}).run(atoms_to_payload(cell), str(tmp_path))
    forces = np.array(result["forces"])
    assert "SCHEME MONKHORST-PACK 3 3 2" in (tmp_path / "cp2k.inp").read_text()
    assert np.abs(forces).max() > 0.01 and np.abs(forces.sum(axis=0)).max() < 1e-3  # a rattled cell; Newton's third law


@pytest.mark.slow
def test_a_cp2k_campaign_records_unconverged_chunks_failed_and_trains_on_the_others(tmp_path):
    """max_scf = 8: the H2 chunks converge (2 SCF steps), the metallic Al3 chunks do not (about 20).
    Both targets get chunks in the first iteration; the Al chunks fail with CP2K's reason after a
    retry, the H2 chunks are stored as CP2K printed them and trained on in the second iteration."""
    initial = [hydrogen_molecule(0.70, vacuum=3.0), aluminium_triangle(3, vacuum=3.0)]
    for k, atoms in enumerate(initial):  # labelled in the file (the Al cell would not converge within max_scf)
        labels = parent_for("cp2k", TINY_CP2K).run(atoms_to_payload(atoms), str(tmp_path / f"initial-{k}"))
        atoms.calc = SinglePointCalculator(atoms, energy=labels["energy"], forces=np.array(labels["forces"]))
    config = write_gpaw_campaign(
        tmp_path / "campaign",
        targets=[hydrogen_molecule(0.80), aluminium_triangle(4)],
        initial=initial,
        sections={
            "parent": {"calculator": "cp2k", "cp2k": {**TINY_CP2K, "max_scf": 8, "retries": 1}},
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
    assert leftovers == [], "nft run left processes behind (a cp2k_shell, a worker)"

    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["stop_reason"] == "max_iterations"
    assert summary["history"][0]["chunks_added"] == 5
    assert summary["jobs"]["failed"] == 3 and summary["jobs"]["done"] == 4  # 2 initial + the 2 H2 chunks
    campaign = load_config(config)
    with CampaignStore(campaign.database_url, create=False) as store:
        for job in store.jobs(kind="chunk"):
            directory = job_dir(config, job.id)
            log = directory / CP2K_LOG_NAME
            assert log.is_file(), f"job {job.id} kept no CP2K output"
            if "Al" in store.structure(job.structure_id).atoms.get_chemical_symbols():
                assert job.status == "failed" and job.attempts == 2
                assert "cp2k: SCF did not converge within max_scf=8" in job.error
                assert store.result(job.id) is None
            else:
                assert job.status == "done", job.error
                assert store.result(job.id).energy == pytest.approx(cp2k_energy_in(log), rel=1e-6)  # CP2K's Hartree is not quite ASE's


def test_nft_locality_runs_with_the_cp2k_parent(tmp_path):
    """One sample atom of Al6, one radius: the whole cluster and one 5-atom chunk, both CP2K jobs."""
    structure = tmp_path / "al6.traj"
    write(structure, aluminium_octahedron())
    options = [f"--parent-option={key}={value}" for key, value in TINY_CP2K.items()]
    result = run_nft(
        "locality", structure, "--parent", "cp2k", *options, "--radii", "3.2", "--atoms", 1, "--vacuum", 3.0,
        "--tolerance", 0.5, "--json", "--workdir", tmp_path / "work", timeout=240,
    )  # fmt: skip
    leftovers = wait_until_gone(tmp_path)
    assert result.returncode == 0, result.stderr
    assert leftovers == [], "nft locality left processes behind"
    report = json.loads(result.stdout)
    assert report["calculator"] == "cp2k" and report["parent_options"]["basis_set"] == "SZV-MOLOPT-SR-GTH"
    (row,) = report["radii"]
    assert row["radius"] == 3.2 and row["min_chunk_atoms"] == 5
    assert 0.0 < row["max_force_difference"] < 5.0  # a real, finite central-force difference
    assert len(list((tmp_path / "work").rglob(CP2K_LOG_NAME))) >= 2  # the whole cluster and the chunk
