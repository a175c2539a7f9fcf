"""What `nft status` reports and `nft export` writes: read from the campaign database only."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from pipeline.campaign.config import CampaignConfig
from pipeline.campaign.history import (
    CONVERGED,
    best_iteration,
    history_entry,
    numbered_targets,
    stall_diagnosis,
    stop_reason,
    target_numbers,
)
from pipeline.campaign.files import MODEL_NAME
from pipeline.campaign.calibration import calibration
from pipeline.campaign.metrics import fit_determination
from pipeline.campaign.training_set import chunk_labels, training_structures
from pipeline.errors import BadInput
from pipeline.storage.engine import DatabaseError
from pipeline.storage.lease import owner_is_gone
from pipeline.storage.store import CampaignStore, UnknownCampaign

FAILED_JOBS_SHOWN = 20
"""Failed jobs `nft status` lists (with attempts and the last attempt's reason); `jobs` counts all."""


def open_existing_store(config: CampaignConfig) -> CampaignStore:
    """The campaign's database, which must exist (nothing is created); BadInput naming it otherwise."""
    try:
        return CampaignStore.open(config.database_url, config.name, create=False, files_root=config.workdir)
    except UnknownCampaign as error:
        raise BadInput(f"{config.path.name}: campaign.name: {error}") from None
    except DatabaseError as error:
        raise BadInput(f"{config.path.name}: campaign.database: {error} (has `nft run` been started?)") from None


def campaign_status(config: CampaignConfig) -> dict[str, Any]:
    """Iterations, max δ (eV/Å), chunks and reference jobs of a campaign (its own, in a database
    shared with others; `reused_jobs` done ones another campaign computed), from its database; for
    a campaign that stopped without converging, why it stalled (`stall`, see docs/campaign.md)."""
    with open_existing_store(config) as store:
        history = store.iterations()
        counts = store.summary()
        failed = store.jobs(status="failed")
        metrics = {record.iteration: record.metrics for record in store.models()}
        labels = chunk_labels(store, config.parent.name, config.parent.physics())
        numbers = target_numbers(store, config)
    history_entries = [numbered_targets(history_entry(record, metrics.get(record.iteration)), numbers) for record in history]
    best = best_iteration(history)
    reason = stop_reason(history, config)
    pending = counts.jobs.get("pending", 0) + counts.jobs.get("running", 0)
    finished = reason is not None and pending == 0
    model = config.workdir / MODEL_NAME
    return {
        "campaign": config.name,
        "workdir": str(config.workdir),
        "database": store.name,
        "threshold": config.threshold,
        "iterations": len(history),
        "converged": reason == CONVERGED,
        "finished": finished,
        "stop_reason": reason,
        "latest_uncertainty": history[-1].max_delta if history else None,
        "best_uncertainty": best.max_delta if best else None,
        "best_iteration": best.iteration if best else None,
        "model": str(model) if model.is_file() else None,
        "chunks": counts.chunks,
        "reference_atoms": counts.reference_atoms,
        "jobs": counts.jobs,
        "reused_jobs": counts.reused,
        "database_note": store.migration_note,
        "failed_jobs": [
            {
                "id": job.id,
                "structure": job.structure_id,
                "attempts": job.attempts,
                "error": (job.error or "").splitlines()[0] if job.error else "",
            }
            for job in failed[:FAILED_JOBS_SHOWN]
        ],
        "history": history_entries,
        "stall": stall_diagnosis(history_entries[-1], reason, config) if finished and history_entries else None,
        "calibration": calibration(metrics, labels, members=config.file.model.ensemble),
        "fit": fit_determination(metrics[max(metrics)]) if metrics else None,
        "relaxations": unfinished_relaxations(config),
    }


def unfinished_relaxations(config: CampaignConfig) -> list[dict[str, Any]]:
    """The campaign's `nft relax` runs that have not finished, each with its `state`: "running" (its
    process lives), "interrupted" (it is gone: run it again to resume), or "running or interrupted"
    (it ran on another host, or before nft recorded its process); the step, fmax and δ (eV/Å) it
    last wrote and its target fmax. While one runs, `nft relax` drives the campaign: it adds chunks
    and trains new iterations."""
    from pipeline.campaign.report import recorded_relaxations  # report reads this module's status

    unfinished = []
    for relaxation in recorded_relaxations(config):
        if relaxation.get("finished"):
            continue
        driver = relaxation.get("driver")
        if not driver:
            state = "running or interrupted"
        elif owner_is_gone(driver):
            state = "interrupted"
        else:
            state = "running" if driver.rpartition(":")[0] == socket.gethostname() else "running or interrupted"
        last = relaxation["steps"][-1]
        unfinished.append(
            {
                "state": state,
                "driver": driver,
                "output": relaxation.get("output"),
                "steps_file": relaxation["file"],
                "step": last["step"],
                "fmax": last["fmax"],
                "delta": last["delta"],
                "fmax_target": relaxation.get("fmax"),
            }
        )
    return unfinished


def export_training_set(config: CampaignConfig, output: Path) -> int:
    """Write the training set as extxyz: full structures with energy and forces, chunk rows (in the
    configured training environment) with a per-atom `force_mask` that flags the central atom, in
    training order and at full float precision, so `nft train` on it trains the campaign's rows.
    Returns the number of images."""
    from pipeline.storage.structure_file import write_labelled_extxyz

    with open_existing_store(config) as store:
        training_set = training_structures(
            store, config.parent.name, config.parent.physics(), config.file.chunks.training_environment, config.file.model.cutoff
        )
    try:
        write_labelled_extxyz(output, training_set)
    except OSError as error:
        raise BadInput(f"-o: cannot write {output} ({error.strerror or error})") from None
    return len(training_set)
