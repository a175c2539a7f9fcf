"""Chunk carving: the finite neighbourhood of one atom that the parent calculator labels.

A chunk holds every atom within `radius` (Å) of a central atom, with periodic images taken into
account, placed non-periodic in a box with `vacuum` (Å) on every side. Only the force on the central
atom is trained, so the chunk only has to reproduce that atom's surroundings.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import vesin
from ase import Atoms

from pipeline.science.neighbours import checked_search_cutoff

# Atoms at exactly `radius` belong to the chunk; the neighbour search reaches this much further so
# that rounding in the search cannot drop them.
_BOUNDARY_SLACK_ANGSTROM = 1e-6


@dataclass
class Chunk:
    """A carved chunk and where it came from.

    `atoms` is non-periodic; its central atom is always the first one, so `center_in_chunk` is 0.
    `parent_indices[k]` is the parent atom that chunk atom `k` is a (possibly periodic) image of;
    `parent_shifts[k]` is the integer cell translation of that image. Distances in Å.
    """

    atoms: Atoms
    center_in_parent: int
    center_in_chunk: int
    radius: float
    vacuum: float
    parent_indices: np.ndarray
    parent_shifts: np.ndarray


def carve_chunk(
    parent: Atoms,
    center_index: int,
    radius_angstrom: float = 8.0,
    vacuum_angstrom: float = 6.0,
) -> Chunk:
    """Cut all atoms within `radius_angstrom` of atom `center_index` out of `parent`.

    Periodic parents of any cell shape contribute every periodic image within the radius (the
    minimum image, and further images when the cell is smaller than twice the radius). The chunk is
    ordered by distance from the centre (central atom first, ties by parent index, then by image).
    """
    center = _validated_center(parent, center_index)
    radius = _positive_finite(radius_angstrom, "radius_angstrom")
    vacuum = _non_negative_finite(vacuum_angstrom, "vacuum_angstrom")

    neighbours, shifts, displacements = _neighbours_of(parent, center, radius)
    distances = np.linalg.norm(displacements, axis=1)
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], neighbours, distances))
    neighbours, shifts, displacements = neighbours[order], shifts[order], displacements[order]

    parent_indices = np.concatenate([[center], neighbours]).astype(np.int64)
    parent_shifts = np.concatenate([np.zeros((1, 3), dtype=np.int64), shifts]).astype(np.int64)
    positions = parent.positions[center] + np.concatenate([np.zeros((1, 3)), displacements])

    atoms = Atoms(numbers=parent.numbers[parent_indices], positions=positions, pbc=False)
    atoms.center(vacuum=vacuum)
    return Chunk(
        atoms=atoms,
        center_in_parent=center,
        center_in_chunk=0,
        radius=radius,
        vacuum=vacuum,
        parent_indices=parent_indices,
        parent_shifts=parent_shifts,
    )


def shared_environment(parent: Atoms, center_indices, radius_angstrom: float) -> tuple[Atoms, np.ndarray]:
    """Every atom image within `radius_angstrom` of any of the centres, once, as one non-periodic
    structure; returns it and the positions of the centres in it.

    The union of the spheres `carve_chunk` would cut around each centre: an atom near two centres
    appears once (the same parent index and cell shift), so several central-force rows of one
    parent can share their environment. Centres come first, in the given order.
    """
    centers = np.asarray([_validated_center(parent, int(c)) for c in center_indices], dtype=np.int64)
    if len(np.unique(centers)) != len(centers):
        raise ValueError("shared_environment: a centre is given twice")
    radius = _positive_finite(radius_angstrom, "radius_angstrom")
    _, neighbours, shifts, _ = _images_near(parent, centers, radius)
    keys = np.concatenate(
        [
            np.column_stack([centers, np.zeros((len(centers), 3), dtype=np.int64)]),
            np.column_stack([neighbours, shifts]),
        ]
    )
    _, first_seen = np.unique(keys, axis=0, return_index=True)
    first_seen = np.sort(first_seen)  # the centres first, then the neighbours in search order
    indices, image_shifts = keys[first_seen, 0], keys[first_seen, 1:]
    positions = parent.positions[indices] + image_shifts @ np.asarray(parent.cell.array, dtype=float)
    return Atoms(numbers=parent.numbers[indices], positions=positions, pbc=False), np.arange(len(centers))


def _neighbours_of(parent: Atoms, center: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parent index, cell shift and displacement (Å) of every image within `radius` of `center`."""
    _, neighbours, shifts, displacements = _images_near(parent, np.asarray([center]), radius)
    return neighbours, shifts, displacements


def _images_near(parent: Atoms, centers: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every image within `radius` of one of `centers`: that centre, the image's parent index,
    its cell shift and its displacement (Å) from the centre. One neighbour search for all centres."""
    pbc = np.asarray(parent.pbc, dtype=bool)
    cell = np.asarray(parent.cell.array, dtype=float)
    if np.any(np.linalg.norm(cell[pbc], axis=1) < 1e-12):
        raise ValueError("parent is periodic along a direction with a zero-length cell vector")
    # A half list is enough and twice as fast: a pair (i, j, S, D) seen from j is (i, -S, -D).
    search = checked_search_cutoff(parent, radius + _BOUNDARY_SLACK_ANGSTROM)  # ValueError: an absurd radius
    calculator = vesin.NeighborList(cutoff=search, full_list=False)
    first, second, shifts, displacements = calculator.compute(
        points=np.asarray(parent.positions, dtype=float),
        box=cell,
        periodic=pbc,
        quantities="ijSD",
    )
    shifts = np.asarray(shifts, dtype=np.int64).reshape(-1, 3)
    displacements = np.asarray(displacements, dtype=float).reshape(-1, 3)
    is_center = np.zeros(len(parent), dtype=bool)
    is_center[centers] = True
    outgoing = is_center[first]
    incoming = is_center[second]  # includes a centre's own images, which need both directions
    owners = np.concatenate([first[outgoing], second[incoming]]).astype(np.int64)
    neighbours = np.concatenate([second[outgoing], first[incoming]]).astype(np.int64)
    shifts = np.concatenate([shifts[outgoing], -shifts[incoming]])
    displacements = np.concatenate([displacements[outgoing], -displacements[incoming]])
    keep = np.linalg.norm(displacements, axis=1) <= radius
    return owners[keep], neighbours[keep], shifts[keep], displacements[keep]


def _validated_center(parent: Atoms, center_index: int) -> int:
    try:
        center = operator.index(center_index)
    except TypeError:
        raise ValueError(f"center_index must be an integer, got {center_index!r}") from None
    if not 0 <= center < len(parent):
        raise ValueError(f"center_index {center} is out of range for a parent of {len(parent)} atoms")
    return center


def _positive_finite(value: float, name: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a positive number of Å, got {value}")
    return value


def _non_negative_finite(value: float, name: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be a non-negative number of Å, got {value}")
    return value
