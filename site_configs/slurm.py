"""A Slurm cluster (run from a login node): GPAW chunk jobs as MPI runs sharing blocks of nodes,
training on one node. Options: see `pipeline.execution.slurm_blocks` (partition, account, walltime,
nodes_per_block, max_blocks, worker_init, ...).
"""
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SimpleLauncher

from pipeline.execution.slurm_blocks import SLURM_OPTIONS, reference_executor, slurm_provider

OPTIONS = dict(SLURM_OPTIONS)


def make_config(run_dir, options):
    training = HighThroughputExecutor(
        label="training",
        address=options["address"],
        max_workers_per_node=1,  # one training at a time owns the node (torch threads, ranks)
        encrypted=True,
        provider=slurm_provider(options, nodes_per_block=1, launcher=SimpleLauncher(), max_blocks=1),
    )
    return Config(
        executors=[reference_executor(options), training],
        run_dir=str(run_dir),
        retries=0,
        max_idletime=60,
        usage_tracking=0,
    )
