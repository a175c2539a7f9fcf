"""The work that Parsl ships to workers: reference calculations, ensemble training, prediction.

The jobs are plain functions of plain data (callable without Parsl); `make_apps(config)` wraps them
as Parsl `python_app`s routed by executor label:

    reference  -> executor labelled "reference"
    training   -> executor labelled "training"
    prediction -> "prediction", else "training"

A site with one executor runs everything there. On an `MPIExecutor` every app passes
`parsl_resource_specification` (whole nodes): a reference job its MPI ranks, which it launches with
``$PARSL_MPI_PREFIX``; a training job its torch.distributed world size.

Training and prediction run on the `device` they are given ("auto", "cpu", "cuda"); "auto" is the
worker's ``$NFT_DEVICE`` when its site sets one (slurm_gpu: cuda), else cuda when torch sees a GPU.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

from parsl.app.app import python_app
from parsl.config import Config
from parsl.dataflow.futures import AppFuture
from parsl.executors import MPIExecutor
from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost

from pipeline.execution.parents import Parent
from pipeline.execution.payloads import TargetPrediction
from pipeline.execution.sites import SiteError
from pipeline.science.initial_sets import CELL_RELAX_FMAX, CELL_RELAX_STEPS

SITE_DEVICE_VARIABLE = "NFT_DEVICE"
"""Set by a site's worker_init to the device its workers train and predict on when asked for "auto"."""

T = TypeVar("T")

LOST_WORKER_RETRIES = 2
"""How many times a training or prediction job whose worker was lost is submitted again."""

ROUTES: dict[str, tuple[str, ...]] = {
    "reference": ("reference",),
    "training": ("training",),
    "prediction": ("prediction", "training"),
}


# ---------------------------------------------------------------------------------------------
# Jobs: what runs on a worker.


def reference_job(
    calculator: str,
    options: Mapping[str, Any] | None,
    payload: Mapping[str, Any],
    job_dir: str | None = None,
    attempt: int = 1,
    parsl_resource_specification: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Energy (eV) and forces (eV/Å) of one structure by the parent `calculator` with `options` (its
    `model_dump()`; see `Parent.run`), attempt number `attempt` of the job.

    An attempt past the parent's `walltime_s` raises `WalltimeExceeded` (`within_walltime`; a parent
    that `stops_at_walltime` does so itself). `parsl_resource_specification` is Parsl's (MPI ranks
    and nodes); the launch prefix it yields reaches the job as ``$PARSL_MPI_PREFIX``.
    """
    from pipeline.execution.parents import parent_for

    parent = parent_for(calculator, options)
    return _limited(parent, lambda: parent.run(payload, job_dir, attempt))


def cell_relaxation_job(
    calculator: str,
    options: Mapping[str, Any] | None,
    payload: Mapping[str, Any],
    job_dir: str | None = None,
    attempt: int = 1,
    fmax: float = CELL_RELAX_FMAX,
    steps: int = CELL_RELAX_STEPS,
    parsl_resource_specification: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`reference_job` for a cell relaxation (`Parent.relax_cell`, to `fmax` eV/Å or `steps` steps):
    energy (eV) and forces (eV/Å) of the relaxed cell, and its `final_positions` and `final_cell` (Å)."""
    from pipeline.execution.parents import parent_for

    parent = parent_for(calculator, options)
    return _limited(parent, lambda: parent.relax_cell(payload, job_dir, attempt, fmax, steps))


def _limited(parent: Parent, call: Callable[[], T]) -> T:
    """`call()` within the parent's `walltime_s` (unless the parent stops itself there)."""
    if parent.walltime_s is None or parent.stops_at_walltime:
        return call()
    return within_walltime(call, parent.walltime_s, parent.name)


def within_walltime(call: Callable[[], T], walltime_s: float, what: str) -> T:
    """`call()`, stopped by `WalltimeExceeded` once it has run `walltime_s` seconds.

    A SIGALRM timer on the main thread (where an HTEX or MPI worker runs its task) interrupts sleeps,
    blocking system calls and Python code, not one C call that never returns; off the main thread
    (a ThreadPoolExecutor) the call runs unlimited. A timer already set (pytest-timeout's) is put
    back afterwards with what it had left.
    """
    from pipeline.execution.parents import WalltimeExceeded

    if threading.current_thread() is not threading.main_thread():
        return call()

    def stop(signum: int, frame: Any) -> None:
        raise WalltimeExceeded(f"{what}: exceeded walltime_s = {walltime_s:g} s")

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, stop)
    earlier_delay, earlier_interval = signal.setitimer(signal.ITIMER_REAL, walltime_s)
    try:
        return call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if earlier_delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(earlier_delay - (time.monotonic() - started), 1e-3), earlier_interval)


