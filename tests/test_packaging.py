"""The package as a user installs it: `nft --version`, the licence and citation files, and a wheel
that carries the built-in sites."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from ase.io import write

from pipeline import DISTRIBUTION

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
PARSL_SCRIPTS = ("interchange.py", "process_worker_pool.py")
"""Parsl's console scripts, which it starts by name from PATH (nft puts its interpreter's bin first)."""


def test_nft_version_prints_the_installed_distributions_version():
    nft = Path(sys.executable).with_name("nft")
    command = [str(nft)] if nft.exists() else [sys.executable, "-m", "pipeline.cli"]
    done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"nft {version(DISTRIBUTION)}\n"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (DISTRIBUTION, version(DISTRIBUTION)) == (project["name"], project["version"])


def test_the_licence_and_the_citation_name_mit_and_the_paper():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License\n\nCopyright (c) 2026 the nft authors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in licence
    citation = (ROOT / "CITATION.cff").read_text()
    for line in (
        "cff-version: 1.2.0",
        "license: MIT",
        "preferred-citation:",
        "  type: article",
        '  journal: "J. Chem. Phys."',
        "  year: 2022",
        "  volume: 156",
        '  start: "064104"',
        '  doi: "10.1063/5.0079314"',
    ):
        assert f"\n{line}\n" in citation, line
    for given, family in (("Cheng", "Zeng"), ("Xi", "Chen"), ("Andrew A.", "Peterson")):
        assert f"    - given-names: {given}\n      family-names: {family}\n" in citation


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds, from a copy of the sources (no build folder left in the tree)."""
    here = tmp_path_factory.mktemp("wheel")
    source = here / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "pipeline", source / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(here / "dist"), str(source)]
    subprocess.run(build, check=True, capture_output=True, timeout=240)
    (built,) = (here / "dist").glob("*.whl")
    return built


def test_the_wheel_carries_the_built_in_sites_and_the_licence(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    sites = {f"pipeline/execution/site_configs/{name}.py" for name in ("local", "slurm", "slurm_gpu")}
    assert sites <= names
    assert f"{DISTRIBUTION.replace('-', '_')}-{version(DISTRIBUTION)}.dist-info/licenses/LICENSE" in names


def _venv_with_the_wheel(wheel: Path, tmp_path: Path) -> Path:
    """A fresh venv with the wheel installed (not editable) and its dependencies taken from this
    one by a path line, so that the repository's editable nft is not what runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    installed = Path(subprocess.run([python, "-c", PURELIB], check=True, capture_output=True, text=True).stdout.strip())
    dependencies = subprocess.run([sys.executable, "-c", PURELIB], check=True, capture_output=True, text=True).stdout.strip()
    (installed / "nft-dependencies.pth").write_text(dependencies + "\n")  # a path line: this venv's editable nft is not loaded
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=120)
    for script in PARSL_SCRIPTS:  # what installing parsl into that venv would put in its bin, for its interpreter
        source = (Path(sys.executable).parent / script).read_text().split("\n", 1)[1]
        (venv / "bin" / script).write_text(f"#!{python}\n{source}")
        (venv / "bin" / script).chmod(0o755)
    return venv


def test_an_installed_wheel_finds_the_local_site_without_the_repository(wheel, tmp_path):
    """Installed (not editable) into a fresh venv whose dependencies come from this one: `--site
    local` resolves inside the installed package and loads, run from a folder outside the repository."""
    venv = _venv_with_the_wheel(wheel, tmp_path)
    python = venv / "bin" / "python"
    installed = Path(subprocess.run([python, "-c", PURELIB], check=True, capture_output=True, text=True).stdout.strip())
    script = (
        "from pipeline.execution.sites import check_site, site_file, site_names\n"
        "print(site_file('local'))\nprint(','.join(site_names()))\ncheck_site('local', {'workers': 1})\n"
    )
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    local, names = done.stdout.splitlines()
    assert Path(local) == installed / "pipeline" / "execution" / "site_configs" / "local.py"
    assert names == "local,slurm,slurm_gpu"
    done = subprocess.run(
        [venv / "bin" / "nft", "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=120, env={"PATH": "/usr/bin:/bin"}
    )
    assert done.stdout == f"nft {version(DISTRIBUTION)}\n"


def test_an_installed_wheel_runs_a_tiny_campaign_from_outside_the_repository(wheel, tmp_path):
    """The quickstart as a user who ran `pip install <wheel>` meets it: `nft run` on a config that
    names only the files and the EMT parent, from a folder outside the repository, with the
    built-in local site, writes summary.json and a model the installed package loads."""
    from tests.test_default_convergence import rattled_icosahedron
    from pipeline.science.examples import bulk_training_cells, emt_label

    venv = _venv_with_the_wheel(wheel, tmp_path)
    work = tmp_path / "campaign"
    work.mkdir()
    write(work / "target.traj", rattled_icosahedron("Cu", shells=2, rattle_angstrom=0.05))
    write(work / "initial.traj", [emt_label(cell) for cell in bulk_training_cells(6, seed=1, symbol="Cu")])
    (work / "config.toml").write_text(
        '[campaign]\nname = "cu13"\nworkdir = "run"\n\n[data]\ntargets = ["target.traj"]\ninitial = "initial.traj"\n\n'
        '[parent]\ncalculator = "emt"\n\n[active]\nthreshold = 0.3\nmax_iterations = 2\n'
    )
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [venv / "bin" / "nft", "run", "config.toml"], capture_output=True, text=True, cwd=work, timeout=240, env=environment
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert 1 <= len(summary["history"]) <= 2 and summary["chunks"] >= 1
    script = (
        "import sys; from ase.io import read; from pipeline import load_model\n"
        "a = read('target.traj'); a.calc = load_model(sys.argv[1]); print(a.get_forces().shape)"
    )
    loaded = subprocess.run(
        [venv / "bin" / "python", "-c", script, summary["model"]], capture_output=True, text=True, cwd=work, timeout=120, env=environment
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "(13, 3)"
