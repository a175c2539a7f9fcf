"""The work that Parsl ships to workers: reference calculations, ensemble training, prediction.

The jobs are plain functions of plain data (callable without Parsl); `make_apps(config)` wraps them
as Parsl `python_app`s routed by executor label:

    reference  -> executor labelled "reference"
    training   -> executor labelled "training"
    prediction -> "prediction", else "training"

A site with one executor runs everything there. On an `MPIExecutor` a reference job asks for its MPI
ranks through `parsl_resource_specification`, and the job launches with ``$PARSL_MPI_PREFIX``.
"""
from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from parsl.app.app import python_app
from parsl.dataflow.futures import AppFuture
from parsl.config import Config
from parsl.executors import MPIExecutor

from pipeline.execution.sites import SiteError

ROUTES: dict[str, tuple[str, ...]] = {
    "reference": ("reference",),
    "training": ("training",),
    "prediction": ("prediction", "training"),
}


# ---------------------------------------------------------------------------------------------
# Jobs: what runs on a worker.

def reference_job(
    calculator: str,
    params: Mapping[str, Any] | None,
    payload: Mapping[str, Any],
    job_dir: str | None = None,
    parsl_resource_specification: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Energy and forces of one structure by the parent calculator (see `parents.compute_reference`).

    `parsl_resource_specification` is Parsl's (MPI ranks and nodes); the launch prefix it yields
    reaches the job as ``$PARSL_MPI_PREFIX``.
    """
    from pipeline.execution.parents import compute_reference

    return compute_reference(calculator, params, payload, job_dir)


def training_job(
    structures_payload: Sequence[Mapping[str, Any]],
    settings_dict: Mapping[str, Any],
    model_path: str,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Train an ensemble on labelled structures (`payloads.labelled_to_payload` form), write `model_path`.

    `world_size` > 1 shards the members over that many torch.distributed processes; None takes
    ``$PARSL_NUM_RANKS`` where an MPIExecutor set it, else the number of visible GPUs, else 1.
    Returns the training metrics (force MAE eV/Å, energy RMSE eV/atom, epochs) and wall time.
    """
    start = time.perf_counter()
    world_size = world_size or _default_world_size()
    if world_size > 1:
        from pipeline.execution.distributed_training import train_distributed

        metrics = train_distributed(structures_payload, settings_dict, model_path, world_size)
    else:
        from pipeline.execution.payloads import payload_to_labelled
        from pipeline.science.training import TrainingSettings, train_ensemble
        from pipeline.storage.model_file import save_model

        structures = [payload_to_labelled(dict(item)) for item in structures_payload]
        model, report = train_ensemble(structures, TrainingSettings(**dict(settings_dict)))
        save_model(model, model_path)
        metrics = asdict(report)
    metrics.update(
        wall_time_s=time.perf_counter() - start,
        world_size=world_size,
        host=socket.gethostname(),
        model_path=str(model_path),
    )
    return metrics


def prediction_job(model_path: str, payloads: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Ensemble prediction per structure: energy (eV), forces (eV/Å), per-atom δ_i (eV/Å), δ = max δ_i."""
    from pipeline.science.structures import payload_to_atoms
    from pipeline.storage.model_file import load_ensemble

    model = load_ensemble(model_path)
    results = []
    for payload in payloads:
        prediction = model.predict(payload_to_atoms(dict(payload)))
        uncertainties = [float(value) for value in prediction.uncertainties]
        results.append(
            {
                "energy": float(prediction.energy),
                "forces": [[float(v) for v in row] for row in prediction.forces],
                "uncertainties": uncertainties,
                "uncertainty": max(uncertainties, default=0.0),
            }
        )
    return results


def _default_world_size() -> int:
    if os.environ.get("PARSL_NUM_RANKS"):
        return max(1, int(os.environ["PARSL_NUM_RANKS"]))
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


# ---------------------------------------------------------------------------------------------
# Apps: the jobs bound to a site's executors.

def route(config: Config, role: str) -> list[str] | str:
    """Executor labels for an app role, or 'all' on a single-executor site."""
    labels = [executor.label for executor in config.executors]
    for label in ROUTES[role]:
        if label in labels:
            return [label]
    if len(labels) == 1:
        return "all"
    raise SiteError(
        f"site has executors {labels} but none for {role} jobs (label one of them {' or '.join(map(repr, ROUTES[role]))})"
    )


@dataclass(frozen=True)
class SiteApps:
    """Parsl apps of one loaded site. Each call returns an `AppFuture`."""

    reference_executors: list[str] | str
    training_executors: list[str] | str
    prediction_executors: list[str] | str
    reference_is_mpi: bool

    def reference_app(self, calculator: str, params: Mapping[str, Any] | None, payload: Mapping[str, Any], job_dir: str | None = None) -> AppFuture:
        """A reference calculation; on an MPIExecutor it reserves the job's ranks (and nodes)."""
        app = python_app(reference_job, executors=self.reference_executors)
        if not self.reference_is_mpi:
            return app(calculator, dict(params or {}), dict(payload), job_dir)
        return app(
            calculator, dict(params or {}), dict(payload), job_dir,
            parsl_resource_specification=mpi_resources(calculator, params),
        )

    def training_app(self, structures_payload: Sequence[Mapping[str, Any]], settings_dict: Mapping[str, Any], model_path: str, world_size: int | None = None) -> AppFuture:
        app = python_app(training_job, executors=self.training_executors)
        return app(list(structures_payload), dict(settings_dict), str(model_path), world_size)

    def prediction_app(self, model_path: str, payloads: Sequence[Mapping[str, Any]]) -> AppFuture:
        app = python_app(prediction_job, executors=self.prediction_executors)
        return app(str(model_path), [dict(payload) for payload in payloads])


def make_apps(config: Config) -> SiteApps:
    """Bind the jobs to the executors of `config` (which must be the loaded one)."""
    reference = route(config, "reference")
    reference_executors = config.executors if reference == "all" else [e for e in config.executors if e.label in reference]
    return SiteApps(
        reference_executors=reference,
        training_executors=route(config, "training"),
        prediction_executors=route(config, "prediction"),
        reference_is_mpi=all(isinstance(executor, MPIExecutor) for executor in reference_executors),
    )


def mpi_resources(calculator: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Parsl MPI resource specification of one reference job: its ranks, on whole nodes."""
    from pipeline.execution.parents import validate_parent_params

    complete = validate_parent_params(calculator, params)
    ranks = int(complete.get("ranks", 1))
    ranks_per_node = int(complete.get("ranks_per_node") or ranks)
    return {
        "num_nodes": max(1, math.ceil(ranks / ranks_per_node)),
        "num_ranks": ranks,
        "ranks_per_node": min(ranks, ranks_per_node),
        "launcher_options": " ".join(complete.get("launcher_args", [])),
    }
