"""Building blocks shared by the Slurm sites: their options, a SlurmProvider from them, the reference executor."""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

from parsl.executors import HighThroughputExecutor, MPIExecutor
from parsl.launchers import SimpleLauncher, SrunLauncher
from parsl.launchers.base import Launcher
from parsl.providers import SlurmProvider
from pydantic import BeforeValidator

from pipeline.execution.options import Flag, PositiveInt, OneOf, String, Text
from pipeline.execution.sites import SiteOptions, option_from_environment, worker_environment


def _clock(value: Any) -> Any:
    """An unquoted TOML time (``walltime = 01:00:00``) as the "HH:MM:SS" text Slurm takes."""
    return value.isoformat() if isinstance(value, datetime.time) else value


Walltime = Annotated[Text, BeforeValidator(_clock)]


class SlurmOptions(SiteOptions):
    """The options of every Slurm site (docs/tutorials/slurm.md); all optional."""

    partition: Text | None = None  # sbatch -p; else $NFT_SLURM_PARTITION, else Slurm's default
    account: Text | None = None  # sbatch -A; else $NFT_SLURM_ACCOUNT
    qos: Text | None = None  # sbatch --qos
    walltime: Walltime = "01:00:00"  # per block; a block outlives many chunk jobs
    nodes_per_block: PositiveInt = 1  # nodes per block = chunk jobs running side by side in it
    max_blocks: PositiveInt = 1  # blocks at once (training's own block not counted)
    ranks_per_node: PositiveInt | None = None  # sbatch --ntasks-per-node
    exclusive: Flag = True  # whole nodes
    scheduler_options: String = ""  # extra #SBATCH lines
    worker_init: String | None = None  # shell lines run before the workers start; else $NFT_WORKER_INIT
    srun_mpi: Text | None = None  # exported as SLURM_MPI_TYPE for every srun, e.g. "pmix"
    # Parsl's MPI launch prefix; its "mpiexec" uses MPICH/Hydra flags that OpenMPI's mpiexec rejects
    mpi_launcher: Annotated[Literal["srun", "mpiexec", "aprun"], OneOf()] = "srun"
    # "mpi": an MPIExecutor where GPAW jobs share a block of nodes; "htex": one worker per core, for cheap parents
    reference_executor: Annotated[Literal["mpi", "htex"], OneOf()] = "mpi"
    address: Text | None = None  # the driver's address as the workers see it; default: Parsl's guess


def slurm_provider(
    options: SlurmOptions,
    *,
    nodes_per_block: int,
    launcher: Launcher,
    partition: str | None = None,
    gpus_per_node: int | None = None,
    max_blocks: int | None = None,
) -> SlurmProvider:
    """A SlurmProvider that starts blocks on demand (none at start) and gives them back when idle."""
    scheduler_options = options.scheduler_options
    if options.ranks_per_node:
        scheduler_options += f"\n#SBATCH --ntasks-per-node={options.ranks_per_node}"
    worker_init = worker_environment(options.worker_init)
    if options.srun_mpi:
        worker_init += f"\nexport SLURM_MPI_TYPE={options.srun_mpi}"
    return SlurmProvider(
        partition=partition or option_from_environment(options.partition, "NFT_SLURM_PARTITION"),
        account=option_from_environment(options.account, "NFT_SLURM_ACCOUNT"),
        qos=options.qos,
        walltime=options.walltime,
        nodes_per_block=nodes_per_block,
        init_blocks=0,
        min_blocks=0,
        max_blocks=max_blocks if max_blocks is not None else options.max_blocks,
        exclusive=options.exclusive,
        gpus_per_node=gpus_per_node,
        scheduler_options=scheduler_options,
        worker_init=worker_init,
        launcher=launcher,
    )


def reference_executor(options: SlurmOptions) -> HighThroughputExecutor:
    """The "reference" executor: MPI jobs sharing blocks of nodes, or one worker per core."""
    nodes = options.nodes_per_block
    if options.reference_executor == "mpi":
        return MPIExecutor(
            label="reference",
            address=options.address,
            max_workers_per_block=nodes,
            mpi_launcher=options.mpi_launcher,
            encrypted=True,  # workers are on compute nodes
            provider=slurm_provider(options, nodes_per_block=nodes, launcher=SimpleLauncher()),
        )
    return HighThroughputExecutor(
        label="reference",
        address=options.address,
        cores_per_worker=1,
        encrypted=True,
        provider=slurm_provider(options, nodes_per_block=nodes, launcher=SrunLauncher()),
    )
