"""Small builders shared by the ML-core tests: rattled Pt/Cu structures and untrained ensembles."""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from ase.cluster import Octahedron

from pipeline.science.descriptors import SymmetryFunctionParams
from pipeline.science.model import EnsembleModel


def rattled_cluster(mixed: bool = False, seed: int = 1) -> Atoms:
    """A 44-atom Pt octahedron (every third atom Cu if mixed), rattled by 0.1 Å."""
    atoms = Octahedron("Pt", 4, 1)
    atoms.rattle(0.1, seed=seed)
    if mixed:
        atoms.numbers[::3] = 29
    return atoms


def rattled_bulk(seed: int = 2, repeat=(1, 1, 1)) -> Atoms:
    """A periodic, sheared Pt cell with 4 atoms × repeat, rattled by 0.1 Å."""
    atoms = bulk("Pt", "fcc", 3.92, cubic=True)
    cell = atoms.cell.array.copy()
    cell[0, 1] += 0.3
    atoms.set_cell(cell, scale_atoms=True)
    atoms = atoms.repeat(repeat)
    atoms.rattle(0.1, seed=seed)
    return atoms


def untrained_model(elements=(78,), members=(0, 1, 2), kind="g5-moments") -> EnsembleModel:
    """An ensemble with random weights and non-trivial feature scaling, so forces are O(1) eV/Å."""
    model = EnsembleModel(SymmetryFunctionParams(elements=tuple(elements), kind=kind), member_seeds=list(members))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.feature_std.copy_(torch.rand(model.feature_std.shape, generator=generator, dtype=torch.float64) * 5 + 1)
        model.feature_mean.copy_(torch.rand(model.feature_mean.shape, generator=generator, dtype=torch.float64))
    return model


def finite_difference_forces(model: EnsembleModel, atoms: Atoms, indices, step: float = 1e-5) -> np.ndarray:
    """−dE/dx by central differences for the given atoms, per member: (M, len(indices), 3)."""
    out = np.zeros((model.n_members, len(indices), 3))
    for row, atom in enumerate(indices):
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                moved = atoms.copy()
                moved.positions[atom, axis] += sign * step
                energies.append(model.member_energies_and_forces(moved)[0].detach().numpy())
            out[:, row, axis] = -(energies[0] - energies[1]) / (2 * step)
    return out


def random_rotation(seed: int = 3) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))
