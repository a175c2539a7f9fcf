"""The training loss per member, its hand-written gradient, and the residuals and residual
Jacobians that Levenberg–Marquardt works on (their squares sum to the loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.science.model import EnsembleModel, ResidualPairs
from pipeline.science.training_data import TrainingData, predict_labels


def member_losses(model, data, weights, settings, create_graph=True) -> torch.Tensor:
    """The loss per member (M,): w_E Σ_s ((E−Ê)/N)² + w_F mean over trained force rows ‖F−F̂‖², each
    structure weighted by `weights` (M, n_structures); `create_graph` keeps autograd's graph."""
    energies, forces = predict_labels(model, data, create_graph=create_graph)
    loss = energies.new_zeros(energies.shape[0])
    if len(data.energies):
        w = weights[:, data.energy_structure]
        per_atom = ((energies - data.energies) / data.energy_atoms) ** 2
        loss = loss + settings.energy_weight * (w * per_atom).sum(1)
    if len(data.forces):
        w = weights[:, data.force_structure]
        sq = ((forces - data.forces) ** 2).sum(-1)
        loss = loss + settings.force_weight * (w * sq).sum(1) / w.sum(1).clamp_min(1.0)
    return loss


def member_losses_with_gradients(model: EnsembleModel, data: TrainingData, weights: torch.Tensor, settings) -> torch.Tensor:
    """`member_losses` (M,), with ∂loss_m/∂θ_m added to every network parameter's .grad.

    The chain rule is written out: ∂L/∂E and ∂L/∂F from the residuals, ∂L/∂F through the transposed
    force Jacobian to the weights u of the networks' input gradients, and the networks' own
    hand-written parameter gradient (`EnsembleNetworks.accumulate_parameter_gradients`). Falls back
    to autograd for unscaled data or networks without a hidden layer.
    """
    if not data.scaled or model.networks.n_layers < 2:
        losses = member_losses(model, data, weights, settings)
        losses.sum().backward()
        return losses.detach()
    scale = model.energy_scale
    network_pass = model.networks.training_pass(data.features, data.element_index)
    n_rows, n_members = network_pass.outputs.shape
    losses = network_pass.outputs.new_zeros(n_members)
    output_weights = network_pass.outputs.new_zeros(n_rows, n_members)
    if len(data.energies):
        rows = data.energy_rows
        atomic = network_pass.outputs[rows] * scale + model.energy_offset[data.element_index[rows]].unsqueeze(1)
        energies = atomic.new_zeros(len(data.energies), n_members).index_add(0, data.energy_segment, atomic).T
        w = weights[:, data.energy_structure]
        residual = (energies - data.energies) / data.energy_atoms
        losses = losses + settings.energy_weight * (w * residual**2).sum(1)
        d_energies = settings.energy_weight * 2.0 * w * residual / data.energy_atoms  # (M, S_E)
        output_weights[rows] = d_energies.T[data.energy_segment] * scale
    if len(data.forces):
        flat_grads = network_pass.input_gradients.reshape(-1, n_members)  # (R·width, M), no copy
        forces = (data.force_jacobian @ flat_grads).T.reshape(n_members, -1, 3) * -scale
        w = weights[:, data.force_structure]
        normaliser = w.sum(1).clamp_min(1.0)
        residual = forces - data.forces
        losses = losses + settings.force_weight * (w * (residual**2).sum(-1)).sum(1) / normaliser
        d_forces = (2.0 * settings.force_weight) * residual * (w / normaliser[:, None]).unsqueeze(2)
        d_grads = data.force_jacobian_t @ (d_forces * -scale).reshape(n_members, -1).T.contiguous()  # (R·width, M)
        input_weights = d_grads.view(network_pass.input_gradients.shape)
    else:
        input_weights = torch.zeros_like(network_pass.input_gradients)
    model.networks.accumulate_parameter_gradients(network_pass, output_weights, input_weights)
    return losses


