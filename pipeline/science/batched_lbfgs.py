"""L-BFGS for M independent problems evaluated in one batched pass (the ensemble's members).

torch.optim.LBFGS on the summed member losses treats the members as one problem: one shared
history mixes their curvatures and one shared line search gives every member the same step, so
members with different scales stall each other. Here each member has its own history, its own
initial scaling and its own backtracking (Armijo) step, while every loss evaluation is still one
batched forward/backward pass for all members.
"""
from __future__ import annotations

from typing import Callable

import torch

LossAndGradient = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def minimize_members(
    objective: LossAndGradient,
    start: torch.Tensor,
    max_iterations: int,
    history_size: int = 300,
    max_backtracks: int = 12,
    gradient_tolerance: float = 1e-9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise M independent objectives; return (parameters (M, P), losses (M,)).

    `objective(x)` takes parameters (M, P) and returns per-member losses (M,) and gradients (M, P).
    A member whose line search fails keeps its point and drops its history (steepest descent next).
    A long history pays on ensemble training: on the Pt260 chunks, 1000 steps reached δ 0.17 eV/Å
    with 20 pairs, 0.09 with 100 and 0.07 with 300 (the two-loop costs ~1/10 of an evaluation).
    """
    x = start.detach().clone()
    loss, grad = objective(x)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, ρ) with per-member rows
    gamma = 1.0 / grad.norm(dim=1).clamp_min(1.0)  # first step no longer than 1 in parameter space
    for _ in range(max_iterations):
        if bool((grad.norm(dim=1) <= gradient_tolerance).all()):
            break
        direction = -_two_loop(grad, history, gamma)
        slope = (grad * direction).sum(1)
        uphill = slope >= 0
        if uphill.any():  # lost curvature information: steepest descent for those members
            direction[uphill] = -grad[uphill] * gamma[uphill, None]
            slope = (grad * direction).sum(1)
        new_x, new_loss, new_grad, moved = _backtrack(objective, x, loss, grad, direction, slope, max_backtracks)
        s, y = new_x - x, new_grad - grad
        curvature = (s * y).sum(1)
        usable = moved & (curvature > 1e-12 * s.norm(dim=1) * y.norm(dim=1))
        rho = torch.where(usable, curvature, torch.inf).reciprocal()  # 0 for pairs that are not kept
        keep = usable[:, None].to(s.dtype)
        history.append((s * keep, y * keep, rho))
        if len(history) > history_size:
            history.pop(0)
        y_norm2 = (y * y).sum(1)
        gamma = torch.where(usable, curvature / y_norm2.clamp_min(torch.finfo(y.dtype).tiny), gamma)
        if (~moved).any():  # a failed line search: forget that member's curvature, restart cautiously
            for s_old, y_old, rho_old in history:
                s_old[~moved] = 0.0
                y_old[~moved] = 0.0
                rho_old[~moved] = 0.0
            gamma = torch.where(moved, gamma, 1.0 / new_grad.norm(dim=1).clamp_min(1.0))
        x, loss, grad = new_x, new_loss, new_grad
        if not bool(moved.any()):
            break
    return x, loss


def _two_loop(grad: torch.Tensor, history, gamma: torch.Tensor) -> torch.Tensor:
    """H·g per member by the L-BFGS two-loop recursion; pairs with ρ = 0 leave a member untouched."""
    q = grad.clone()
    alphas = []
    for s, y, rho in reversed(history):
        alpha = rho * (s * q).sum(1)
        q -= alpha[:, None] * y
        alphas.append(alpha)
    r = gamma[:, None] * q
    for (s, y, rho), alpha in zip(history, reversed(alphas)):
        beta = rho * (y * r).sum(1)
        r += s * (alpha - beta)[:, None]
    return r


def _backtrack(objective, x, loss, grad, direction, slope, max_backtracks):
    """Per-member Armijo backtracking from a unit step; every trial is one batched evaluation."""
    step = torch.ones_like(loss)
    searching = torch.ones_like(loss, dtype=torch.bool)
    moved = torch.zeros_like(searching)
    best_x, best_loss, best_grad = x.clone(), loss.clone(), grad.clone()
    for _ in range(max_backtracks):
        trial = x + step[:, None] * direction
        trial_loss, trial_grad = objective(trial)
        accept = searching & torch.isfinite(trial_loss) & (trial_loss <= loss + 1e-4 * step * slope)
        best_x[accept], best_loss[accept], best_grad[accept] = trial[accept], trial_loss[accept], trial_grad[accept]
        moved |= accept
        searching &= ~accept
        if not bool(searching.any()):
            break
        step = torch.where(searching, _shrunk_step(step, loss, trial_loss, slope), step)
    return best_x, best_loss, best_grad, moved


def _shrunk_step(step, loss, trial_loss, slope):
    """Minimiser of the quadratic through f(0), f'(0) and f(step), kept within [0.1, 0.5]·step."""
    curvature = trial_loss - loss - slope * step
    quadratic = -slope * step**2 / (2.0 * curvature.clamp_min(torch.finfo(curvature.dtype).tiny))
    quadratic = torch.where(torch.isfinite(quadratic), quadratic, 0.1 * step)
    return quadratic.clamp(0.1 * step, 0.5 * step)
