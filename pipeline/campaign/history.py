"""What a campaign's recorded history says: when it stops, its best iteration, its summary.json
history entries, where δ lives and why a campaign that stopped without converging stalled.

Shared by the driver (`loop.py`) and `nft status` (`status.py`); decided from the history alone, so
a resumed run and a status read decide the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.campaign.config import CampaignConfig
from pipeline.execution.payloads import TargetPrediction
from pipeline.storage.hashing import atoms_geometry_hash
from pipeline.storage.records import IterationRecord, ModelRecord
from pipeline.storage.store import CampaignStore

CONVERGED = "converged"
MAX_ITERATIONS = "max_iterations"
PATIENCE = "patience"
NO_NEW_CHUNKS = "no_new_chunks"

FIT = "fit"
COVERAGE = "coverage"
DELTA_LOCATION_KEYS = ("chunked_atoms", "delta_chunked_max", "delta_unchunked_max", "chunk_force_error_max", "chunk_force_error_median")
SELECTION_KEYS = ("selectable", "selected", "already_chunked", "reference_failed", "too_close", "over_limit", "carved")


# ---------------------------------------------------------------------------------------------
# Stopping rules (docs/campaign.md, "The loop"), from the history alone: a resumed run decides the same.


@dataclass(frozen=True)
class MeasuredIteration:
    """An iteration whose δ is measured but not yet recorded: selection has not run, so it has no
    chunk count yet and the stopping rules judge it by δ alone."""

    iteration: int
    max_delta: float  # eV/Å, over all targets


Iteration = IterationRecord | MeasuredIteration
"""An entry of the history the stopping rules read: recorded, or the current one before selection."""


def stop_reason(history: Sequence[Iteration], config: CampaignConfig) -> str | None:
    """converged, max_iterations, patience or no_new_chunks, or None when the campaign goes on."""
    if not history:
        return None
    last = history[-1]
    if last.max_delta < config.threshold:
        return CONVERGED
    if last.iteration >= config.file.active.max_iterations:
        return MAX_ITERATIONS
    patience = config.file.active.patience
    if patience is not None:
        best = best_iteration(history)
        if best is not None and last.iteration - best.iteration >= patience:
            return PATIENCE
    if isinstance(last, IterationRecord) and last.carved and last.chunks_added == 0:  # selection found nothing
        return no_new_chunks_reason(history, config)
    return None


def no_new_chunks_reason(history: Sequence[Iteration], config: CampaignConfig) -> str | None:
    """Nothing new to compute: stop, unless training is warm-started and either the last iteration
    still lowered δ (another round of training on the same data may lower it further) or it was a
    warm start that did not (the next iteration then trains from fresh weights, `trains_from_scratch`)."""
    if not config.file.model.warm_start or len(history) < 2:
        return NO_NEW_CHUNKS
    if history[-1].max_delta < history[-2].max_delta:
        return None
    return NO_NEW_CHUNKS if trains_from_scratch(history, history[-1].iteration) else None


def trains_from_scratch(history: Sequence[Iteration], number: int) -> bool:
    """Whether iteration `number` of a warm-started campaign trains from fresh weights instead of
    the previous model: the iteration before it was itself warm-started, found no new chunk and did
    not lower δ, so its members sit in minima where more of the same optimisation changes nothing.
    A fresh fit on all the data finds other minima (seen on Al561 with Levenberg–Marquardt: stuck
    at δ 0.158 eV/Å with every uncertain atom chunked, bench/RESULTS.md)."""
    recorded = {entry.iteration: entry for entry in history if isinstance(entry, IterationRecord)}
    restarts = False  # iterations 1 and 2: from scratch anyway, and warm
    for k in range(3, number + 1):
        previous, before = recorded.get(k - 1), recorded.get(k - 2)
        stuck = (
            previous is not None
            and before is not None
            and previous.carved
            and previous.chunks_added == 0
            and previous.max_delta >= before.max_delta
        )
        restarts = stuck and not restarts  # a restart itself stuck does not restart again
    return restarts


def best_iteration(history: Sequence[Iteration]) -> Iteration | None:
    """The iteration with the lowest max δ (the later one on ties)."""
    if not history:
        return None
    return min(history, key=lambda record: (record.max_delta, -record.iteration))


def best_model(models: Sequence[ModelRecord], history: Sequence[IterationRecord]) -> ModelRecord | None:
    """The model the campaign keeps: that of the `best_iteration` among the iterations with a model;
    the latest model when none of them has a recorded iteration. `models` in iteration order."""
    by_iteration = {model.iteration: model for model in models}
    best = best_iteration([record for record in history if record.iteration in by_iteration])
    if best is not None:
        return by_iteration[best.iteration]
    return models[-1] if models else None


def history_with_measured(history: Sequence[IterationRecord], number: int, max_delta: float) -> list[Iteration]:
    """The recorded history plus iteration `number` with its max δ (eV/Å), measured before selection."""
    return [record for record in history if record.iteration != number] + [MeasuredIteration(number, max_delta)]


def history_entry(record: IterationRecord, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One summary.json history entry; the δ-location and selection diagnostics come from the
    iteration's model metrics (null where a database from before them lacks them)."""
    metrics = metrics or {}
    location = metrics.get("delta_location") or {}
    selection = metrics.get("selection")
    return {
        "iteration": record.iteration,
        "uncertainty": record.max_delta,
        "chunks_added": record.chunks_added,
        "train_force_mae": record.train_force_mae,
        "uncertainty_per_target": {str(key): value for key, value in record.delta_per_target.items()},
        "energy_uncertainty": metrics.get("max_energy_delta"),  # max δE_i over the targets, eV
        "wall_time": dict(record.wall_time),
        **{key: location.get(key) for key in DELTA_LOCATION_KEYS},
        "selection": {key: selection.get(key) for key in SELECTION_KEYS} if selection else None,
    }


