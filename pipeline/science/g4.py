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

from pipeline.science.descriptors import SymmetryFunctionParams, cosine_cutoff
from pipeline.science.neighbours import NeighbourPairs, neighbour_pairs, pad_pairs


class G4Descriptor:
    """Radial G2 + angular G4 features computed directly from padded neighbour vectors."""

    def __init__(self, params: SymmetryFunctionParams):
        self.params = params

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
        rs = torch.tensor(p.radial_centers, dtype=dtype, device=vectors.device)
        eta_r = torch.tensor(p.radial_etas, dtype=dtype, device=vectors.device)
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
        padded = pad_pairs(
            NeighbourPairs(sub_centers, pairs.neighbours[keep], pairs.vectors[keep]), len(centers), self.params.cutoff + 1
        )
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
