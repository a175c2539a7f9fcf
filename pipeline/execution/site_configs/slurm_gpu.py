"""A Slurm cluster with GPU nodes: chunk jobs on CPU nodes (as `slurm.py`), ensemble training and
prediction on a GPU node (``--gpus-per-node``; torch.distributed over its GPUs with NCCL).

Options: those of every Slurm site (`pipeline.execution.slurm_blocks.SlurmOptions`), plus the GPU
node's below.
"""

import os
from typing import Annotated, Literal

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SimpleLauncher

from pipeline.execution.apps import SITE_DEVICE_VARIABLE
from pipeline.execution.options import OneOf, PositiveInt, Text
from pipeline.execution.slurm_blocks import SlurmOptions, reference_executor, slurm_provider


class Options(SlurmOptions):
    gpu_partition: Text | None = None  # the training block's partition; else $NFT_SLURM_GPU_PARTITION, else `partition`
    gpus_per_node: PositiveInt = 1  # sbatch --gpus-per-node of the training block
    # what a campaign's model.device = "auto" means on the GPU node: "cuda" (a node whose torch sees
    # no GPU fails the training job instead of training on its CPUs) or "auto" (it falls back to the CPU)
    device: Annotated[Literal["cuda", "auto"], OneOf()] = "cuda"


def make_config(run_dir, options: Options) -> Config:
    gpu_nodes = slurm_provider(
        options,
        nodes_per_block=1,
        launcher=SimpleLauncher(),
        partition=options.gpu_partition or os.environ.get("NFT_SLURM_GPU_PARTITION"),
        gpus_per_node=options.gpus_per_node,
        max_blocks=1,
    )
    # the GPU node's workers train and predict on `device` when the campaign says "auto"
    gpu_nodes.worker_init += f"\nexport {SITE_DEVICE_VARIABLE}={options.device}"
    training = HighThroughputExecutor(
        label="training",  # also runs prediction (no "prediction" executor)
        address=options.address,
        max_workers_per_node=1,  # the training job spreads itself over the node's GPUs
        encrypted=True,
        provider=gpu_nodes,
    )
    return Config(
        executors=[reference_executor(options), training],
        run_dir=str(run_dir),
        retries=0,
        max_idletime=60,
        usage_tracking=0,
    )
