"""The single-node Slurm cluster from `slurm/start-cluster.sh` as a session-scoped fixture.

`slurm_cluster` starts munged, slurmctld and slurmd on this machine (or reuses a cluster that is
already up, and then leaves it running), exports SLURM_CONF for the session so that sbatch, srun
and Parsl's SlurmProvider reach it, and stops what it started at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol")
SYSTEM_SBIN = "/usr/sbin:/sbin"

# OpenMPI refuses to start as root without these; the tests and CI run as root.
MPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to use the cluster: partition, node, CPUs and the config file."""

    partition: str
    node: str
    cpus: int
    conf: Path
    state_dir: Path
    mpi_default: str  # srun's default --mpi plugin: "pmix" where Slurm has it, else "none"
    started_here: bool

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for Slurm clients (and OpenMPI as root), plus `extra`."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{env.get('PATH', '')}:{SYSTEM_SBIN}"
        env.update(MPI_ROOT_ENV)
        env.update(extra)
        return env

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, ...); empty if Slurm forgot the job."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env(), capture_output=True, text=True, check=False).stdout
        fields = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait_for_job(self, job_id: str, timeout_s: float = 120.0) -> dict[str, str]:
        """Wait until the job has ended and return its final state; cancel it on timeout."""
        ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state.get("JobState") in ended:
                return state
            time.sleep(0.5)
        self.cancel(job_id)
        raise TimeoutError(f"Slurm job {job_id} did not end within {timeout_s:.0f} s: {state}")

    def cancel(self, job_id: str) -> None:
        subprocess.run(["scancel", job_id], env=self.env(), capture_output=True, check=False)


def _missing_binaries() -> list[str]:
    search_path = f"{os.environ.get('PATH', '')}:{SYSTEM_SBIN}"
    return [exe for exe in SLURM_BINARIES if shutil.which(exe, path=search_path) is None]


def _daemons_alive(state_dir: Path) -> bool:
    """True when every daemon's pid file names a live process of that name."""
    for name in ("munged", "slurmctld", "slurmd"):
        try:
            pid = int((state_dir / "run" / f"{name}.pid").read_text().strip())
            if Path(f"/proc/{pid}/comm").read_text().strip() != name:
                return False
        except (OSError, ValueError):
            return False
    return True


def _conf_value(conf: Path, key: str) -> str:
    for line in conf.read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip()
    return ""


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node Slurm cluster for the whole test session (see slurm/README.md)."""
    missing = _missing_binaries()
    if missing:
        reason = f"Slurm binaries not found ({', '.join(missing)}); scripts/setup.sh installs slurm-wlm and munge"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)

    state_dir = Path(os.environ.get("NFT_SLURM_DIR", "/tmp/nft-slurm"))
    env = dict(os.environ, NFT_SLURM_DIR=str(state_dir), PATH=f"{os.environ.get('PATH', '')}:{SYSTEM_SBIN}")
    already_up = _daemons_alive(state_dir)
    started = subprocess.run(
        ["bash", str(REPO / "slurm" / "start-cluster.sh")], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if started.returncode != 0:
        pytest.fail(f"slurm/start-cluster.sh failed:\n{started.stdout}\n{started.stderr}")

    conf = state_dir / "slurm.conf"
    node_line = next(line for line in conf.read_text().splitlines() if line.startswith("NodeName="))
    node_fields = dict(token.split("=", 1) for token in node_line.split())
    partition_line = next(line for line in conf.read_text().splitlines() if line.startswith("PartitionName="))
    cluster = SlurmCluster(
        partition=partition_line.split()[0].split("=", 1)[1],
        node=node_fields["NodeName"],
        cpus=int(node_fields["CPUs"]),
        conf=conf,
        state_dir=state_dir,
        mpi_default=_conf_value(conf, "MpiDefault") or "none",
        started_here=not already_up,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(conf))
        try:
            yield cluster
        finally:
            if cluster.started_here:
                subprocess.run(["bash", str(REPO / "slurm" / "stop-cluster.sh")], env=env, capture_output=True, timeout=120, check=False)
