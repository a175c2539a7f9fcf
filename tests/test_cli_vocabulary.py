"""One CLI vocabulary (issue 29, items 4 and 6): the same option name for the same concept on every
command, named as the config keys; `--json` wherever a command reports; `nft init` and `nft check`;
and the bugs found on the way, each with the test that failed before its fix. Real EMT, a real local
Parsl executor and real SQLite campaigns; no mocks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.io import write
from typer.testing import CliRunner

from pipeline.campaign.config import ConfigFile
from pipeline.cli import app
from pipeline.cli.cmd_ml import TRAIN_OPTIONS
from pipeline.execution.parents import parent_for
from pipeline.science.examples import bulk_training_cells, emt_label, emt_labelled
from pipeline.storage.model_file import read_metadata
from tests.plugins.campaign_fixtures import NFT, rattled_cluster, run_nft, write_campaign
from tests.test_bad_input import disk_state

pytestmark = pytest.mark.timeout(300)

PARENT_COMMANDS = ("evaluate", "locality", "initial")
"""The commands that run the parent outside a campaign (`run` and `relax` take the config's)."""
REPORTING_COMMANDS = ("run", "status", "export", "report", "train", "evaluate", "locality", "initial", "relax", "check")


def nft(*arguments: object):
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


def help_text(command: str) -> str:
    """`nft COMMAND --help` on a terminal wide enough for every option's name, with rich's box
    drawing and line breaks flattened into single spaces."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


def options_in_help(command: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text(command)))


# ----- one name per concept ------------------------------------------------------------------


@pytest.mark.parametrize("command", PARENT_COMMANDS)
def test_every_command_that_runs_the_parent_takes_parent_and_its_options(command):
    shown = options_in_help(command)
    assert {"--parent", "--parent-option"} <= shown
    assert not shown & {"--calculator", "--reference"}  # the former names work, unlisted
    assert "[parent.NAME]" in help_text(command)  # bug: rich read it as markup and dropped it


def test_train_options_are_the_config_keys():
    """Every `nft train` option that sets a `[model]` key is that key's name (`lm_steps` is
    `--lm-steps`); the relaxation's ASE optimizer has a name of its own."""
    for key, option in TRAIN_OPTIONS.items():
        expected = "--descriptor" if key == "descriptor.kind" else "--" + key.replace("_", "-")
        assert option == expected, key
    shown = options_in_help("train")
    assert set(TRAIN_OPTIONS.values()) <= shown
    assert not shown & {"--lm", "--lbfgs", "--validation"}
    relax = options_in_help("relax")
    assert "--relax-optimizer" in relax and "--optimizer" not in relax


@pytest.mark.parametrize("command", REPORTING_COMMANDS)
def test_every_reporting_command_takes_json(command):
    assert "--json" in options_in_help(command)


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocabulary") / "train.extxyz"
    write(path, [emt_label(cell) for cell in bulk_training_cells(3, seed=3)])
    return path


def test_former_option_names_still_work(labelled_file, tmp_path):
    """Scripts written for the former names run unchanged, with the same result as the new names."""
    new = nft("train", labelled_file, "-o", tmp_path / "new.nft", "--ensemble", "2", "--lm-steps", "2", "--validation-fraction", "0.3")
    old = nft("train", labelled_file, "-o", tmp_path / "old.nft", "--ensemble", "2", "--lm", "2", "--validation", "0.3")
    assert new.exit_code == 0 and old.exit_code == 0, new.output + old.output
    trained = [read_metadata(tmp_path / name)["extra"]["training"] for name in ("new.nft", "old.nft")]
    assert trained[0] == trained[1] and (trained[0]["lm_steps"], trained[0]["validation_fraction"]) == (2, 0.3)
    evaluated = [
        nft("evaluate", tmp_path / "new.nft", labelled_file, option, "emt", "--parent-option", "retries=0", "--json")
        for option in ("--parent", "--reference")
    ]
    assert [result.exit_code for result in evaluated] == [0, 0], evaluated[0].output + evaluated[1].output
    assert json.loads(evaluated[0].stdout) == json.loads(evaluated[1].stdout)


