"""Levenberg–Marquardt: the residual Jacobian against autograd, the batched solver, and the fit."""

import pytest
import torch

from pipeline.science.examples import bulk_training_cells
from pipeline.science.levenberg_marquardt import WeightPrior, minimize_members_lm
from pipeline.science.settings import TrainingSettings
from pipeline.science.losses import (
    jacobian_terms,
    member_losses,
    member_residual_jacobians,
    member_residuals,
    residual_factors,
)
from pipeline.science.training import train_ensemble
from pipeline.science.training_data import predict_labels, residuals_per_element
from tests.test_training import chunk_structures, labelled, two_element_problem

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(
    "hidden, slots_per_block, element_networks",
    [((5, 5), None, "per-element"), ((7,), None, "per-element"), ((4, 3, 2), None, "per-element"), ((5, 5), 7, "per-element")]
    + [((5, 5), None, "shared"), ((4, 3, 2), 7, "shared")],
)
def test_residual_jacobian_equals_autograd(hidden, slots_per_block, element_networks, monkeypatch):
    """Every row of the hand-built Jacobian equals autograd's gradient of that residual, for every
    member and both elements (also when its residuals are summed in many small blocks, down to one
    residual a block), and the residuals' squares sum to the training loss."""
    if slots_per_block is not None:
        monkeypatch.setattr("pipeline.science.losses.JACOBIAN_SLOTS_PER_BLOCK", slots_per_block)
    model, data, weights, settings = two_element_problem(hidden, n_members=3, seed=7, element_networks=element_networks)
    residuals = member_residuals(model, data, weights, settings)
    torch.testing.assert_close(
        (residuals**2).sum(1), member_losses(model, data, weights, settings, create_graph=False).detach(), rtol=1e-12, atol=1e-12
    )
    jacobian = member_residual_jacobians(model, data, weights, settings, jacobian_terms(data))
    parameters = list(model.networks.parameters())
    energies, forces = predict_labels(model, data, create_graph=True)
    energy_factor, force_factor = residual_factors(data, weights, settings)
    graph = torch.cat(
        [(energies - data.energies) * energy_factor, ((forces - data.forces) * force_factor.unsqueeze(2)).reshape(forces.shape[0], -1)],
        dim=1,
    )
    assert jacobian.shape == (*graph.shape, sum(p[0].numel() for p in parameters))
    for member in range(graph.shape[0]):
        for row in range(graph.shape[1]):
            grads = torch.autograd.grad(graph[member, row], parameters, retain_graph=True, allow_unused=True)
            expected = torch.cat([g[member].reshape(-1) if g is not None else p[member].reshape(-1) * 0 for g, p in zip(grads, parameters)])
            torch.testing.assert_close(jacobian[member, row], expected, rtol=1e-9, atol=1e-11)
        for other in range(graph.shape[0]):  # a member's residuals do not depend on another member's weights
            if other != member:
                grads = torch.autograd.grad(graph[member].sum(), parameters, retain_graph=True, allow_unused=True)
                assert all(g is None or float(g[other].abs().max()) == 0.0 for g in grads)


