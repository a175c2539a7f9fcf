"""Gaussian symmetry functions with a cosine cutoff, angular terms through per-atom moment tensors.

Every feature of atom i is a function of *pair sums* S_i,c = Σ_j ρ_c(r_ij) u_c(r̂_ij), one per
channel c and neighbour element:
  - radial G2:   ρ = exp(−η (r − Rs)²) fc(r),            u = 1
  - self terms:  ρ = w_η(r)² with w_η = exp(−η r²) fc(r), u = 1
  - moments:     ρ = w_η(r),                              u = x^a y^b z^c of r̂, a + b + c ≤ max ζ
Angular G5 features with integer ζ follow from the moments because
  Σ_{j≠k} w_j w_k cos^p θ_jk = Σ_{a+b+c=p} p!/(a!b!c!) M_abc² − Σ_j w_j²,
which costs O(k) per atom instead of O(k²) over neighbour pairs. Since S is linear in the pair
basis, forces need only ∂E/∂S (cheap, per atom) pushed through the per-pair basis derivatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations_with_replacement
from typing import Any

import numpy as np
import torch
from ase import Atoms

from pipeline.science.cutoff import cosine_cutoff
from pipeline.science.descriptor_types import PairSumEnergies, SymmetryFunctionParams, TrainingTerms
from pipeline.science.structures import LabelledStructure

SHELL_START_NEAREST_NEIGHBOURS = 0.8
"""Data-derived radial shells start at this fraction of the nearest-neighbour distance d."""
SHELL_SPACING_NEAREST_NEIGHBOURS = 0.145
"""... and are about this fraction of d apart (0.4 Å for Pt), each as wide as the spacing."""
SHELL_END_BEFORE_CUTOFF_ANGSTROM = 0.3
BROAD_SHELL = (0.0, 0.1)
"""One broad radial term (Rs Å, η Å⁻²) beside the narrow shells: a smooth coordination count."""
DATA_ANGULAR_ETAS = (0.005, 0.1)


def radial_shells(nearest_neighbour_angstrom: float, cutoff_angstrom: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Radial centres (Å) and η (Å⁻²) placed relative to the nearest-neighbour distance d: a broad
    term plus narrow shells from 0.8·d to Rc − 0.3 Å, ≈0.145·d apart, η = 1/(2·spacing²).

    The shells resolve the first few neighbour shells of whatever element the data hold, where a
    fixed table in Å would be too coarse for small atoms or waste shells inside the core for large
    ones. For Pt (d = 2.77 Å, Rc 6.5 Å) this gives 11 shells 0.4 Å apart from 2.2 Å.
    """
    d = float(nearest_neighbour_angstrom)
    if not (np.isfinite(d) and d > 0):
        raise ValueError(f"nearest-neighbour distance must be a positive number of Å, got {d}")
    start = SHELL_START_NEAREST_NEIGHBOURS * d
    end = cutoff_angstrom - SHELL_END_BEFORE_CUTOFF_ANGSTROM
    if end <= start:
        raise ValueError(f"cutoff {cutoff_angstrom} Å is too short for shells from {start:.2f} Å (0.8 × nearest-neighbour distance)")
    n_shells = max(2, int(round((end - start) / (SHELL_SPACING_NEAREST_NEIGHBOURS * d))) + 1)
    centres = np.linspace(start, end, n_shells)
    eta = 0.5 / (centres[1] - centres[0]) ** 2
    rounded = tuple(round(float(c), 4) for c in centres)
    return (BROAD_SHELL[0], *rounded), (BROAD_SHELL[1], *([round(float(eta), 4)] * n_shells))


def median_nearest_neighbour_distance(structures) -> float:
    """Median over atoms of the distance (Å) to the nearest neighbour (periodic images included)."""
    from pipeline.science.neighbours import neighbour_pairs

    nearest = []
    for atoms in structures:
        pairs = neighbour_pairs(atoms, 5.0)
        if len(pairs.centers) == 0:
            continue
        distances = np.linalg.norm(pairs.vectors, axis=1)
        per_atom = np.full(len(atoms), np.inf)
        np.minimum.at(per_atom, pairs.centers, distances)
        nearest.extend(per_atom[np.isfinite(per_atom)])
    if not nearest:
        raise ValueError("no two atoms within 5 Å in the data: cannot place radial shells")
    return round(float(np.median(nearest)), 2)


