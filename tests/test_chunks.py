"""Chunk carving: the neighbourhood a chunk reproduces, periodic images, the box, the central force."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.neighborlist import neighbor_list

from pipeline.science.chunks import carve_chunk
from pipeline.science.examples import rattled_cuboctahedron
from pipeline.science.locality import locality_sample_atoms

pytestmark = pytest.mark.timeout(120)

# Measured (see test_central_force_matches_parent_*): the largest |F_chunk - F_parent| of EMT Pt at
# an 8 Å chunk radius is 5.7e-5 eV/Å over all 260 atoms of the rattled Pt260 and 3.4e-5 eV/Å over
# all 108 atoms of rattled bulk; this bound leaves a margin of about 3.5x.
EMT_PT_LOCALITY_AT_8_ANGSTROM = 2e-4


def _rattled(atoms: Atoms, stdev: float, seed: int) -> Atoms:
    atoms = atoms.copy()
    atoms.positions += np.random.default_rng(seed).normal(0.0, stdev, size=atoms.positions.shape)
    return atoms


def _reference_displacements(parent: Atoms, center: int, radius: float) -> np.ndarray:
    """Displacements (Å) from the centre to every atom image within `radius`, by an explicit supercell.

    Independent of the neighbour list: tile the cell far enough along each periodic direction and
    measure straight distances from the central atom.
    """
    cell = parent.cell.array
    reach = []
    for axis in range(3):
        if not parent.pbc[axis]:
            reach.append(0)
            continue
        normal = np.cross(cell[(axis + 1) % 3], cell[(axis + 2) % 3])
        spacing = abs(np.dot(cell[axis], normal)) / np.linalg.norm(normal)
        reach.append(int(np.ceil(radius / spacing)) + 1)
    grid = np.array(np.meshgrid(*[np.arange(-n, n + 1) for n in reach], indexing="ij")).reshape(3, -1).T
    images = (parent.positions[None, :, :] + (grid @ cell)[:, None, :]).reshape(-1, 3)
    displacements = images - parent.positions[center]
    distances = np.linalg.norm(displacements, axis=1)
    return displacements[(distances <= radius) & (distances > 1e-12)]


def _assert_same_neighbourhood(parent: Atoms, center: int, radius: float) -> None:
    chunk = carve_chunk(parent, center, radius)
    relative = chunk.atoms.positions[1:] - chunk.atoms.positions[0]
    expected = _reference_displacements(parent, center, radius)
    assert len(chunk.atoms) == len(expected) + 1
    np.testing.assert_allclose(np.sort(np.linalg.norm(relative, axis=1)), np.sort(np.linalg.norm(expected, axis=1)), atol=1e-9)
    # Same vectors, not only the same distances: sort both sets lexicographically and compare.
    by_rows = lambda v: v[np.lexsort(np.round(v, 6).T[::-1])]  # noqa: E731
    np.testing.assert_allclose(by_rows(relative), by_rows(expected), atol=1e-9)


def test_cluster_chunk_holds_every_atom_within_the_radius():
    cluster = rattled_cuboctahedron()
    for center in (0, 77, 130, 259):
        _assert_same_neighbourhood(cluster, center, 8.0)
        distances = np.linalg.norm(cluster.positions - cluster.positions[center], axis=1)
        chunk = carve_chunk(cluster, center, 8.0)
        assert sorted(chunk.parent_indices.tolist()) == sorted(np.flatnonzero(distances <= 8.0).tolist())


def test_central_atom_is_first_and_records_where_it_came_from():
    cluster = rattled_cuboctahedron()
    chunk = carve_chunk(cluster, 42, 7.0)
    assert chunk.center_in_chunk == 0
    assert chunk.center_in_parent == 42
    assert chunk.parent_indices[0] == 42
    assert chunk.radius == 7.0
    distances = np.linalg.norm(chunk.atoms.positions - chunk.atoms.positions[0], axis=1)
    assert np.all(np.diff(distances) >= -1e-12), "atoms are ordered by distance from the centre"
    np.testing.assert_array_equal(chunk.atoms.numbers, cluster.numbers[chunk.parent_indices])


def test_periodic_parent_smaller_than_the_chunk_with_centre_at_a_face():
    parent = _rattled(bulk("Pt", "fcc", a=3.92, cubic=True).repeat((2, 2, 2)), 0.08, seed=3)
    parent.positions[5] = [0.02, 3.1, 4.0]  # on the x = 0 face, so half its neighbours lie across it
    assert parent.cell.lengths().max() < 2 * 8.0
    for center in (5, 0, 31):
        _assert_same_neighbourhood(parent, center, 8.0)
    chunk = carve_chunk(parent, 5, 8.0)
    # Every parent atom appears, several times over, as periodic images.
    assert set(chunk.parent_indices.tolist()) == set(range(len(parent)))
    assert np.count_nonzero(chunk.parent_indices == 5) > 1
    relative = chunk.atoms.positions - chunk.atoms.positions[0]
    images = parent.positions[chunk.parent_indices] + chunk.parent_shifts @ parent.cell.array
    np.testing.assert_allclose(relative, images - parent.positions[5], atol=1e-9)


def test_triclinic_parent_uses_every_periodic_image():
    parent = bulk("Pt", "fcc", a=3.92).repeat((2, 1, 1))  # primitive fcc: 60° cell angles
    parent.set_cell(parent.cell.array @ np.array([[1.0, 0.05, 0.0], [0.0, 0.97, 0.08], [0.02, 0.0, 1.03]]), scale_atoms=True)
    parent = _rattled(parent, 0.05, seed=7)
    parent.positions[1] = parent.cell.array[0] * 0.999 + parent.cell.array[1] * 0.5
    assert parent.cell.angles().min() < 70
    for center in (0, 1):
        _assert_same_neighbourhood(parent, center, 8.0)


def test_single_atom_cell_and_slab():
    _assert_same_neighbourhood(bulk("Pt", "fcc", a=3.92), 0, 8.0)
    slab = _rattled(fcc111("Pt", size=(2, 2, 3), vacuum=5.0), 0.05, seed=1)
    assert slab.pbc.tolist() == [True, True, False]
    for center in (0, 11):
        _assert_same_neighbourhood(slab, center, 6.5)


def test_agrees_with_ase_neighbour_list():
    parent = _rattled(bulk("Pt", "fcc", a=3.92, orthorhombic=True).repeat((2, 1, 2)), 0.1, seed=11)
    first, distances = neighbor_list("id", parent, 8.0)
    for center in range(len(parent)):
        chunk = carve_chunk(parent, center, 8.0)
        carved = np.linalg.norm(chunk.atoms.positions[1:] - chunk.atoms.positions[0], axis=1)
        np.testing.assert_allclose(np.sort(carved), np.sort(distances[first == center]), atol=1e-9)


def test_atom_exactly_at_the_radius_belongs_to_the_chunk():
    pair = Atoms("Pt3", positions=[[0, 0, 0], [4.0, 0, 0], [0, 4.0 + 1e-3, 0]])
    assert carve_chunk(pair, 0, 4.0).parent_indices.tolist() == [0, 1]


def test_chunk_is_non_periodic_and_centred_with_vacuum_on_every_side():
    parent = _rattled(bulk("Pt", "fcc", a=3.92, cubic=True).repeat((3, 3, 3)), 0.08, seed=2)
    for vacuum in (6.0, 2.5, 0.0):
        chunk = carve_chunk(parent, 13, 8.0, vacuum_angstrom=vacuum)
        atoms = chunk.atoms
        assert not atoms.pbc.any()
        assert chunk.vacuum == vacuum
        cell = atoms.cell.array
        np.testing.assert_allclose(cell, np.diag(np.diag(cell)), atol=1e-12)
        low = atoms.positions.min(axis=0)
        high = atoms.positions.max(axis=0)
        np.testing.assert_allclose(low, vacuum, atol=1e-9)
        np.testing.assert_allclose(np.diag(cell) - high, vacuum, atol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"center_index": 0, "radius_angstrom": 0.0}, "radius_angstrom"),
        ({"center_index": 0, "radius_angstrom": -8.0}, "radius_angstrom"),
        ({"center_index": 0, "radius_angstrom": float("nan")}, "radius_angstrom"),
        ({"center_index": 0, "vacuum_angstrom": -1.0}, "vacuum_angstrom"),
        ({"center_index": 260}, "out of range"),
        ({"center_index": -1}, "out of range"),
        ({"center_index": 1.5}, "integer"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        carve_chunk(rattled_cuboctahedron(), **kwargs)


def _central_force_differences(parent: Atoms, centers: list[int], radius: float) -> np.ndarray:
    whole = parent.copy()
    whole.calc = EMT()
    whole_forces = whole.get_forces()
    differences = []
    for center in centers:
        chunk = carve_chunk(parent, center, radius)
        chunk.atoms.calc = EMT()
        differences.append(np.linalg.norm(chunk.atoms.get_forces()[0] - whole_forces[center]))
    return np.array(differences)


def test_central_force_matches_parent_in_the_pt260_cluster():
    """EMT Pt260 (rattled), 8 Å chunks: |ΔF| of the central atom measured over all 260 atoms is at
    most 5.7e-5 eV/Å (mean 2.0e-5); at 6 Å it is 0.029 (mean 0.013), so 8 Å is well inside EMT's
    reach. Asserted here on a surface-and-core sample against 2e-4 eV/Å."""
    cluster = rattled_cuboctahedron()
    centers = locality_sample_atoms(cluster, 12, seed=0)
    differences = _central_force_differences(cluster, centers, 8.0)
    assert differences.max() < EMT_PT_LOCALITY_AT_8_ANGSTROM


def test_central_force_matches_parent_in_rattled_bulk():
    """EMT rattled bulk Pt (108 atoms, 11.8 Å cubic cell, smaller than the 16 Å chunk diameter),
    8 Å chunks: |ΔF| measured over all atoms is at most 3.4e-5 eV/Å (mean 1.6e-5). Asserted on a
    sample against 2e-4 eV/Å."""
    parent = _rattled(bulk("Pt", "fcc", a=3.92, cubic=True).repeat((3, 3, 3)), 0.085, seed=1)
    differences = _central_force_differences(parent, [0, 17, 53, 99], 8.0)
    assert differences.max() < EMT_PT_LOCALITY_AT_8_ANGSTROM
