"""Plain-data forms of atomic structures: what the science core trains on and what crosses process boundaries."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms


@dataclass
class LabelledStructure:
    """A structure with reference labels.

    `energy` (eV) is None when the energy must not be trained (chunks); `force_mask` flags the
    force rows (eV/Å) that enter the loss (a chunk flags only its central atom).
    """

    atoms: Atoms
    energy: float | None
    forces: np.ndarray
    force_mask: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n_atoms = len(self.atoms)
        self.forces = np.asarray(self.forces, dtype=float).reshape(n_atoms, 3)
        if self.force_mask is None:
            self.force_mask = np.ones(n_atoms, dtype=bool)
        self.force_mask = np.asarray(self.force_mask, dtype=bool).reshape(n_atoms)


def atoms_to_payload(atoms: Atoms) -> dict[str, Any]:
    """Atoms as JSON-able plain data (numbers, positions Å, cell Å, pbc) for workers and files."""
    return {
        "numbers": [int(z) for z in atoms.numbers],
        "positions": np.asarray(atoms.positions, dtype=float).tolist(),
        "cell": np.asarray(atoms.cell.array, dtype=float).tolist(),
        "pbc": [bool(p) for p in atoms.pbc],
    }


def payload_to_atoms(payload: dict[str, Any]) -> Atoms:
    """Inverse of `atoms_to_payload`."""
    return Atoms(
        numbers=payload["numbers"],
        positions=payload["positions"],
        cell=payload["cell"],
        pbc=payload["pbc"],
    )