def test_train_json_is_the_report(labelled_file, tmp_path):
    result = nft("train", labelled_file, "-o", tmp_path / "m.nft", "--ensemble", "2", "--lm-steps", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stored = read_metadata(tmp_path / "m.nft")["extra"]["report"]
    assert report["model"] == str(tmp_path / "m.nft") and report["members"] == 2 and report["structures"] == 3
    assert report["train_force_mae"] == stored["train_force_mae"] > 0


# ----- nft init and nft check ------------------------------------------------------------------


def test_init_writes_a_commented_config_that_check_accepts(tmp_path):
    (tmp_path / "targets").mkdir()
    write(tmp_path / "targets" / "pt55.traj", rattled_cluster())
    config = tmp_path / "campaign.toml"
    result = nft("init", tmp_path / "targets" / "pt55.traj", "-o", config)
    assert result.exit_code == 0, result.output
    text = config.read_text()

    # Every section and table, each key described (units from the models) and commented at its default.
    for table in (
        "campaign",
        "data",
        "data.initial_generate",
        "parent",
        "parent.emt",
        "chunks",
        "model",
        "model.descriptor",
        "active",
        "site",
    ):
        assert f"\n[{table}]\n" in text, table
    assert "# Chunk radius, Å" in text and "\n# radius = 8.0\n" in text and "\n# ensemble = 10\n" in text
    written = tomllib.loads(text)
    assert written["campaign"] == {"name": "pt55"}
    assert written["data"] == {"targets": ["targets/pt55.traj"], "initial_generate": {}}  # relative to the config
    assert written["parent"] == {"calculator": "emt", "emt": {}}
    uncommented = tomllib.loads(re.sub(r"(?m)^# (\w+ = (?!\s*\(unset\)).*)$", r"\1", text))
    assert uncommented["chunks"]["radius"] == 8.0 and uncommented["model"]["lm_steps"] == 30
    assert uncommented["parent"]["emt"] == {"retries": 2, "max_force": 50.0}
    shown, written_parent = uncommented.pop("parent"), written.pop("parent")
    assert ConfigFile.model_validate(uncommented) == ConfigFile.model_validate(written)  # what is shown is the default
    assert parent_for("emt", shown["emt"]) == parent_for("emt", written_parent["emt"])

    before = disk_state(tmp_path)
    checked = nft("check", config, "--json")
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["settings"]["chunks"]["radius"] == 8.0 and report["settings"]["model"]["ensemble"] == 10
    assert report["settings"]["parent"] == {"calculator": "emt", "emt": {"retries": 2, "walltime_s": None, "max_force": 50.0}}
    resolved = report["resolved"]
    assert (resolved["threshold"], resolved["threshold_from"]) == (0.1, "the emt default")
    assert resolved["elements"] == ["Pt"] and report["settings"]["data"]["initial_generate"]["elements"] == ["Pt"]
    assert resolved["targets"] == [{"file": str((tmp_path / "targets" / "pt55.traj").resolve()), "atoms": [55]}]
    assert resolved["workdir"] == str((tmp_path / "runs" / "pt55").resolve()) and resolved["stored"] is False
    plain = nft("check", config)
    assert plain.exit_code == 0 and "valid (nothing was run)" in plain.stdout
    assert "\nradius = 8.0\n" in plain.stdout and "\nthreshold = 0.1\n" in plain.stdout
    assert disk_state(tmp_path) == before  # nothing run, nothing written


# ----- the bugs ----------------------------------------------------------------------------------


def test_get_properties_gives_the_uncertainties(labelled_file):
    """`atoms.get_properties(["uncertainties"])` raised ValueError ("No such property") although the
    calculator lists the property; any property raised once the results held δ_i."""
    from pipeline.science.calculator import EnsembleCalculator
    from pipeline.science.settings import TrainingSettings
    from pipeline.science.training import train_ensemble

    model, _ = train_ensemble(
        [emt_labelled(cell) for cell in bulk_training_cells(count=2, seed=3)], TrainingSettings(ensemble=3, epochs=5, lm_steps=2)
    )
    atoms = bulk("Pt", "fcc", a=3.95, cubic=True)
    atoms.rattle(0.05, seed=2)
    atoms.calc = EnsembleCalculator(model, dtype=None)  # in the model's own precision, as `predict`
    properties = atoms.get_properties(["uncertainties", "energy", "forces"])
    expected = model.predict(atoms)
    assert properties["uncertainties"].shape == (4,) and np.all(properties["uncertainties"] > 0)
    np.testing.assert_allclose(properties["uncertainties"], expected.uncertainties, rtol=1e-12)
    np.testing.assert_allclose(properties["forces"], atoms.get_forces())
    assert properties["energy"] == atoms.get_potential_energy()
    with pytest.raises(PropertyNotImplementedError, match="stress"):
        atoms.get_properties(["stress"])


def test_the_locality_progress_bar_knows_its_total(tmp_path):
    """On a terminal the bar showed "0/None" until the first job ended; it knows the number of
    reference jobs (the whole structure, and one chunk per radius and sample atom) from the start."""
    structure = tmp_path / "pt.traj"
    cell = bulk("Pt", "fcc", a=3.92, cubic=True) * (2, 2, 2)
    cell.rattle(0.05, seed=1)
    write(structure, cell)
    terminal = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "120"}
    result = subprocess.run(
        NFT + ["locality", str(structure), "--parent", "emt", "--radii", "3,4", "--atoms", "2", "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=terminal,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "reference jobs" in result.stderr and "5/5" in result.stderr  # 1 + 2 radii × 2 atoms
    assert "None" not in result.stderr


@pytest.fixture(scope="module")
def converged_campaign(tmp_path_factory):
    """A campaign converged in one iteration (a threshold any model reaches), run with `--json`."""
    root = tmp_path_factory.mktemp("converged")
    config = write_campaign(
        root / "campaign", {"active": {"threshold": 50.0, "max_iterations": 1}, "model": {"epochs": 20, "lbfgs_steps": 40}}
    )
    result = run_nft("run", config, "--json")
    assert result.returncode == 0, result.stderr
    return config, json.loads(result.stdout), result.stderr


def test_run_json_and_status_number_the_targets_as_the_run_log(converged_campaign):
    """`nft run --json` prints summary.json alone on stdout; `nft status --json` numbers the targets
    as the run log does ("target 0"), where it gave their database ids (from 1)."""
    config, summary, log = converged_campaign
    assert summary == json.loads((config.parent / "run" / "summary.json").read_text()) and summary["converged"]
    assert re.search(r"on target 0 \(55 atoms\): force MAE", log)
    status = run_nft("status", config, "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert [list(entry["uncertainty_per_target"]) for entry in report["history"]] == [["0"]]
    assert report["history"][0]["uncertainty_per_target"]["0"] == report["history"][0]["uncertainty"]
    assert report["relaxations"] == []


def test_status_says_when_a_relaxation_drives_the_campaign(converged_campaign, tmp_path):
    """While `nft relax` runs, `nft status` said "converged"; it names the relaxation, running or,
    once its process is gone, interrupted."""
    from tests.test_relax import wait_for_workers_to_end

    config, _, _ = converged_campaign
    start = rattled_cluster(rattle_angstrom=0.15, seed=3)
    write(tmp_path / "start.traj", start)
    steps = tmp_path / "relaxed-steps.json"
    process = subprocess.Popen(
        NFT
        + ["relax", str(config), str(tmp_path / "start.traj"), "-o", str(tmp_path / "relaxed.traj")]
        + ["--fmax", "1e-12", "--steps", "1000000", "--relax-optimizer", "FIRE"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not steps.is_file():
            assert process.poll() is None, f"nft relax ended early:\n{process.stdout.read()}"
            assert time.monotonic() < deadline, "no step written in time"
            time.sleep(0.1)
        running = run_nft("status", config, "--json")
        text = run_nft("status", config)
        assert process.poll() is None, "the relaxation ended while its status was read"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    wait_for_workers_to_end(config)
    assert running.returncode == 0 and text.returncode == 0, running.stderr + text.stderr
    relaxation = json.loads(running.stdout)["relaxations"][0]
    assert relaxation["state"] == "running" and relaxation["output"] == str(tmp_path / "relaxed.traj")
    assert relaxation["steps_file"] == str(steps) and relaxation["fmax_target"] == 1e-12 and relaxation["step"] >= 0
    first = text.stdout.splitlines()[0]
    assert first == "campaign pt55-test: relaxation running (nft relax drives the campaign); targets converged"
    assert f"relaxation running: {tmp_path / 'relaxed.traj'} at step" in text.stdout

    interrupted = run_nft("status", config)
    assert interrupted.returncode == 0, interrupted.stderr
    assert interrupted.stdout.splitlines()[0] == "campaign pt55-test: converged"
    assert "relaxation interrupted:" in interrupted.stdout and "run the same nft relax again to resume" in interrupted.stdout
