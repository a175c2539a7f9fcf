"""The generic ASE parent: a calculator class nft does not know (ASE's Lennard-Jones), by import path,
with its options; the options that define the physics; a campaign through the real Parsl DAG; and a
wrong class or option stopped in one line before any job runs."""

import json

import numpy as np
import pytest
from ase.calculators.lj import LennardJones

from pipeline.campaign.config import load_config
from pipeline.execution.parents import AseParent, ParentConfigError, parent_for
from pipeline.science.structures import atoms_to_payload
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import rattled_cluster, run_nft, write_campaign
from tests.test_gpaw_campaign import ALWAYS_SELECT, TINY_MODEL, job_dir, wait_until_gone

pytestmark = pytest.mark.timeout(240)

LJ_CLASS = "ase.calculators.lj:LennardJones"
LJ_OPTIONS = {"sigma": 2.47, "epsilon": 0.3, "rc": 6.0}  # Pt-like: the pair minimum at 2^(1/6) σ = 2.77 Å
LJ_PARENT = {"class": LJ_CLASS, "options": LJ_OPTIONS}


def direct_lennard_jones(atoms):
    atoms = atoms.copy()
    atoms.calc = LennardJones(**LJ_OPTIONS)
    return atoms.get_potential_energy(), atoms.get_forces()


def test_the_physics_is_the_class_and_its_chosen_options():
    parent = parent_for("ase", LJ_PARENT)
    assert isinstance(parent, AseParent) and parent.needs_job_dir and not parent.evaluates_targets
    assert parent.physics() == {"class": LJ_CLASS, "options": {"epsilon": 0.3, "rc": 6.0, "sigma": 2.47}}
    chosen = parent_for("ase", {**LJ_PARENT, "physics_options": ["sigma", "epsilon"]})
    assert chosen.physics() == {"class": LJ_CLASS, "options": {"epsilon": 0.3, "sigma": 2.47}}
    assert parent_for("ase", {**LJ_PARENT, "threads": 4, "retries": 0}).physics() == parent.physics()  # execution only
    other = parent_for("ase", {"class": LJ_CLASS, "options": {**LJ_OPTIONS, "sigma": 2.5}})
    assert other.physics() != parent.physics()
    assert parent_for("ase", parent.model_dump()) == parent  # the dump is what a Parsl app receives


@pytest.mark.parametrize(
    "options, field, problem",
    [
        ({"class": "no_such_package.calculators:Thing"}, "parent.ase.class", "cannot import 'no_such_package.calculators'"),
        ({"class": "ase.calculators.lj:LenardJones"}, "parent.ase.class", "module 'ase.calculators.lj' has no 'LenardJones'"),
        ({"class": "ase.calculators.lj"}, "parent.ase.class", "expected package.module:ClassName"),
        ({"class": "ase.atoms:Atoms"}, "parent.ase.class", "is not an ASE calculator class"),
        ({"class": LJ_CLASS, "options": {"sigmaa": 2.0}}, "parent.ase.options", "LennardJones takes no option 'sigmaa'"),
        ({**LJ_PARENT, "physics_options": ["r0"]}, "parent.ase.physics_options", "'r0' is not one of parent.ase.options"),
        ({**LJ_PARENT, "command": "lj.x"}, "parent.ase.command", "unknown option"),
    ],
)
def test_a_bad_class_or_option_names_the_field(options, field, problem):
    with pytest.raises(ParentConfigError) as raised:
        parent_for("ase", options)
    assert raised.value.field == field and problem in raised.value.problem
    assert "\n" not in str(raised.value)


def test_a_job_runs_the_class_in_its_own_process_and_directory(tmp_path):
    cluster = rattled_cluster((3, 1))
    result = parent_for("ase", LJ_PARENT).run(atoms_to_payload(cluster), str(tmp_path))
    energy, forces = direct_lennard_jones(cluster)
    assert result["energy"] == pytest.approx(energy, abs=1e-10)
    np.testing.assert_allclose(result["forces"], forces, atol=1e-10)
    assert result["log_file"] == str(tmp_path / "launcher.log") and "ase_runner" in (tmp_path / "launcher.log").read_text()
    assert wait_until_gone(tmp_path, 15.0) == []


@pytest.mark.slow
def test_a_campaign_with_a_calculator_nft_does_not_know(tmp_path):
    """Pt13 target, three bare bulk cells labelled by the parent, three 4 Å chunks in the first
    iteration; the second trains on them. Every job is the LJ calculator in a process of its own."""
    config = write_campaign(
        tmp_path / "campaign",
        {
            "parent": {"calculator": "ase", "ase": LJ_PARENT},
            "chunks": {"radius": 4.0, "vacuum": 4.0, "max_per_iteration": 3, "min_separation": 0.0},
            "model": TINY_MODEL,
            "active": ALWAYS_SELECT,
        },
        labelled_initial=False,
        target=rattled_cluster((3, 1)),
        n_initial=3,
    )
    try:
        result = run_nft("run", config)
    finally:
        leftovers = wait_until_gone(tmp_path)
    assert result.returncode == 0, result.stderr
    assert leftovers == []
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["stop_reason"] == "max_iterations"
    assert summary["history"][0]["chunks_added"] == 3 and summary["jobs"]["done"] == 6
    campaign = load_config(config)
    with CampaignStore(campaign.database_url, create=False) as store:
        jobs = store.jobs()
        assert len(jobs) == 6 and all(job.status == "done" for job in jobs), [(job.id, job.error) for job in jobs]
        assert all(job.params == campaign.parent.physics() for job in jobs)
        for job in jobs:
            assert (job_dir(config, job.id) / "launcher.log").is_file()
            energy, forces = direct_lennard_jones(store.structure(job.structure_id).atoms)
            stored = store.result(job.id)
            assert stored.energy == pytest.approx(energy, abs=1e-8)
            np.testing.assert_allclose(stored.forces, forces, atol=1e-8)


def test_nft_run_with_a_wrong_class_stops_in_one_line_before_any_job(tmp_path):
    config = write_campaign(
        tmp_path / "campaign",
        {"parent": {"calculator": "ase", "ase": {"class": "ase.calculators.lj:LenardJones"}}},
        labelled_initial=False,
        n_initial=1,
    )
    result = run_nft("run", config, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "parent.ase.class: module 'ase.calculators.lj' has no 'LenardJones'" in line
    assert not (config.parent / "run" / "jobs").exists()
