"""What `nft status` reports and `nft export` writes: read from the campaign database only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.campaign.config import CampaignConfig
from pipeline.campaign.history import CONVERGED, best_iteration, history_entry, stall_diagnosis, stop_reason
from pipeline.campaign.files import MODEL_NAME
from pipeline.campaign.calibration import calibration
from pipeline.campaign.metrics import fit_determination
from pipeline.campaign.training_set import chunk_labels, training_structures
from pipeline.errors import BadInput
from pipeline.storage.engine import DatabaseError
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
    history_entries = [history_entry(record, metrics.get(record.iteration)) for record in history]
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
        "calibration": calibration(metrics, labels),
        "fit": fit_determination(metrics[max(metrics)]) if metrics else None,
    }


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
