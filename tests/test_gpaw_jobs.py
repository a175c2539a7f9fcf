"""GPAW chunk jobs as MPI runs: 2 ranks through Parsl equal 1 rank run directly; SCF failure and a
crashed launch come back as `ReferenceFailed` with the reason; GPAW's text output stays in the job
directory."""

import importlib.util
import re
import os
import time
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule

from pipeline.execution.apps import make_apps
from pipeline.execution.parents import ReferenceFailed, parent_for
from pipeline.execution.parsl_session import parsl_session
from pipeline.execution.sites import load_site
from pipeline.science.structures import atoms_to_payload

HAVE_GPAW = importlib.util.find_spec("gpaw") is not None
HAVE_MPIEXEC = shutil.which("mpiexec") is not None


def _require(present: bool, reason: str) -> None:
    """Skip without the tool; in CI (``$CI`` set), where scripts/setup.sh installs it, fail instead."""
    if not present:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def gpaw_installed():
    _require(HAVE_GPAW, "GPAW is not installed in this environment (scripts/setup.sh builds it)")


@pytest.fixture
def mpiexec_installed():
    _require(HAVE_MPIEXEC, "no mpiexec on PATH (OpenMPI from scripts/setup.sh)")


needs_gpaw = pytest.mark.usefixtures("gpaw_installed")
needs_mpiexec = pytest.mark.usefixtures("mpiexec_installed")

pytestmark = [pytest.mark.gpaw, pytest.mark.timeout(300)]

TINY_JOBS = {
    "lcao": {"mode": "lcao", "basis": "dzp", "h": 0.2, "convergence": {"energy": 1e-6, "density": 1e-6}},
    "pw": {"mode": "pw", "ecut": 300, "convergence": {"energy": 1e-6, "density": 1e-6}},
}


@pytest.fixture(autouse=True)
def mpi_environment(monkeypatch):
    """What scripts/env.sh sets for OpenMPI in a container run as root."""
    for name, value in {
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
        "GPAW_SETUP_PATH": os.environ.get("GPAW_SETUP_PATH", "/usr/share/gpaw-setups"),
    }.items():
        monkeypatch.setenv(name, os.environ.get(name, value))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("PARSL_MPI_PREFIX", raising=False)


def distorted_water_chunk():
    """A three-atom 'chunk': non-periodic, in a box of vacuum, with forces far from zero."""
    water = molecule("H2O")
    water.positions[1] += (0.15, 0.0, 0.05)
    water.center(vacuum=3.0)
    return water


@needs_gpaw
@needs_mpiexec
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lcao", "pw"])
def test_two_ranks_through_parsl_equal_one_rank_run_directly(tmp_path, mode):
    payload = atoms_to_payload(distorted_water_chunk())
    serial = parent_for("gpaw", {**TINY_JOBS[mode], "ranks": 1}).run(payload, str(tmp_path / "serial"))
    config = load_site("local", tmp_path / "runinfo", {"workers": 1})
    with parsl_session(config):
        apps = make_apps(config)
        parallel = apps.reference_app(parent_for("gpaw", {**TINY_JOBS[mode], "ranks": 2}), payload, str(tmp_path / "parallel")).result(
            timeout=240
        )
    assert abs(parallel["energy"] - serial["energy"]) < 1e-3
    np.testing.assert_allclose(parallel["forces"], serial["forces"], atol=1e-3)
    assert np.abs(serial["forces"]).max() > 0.5  # a real test: the forces are not all zero
    log = Path(parallel["log_file"])
    assert log.parent == tmp_path / "parallel" and log.name == "gpaw.txt"
    text = log.read_text()
    assert "Free energy" in text
    assert re.search(r"(domain|band|kpt):\s+2\b", text), "GPAW did not run on 2 ranks"
    assert "mpiexec -n 2" in (tmp_path / "parallel" / "launcher.log").read_text()


