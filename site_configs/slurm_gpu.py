"""A Slurm cluster with GPU nodes: chunk jobs on CPU nodes (as `slurm.py`), ensemble training on a
GPU node (``--gpus-per-node``; torch.distributed over its GPUs with NCCL).

Options: those of `slurm.py`, plus gpu_partition (else ``$NFT_SLURM_GPU_PARTITION``, else the CPU
partition) and gpus_per_node (default 1).
"""
import os

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SimpleLauncher

from pipeline.execution.slurm_blocks import SLURM_OPTIONS, reference_executor, slurm_provider

OPTIONS = {**SLURM_OPTIONS, "gpu_partition": None, "gpus_per_node": 1}


def make_config(run_dir, options):
    training = HighThroughputExecutor(
        label="training",
        address=options["address"],
        max_workers_per_node=1,  # the training job spreads itself over the node's GPUs
        encrypted=True,
        provider=slurm_provider(
            options,
            nodes_per_block=1,
            launcher=SimpleLauncher(),
            partition=options["gpu_partition"] or os.environ.get("NFT_SLURM_GPU_PARTITION"),
            gpus_per_node=int(options["gpus_per_node"]),
            max_blocks=1,
        ),
    )
    return Config(
        executors=[reference_executor(options), training],
        run_dir=str(run_dir),
        retries=0,
        max_idletime=60,
        usage_tracking=0,
    )
