"""A model's errors against a parent calculator: what `nft evaluate` prints and the campaign's final
force MAE (summary.json `force_mae_vs_parent`) come from here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from pipeline.execution.parents import Parent, ReferenceFailed
from pipeline.science.model import EnsembleModel
from pipeline.science.structures import atoms_to_payload


RESIDUAL_PERCENTILES = (50, 90, 99)
"""Percentiles of the per-atom force residuals ‖F_model,i − F_parent,i‖ that `metrics` reports."""


@dataclass(frozen=True)
class StructureErrors:
    """The model against the parent on one structure; without labels (`failure` the parent's reason)
    only the prediction's δ_i are known."""

    n_atoms: int
    deltas: np.ndarray  # δ_i per atom, eV/Å, shape (N,)
    force_errors: np.ndarray | None = None  # |F_model − F_parent| per component, eV/Å, shape (N, 3)
    energy_error_per_atom: float | None = None  # |E_model − E_parent| / N, eV
    failure: str | None = None

    @property
    def max_delta(self) -> float:
        """δ = max_i δ_i, eV/Å."""
        return float(np.max(self.deltas, initial=0.0))

    @property
    def force_mae(self) -> float | None:
        """Mean absolute force error over all components, eV/Å."""
        return None if self.force_errors is None else float(self.force_errors.mean())

    @property
    def force_max_error(self) -> float | None:
        """Largest absolute force component error, eV/Å."""
        return None if self.force_errors is None else float(self.force_errors.max())

    @property
    def residuals(self) -> np.ndarray | None:
        """Force residual per atom, the vector norm ‖F_model,i − F_parent,i‖, eV/Å, shape (N,)."""
        return None if self.force_errors is None else np.linalg.norm(self.force_errors, axis=1)

    @property
    def covered(self) -> np.ndarray | None:
        """Per atom: residual ≤ δ_i (the paper's check that δ bounds the error), shape (N,)."""
        residuals = self.residuals
        return None if residuals is None else residuals <= self.deltas

    def metrics(self) -> dict[str, float | int]:
        """`Evaluation.metrics` of this structure alone."""
        return Evaluation([self]).metrics()


@dataclass(frozen=True)
class Evaluation:
    """Per-structure errors, in the order of the images, and their totals over the labelled ones."""

    structures: list[StructureErrors]

    def metrics(self) -> dict[str, float | int]:
        """The `nft evaluate` metrics (docs/commands.md) over the labelled structures: atoms, force MAE and max error
        (eV/Å, over all components), max δ (eV/Å), mean energy error per atom (eV), coverage (the
        fraction of atoms whose residual norm is ≤ δ_i) and residual-norm percentiles (eV/Å)."""
        labelled = [item for item in self.structures if item.failure is None]
        if not labelled:
            raise ValueError("no structure has parent labels to compare with")
        errors = np.concatenate([found.ravel() for item in labelled if (found := item.force_errors) is not None])
        residuals = np.concatenate([item.residuals for item in labelled])
        covered = np.concatenate([item.covered for item in labelled])
        percentiles = np.percentile(residuals, RESIDUAL_PERCENTILES)
        return {
            "n_atoms": sum(item.n_atoms for item in labelled),
            "force_mae": float(errors.mean()),
            "force_max_error": float(errors.max()),
            "max_uncertainty": float(max(item.max_delta for item in labelled)),
            "energy_error_per_atom": float(np.mean([item.energy_error_per_atom for item in labelled])),
            "coverage": float(covered.mean()),
            **{f"residual_p{q}": float(value) for q, value in zip(RESIDUAL_PERCENTILES, percentiles)},
            "residual_max": float(residuals.max()),
        }


def evaluate_model(
    model: EnsembleModel | str | os.PathLike[str],
    images: Sequence[Atoms],
    parent: Parent,
    device: str = "auto",
    skip_failed: bool = False,
    vacuum: float | None = None,
) -> Evaluation:
    """Errors of `model` against `parent` on every image, predicted in the ASE calculator's blocks of
    atoms; a model file is loaded as the calculator loads it (its precision, on `device`).
    With `vacuum` (Å), a non-periodic image without a full cell is centred in a box with that
    vacuum for the parent (a GPAW job needs a cell; the prediction does not depend on it).

    A structure the parent cannot label raises `ReferenceFailed`, or with `skip_failed` is kept with
    the reason and left out of the totals. An element the model lacks raises `ValueError`.
    """
    from pipeline.science.calculator import PREDICTION_BLOCK_SIZE, PREDICTION_DTYPE

    if not isinstance(model, EnsembleModel):
        from pipeline.storage.model_file import load_ensemble

        model = load_ensemble(model, dtype=PREDICTION_DTYPE, device=device)
    structures = []
    for atoms in images:
        prediction = model.predict(atoms, block_size=PREDICTION_BLOCK_SIZE)
        try:
            labels = parent.run(atoms_to_payload(boxed(atoms, vacuum)))
        except ReferenceFailed as error:
            if not skip_failed:
                raise
            structures.append(StructureErrors(len(atoms), prediction.uncertainties, failure=error.reason))
            continue
        structures.append(
            StructureErrors(
                n_atoms=len(atoms),
                deltas=prediction.uncertainties,
                force_errors=np.abs(prediction.forces - np.asarray(labels["forces"])),
                energy_error_per_atom=abs(prediction.energy - labels["energy"]) / len(atoms),
            )
        )
    return Evaluation(structures)


def boxed(atoms: Atoms, vacuum: float | None) -> Atoms:
    """`atoms` centred in a box with `vacuum` (Å) on every side when it is non-periodic without a
    full cell (as a chunk is boxed); otherwise, or without `vacuum`, `atoms` as it is."""
    if vacuum is None or atoms.pbc.any() or atoms.cell.rank == 3:
        return atoms
    box = atoms.copy()
    box.calc = None
    box.center(vacuum=vacuum)
    return box
