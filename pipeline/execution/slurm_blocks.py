"""Building blocks shared by the Slurm sites: a SlurmProvider from site options, the reference executor.

Options (all optional): partition, account, qos (``$NFT_SLURM_PARTITION``, ``$NFT_SLURM_ACCOUNT``
as fallbacks), walltime, nodes_per_block, max_blocks, ranks_per_node (sbatch ``--ntasks-per-node``),
exclusive, scheduler_options, worker_init (else ``$NFT_WORKER_INIT``), srun_mpi (``SLURM_MPI_TYPE``
for every srun, e.g. "pmix"), mpi_launcher ("srun"; Parsl's "mpiexec" prefix uses MPICH/Hydra
flags that OpenMPI's mpiexec rejects), reference_executor ("mpi": an
MPIExecutor where GPAW jobs share a block of nodes; "htex": one worker per core, for cheap
parents), address (the driver's address as workers see it).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parsl.executors import HighThroughputExecutor, MPIExecutor
from parsl.launchers import SimpleLauncher, SrunLauncher
from parsl.providers import SlurmProvider

from pipeline.execution.sites import option_from_environment, worker_environment

SLURM_OPTIONS: dict[str, Any] = {
    "partition": None,
    "account": None,
    "qos": None,
    "walltime": "01:00:00",
    "nodes_per_block": 1,
    "max_blocks": 1,
    "ranks_per_node": None,
    "exclusive": True,
    "scheduler_options": "",
    "worker_init": None,
    "srun_mpi": None,
    "mpi_launcher": "srun",
    "reference_executor": "mpi",
    "address": None,
}


def slurm_provider(options: Mapping[str, Any], *, nodes_per_block: int, launcher, partition=None,
                   gpus_per_node: int | None = None, max_blocks: int | None = None) -> SlurmProvider:
    """A SlurmProvider that starts blocks on demand (none at start) and gives them back when idle."""
    scheduler_options = str(options["scheduler_options"] or "")
    if options["ranks_per_node"]:
        scheduler_options += f"\n#SBATCH --ntasks-per-node={int(options['ranks_per_node'])}"
    worker_init = worker_environment(options)
    if options["srun_mpi"]:
        worker_init += f"\nexport SLURM_MPI_TYPE={options['srun_mpi']}"
    return SlurmProvider(
        partition=partition or option_from_environment(options, "partition", "NFT_SLURM_PARTITION"),
        account=option_from_environment(options, "account", "NFT_SLURM_ACCOUNT"),
        qos=options["qos"],
        walltime=str(options["walltime"]),
        nodes_per_block=int(nodes_per_block),
        init_blocks=0,
        min_blocks=0,
        max_blocks=int(max_blocks if max_blocks is not None else options["max_blocks"]),
        exclusive=bool(options["exclusive"]),
        gpus_per_node=gpus_per_node,
        scheduler_options=scheduler_options,
        worker_init=worker_init,
        launcher=launcher,
    )


def reference_executor(options: Mapping[str, Any]) -> HighThroughputExecutor:
    """The "reference" executor: MPI jobs sharing blocks of nodes, or one worker per core."""
    kind = options["reference_executor"]
    nodes = int(options["nodes_per_block"])
    if kind == "mpi":
        return MPIExecutor(
            label="reference",
            address=options["address"],
            max_workers_per_block=nodes,
            mpi_launcher=str(options["mpi_launcher"]),
            encrypted=True,  # workers are on compute nodes
            provider=slurm_provider(options, nodes_per_block=nodes, launcher=SimpleLauncher()),
        )
    if kind == "htex":
        return HighThroughputExecutor(
            label="reference",
            address=options["address"],
            cores_per_worker=1,
            encrypted=True,
            provider=slurm_provider(options, nodes_per_block=nodes, launcher=SrunLauncher()),
        )
    raise ValueError(f"reference_executor must be 'mpi' or 'htex', got {kind!r}")
