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

from pipeline.science.descriptors import SymmetryFunctionParams, make_descriptor
from pipeline.science.uncertainty import atomic_energy_uncertainty, atomic_uncertainty


class EnsembleNetworks(nn.Module):
    """Per-element tanh MLPs for M members; weights of a layer stacked as (M, fan_in, fan_out)."""

    def __init__(self, n_elements: int, n_features: int, hidden: tuple[int, ...], member_seeds: list[int]):
        super().__init__()
        self.n_members = len(member_seeds)
        self.hidden = tuple(hidden)
        widths = [n_features, *hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        per_member = [self._member_init(widths, n_elements, seed) for seed in member_seeds]
        for element in range(n_elements):
            for layer in range(len(widths) - 1):
                self.weights.append(nn.Parameter(torch.stack([m[element][layer][0] for m in per_member])))
                self.biases.append(nn.Parameter(torch.stack([m[element][layer][1] for m in per_member])))
        self.n_layers = len(widths) - 1

    @staticmethod
    def _member_init(widths: list[int], n_elements: int, seed: int) -> list:
        """Xavier-uniform weights and zero biases for one member, from its own seed."""
        generator = torch.Generator().manual_seed(int(seed))
        member = []
        for _ in range(n_elements):
            layers = []
            for fan_in, fan_out in zip(widths[:-1], widths[1:]):
                bound = float(np.sqrt(6.0 / (fan_in + fan_out)))
                weight = (torch.rand(fan_in, fan_out, generator=generator, dtype=torch.float64) * 2 - 1) * bound
                layers.append((weight, torch.zeros(1, fan_out, dtype=torch.float64)))
            member.append(layers)
        return member

    def forward(self, features: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:
        """Atomic outputs (M, B) from scaled features (M, B, F) and element indices (B,)."""
        present = torch.unique(element_index).tolist()
        if len(present) == 1:
            return self._element_outputs(features, present[0])
        out = features.new_zeros(features.shape[0], features.shape[1])
        for element in present:
            rows = (element_index == element).nonzero(as_tuple=True)[0]
            out = out.index_copy(1, rows, self._element_outputs(features[:, rows], element))
        return out

    def _element_outputs(self, features: torch.Tensor, element: int) -> torch.Tensor:
        """One element's network, all members at once: (M, B, F) → (M, B)."""
        h = features
        for layer in range(self.n_layers):
            k = element * self.n_layers + layer
            h = torch.baddbmm(self.biases[k], h, self.weights[k])
            if layer < self.n_layers - 1:
                h = torch.tanh(h)
        return h.squeeze(-1)

    def outputs_and_input_gradients(
        self, features: torch.Tensor, element_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic outputs (M, B) and their gradients w.r.t. the inputs (M, B, F) from inputs (B, F)
        shared by all members, by an explicit backward pass: differentiable w.r.t. the weights with
        one ordinary backward (no double backward), which makes a force-trained step about twice as cheap."""
        present = torch.unique(element_index).tolist()
        if len(present) == 1:
            return self._element_outputs_and_input_gradients(features, present[0])
        n_members = self.n_members
        out = features.new_zeros(n_members, features.shape[0])
        grads = features.new_zeros(n_members, *features.shape)
        for element in present:
            rows = (element_index == element).nonzero(as_tuple=True)[0]
            element_out, element_grads = self._element_outputs_and_input_gradients(features[rows], element)
            out = out.index_copy(1, rows, element_out)
            grads = grads.index_copy(1, rows, element_grads)
        return out, grads

    def _element_outputs_and_input_gradients(self, features: torch.Tensor, element: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One element's network and its input gradient for inputs (B, F) shared by all members."""
        first = element * self.n_layers
        weights = [self.weights[first + layer] for layer in range(self.n_layers)]
        biases = [self.biases[first + layer] for layer in range(self.n_layers)]
        # the first layer is one GEMM for all members: (B, F) @ (F, M·H)
        n_members, n_in, width = weights[0].shape
        h = (features @ weights[0].permute(1, 0, 2).reshape(n_in, n_members * width)).reshape(-1, n_members, width)
        h = torch.tanh(h.transpose(0, 1) + biases[0])
        slopes = [1.0 - h * h]
        for layer in range(1, self.n_layers - 1):
            h = torch.tanh(torch.baddbmm(biases[layer], h, weights[layer]))
            slopes.append(1.0 - h * h)
        out = torch.baddbmm(biases[-1], h, weights[-1]).squeeze(-1)
        delta = weights[-1].transpose(1, 2) * slopes[-1]  # (M, B, H_last): ∂out/∂a of the last hidden layer
        for layer in range(self.n_layers - 2, 0, -1):
            delta = torch.bmm(delta, weights[layer].transpose(1, 2)) * slopes[layer - 1]
        return out, torch.bmm(delta, weights[0].transpose(1, 2))

    def training_pass(self, features: torch.Tensor, element_index: torch.Tensor) -> "TrainingPass":
        """Outputs (R, M) and input gradients (R, F, M) from inputs (R, F) shared by all members,
        keeping each element's activations for `accumulate_parameter_gradients` (no autograd).

        Rows come first and members last: every layer is then one GEMM with a block-diagonal weight
        matrix (members side by side), and the input gradients come out in the (R·F, M) layout the
        sparse force product takes, with no transposed copies.
        """
        present = torch.unique(element_index).tolist()
        if len(present) == 1:
            only = self._element_training_pass(features, present[0], slice(None))
            return TrainingPass(only.outputs, only.input_gradients, [only])
        out = features.new_zeros(features.shape[0], self.n_members)
        grads = features.new_zeros(*features.shape, self.n_members)
        passes = []
        for element in present:
            rows = _as_slice((element_index == element).nonzero(as_tuple=True)[0])
            element_pass = self._element_training_pass(features[rows], element, rows)
            out[rows] = element_pass.outputs
            grads[rows] = element_pass.input_gradients
            passes.append(element_pass)
        return TrainingPass(out, grads, passes)

    def _element_layers(self, element: int) -> "_BlockLayers":
        """One element's layers as block-diagonal matrices over the members (detached)."""
        first = element * self.n_layers
        weights = [self.weights[first + layer].detach() for layer in range(self.n_layers)]
        biases = [self.biases[first + layer].detach().reshape(-1) for layer in range(self.n_layers)]
        n_members, n_in, width = weights[0].shape
        # input → first hidden, (F, M·H): column m·H + h is member m's unit h
        first_layer = weights[0].permute(1, 0, 2).reshape(n_in, n_members * width)
        # first hidden → input gradient, (M·H, F·M): member m's W0ᵀ in rows m·H.., columns f·M + m
        to_inputs = weights[0].new_zeros(n_members, width, n_in, n_members)
        members = torch.arange(n_members, device=weights[0].device)
        to_inputs[members, :, :, members] = weights[0].transpose(1, 2)
        blocks = [torch.block_diag(*w) for w in weights[1:]]
        return _BlockLayers(first_layer, to_inputs.reshape(n_members * width, n_in * n_members), blocks, biases)

    def _element_training_pass(self, features: torch.Tensor, element: int, rows: torch.Tensor | slice) -> "_ElementPass":
        """One element's network, input gradient and activations for inputs (B, F)."""
        layers = self._element_layers(element)
        activations = [torch.tanh(torch.addmm(layers.biases[0], features, layers.first))]
        for layer in range(1, self.n_layers - 1):
            activations.append(torch.tanh(torch.addmm(layers.biases[layer], activations[-1], layers.blocks[layer - 1])))
        slopes = [1.0 - a * a for a in activations]
        out = torch.addmm(layers.biases[-1], activations[-1], layers.blocks[-1])  # (B, M)
        delta = layers.blocks[-1].sum(1) * slopes[-1]  # ∂out/∂z of the last hidden layer, (B, M·H)
        for layer in range(self.n_layers - 2, 0, -1):
            delta = (delta @ layers.blocks[layer - 1].T) * slopes[layer - 1]
        input_gradients = (delta @ layers.to_inputs).reshape(features.shape[0], features.shape[1], -1)
        return _ElementPass(element, rows, features, layers, activations, slopes, out, input_gradients)

    def accumulate_parameter_gradients(
        self, training_pass: "TrainingPass", output_weights: torch.Tensor, input_weights: torch.Tensor
    ) -> None:
        """Add ∂Q/∂θ to every parameter's .grad for Q = Σ a·out + Σ u·(∂out/∂x), a = `output_weights`
        (R, M), u = `input_weights` (R, F, M): the chain rule of a loss on energies and forces.

        Written out by hand (a tangent pass along u, then one reverse sweep over primal and tangent)
        instead of autograd's backward through the input gradient: the same products as GEMMs,
        without the graph, which is most of a force-trained step's cost on these tiny networks.
        """
        for element_pass in training_pass.elements:
            rows = element_pass.rows
            self._element_parameter_gradients(element_pass, output_weights[rows], input_weights[rows])

    def _element_parameter_gradients(self, p: "_ElementPass", a: torch.Tensor, u: torch.Tensor) -> None:
        layers, last, n_members = p.layers, self.n_layers - 1, self.n_members
        flat_u = u.reshape(u.shape[0], -1)  # (B, F·M)
        # tangent pass: t_l = ∂z_l along u, and the activations' tangents s_l·t_l
        tangents = [flat_u @ layers.to_inputs.T]
        tangent_activations = [p.slopes[0] * tangents[0]]
        for layer in range(1, last):
            tangents.append(tangent_activations[-1] @ layers.blocks[layer - 1])
            tangent_activations.append(p.slopes[layer] * tangents[-1])
        gradients_w: list[torch.Tensor] = [None] * self.n_layers  # type: ignore[list-item]
        gradients_b: list[torch.Tensor] = [None] * self.n_layers  # type: ignore[list-item]
        width = p.activations[-1].shape[1] // n_members
        output_row = layers.blocks[-1].sum(1)  # (M·H,): member m's output weights at m·H..
        a_wide = a.repeat_interleave(width, dim=1)  # (B, M·H)
        gradients_w[last] = ((p.activations[-1] * a_wide).sum(0) + tangent_activations[-1].sum(0)).reshape(n_members, width, 1)
        gradients_b[last] = a.sum(0).reshape(n_members, 1, 1)
        h_bar = a_wide * output_row  # adjoint of the last activations (primal)
        th_bar = output_row.expand_as(h_bar)  # adjoint of their tangents (Σ of the tangent output)
        for layer in range(last - 1, -1, -1):
            h, slope, t = p.activations[layer], p.slopes[layer], tangents[layer]
            t_bar = th_bar * slope
            z_bar = (h_bar - 2.0 * h * th_bar * t) * slope
            n_out = h.shape[1] // n_members
            if layer == 0:
                n_in = p.features.shape[1]
                shared = (p.features.T @ z_bar).reshape(n_in, n_members, n_out).transpose(0, 1)
                cross = (flat_u.T @ t_bar).reshape(n_in, n_members, n_members, n_out)
                gradients_w[0] = shared + torch.diagonal(cross, dim1=1, dim2=2).permute(2, 0, 1)
            else:
                below, tangent_below = p.activations[layer - 1], tangent_activations[layer - 1]
                n_in = below.shape[1] // n_members
                full = (below.T @ z_bar + tangent_below.T @ t_bar).reshape(n_members, n_in, n_members, n_out)
                gradients_w[layer] = torch.diagonal(full, dim1=0, dim2=2).permute(2, 0, 1)
                h_bar = z_bar @ layers.blocks[layer - 1].T
                th_bar = t_bar @ layers.blocks[layer - 1].T
            gradients_b[layer] = z_bar.sum(0).reshape(n_members, 1, n_out)
        first = p.element * self.n_layers
        for layer in range(self.n_layers):
            for parameter, gradient in ((self.weights[first + layer], gradients_w[layer]),
                                        (self.biases[first + layer], gradients_b[layer])):
                parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient

    def residual_parameter_jacobian(
        self, features: torch.Tensor, element: int, output_weights: torch.Tensor, input_weights: torch.Tensor,
        pairs: "ResidualPairs",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """∂r/∂θ (M, R, P_e) of R residuals r = Σ_k (a_k·out_k + u_k·∂out_k/∂x) over their pairs k
        (K scaled inputs (K, F) of one element, a (K,), u (K, F)) for every member, and the columns
        (P_e,) of those parameters in a member's flat parameter vector (`parameters()` order).

        The rows of a Gauss–Newton Jacobian: an energy residual sums a·out over its atoms, a force
        residual u·∂out/∂x over the feature rows its force depends on. The first layer's weights are
        most of P_e; each layer's block is Σ_k (x_k ⊗ z̄_k + u_k ⊗ ż̄_k), summed per residual as one
        batched product over the residual's pairs laid out in `pairs.slot` (never one row of F·H per
        pair: 2.9× slower on the two-element bench data, `bench/bench_lm_jacobian.py`); the biases are
        summed pair by pair.
        """
        parameters = list(self.parameters())
        offsets = np.concatenate([[0], np.cumsum([p[0].numel() for p in parameters])])
        first = element * self.n_layers
        weights = [self.weights[first + layer].detach() for layer in range(self.n_layers)]
        biases = [self.biases[first + layer].detach() for layer in range(self.n_layers)]
        n_members, n_residuals = self.n_members, pairs.n_residuals
        a = output_weights.view(1, -1, 1)
        # primal h_l and tangent ḣ_l (along u) of every hidden layer, (M, K, H_l)
        below, tangent_below = [features], [input_weights]
        tangents, slopes = [], []
        for layer in range(self.n_layers - 1):
            h = torch.tanh(below[-1] @ weights[layer] + biases[layer])
            tangent = tangent_below[-1] @ weights[layer]
            slope = 1.0 - h * h
            tangents.append(tangent)
            slopes.append(slope)
            below.append(h)
            tangent_below.append(slope * tangent)
        indices = [first + layer for layer in range(self.n_layers)]
        indices = indices + [len(self.weights) + k for k in indices]  # its weights, then its biases
        sizes = [int(offsets[k + 1] - offsets[k]) for k in indices]
        jacobian = features.new_zeros(n_members, n_residuals, sum(sizes))
        blocks = list(jacobian.split(sizes, dim=2))  # views: each parameter's columns
        grad_w, grad_b = blocks[: self.n_layers], blocks[self.n_layers:]

        def add_pairs(block: torch.Tensor, per_pair: torch.Tensor) -> None:  # (M, K, n) summed per residual
            block.index_add_(1, pairs.residual, per_pair.reshape(n_members, per_pair.shape[1], -1))

        last = weights[-1].transpose(1, 2)  # (M, 1, H)
        add_pairs(grad_w[-1], a * below[-1] + tangent_below[-1])
        add_pairs(grad_b[-1], a.expand(n_members, -1, 1))
        h_bar, tangent_bar = a * last, last.expand_as(below[-1])  # adjoints of h and ḣ of the last hidden layer
        for layer in range(self.n_layers - 2, -1, -1):
            h, slope = below[layer + 1], slopes[layer]
            z_tangent_bar = tangent_bar * slope
            z_bar = (h_bar - 2.0 * h * tangent_bar * tangents[layer]) * slope
            grad_w[layer].copy_(pairs.outer_sums(below[layer], tangent_below[layer], z_bar, z_tangent_bar))
            add_pairs(grad_b[layer], z_bar)
            if layer > 0:
                h_bar = z_bar @ weights[layer].transpose(1, 2)
                tangent_bar = z_tangent_bar @ weights[layer].transpose(1, 2)
        columns = torch.cat([torch.arange(int(offsets[k]), int(offsets[k + 1])) for k in indices])
        return jacobian, columns.to(features.device)


@dataclass
class ResidualPairs:
    """Which of R residuals each of K (residual, feature row) pairs belongs to, and its slot among
    that residual's pairs (0 … `n_slots` − 1): the layout of the batched per-residual sums."""

    residual: torch.Tensor  # (K,) in 0 … n_residuals − 1
    slot: torch.Tensor  # (K,)
    n_residuals: int
    n_slots: int

    @classmethod
    def of(cls, residual: torch.Tensor) -> "ResidualPairs":
        """The layout for pairs whose residuals are `residual` (K,), values 0 … R − 1, any order."""
        order = torch.argsort(residual, stable=True)
        counts = torch.bincount(residual)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(residual)
        slot[order] = torch.arange(len(residual), device=residual.device) - starts[residual[order]]
        return cls(residual, slot, len(counts), int(counts.max()) if len(counts) else 0)

    def outer_sums(self, x: torch.Tensor, u: torch.Tensor, z_bar: torch.Tensor, z_tangent_bar: torch.Tensor) -> torch.Tensor:
        """Σ_k∈r (x_k ⊗ z̄_k + u_k ⊗ ż̄_k) (M, R, F·H) from a layer's inputs and their tangents x, u
        ((K, F) shared by the members, or (M, K, F)) and the adjoints z̄, ż̄ (M, K, H) of its outputs:
        one (F × 2S)·(2S × H) product per residual, its pairs padded to S = `n_slots`."""
        n_members, _, width = z_bar.shape
        n_in, n_slots, n_residuals = x.shape[-1], self.n_slots, self.n_residuals
        slots, tangent_slots = self.slot, n_slots + self.slot
        adjoints = x.new_zeros(n_residuals, 2 * n_slots, n_members, width)
        adjoints[self.residual, slots] = z_bar.transpose(0, 1)
        adjoints[self.residual, tangent_slots] = z_tangent_bar.transpose(0, 1)
        if x.dim() == 2:  # the first layer: inputs shared, all members in one product per residual
            inputs = x.new_zeros(n_residuals, 2 * n_slots, n_in)
            inputs[self.residual, slots] = x
            inputs[self.residual, tangent_slots] = u
            sums = torch.bmm(inputs.transpose(1, 2), adjoints.reshape(n_residuals, 2 * n_slots, n_members * width))
            return sums.reshape(n_residuals, n_in, n_members, width).permute(2, 0, 1, 3).reshape(n_members, n_residuals, -1)
        inputs = x.new_zeros(n_residuals, 2 * n_slots, n_members, n_in)
        inputs[self.residual, slots] = x.transpose(0, 1)
        inputs[self.residual, tangent_slots] = u.transpose(0, 1)
        sums = torch.bmm(inputs.permute(2, 0, 3, 1).reshape(n_members * n_residuals, n_in, 2 * n_slots),
                         adjoints.permute(2, 0, 1, 3).reshape(n_members * n_residuals, 2 * n_slots, width))
        return sums.reshape(n_members, n_residuals, n_in * width)


def _as_slice(rows: torch.Tensor) -> torch.Tensor | slice:
    """A run of consecutive row indices as a slice (views instead of gathers), else the indices."""
    if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


@dataclass
class _BlockLayers:
    """One element's layers for all members at once: members side by side in every matrix."""

    first: torch.Tensor  # (F, M·H₀)
    to_inputs: torch.Tensor  # (M·H₀, F·M): back from the first hidden layer to the inputs
    blocks: list[torch.Tensor]  # block-diagonal (M·H_{l−1}, M·H_l) for the later layers, the last (M·H, M)
    biases: list[torch.Tensor]  # (M·H_l,) per layer


@dataclass
class _ElementPass:
    """One element's rows of a training pass: inputs, layers, tanh activations and slopes (B, M·H_l)."""

    element: int
    rows: torch.Tensor | slice
    features: torch.Tensor  # (B, F), shared by the members
    layers: _BlockLayers
    activations: list[torch.Tensor]
    slopes: list[torch.Tensor]  # 1 − tanh²
    outputs: torch.Tensor  # (B, M)
    input_gradients: torch.Tensor  # (B, F, M)


@dataclass
class TrainingPass:
    """A batched forward pass with input gradients, rows first and members last."""

    outputs: torch.Tensor  # (R, M)
    input_gradients: torch.Tensor  # (R, F, M)
    elements: list[_ElementPass]


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
        hidden: tuple[int, ...] = (5, 5),
        member_seeds: list[int] | None = None,
    ):
        super().__init__()
        self.params = params
        self.descriptor = make_descriptor(params)
        member_seeds = list(member_seeds) if member_seeds is not None else list(range(10))
        self.member_seeds = member_seeds
        n_el, n_feat = params.n_elements, params.n_features
        self.networks = EnsembleNetworks(n_el, n_feat, tuple(hidden), member_seeds)
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

    def energies_and_pair_sum_gradients(
        self, pair_sums: torch.Tensor, element_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (M, B) and ∂E^m/∂S_i (M, B, n_elements, C) from pair sums (B, n_elements, C)."""
        shape = (self.n_members, *pair_sums.shape)
        per_member = pair_sums.detach().unsqueeze(0).expand(shape).clone().requires_grad_(True)
        with torch.enable_grad():
            energies = self.atomic_energies(per_member, element_index)
            (gradients,) = torch.autograd.grad(energies.sum(), per_member)
        return energies, gradients

    # ----- inference ----------------------------------------------------------------------
    def predict(self, atoms: Atoms, block_size: int = 2048, with_features: bool = False) -> Prediction:
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

    def member_energies_and_forces(self, atoms: Atoms, block_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies (M,) eV and forces (M, N, 3) eV/Å of every member."""
        atomic, forces = self.member_atomic_energies_and_forces(atoms, block_size)
        return atomic.sum(dim=1), forces

    def member_atomic_energies_and_forces(
        self, atoms: Atoms, block_size: int = 2048, kept_pair_sums: list[tuple[torch.Tensor, torch.Tensor]] | None = None
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
