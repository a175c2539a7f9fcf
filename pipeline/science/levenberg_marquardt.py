"""Levenberg–Marquardt for M independent least-squares problems (the ensemble's members), batched.

Each member minimises ‖r_m(θ_m)‖² with damped Gauss–Newton steps (J_mᵀJ_m + λ_m d_m I) δ = −J_mᵀr_m,
d_m the mean of the diagonal of J_mᵀJ_m (Levenberg's damping, made scale-free; Marquardt's
per-parameter diagonal stalled these networks at a 14× higher loss in the same iterations, see
bench/RESULTS.md). Every member has its own damping λ_m: it falls
after a step that lowered the loss and rises after one that did not, so a member that is far from
its minimum takes short gradient-like steps while one near it takes full Gauss–Newton steps. The
Jacobians and the trial losses are batched over the members; the networks are small enough
(P of a few hundred) that the P×P normal equations are cheap.
"""
from __future__ import annotations

from typing import Callable

import torch

ResidualsAndJacobian = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Parameters (M, P) → residuals (M, N) and their Jacobian (M, N, P)."""
Losses = Callable[[torch.Tensor], torch.Tensor]
"""Parameters (M, P) → the members' losses ‖r_m‖² (M,)."""

INITIAL_DAMPING = 1e-3
DAMPING_DECREASE = 0.3
DAMPING_INCREASE = 4.0
MAX_DAMPING = 1e10


def minimize_members_lm(
    residuals_and_jacobian: ResidualsAndJacobian,
    losses: Losses,
    start: torch.Tensor,
    max_iterations: int,
    max_retries: int = 8,
    relative_tolerance: float = 1e-12,
    deadline: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise M independent sums of squares from `start` (M, P); return (parameters, losses (M,)).

    One iteration is one Jacobian at the current points and up to `max_retries` trial steps: a
    member whose trial did not lower its loss raises its damping and solves again with the same
    Jacobian, while the members that improved wait. A member stops when its damping exceeds
    `MAX_DAMPING` (no step lowers the loss) or its loss stops falling by more than
    `relative_tolerance`; `deadline()` True ends the run early (a wall-time budget).
    """
    x = start.detach().clone()
    n_members = x.shape[0]
    damping = torch.full((n_members,), INITIAL_DAMPING, dtype=x.dtype, device=x.device)
    active = torch.ones(n_members, dtype=torch.bool, device=x.device)
    loss = losses(x)
    for _ in range(max_iterations):
        if not bool(active.any()) or (deadline is not None and deadline()):
            break
        residual, jacobian = residuals_and_jacobian(x)
        normal = jacobian.transpose(1, 2) @ jacobian  # (M, P, P)
        gradient = (jacobian.transpose(1, 2) @ residual.unsqueeze(2)).squeeze(2)  # (M, P), half ∂‖r‖²/∂θ
        scaling = torch.diagonal(normal, dim1=1, dim2=2).mean(1).clamp_min(1e-300)  # (M,)
        pending = active.clone()
        for _ in range(max_retries):
            step = _damped_steps(normal, gradient, scaling, damping)
            trial = x + step * pending[:, None].to(x.dtype)
            trial_loss = losses(trial)
            better = pending & torch.isfinite(trial_loss) & (trial_loss < loss)
            converged = better & (loss - trial_loss <= relative_tolerance * loss)
            x = torch.where(better[:, None], trial, x)
            loss = torch.where(better, trial_loss, loss)
            damping = torch.where(better, damping * DAMPING_DECREASE, damping)
            worse = pending & ~better
            damping = torch.where(worse, damping * DAMPING_INCREASE, damping)
            active &= ~converged & (damping < MAX_DAMPING)
            pending = worse & active
            if not bool(pending.any()):
                break
    return x, loss


def _damped_steps(normal: torch.Tensor, gradient: torch.Tensor, scaling: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """δ_m = −(J_mᵀJ_m + λ_m d_m I)⁻¹ J_mᵀr_m for every member, by batched Cholesky."""
    identity = torch.eye(normal.shape[1], dtype=normal.dtype, device=normal.device)
    system = normal + (damping * scaling)[:, None, None] * identity
    factor, info = torch.linalg.cholesky_ex(system)
    step = -torch.cholesky_solve(gradient.unsqueeze(2), factor).squeeze(2)
    failed = info != 0  # not positive definite in floating point: a short gradient step instead
    if bool(failed.any()):
        step[failed] = -gradient[failed] / (damping[failed] * scaling[failed])[:, None]
    return step
