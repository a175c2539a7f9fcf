"""Locality analysis: central-atom forces of chunks of growing radius against the whole structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from pipeline.science.examples import rattled_cuboctahedron
from pipeline.science.locality import (
    central_force_locality,
    locality_chunks,
    locality_from_forces,
    locality_sample_atoms,
)

pytestmark = pytest.mark.timeout(120)

RADII = [4.0, 5.0, 6.0, 7.0, 8.0]


def test_emt_force_difference_falls_with_radius_in_pt260():
    """EMT Pt260, max / mean |ΔF| in eV/Å measured over 20 surface-and-core samples (seed 0):
    4 Å 1.41 / 0.88, 5 Å 0.38 / 0.16, 6 Å 0.020 / 0.012, 7 Å 0.0015 / 0.0011, 8 Å 4.4e-5 / 1.9e-5
    (all 260 atoms at 8 Å: 5.7e-5 / 2.0e-5). The test runs 8 samples to stay fast."""
    cluster = rattled_cuboctahedron()
    samples = locality_sample_atoms(cluster, 8, seed=0)
    result = central_force_locality(cluster, EMT, RADII, samples, vacuum=6.0)

    assert result.force_differences.shape == (len(RADII), len(samples))
    assert np.all(np.diff(result.max_difference) < 0)
    assert np.all(np.diff(result.mean_difference) < 0)
    assert result.max_difference[0] > 0.3  # a 4 Å chunk is too small for EMT
    assert result.max_difference[-1] < 2e-4
    assert np.all(result.mean_difference <= result.max_difference)
    assert np.all(np.diff(result.chunk_sizes.mean(axis=1)) > 0)


def test_whole_forces_are_the_structures_own_and_chunk_forces_are_central():
    parent = bulk("Pt", "fcc", a=3.92, cubic=True).repeat((3, 3, 3))
    parent.positions += np.random.default_rng(4).normal(0.0, 0.08, size=parent.positions.shape)
    result = central_force_locality(parent, EMT, [6.0, 9.0], [3, 50], vacuum=5.0)
    whole = parent.copy()
    whole.calc = EMT()
    np.testing.assert_allclose(result.whole_forces, whole.get_forces()[[3, 50]], atol=1e-12)
    np.testing.assert_allclose(result.force_differences, np.linalg.norm(result.chunk_forces - result.whole_forces, axis=2))
    assert result.max_difference[1] < 1e-5  # a 9 Å chunk captures EMT's reach in bulk too


def test_factory_gives_a_fresh_calculator_for_every_evaluation():
    calculators = []

    def counting_factory():
        calculators.append(EMT())
        return calculators[-1]

    central_force_locality(rattled_cuboctahedron(), counting_factory, [5.0, 6.0], [0, 100, 200])
    assert len(calculators) == 1 + 2 * 3
    assert len({id(calc) for calc in calculators}) == len(calculators)


def test_result_as_plain_data():
    result = central_force_locality(rattled_cuboctahedron(), EMT, [5.0, 6.0], [10, 20])
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["sample_indices"] == [10, 20]
    assert [row["radius"] for row in summary["radii"]] == [5.0, 6.0]
    assert summary["radii"][0]["max_force_difference"] == pytest.approx(result.max_difference[0])
    assert set(summary["radii"][0]) == {
        "radius",
        "max_force_difference",
        "mean_force_difference",
        "mean_chunk_atoms",
        "min_chunk_atoms",
        "max_chunk_atoms",
    }
    assert summary["radii"][0]["min_chunk_atoms"] == result.chunk_sizes[0].min()
    assert summary["radii"][0]["max_chunk_atoms"] == result.chunk_sizes[0].max()


def test_suggested_radius_is_the_smallest_below_the_tolerance():
    result = central_force_locality(rattled_cuboctahedron(), EMT, [7.0, 4.0, 6.0], [10, 20])
    order = np.argsort(result.radii)
    assert result.max_difference[order[0]] > result.max_difference[order[1]] > result.max_difference[order[2]]
    between = 0.5 * (result.max_difference[order[0]] + result.max_difference[order[1]])
    assert result.suggested_radius(between) == 6.0
    assert result.suggested_radius(float(result.max_difference[order[1]])) == 7.0  # below, not equal
    assert result.suggested_radius(10.0) == 4.0
    assert result.suggested_radius(0.5 * float(result.max_difference.min())) is None


def test_forces_computed_elsewhere_give_the_same_comparison():
    """`locality_from_forces` on the parent's forces of the planned structures is what
    `central_force_locality` computes; a non-periodic whole structure gets the chunks' vacuum box."""
    cluster = rattled_cuboctahedron()
    plan = locality_chunks(cluster, [5.0, 6.0], [10, 200], vacuum=4.0)
    assert plan.whole.cell.rank == 3 and not plan.whole.pbc.any()
    shift = plan.whole.positions[0] - cluster.positions[0]
    np.testing.assert_allclose(plan.whole.positions - cluster.positions, np.tile(shift, (len(cluster), 1)), atol=1e-12)
    np.testing.assert_allclose(plan.whole.positions.min(axis=0), 4.0, atol=1e-12)

    def emt_forces(atoms):
        atoms = atoms.copy()
        atoms.calc = EMT()
        return atoms.get_forces()

    from_forces = locality_from_forces(plan, emt_forces(plan.whole), [[emt_forces(chunk.atoms) for chunk in row] for row in plan.chunks])
    direct = central_force_locality(cluster, EMT, [5.0, 6.0], [10, 200], vacuum=4.0)
    np.testing.assert_allclose(from_forces.force_differences, direct.force_differences, atol=1e-12)
    np.testing.assert_array_equal(from_forces.chunk_sizes, direct.chunk_sizes)


def test_sample_atoms_are_deterministic_and_spread_over_surface_and_core():
    cluster = rattled_cuboctahedron()
    first = locality_sample_atoms(cluster, 10, seed=0)
    assert first == locality_sample_atoms(cluster, 10, seed=0)
    assert first != locality_sample_atoms(cluster, 10, seed=1)
    assert len(set(first)) == 10 and first == sorted(first)
    distance_from_middle = np.linalg.norm(cluster.positions[first] - cluster.positions.mean(axis=0), axis=1)
    assert distance_from_middle.min() < 5.0 < distance_from_middle.max()  # core and surface both sampled


def test_sample_atoms_in_bulk_and_small_structures():
    crystal = bulk("Pt", "fcc", a=3.92, cubic=True).repeat((3, 3, 3))
    picked = locality_sample_atoms(crystal, 5, seed=2)
    assert len(set(picked)) == 5 and all(0 <= i < len(crystal) for i in picked)
    assert locality_sample_atoms(crystal[:3], 10) == [0, 1, 2]


@pytest.mark.parametrize(
    ("radii", "samples", "message"),
    [([], [0], "at least one"), ([8.0], [], "at least one"), ([0.0], [0], "radii"), ([8.0], [260], "sample_indices")],
)
def test_bad_arguments_are_value_errors(radii, samples, message):
    with pytest.raises(ValueError, match=message):
        central_force_locality(rattled_cuboctahedron(), EMT, radii, samples)