def monomial_exponents(max_degree: int) -> list[tuple[int, int, int]]:
    """Exponents (a, b, c) of x^a y^b z^c with a + b + c ≤ max_degree, ordered by degree."""
    return [(a, b, degree - a - b) for degree in range(max_degree + 1) for a in range(degree, -1, -1) for b in range(degree - a, -1, -1)]


@dataclass
class PairBasis:
    """Per-pair basis of the pair sums B_c = ρ_c(r) u_c(r̂) and what its gradient needs:
    ∂B_c/∂r⃗ = along_c r̂ + (Σ_l L_cl lowered_l)/r, where along_c = (ρ'_c − p_c ρ_c/r) u_c folds in
    the radial part of ∇u (u is homogeneous of degree p_c, so r̂·∇̂u = p_c u), and `lowered` are
    the moment channels one degree lower."""

    values: torch.Tensor
    along: torch.Tensor
    lowered: torch.Tensor
    distances: torch.Tensor
    unit_vectors: torch.Tensor


@dataclass
class ChannelLayout:
    """How the C channels per neighbour element map to radial functions and monomials."""

    radial_index: np.ndarray  # (C,) which radial function ρ
    monomial_index: np.ndarray  # (C,) which monomial u
    n_radial_g2: int
    n_etas: int
    exponents: list[tuple[int, int, int]]
    lowered_channels: np.ndarray  # channels that are the target of a lowering (degree < max)
    lowering: np.ndarray = field(repr=False)  # (3, C, C_low): A_low[x] = A @ lowering[x]


