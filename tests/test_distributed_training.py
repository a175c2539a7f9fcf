"""Distributed ensemble training: two gloo processes give the model one process gives with the same
seeds; members are sharded in order; the training app writes a model file the driver can load."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

from pipeline.execution.apps import make_apps
from pipeline.execution.distributed_training import member_shards, merge_member_states, train_distributed
from pipeline.execution.payloads import labelled_to_payload
from pipeline.execution.parsl_session import parsl_session
from pipeline.execution.sites import load_site
from pipeline.science.examples import emt_labelled
from pipeline.science.structures import atoms_to_payload
from pipeline.science.settings import TrainingSettings
from pipeline.science.training import train_ensemble
from pipeline.storage.model_file import load_ensemble

pytestmark = pytest.mark.timeout(300)

# explicit shells: derived ones follow the data, and the warm-start test trains on two different sets
SETTINGS = {
    "ensemble": 4,
    "hidden": [5, 5],
    "cutoff": 5.0,
    "epochs": 40,
    "optimizer": "lbfgs",
    "lbfgs_steps": 0,
    "seed": 11,
    "descriptor": {"radial_centers": [0.0, 2.4, 3.2, 4.0], "radial_etas": [0.1, 2.0, 2.0, 2.0]},
}


def labelled_platinum_cells():
    structures = []
    for k, (scale, cells) in enumerate([(1.00, (1, 1, 1)), (1.02, (2, 1, 1)), (0.98, (1, 1, 1)), (1.01, (1, 2, 1))]):
        atoms = bulk("Pt", "fcc", a=3.92 * scale, cubic=True) * cells
        atoms.rattle(0.08, seed=k)
        structures.append(emt_labelled(atoms))
    # a chunk-like structure: only the central force is trained, no energy
    chunk = bulk("Pt", "fcc", a=3.92, cubic=True) * (2, 2, 2)
    chunk.rattle(0.1, seed=9)
    mask = np.zeros(len(chunk), dtype=bool)
    mask[0] = True
    structures.append(emt_labelled(chunk, mask))
    return structures


def test_member_shards_are_contiguous_blocks_in_order():
    seeds = list(range(10, 20))
    shards = member_shards(seeds, 3)
    assert [len(shard) for shard in shards] == [4, 3, 3]
    assert sum(shards, []) == seeds


def test_merging_shard_states_concatenates_members_only():
    states = [
        {"networks.weights.0": torch.zeros(2, 3, 5), "feature_mean": torch.ones(1, 3)},
        {"networks.weights.0": torch.ones(1, 3, 5), "feature_mean": torch.ones(1, 3)},
    ]
    merged = merge_member_states(states)
    assert merged["networks.weights.0"].shape == (3, 3, 5)
    assert merged["networks.weights.0"][2].eq(1).all() and merged["feature_mean"].shape == (1, 3)


@pytest.mark.slow
def test_a_warm_start_sharded_over_two_processes_equals_one_process(tmp_path):
    """Each rank takes its own members (by seed) from the previous model file."""
    from pipeline.storage.model_file import save_model

    structures = labelled_platinum_cells()
    previous, _ = train_ensemble(structures[:3], TrainingSettings(**SETTINGS))
    save_model(previous, tmp_path / "previous.nft")
    settings = {**SETTINGS, "epochs": 10, "optimizer": "lbfgs", "lbfgs_steps": 5}
    single, report = train_ensemble(structures, TrainingSettings(**settings), start_from=load_ensemble(tmp_path / "previous.nft"))
    metrics = train_distributed(
        [labelled_to_payload(s) for s in structures],
        TrainingSettings(**settings),
        tmp_path / "ddp.nft",
        world_size=2,
        backend="gloo",
        start_model_path=tmp_path / "previous.nft",
    )
    assert report.warm_started and metrics["warm_started"]
    distributed = load_ensemble(tmp_path / "ddp.nft")
    for name, tensor in single.state_dict().items():
        np.testing.assert_allclose(distributed.state_dict()[name].numpy(), tensor.numpy(), rtol=1e-8, atol=1e-9, err_msg=name)


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_model(tmp_path):
    structures = labelled_platinum_cells()
    single, _ = train_ensemble(structures, TrainingSettings(**SETTINGS))
    metrics = train_distributed(
        [labelled_to_payload(s) for s in structures], TrainingSettings(**SETTINGS), tmp_path / "ddp.nft", world_size=2, backend="gloo"
    )
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo"
    assert [shard["members"] for shard in metrics["shards"]] == [2, 2]
    distributed = load_ensemble(tmp_path / "ddp.nft")
    assert distributed.n_members == single.n_members == 4
    for name, tensor in single.state_dict().items():
        np.testing.assert_allclose(distributed.state_dict()[name].numpy(), tensor.numpy(), rtol=1e-9, atol=1e-10, err_msg=name)
    probe = bulk("Pt", "fcc", a=3.95, cubic=True) * (2, 1, 1)
    probe.rattle(0.1, seed=5)
    expected, got = single.predict(probe), distributed.predict(probe)
    np.testing.assert_allclose(got.forces, expected.forces, atol=1e-8)
    np.testing.assert_allclose(got.uncertainties, expected.uncertainties, atol=1e-8)
    assert metrics["train_force_mae"] > 0


def test_a_failing_rank_reports_its_output(tmp_path):
    structures = labelled_platinum_cells()[:2]  # Pt, for a model that knows only Cu: every rank refuses
    with pytest.raises(RuntimeError, match="distributed training .* exited with code") as raised:
        train_distributed(
            [labelled_to_payload(s) for s in structures],
            TrainingSettings(**SETTINGS),
            tmp_path / "bad.nft",
            2,
            backend="gloo",
            elements=[29],
        )
    assert "outside the model's elements" in str(raised.value)


@pytest.mark.slow
def test_training_app_through_parsl_writes_a_loadable_model(tmp_path):
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    structures = labelled_platinum_cells()
    payloads = [labelled_to_payload(s) for s in structures]
    config = load_site("local", tmp_path / "runinfo", {"workers": 1})
    with parsl_session(config):
        apps = make_apps(config)
        one = apps.training_app(payloads, SETTINGS, str(tmp_path / "one.nft"), world_size=1).result(timeout=240)
        two = apps.training_app(payloads, SETTINGS, str(tmp_path / "two.nft"), world_size=2).result(timeout=240)
        predicted = apps.prediction_app(str(tmp_path / "one.nft"), [atoms_to_payload(structures[0].atoms)]).result(timeout=120)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["train_force_mae"] == pytest.approx(two["train_force_mae"], rel=1e-6)
    model = load_ensemble(tmp_path / "one.nft")
    expected = model.predict(structures[0].atoms)
    assert len(predicted) == 1 and len(predicted[0].uncertainties) == 4
    # the prediction app predicts in float32 (calculator.PREDICTION_DTYPE): float32 agreement
    np.testing.assert_allclose(predicted[0].forces, expected.forces, atol=1e-4)
    assert predicted[0].max_delta == pytest.approx(max(expected.uncertainties), rel=1e-4, abs=1e-6)


@pytest.mark.slurm
@pytest.mark.slow
def test_training_on_a_slurm_mpi_block_takes_its_world_size_from_the_resource_specification(slurm_cluster, tmp_path):
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    structures = labelled_platinum_cells()
    options = {"partition": slurm_cluster.partition, "walltime": "00:10:00", "training_executor": "shared"}
    config = load_site("slurm", tmp_path / "runinfo", options)
    with parsl_session(config):
        apps = make_apps(config)
        metrics = apps.training_app([labelled_to_payload(s) for s in structures], SETTINGS, str(tmp_path / "m.nft"), 2).result(timeout=240)
        predicted = apps.prediction_app(str(tmp_path / "m.nft"), [atoms_to_payload(structures[0].atoms)]).result(timeout=120)
    assert metrics["world_size"] == 2 and [shard["members"] for shard in metrics["shards"]] == [2, 2]
    assert len(predicted[0].uncertainties) == len(structures[0].atoms)
