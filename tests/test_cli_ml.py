"""`nft train` / `nft evaluate` from the command line: happy path and one-line bad-input errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.io import read, write
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.science.examples import bulk_training_cells, emt_label
from tests.core_helpers import rattled_bulk, rattled_cluster
from tests.test_gpaw_jobs import gpaw_installed  # noqa: F401  (a fixture: skip without GPAW, fail in CI)

pytestmark = pytest.mark.timeout(300)
NFT = [str(Path(sys.executable).with_name("nft"))]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ml")
    train = folder / "train.extxyz"
    write(train, [emt_label(a) for a in bulk_training_cells(6, seed=1)])
    test = folder / "test.extxyz"
    write(test, [emt_label(a) for a in bulk_training_cells(2, seed=9)])
    return folder, train, test


@pytest.fixture(scope="module")
def trained_model(data_files):
    folder, train, _ = data_files
    model = folder / "model.nft"
    result = subprocess.run(
        NFT + ["train", str(train), "-o", str(model), "--ensemble", "3", "--epochs", "30", "--optimizer", "lbfgs", "--lbfgs-steps", "50"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "train force MAE" in result.stdout
    return model


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


AGGREGATE_KEYS = {
    "n_atoms",
    "force_mae",
    "force_max_error",
    "max_uncertainty",
    "energy_error_per_atom",
    "coverage",
    "residual_p50",
    "residual_p90",
    "residual_p99",
    "residual_max",
}


def test_evaluate_prints_spec_json(trained_model, data_files):
    """One file: the aggregate, and (for scripts written before the per-structure form) the same keys at the top."""
    _, _, test = data_files
    result = run("evaluate", trained_model, test, "--parent", "emt", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) == AGGREGATE_KEYS | {"aggregate", "structures"}
    assert set(metrics["aggregate"]) == AGGREGATE_KEYS
    assert {key: metrics[key] for key in AGGREGATE_KEYS} == metrics["aggregate"]
    assert metrics["n_atoms"] > 0 and 0 <= metrics["force_mae"] <= metrics["force_max_error"]
    assert metrics["max_uncertainty"] > 0
    assert [(row["file"], row["image"]) for row in metrics["structures"]] == [(str(test), 0), (str(test), 1)]


def test_evaluate_many_files_matches_an_independent_computation(trained_model, tmp_path):
    """Two files, several images each: every per-atom residual norm, coverage and percentile equals
    EMT and `model.predict` computed here (same precision and blocks as the calculator)."""
    from ase.calculators.emt import EMT

    from pipeline.science.calculator import PREDICTION_BLOCK_SIZE, PREDICTION_DTYPE
    from pipeline.storage.model_file import load_ensemble

    first, second = tmp_path / "bulk.extxyz", tmp_path / "mixed.traj"
    write(first, bulk_training_cells(3, seed=11))
    write(second, [rattled_cluster(seed=4), rattled_bulk(seed=5, repeat=(2, 1, 1)), rattled_cluster(seed=6)])
    result = run("evaluate", trained_model, first, second, "--parent", "emt", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    model = load_ensemble(trained_model, dtype=PREDICTION_DTYPE)
    rows, residuals, deltas, components = [], [], [], []
    for path in (first, second):
        for index, atoms in enumerate(read(path, ":")):
            prediction = model.predict(atoms, block_size=PREDICTION_BLOCK_SIZE)
            reference = atoms.copy()
            reference.calc = EMT()
            difference = prediction.forces - reference.get_forces()
            norms = np.sqrt((difference**2).sum(axis=1))
            rows.append((str(path), index, len(atoms), np.abs(difference).mean(), norms, prediction.uncertainties))
            residuals.append(norms)
            deltas.append(prediction.uncertainties)
            components.append(np.abs(difference))
    residuals, deltas, components = np.concatenate(residuals), np.concatenate(deltas), np.concatenate(components)

    assert len(report["structures"]) == len(rows) == 6
    for got, (file, index, n_atoms, mae, norms, delta) in zip(report["structures"], rows):
        assert (got["file"], got["image"], got["n_atoms"]) == (file, index, n_atoms)
        assert got["force_mae"] == pytest.approx(mae, abs=1e-9)
        assert got["coverage"] == pytest.approx(np.mean(norms <= delta), abs=1e-9)
        assert got["residual_max"] == pytest.approx(norms.max(), abs=1e-9)
        assert got["max_uncertainty"] == pytest.approx(delta.max(), abs=1e-9)
    aggregate = report["aggregate"]
    coverage = np.mean(residuals <= deltas)
    assert 0 < coverage < 1, "the case must tell a right comparison from a wrong one"
    assert aggregate["n_atoms"] == len(residuals)
    assert aggregate["coverage"] == pytest.approx(coverage, abs=1e-9)
    assert aggregate["coverage"] != pytest.approx(np.mean(np.all(components <= deltas[:, None], axis=1)), abs=1e-9)
    assert aggregate["coverage"] != pytest.approx(np.mean(components <= deltas[:, None]), abs=1e-9)
    for q in (50, 90, 99):
        assert aggregate[f"residual_p{q}"] == pytest.approx(np.percentile(residuals, q), abs=1e-9)
    assert aggregate["residual_max"] == pytest.approx(residuals.max(), abs=1e-9)
    assert aggregate["force_mae"] == pytest.approx(components.mean(), abs=1e-9)
    assert aggregate["force_max_error"] == pytest.approx(components.max(), abs=1e-9)
    assert aggregate["max_uncertainty"] == pytest.approx(deltas.max(), abs=1e-9)
    assert {key: report[key] for key in AGGREGATE_KEYS} == aggregate

    table = run("evaluate", trained_model, first, second, "--parent", "emt")
    assert table.exit_code == 0, table.output
    assert sum(str(second) in line for line in table.stdout.splitlines()) == 3 and "coverage" in table.stdout


def test_train_reads_a_per_atom_force_mask(data_files, tmp_path):
    _, train, _ = data_files
    atoms = emt_label(bulk_training_cells(3, seed=2)[2])
    mask = np.zeros(len(atoms), dtype=bool)
    mask[0] = True
    atoms.arrays["force_mask"] = mask
    masked = tmp_path / "masked.extxyz"
    write(masked, [atoms])
    from pipeline.cli.cmd_ml import labelled_structures

    (item,) = labelled_structures(masked)
    assert item.force_mask.tolist() == mask.tolist()


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_data_file(tmp_path):
    one_line_error(run("train", tmp_path / "nope.extxyz", "-o", tmp_path / "m.nft"), "nope.extxyz", "not found")
    assert not (tmp_path / "m.nft").exists()


def test_data_without_forces(tmp_path):
    path = tmp_path / "plain.xyz"
    write(path, rattled_cluster())
    one_line_error(run("train", path, "-o", tmp_path / "m.nft"), "plain.xyz", "no forces")
    assert not (tmp_path / "m.nft").exists()


def test_unreadable_data(tmp_path):
    path = tmp_path / "junk.traj"
    path.write_text("this is not a trajectory")
    one_line_error(run("train", path, "-o", tmp_path / "m.nft"), "junk.traj")


TINY_LCAO_CONFIG = """
[campaign]
name = "gpaw-evaluate"
[data]
targets = ["dimer.traj"]
initial = "dimer.traj"
[parent]
calculator = "gpaw"
[parent.gpaw]
mode = "lcao"
basis = "sz(dzp)"
setups = { Pt = "10" }
h = 0.3
[chunks]
vacuum = 3.0
"""


@pytest.mark.gpaw
@pytest.mark.usefixtures("gpaw_installed")
def test_evaluate_against_a_campaign_configs_gpaw_parent(trained_model, tmp_path):
    """`--config` takes the config's parent with its options and boxes a cell-less cluster with the
    config's chunks.vacuum: the force residuals equal a GPAW run made here with those settings."""
    from gpaw import GPAW

    from pipeline.science.calculator import PREDICTION_BLOCK_SIZE, PREDICTION_DTYPE
    from pipeline.storage.model_file import load_ensemble

    dimer = Atoms("Pt2", positions=[[0.0, 0.0, 0.0], [2.45, 0.1, 0.0]])
    structure = tmp_path / "dimer.traj"
    write(structure, dimer)
    config = tmp_path / "config.toml"
    config.write_text(TINY_LCAO_CONFIG)
    result = run("evaluate", trained_model, structure, "--config", config, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    boxed = dimer.copy()
    boxed.center(vacuum=3.0)
    boxed.calc = GPAW(
        mode="lcao", basis="sz(dzp)", setups={"Pt": "10"}, h=0.3, xc="PBE", occupations={"name": "fermi-dirac", "width": 0.1}, txt=None
    )
    prediction = load_ensemble(trained_model, dtype=PREDICTION_DTYPE).predict(dimer, block_size=PREDICTION_BLOCK_SIZE)
    residuals = np.linalg.norm(prediction.forces - boxed.get_forces(), axis=1)
    assert report["residual_max"] == pytest.approx(residuals.max(), abs=1e-4)
    assert report["force_mae"] == pytest.approx(np.abs(prediction.forces - boxed.get_forces()).mean(), abs=1e-4)


def test_evaluate_takes_one_reference(trained_model, data_files, tmp_path):
    _, _, test = data_files
    one_line_error(run("evaluate", trained_model, test), "--parent")
    one_line_error(run("evaluate", trained_model, test, "--parent", "emt", "--config", tmp_path / "c.toml"), "--config")
    one_line_error(run("evaluate", trained_model, test, "--parent", "emt", "--vacuum", "-1"), "--vacuum")


def test_bad_hidden_option(data_files, tmp_path):
    _, train, _ = data_files
    one_line_error(run("train", train, "-o", tmp_path / "m.nft", "--hidden", "5,x"), "--hidden")


def test_unknown_element_at_evaluate(trained_model, tmp_path):
    path = tmp_path / "cupt.xyz"
    write(path, rattled_cluster(mixed=True))
    one_line_error(run("evaluate", trained_model, path, "--parent", "emt"), "Cu")


def test_corrupt_model(data_files, tmp_path):
    _, _, test = data_files
    bad = tmp_path / "corrupt.nft"
    bad.write_bytes(os.urandom(200))
    one_line_error(run("evaluate", bad, test, "--parent", "emt"), "corrupt.nft")


def test_unknown_reference(trained_model, data_files):
    _, _, test = data_files
    one_line_error(run("evaluate", trained_model, test, "--parent", "vasp"), "--parent")


def test_train_with_levenberg_marquardt_records_the_optimizer_and_no_adam(data_files, tmp_path):
    """`--optimizer levenberg-marquardt --lm-steps N` trains without Adam epochs by default and says so in the file."""
    from pipeline.storage.model_file import read_metadata

    _, train, _ = data_files
    model = tmp_path / "lm.nft"
    result = run("train", train, "-o", model, "--ensemble", "3", "--optimizer", "levenberg-marquardt", "--lm-steps", "10")
    assert result.exit_code == 0, result.output
    extra = read_metadata(model)["extra"]
    assert extra["training"]["optimizer"] == "levenberg-marquardt" and extra["training"]["lm_steps"] == 10
    assert extra["training"]["epochs"] == 0 and extra["report"]["epochs_run"] == 0
    bad = run("train", train, "-o", tmp_path / "x.nft", "--optimizer", "newton")
    assert bad.exit_code == 2 and "--optimizer" in bad.output and not (tmp_path / "x.nft").exists()


def test_train_defaults_to_levenberg_marquardt_and_lbfgs_alone_selects_lbfgs(data_files, tmp_path):
    """No optimizer option: the settings' default (LM, no Adam); `--lbfgs-steps N` alone: L-BFGS after Adam."""
    from pipeline.storage.model_file import read_metadata

    _, train, _ = data_files
    default = run("train", train, "-o", tmp_path / "d.nft", "--ensemble", "2", "--lm-steps", "3")
    assert default.exit_code == 0, default.output
    training = read_metadata(tmp_path / "d.nft")["extra"]["training"]
    assert (training["optimizer"], training["epochs"], training["lm_steps"]) == ("levenberg-marquardt", 0, 3)
    lbfgs = run("train", train, "-o", tmp_path / "l.nft", "--ensemble", "2", "--epochs", "5", "--lbfgs-steps", "4")
    assert lbfgs.exit_code == 0, lbfgs.output
    training = read_metadata(tmp_path / "l.nft")["extra"]["training"]
    assert (training["optimizer"], training["epochs"], training["lbfgs_steps"]) == ("lbfgs", 5, 4)
