"""`nft locality` from the command line: real EMT reference jobs through a real local Parsl executor.

EMT's force on an atom depends on the atoms within twice its neighbour cutoff (`rc_list`, 5.88 Å
for Pt: the atoms within it, and their neighbours within it), so a chunk of radius > 11.75 Å must
give the whole structure's central force to round-off, and a 4 Å chunk must not.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ase.calculators.emt import EMT
from ase.io import read, write
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.science.examples import rattled_cuboctahedron
from pipeline.science.locality import central_force_locality, locality_sample_atoms
from tests.plugins.campaign_fixtures import write_campaign

pytestmark = pytest.mark.timeout(180)

BEYOND_EMT_REACH_ANGSTROM = 13.0
RADII = [4.0, 6.0, BEYOND_EMT_REACH_ANGSTROM]
SAMPLE_ATOMS = 4
TOLERANCE = 0.1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def nft(*arguments: object):
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


@pytest.fixture(scope="module")
def cluster_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("locality") / "pt260.traj"
    write(path, rattled_cuboctahedron())
    return path


@pytest.fixture(scope="module")
def emt_json(cluster_file, tmp_path_factory):
    """`nft locality --json --plot` on the rattled Pt260 and what it left in its --workdir."""
    here = tmp_path_factory.mktemp("emt-json")
    result = nft(
        "locality",
        cluster_file,
        "--parent",
        "emt",
        "--radii",
        ",".join(map(str, RADII)),
        "--atoms",
        SAMPLE_ATOMS,
        "--tolerance",
        TOLERANCE,
        "--json",
        "--plot",
        here / "locality.png",
        "--workdir",
        here / "work",
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), here


def test_emt_is_exact_beyond_twice_its_cutoff_and_not_at_4_angstrom(emt_json, cluster_file):
    report, _ = emt_json
    atoms = read(cluster_file)
    atoms.calc = calculator = EMT()
    atoms.get_forces()
    assert BEYOND_EMT_REACH_ANGSTROM > 2 * calculator.rc_list + 1.0  # well beyond EMT's reach
    rows = {row["radius"]: row for row in report["radii"]}
    assert rows[BEYOND_EMT_REACH_ANGSTROM]["max_force_difference"] < 1e-6
    assert rows[BEYOND_EMT_REACH_ANGSTROM]["min_chunk_atoms"] < len(atoms)  # a chunk, not the whole cluster
    assert rows[4.0]["max_force_difference"] > 0.3
    assert rows[4.0]["mean_force_difference"] <= rows[4.0]["max_force_difference"]


def test_json_rows_equal_the_direct_computation(emt_json, cluster_file):
    report, _ = emt_json
    atoms = read(cluster_file)
    samples = locality_sample_atoms(atoms, SAMPLE_ATOMS, seed=0)
    direct = central_force_locality(atoms, EMT, RADII, samples, vacuum=6.0).to_dict()
    assert report["sample_indices"] == samples == direct["sample_indices"]
    assert [row["radius"] for row in report["radii"]] == RADII
    for through_parsl, in_process in zip(report["radii"], direct["radii"]):
        assert through_parsl == pytest.approx(in_process, rel=1e-9, abs=1e-12)
    assert (report["n_atoms"], report["calculator"], report["vacuum"], report["tolerance"]) == (260, "emt", 6.0, TOLERANCE)
    assert report["parent_options"] == {}  # EMT has no physics options


def test_suggestion_is_the_smallest_radius_under_the_tolerance(emt_json):
    report, _ = emt_json
    largest = [row["max_force_difference"] for row in report["radii"]]
    assert largest[0] >= TOLERANCE > largest[1]
    assert report["suggested_radius"] == 6.0
    assert report["larger_radii_above_tolerance"] == []


def test_plot_is_a_png_and_parsl_ran_in_the_workdir(emt_json):
    _, here = emt_json
    png = (here / "locality.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert (here / "work" / "runinfo").is_dir()
    assert not (here / "work" / "jobs").exists()  # EMT keeps no job folders


def test_a_campaign_config_gives_parent_vacuum_and_site_and_no_temporary_folder_is_left(cluster_file, tmp_path, monkeypatch):
    """--config: the campaign's chunks.vacuum (4 Å) and [site.options]; the table says when no radius
    qualifies; the default Parsl folder, a temporary one in the current folder, is gone afterwards."""
    config = write_campaign(tmp_path / "campaign")
    monkeypatch.chdir(tmp_path)
    result = nft("locality", cluster_file, "--config", config, "--radii", "4,3", "--atoms", 2)
    assert result.exit_code == 0, result.output
    assert "emt locality of" in result.stdout and "chunks with 4 Å vacuum" in result.stdout
    assert "radius (Å)" in result.stdout and "max |ΔF| (eV/Å)" in result.stdout
    assert "no radius qualifies" in result.stdout and "tolerance 0.1 eV/Å" in result.stdout
    assert result.stdout.index("│ 3 ") < result.stdout.index("│ 4 ")  # rows by increasing radius
    assert sorted(path.name for path in tmp_path.iterdir()) == ["campaign"]
    workdir = tmp_path / "campaign" / "run"  # the campaign's workdir gets the report only, for nft report
    assert sorted(path.name for path in workdir.iterdir()) == ["locality.json"]
    recorded = json.loads((workdir / "locality.json").read_text())
    assert [row["radius"] for row in recorded["radii"]] == [3.0, 4.0] and recorded["suggested_radius"] is None


def test_a_parent_that_fails_every_attempt_fails_the_run_in_one_line(tmp_path):
    """The config's `[parent.emt] retries = 0`: one attempt per job; `max_force = 0.001` eV/Å refuses
    every EMT result as invalid (an element EMT lacks is refused before any job: test_bad_input.py)."""
    config = write_campaign(tmp_path / "campaign", {"parent": {"emt": {"retries": 0, "max_force": 0.001}}})
    write(tmp_path / "cluster.traj", rattled_cuboctahedron()[:20])
    result = nft("locality", tmp_path / "cluster.traj", "--config", config, "--radii", "3", "--atoms", 1, "--workdir", tmp_path / "work")
    progress = re.compile(r"\[ *\d+\.\ds\] reference jobs: \d+ of 2 done$")  # without a terminal: timestamped lines
    lines = [line for line in result.stderr.splitlines() if line.strip() and not progress.match(line)]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("failed: emt on the ")
    assert "failed after 1 attempt(s)" in lines[0] and "exceeds max_force = 0.001 eV/Å" in lines[0]


def test_help_by_absolute_path_and_the_science_stays_free_of_parsl():
    nft_command = Path(sys.executable).with_name("nft")
    result = subprocess.run([str(nft_command), "locality", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "STRUCTURE" in result.stdout and "--radii" in result.stdout
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline.science.locality; print('parsl' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.stdout.strip() == "False", imported.stderr
