"""The ensemble's networks: per-element tanh MLPs for M members, stacked and evaluated in one pass.

Every forward pass runs one layer loop (`hidden_layers`) and one activation (`activation`,
`activation_slope`); the training passes keep hand-written reverse sweeps (`pre_activation_adjoints`
is their one step) because on these tiny networks autograd's graph costs more than the products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn


def activation(z: torch.Tensor) -> torch.Tensor:
    """The hidden layers' activation h = tanh(z)."""
    return torch.tanh(z)


def activation_slope(h: torch.Tensor) -> torch.Tensor:
    """dh/dz = 1 − h², written in the activation's value h (what the hand-written sweeps keep)."""
    return 1.0 - h * h


def hidden_layers(
    inputs: torch.Tensor, n_hidden: int, affine: Callable[[int, torch.Tensor], torch.Tensor], with_slopes: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The layer loop of every forward pass: [x, h_1, …, h_n] with h_l = activation(affine(l − 1, h_{l−1})),
    and the slopes dh_l/dz_l (empty without `with_slopes`); `affine(l, h)` is layer l's z = h·W_l + b_l
    in whatever layout the caller keeps its weights."""
    layers, slopes = [inputs], []
    for layer in range(n_hidden):
        layers.append(activation(affine(layer, layers[-1])))
        if with_slopes:
            slopes.append(activation_slope(layers[-1]))
    return layers, slopes


def pre_activation_adjoints(
    h: torch.Tensor, slope: torch.Tensor, tangent: torch.Tensor, h_bar: torch.Tensor, tangent_bar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the hand-written reverse sweeps: the adjoints (z̄, ż̄) of a layer's pre-activation z
    and its tangent ż, from those (h̄, ḣ̄) of h = tanh(z) and ḣ = slope·ż, where d slope/dh = −2h."""
    z_tangent_bar = tangent_bar * slope
    return (h_bar - 2.0 * h * tangent_bar * tangent) * slope, z_tangent_bar


class EnsembleNetworks(nn.Module):
    """Per-element tanh MLPs for M members; weights of a layer stacked as (M, fan_in, fan_out)."""

    shared = False
    """Whether one network serves every element (`SharedEnsembleNetworks`)."""

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
        self.weights_per_element = sum(fan_in * fan_out + fan_out for fan_in, fan_out in zip(widths[:-1], widths[1:]))

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
        first = element * self.n_layers

        def affine(layer: int, h: torch.Tensor) -> torch.Tensor:
            return torch.baddbmm(self.biases[first + layer], h, self.weights[first + layer])

        layers, _ = hidden_layers(features, self.n_layers - 1, affine, with_slopes=False)
        return affine(self.n_layers - 1, layers[-1]).squeeze(-1)

    def outputs_and_input_gradients(self, features: torch.Tensor, element_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        n_members, n_in, width = weights[0].shape

        def affine(layer: int, h: torch.Tensor) -> torch.Tensor:
            if layer == 0:  # one GEMM for all members: (B, F) @ (F, M·H)
                z = (h @ weights[0].permute(1, 0, 2).reshape(n_in, n_members * width)).reshape(-1, n_members, width)
                return z.transpose(0, 1) + biases[0]
            return torch.baddbmm(biases[layer], h, weights[layer])

        layers, slopes = hidden_layers(features, self.n_layers - 1, affine)
        out = affine(self.n_layers - 1, layers[-1]).squeeze(-1)
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

        def affine(layer: int, h: torch.Tensor) -> torch.Tensor:
            return torch.addmm(layers.biases[layer], h, layers.first if layer == 0 else layers.blocks[layer - 1])

        inputs_and_activations, slopes = hidden_layers(features, self.n_layers - 1, affine)
        activations = inputs_and_activations[1:]
        out = affine(self.n_layers - 1, activations[-1])  # (B, M)
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
        gradients_w: list[torch.Tensor] = [None] * self.n_layers  # type: ignore[list-item]  # every slot is filled (last layer down) before use
        gradients_b: list[torch.Tensor] = [None] * self.n_layers  # type: ignore[list-item]  # likewise
        width = p.activations[-1].shape[1] // n_members
        output_row = layers.blocks[-1].sum(1)  # (M·H,): member m's output weights at m·H..
        a_wide = a.repeat_interleave(width, dim=1)  # (B, M·H)
        gradients_w[last] = ((p.activations[-1] * a_wide).sum(0) + tangent_activations[-1].sum(0)).reshape(n_members, width, 1)
        gradients_b[last] = a.sum(0).reshape(n_members, 1, 1)
        h_bar = a_wide * output_row  # adjoint of the last activations (primal)
        th_bar = output_row.expand_as(h_bar)  # adjoint of their tangents (Σ of the tangent output)
        for layer in range(last - 1, -1, -1):
            h = p.activations[layer]
            z_bar, t_bar = pre_activation_adjoints(h, p.slopes[layer], tangents[layer], h_bar, th_bar)
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
            for parameter, gradient in (
                (self.weights[first + layer], gradients_w[layer]),
                (self.biases[first + layer], gradients_b[layer]),
            ):
                parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient

    def residual_parameter_jacobian(
        self,
        features: torch.Tensor,
        element: int,
        output_weights: torch.Tensor,
        input_weights: torch.Tensor,
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
        below, slopes = hidden_layers(features, self.n_layers - 1, lambda layer, h: h @ weights[layer] + biases[layer])
        tangent_below, tangents = [input_weights], []
        for layer in range(self.n_layers - 1):
            tangents.append(tangent_below[-1] @ weights[layer])
            tangent_below.append(slopes[layer] * tangents[-1])
        indices = [first + layer for layer in range(self.n_layers)]
        indices = indices + [len(self.weights) + k for k in indices]  # its weights, then its biases
        sizes = [int(offsets[k + 1] - offsets[k]) for k in indices]
        jacobian = features.new_zeros(n_members, n_residuals, sum(sizes))
        blocks = list(jacobian.split(sizes, dim=2))  # views: each parameter's columns
        grad_w, grad_b = blocks[: self.n_layers], blocks[self.n_layers :]

        def add_pairs(block: torch.Tensor, per_pair: torch.Tensor) -> None:  # (M, K, n) summed per residual
            block.index_add_(1, pairs.residual, per_pair.reshape(n_members, per_pair.shape[1], -1))

        last = weights[-1].transpose(1, 2)  # (M, 1, H)
        add_pairs(grad_w[-1], a * below[-1] + tangent_below[-1])
        add_pairs(grad_b[-1], a.expand(n_members, -1, 1))
        h_bar, tangent_bar = a * last, last.expand_as(below[-1])  # adjoints of h and ḣ of the last hidden layer
        for layer in range(self.n_layers - 2, -1, -1):
            z_bar, z_tangent_bar = pre_activation_adjoints(below[layer + 1], slopes[layer], tangents[layer], h_bar, tangent_bar)
            grad_w[layer].copy_(pairs.outer_sums(below[layer], tangent_below[layer], z_bar, z_tangent_bar))
            add_pairs(grad_b[layer], z_bar)
            if layer > 0:
                h_bar = z_bar @ weights[layer].transpose(1, 2)
                tangent_bar = z_tangent_bar @ weights[layer].transpose(1, 2)
        columns = torch.cat([torch.arange(int(offsets[k]), int(offsets[k + 1])) for k in indices])
        return jacobian, columns.to(features.device)


class SharedEnsembleNetworks(EnsembleNetworks):
    """One tanh MLP per member for every element: its inputs are the scaled features and the centre
    atom's element as one-hot columns (an element-specific first-layer bias). A member then has
    (F + n)·H₀ + … weights instead of n·(F·H₀ + …): every residual constrains all of them, whichever
    element it comes from, and the training cost does not grow with the number of networks.

    Wraps the per-element machinery with one network (element 0): the one-hot columns are appended
    to the inputs, their input gradients dropped (they do not depend on positions), and their input
    tangents are zero."""

    shared = True

    def __init__(self, n_elements: int, n_features: int, hidden: tuple[int, ...], member_seeds: list[int]):
        super().__init__(1, n_features + n_elements, hidden, member_seeds)
        self.n_elements = n_elements
        self.n_features = n_features

    def _with_elements(self, features: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:
        """Inputs (…, B, F + n): the features and the one-hot element columns."""
        one_hot = nn.functional.one_hot(element_index, self.n_elements).to(features.dtype)
        return torch.cat([features, one_hot.expand(*features.shape[:-1], self.n_elements)], dim=-1)

    def _with_zero_tangents(self, input_weights: torch.Tensor, feature_axis: int) -> torch.Tensor:
        """Input tangents with zeros in the one-hot columns."""
        shape = list(input_weights.shape)
        shape[feature_axis] = self.n_elements
        return torch.cat([input_weights, input_weights.new_zeros(shape)], dim=feature_axis)

    def forward(self, features: torch.Tensor, element_index: torch.Tensor) -> torch.Tensor:
        return super().forward(self._with_elements(features, element_index), torch.zeros_like(element_index))

    def outputs_and_input_gradients(self, features: torch.Tensor, element_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self._with_elements(features, element_index)
        out, grads = super().outputs_and_input_gradients(inputs, torch.zeros_like(element_index))
        return out, grads[..., : self.n_features]

    def training_pass(self, features: torch.Tensor, element_index: torch.Tensor) -> "TrainingPass":
        inputs = self._with_elements(features, element_index)
        full = super().training_pass(inputs, torch.zeros_like(element_index))
        return TrainingPass(full.outputs, full.input_gradients[:, : self.n_features].contiguous(), full.elements)

    def accumulate_parameter_gradients(
        self, training_pass: "TrainingPass", output_weights: torch.Tensor, input_weights: torch.Tensor
    ) -> None:
        super().accumulate_parameter_gradients(training_pass, output_weights, self._with_zero_tangents(input_weights, 1))

    def residual_parameter_jacobian(
        self,
        features: torch.Tensor,
        element: int,
        output_weights: torch.Tensor,
        input_weights: torch.Tensor,
        pairs: "ResidualPairs",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        elements = torch.full((features.shape[0],), element, dtype=torch.long, device=features.device)
        inputs = self._with_elements(features, elements)
        return super().residual_parameter_jacobian(inputs, 0, output_weights, self._with_zero_tangents(input_weights, 1), pairs)


ELEMENT_NETWORKS = {"per-element": EnsembleNetworks, "shared": SharedEnsembleNetworks}
"""`[model] element_networks`: a network per element, or one for all elements."""


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
        sums = torch.bmm(
            inputs.permute(2, 0, 3, 1).reshape(n_members * n_residuals, n_in, 2 * n_slots),
            adjoints.permute(2, 0, 1, 3).reshape(n_members * n_residuals, 2 * n_slots, width),
        )
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
