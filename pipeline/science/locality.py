"""Locality of a parent calculator: how well a chunk's central force reproduces the whole structure's.

For sample atoms of a structure and chunks of increasing radius, the difference |ΔF| (eV/Å) between
the central-atom force in the chunk and the same atom's force in the whole structure. It tells which
chunk radius the parent calculator needs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import vesin
from ase import Atoms
from ase.calculators.calculator import Calculator

from pipeline.science.chunks import carve_chunk


@dataclass
class LocalityResult:
    """Central-force differences for every radius (Å) and sample atom.

    `force_differences[r, s]` is |F_chunk − F_whole| (eV/Å) of sample atom `sample_indices[s]` in
    the chunk of radius `radii[r]`; `max_difference` and `mean_difference` reduce it per radius.
    """

    radii: np.ndarray
    sample_indices: np.ndarray
    whole_forces: np.ndarray
    chunk_forces: np.ndarray
    chunk_sizes: np.ndarray
    force_differences: np.ndarray
    max_difference: np.ndarray
    mean_difference: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able summary: one row per radius (Å, atoms, eV/Å)."""
        return {
            "sample_indices": [int(i) for i in self.sample_indices],
            "radii": [
                {
                    "radius": float(radius),
                    "max_force_difference": float(self.max_difference[r]),
                    "mean_force_difference": float(self.mean_difference[r]),
                    "mean_chunk_atoms": float(self.chunk_sizes[r].mean()),
                }
                for r, radius in enumerate(self.radii)
            ],
        }


def central_force_locality(
    atoms: Atoms,
    calculator_factory: Callable[[], Calculator],
    radii: Sequence[float],
    sample_indices: Sequence[int],
    vacuum: float = 6.0,
) -> LocalityResult:
    """Compare central-atom forces of chunks of each radius (Å) with the whole structure's forces.

    `calculator_factory` returns a fresh parent calculator for every evaluation, so no state leaks
    between the whole structure and the chunks; `vacuum` (Å) pads each chunk as in the campaign.
    """
    radii_array = np.asarray(radii, dtype=float).reshape(-1)
    samples = np.asarray(sample_indices, dtype=np.int64).reshape(-1)
    if radii_array.size == 0 or samples.size == 0:
        raise ValueError("give at least one radius and one sample atom")
    if not np.all(np.isfinite(radii_array)) or np.any(radii_array <= 0.0):
        raise ValueError(f"radii must be positive numbers of Å, got {radii_array.tolist()}")
    if np.any(samples < 0) or np.any(samples >= len(atoms)):
        raise ValueError(f"sample_indices must lie in [0, {len(atoms)}), got {samples.tolist()}")

    whole = atoms.copy()
    whole.calc = calculator_factory()
    whole_forces = np.asarray(whole.get_forces(), dtype=float)[samples]

    chunk_forces = np.empty((radii_array.size, samples.size, 3))
    chunk_sizes = np.empty((radii_array.size, samples.size), dtype=np.int64)
    for r, radius in enumerate(radii_array):
        for s, index in enumerate(samples):
            chunk = carve_chunk(atoms, int(index), float(radius), vacuum)
            chunk.atoms.calc = calculator_factory()
            chunk_forces[r, s] = chunk.atoms.get_forces()[chunk.center_in_chunk]
            chunk_sizes[r, s] = len(chunk.atoms)

    differences = np.linalg.norm(chunk_forces - whole_forces[None, :, :], axis=2)
    return LocalityResult(
        radii=radii_array,
        sample_indices=samples,
        whole_forces=whole_forces,
        chunk_forces=chunk_forces,
        chunk_sizes=chunk_sizes,
        force_differences=differences,
        max_difference=differences.max(axis=1),
        mean_difference=differences.mean(axis=1),
    )


def locality_sample_atoms(atoms: Atoms, count: int, seed: int = 0) -> list[int]:
    """`count` sample atoms spread over surface and core, deterministic for a given seed.

    Atoms are split by coordination (first neighbour shell): under-coordinated ones are the
    surface, the rest the core. Half the sample is drawn from each (the other group fills in when
    one runs short), so both the most strained surface sites and bulk-like sites are tested.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    n_atoms = len(atoms)
    if count >= n_atoms:
        return list(range(n_atoms))
    coordination = _coordination_numbers(atoms)
    surface = np.flatnonzero(coordination < coordination.max())
    core = np.flatnonzero(coordination == coordination.max())
    rng = np.random.default_rng(seed)
    n_surface = min(len(surface), max(count - len(core), count // 2))
    n_core = count - n_surface
    chosen = np.concatenate(
        [rng.choice(surface, size=n_surface, replace=False), rng.choice(core, size=n_core, replace=False)]
    )
    return sorted(int(i) for i in chosen)


def _coordination_numbers(atoms: Atoms) -> np.ndarray:
    """Neighbours within 1.2× the median nearest-neighbour distance (the first shell of a metal)."""
    n_atoms = len(atoms)
    nearest = np.full(n_atoms, np.inf)
    cutoff = 3.0
    while cutoff <= 24.0 and not np.all(np.isfinite(nearest)):
        first, distances = _pairs(atoms, cutoff, "id")
        np.minimum.at(nearest, first, distances)
        cutoff *= 2.0
    if not np.any(np.isfinite(nearest)):
        return np.zeros(n_atoms, dtype=np.int64)
    (first,) = _pairs(atoms, 1.2 * float(np.median(nearest[np.isfinite(nearest)])), "i")
    return np.bincount(first, minlength=n_atoms)


def _pairs(atoms: Atoms, cutoff: float, quantities: str) -> list[np.ndarray]:
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True)
    return calculator.compute(atoms.positions, atoms.cell.array, atoms.pbc, quantities=quantities)
