"""Locality of a parent calculator: how well a chunk's central force reproduces the whole structure's.

For sample atoms of a structure and chunks of increasing radius, the difference |ΔF| (eV/Å) between
the central-atom force in the chunk and the same atom's force in the whole structure. It tells which
chunk radius the parent calculator needs.

`locality_chunks` carves what is to be computed and `locality_from_forces` compares the forces the
parent gave, wherever it ran; `central_force_locality` does both around an in-process calculator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import vesin
from numpy.typing import ArrayLike
from ase import Atoms
from ase.calculators.calculator import Calculator

from pipeline.science.chunks import Chunk, carve_chunk


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

    def suggested_radius(self, tolerance: float) -> float | None:
        """The smallest radius (Å) whose max |ΔF| is below `tolerance` (eV/Å), or None when none is."""
        within = np.flatnonzero(self.max_difference < tolerance)
        return float(self.radii[within].min()) if within.size else None

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
                    "min_chunk_atoms": int(self.chunk_sizes[r].min()),
                    "max_chunk_atoms": int(self.chunk_sizes[r].max()),
                }
                for r, radius in enumerate(self.radii)
            ],
        }


@dataclass
class LocalityChunks:
    """What a locality analysis computes: the whole structure and, for every radius and sample
    atom, the chunk around that atom (`chunks[r][s]`, radius `radii[r]` Å, atom `sample_indices[s]`).

    `whole` is the structure as the parent computes it: a non-periodic one is centred in a box with
    the chunks' vacuum, so both sides of the comparison see the same kind of cell (a plane-wave
    parent needs one); the atoms keep their order, so `sample_indices` index `whole` too.
    """

    radii: np.ndarray
    sample_indices: np.ndarray
    whole: Atoms
    chunks: list[list[Chunk]]


def locality_chunks(atoms: Atoms, radii: Sequence[float], sample_indices: Sequence[int], vacuum: float = 6.0) -> LocalityChunks:
    """Carve the chunk of every radius (Å) around every sample atom, with `vacuum` (Å) as in the
    campaign; `ValueError` for no radius or sample atom, a radius that is not a positive number, or
    a sample atom outside the structure."""
    radii_array = np.asarray(radii, dtype=float).reshape(-1)
    samples = np.asarray(sample_indices, dtype=np.int64).reshape(-1)
    if radii_array.size == 0 or samples.size == 0:
        raise ValueError("give at least one radius and one sample atom")
    if not np.all(np.isfinite(radii_array)) or np.any(radii_array <= 0.0):
        raise ValueError(f"radii must be positive numbers of Å, got {radii_array.tolist()}")
    if np.any(samples < 0) or np.any(samples >= len(atoms)):
        raise ValueError(f"sample_indices must lie in [0, {len(atoms)}), got {samples.tolist()}")
    whole = atoms.copy()
    whole.calc = None
    if not whole.pbc.any():
        whole.center(vacuum=vacuum)
    chunks = [[carve_chunk(atoms, int(index), float(radius), vacuum) for index in samples] for radius in radii_array]
    return LocalityChunks(radii=radii_array, sample_indices=samples, whole=whole, chunks=chunks)


def locality_from_forces(plan: LocalityChunks, whole_forces: ArrayLike, chunk_forces: Sequence[Sequence[ArrayLike]]) -> LocalityResult:
    """Compare the parent's forces (eV/Å) on `plan`: `whole_forces` of every atom of `plan.whole`
    (N×3), `chunk_forces[r][s]` of every atom of chunk `plan.chunks[r][s]`; only central forces count."""
    samples = plan.sample_indices
    whole_at_samples = np.asarray(whole_forces, dtype=float).reshape(len(plan.whole), 3)[samples]
    central = np.empty((plan.radii.size, samples.size, 3))
    sizes = np.empty((plan.radii.size, samples.size), dtype=np.int64)
    for r, row in enumerate(plan.chunks):
        for s, chunk in enumerate(row):
            forces = np.asarray(chunk_forces[r][s], dtype=float).reshape(len(chunk.atoms), 3)
            central[r, s] = forces[chunk.center_in_chunk]
            sizes[r, s] = len(chunk.atoms)
    differences = np.linalg.norm(central - whole_at_samples[None, :, :], axis=2)
    return LocalityResult(
        radii=plan.radii,
        sample_indices=samples,
        whole_forces=whole_at_samples,
        chunk_forces=central,
        chunk_sizes=sizes,
        force_differences=differences,
        max_difference=differences.max(axis=1),
        mean_difference=differences.mean(axis=1),
    )


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
    In-process and serial; `pipeline.execution.locality` runs the same comparison as Parsl jobs.
    """
    plan = locality_chunks(atoms, radii, sample_indices, vacuum)
    return locality_from_forces(
        plan,
        _forces(plan.whole, calculator_factory),
        [[_forces(chunk.atoms, calculator_factory) for chunk in row] for row in plan.chunks],
    )


def _forces(atoms: Atoms, calculator_factory: Callable[[], Calculator]) -> np.ndarray:
    """Forces (eV/Å) on a copy of `atoms` by a fresh calculator."""
    structure = atoms.copy()
    structure.calc = calculator_factory()
    return np.asarray(structure.get_forces(), dtype=float)


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
    chosen = np.concatenate([rng.choice(surface, size=n_surface, replace=False), rng.choice(core, size=n_core, replace=False)])
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
