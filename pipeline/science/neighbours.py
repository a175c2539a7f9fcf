"""Neighbour lists within a cutoff (vesin's cell lists), as flat pairs or padded per-atom rows.

Every search goes through `checked_search_cutoff` first: a cutoff whose sphere would hold more atoms
than any structure nft computes is refused up front (a C search over ~10¹⁸ images never returns
and, holding the interpreter, never sees a signal), and a non-periodic structure is searched no
further than its own extent (vesin's cost grows as (cutoff / extent)³; no pair lies beyond it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vesin
from ase import Atoms

MAX_SPHERE_ATOMS = 100_000
"""Most atoms (periodic images included) a neighbour sphere may be estimated to hold. A chunk of that
radius is one structure the parent labels: DFT parents stop near 10⁴ atoms and ASE's EMT needs
minutes at 10⁵, so no chunk radius or descriptor cutoff that makes sense comes near it (Pt: a 57 Å
sphere by `sphere_atoms`; chunks are 3–12 Å, cutoffs 4–8 Å)."""
_EXTENT_SLACK_ANGSTROM = 1.0
"""A non-periodic search reaches this far beyond the structure's largest extent (any pair is within it)."""


def sphere_atoms(atoms: Atoms, radius_angstrom: float) -> float:
    """Estimated atoms within `radius_angstrom` (Å) of an atom, periodic images included: the atoms in
    a cube of side 2·r, i.e. N · Π (2r / h_i) over the periodic axes (h_i the distance between the
    cell's lattice planes: images grow as r per periodic axis, r³ in bulk); N for a non-periodic
    structure, whose spheres cannot hold more than the structure."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.any():
        return float(len(atoms))
    cell = np.asarray(atoms.cell.array, dtype=float)
    volume = abs(float(np.linalg.det(cell)))
    if not np.isfinite(volume) or volume <= 0.0:
        return float("inf")
    heights = volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    return float(len(atoms) * np.prod(2.0 * float(radius_angstrom) / heights[pbc]))


def sphere_problem(atoms: Atoms, radius_angstrom: float) -> str | None:
    """Why a neighbour sphere of `radius_angstrom` (Å) cannot be searched in `atoms` (more than
    `MAX_SPHERE_ATOMS` atoms estimated by `sphere_atoms`), or None."""
    estimate = sphere_atoms(atoms, radius_angstrom)
    if estimate <= MAX_SPHERE_ATOMS:
        return None
    return (
        f"a {radius_angstrom:g} Å sphere in this periodic structure holds ~{estimate:.3g} atoms "
        f"(at most {MAX_SPHERE_ATOMS:,} make sense: more than any parent labels as one structure)"
    )


def checked_search_cutoff(atoms: Atoms, cutoff_angstrom: float) -> float:
    """The cutoff (Å) to hand vesin for `atoms`: `cutoff_angstrom`, no more than the extent of a
    non-periodic structure (+1 Å); `ValueError` (`sphere_problem`) when the sphere is absurdly large."""
    cutoff = float(cutoff_angstrom)
    if not np.isfinite(cutoff) or cutoff <= 0.0:
        raise ValueError(f"cutoff must be a positive number of Å, got {cutoff}")
    problem = sphere_problem(atoms, cutoff)
    if problem:
        raise ValueError(problem)
    if not np.any(atoms.pbc) and len(atoms):
        positions = np.asarray(atoms.positions, dtype=float)
        extent = float(np.linalg.norm(positions.max(axis=0) - positions.min(axis=0)))
        cutoff = min(cutoff, extent + _EXTENT_SLACK_ANGSTROM)
    return cutoff


@dataclass
class NeighbourPairs:
    """Full (both directions) pair list: `vectors[p] = R[neighbours[p]] − R[centers[p]]` (+ image shift), Å."""

    centers: np.ndarray  # (P,) int64
    neighbours: np.ndarray  # (P,) int64
    vectors: np.ndarray  # (P, 3) float64, Å


def neighbour_pairs(atoms: Atoms, cutoff_angstrom: float) -> NeighbourPairs:
    """All ordered pairs closer than the cutoff, periodic images included, sorted by centre atom."""
    pbc = [bool(p) for p in atoms.pbc]
    positions = np.ascontiguousarray(atoms.positions, dtype=np.float64)
    box = np.asarray(atoms.cell.array, dtype=np.float64)
    if not any(pbc):
        box = np.zeros((3, 3))
    elif abs(np.linalg.det(box)) < 1e-12:
        raise ValueError("periodic structure needs a cell with non-zero volume")
    search = checked_search_cutoff(atoms, cutoff_angstrom)
    calculator = vesin.NeighborList(cutoff=search, full_list=True)
    centers, neighbours, vectors = calculator.compute(positions, box, pbc, quantities="ijD")
    order = np.argsort(centers, kind="stable")
    return NeighbourPairs(
        centers=centers[order].astype(np.int64),
        neighbours=neighbours[order].astype(np.int64),
        vectors=np.asarray(vectors[order], dtype=np.float64),
    )


@dataclass
class PaddedNeighbours:
    """Pairs laid out as (atoms, max neighbours) rows; unused slots point to the atom itself at
    distance `far` beyond the cutoff, so every cutoff-weighted term vanishes there."""

    neighbours: np.ndarray  # (N, K) int64
    vectors: np.ndarray  # (N, K, 3) Å
    valid: np.ndarray  # (N, K) bool


def pad_pairs(pairs: NeighbourPairs, n_atoms: int, far_angstrom: float) -> PaddedNeighbours:
    """Scatter a centre-sorted pair list into padded per-atom rows."""
    counts = np.bincount(pairs.centers, minlength=n_atoms)
    width = max(int(counts.max(initial=0)), 1)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    slot = np.arange(len(pairs.centers)) - starts[pairs.centers]
    neighbours = np.repeat(np.arange(n_atoms, dtype=np.int64)[:, None], width, axis=1)
    vectors = np.zeros((n_atoms, width, 3))
    vectors[:, :, 0] = far_angstrom
    valid = np.zeros((n_atoms, width), dtype=bool)
    neighbours[pairs.centers, slot] = pairs.neighbours
    vectors[pairs.centers, slot] = pairs.vectors
    valid[pairs.centers, slot] = True
    return PaddedNeighbours(neighbours=neighbours, vectors=vectors, valid=valid)
