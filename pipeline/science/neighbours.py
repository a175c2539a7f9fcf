"""Neighbour lists within a cutoff (vesin's cell lists), as flat pairs or padded per-atom rows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vesin
from ase import Atoms


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
    calculator = vesin.NeighborList(cutoff=float(cutoff_angstrom), full_list=True)
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
