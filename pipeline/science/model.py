"""The Behler-Parrinello ensemble: M members of per-element MLPs evaluated in one batched pass.

Energy E^m = Σ_i e^m(G_i); forces −∂E^m/∂R for all members at once by pushing each member's
∂E^m/∂S (per atom, cheap) through the shared per-pair basis derivatives (see descriptors.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from torch import nn

from pipeline.science.descriptor_types import Descriptor, DescriptorKind, SymmetryFunctionParams
from pipeline.science.descriptors import MomentDescriptor
from pipeline.science.g4 import G4Descriptor
from pipeline.science.networks import ELEMENT_NETWORKS
from pipeline.science.settings import ElementNetworks, TrainingSettings
from pipeline.science.networks import ResidualPairs as ResidualPairs  # the trainer's Jacobian layout, imported from here
from pipeline.science.uncertainty import atomic_energy_uncertainty, atomic_uncertainty


PREDICTION_BLOCK_SIZE = 1024
"""Centre atoms per block of a prediction: the fastest float32 block of 256–2048 in bench/bench_block_size.py
(bench/RESULTS.md, "Prediction defaults")."""
DESCRIPTORS: dict[DescriptorKind, type[MomentDescriptor] | type[G4Descriptor]] = {
    "g5-moments": MomentDescriptor,
    "g4": G4Descriptor,
}
"""The descriptor class of each kind; every one is a `Descriptor`, so nothing else asks the kind."""


def make_descriptor(params: SymmetryFunctionParams) -> Descriptor:
    """The descriptor of `params.kind`: G5 through moments (default) or explicit G4."""
    return DESCRIPTORS[params.kind](params)


@dataclass
class Prediction:
    """Ensemble prediction for one structure: mean energy (eV) and forces (eV/Å), δ_i (eV/Å), and
    the energy-based δE_i (eV, the spread of the members' atomic energies)."""

    energy: float
    forces: np.ndarray
    uncertainties: np.ndarray
    member_energies: np.ndarray
    member_forces: np.ndarray
    atomic_energies: np.ndarray
    energy_uncertainties: np.ndarray
    features: np.ndarray | None = None  # (N, F) each atom's features scaled by its element's mean/std, if asked

    @property
    def max_delta(self) -> float:
        return float(self.uncertainties.max(initial=0.0))


class EnsembleModel(nn.Module):
    """Descriptor + per-element feature scaling + batched ensemble of per-element networks."""

    def __init__(
        self,
        params: SymmetryFunctionParams,
        hidden: tuple[int, ...] = TrainingSettings.model_fields["hidden"].default,
        member_seeds: list[int] | None = None,
        element_networks: ElementNetworks = TrainingSettings.model_fields["element_networks"].default,
    ):
        super().__init__()
        self.params = params
        self.element_networks = element_networks
        self.descriptor: Descriptor = make_descriptor(params)
        member_seeds = list(member_seeds) if member_seeds is not None else list(range(10))
        self.member_seeds = member_seeds
        n_el, n_feat = params.n_elements, params.n_features
        networks = element_networks if n_el > 1 else "per-element"  # for one element the two are the same network
        self.networks = ELEMENT_NETWORKS[networks](n_el, n_feat, tuple(hidden), member_seeds)
        self.register_buffer("feature_mean", torch.zeros(n_el, n_feat, dtype=torch.float64))
        self.register_buffer("feature_std", torch.ones(n_el, n_feat, dtype=torch.float64))
        self.register_buffer("energy_offset", torch.zeros(n_el, dtype=torch.float64))
        self.register_buffer("energy_scale", torch.ones((), dtype=torch.float64))

    @property
    def n_members(self) -> int:
        return self.networks.n_members

    @property
    def dtype(self) -> torch.dtype:
        return self.feature_mean.dtype

    def element_indices(self, numbers: np.ndarray) -> np.ndarray:
        """Model element index per atom; ValueError naming any element the model was not trained on."""
        unknown = sorted(set(int(z) for z in numbers) - set(self.params.elements))
        if unknown:
            from ase.data import chemical_symbols

            known = ", ".join(chemical_symbols[z] for z in self.params.elements)
            missing = ", ".join(chemical_symbols[z] for z in unknown)
            raise ValueError(f"element(s) {missing} not in the model (trained on {known})")
        return self.params.element_lookup()[np.asarray(numbers, dtype=np.int64)]

    def renormalise_(
        self, feature_mean: torch.Tensor, feature_std: torch.Tensor, energy_offset: torch.Tensor, energy_scale: torch.Tensor
    ) -> None:
        """Adopt new feature scaling and energy offset/scale, changing the first and last layers so
        that every member's atomic energies stay exactly the same (warm start on a grown data set)."""
        nets = self.networks
        factor = self.energy_scale / energy_scale  # output layers absorb the change of energy scale
        with torch.no_grad():
            for element in range(self.params.n_elements):
                first = element * nets.n_layers
                ratio = feature_std[element] / self.feature_std[element]  # (F,)
                shift = (feature_mean[element] - self.feature_mean[element]) / self.feature_std[element]
                weight = nets.weights[first]  # (M, F, H)
                nets.biases[first].add_(torch.einsum("f,mfh->mh", shift, weight).unsqueeze(1))
                weight.mul_(ratio[None, :, None])
                last = first + nets.n_layers - 1
                nets.weights[last].mul_(factor)
                nets.biases[last].mul_(factor).add_((self.energy_offset[element] - energy_offset[element]) / energy_scale)
            self.feature_mean.copy_(feature_mean)
            self.feature_std.copy_(feature_std)
            self.energy_offset.copy_(energy_offset)
            self.energy_scale.copy_(energy_scale)

    # ----- per-atom energies and their gradients w.r.t. pair sums --------------------------
    def atomic_energies_from_features(self, features: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:
        """Atomic energies (M, B) in eV from unscaled features (M, B, F)."""
        scaled = (features - self.feature_mean[element_index]) / self.feature_std[element_index]
        outputs = self.networks(scaled, element_index)
        return outputs * self.energy_scale + self.energy_offset[element_index]

    def atomic_energies(self, pair_sums: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:
        """Atomic energies (M, B) in eV from pair sums (M, B, n_elements, C)."""
        return self.atomic_energies_from_features(self.descriptor.features(pair_sums), element_index)

    def energies_and_feature_gradients(
        self, features: torch.Tensor, element_index: torch.Tensor, create_graph: bool = False, scaled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (M, B) and ∂E^m/∂G_i (M, B, F) from features (B, F), each member its own.

        With `scaled`, the features are already (G − mean)/std and the gradients are w.r.t. those.
        """
        if self.networks.n_layers > 1:
            std = self.feature_std[element_index]
            inputs = features if scaled else (features - self.feature_mean[element_index]) / std
            outputs, input_grads = self.networks.outputs_and_input_gradients(inputs.detach(), element_index)
            energies = outputs * self.energy_scale + self.energy_offset[element_index]
            gradients = input_grads * self.energy_scale
            if not scaled:
                gradients = gradients / std
            if not create_graph:
                energies, gradients = energies.detach(), gradients.detach()
            return energies, gradients
        shape = (self.n_members, *features.shape)
        per_member = features.detach().unsqueeze(0).expand(shape).requires_grad_(True)
        with torch.enable_grad():
            if scaled:
                outputs = self.networks(per_member, element_index)
                energies = outputs * self.energy_scale + self.energy_offset[element_index]
            else:
                energies = self.atomic_energies_from_features(per_member, element_index)
            (gradients,) = torch.autograd.grad(energies.sum(), per_member, create_graph=create_graph)
        return energies, gradients

    def energies_and_pair_sum_gradients(self, pair_sums: torch.Tensor, element_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (M, B) and ∂E^m/∂S_i (M, B, n_elements, C) from pair sums (B, n_elements, C)."""
        shape = (self.n_members, *pair_sums.shape)
        per_member = pair_sums.detach().unsqueeze(0).expand(shape).clone().requires_grad_(True)
        with torch.enable_grad():
            energies = self.atomic_energies(per_member, element_index)
            (gradients,) = torch.autograd.grad(energies.sum(), per_member)
        return energies, gradients

    # ----- inference ----------------------------------------------------------------------
    def predict(self, atoms: Atoms, block_size: int = PREDICTION_BLOCK_SIZE, with_features: bool = False) -> Prediction:
        """Energy, forces and per-atom uncertainty δ_i for a structure, in blocks of centre atoms;
        `with_features` also keeps each atom's scaled features (the model's input), from the same pass."""
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if with_features else None
        atomic, forces = self.member_atomic_energies_and_forces(atoms, block_size, kept)
        member_forces = forces.cpu().numpy().astype(np.float64)
        member_atomic = atomic.cpu().numpy().astype(np.float64)
        member_energies = member_atomic.sum(axis=1)
        features = None
        if kept is not None:
            scaled = [(self.descriptor.features(sums) - self.feature_mean[el]) / self.feature_std[el] for sums, el in kept]
            features = torch.cat(scaled).cpu().numpy().astype(np.float64)
        return Prediction(
            energy=float(member_energies.mean()),
            forces=member_forces.mean(axis=0),
            uncertainties=atomic_uncertainty(member_forces),
            member_energies=member_energies,
            member_forces=member_forces,
            atomic_energies=member_atomic.mean(axis=0),
            energy_uncertainties=atomic_energy_uncertainty(member_atomic),
            features=features,
        )

    def member_energies_and_forces(self, atoms: Atoms, block_size: int = PREDICTION_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies (M,) eV and forces (M, N, 3) eV/Å of every member."""
        atomic, forces = self.member_atomic_energies_and_forces(atoms, block_size)
        return atomic.sum(dim=1), forces

    def member_atomic_energies_and_forces(
        self, atoms: Atoms, block_size: int = PREDICTION_BLOCK_SIZE, kept_pair_sums: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (M, N) eV and forces (M, N, 3) eV/Å of every member; each block's pair
        sums and centre elements are appended to `kept_pair_sums` when one is given (in atom order)."""
        element_index = torch.from_numpy(self.element_indices(atoms.numbers)).to(self.feature_mean.device)
        energies_and_gradients = self.energies_and_pair_sum_gradients
        if kept_pair_sums is not None:

            def energies_and_gradients(pair_sums: torch.Tensor, centre_elements: torch.Tensor):
                kept_pair_sums.append((pair_sums.detach(), centre_elements))
                return self.energies_and_pair_sum_gradients(pair_sums, centre_elements)

        return self.descriptor.atomic_energies_and_forces(atoms, element_index, energies_and_gradients, self.n_members, block_size)
