"""GPAW as scripts/setup.sh builds it: MPI, ScaLAPACK and FFTW enabled, and a 2-rank run that
agrees with the serial one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpaw

VENV_BIN = Path(sys.executable).parent
GPAW = VENV_BIN / "gpaw"

# Serial and parallel runs of the same input, written by rank 0 as JSON (eV, eV/Å).
WATER_SCRIPT = """
import json, sys
from ase.build import molecule
from gpaw import GPAW, PW
from gpaw.mpi import world

mode, out = sys.argv[1], sys.argv[2]
atoms = molecule("H2O")
atoms.positions[1] += (0.05, -0.03, 0.04)  # off equilibrium: forces in every direction
atoms.center(vacuum=2.5)
settings = dict(xc="PBE", txt=out + ".txt", convergence={"energy": 1e-7, "density": 1e-6})
if mode == "pw":
    atoms.calc = GPAW(mode=PW(300), **settings)
else:
    atoms.calc = GPAW(mode="lcao", basis="dzp", h=0.2, parallel={"sl_auto": True}, **settings)
energy = atoms.get_potential_energy()
forces = atoms.get_forces()
if world.rank == 0:
    with open(out, "w") as fh:
        json.dump({"ranks": world.size, "energy": energy, "forces": forces.tolist()}, fh)
"""


def gpaw_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        OMPI_MCA_btl_vader_single_copy_mechanism="none",
    )
    if "GPAW_SETUP_PATH" not in env and Path("/usr/share/gpaw-setups").is_dir():
        env["GPAW_SETUP_PATH"] = "/usr/share/gpaw-setups"
    return env


@pytest.fixture(scope="module")
def gpaw_executable() -> Path:
    if not GPAW.exists():
        reason = f"{GPAW} not found: scripts/setup.sh builds GPAW"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return GPAW


@pytest.mark.timeout(120)
def test_gpaw_info_shows_mpi_scalapack_and_fftw(gpaw_executable):
    info = subprocess.run([str(gpaw_executable), "info"], env=gpaw_env(), capture_output=True, text=True, timeout=100, check=True).stdout
    features = {}
    for line in info.splitlines():
        words = line.split()
        if len(words) >= 2 and words[-1] in {"yes", "no"}:
            features[" ".join(words[:-1])] = words[-1]
    assert features.get("MPI enabled") == "yes", info
    assert features.get("scalapack") == "yes", info
    assert features.get("FFTW") == "yes", info


def run_water(tmp_path: Path, mode: str, ranks: int) -> dict:
    script = tmp_path / "water.py"
    script.write_text(WATER_SCRIPT)
    out = tmp_path / f"{mode}-{ranks}.json"
    command = [str(GPAW), "python", str(script), mode, str(out)]
    if ranks > 1:
        mpiexec = shutil.which("mpiexec")
        assert mpiexec, "mpiexec not found (openmpi-bin, installed by scripts/setup.sh)"
        command = [mpiexec, "-n", str(ranks), *command]
    result = subprocess.run(command, cwd=tmp_path, env=gpaw_env(), capture_output=True, text=True, timeout=280, check=False)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["pw", "lcao"])
def test_two_ranks_agree_with_serial(gpaw_executable, tmp_path, mode):
    """Plane waves (needs ScaLAPACK on >1 rank) and LCAO with ScaLAPACK diagonalisation."""
    serial = run_water(tmp_path, mode, ranks=1)
    parallel = run_water(tmp_path, mode, ranks=2)
    assert (serial["ranks"], parallel["ranks"]) == (1, 2)
    assert abs(parallel["energy"] - serial["energy"]) < 1e-4
    forces_serial, forces_parallel = np.array(serial["forces"]), np.array(parallel["forces"])
    assert np.abs(forces_serial).max() > 0.1  # a real force to compare
    np.testing.assert_allclose(forces_parallel, forces_serial, atol=1e-3, rtol=0)


DATASETS_USED = ("Pt.PBE", "Pt.10.PBE", "Pt.dzp.basis", "Pt.10.dzp.basis", "Al.PBE", "Na.PBE", "H.PBE", "O.PBE")
"""PAW datasets and basis sets of the examples and tests (Pt, Al, Na, H2O)."""


@pytest.mark.timeout(120)
def test_the_datasets_are_the_same_with_or_without_env_sh(gpaw_executable):
    """Without `scripts/env.sh` GPAW reads the gpaw-data wheel's datasets; with it, Debian's
    /usr/share/gpaw-setups: the same content, so a campaign's results do not depend on which."""
    if not Path("/usr/share/gpaw-setups").is_dir():
        pytest.skip("no /usr/share/gpaw-setups (Debian's gpaw-data, scripts/setup.sh installs it)")
    script = (
        "import hashlib, json\n"
        "from gpaw.setup_data import search_for_file\n"
        f"names = {list(DATASETS_USED)!r}\n"
        "found = {name: search_for_file(name) for name in names}\n"
        "print(json.dumps({name: [path, hashlib.sha256(source).hexdigest()] for name, (path, source) in found.items()}))\n"
    )
    without = {key: value for key, value in os.environ.items() if key != "GPAW_SETUP_PATH"}
    runs = {}
    for label, env in (("wheel", without), ("debian", {**without, "GPAW_SETUP_PATH": "/usr/share/gpaw-setups"})):
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        runs[label] = json.loads(result.stdout)
    for name in DATASETS_USED:
        assert runs["debian"][name][0].startswith("/usr/share/gpaw-setups/"), runs["debian"][name]
        assert not runs["wheel"][name][0].startswith("/usr/share/gpaw-setups/"), runs["wheel"][name]
        assert runs["wheel"][name][1] == runs["debian"][name][1], name
