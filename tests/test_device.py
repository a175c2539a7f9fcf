"""The device and precision a user gets by default: "auto" (cuda when torch sees a GPU, else cpu),
float32 prediction in blocks of 1024 atoms with the campaign's δ within 1e-4 of float64's.

Every check runs everywhere but those marked `without_a_gpu`: on a machine without a GPU "auto"
must resolve to the CPU and an explicit "cuda" must be a one-line bad input.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io import write
from typer.testing import CliRunner

from pipeline.campaign.config import load_config
from pipeline.cli import app
from pipeline.errors import BadInput
from pipeline.execution.apps import SITE_DEVICE_VARIABLE, prediction_job, training_job, worker_device
from pipeline.execution.distributed_training import _default_backend, train_distributed
from pipeline.execution.payloads import labelled_to_payload
from pipeline.execution.sites import load_site
from pipeline.science.calculator import PREDICTION_BLOCK_SIZE, PREDICTION_DTYPE, EnsembleCalculator
from pipeline.science.examples import bulk_training_cells, emt_label, emt_labelled, rattled_cuboctahedron
from pipeline.science.structures import LabelledStructure, atoms_to_payload
from pipeline.science.settings import TrainingSettings
from pipeline.science.device import resolve_device
from pipeline.science.training import train_ensemble
from pipeline.storage.model_file import load_ensemble, save_model

pytestmark = pytest.mark.timeout(300)
without_a_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without a GPU")

DELTA_RELATIVE_TOLERANCE = 1e-4  # the campaign decides convergence on max δ


def labelled(count: int, seed: int) -> list[LabelledStructure]:
    return [emt_labelled(atoms) for atoms in bulk_training_cells(count, seed=seed)]


@pytest.fixture(scope="module")
def trained_model_file(tmp_path_factory) -> Path:
    """10 members trained on 16 EMT-labelled bulk cells (float64 on file, as every model)."""
    settings = TrainingSettings(ensemble=10, epochs=300, optimizer="lbfgs", lbfgs_steps=300, device="cpu")
    model, _ = train_ensemble(labelled(16, seed=1), settings)
    return save_model(model, tmp_path_factory.mktemp("device") / "model.nft")


def rattled_crystal(repeat=(3, 3, 3)):
    atoms = bulk("Pt", "fcc", a=3.92, cubic=True).repeat(repeat)
    atoms.rattle(stdev=0.05, seed=0)
    return atoms


# ----- resolving the device -----------------------------------------------------------------


def test_auto_is_the_default_and_unknown_devices_are_errors():
    assert TrainingSettings().device == "auto"
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device\n.*'auto', 'cpu' or 'cuda'"):
        TrainingSettings(device="gpu")


@without_a_gpu
def test_auto_resolves_to_the_cpu_here():
    assert resolve_device("auto") == torch.device("cpu")


@without_a_gpu
def test_cuda_without_a_gpu_is_an_error():
    with pytest.raises(ValueError, match="device 'cuda'.*no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        TrainingSettings(device="cuda")  # refused where it is validated: no GPU here
    on_a_gpu_host = TrainingSettings(ensemble=2, epochs=1, optimizer="lbfgs", lbfgs_steps=0).model_copy(update={"device": "cuda"})
    with pytest.raises(ValueError, match="no CUDA GPU"):
        train_ensemble(labelled(2, seed=3), on_a_gpu_host)


# ----- the campaign config ------------------------------------------------------------------


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_config_device_reaches_the_training_settings(small_campaign, device):
    config = load_config(small_campaign({"model": {"device": device}}))
    assert config.file.model.device == device
    assert config.file.model.device == device


def test_config_device_defaults_to_auto(small_campaign):
    assert load_config(small_campaign()).file.model.device == "auto"


@pytest.mark.parametrize(
    "device, needle",
    [
        ("gpu", "'auto', 'cpu' or 'cuda'"),
        pytest.param("cuda", "no CUDA GPU", marks=without_a_gpu),
    ],
)
def test_config_device_errors_are_one_line_naming_the_field(small_campaign, device, needle):
    with pytest.raises(BadInput) as raised:
        load_config(small_campaign({"model": {"device": device}}))
    message = str(raised.value)
    assert "\n" not in message and "config.toml: model.device: " in message and needle in message


# ----- nft train / nft evaluate -------------------------------------------------------------


@pytest.fixture(scope="module")
def training_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "train.extxyz"
    write(path, [emt_label(atoms) for atoms in bulk_training_cells(3, seed=1)])
    return path


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_nft_train_on_the_cpu(training_file, tmp_path):
    model = tmp_path / "m.nft"
    result = run("train", training_file, "-o", model, "--ensemble", "2", "--epochs", "5", "--lbfgs-steps", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert model.exists() and "train force MAE" in result.stdout
    evaluated = run("evaluate", model, training_file, "--parent", "emt", "--json", "--device", "auto")
    assert evaluated.exit_code == 0, evaluated.output


@without_a_gpu
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_device_cuda_without_a_gpu_is_one_line_exit_2(training_file, tmp_path, command):
    model = tmp_path / "m.nft"
    if command == "train":
        result = run(
            "train",
            training_file,
            "-o",
            model,
            "--ensemble",
            "2",
            "--epochs",
            "5",
            "--optimizer",
            "lbfgs",
            "--lbfgs-steps",
            "0",
            "--device",
            "cuda",
        )
    else:
        save_model(train_ensemble(labelled(2, seed=3), TrainingSettings(ensemble=2, epochs=1, optimizer="lbfgs", lbfgs_steps=0))[0], model)
        result = run("evaluate", model, training_file, "--parent", "emt", "--device", "cuda")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--device" in lines[0] and "no CUDA GPU" in lines[0], result.stderr
    if command == "train":
        assert not model.exists()


def test_unknown_device_option_is_one_line_exit_2(training_file, tmp_path):
    result = run("train", training_file, "-o", tmp_path / "m.nft", "--device", "tpu")
    assert result.exit_code == 2 and "--device: expected auto, cpu, cuda" in result.stderr


# ----- the apps and the sites ---------------------------------------------------------------


def test_a_site_device_decides_what_auto_means_on_its_workers(monkeypatch):
    monkeypatch.delenv(SITE_DEVICE_VARIABLE, raising=False)
    assert worker_device("auto") == "auto" and worker_device("cpu") == "cpu"
    monkeypatch.setenv(SITE_DEVICE_VARIABLE, "cuda")
    assert worker_device("auto") == "cuda" and worker_device("cpu") == "cpu"


@without_a_gpu
def test_a_gpu_worker_without_a_gpu_fails_instead_of_training_on_its_cpus(monkeypatch, tmp_path):
    monkeypatch.setenv(SITE_DEVICE_VARIABLE, "cuda")
    payload = [labelled_to_payload(s) for s in labelled(2, seed=3)]
    with pytest.raises(ValueError, match="no CUDA GPU"):
        training_job(payload, {"ensemble": 2, "epochs": 1, "optimizer": "lbfgs", "lbfgs_steps": 0}, str(tmp_path / "m.nft"))


def test_the_gpu_site_exports_its_device_to_the_training_node_only(tmp_path):
    config = load_site("slurm_gpu", tmp_path / "gpu", {"gpus_per_node": 2})
    by_label = {executor.label: executor for executor in config.executors}
    assert f"export {SITE_DEVICE_VARIABLE}=cuda" in by_label["training"].provider.worker_init
    assert SITE_DEVICE_VARIABLE not in by_label["reference"].provider.worker_init
    assert "--gpus-per-node=2" in by_label["training"].provider.scheduler_options
    with pytest.raises(Exception, match="site option 'device': must be one of cuda, auto"):
        load_site("slurm_gpu", tmp_path / "cpu", {"device": "cpu"})


@without_a_gpu
def test_training_job_reports_the_device_it_trained_on(monkeypatch, tmp_path):
    monkeypatch.delenv(SITE_DEVICE_VARIABLE, raising=False)
    payload = [labelled_to_payload(s) for s in labelled(2, seed=3)]
    metrics = training_job(
        payload, {"ensemble": 2, "epochs": 1, "optimizer": "lbfgs", "lbfgs_steps": 0, "device": "auto"}, str(tmp_path / "m.nft")
    )
    assert metrics["device"] == "cpu" and metrics["world_size"] == 1  # no GPU: one process


def test_distributed_training_uses_gloo_on_the_cpu():
    assert _default_backend("cpu") == "gloo"


@without_a_gpu
def test_distributed_training_refuses_cuda_without_a_gpu(tmp_path):
    payload = [labelled_to_payload(s) for s in labelled(2, seed=3)]
    with pytest.raises(ValueError, match="no CUDA GPU"):
        on_a_gpu_host = TrainingSettings(ensemble=2, epochs=1, optimizer="lbfgs", lbfgs_steps=0).model_copy(update={"device": "cuda"})
        train_distributed(payload, on_a_gpu_host, tmp_path / "m.nft", 2)
    assert not (tmp_path / "m.nft").exists()


# ----- prediction defaults: fast, and δ as float64's ---------------------------------------


def test_prediction_defaults_are_float32_in_blocks_of_1024():
    assert PREDICTION_DTYPE == torch.float32 and PREDICTION_BLOCK_SIZE == 1024


@pytest.mark.parametrize("structure", ["crystal", "cuboctahedron"])
def test_default_prediction_gives_the_float64_delta(trained_model_file, structure, monkeypatch):
    monkeypatch.delenv(SITE_DEVICE_VARIABLE, raising=False)
    atoms = rattled_crystal((7, 7, 7)) if structure == "crystal" else rattled_cuboctahedron()  # 1,372: two blocks
    reference = load_ensemble(trained_model_file).predict(atoms, block_size=2048)  # float64, the old default
    (job,) = prediction_job(str(trained_model_file), [atoms_to_payload(atoms)])
    relative = abs(job.max_delta - reference.max_delta) / reference.max_delta
    assert relative < DELTA_RELATIVE_TOLERANCE
    np.testing.assert_allclose(job.uncertainties, reference.uncertainties, rtol=DELTA_RELATIVE_TOLERANCE, atol=1e-5)
    np.testing.assert_allclose(job.forces, reference.forces, atol=1e-4)
    assert abs(job.energy - reference.energy) / len(atoms) < 1e-6  # eV/atom


def test_the_calculator_predicts_as_the_prediction_app_and_leaves_the_model_alone(trained_model_file, monkeypatch):
    monkeypatch.delenv(SITE_DEVICE_VARIABLE, raising=False)
    atoms = rattled_crystal((2, 2, 2))
    model = load_ensemble(trained_model_file)  # float64
    atoms.calc = EnsembleCalculator(model)
    forces = atoms.get_forces()
    assert model.dtype == torch.float64 and atoms.calc.model.dtype == PREDICTION_DTYPE
    (job,) = prediction_job(str(trained_model_file), [atoms_to_payload(atoms)])
    np.testing.assert_allclose(forces, job.forces, atol=1e-6)
    np.testing.assert_allclose(atoms.calc.results["uncertainties"], job.uncertainties, rtol=1e-5)
    exact = EnsembleCalculator(model, dtype=None)  # the model's own precision
    assert exact.model is model
