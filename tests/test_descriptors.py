"""Descriptor correctness: G5 from moment tensors equals the explicit triplet sum; layout sizes."""

import math

import numpy as np
import pytest
import torch

from pipeline.science.descriptors import MomentDescriptor, SymmetryFunctionParams, monomial_exponents
from pipeline.science.neighbours import neighbour_pairs
from tests.core_helpers import rattled_cluster

pytestmark = pytest.mark.timeout(120)


def explicit_features(atoms, params, center, with_r_jk=False):
    """Behler G2 and G5 (G4 `with_r_jk`) of one atom by direct sums over neighbours and their pairs."""
    index = {z: k for k, z in enumerate(params.elements)}
    fc = lambda r: 0.5 * (math.cos(math.pi * r / params.cutoff) + 1) if r < params.cutoff else 0.0  # noqa: E731
    R = atoms.positions
    neighbours = [(j, R[j] - R[center]) for j in range(len(atoms)) if j != center and np.linalg.norm(R[j] - R[center]) < params.cutoff]
    features = []
    for s in range(params.n_elements):
        for rs, eta in zip(params.radial_centers, params.radial_etas):
            features.append(
                sum(
                    math.exp(-eta * (np.linalg.norm(v) - rs) ** 2) * fc(np.linalg.norm(v))
                    for j, v in neighbours
                    if index[atoms.numbers[j]] == s
                )
            )
    for s1 in range(params.n_elements):
        for s2 in range(s1, params.n_elements):
            for eta in params.angular_etas:
                for zeta in params.angular_zetas:
                    for lam in params.angular_lambdas:
                        total = 0.0
                        for j, vj in neighbours:
                            for k, vk in neighbours:
                                kinds = sorted((index[atoms.numbers[j]], index[atoms.numbers[k]]))
                                if j == k or kinds != [s1, s2]:
                                    continue
                                rj, rk = np.linalg.norm(vj), np.linalg.norm(vk)
                                cos = vj @ vk / (rj * rk)
                                r_jk = np.linalg.norm(vk - vj)
                                jk_term = math.exp(-eta * r_jk**2) * fc(r_jk) if with_r_jk else 1.0
                                total += (
                                    2 ** (1 - zeta) * (1 + lam * cos) ** zeta * math.exp(-eta * (rj**2 + rk**2)) * fc(rj) * fc(rk) * jk_term
                                )
                        features.append(total)
    return np.array(features)


def moment_features(atoms, params):
    descriptor = MomentDescriptor(params)
    pairs = neighbour_pairs(atoms, params.cutoff)
    basis = descriptor.pair_basis(torch.from_numpy(pairs.vectors))
    index = {z: k for k, z in enumerate(params.elements)}
    neighbour_el = torch.tensor([index[z] for z in atoms.numbers[pairs.neighbours]])
    sums = torch.zeros(len(atoms), params.n_elements, descriptor.n_channels, dtype=torch.float64)
    sums.index_put_((torch.from_numpy(pairs.centers), neighbour_el), basis.values, accumulate=True)
    return descriptor.features(sums).numpy()


@pytest.mark.parametrize("mixed", [False, True])
def test_moment_g5_equals_explicit_triplet_sum(mixed):
    atoms = rattled_cluster(mixed=mixed)
    params = SymmetryFunctionParams(elements=tuple(sorted(set(atoms.numbers))), angular_zetas=(1, 2, 4))
    features = moment_features(atoms, params)
    assert features.shape == (len(atoms), params.n_features)
    for center in (0, 7, 20):
        reference = explicit_features(atoms, params, center)
        np.testing.assert_allclose(features[center], reference, rtol=1e-10, atol=1e-10)


def test_default_feature_count_is_twenty_for_one_element():
    assert SymmetryFunctionParams(elements=(78,)).n_features == 20


def test_monomials_cover_every_degree():
    exps = monomial_exponents(3)
    assert len(exps) == 1 + 3 + 6 + 10
    assert len(set(exps)) == len(exps)


@pytest.mark.parametrize(
    "bad", [dict(cutoff=-1.0), dict(angular_zetas=(1.5,)), dict(angular_lambdas=(2,)), dict(kind="g9"), dict(radial_etas=(1.0,))]
)
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SymmetryFunctionParams(elements=(78,), **bad)


@pytest.mark.parametrize("mixed", [False, True])
def test_g4_option_equals_explicit_triplet_sum(mixed):
    from pipeline.science.g4 import G4Descriptor

    atoms = rattled_cluster(mixed=mixed)
    params = SymmetryFunctionParams(elements=tuple(sorted(set(atoms.numbers))), kind="g4")
    lookup = np.zeros(100, dtype=np.int64)
    lookup[list(params.elements)] = np.arange(params.n_elements)
    centers = np.array([0, 7, 20])
    features = G4Descriptor(params).structure_features(atoms, torch.from_numpy(atoms.positions), centers, lookup)
    for row, center in enumerate(centers):
        np.testing.assert_allclose(features[row].numpy(), explicit_features(atoms, params, center, with_r_jk=True), rtol=1e-10, atol=1e-10)
