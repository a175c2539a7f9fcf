"""The single-node Slurm cluster runs real batch jobs, MPI under srun and mpiexec, and the driver
template."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

# Rank 0 prints every rank's line (gathered), so the ranks' output cannot interleave on one line.
MPI_HELLO = (
    "from mpi4py import MPI; comm = MPI.COMM_WORLD; total = comm.allreduce(comm.rank + 1); "
    "lines = comm.gather('rank %d of %d sum %d' % (comm.rank, comm.size, total)); "
    "comm.rank == 0 and print(*lines, sep=chr(10), flush=True)"
)


def submit(cluster, *args: str, cwd: Path, **env: str) -> str:
    """sbatch with --parsable (the job gets this environment plus `env`); returns the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=cwd, env=cluster.env(**env), capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout.strip().split(";")[0]


def completion_records(cluster) -> dict[str, tuple[str, str]]:
    """Ended jobs from the job-completion log (`sacct -c`): job id -> (state, exit code)."""
    out = subprocess.run(
        ["sacct", "-c", "-n", "-P", "-o", "jobid,state,exitcode"], env=cluster.env(), capture_output=True, text=True, timeout=60, check=True
    ).stdout
    records = {}
    for line in out.splitlines():
        job_id, state, exit_code = line.split("|")
        records[job_id] = (state, exit_code)
    return records


def require_mpi4py():
    pytest.importorskip("mpi4py", reason="mpi4py is installed by scripts/setup.sh")


def test_cluster_is_up_with_the_node_idle_or_in_use(slurm_cluster):
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %P %T %c"], env=slurm_cluster.env(), capture_output=True, text=True, timeout=30, check=True
    ).stdout
    node, partition, state, cpus = out.split()
    assert node == slurm_cluster.node
    assert partition.rstrip("*") == slurm_cluster.partition
    assert state in {"idle", "mixed", "allocated", "completing"}
    assert int(cpus) == slurm_cluster.cpus


def test_batch_job_runs_and_is_recorded(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\necho \"job $SLURM_JOB_ID on $(hostname -s) ntasks $SLURM_NTASKS\"\n")
    job_id = submit(slurm_cluster, "-n", "1", "-o", str(tmp_path / "out-%j.txt"), str(script), cwd=tmp_path)
    state = slurm_cluster.wait_for_job(job_id)
    assert state["JobState"] == "COMPLETED", state
    assert state["ExitCode"] == "0:0"
    output = (tmp_path / f"out-{job_id}.txt").read_text()
    assert f"job {job_id} on {slurm_cluster.node} ntasks 1" in output

    deadline = time.monotonic() + 30
    while job_id not in completion_records(slurm_cluster) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert completion_records(slurm_cluster)[job_id] == ("COMPLETED", "0:0")


def test_failed_job_is_reported_failed(slurm_cluster, tmp_path):
    job_id = submit(slurm_cluster, "-n", "1", "-o", "/dev/null", "--wrap", "exit 3", cwd=tmp_path)
    state = slurm_cluster.wait_for_job(job_id)
    assert state["JobState"] == "FAILED"
    assert state["ExitCode"] == "3:0"


