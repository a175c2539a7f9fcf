"""Ensemble training spread over torch.distributed processes: members sharded over ranks.

Each rank trains its contiguous block of member seeds in one batched pass (the science core's
`train_ensemble` with `member_seeds`); rank 0 gathers the members, in order, into one model file.
Members are independent (own seed, own loss, element-wise Adam), so the result equals one process
training all members, up to float round-off. Not exactly so with `bootstrap`, `validation_fraction`
or `lbfgs_steps`: the science core draws bootstrap samples from one stream, stops early and line-
searches L-BFGS over all members together; the sharded ensemble is then as valid, not identical.

`train_distributed` launches ``python -m torch.distributed.run --standalone --nproc-per-node W``;
the ranks run `main` here. The settings' device decides the backend: on cuda NCCL, each rank on its
local GPU (``LOCAL_RANK``; at most one rank per visible GPU); on cpu gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.science.settings import TrainingSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def member_shards(seeds: Sequence[int], world_size: int) -> list[list[int]]:
    """Contiguous blocks of member seeds, one per rank, that concatenate back to `seeds`."""
    return [[int(seed) for seed in block] for block in np.array_split(np.asarray(seeds, dtype=np.int64), world_size)]


def merge_member_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One ensemble state from shard states: member-stacked network tensors concatenated in rank
    order; everything else (feature scaling, energy offsets) taken from the first shard."""
    import torch

    merged: dict[str, Any] = {}
    for name, first in states[0].items():
        if name.startswith("networks."):
            merged[name] = torch.cat([state[name] for state in states], dim=0)
        else:
            merged[name] = first
    return merged