def training_job(
    structures_payload: Sequence[Mapping[str, Any]],
    settings_dump: Mapping[str, Any],
    model_path: str,
    world_size: int | None = None,
    start_model_path: str | None = None,
    elements: Sequence[int] | None = None,
    progress_path: str | None = None,
    parsl_resource_specification: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train an ensemble on labelled structures (`payloads.labelled_to_payload` form), write `model_path`.

    `settings_dump` is `TrainingSettings.model_dump(mode="json")` (validated again here, keys left
    out keep their defaults); `elements` are the model's atomic numbers (default: the data's).
    `start_model_path` (the previous iteration's model file) warm-starts the members it matches.

    `world_size` > 1 shards the members over that many torch.distributed processes; None takes
    `num_ranks` of the Parsl resource specification where an MPIExecutor runs the job, else the
    number of visible GPUs when training on cuda, else 1. The settings' device "auto" becomes the
    worker's device (`worker_device`). `progress_path` (optional) receives the training's progress
    as JSON lines (`training_progress.ProgressWriter`; rank 0's members when distributed).
    Returns the training metrics (force MAE eV/Å, energy RMSE eV/atom, epochs), device and wall time.
    """
    from pipeline.science.settings import TrainingSettings

    start = time.perf_counter()
    settings = TrainingSettings.model_validate(dict(settings_dump))
    settings = settings.with_changes(device=worker_device(settings.device))
    world_size = world_size or int((parsl_resource_specification or {}).get("num_ranks") or 0) or _default_world_size(settings.device)
    if world_size > 1:
        from pipeline.execution.distributed_training import train_distributed

        metrics = train_distributed(
            structures_payload,
            settings,
            model_path,
            world_size,
            start_model_path=start_model_path,
            elements=elements,
            progress_path=progress_path,
        )
    else:
        from pipeline.execution.payloads import payload_to_labelled
        from pipeline.execution.training_progress import ProgressWriter
        from pipeline.science.training import train_ensemble
        from pipeline.storage.model_file import load_ensemble, save_model

        structures = [payload_to_labelled(dict(item)) for item in structures_payload]
        start_model = load_ensemble(start_model_path) if start_model_path else None
        progress = ProgressWriter(progress_path) if progress_path else None
        model, report = train_ensemble(structures, settings, progress=progress, start_from=start_model, elements=elements)
        save_model(model, model_path)
        metrics = asdict(report)
    metrics.update(
        wall_time_s=time.perf_counter() - start,
        world_size=metrics.get("world_size", world_size),
        device=metrics.get("device") or _device_name(settings.device),
        host=socket.gethostname(),
        model_path=str(model_path),
    )
    return metrics


def prediction_job(
    model_path: str,
    payloads: Sequence[Mapping[str, Any]],
    device: str = "auto",
    with_features: bool = False,
    parsl_resource_specification: Mapping[str, Any] | None = None,
) -> list[TargetPrediction]:
    """Ensemble prediction per structure (`TargetPrediction`): energy (eV), forces (eV/Å), per-atom
    δ_i (eV/Å) and the energy-based per-atom δE_i (eV); with `with_features`, also each atom's
    scaled model features (N × F, for selection in descriptor space).

    In the calculator's precision and block size (`PREDICTION_DTYPE`, `PREDICTION_BLOCK_SIZE`), on
    `device` ("auto": the worker's, see `worker_device`).
    """
    from pipeline.science.calculator import PREDICTION_BLOCK_SIZE, PREDICTION_DTYPE
    from pipeline.science.structures import payload_to_atoms
    from pipeline.storage.model_file import load_ensemble

    model = load_ensemble(model_path, dtype=PREDICTION_DTYPE, device=worker_device(device))
    results = []
    for payload in payloads:
        prediction = model.predict(payload_to_atoms(dict(payload)), block_size=PREDICTION_BLOCK_SIZE, with_features=with_features)
        results.append(
            TargetPrediction(
                energy=prediction.energy,
                forces=prediction.forces,
                uncertainties=prediction.uncertainties,
                energy_uncertainties=prediction.energy_uncertainties,
                features=prediction.features,
            )
        )
    return results


def worker_device(device: str) -> str:
    """The device a job on this worker uses: `device`, or for "auto" the site's ``$NFT_DEVICE``
    when set (a GPU site demands its GPUs: no silent fall-back to the CPU), else "auto"."""
    if device == "auto":
        return os.environ.get(SITE_DEVICE_VARIABLE) or "auto"
    return device


def _default_world_size(device: str) -> int:
    """One process per visible GPU when training on cuda, else 1."""
    from pipeline.science.device import resolve_device

    if resolve_device(device).type != "cuda":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def _device_name(device: str) -> str:
    from pipeline.science.device import resolve_device

    return resolve_device(device).type


# ---------------------------------------------------------------------------------------------
# Apps: the jobs bound to a site's executors.

Executors = list[str] | Literal["all"]
"""The executor labels an app runs on, or "all" (a single-executor site)."""


def route(config: Config, role: str) -> Executors:
    """Executor labels for an app role, or 'all' on a single-executor site."""
    labels = [executor.label for executor in config.executors]
    for label in ROUTES[role]:
        if label in labels:
            return [label]
    if len(labels) == 1:
        return "all"
    raise SiteError(f"site has executors {labels} but none for {role} jobs (label one of them {' or '.join(map(repr, ROUTES[role]))})")


@dataclass(frozen=True)
class SiteApps:
    """Parsl apps of one loaded site. Each call returns an `AppFuture`.

    On an `MPIExecutor` every app passes a resource specification (whole nodes): a reference job
    its MPI ranks, a training job its world size, a prediction one rank.
    """

    reference_executors: Executors
    training_executors: Executors
    prediction_executors: Executors
    reference_is_mpi: bool = False
    training_is_mpi: bool = False
    prediction_is_mpi: bool = False
    lost_worker_retries: int = LOST_WORKER_RETRIES

    @staticmethod
    def is_lost_worker(error: BaseException) -> bool:
        """Whether `error` says a job's worker was lost (its worker process, worker pool or node
        gone) rather than that the job failed. Such a job deserves another try, which the
        executor's next block (started once the lost one is seen gone) runs."""
        return isinstance(error, (ManagerLost, WorkerLost))

    def reference_app(self, parent: Parent, payload: Mapping[str, Any], job_dir: str | None = None, attempt: int = 1) -> AppFuture:
        """Attempt `attempt` of a reference calculation by `parent` (sent as its name and options,
        plain data); on an MPIExecutor it reserves the job's ranks (and nodes)."""
        app = python_app(reference_job, executors=self.reference_executors)
        resources = parent.mpi_resources() if self.reference_is_mpi else None
        return app(parent.name, parent.model_dump(mode="json"), dict(payload), job_dir, attempt, **_resource_kwargs(resources))

    def cell_relaxation_app(
        self,
        parent: Parent,
        payload: Mapping[str, Any],
        job_dir: str | None = None,
        attempt: int = 1,
        fmax: float = CELL_RELAX_FMAX,
        steps: int = CELL_RELAX_STEPS,
    ) -> AppFuture:
        """Attempt `attempt` of a cell relaxation by `parent` (`cell_relaxation_job`), on the reference executors."""
        app = python_app(cell_relaxation_job, executors=self.reference_executors)
        resources = parent.mpi_resources() if self.reference_is_mpi else None
        return app(
            parent.name,
            parent.model_dump(mode="json"),
            dict(payload),
            job_dir,
            attempt,
            fmax,
            steps,
            **_resource_kwargs(resources),
        )

    def training_app(
        self,
        structures_payload: Sequence[Mapping[str, Any]],
        settings_dump: Mapping[str, Any],
        model_path: str,
        world_size: int | None = None,
        start_model_path: str | None = None,
        elements: Sequence[int] | None = None,
        progress_path: str | None = None,
    ) -> AppFuture:
        """Ensemble training; `world_size` processes (None: the site's choice, see `training_job`);
        its progress as JSON lines in `progress_path` when given."""
        app = python_app(training_job, executors=self.training_executors)
        resources = _node_resources(world_size or 1) if self.training_is_mpi else None
        return app(
            list(structures_payload),
            dict(settings_dump),
            str(model_path),
            world_size,
            start_model_path,
            list(elements) if elements else None,
            progress_path,
            **_resource_kwargs(resources),
        )

    def prediction_app(
        self, model_path: str, payloads: Sequence[Mapping[str, Any]], device: str = "auto", with_features: bool = False
    ) -> AppFuture:
        """Ensemble prediction (one `TargetPrediction` per structure: energy, forces, δ_i; scaled
        features if asked) on plain-data structures, on `device`."""
        app = python_app(prediction_job, executors=self.prediction_executors)
        resources = _node_resources(1) if self.prediction_is_mpi else None
        payload_list = [dict(payload) for payload in payloads]
        return app(str(model_path), payload_list, device, with_features, **_resource_kwargs(resources))


def make_apps(config: Config) -> SiteApps:
    """Bind the jobs to the executors of `config` (which must be the loaded one)."""
    routes = {role: route(config, role) for role in ROUTES}

    def on_mpi(labels: Executors) -> bool:
        chosen = [e for e in config.executors if labels == "all" or e.label in labels]
        return all(isinstance(executor, MPIExecutor) for executor in chosen)

    return SiteApps(
        reference_executors=routes["reference"],
        training_executors=routes["training"],
        prediction_executors=routes["prediction"],
        reference_is_mpi=on_mpi(routes["reference"]),
        training_is_mpi=on_mpi(routes["training"]),
        prediction_is_mpi=on_mpi(routes["prediction"]),
    )


def _resource_kwargs(resources: dict[str, Any] | None) -> dict[str, Any]:
    return {} if resources is None else {"parsl_resource_specification": resources}


def _node_resources(ranks: int) -> dict[str, Any]:
    return {"num_nodes": 1, "num_ranks": int(ranks), "ranks_per_node": int(ranks)}
