"""Ensemble uncertainty (Zeng, Chen & Peterson 2022): δ_i = 2.58·σ of the members' force vectors;
and, as the reference NFT code also offers, the spread of the members' atomic energies."""

from __future__ import annotations

import numpy as np

CONFIDENCE_FACTOR = 2.58


def atomic_uncertainty(member_forces: np.ndarray) -> np.ndarray:
    """δ_i = 2.58·sqrt(Σ_m ‖f_i^m − f̄_i‖² / (M − 1)) in eV/Å, from forces of shape (M, N, 3)."""
    member_forces = np.asarray(member_forces, dtype=float)
    n_members = member_forces.shape[0]
    if n_members < 2:
        raise ValueError("uncertainty needs an ensemble of at least 2 members")
    deviations = member_forces - member_forces.mean(axis=0, keepdims=True)
    variance = (deviations**2).sum(axis=(0, 2)) / (n_members - 1)
    return CONFIDENCE_FACTOR * np.sqrt(variance)


def atomic_energy_uncertainty(member_atomic_energies: np.ndarray) -> np.ndarray:
    """δE_i = 2.58·sqrt(Σ_m (E_i^m − Ē_i)² / (M − 1)) in eV, from atomic energies of shape (M, N):
    the energy-based counterpart of δ_i (same factor, so both read as a 99 % bound)."""
    energies = np.asarray(member_atomic_energies, dtype=float)
    if energies.shape[0] < 2:
        raise ValueError("uncertainty needs an ensemble of at least 2 members")
    return CONFIDENCE_FACTOR * energies.std(axis=0, ddof=1)