def test_srun_starts_two_mpi_ranks(slurm_cluster, tmp_path):
    """Two ranks through srun's MPI plugin (PMIx where Slurm has it) with mpi4py on OpenMPI."""
    require_mpi4py()
    if slurm_cluster.mpi_default != "pmix":
        pytest.skip("this Slurm has no PMIx plugin; use mpiexec inside an allocation")
    result = subprocess.run(
        ["srun", "--mpi=pmix", "-n", "2", str(VENV_BIN / "python"), "-c", MPI_HELLO],
        cwd=tmp_path,
        env=slurm_cluster.env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    assert lines == ["rank 0 of 2 sum 3", "rank 1 of 2 sum 3"]


def test_mpiexec_inside_a_batch_allocation(slurm_cluster, tmp_path):
    """OpenMPI's mpiexec picks up the Slurm allocation of a batch job."""
    require_mpi4py()
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.fail("mpiexec not found (openmpi-bin, installed by scripts/setup.sh)")
    command = f"{mpiexec} -n 2 {VENV_BIN / 'python'} -c \"{MPI_HELLO}\""
    job_id = submit(slurm_cluster, "-n", "2", "-o", str(tmp_path / "mpi-%j.txt"), "--wrap", command, cwd=tmp_path)
    state = slurm_cluster.wait_for_job(job_id)
    output = (tmp_path / f"mpi-{job_id}.txt").read_text()
    assert state["JobState"] == "COMPLETED", output
    lines = sorted(line for line in output.splitlines() if line.startswith("rank"))
    assert lines == ["rank 0 of 2 sum 3", "rank 1 of 2 sum 3"]


def test_driver_template_runs_nft_as_a_job(slurm_cluster, tmp_path):
    """slurm/nft-driver.sbatch starts `nft run` inside the job; a missing config exits 2."""
    nft = VENV_BIN / "nft"
    help_run = subprocess.run([str(nft), "run", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert help_run.returncode == 0, f"`nft run --help` is broken: {help_run.stdout}{help_run.stderr}"
    missing = tmp_path / "no-such-campaign.toml"
    job_id = submit(
        slurm_cluster,
        "-o",
        str(tmp_path / "driver-%j.txt"),
        str(REPO / "slurm" / "nft-driver.sbatch"),
        str(missing),
        cwd=tmp_path,
        NFT_ROOT=str(REPO),
    )
    state = slurm_cluster.wait_for_job(job_id)
    output = (tmp_path / f"driver-{job_id}.txt").read_text()
    assert state["JobState"] == "FAILED", output
    assert state["ExitCode"] == "2:0", output
    assert "nft run" in output and "--site slurm" in output
    assert "no-such-campaign.toml" in output


@pytest.mark.timeout(600)
def test_the_driver_stops_before_its_walltime_requeues_and_resumes(slurm_cluster, tmp_path):
    """slurm/nft-driver.sbatch gets the walltime warning (SIGUSR1 to the batch shell, as
    `--signal=B:USR1@300` sends it) twice: once while nft run is still starting, once mid-campaign.
    Each time the job requeues itself, and the last run resumes from the database and ends the
    campaign.

    The test sends the warning itself (`scancel --batch --signal=USR1`, exactly what Slurm's timer
    sends) at those two points: Slurm's own timer is coarse (it came 8–20 s after the time asked),
    and a campaign takes 20 s on a quiet machine and minutes on a loaded one."""
    import json
    import re

    from tests.plugins.campaign_fixtures import write_campaign

    config = write_campaign(tmp_path / "campaign", {"active": {"threshold": 0.01, "max_iterations": 5}})
    output = tmp_path / "driver.txt"
    second_model = config.parent / "run" / "models" / "iteration-002.nft"
    job_id = submit(
        slurm_cluster,
        "--time=15",
        "-o",
        str(output),
        str(REPO / "slurm" / "nft-driver.sbatch"),
        str(config),
        cwd=tmp_path,
        NFT_ROOT=str(REPO),
        NFT_SITE="local",
        NFT_MAX_REQUEUES="8",
    )

    def warn() -> None:
        subprocess.run(
            ["scancel", "--batch", "--signal=USR1", job_id], env=slurm_cluster.env(), capture_output=True, timeout=30, check=True
        )

    warned = 0
    skipped_delay_for = 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        state = slurm_cluster.job_state(job_id)
        restarts = int(state.get("Restarts", "0"))
        text = output.read_text() if output.exists() else ""
        if state.get("JobState") == "RUNNING" and warned == 0 and "(restart 0): nft run" in text:
            warn()  # nft run is being started: nothing recorded yet
            warned = 1
        elif state.get("JobState") == "RUNNING" and warned == 1 and restarts == 1 and second_model.exists():
            warn()  # iteration 1 is recorded, iteration 2 trained: mid-campaign
            warned = 2
        if state.get("JobState") == "PENDING" and restarts > skipped_delay_for:  # as the admin, skip the ≈ 2 min delay
            time.sleep(10)  # until the last run is cleaned up: starting sooner revokes the new run's credential
            subprocess.run(
                ["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                env=slurm_cluster.env(),
                capture_output=True,
                timeout=30,
                check=False,
            )
            skipped_delay_for = restarts
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.2)
    state = slurm_cluster.wait_for_job(job_id, timeout_s=60)
    text = output.read_text()
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert text.count("requeueing job") == 2, text[-3000:]
    assert warned == 2 and int(state["Restarts"]) == 2, text[-3000:]
    runs = re.split(r"^nft-driver: \S+ on \S+ \(restart \d+\)", text, flags=re.M)[1:]
    assert len(runs) == int(state["Restarts"]) + 1, text[-3000:]
    for earlier, later in zip(runs, runs[1:]):
        if re.search(r"iteration \d+: δ =", earlier):  # it recorded an iteration: the next run resumes it
            assert "resuming:" in later, text[-3000:]
    assert any(re.search(r"iteration \d+: δ =", run) for run in runs[:-1]), "no run was stopped mid-campaign"
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert summary["stop_reason"] in ("max_iterations", "no_new_chunks"), summary["stop_reason"]
    assert [entry["iteration"] for entry in summary["history"]] == list(range(1, summary["iterations"] + 1))
