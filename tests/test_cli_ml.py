"""`nft train` / `nft evaluate` from the command line: happy path and one-line bad-input errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.io import write
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.science.examples import bulk_training_cells, emt_label
from tests.core_helpers import rattled_cluster

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
    result = subprocess.run(NFT + ["train", str(train), "-o", str(model), "--ensemble", "3", "--epochs", "30", "--lbfgs", "50"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "train force MAE" in result.stdout
    return model


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_evaluate_prints_spec_json(trained_model, data_files):
    _, _, test = data_files
    result = run("evaluate", trained_model, test, "--reference", "emt", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"n_atoms", "force_mae", "force_max_error", "max_uncertainty", "energy_error_per_atom"}
    assert metrics["n_atoms"] > 0 and 0 <= metrics["force_mae"] <= metrics["force_max_error"]
    assert metrics["max_uncertainty"] > 0


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


def test_bad_hidden_option(data_files, tmp_path):
    _, train, _ = data_files
    one_line_error(run("train", train, "-o", tmp_path / "m.nft", "--hidden", "5,x"), "--hidden")


def test_unknown_element_at_evaluate(trained_model, tmp_path):
    path = tmp_path / "cupt.xyz"
    write(path, rattled_cluster(mixed=True))
    one_line_error(run("evaluate", trained_model, path, "--reference", "emt"), "Cu")


def test_corrupt_model(data_files, tmp_path):
    _, _, test = data_files
    bad = tmp_path / "corrupt.nft"
    bad.write_bytes(os.urandom(200))
    one_line_error(run("evaluate", bad, test, "--reference", "emt"), "corrupt.nft")


def test_unknown_reference(trained_model, data_files):
    _, _, test = data_files
    one_line_error(run("evaluate", trained_model, test, "--reference", "vasp"), "--reference")