# ---------------------------------------------------------------------------------------------
# Where δ lives, and why a campaign that stops without converging stalled (docs/campaign.md).


def delta_location(predictions: Sequence[TargetPrediction], labels: Sequence[Mapping[int, np.ndarray]]) -> dict[str, Any]:
    """δ at target atoms with a labelled chunk and without one, and the model's error at the chunk
    centres, over all targets (eV/Å; None where a group is empty).

    `predictions[k]` is the model's prediction on target k (its δ_i and forces are read);
    `labels[k]` maps a chunk centre of target k to its label, the parent's force on it (3,).
    The error at a centre is |F_model − F_label|, F_model predicted on the whole target.
    """
    chunked: list[float] = []
    unchunked: list[float] = []
    errors: list[float] = []
    for prediction, centres in zip(predictions, labels):
        uncertainties, forces = prediction.uncertainties, prediction.forces
        mask = np.zeros(len(uncertainties), dtype=bool)
        mask[list(centres)] = True
        chunked.extend(uncertainties[mask].tolist())
        unchunked.extend(uncertainties[~mask].tolist())
        errors.extend(float(np.linalg.norm(forces[centre] - np.asarray(label, dtype=float))) for centre, label in centres.items())
    return {
        "chunked_atoms": len(chunked),
        "delta_chunked_max": max(chunked) if chunked else None,
        "delta_unchunked_max": max(unchunked) if unchunked else None,
        "chunk_force_error_max": max(errors) if errors else None,
        "chunk_force_error_median": float(np.median(errors)) if errors else None,
    }