@needs_gpaw
def test_scf_that_cannot_converge_fails_with_the_reason(tmp_path):
    payload = atoms_to_payload(distorted_water_chunk())
    with pytest.raises(ReferenceFailed) as raised:
        parent_for("gpaw", {**TINY_JOBS["lcao"], "maxiter": 1}).run(payload, str(tmp_path))
    reason = raised.value.reason
    assert "KohnShamConvergenceError" in reason and "did not converge within maxiter=1" in reason
    assert "last lines of" in reason and "gpaw.txt" in reason
    assert (tmp_path / "gpaw.txt").exists() and not (tmp_path / "gpaw-result.json").read_text().startswith('{"energy"')


@needs_mpiexec
def test_a_launch_that_crashes_fails_with_the_launchers_message(tmp_path):
    payload = atoms_to_payload(distorted_water_chunk())
    params = {**TINY_JOBS["lcao"], "ranks": 2, "launcher": "mpiexec", "launcher_args": ["--no-such-mpiexec-option"]}
    with pytest.raises(ReferenceFailed, match="exited with code") as raised:
        parent_for("gpaw", params).run(payload, str(tmp_path))
    assert "no-such-mpiexec-option" in raised.value.reason
    assert (tmp_path / "launcher.log").exists()


@needs_gpaw
@needs_mpiexec
def test_a_job_past_its_time_limit_fails_and_leaves_no_ranks_behind(tmp_path):
    payload = atoms_to_payload(distorted_water_chunk())
    with pytest.raises(ReferenceFailed, match="timed out after 0.5 s"):
        parent_for("gpaw", {**TINY_JOBS["pw"], "ranks": 2, "walltime_s": 0.5}).run(payload, str(tmp_path))
    # The process group was killed; on a loaded machine the kernel may take a moment to tear it down.
    deadline = time.monotonic() + 15.0
    while processes_working_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_working_in(tmp_path) == []


def processes_working_in(directory):
    """Process ids whose working directory is `directory` (a job's launcher or ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == Path(directory):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@needs_gpaw
@pytest.mark.slurm
@pytest.mark.slow
def test_two_rank_job_through_the_slurm_site_runs_under_srun(slurm_cluster, tmp_path):
    payload = atoms_to_payload(distorted_water_chunk())
    serial = parent_for("gpaw", {**TINY_JOBS["pw"], "ranks": 1}).run(payload, str(tmp_path / "serial"))
    config = load_site("slurm", tmp_path / "runinfo", {"partition": slurm_cluster.partition, "walltime": "00:10:00"})
    with parsl_session(config):
        apps = make_apps(config)
        parallel = apps.reference_app(parent_for("gpaw", {**TINY_JOBS["pw"], "ranks": 2}), payload, str(tmp_path / "slurm")).result(
            timeout=240
        )
    assert abs(parallel["energy"] - serial["energy"]) < 1e-3
    np.testing.assert_allclose(parallel["forces"], serial["forces"], atol=1e-3)
    assert slurm_cluster.job_state(parallel["external_id"])["JobName"].startswith("parsl.reference")
    assert "srun --ntasks 2" in (tmp_path / "slurm" / "launcher.log").read_text()
    assert re.search(r"(domain|band|kpt):\s+2\b", Path(parallel["log_file"]).read_text())


@needs_gpaw
def test_a_periodic_cell_runs_with_the_kpoint_density(tmp_path):
    from ase.build import bulk

    sodium = bulk("Na", "bcc", a=4.23)  # primitive vectors 3.66 Å: 12/3.66 -> 4 k-points each
    result = parent_for("gpaw", {"mode": "pw", "ecut": 250, "kpt_density": 12}).run(atoms_to_payload(sodium), str(tmp_path))
    assert "Monkhorst-Pack size: [4, 4, 4]" in (tmp_path / "gpaw.txt").read_text()
    assert np.abs(result["forces"]).max() < 1e-3  # every atom is a centre of symmetry
