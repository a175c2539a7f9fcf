"""A Slurm cluster with GPU nodes: chunk jobs on CPU nodes (as `slurm.py`), ensemble training and
prediction on a GPU node (``--gpus-per-node``; torch.distributed over its GPUs with NCCL).

Options: those of `slurm.py`, plus gpu_partition (else ``$NFT_SLURM_GPU_PARTITION``, else the CPU
partition), gpus_per_node (default 1) and device (default "cuda": what a campaign's
``model.device = "auto"`` means on the GPU node; a node whose torch sees no GPU then fails the
training job instead of training on its CPUs; "auto" lets such a node fall back to the CPU).
"""
import os

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SimpleLauncher

from pipeline.execution.apps import SITE_DEVICE_VARIABLE
from pipeline.execution.slurm_blocks import SLURM_OPTIONS, reference_executor, slurm_provider

OPTIONS = {**SLURM_OPTIONS, "gpu_partition": None, "gpus_per_node": 1, "device": "cuda"}


def make_config(run_dir, options):
    if options["device"] not in ("auto", "cuda"):
        raise ValueError(f"device must be 'cuda' or 'auto' on a GPU site, got {options['device']!r}")
    training = HighThroughputExecutor(
        label="training",  # also runs prediction (no "prediction" executor)
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
    # the GPU node's workers train and predict on `device` when the campaign says "auto"
    training.provider.worker_init += f"\nexport {SITE_DEVICE_VARIABLE}={options['device']}"
    return Config(
        executors=[reference_executor(options), training],
        run_dir=str(run_dir),
        retries=0,
        max_idletime=60,
        usage_tracking=0,
    )
