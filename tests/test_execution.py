"""Sites and Parsl apps with real executors: site loading, routing by label, EMT jobs through a local
HighThroughputExecutor, and failures that come back as exceptions carrying their reason."""

import os
import sys
from pathlib import Path

import numpy as np
import parsl
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from parsl.config import Config
from parsl.executors import ThreadPoolExecutor
from parsl.executors.high_throughput.errors import WorkerLost

from pipeline.errors import BadInput
from pipeline.execution.apps import make_apps, route
from pipeline.execution.parents import EmtParent, ReferenceFailed, parent_for
from pipeline.execution.parsl_session import parsl_session
from pipeline.execution.sites import SiteError, load_site, site_names
from pipeline.science.structures import atoms_to_payload

pytestmark = pytest.mark.timeout(180)
EMT_PARENT = EmtParent()


@pytest.fixture(scope="class")
def local_site(tmp_path_factory):
    """A loaded `local` site (real HighThroughputExecutor, two workers) and its apps, for one class
    of tests (Parsl holds one loaded config at a time)."""
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    run_dir = tmp_path_factory.mktemp("parsl") / "runinfo"
    config = load_site("local", run_dir, {"workers": 2})
    with parsl_session(config):
        yield make_apps(config)
    with pytest.raises(parsl.errors.NoDataFlowKernelError):
        parsl.dfk()


def rattled_platinum(seed):
    atoms = bulk("Pt", "fcc", a=3.92, cubic=True) * (2, 2, 1)
    atoms.rattle(0.15, seed=seed)
    return atoms


def test_shipped_sites_are_listed():
    assert {"local", "slurm", "slurm_gpu"} <= set(site_names())


def test_site_by_name_and_by_path_give_the_same_config(tmp_path):
    by_name = load_site("local", tmp_path / "a", {"workers": 1})
    by_path = load_site(str(Path(__file__).parents[1] / "site_configs" / "local.py"), tmp_path / "b", {"workers": 1})
    assert [e.label for e in by_name.executors] == [e.label for e in by_path.executors] == ["local"]
    assert by_name.run_dir == str(tmp_path / "a") and by_path.run_dir == str(tmp_path / "b")


def test_a_site_file_of_ones_own(tmp_path):
    site = tmp_path / "threads.py"
    site.write_text(
        "from parsl.config import Config\nfrom parsl.executors import ThreadPoolExecutor\n"
        "def make_config(run_dir, options):\n"
        "    return Config(executors=[ThreadPoolExecutor(label='reference', max_threads=2)], run_dir=str(run_dir))\n"
    )
    config = load_site(str(site), tmp_path / "run", {})
    assert route(config, "reference") == ["reference"]


@pytest.mark.parametrize(
    "site, options, message",
    [
        ("nosuchsite", {}, "unknown site 'nosuchsite'"),
        ("/no/such/dir/site.py", {}, "does not exist"),
        ("local", {"wrokers": 2}, "site option 'wrokers'"),
    ],
)
def test_bad_site_is_a_clear_error(tmp_path, site, options, message):
    with pytest.raises(SiteError, match=message) as raised:
        load_site(site, tmp_path, options)
    assert isinstance(raised.value, BadInput)
    assert "\n" not in str(raised.value)


def test_a_site_file_without_make_config_is_an_error(tmp_path):
    site = tmp_path / "empty.py"
    site.write_text("CONFIG = None\n")
    with pytest.raises(SiteError, match="make_config"):
        load_site(str(site), tmp_path / "run", {})


def test_apps_are_routed_by_executor_label(tmp_path):
    two = Config(executors=[ThreadPoolExecutor(label="reference"), ThreadPoolExecutor(label="training")])
    assert route(two, "reference") == ["reference"]
    assert route(two, "training") == ["training"]
    assert route(two, "prediction") == ["training"]
    one = Config(executors=[ThreadPoolExecutor(label="anything")])
    assert route(one, "training") == "all"
    unlabelled = Config(executors=[ThreadPoolExecutor(label="a"), ThreadPoolExecutor(label="b")])
    with pytest.raises(SiteError, match="none for reference jobs"):
        route(unlabelled, "reference")


def test_slurm_sites_put_reference_jobs_on_an_mpi_executor(tmp_path):
    for name in ("slurm", "slurm_gpu"):
        config = load_site(name, tmp_path / name, {"partition": "debug", "nodes_per_block": 2})
        apps = make_apps(config)
        assert apps.reference_is_mpi and apps.training_executors == ["training"]
        by_label = {executor.label: executor for executor in config.executors}
        assert by_label["reference"].encrypted and by_label["training"].encrypted
        assert by_label["reference"].max_workers_per_block == 2
    gpu = load_site("slurm_gpu", tmp_path / "gpu", {"gpus_per_node": 4})
    training = {executor.label: executor for executor in gpu.executors}["training"]
    assert "--gpus-per-node=4" in training.provider.scheduler_options


