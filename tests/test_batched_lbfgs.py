"""The per-member L-BFGS: independent problems of very different scales, one batched evaluation."""

import pytest
import torch

from pipeline.science.batched_lbfgs import minimize_members

pytestmark = pytest.mark.timeout(60)


def rosenbrock_family(scales: torch.Tensor):
    """Member m minimises s_m·Rosenbrock(x − m): minimum at (1 + m, 1 + m), curvature ∝ s_m."""
    shifts = torch.arange(len(scales), dtype=torch.float64)

    def objective(x):
        x = x.detach().requires_grad_(True)
        u, v = x[:, 0] - shifts, x[:, 1] - shifts
        losses = scales * ((1 - u) ** 2 + 100 * (v - u**2) ** 2)
        (grad,) = torch.autograd.grad(losses.sum(), x)
        return losses.detach(), grad

    return objective, shifts


def test_each_member_reaches_its_own_minimum_whatever_its_scale():
    scales = torch.tensor([1e-3, 1.0, 1e3, 10.0], dtype=torch.float64)
    objective, shifts = rosenbrock_family(scales)
    start = torch.stack([shifts - 1.2, shifts + 1.0], dim=1)
    x, losses = minimize_members(objective, start, max_iterations=300)
    torch.testing.assert_close(x, torch.stack([shifts + 1, shifts + 1], dim=1), atol=1e-5, rtol=0)
    assert bool((losses < 1e-10 * scales.clamp_min(1.0)).all())


def test_a_member_at_its_minimum_stays_there_while_others_move():
    scales = torch.ones(2, dtype=torch.float64)
    objective, shifts = rosenbrock_family(scales)
    start = torch.tensor([[1.0, 1.0], [-0.2, 2.0]], dtype=torch.float64)  # member 0 starts at its minimum
    x, _ = minimize_members(objective, start, max_iterations=300)
    torch.testing.assert_close(x[0], torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(x[1], torch.tensor([2.0, 2.0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_losses_never_increase_step_by_step():
    objective, shifts = rosenbrock_family(torch.tensor([1.0, 5.0, 0.1], dtype=torch.float64))
    x = torch.stack([shifts - 1.5, shifts + 2.0], dim=1)
    losses, _ = objective(x)
    for _ in range(30):
        x, new_losses = minimize_members(objective, x, max_iterations=1)
        assert bool((new_losses <= losses + 1e-12).all())
        losses = new_losses


def _two_loop_reference(pairs, grad, gamma):
    """H·g by the textbook two-loop recursion, skipping pairs with s·y = 0."""
    q = grad.clone()
    alphas = []
    for s, y in reversed(pairs):
        sy = (s * y).sum(1)
        rho = torch.where(sy > 0, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        alpha = rho * (s * q).sum(1)
        q -= alpha[:, None] * y
        alphas.append((alpha, rho))
    r = gamma[:, None] * q
    for (s, y), (alpha, rho) in zip(pairs, reversed(alphas)):
        beta = rho * (y * r).sum(1)
        r += s * (alpha - beta)[:, None]
    return r


def test_compact_inverse_hessian_equals_the_two_loop_recursion():
    from pipeline.science.batched_lbfgs import CurvatureHistory

    generator = torch.Generator().manual_seed(0)
    n_members, n_params, size = 3, 20, 5
    history = CurvatureHistory(n_members, n_params, size, torch.float64, torch.device("cpu"))
    pairs = []
    for k in range(23):  # more pairs than the history keeps: the oldest are dropped, the window moves
        a = torch.randn(n_members, n_params, n_params, dtype=torch.float64, generator=generator)
        hessian = a @ a.transpose(1, 2) + n_params * torch.eye(n_params, dtype=torch.float64)
        s = torch.randn(n_members, n_params, dtype=torch.float64, generator=generator)
        y = torch.bmm(hessian, s[:, :, None])[:, :, 0]
        if k in (5, 20):  # a member whose pair was not kept
            s[1], y[1] = 0.0, 0.0
        history.append(s, y)
        pairs.append((s, y))
    grad = torch.randn(n_members, n_params, dtype=torch.float64, generator=generator)
    gamma = torch.rand(n_members, dtype=torch.float64, generator=generator) + 0.5
    expected = _two_loop_reference(pairs[-size:], grad, gamma)
    assert torch.allclose(history.apply_inverse_hessian(grad, gamma), expected, rtol=1e-10, atol=1e-12)
    history.forget(torch.tensor([False, True, False]))
    forgotten = history.apply_inverse_hessian(grad, gamma)
    assert torch.allclose(forgotten[1], gamma[1] * grad[1])
    assert torch.allclose(forgotten[0], expected[0], rtol=1e-10, atol=1e-12)
