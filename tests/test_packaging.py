"""The package as a user installs it: `nft --version`, the licence and citation files, and a wheel
that carries the built-in sites."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from pipeline import DISTRIBUTION

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]


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
    assert f"{DISTRIBUTION}-{version(DISTRIBUTION)}.dist-info/licenses/LICENSE" in names


def test_an_installed_wheel_finds_the_local_site_without_the_repository(wheel, tmp_path):
    """Installed (not editable) into a fresh venv whose dependencies come from this one: `--site
    local` resolves inside the installed package and loads, run from a folder outside the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    installed = Path(subprocess.run([python, "-c", purelib], check=True, capture_output=True, text=True).stdout.strip())
    dependencies = subprocess.run([sys.executable, "-c", purelib], check=True, capture_output=True, text=True).stdout.strip()
    (installed / "nft-dependencies.pth").write_text(dependencies + "\n")  # a path line: this venv's editable nft is not loaded
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=120)
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
