"""This machine: one HighThroughputExecutor on a LocalProvider, one worker per core.

GPAW jobs started here use `mpiexec` directly (no batch scheduler to share nodes); with R ranks per
job, `workers` ≈ cores / R keeps the machine from being oversubscribed.
"""

import os

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.jobs.error_handlers import windowed_error_handler
from parsl.providers import LocalProvider

from pipeline.execution.options import PositiveInt, String
from pipeline.execution.sites import SiteOptions, worker_environment


class Options(SiteOptions):
    workers: PositiveInt | None = None  # worker processes; default: the machine's cores
    worker_init: String | None = None  # shell lines run before the workers start; else $NFT_WORKER_INIT


def make_config(run_dir, options: Options) -> Config:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return Config(
        executors=[
            HighThroughputExecutor(
                label="local",
                address="127.0.0.1",
                max_workers_per_node=options.workers or cores,
                cores_per_worker=1,
                encrypted=True,  # CurveZMQ: other users of a shared machine can reach these local ports
                heartbeat_period=2,
                heartbeat_threshold=20,  # a lost worker pool fails its jobs after 20 s (they are retried); a loaded pool still beats
                poll_period=10,
                # a lost block is replaced; three failed blocks in a row (a broken worker_init) fail the run
                block_error_handler=windowed_error_handler,
                provider=LocalProvider(
                    init_blocks=1,
                    min_blocks=1,
                    max_blocks=1,
                    worker_init=worker_environment(options.worker_init, end_with_driver=True),  # workers die with the driver
                ),
            )
        ],
        run_dir=str(run_dir),
        retries=0,
        strategy="simple",  # starts a fresh block when the one block is lost and jobs are waiting
        # the one block starts at the poller's first tick: 0.25 s instead of Parsl's 5 s saves ~5 s of
        # every `nft run` (provider status is still polled at the provider's own interval)
        strategy_period=0.25,
        usage_tracking=0,
        initialize_logging=True,
    )
