"""Plain-data forms of what crosses into Parsl apps and back: labelled structures in, predictions out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.science.structures import LabelledStructure, atoms_to_payload, payload_to_atoms


def labelled_to_payload(structure: LabelledStructure) -> dict[str, Any]:
    """A `LabelledStructure` as JSON-able data: atoms payload, energy (eV or None), forces (eV/Å), mask."""
    return {
        "atoms": atoms_to_payload(structure.atoms),
        "energy": None if structure.energy is None else float(structure.energy),
        "forces": np.asarray(structure.forces, dtype=float).tolist(),
        "force_mask": [bool(flag) for flag in structure.force_mask],
    }


def payload_to_labelled(payload: dict[str, Any]) -> LabelledStructure:
    """Inverse of `labelled_to_payload`."""
    return LabelledStructure(
        atoms=payload_to_atoms(payload["atoms"]),
        energy=payload["energy"],
        forces=np.asarray(payload["forces"], dtype=float),
        force_mask=np.asarray(payload["force_mask"], dtype=bool),
    )


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: identity only
class TargetPrediction:
    """The ensemble's prediction on one structure, as the prediction job returns it (it pickles
    across Parsl): energy (eV), forces (N × 3, eV/Å), per-atom δ_i (N, eV/Å) and energy-based δE_i
    (N, eV); with features asked for, each atom's scaled model features (N × F), else None.
    Arrays are float64 and read-only; sequences given are converted."""

    energy: float
    forces: np.ndarray
    uncertainties: np.ndarray
    energy_uncertainties: np.ndarray
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        uncertainties = _frozen_array(self.uncertainties)
        object.__setattr__(self, "energy", float(self.energy))
        object.__setattr__(self, "uncertainties", uncertainties)
        object.__setattr__(self, "forces", _frozen_array(np.reshape(self.forces, (len(uncertainties), 3))))
        object.__setattr__(self, "energy_uncertainties", _frozen_array(self.energy_uncertainties))
        if self.features is not None:
            object.__setattr__(self, "features", _frozen_array(self.features))

    @property
    def max_delta(self) -> float:
        """δ = max δ_i over the structure's atoms (eV/Å)."""
        return float(np.max(self.uncertainties))

    @property
    def max_energy_delta(self) -> float:
        """max δE_i over the structure's atoms (eV)."""
        return float(np.max(self.energy_uncertainties))


def _frozen_array(values: Any) -> np.ndarray:
    array = np.array(values, dtype=float)
    array.flags.writeable = False
    return array
