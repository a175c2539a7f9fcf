"""Plain-data forms of labelled structures, as they cross into Parsl apps and back."""
from __future__ import annotations

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
