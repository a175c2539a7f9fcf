"""The paper's angular G4 (explicit neighbour triplets, with the r_jk term), kept as an option.

G4 = 2^{1−ζ} Σ_{j≠k} (1 + λ cos θ_ijk)^ζ exp(−η (r_ij² + r_ik² + r_jk²)) fc(r_ij) fc(r_ik) fc(r_jk),
summed per unordered pair of neighbour elements. It costs O(k²) per atom; forces come from autograd.
The features play the role of the moment descriptor's pair sums, with an identity feature map, so
the model and the trainer treat both kinds alike: `features(S)` just flattens S of shape (…, 1, F).
"""

from __future__ import annotations

from itertools import combinations_with_replacement

import numpy as np
import torch
from ase import Atoms

from pipeline.science.cutoff import cosine_cutoff
from pipeline.science.descriptor_types import PairSumEnergies, SymmetryFunctionParams, TrainingTerms
from pipeline.science.neighbours import NeighbourPairs, neighbour_pairs, pad_pairs
from pipeline.science.structures import LabelledStructure

FORCE_BLOCK_ATOMS = 64
"""Centre atoms per autograd block in prediction: G4 holds O(k²) triplet terms per atom."""


class G4Descriptor(torch.nn.Module):
    """Radial G2 + angular G4 features computed directly from padded neighbour vectors; a
    `Descriptor` (descriptor_types.py).

    The radial centres (Å) and η (Å⁻²) are buffers registered once, so they follow the model's
    device and dtype; they derive from `params` and are not saved in model files.
    """

    radial_centers: torch.Tensor  # Å, buffer
    radial_etas: torch.Tensor  # Å⁻², buffer

    def __init__(self, params: SymmetryFunctionParams):
        super().__init__()
        self.params = params
        self.register_buffer("radial_centers", torch.tensor(params.radial_centers, dtype=torch.float64), persistent=False)
        self.register_buffer("radial_etas", torch.tensor(params.radial_etas, dtype=torch.float64), persistent=False)

    @property
    def n_channels(self) -> int:
        return self.params.n_features

    @property
    def pair_sum_shape(self) -> tuple[int, int]:
        return (1, self.params.n_features)

    def features(self, pair_sums: torch.Tensor) -> torch.Tensor:
        """Identity map: G4 'pair sums' are already the features, shape (…, 1, F) → (…, F)."""
        return pair_sums.flatten(-2)

    def block_features(self, vectors: torch.Tensor, neighbour_elements: torch.Tensor) -> torch.Tensor:
        """Features (B, F) from padded pair vectors (B, K, 3) Å and neighbour element indices (B, K)."""
        p = self.params
        dtype = vectors.dtype
        n_el = p.n_elements
        one_hot = torch.nn.functional.one_hot(neighbour_elements, n_el).to(dtype)
        r = torch.linalg.vector_norm(vectors, dim=-1)
        fc, _ = cosine_cutoff(r, p.cutoff)
        rs = self.radial_centers.to(dtype=dtype, device=vectors.device)
        eta_r = self.radial_etas.to(dtype=dtype, device=vectors.device)
        g2 = torch.exp(-eta_r * (r.unsqueeze(-1) - rs) ** 2) * fc.unsqueeze(-1)
        blocks = [torch.einsum("bks,bkf->bsf", one_hot, g2).flatten(1)]
        diff = vectors.unsqueeze(1) - vectors.unsqueeze(2)
        not_self = ~torch.eye(vectors.shape[1], dtype=torch.bool, device=vectors.device)
        squared = (diff**2).sum(-1)
        r_jk = torch.sqrt(torch.where(squared > 0, squared, torch.ones_like(squared)))  # j = k and padding: masked
        fc_jk, _ = cosine_cutoff(r_jk, p.cutoff)
        cos = torch.einsum("bjx,bkx->bjk", vectors, vectors) / (r.unsqueeze(2) * r.unsqueeze(1))
        envelope = fc.unsqueeze(2) * fc.unsqueeze(1) * fc_jk * not_self
        squares = r.unsqueeze(2) ** 2 + r.unsqueeze(1) ** 2 + r_jk**2
        terms = []
        for eta in p.angular_etas:
            radial = torch.exp(-eta * squares) * envelope
            for zeta in p.angular_zetas:
                for lam in p.angular_lambdas:
                    terms.append(2.0 ** (1 - zeta) * (1 + lam * cos) ** zeta * radial)
        stacked = torch.stack(terms, dim=-1)  # (B, K, K, T)
        per_pair = torch.einsum("bjs,bkt,bjkf->bstf", one_hot, one_hot, stacked)
        for a, b in combinations_with_replacement(range(n_el), 2):
            block = per_pair[:, a, b] if a == b else per_pair[:, a, b] + per_pair[:, b, a]
            blocks.append(block)
        return torch.cat(blocks, dim=-1)

    def structure_features(
        self,
        atoms: Atoms,
        positions: torch.Tensor,
        centers: np.ndarray,
        element_lookup: np.ndarray,
        pairs: NeighbourPairs | None = None,
    ) -> torch.Tensor:
        """Features (len(centers), F) of the chosen atoms (sorted indices) as a differentiable
        function of `positions` (N, 3) Å; `pairs` may be passed to reuse a neighbour list."""
        if np.any(np.diff(centers) <= 0):
            raise ValueError("centers must be sorted and unique")
        pairs = pairs if pairs is not None else neighbour_pairs(atoms, self.params.cutoff)
        keep = np.isin(pairs.centers, centers)
        shifts = pairs.vectors - (atoms.positions[pairs.neighbours] - atoms.positions[pairs.centers])
        row_of = np.full(len(atoms), -1, dtype=np.int64)
        row_of[centers] = np.arange(len(centers))
        sub_centers = row_of[pairs.centers[keep]]
        padded = pad_pairs(NeighbourPairs(sub_centers, pairs.neighbours[keep], pairs.vectors[keep]), len(centers), self.params.cutoff + 1)
        slot_pairs = np.flatnonzero(padded.valid.ravel())
        order = np.argsort(sub_centers, kind="stable")
        far = torch.zeros(len(centers) * padded.valid.shape[1], 3, dtype=positions.dtype, device=positions.device)
        far[:, 0] = self.params.cutoff + 1.0
        pair_vectors = (
            positions[pairs.neighbours[keep][order]]
            - positions[pairs.centers[keep][order]]
            + torch.from_numpy(shifts[keep][order]).to(positions)
        )
        vectors = far.index_copy(0, torch.from_numpy(slot_pairs).to(positions.device), pair_vectors).view(len(centers), -1, 3)
        neighbour_el = torch.from_numpy(element_lookup[atoms.numbers[padded.neighbours]]).to(positions.device)
        return self.block_features(vectors, neighbour_el)

    # ----- the Descriptor interface (descriptor_types.py) -------------------------------------
    def training_terms(self, item: LabelledStructure, dtype: torch.dtype) -> TrainingTerms:
        """Rows one structure needs (every atom if energy-labelled, else the trained force atoms and
        their neighbours), the features as (R, 1, F) 'pair sums', the trained force atoms and the
        features' Jacobian (F_atoms, 3, R, F) by forward-mode autograd."""
        params = self.params
        atoms = item.atoms
        pairs = neighbour_pairs(atoms, params.cutoff)
        force_atoms = np.flatnonzero(item.force_mask)
        if item.energy is not None:
            rows = np.arange(len(atoms))
        else:
            rows = np.union1d(force_atoms, pairs.centers[np.isin(pairs.neighbours, force_atoms)])
        lookup = params.element_lookup()
        base = torch.from_numpy(atoms.positions).to(dtype)
        moved = torch.from_numpy(force_atoms)

        def features_of(force_positions: torch.Tensor) -> torch.Tensor:
            return self.structure_features(atoms, base.index_copy(0, moved, force_positions), rows, lookup, pairs)

        features = features_of(base[moved]).detach()
        if len(force_atoms):
            jac = torch.autograd.functional.jacobian(features_of, base[moved], vectorize=True, strategy="forward-mode")
            jacobian = jac.permute(2, 3, 0, 1).contiguous()  # (F_atoms, 3, rows, features)
        else:
            jacobian = torch.zeros(0, 3, len(rows), params.n_features, dtype=dtype)
        return rows, features.unsqueeze(1), force_atoms, jacobian

    def atomic_energies_and_forces(
        self,
        atoms: Atoms,
        element_index: torch.Tensor,
        energies_and_gradients: PairSumEnergies,
        n_members: int,
        block_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (M, N) eV and forces (M, N, 3) eV/Å: features with autograd, all members'
        force vector-Jacobian products batched in one backward pass per block of centre atoms."""
        n_atoms = len(atoms)
        dtype, device = self.radial_centers.dtype, self.radial_centers.device
        block_size = min(block_size, FORCE_BLOCK_ATOMS)
        lookup = self.params.element_lookup()
        pairs = neighbour_pairs(atoms, self.params.cutoff)
        positions = torch.from_numpy(atoms.positions).to(device=device, dtype=dtype).requires_grad_(True)
        energies = torch.zeros(n_members, n_atoms, dtype=dtype, device=device)
        forces = torch.zeros(n_members, n_atoms, 3, dtype=dtype, device=device)
        for start in range(0, n_atoms, block_size):
            centers = np.arange(start, min(start + block_size, n_atoms))
            with torch.enable_grad():
                features = self.structure_features(atoms, positions, centers, lookup, pairs)
            block_energies, grads = energies_and_gradients(features.detach().unsqueeze(1), element_index[start : start + len(centers)])
            (position_grads,) = torch.autograd.grad(features, positions, grad_outputs=grads.flatten(-2), is_grads_batched=True)
            energies[:, start : start + len(centers)] = block_energies.detach()
            forces -= position_grads
        return energies, forces
