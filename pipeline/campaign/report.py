"""What `nft report` shows, gathered from the campaign database and its stored model files only: no
reference calculation runs and no Parsl is needed (the first and the kept model predict in-process).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from pipeline.campaign.calibration import CALIBRATION_KEY
from pipeline.campaign.config import CampaignConfig
from pipeline.campaign.files import LOCALITY_NAME, RELAXATIONS_NAME, SUMMARY_NAME
from pipeline.campaign.history import best_model
from pipeline.campaign.status import campaign_status, open_existing_store
from pipeline.science.model import EnsembleModel
from pipeline.storage.records import ModelRecord, ResultRecord, StructureRecord


@dataclass(frozen=True)
class LabelledForces:
    """The model against the stored reference forces on the campaign's labelled rows, its training
    data: every atom of the initial structures and the central atom of every chunk (its force
    predicted on the whole target, where the model meets it). K rows."""

    reference: np.ndarray  # parent's force, eV/Å, shape (K, 3)
    predicted: np.ndarray  # ensemble-mean force, eV/Å, shape (K, 3)
    deltas: np.ndarray  # δ_i of the row's atom, eV/Å, shape (K,)
    is_chunk_centre: np.ndarray  # True for a chunk's central atom, False for an initial-set atom, shape (K,)
    trained: np.ndarray  # False for a chunk the model's iteration or a later one carved (not in its training set), shape (K,)

    @property
    def residuals(self) -> np.ndarray:
        """|F_pred − F_ref| per row (vector norm), eV/Å, shape (K,)."""
        return np.linalg.norm(self.predicted - self.reference, axis=1)

    @property
    def force_mae(self) -> float:
        """Mean absolute force error over all components, eV/Å."""
        return float(np.abs(self.predicted - self.reference).mean())

    @property
    def covered_fraction(self) -> float:
        """Fraction of rows whose residual is ≤ δ_i (the check that δ bounds the error)."""
        return float((self.residuals <= self.deltas).mean())


@dataclass(frozen=True)
class HeldOutErrors:
    """The force error against the parent where the model did not train on the rows: each whole target
    (summary.json's `force_mae_vs_parent`, written when the campaign stopped) and the validation
    structures of the kept model's training (`model.validation_fraction` > 0). MAE over all force
    components, eV/Å; `why_no_target` says why the targets' MAE is missing, when it is."""

    parent: str
    target_mae: dict[str, float]  # "target k" (k as in the report's targets) → MAE
    target_mae_iteration: int | None  # the iteration whose model summary.json measured
    validation_mae: float | None
    why_no_target: str | None = None


@dataclass(frozen=True)
class TargetDeltas:
    """Per-atom δ_i (eV/Å) on one target structure of the first and of the kept model."""

    atoms: Atoms
    first: np.ndarray  # shape (N,)
    kept: np.ndarray  # shape (N,)


@dataclass(frozen=True)
class CampaignReport:
    """Everything `nft report` draws: the `nft status --json` report (`status`, the same numbers),
    and, where the campaign has stored models, the first and kept model's predictions."""

    status: dict[str, Any]
    first_iteration: int | None
    kept_iteration: int | None
    kept_model: Path | None
    labelled: LabelledForces | None
    targets: list[TargetDeltas]
    missing_model: str | None = None  # why the model figures are left out, when they are
    relaxations: list[dict[str, Any]] = field(default_factory=list)  # `nft relax` steps files (OUT-steps.json)
    locality: dict[str, Any] | None = None  # the last `nft locality --config` report (WORKDIR/locality.json)
    held_out: HeldOutErrors | None = None  # the error against the parent off the training rows


def campaign_report(config: CampaignConfig) -> CampaignReport:
    """Read the campaign's history, its labelled rows and target structures from the database, and
    predict them with the first and the kept (lowest-δ) model; BadInput when there is no database."""
    from pipeline.science.calculator import PREDICTION_DTYPE
    from pipeline.storage.model_file import load_ensemble

    status = campaign_status(config)
    relaxations = recorded_relaxations(config)
    locality = recorded_locality(config)
    summary = recorded_summary(config)
    with open_existing_store(config) as store:
        models = store.models()
        kept = best_model(models, store.iterations())
        targets = store.structures("target")
        labelled = store.labelled_structures(config.parent.name, config.parent.physics())
        # each file must be the one the campaign recorded (BadInput otherwise), before any is loaded
        files = {record.id: store.model_file(record) for record in (models[:1] + [kept] if models and kept else [])}
    if not models or kept is None:
        return CampaignReport(status, None, None, None, None, [], "the campaign has no trained model yet", relaxations, locality)
    held_out = held_out_errors(config.parent.name, summary, kept)
    first = models[0]
    missing = [record.path for record in (first, kept) if not Path(record.path).is_file()]
    if missing:
        return CampaignReport(
            status, first.iteration, kept.iteration, None, None, [], f"model file {missing[0]} is missing", relaxations, locality, held_out
        )
    kept_model = load_ensemble(files[kept.id], dtype=PREDICTION_DTYPE)
    first_model = kept_model if first.id == kept.id else load_ensemble(files[first.id], dtype=PREDICTION_DTYPE)
    kept_on_target = {record.id: _predict(kept_model, record.atoms) for record in targets}
    target_deltas = [
        TargetDeltas(
            record.atoms,
            first=_predict(first_model, record.atoms)["uncertainties"],
            kept=kept_on_target[record.id]["uncertainties"],
        )
        for record in targets
    ]
    return CampaignReport(
        status=status,
        first_iteration=first.iteration,
        kept_iteration=kept.iteration,
        kept_model=Path(kept.path),
        labelled=_labelled_forces(kept_model, labelled, kept_on_target, carved_after(models, kept.iteration)) if labelled else None,
        targets=target_deltas,
        relaxations=relaxations,
        locality=locality,
        held_out=held_out,
    )


def recorded_summary(config: CampaignConfig) -> dict[str, Any] | None:
    """WORKDIR/summary.json, which the campaign writes when it stops; None when absent or unreadable."""
    try:
        summary = json.loads((config.workdir / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def held_out_errors(parent: str, summary: dict[str, Any] | None, kept: ModelRecord) -> HeldOutErrors:
    """The kept model's error off its training rows: the targets' MAE from `summary` (summary.json)
    and the validation MAE its training recorded."""
    validation = kept.metrics.get("validation_force_mae")
    validation_mae = float(validation) if validation is not None else None
    if summary is None:
        return HeldOutErrors(parent, {}, None, validation_mae, f"no {SUMMARY_NAME} yet (the campaign writes it when it stops)")
    target_mae = summary.get("force_mae_vs_parent")
    if target_mae is None:
        why = f"the campaign runs {parent} on whole targets only where that is cheap (as EMT), so {SUMMARY_NAME} has no force_mae_vs_parent"
        return HeldOutErrors(parent, {}, None, validation_mae, why)
    if not target_mae:
        return HeldOutErrors(
            parent, {}, None, validation_mae, f"{parent} failed on every target ({SUMMARY_NAME}: force_mae_vs_parent is empty)"
        )
    return HeldOutErrors(parent, {name: float(mae) for name, mae in target_mae.items()}, summary.get("best_iteration"), validation_mae)


def carved_after(models: list[ModelRecord], iteration: int) -> set[tuple[int, int]]:
    """(target id, atom) of the chunk centres carved by `iteration` or a later one: the model of
    `iteration` was trained before they were, so they are not in its training set."""
    return {
        (int(item["target"]), int(item["atom"]))
        for record in models
        if record.iteration >= iteration
        for item in record.metrics.get(CALIBRATION_KEY) or []
    }


def recorded_locality(config: CampaignConfig) -> dict[str, Any] | None:
    """The last `nft locality --config` report of the campaign's parent, or None (none, or unreadable)."""
    try:
        report = json.loads((config.workdir / LOCALITY_NAME).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("radii") else None


def recorded_relaxations(config: CampaignConfig) -> list[dict[str, Any]]:
    """The steps files of the campaign's `nft relax` runs that still exist (path added as `file`)."""
    try:
        paths = json.loads((config.workdir / RELAXATIONS_NAME).read_text())
    except (OSError, ValueError):
        return []
    relaxations = []
    for path in paths:
        try:
            steps = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if steps.get("campaign") == config.name and steps.get("steps"):
            relaxations.append({**steps, "file": str(path)})
    return relaxations


def _labelled_forces(
    model: EnsembleModel,
    labelled: list[tuple[StructureRecord, ResultRecord]],
    on_target: dict[int, dict[str, np.ndarray]],
    untrained: set[tuple[int, int]],
) -> LabelledForces:
    """The model's force and δ_i against the stored reference on every labelled row (see LabelledForces);
    `on_target` holds the model's prediction on each target, by structure id; `untrained` the
    (target id, atom) of chunk centres not in the model's training set."""
    reference, predicted, deltas, centre, trained = [], [], [], [], []
    for structure, result in labelled:
        if structure.kind == "chunk":
            in_chunk = structure.chunk_center
            if structure.parent_id in on_target:
                prediction, atom = on_target[structure.parent_id], structure.parent_center
            else:  # a chunk of a structure that is not a target: predicted in the chunk itself
                prediction, atom = _predict(model, structure.atoms), in_chunk
            reference.append(np.asarray(result.forces)[in_chunk][None, :])
            predicted.append(prediction["forces"][atom][None, :])
            deltas.append(prediction["uncertainties"][atom : atom + 1])
            centre.append(np.ones(1, dtype=bool))
            trained.append(np.array([(structure.parent_id, structure.parent_center) not in untrained]))
            continue
        prediction = _predict(model, structure.atoms)
        reference.append(np.asarray(result.forces).reshape(-1, 3))
        predicted.append(prediction["forces"])
        deltas.append(prediction["uncertainties"])
        centre.append(np.zeros(len(structure.atoms), dtype=bool))
        trained.append(np.ones(len(structure.atoms), dtype=bool))
    return LabelledForces(*(np.concatenate(rows) for rows in (reference, predicted, deltas, centre, trained)))


def _predict(model: EnsembleModel, atoms: Atoms) -> dict[str, np.ndarray]:
    """Ensemble-mean forces (N, 3) and δ_i (N,), eV/Å, predicted as the ASE calculator predicts."""
    from pipeline.science.calculator import PREDICTION_BLOCK_SIZE

    prediction = model.predict(atoms, block_size=PREDICTION_BLOCK_SIZE)
    return {"forces": np.asarray(prediction.forces, dtype=float), "uncertainties": np.asarray(prediction.uncertainties, dtype=float)}