def test_slurm_settings_come_from_options_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NFT_SLURM_PARTITION", "from-env")
    monkeypatch.setenv("NFT_SLURM_ACCOUNT", "project42")
    monkeypatch.setenv("NFT_WORKER_INIT", "module load gpaw/26")
    by_env = {e.label: e for e in load_site("slurm", tmp_path / "a", {}).executors}["reference"].provider
    assert "--partition=from-env" in by_env.scheduler_options and "--account=project42" in by_env.scheduler_options
    assert "module load gpaw/26" in by_env.worker_init and "PYTHONPATH=" in by_env.worker_init
    by_option = {
        e.label: e
        for e in load_site(
            "slurm",
            tmp_path / "b",
            {
                "partition": "big",
                "worker_init": "source /opt/site.sh",
                "walltime": "02:00:00",
                "max_blocks": 4,
                "srun_mpi": "pmix",
                "ranks_per_node": 64,
            },
        ).executors
    }["reference"].provider
    assert "--partition=big" in by_option.scheduler_options and "--ntasks-per-node=64" in by_option.scheduler_options
    assert "source /opt/site.sh" in by_option.worker_init and "module load" not in by_option.worker_init
    assert "export SLURM_MPI_TYPE=pmix" in by_option.worker_init
    assert by_option.walltime == "02:00:00" and by_option.max_blocks == 4


def test_a_shared_slurm_site_gives_every_app_a_resource_specification(tmp_path):
    config = load_site("slurm", tmp_path, {"training_executor": "shared"})
    apps = make_apps(config)
    assert [e.label for e in config.executors] == ["reference"]
    assert apps.training_executors == "all" and apps.training_is_mpi and apps.prediction_is_mpi
    with pytest.raises(SiteError, match="training_executor"):
        load_site("slurm", tmp_path, {"training_executor": "gpu"})


def test_mpi_resources_reserve_whole_nodes_for_the_ranks():
    assert parent_for("emt").mpi_resources() == {"num_nodes": 1, "num_ranks": 1, "ranks_per_node": 1, "launcher_options": ""}
    spec = parent_for("gpaw", {"ranks": 64, "ranks_per_node": 32, "launcher_args": ["--cpu-bind=cores"]}).mpi_resources()
    assert spec == {"num_nodes": 2, "num_ranks": 64, "ranks_per_node": 32, "launcher_options": "--cpu-bind=cores"}


def test_parsl_session_cleans_up_even_when_the_block_raises(tmp_path):
    config = Config(executors=[ThreadPoolExecutor(label="threads")], run_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="inside"):
        with parsl_session(config) as dfk:
            assert parsl.dfk() is dfk
            raise RuntimeError("inside")
    with pytest.raises(parsl.errors.NoDataFlowKernelError):
        parsl.dfk()


class TestLocalSite:
    """Jobs through one loaded local site."""

    def test_emt_jobs_through_parsl_equal_direct_emt(self, local_site):
        structures = [rattled_platinum(seed) for seed in range(4)]
        futures = [local_site.reference_app(EMT_PARENT, atoms_to_payload(atoms)) for atoms in structures]
        for atoms, future in zip(structures, futures):
            result = future.result(timeout=120)
            atoms.calc = EMT()
            assert result["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
            np.testing.assert_allclose(result["forces"], atoms.get_forces(), atol=1e-10)
            assert result["host"] and result["wall_time_s"] >= 0
        assert isinstance(local_site.reference_app(EMT_PARENT, atoms_to_payload(structures[0])), parsl.dataflow.futures.AppFuture)

    def test_a_failed_job_comes_back_as_an_exception_with_its_reason(self, local_site):
        silicon = bulk("Si", "diamond", a=5.43)
        future = local_site.reference_app(EMT_PARENT, atoms_to_payload(silicon))
        with pytest.raises(ReferenceFailed, match="No EMT-potential for Si") as raised:
            future.result(timeout=120)
        assert "Si" in raised.value.reason

    def test_a_worker_that_dies_fails_its_job_not_the_session(self, local_site):
        """Fault injected on purpose: the job kills its own worker process."""
        from parsl import python_app

        def killed_worker():
            os._exit(9)

        doomed = python_app(killed_worker, executors=local_site.reference_executors)()
        with pytest.raises(WorkerLost, match="loss of worker"):
            doomed.result(timeout=150)
        survivor = local_site.reference_app(EMT_PARENT, atoms_to_payload(rattled_platinum(7)))
        assert np.isfinite(survivor.result(timeout=120)["energy"])


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_slurm_site_runs_an_emt_job_as_a_slurm_job(slurm_cluster, tmp_path):
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    atoms = rattled_platinum(seed=21)
    config = load_site("slurm", tmp_path / "runinfo", {"partition": slurm_cluster.partition, "walltime": "00:10:00"})
    with parsl_session(config):
        apps = make_apps(config)
        assert apps.reference_is_mpi
        result = apps.reference_app(EMT_PARENT, atoms_to_payload(atoms)).result(timeout=240)
    atoms.calc = EMT()
    np.testing.assert_allclose(result["forces"], atoms.get_forces(), atol=1e-10)
    assert result["external_id"], "the job saw no SLURM_JOB_ID"
    job = slurm_cluster.job_state(result["external_id"])
    assert job["JobName"].startswith("parsl.reference"), job
    assert result["host"] == slurm_cluster.node or job.get("NodeList") == slurm_cluster.node
