"""Plain-data forms of atomic structures: what the science core trains on and what crosses process boundaries."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from numpy.typing import ArrayLike


@dataclass(init=False)
class LabelledStructure:
    """A structure with reference labels.

    `energy` (eV) is None when the energy must not be trained (chunks); `force_mask` flags the
    force rows (eV/Å) that enter the loss (a chunk flags only its central atom; None: every row).
    """

    atoms: Atoms
    energy: float | None
    forces: np.ndarray  # eV/Å, (N, 3)
    force_mask: np.ndarray  # bool, (N,)

    def __init__(self, atoms: Atoms, energy: float | None, forces: ArrayLike, force_mask: ArrayLike | None = None) -> None:
        n_atoms = len(atoms)
        self.atoms, self.energy = atoms, energy
        self.forces = np.asarray(forces, dtype=float).reshape(n_atoms, 3)
        mask = np.ones(n_atoms, dtype=bool) if force_mask is None else force_mask
        self.force_mask = np.asarray(mask, dtype=bool).reshape(n_atoms)


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


MIN_INTERATOMIC_DISTANCE_ANGSTROM = 0.5
"""Closer atoms are a broken input (a duplicated atom, wrong units), not chemistry: H₂ is 0.74 Å."""


def structure_problem(atoms: Atoms, min_distance_angstrom: float = MIN_INTERATOMIC_DISTANCE_ANGSTROM) -> str | None:
    """What makes a structure unusable, in a few words (non-finite positions, cell or labels; a
    periodic axis without a cell; atoms closer than `min_distance_angstrom`), or None."""
    from pipeline.science.neighbours import neighbour_pairs

    if len(atoms) == 0:
        return "has no atoms"
    if not np.isfinite(atoms.positions).all():
        return "has positions that are not finite numbers"
    if not np.isfinite(atoms.cell.array).all():
        return "has a cell that is not finite"
    if atoms.pbc.any() and abs(np.linalg.det(atoms.cell.array)) < 1e-9:
        return "is periodic but its cell has no volume"
    results = atoms.calc.results if atoms.calc is not None else {}
    for name in ("energy", "forces"):
        if name in results and results[name] is not None and not np.isfinite(np.asarray(results[name], dtype=float)).all():
            return f"has {name} that are not finite numbers"
    pairs = neighbour_pairs(atoms, min_distance_angstrom)
    if len(pairs.centers):
        distances = np.linalg.norm(pairs.vectors, axis=1)
        k = int(np.argmin(distances))
        return (
            f"has atoms {int(pairs.centers[k])} and {int(pairs.neighbours[k])} {distances[k]:.3g} Å apart "
            f"(closer than {min_distance_angstrom} Å)"
        )
    return None


def ase_can_write(path: str | os.PathLike[str]) -> bool:
    """Whether ASE can write a structure to `path`, going by its name (e.g. .traj, .extxyz yes; .foo no)."""
    from ase.io.formats import filetype, ioformats

    try:
        name = filetype(os.fspath(path), read=False)
    except Exception:  # ASE raises several types for names it cannot place
        return False
    return name in ioformats and ioformats[name].can_write
