"""A Slurm cluster (run from a login node): GPAW chunk jobs as MPI runs sharing blocks of nodes,
training on a node of its own.

Options: those of every Slurm site (`pipeline.execution.slurm_blocks.SlurmOptions`: partition,
account, walltime, nodes_per_block, max_blocks, worker_init, ...), plus `training_executor`.
"""

from typing import Annotated, Literal

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SimpleLauncher

from pipeline.execution.options import OneOf
from pipeline.execution.slurm_blocks import SlurmOptions, reference_executor, slurm_provider


class Options(SlurmOptions):
    # "separate": a one-node block for training and prediction; "shared": they take a node of the
    # chunk-job blocks in turn (small clusters, e.g. the single-node test cluster, where two
    # exclusive blocks would wait for each other)
    training_executor: Annotated[Literal["separate", "shared"], OneOf()] = "separate"


def make_config(run_dir, options: Options) -> Config:
    executors = [reference_executor(options)]
    if options.training_executor == "separate":
        executors.append(
            HighThroughputExecutor(
                label="training",
                address=options.address,
                max_workers_per_node=1,  # one training at a time owns the node (torch threads, ranks)
                encrypted=True,
                provider=slurm_provider(options, nodes_per_block=1, launcher=SimpleLauncher(), max_blocks=1),
            )
        )
    return Config(
        executors=executors,
        run_dir=str(run_dir),
        retries=0,
        max_idletime=60,
        usage_tracking=0,
    )