def residual_factors(data: TrainingData, weights: torch.Tensor, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member factors (M, S_E) and (M, F) that turn energy and force errors into residuals whose
    squares sum to `member_losses`: √(w_E·w)/N per structure, √(w_F·w/Σw) per force row."""
    energy = (settings.energy_weight * weights[:, data.energy_structure]).sqrt() / data.energy_atoms
    w = weights[:, data.force_structure]
    force = (settings.force_weight * w / w.sum(1, keepdim=True).clamp_min(1.0)).sqrt()
    return energy, force


def member_residuals(model: EnsembleModel, data: TrainingData, weights: torch.Tensor, settings) -> torch.Tensor:
    """Residuals (M, S_E + 3F): energy errors, then force components, each times its factor."""
    energies, forces = predict_labels(model, data, create_graph=False)
    energy_factor, force_factor = residual_factors(data, weights, settings)
    energy_part = (energies.detach() - data.energies) * energy_factor
    force_part = (forces.detach() - data.forces) * force_factor.unsqueeze(2)
    return torch.cat([energy_part, force_part.reshape(force_part.shape[0], -1)], dim=1)


@dataclass
class JacobianTerms:
    """The (residual, feature row) pairs a Gauss–Newton Jacobian sums over, built once per data set.

    Residual k is an energy (its atoms' outputs, weight a = 1) or a force component (u·∂out/∂G of
    the rows it depends on, u its slice of the force Jacobian); each pair is one row's share.
    `blocks` groups the pairs by the element of their row and by residual, as they are summed.
    """

    residual: torch.Tensor  # (K,) residual index: energies first, then 3 per force row
    row: torch.Tensor  # (K,) feature row
    output_weight: torch.Tensor  # (K,) a
    input_weight: torch.Tensor  # (K, F) u
    blocks: list["_PairBlock"]


@dataclass
class _PairBlock:
    """Some residuals' pairs with rows of one element: summed in one call, in the layout `pairs`."""

    element: int
    pairs: torch.Tensor  # (K_b,) indices into the terms' pairs
    residuals: torch.Tensor  # (R_b,) the residuals these pairs sum into (global indices)
    layout: ResidualPairs  # pair → position in `residuals`, and its slot there


JACOBIAN_SLOTS_PER_BLOCK = 16384
"""Residuals × padded pairs per residual in one block of the Jacobian: bounds its buffers to ≈ 50 MB
(the first layer's padded inputs and adjoints, and the other parameters' per-pair gradients)."""


def jacobian_terms(data: TrainingData) -> JacobianTerms:
    """Pairs of every energy residual with its atoms' rows and every force component with its rows."""
    n_rows, width = data.features.shape
    jac = data.force_jacobian
    component = torch.repeat_interleave(torch.arange(jac.shape[0], device=jac.device), jac.crow_indices().diff())
    columns = jac.col_indices()
    keys, pair = torch.unique(component * n_rows + columns // width, return_inverse=True)
    input_weight = data.features.new_zeros(len(keys), width).index_put_((pair, columns % width), jac.values(), accumulate=True)
    n_energies = len(data.energies)
    rows = torch.cat([data.energy_rows, keys % n_rows])
    residual = torch.cat([data.energy_segment, n_energies + keys // n_rows])
    return JacobianTerms(
        residual=residual,
        row=rows,
        output_weight=torch.cat([data.features.new_ones(len(data.energy_rows)), data.features.new_zeros(len(keys))]),
        input_weight=torch.cat([data.features.new_zeros(len(data.energy_rows), width), input_weight]),
        blocks=_pair_blocks(residual, data.element_index[rows]),
    )


def _pair_blocks(residual: torch.Tensor, row_element: torch.Tensor) -> list[_PairBlock]:
    """Per element, its residuals in order of their pair count, cut into blocks of at most
    `JACOBIAN_SLOTS_PER_BLOCK` residuals × largest count (one residual over that is a block alone),
    so that padding every residual's pairs to the block's largest count wastes little."""
    blocks = []
    for element in torch.unique(row_element).tolist():
        element_pairs = (row_element == element).nonzero(as_tuple=True)[0]
        residuals, local, counts = torch.unique(residual[element_pairs], return_inverse=True, return_counts=True)
        order = torch.argsort(counts, stable=True).tolist()
        sizes = counts.tolist()
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end + 1 - start) * sizes[order[end]] <= JACOBIAN_SLOTS_PER_BLOCK:
                end += 1
            chosen = torch.tensor(order[start:end], device=residual.device)
            position = torch.full((len(residuals),), -1, dtype=torch.int64, device=residual.device)
            position[chosen] = torch.arange(len(chosen), device=residual.device)
            in_block = position[local] >= 0
            blocks.append(_PairBlock(element, element_pairs[in_block], residuals[chosen], ResidualPairs.of(position[local[in_block]])))
            start = end
    return blocks


def member_residual_jacobians(
    model: EnsembleModel, data: TrainingData, weights: torch.Tensor, settings, terms: JacobianTerms
) -> torch.Tensor:
    """∂residuals/∂θ (M, S_E + 3F, P): each residual's parameter gradient, summed over its pairs,
    times the residual's factor and the output scale (negative for forces)."""
    energy_factor, force_factor = residual_factors(data, weights, settings)
    scale = model.energy_scale
    factors = torch.cat([energy_factor * scale, (force_factor * -scale).repeat_interleave(3, dim=1)], dim=1)  # (M, N)
    n_residuals = factors.shape[1]
    n_parameters = sum(p[0].numel() for p in model.networks.parameters())
    jacobians = data.features.new_zeros(model.n_members, n_residuals, n_parameters)
    for block in terms.blocks:
        pairs = block.pairs
        sums, columns = model.networks.residual_parameter_jacobian(
            data.features[terms.row[pairs]], block.element, terms.output_weight[pairs], terms.input_weight[pairs], block.layout
        )
        jacobians[:, block.residuals.unsqueeze(1), columns.unsqueeze(0)] += (
            sums  # a shared network: every element's block adds to its columns
        )
    return jacobians * factors.unsqueeze(2)
