"""Levenberg–Marquardt for M independent least-squares problems (the ensemble's members), batched.

Each member minimises ‖r_m(θ_m)‖² with damped Gauss–Newton steps (J_mᵀJ_m + λ_m d_m I) δ = −J_mᵀr_m,
d_m the mean of the diagonal of J_mᵀJ_m (Levenberg's damping, made scale-free; Marquardt's
per-parameter diagonal stalled these networks at a 14× higher loss in the same iterations, see
bench/RESULTS.md). Every member has its own damping λ_m: it falls
after a step that lowered the loss and rises after one that did not, so a member that is far from
its minimum takes short gradient-like steps while one near it takes full Gauss–Newton steps. The
Jacobians and the trial losses are batched over the members.

Each step is solved in the smaller of two spaces: the P×P normal equations when the residuals
outnumber the weights, else the N×N Gram system, δ = −Jᵀ(JJᵀ + μI)⁻¹r (the same step, by the
push-through identity). An alloy's networks have P of 600–2,800 weights against a few hundred
residuals, where the P×P Cholesky was nearly all of the training time (bench/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ResidualsAndJacobian = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Parameters (M, P) → residuals (M, N) and their Jacobian (M, N, P)."""
Losses = Callable[[torch.Tensor], torch.Tensor]
"""Parameters (M, P) → the members' losses ‖r_m‖² (M,)."""
StepReport = Callable[[int, torch.Tensor], None]
"""(iteration, 1-based; the members' objective (M,) after it) — called once per iteration."""

INITIAL_DAMPING = 1e-3
DAMPING_DECREASE = 0.3
DAMPING_INCREASE = 4.0
MAX_DAMPING = 1e10
GRAM_FORM = True
"""Solve in the N×N Gram form when the residuals are fewer than the weights; False: always the P×P
normal equations (`bench/bench_elements.py --primal` measures the difference)."""


def minimize_members_lm(
    residuals_and_jacobian: ResidualsAndJacobian,
    losses: Losses,
    start: torch.Tensor,
    max_iterations: int,
    max_retries: int = 8,
    relative_tolerance: float = 1e-12,
    deadline: Callable[[], bool] | None = None,
    prior: WeightPrior | None = None,
    on_step: StepReport | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise M independent sums of squares from `start` (M, P); return (parameters, losses (M,)).

    One iteration is one Jacobian at the current points and up to `max_retries` trial steps: a
    member whose trial did not lower its loss raises its damping and solves again with the same
    Jacobian, while the members that improved wait. A member stops when its damping exceeds
    `MAX_DAMPING` (no step lowers the loss) or its loss stops falling by more than
    `relative_tolerance`; `deadline()` True ends the run early (a wall-time budget). `on_step`
    receives each iteration's number and objective (on the device, not read: that is its choice).
    """
    x = start.detach().clone()
    n_members = x.shape[0]
    damping = torch.full((n_members,), INITIAL_DAMPING, dtype=x.dtype, device=x.device)
    active = torch.ones(n_members, dtype=torch.bool, device=x.device)
    objective = losses if prior is None else (lambda flat: losses(flat) + prior.penalty(flat))
    loss = objective(x)
    for iteration in range(1, max_iterations + 1):
        if not bool(active.any()) or (deadline is not None and deadline()):
            break
        residual, jacobian = residuals_and_jacobian(x)
        system = _GaussNewtonSystem(residual, jacobian, prior, x)
        pending = active.clone()
        for _ in range(max_retries):
            step = system.damped_steps(damping)
            trial = x + step * pending[:, None].to(x.dtype)
            trial_loss = objective(trial)
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
        if on_step is not None:
            on_step(iteration, loss)
    return x, (loss if prior is None else losses(x))


@dataclass(frozen=True)
class WeightPrior:
    """A Gaussian prior on the weights: the objective gains a_m‖θ_m − θ0_m‖² (a ridge toward θ0)."""

    anchor: torch.Tensor  # (M, P) θ0
    strength: torch.Tensor  # (M,) a_m, in the loss's units per squared weight

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        """a_m‖θ_m − θ0_m‖² per member (M,)."""
        return self.strength * (x - self.anchor).pow(2).sum(1)


class _GaussNewtonSystem:
    """One iteration's Gauss–Newton system of every member, kept in the smaller of its two forms:
    the normal matrix JᵀJ (M, P, P) when N ≥ P, else the Gram matrix JJᵀ (M, N, N) with J itself."""

    def __init__(self, residual: torch.Tensor, jacobian: torch.Tensor, prior: "WeightPrior | None" = None, x: torch.Tensor | None = None):
        self.residual, self.jacobian = residual, jacobian
        self.dual = GRAM_FORM and jacobian.shape[1] < jacobian.shape[2]
        transposed = jacobian.transpose(1, 2)
        self.matrix = jacobian @ transposed if self.dual else transposed @ jacobian
        self.gradient = (transposed @ residual.unsqueeze(2)).squeeze(2)  # (M, P), half ∂‖r‖²/∂θ
        self.prior_strength = torch.zeros_like(residual[:, 0])
        if prior is not None and x is not None:
            self.prior_strength = prior.strength
            self.gradient = self.gradient + prior.strength[:, None] * (x - prior.anchor)
        # d_m: the mean of diag(JᵀJ) = trace(JJᵀ)/P, either way
        self.scaling = torch.diagonal(self.matrix, dim1=1, dim2=2).sum(1).div(jacobian.shape[2]).clamp_min(1e-300)

    def damped_steps(self, damping: torch.Tensor) -> torch.Tensor:
        """δ_m = −(J_mᵀJ_m + λ_m d_m I)⁻¹ J_mᵀr_m for every member, by batched Cholesky; a member whose
        system is not positive definite in floating point takes a short gradient step instead."""
        shift = damping * self.scaling + self.prior_strength  # (M,)
        system = self.matrix.clone()
        system.diagonal(dim1=1, dim2=2).add_(shift[:, None])
        factor, info = torch.linalg.cholesky_ex(system)
        if self.dual:  # (JᵀJ + cI)⁻¹g = (g − Jᵀ(JJᵀ + cI)⁻¹Jg)/c
            projected = self.jacobian @ self.gradient.unsqueeze(2)
            inner = (self.jacobian.transpose(1, 2) @ torch.cholesky_solve(projected, factor)).squeeze(2)
            step = -(self.gradient - inner) / shift[:, None]
        else:
            step = -torch.cholesky_solve(self.gradient.unsqueeze(2), factor).squeeze(2)
        failed = info != 0
        if bool(failed.any()):
            step[failed] = -self.gradient[failed] / shift[failed][:, None]
        return step