def train_distributed(
    structures_payload: Sequence[Mapping[str, Any]],
    settings: "TrainingSettings",
    model_path: str | os.PathLike,
    world_size: int,
    backend: str = "auto",
    timeout_s: float | None = None,
    start_model_path: str | os.PathLike | None = None,
    elements: Sequence[int] | None = None,
    progress_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train with `world_size` processes (at most one per member, and one per GPU on cuda); write
    `model_path`; return metrics. `backend` "auto" is NCCL when the device is cuda, else gloo.
    Rank 0 writes its members' progress to `progress_path` when given (`training_progress`).

    Raises RuntimeError with the tail of the ranks' output when the launch fails, ValueError for the
    device "cuda" without a GPU.
    """
    import torch

    from pipeline.science.device import resolve_device

    device = resolve_device(settings.device).type  # "auto" decided once, here, for every rank
    settings = settings.with_changes(device=device)
    world_size = max(1, min(int(world_size), len(settings.seeds())))
    if device == "cuda":
        world_size = min(world_size, torch.cuda.device_count())
    if backend == "auto":
        backend = _default_backend(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nft-ddp-") as scratch:
        spec_file, report_file = Path(scratch) / "spec.json", Path(scratch) / "report.json"
        spec_file.write_text(
            json.dumps(
                {
                    "structures": list(structures_payload),
                    "settings": settings.model_dump(mode="json"),
                    "elements": list(elements) if elements else None,
                    "model_path": str(Path(model_path).resolve()),
                    "backend": backend,
                    "report_path": str(report_file),
                    "start_model_path": str(Path(start_model_path).resolve()) if start_model_path else None,
                    "progress_path": str(Path(progress_path).resolve()) if progress_path else None,
                }
            )
        )
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(world_size),
            "-m",
            "pipeline.execution.distributed_training",
            str(spec_file),
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = str(max(1, _cores() // world_size))
        try:
            completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"distributed training timed out after {timeout_s} s") from None
        if completed.returncode != 0 or not report_file.exists():
            rank_errors = [path.read_text() for path in sorted(Path(scratch).glob("rank*.error"))]
            output = (completed.stdout + "\n" + completed.stderr).strip().splitlines()
            raise RuntimeError(
                f"distributed training ({world_size} x {backend}) exited with code {completed.returncode}:\n"
                + ("\n".join(rank_errors) if rank_errors else "\n".join(output[-30:]))
            )
        metrics = json.loads(report_file.read_text())
    metrics.update(world_size=world_size, backend=backend, device=device, launch_wall_time_s=time.perf_counter() - start)
    return metrics


def main(argv: Sequence[str]) -> int:
    """One rank: train this rank's members; rank 0 gathers, writes the model and the metrics.

    An exception is also written to ``rank<R>.error`` beside the spec, for the launcher's message.
    """
    try:
        return _rank_main(Path(argv[0]))
    except BaseException as error:
        rank = os.environ.get("RANK", "?")
        error_file = Path(argv[0]).parent / f"rank{rank}.error"
        error_file.write_text(f"rank {rank}: {type(error).__name__}: {error}")
        raise


def _rank_main(spec_file: Path) -> int:
    import torch
    import torch.distributed as dist

    from pipeline.execution.payloads import payload_to_labelled
    from pipeline.execution.training_progress import ProgressWriter
    from pipeline.science.model import EnsembleModel
    from pipeline.science.settings import TrainingSettings
    from pipeline.science.training import train_ensemble
    from pipeline.storage.model_file import load_ensemble
    from pipeline.storage.atomic import write_text_atomically

    spec = json.loads(spec_file.read_text())
    backend = spec["backend"]
    if spec["settings"].get("device") == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # "cuda" is then this rank's GPU
    dist.init_process_group(backend=backend)
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        structures = [payload_to_labelled(item) for item in spec["structures"]]
        settings = TrainingSettings.model_validate(spec["settings"])
        shard = member_shards(settings.seeds(), world_size)[rank]
        started = time.perf_counter()
        start = load_ensemble(spec["start_model_path"]) if spec.get("start_model_path") else None
        progress = ProgressWriter(spec["progress_path"]) if rank == 0 and spec.get("progress_path") else None
        model, report = train_ensemble(
            structures,
            settings,
            progress=progress,
            start_from=start,
            elements=spec.get("elements"),
            member_seeds=shard,
            ensemble_losses=_gathered_losses,
        )
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        shard_summary = {
            "rank": rank,
            "members": len(shard),
            "epochs_run": report.epochs_run,
            "final_loss": report.final_loss,
            "warm_started": report.warm_started,
            "wall_time_s": time.perf_counter() - started,
        }
        gathered: list[Any] | None = [None] * world_size if rank == 0 else None
        dist.gather_object((state, shard_summary), gathered, dst=0)
        if gathered is not None:  # rank 0
            from pipeline.storage.model_file import save_model

            merged = EnsembleModel(
                model.params, hidden=settings.hidden, member_seeds=settings.seeds(), element_networks=settings.element_networks
            )
            merged.load_state_dict(merge_member_states([item[0] for item in gathered]))
            merged.eval()
            save_model(merged, spec["model_path"])
            metrics = ensemble_metrics(merged, structures)
            metrics["shards"] = [item[1] for item in gathered]
            metrics["epochs_run"] = max(item[1]["epochs_run"] for item in gathered)
            metrics["final_loss"] = float(sum(item[1]["final_loss"] for item in gathered))
            metrics["warm_started"] = all(item[1]["warm_started"] for item in gathered)
            metrics.update(
                element_residuals=report.element_residuals, element_weights=report.element_weights, weight_decay=report.weight_decay
            )  # the same data on every rank
            write_text_atomically(spec["report_path"], json.dumps(metrics))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _gathered_losses(losses: Any) -> Any:
    """Every rank's member losses, in rank order (= member order: `member_shards` is contiguous);
    a collective, so every rank calls it at the same point of training."""
    import torch
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, losses.detach().cpu().tolist())
    return torch.tensor([value for shard in gathered for value in shard], dtype=losses.dtype)


def ensemble_metrics(model: Any, structures: Sequence[Any]) -> dict[str, Any]:
    """Training errors of the ensemble mean over all structures: force MAE (eV/Å), energy RMSE (eV/atom)."""
    from pipeline.science.training_data import force_mae, predict_labels, prepare_training_data

    data = prepare_training_data(structures, model.descriptor)
    every = np.ones(len(structures), dtype=bool)
    energies, _ = predict_labels(model, data, create_graph=False)
    rmse = float("nan")
    if len(data.energies):
        rmse = float((((energies.mean(0) - data.energies) / data.energy_atoms) ** 2).mean().sqrt())
    return {"train_force_mae": force_mae(model, data, every), "train_energy_rmse_per_atom": rmse, "validation_force_mae": None}


def _default_backend(device: str) -> str:
    """NCCL for ranks on GPUs (when torch has it), gloo on CPU."""
    import torch.distributed

    return "nccl" if device == "cuda" and torch.distributed.is_nccl_available() else "gloo"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