def test_residuals_per_element_are_the_jacobian_rows_that_touch_its_network():
    """`residuals_per_element` (what the training log's "fit underdetermined" compares with the
    weights) counts, per element, the residuals whose Jacobian row is non-zero in its network's
    weights: the Pt cells' energies and forces touch only Pt, the mixed cluster's rows both."""
    model, data, weights, settings = two_element_problem((5, 5), n_members=2, seed=7)
    weights = torch.ones_like(weights)
    jacobian = member_residual_jacobians(model, data, weights, settings, jacobian_terms(data))[0]
    networks = model.networks
    per_parameter = [(index // networks.n_layers, p[0].numel()) for index, p in enumerate(networks.weights)]
    per_parameter += [(index // networks.n_layers, p[0].numel()) for index, p in enumerate(networks.biases)]
    column_element = torch.cat([torch.full((size,), element) for element, size in per_parameter])
    assert len(column_element) == jacobian.shape[1]
    expected = [int((jacobian[:, column_element == element] != 0).any(1).sum()) for element in range(2)]
    counts = residuals_per_element(data, 2)
    assert counts == expected, (counts, expected)
    assert 0 < counts[0] < counts[1] <= jacobian.shape[0], "Cu (element 0) enters only the cluster's rows"
    assert networks.weights_per_element == sum(size for element, size in per_parameter if element == 0)


def test_solver_fits_independent_problems_each_with_its_own_damping():
    """Three members, each a different curve fit (one badly scaled): each reaches its own minimum."""
    x = torch.linspace(0, 1, 40, dtype=torch.float64)
    truth = torch.tensor([[1.0, 3.0], [-2.0, 0.5], [300.0, -7.0]], dtype=torch.float64)
    targets = truth[:, :1] * torch.exp(truth[:, 1:] * x)

    def residuals_and_jacobian(p):
        model = p[:, :1] * torch.exp(p[:, 1:] * x)
        jac = torch.stack([torch.exp(p[:, 1:] * x), p[:, :1] * x * torch.exp(p[:, 1:] * x)], dim=2)
        return model - targets, jac

    def losses(p):
        return ((residuals_and_jacobian(p)[0]) ** 2).sum(1)

    start = torch.tensor([[0.5, 1.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    final, final_losses = minimize_members_lm(residuals_and_jacobian, losses, start, 200)
    torch.testing.assert_close(final, truth, rtol=1e-6, atol=1e-6)
    assert float(final_losses.max()) < 1e-12


@pytest.mark.parametrize("n_residuals, n_parameters", [(6, 20), (20, 6)])
def test_linear_least_squares_reach_the_minimum_norm_or_ridge_solution(n_residuals, n_parameters):
    """On linear problems r = Jθ − b the steps are exact: with fewer residuals than weights (the Gram
    form of the step) each member reaches the interpolant nearest its start, θ0 + J⁺(b − Jθ0), and with
    more the least-squares solution; with a prior a‖θ − θa‖² both reach the ridge solution
    (JᵀJ + aI)⁻¹(Jᵀb + aθa)."""
    generator = torch.Generator().manual_seed(3)
    n_members = 3
    jac = torch.randn(n_members, n_residuals, n_parameters, generator=generator, dtype=torch.float64)
    targets = torch.randn(n_members, n_residuals, generator=generator, dtype=torch.float64)
    start = torch.randn(n_members, n_parameters, generator=generator, dtype=torch.float64)

    def residuals_and_jacobian(p):
        return (jac @ p.unsqueeze(2)).squeeze(2) - targets, jac

    def losses(p):
        return residuals_and_jacobian(p)[0].pow(2).sum(1)

    final, _ = minimize_members_lm(residuals_and_jacobian, losses, start, 100)
    pinv = torch.linalg.pinv(jac)
    expected = start + (pinv @ (targets - (jac @ start.unsqueeze(2)).squeeze(2)).unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(final, expected, rtol=1e-7, atol=1e-7)

    anchor = torch.randn(n_members, n_parameters, generator=generator, dtype=torch.float64)
    strength = torch.tensor([1e-3, 0.1, 10.0], dtype=torch.float64)
    final, data_losses = minimize_members_lm(residuals_and_jacobian, losses, start, 100, prior=WeightPrior(anchor, strength))
    normal = jac.transpose(1, 2) @ jac + strength[:, None, None] * torch.eye(n_parameters, dtype=torch.float64)
    rhs = (jac.transpose(1, 2) @ targets.unsqueeze(2)).squeeze(2) + strength[:, None] * anchor
    torch.testing.assert_close(final, torch.linalg.solve(normal, rhs), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(data_losses, losses(final), msg="the returned losses are the data's, without the prior")


def test_levenberg_marquardt_fits_tighter_than_lbfgs_with_a_tenth_of_the_steps():
    """On a fixed data set, 30 LM iterations (no Adam) end below 300 L-BFGS steps after 100 Adam
    epochs, and far below Adam alone; LM's fit also predicts the training forces better."""
    data = labelled(bulk_training_cells(6, seed=12)) + chunk_structures(3, seed=2)
    base = TrainingSettings(ensemble=3, seed=5)
    _, adam = train_ensemble(data, base.with_changes(epochs=400, optimizer="lbfgs", lbfgs_steps=0))
    _, lbfgs = train_ensemble(data, base.with_changes(epochs=100, optimizer="lbfgs", lbfgs_steps=300))
    _, lm = train_ensemble(data, base.with_changes(epochs=0, optimizer="levenberg-marquardt", lm_steps=30))
    assert lm.final_loss < lbfgs.final_loss < adam.final_loss, (lm.final_loss, lbfgs.final_loss, adam.final_loss)
    assert lm.train_force_mae < lbfgs.train_force_mae


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer"):
        TrainingSettings(optimizer="newton")