def stall_diagnosis(entry: Mapping[str, Any], reason: str | None, config: CampaignConfig) -> dict[str, Any] | None:
    """Why a campaign that stopped without converging stalled, from its last history entry: a `fit`
    problem when the largest δ_i lies at an atom that already has a chunk (δ there at or above the
    threshold and at least δ elsewhere), a `coverage` problem otherwise; with the settings to change.
    None while it goes on, when it converged, or when the entry has no δ location (older database)."""
    if reason is None or reason == CONVERGED:
        return None
    chunked, unchunked = entry.get("delta_chunked_max"), entry.get("delta_unchunked_max")
    if chunked is None and unchunked is None:
        return None
    threshold = config.threshold
    selection = entry.get("selection") or {}
    if chunked is not None and chunked >= threshold and chunked >= (unchunked if unchunked is not None else -math.inf):
        steps = "model.lm_steps" if config.file.model.optimizer == "levenberg-marquardt" else "model.lbfgs_steps"
        advice = (
            f"δ is largest at atoms that already have a chunk ({chunked:.3g} eV/Å, {_text(unchunked)} at atoms "
            f"without one); the model's error at the chunk centres is {_text(entry.get('chunk_force_error_max'))} "
            f"max, {_text(entry.get('chunk_force_error_median'))} median (eV/Å): the ensemble does not fit its "
            f"training data. Raise {steps}, or check model.descriptor (finer radial "
            "shells, more angular terms); more chunks alone will not lower it."
        )
        settings = [steps, "model.descriptor"]
        return {"kind": FIT, "advice": advice, "settings": settings, "iteration": entry.get("iteration")}
    settings = []
    reasons = []
    if selection.get("over_limit"):
        settings.append("chunks.max_per_iteration")
        reasons.append(f"{selection['over_limit']} beyond chunks.max_per_iteration")
    if selection.get("too_close"):
        settings.append("chunks.min_separation")
        reasons.append(f"{selection['too_close']} closer than chunks.min_separation to a picked atom")
    if selection.get("reference_failed"):
        reasons.append(f"{selection['reference_failed']} whose chunk's reference job failed (see nft status)")
    if reason == MAX_ITERATIONS:
        settings.append("active.max_iterations")
    if reason == PATIENCE:
        settings.append("active.patience")
    if reason == NO_NEW_CHUNKS and config.file.active.select_fraction is not None:
        settings.append("active.select_fraction")
    for default in ("chunks.max_per_iteration", "active.max_iterations", "chunks.min_separation"):
        if default not in settings:
            settings.append(default)
    skipped = f" Of {selection.get('selectable', 0)} selectable atoms, {selection.get('selected', 0)} were picked" if selection else ""
    if selection and reasons:
        skipped += "; skipped: " + ", ".join(reasons)
    advice = (
        f"δ is largest at atoms without a chunk ({_text(unchunked)} eV/Å, {_text(chunked)} at atoms with one): "
        f"the chunks do not cover the target yet.{skipped + '.' if skipped else ''} "
        f"{_settings_text(settings)}."
    )
    return {"kind": COVERAGE, "advice": advice, "settings": settings, "iteration": entry.get("iteration")}


def _text(value: float | None) -> str:
    return "none" if value is None else f"{value:.3g}"


def _settings_text(settings: Sequence[str]) -> str:
    """'raise a, raise b, lower c' for the coverage settings (min_separation is lowered, others raised)."""
    text = ", ".join(("lower " if key == "chunks.min_separation" else "raise ") + key for key in settings)
    return text[:1].upper() + text[1:]


def target_numbers(store: CampaignStore, config: CampaignConfig) -> dict[int, int]:
    """The number of each target in the database (by structure id): its place among the config's
    targets (each geometry once), from 0, as the run log counts them ("target 0")."""
    places: dict[str, int] = {}
    for atoms in config.targets:
        places.setdefault(atoms_geometry_hash(atoms), len(places))
    return {record.id: places[record.geometry_hash] for record in store.structures("target") if record.geometry_hash in places}


def numbered_targets(entry: dict[str, Any], numbers: Mapping[int, int]) -> dict[str, Any]:
    """A history entry with δ per target keyed by the target's number (`target_numbers`), not its
    database id."""
    per_target = {str(numbers.get(int(key), key)): value for key, value in entry["uncertainty_per_target"].items()}
    return {**entry, "uncertainty_per_target": per_target}