class MomentDescriptor(torch.nn.Module):
    """G2 + G5-type features from per-atom moment tensors; see the module docstring. A `Descriptor`
    (descriptor_types.py).

    Its constants (Rs Å, η Å⁻², the monomial degrees, the lowering matrix, the G5 weights) are
    buffers registered once, so they follow the model's device and dtype; they derive from `params`
    and are not saved in model files.
    """

    lowering: torch.Tensor  # (3, channels, lowered channels), buffer
    quad_weights: torch.Tensor  # buffer
    diag_weights: torch.Tensor  # buffer
    radial_centers: torch.Tensor  # Å, buffer
    radial_etas: torch.Tensor  # Å⁻², buffer
    angular_etas: torch.Tensor  # Å⁻², buffer
    monomial_degrees: torch.Tensor  # buffer

    def __init__(self, params: SymmetryFunctionParams):
        super().__init__()
        self.params = params
        self.max_degree = max(params.angular_zetas)
        self.layout = self._channel_layout()
        weights = self._angular_weights()
        self.register_buffer("lowering", torch.from_numpy(self.layout.lowering), persistent=False)
        self.register_buffer("quad_weights", torch.from_numpy(weights["quad"]), persistent=False)
        self.register_buffer("diag_weights", torch.from_numpy(weights["diag"]), persistent=False)
        self.register_buffer("radial_centers", torch.tensor(params.radial_centers, dtype=torch.float64), persistent=False)
        self.register_buffer("radial_etas", torch.tensor(params.radial_etas, dtype=torch.float64), persistent=False)
        self.register_buffer("angular_etas", torch.tensor(params.angular_etas, dtype=torch.float64), persistent=False)
        degrees = [sum(exps) for exps in self.layout.exponents]
        self.register_buffer("monomial_degrees", torch.tensor(degrees, dtype=torch.float64), persistent=False)

    # ----- layout -------------------------------------------------------------------------
    def _channel_layout(self) -> ChannelLayout:
        p = self.params
        exponents = monomial_exponents(self.max_degree)
        n_g2, n_eta = len(p.radial_centers), len(p.angular_etas)
        radial_index = list(range(n_g2)) + [n_g2 + e for e in range(n_eta)]
        monomial_index = [0] * (n_g2 + n_eta)
        moment_channel: dict[tuple[int, tuple[int, int, int]], int] = {}
        for e in range(n_eta):
            for m, exps in enumerate(exponents):
                moment_channel[(e, exps)] = len(radial_index)
                radial_index.append(n_g2 + n_eta + e)
                monomial_index.append(m)
        n_channels = len(radial_index)
        lowered = sorted(ch for (e, exps), ch in moment_channel.items() if sum(exps) < self.max_degree)
        position_in_lowered = {ch: k for k, ch in enumerate(lowered)}
        lowering = np.zeros((3, n_channels, len(lowered)))
        for (e, exps), ch in moment_channel.items():
            for axis in range(3):
                if exps[axis] == 0:
                    continue
                lower = list(exps)
                lower[axis] -= 1
                target = moment_channel[(e, (lower[0], lower[1], lower[2]))]
                lowering[axis, ch, position_in_lowered[target]] = exps[axis]
        return ChannelLayout(
            radial_index=np.array(radial_index),
            monomial_index=np.array(monomial_index),
            n_radial_g2=n_g2,
            n_etas=n_eta,
            exponents=exponents,
            lowered_channels=np.array(lowered, dtype=np.int64),
            lowering=lowering,
        )

    @property
    def n_channels(self) -> int:
        return len(self.layout.radial_index)

    @property
    def pair_sum_shape(self) -> tuple[int, int]:
        """Per-atom pair sums: (neighbour elements, channels)."""
        return (self.params.n_elements, self.n_channels)

    def _angular_weights(self) -> dict[str, np.ndarray]:
        """Weights turning moment products into G5 features: G = Σ_n W[n, f] M_n M'_n − D[f] Q."""
        p, lay = self.params, self.layout
        n_eta = lay.n_etas
        combos = [(z, lam) for z in p.angular_zetas for lam in p.angular_lambdas]
        n_mono = len(lay.exponents)
        quad = np.zeros((n_eta, n_mono, n_eta * len(combos)))
        diag = np.zeros((n_eta, n_eta * len(combos)))
        for e in range(n_eta):
            for k, (zeta, lam) in enumerate(combos):
                f = e * len(combos) + k
                norm = 2.0 ** (1 - zeta)
                for m, exps in enumerate(lay.exponents):
                    degree = sum(exps)
                    if degree > zeta:
                        continue
                    multinomial = math.factorial(degree) / np.prod([math.factorial(x) for x in exps])
                    quad[e, m, f] = norm * math.comb(zeta, degree) * lam**degree * multinomial
                diag[e, f] = norm * (1 + lam) ** zeta
        return {"quad": quad, "diag": diag}

    # ----- per-pair basis -----------------------------------------------------------------
    def pair_basis(self, vectors: torch.Tensor) -> PairBasis:
        """Basis values and derivatives for pair vectors (…, 3) in Å."""
        like: dict[str, Any] = {"dtype": vectors.dtype, "device": vectors.device}
        r = torch.linalg.vector_norm(vectors, dim=-1)
        unit = vectors / r.clamp_min(1e-12).unsqueeze(-1)
        fc, dfc = cosine_cutoff(r, self.params.cutoff)
        rs, eta_r = self.radial_centers.to(**like), self.radial_etas.to(**like)
        eta_a = self.angular_etas.to(**like)
        rr = r.unsqueeze(-1)
        g2 = torch.exp(-eta_r * (rr - rs) ** 2)
        g2_value = g2 * fc.unsqueeze(-1)
        g2_deriv = g2 * (dfc.unsqueeze(-1) - 2 * eta_r * (rr - rs) * fc.unsqueeze(-1))
        gauss = torch.exp(-eta_a * rr**2)
        w = gauss * fc.unsqueeze(-1)
        dw = gauss * (dfc.unsqueeze(-1) - 2 * eta_a * rr * fc.unsqueeze(-1))
        mono = self._monomials(unit)
        n_low = len(monomial_exponents(self.max_degree - 1))
        outer = (w.unsqueeze(-1) * mono.unsqueeze(-2)).flatten(-2)
        outer_deriv = (dw.unsqueeze(-1) * mono.unsqueeze(-2)).flatten(-2)
        # channel order: G2 | w² per η | w_η·u_n (η-major, monomials by degree), as in _channel_layout
        values = torch.cat([g2_value, w * w, outer], dim=-1)
        degree = self.monomial_degrees.to(**like)
        homogeneous = ((w / rr).unsqueeze(-1) * (mono * degree).unsqueeze(-2)).flatten(-2)
        along = torch.cat([g2_deriv, 2 * w * dw, outer_deriv - homogeneous], dim=-1)
        lowered = (w.unsqueeze(-1) * mono[..., :n_low].unsqueeze(-2)).flatten(-2)
        return PairBasis(
            values=values,
            along=along,
            lowered=lowered,
            distances=r,
            unit_vectors=unit,
        )

    def _monomials(self, unit: torch.Tensor) -> torch.Tensor:
        """x^a y^b z^c of the unit vector for every exponent triple of the layout."""
        powers = [torch.ones_like(unit)]
        for _ in range(self.max_degree):
            powers.append(powers[-1] * unit)
        columns = [powers[a][..., 0] * powers[b][..., 1] * powers[c][..., 2] for a, b, c in self.layout.exponents]
        return torch.stack(columns, dim=-1)

    # ----- features -----------------------------------------------------------------------
    def features(self, pair_sums: torch.Tensor) -> torch.Tensor:
        """Features (…, F) from pair sums (…, n_elements, C); differentiable."""
        p, lay = self.params, self.layout
        n_g2, n_eta = lay.n_radial_g2, lay.n_etas
        n_el = p.n_elements
        radial = pair_sums[..., :n_g2].flatten(-2)
        self_terms = pair_sums[..., n_g2 : n_g2 + n_eta]
        moments = pair_sums[..., n_g2 + n_eta :].unflatten(-1, (n_eta, len(lay.exponents)))
        quad = self.quad_weights.to(dtype=pair_sums.dtype, device=pair_sums.device)
        diag = self.diag_weights.to(dtype=pair_sums.dtype, device=pair_sums.device)
        blocks = [radial]
        for a, b in combinations_with_replacement(range(n_el), 2):
            products = moments[..., a, :, :] * moments[..., b, :, :]
            angular = torch.einsum("...em,emf->...f", products, quad)
            if a == b:
                angular = angular - self_terms[..., a, :] @ diag
            else:
                angular = 2.0 * angular
            blocks.append(angular)
        return torch.cat(blocks, dim=-1)

    # ----- the Descriptor interface (descriptor_types.py) -------------------------------------
    def training_terms(self, item: LabelledStructure, dtype: torch.dtype) -> TrainingTerms:
        """Rows one structure needs, their pair sums, the trained force atoms and a dense ∂S/∂R.

        Rows are every atom of an energy-labelled structure, else the trained force atoms and the
        atoms whose neighbourhood holds them. Returns (rows, pair sums (len(rows), n_el, C),
        force atoms, Jacobian (F, 3, len(rows), n_el·C)).
        """
        from pipeline.science.neighbours import neighbour_pairs

        params = self.params
        atoms = item.atoms
        n_el, n_ch = params.n_elements, self.n_channels
        pairs = neighbour_pairs(atoms, params.cutoff)
        force_atoms = np.flatnonzero(item.force_mask)
        if item.energy is not None:
            rows = np.arange(len(atoms))
        else:
            touching = pairs.centers[np.isin(pairs.neighbours, force_atoms)]
            rows = np.union1d(force_atoms, touching)
        row_of = np.full(len(atoms), -1, dtype=np.int64)
        row_of[rows] = np.arange(len(rows))
        keep = row_of[pairs.centers] >= 0
        centers, neighbours = pairs.centers[keep], pairs.neighbours[keep]
        vectors = torch.from_numpy(pairs.vectors[keep]).to(dtype)
        basis = self.pair_basis(vectors)
        neighbour_el = params.element_lookup()[atoms.numbers[neighbours]]
        pair_sums = torch.zeros(len(rows), n_el, n_ch, dtype=dtype)
        pair_sums.index_put_((torch.from_numpy(row_of[centers]), torch.from_numpy(neighbour_el)), basis.values, accumulate=True)
        force_of = np.full(len(atoms), -1, dtype=np.int64)
        force_of[force_atoms] = np.arange(len(force_atoms))
        jacobian = torch.zeros(len(force_atoms), 3, len(rows), n_el * n_ch, dtype=dtype)
        involved = (force_of[neighbours] >= 0) | (force_of[centers] >= 0)
        if involved.any():
            sel = torch.from_numpy(np.flatnonzero(involved))
            grads = self._pair_basis_gradients(basis, sel).transpose(1, 2)  # (P, 3, C)
            columns = torch.from_numpy(neighbour_el[sel.numpy()])[:, None] * n_ch + torch.arange(n_ch)
            row_idx = torch.from_numpy(row_of[centers[sel.numpy()]])
            for atom_of_force, sign in ((neighbours, 1.0), (centers, -1.0)):
                f = force_of[atom_of_force[sel.numpy()]]
                hit = torch.from_numpy(f >= 0)
                if not hit.any():
                    continue
                f_t = torch.from_numpy(f)[hit]
                target = jacobian.view(len(force_atoms), 3, -1)
                flat_cols = row_idx[hit][:, None] * (n_el * n_ch) + columns[hit]  # (P', C)
                for axis in range(3):
                    target[:, axis].index_put_((f_t[:, None].expand_as(flat_cols), flat_cols), sign * grads[hit, axis], accumulate=True)
        return rows, pair_sums, force_atoms, jacobian

    def _pair_basis_gradients(self, basis: PairBasis, selection: torch.Tensor) -> torch.Tensor:
        """∂B_c/∂r_ij (P, C, 3) for the selected pairs: radial part plus the tangential moment part."""
        unit = basis.unit_vectors[selection]
        r = basis.distances[selection].unsqueeze(-1).unsqueeze(-1)
        tangential = torch.einsum("xcl,pl->pcx", self.lowering.to(unit.dtype), basis.lowered[selection])
        return basis.along[selection].unsqueeze(-1) * unit.unsqueeze(1) + tangential / r

    def atomic_energies_and_forces(
        self,
        atoms: Atoms,
        element_index: torch.Tensor,
        energies_and_gradients: PairSumEnergies,
        n_members: int,
        block_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (M, N) eV and forces (M, N, 3) eV/Å of every member, in blocks of centre
        atoms: each member's ∂E/∂S (per atom) pushed through the per-pair basis derivatives."""
        from pipeline.science.neighbours import neighbour_pairs, pad_pairs

        n_atoms = len(atoms)
        dtype, device = self.lowering.dtype, self.lowering.device
        pairs = neighbour_pairs(atoms, self.params.cutoff)
        padded = pad_pairs(pairs, n_atoms, far_angstrom=self.params.cutoff + 1.0)
        neighbours = torch.from_numpy(padded.neighbours).to(device)
        vectors = torch.from_numpy(padded.vectors).to(device=device, dtype=dtype)
        energies = torch.zeros(n_members, n_atoms, dtype=dtype, device=device)
        forces = torch.zeros(n_members, n_atoms, 3, dtype=dtype, device=device)
        with torch.no_grad():
            for start in range(0, n_atoms, block_size):
                block = slice(start, min(start + block_size, n_atoms))
                block_energies, pair_vectors = self._block_pair_gradients(
                    vectors[block], element_index[block], element_index[neighbours[block]], energies_and_gradients
                )
                energies[:, block] = block_energies
                forces[:, block] += pair_vectors.sum(dim=2)
                forces.index_add_(1, neighbours[block].reshape(-1), -pair_vectors.flatten(1, 2))
        return energies, forces

    def _block_pair_gradients(
        self,
        vectors: torch.Tensor,
        center_elements: torch.Tensor,
        neighbour_elements: torch.Tensor,
        energies_and_gradients: PairSumEnergies,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (M, B) and ∂E^m/∂r_ij (M, B, K, 3) for padded pair vectors (B, K, 3)."""
        basis = self.pair_basis(vectors)
        n_el = self.params.n_elements
        if n_el == 1:
            pair_sums = basis.values.sum(dim=1).unsqueeze(1)
        else:
            one_hot = torch.nn.functional.one_hot(neighbour_elements, n_el).to(vectors.dtype)
            pair_sums = torch.einsum("bks,bkc->bsc", one_hot, basis.values)
        energies, grads = energies_and_gradients(pair_sums, center_elements)
        n_members = energies.shape[0]
        lowered_grads = torch.einsum("mbsc,xcl->mbsxl", grads, self.lowering.to(grads.dtype))
        if n_el == 1:
            radial = torch.einsum("mbc,bkc->mbk", grads[:, :, 0], basis.along)
            tangential = torch.einsum("mbxl,bkl->mbkx", lowered_grads[:, :, 0], basis.lowered)
        else:
            radial_all = torch.einsum("mbsc,bkc->mbks", grads, basis.along)
            tangential_all = torch.einsum("mbsxl,bkl->mbksx", lowered_grads, basis.lowered)
            pick = neighbour_elements.unsqueeze(0).unsqueeze(-1).expand(n_members, -1, -1, 1)
            radial = radial_all.gather(3, pick).squeeze(3)
            pick3 = pick.unsqueeze(-1).expand(-1, -1, -1, 1, 3)
            tangential = tangential_all.gather(3, pick3).squeeze(3)
        unit = basis.unit_vectors
        pair_vectors = radial.unsqueeze(-1) * unit + tangential / basis.distances.unsqueeze(-1)
        return energies, pair_vectors
