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
    A long history pays on ensemble training (bench/RESULTS.md, "Campaign"). The inverse Hessian is
    applied in its compact form (`CurvatureHistory`), a few batched matrix products instead of a loop
    over the pairs.
    """
    x = start.detach().clone()
    loss, grad = objective(x)
    history = CurvatureHistory(x.shape[0], x.shape[1], history_size, x.dtype, x.device)
    gamma = 1.0 / grad.norm(dim=1).clamp_min(1.0)  # first step no longer than 1 in parameter space
    for _ in range(max_iterations):
        if bool((grad.norm(dim=1) <= gradient_tolerance).all()):
            break
        direction = -history.apply_inverse_hessian(grad, gamma)
        slope = (grad * direction).sum(1)
        uphill = slope >= 0
        if uphill.any():  # lost curvature information: steepest descent for those members
            direction[uphill] = -grad[uphill] * gamma[uphill, None]
            slope = (grad * direction).sum(1)
        new_x, new_loss, new_grad, moved = _backtrack(objective, x, loss, grad, direction, slope, max_backtracks)
        s, y = new_x - x, new_grad - grad
        curvature = (s * y).sum(1)
        usable = moved & (curvature > 1e-12 * s.norm(dim=1) * y.norm(dim=1))
        keep = usable[:, None].to(s.dtype)
        history.append(s * keep, y * keep)
        y_norm2 = (y * y).sum(1)
        gamma = torch.where(usable, curvature / y_norm2.clamp_min(torch.finfo(y.dtype).tiny), gamma)
        if (~moved).any():  # a failed line search: forget that member's curvature, restart cautiously
            history.forget(~moved)
            gamma = torch.where(moved, gamma, 1.0 / new_grad.norm(dim=1).clamp_min(1.0))
        x, loss, grad = new_x, new_loss, new_grad
        if not bool(moved.any()):
            break
    return x, loss


class CurvatureHistory:
    """The last m pairs (s, y) of every member and the products the compact L-BFGS form needs
    (Byrd, Nocedal & Schnabel 1994): H g = γ g + S p + γ Y q with
    q = −R⁻¹ Sᵀg and p = R⁻ᵀ((D + γ YᵀY) R⁻¹ Sᵀg − γ Yᵀg), R = triu(SᵀY), D = diag(SᵀY).

    A pair that is not kept is stored as zeros; its diagonal entry of R is set to 1 so that it
    decouples and contributes nothing, as a skipped pair does in the two-loop recursion.
    """

    def __init__(self, n_members: int, n_parameters: int, size: int, dtype: torch.dtype, device: torch.device):
        self.size = size
        self.s = torch.zeros(n_members, 0, n_parameters, dtype=dtype, device=device)
        self.y = torch.zeros_like(self.s)
        self.sy = torch.zeros(n_members, 0, 0, dtype=dtype, device=device)  # (M, m, m): s_i · y_j
        self.yy = torch.zeros_like(self.sy)  # (M, m, m): y_i · y_j

    def append(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Add one pair (M, P) per member, dropping the oldest beyond `size`."""
        s_new, y_new = s.unsqueeze(1), y.unsqueeze(1)
        s_y = torch.bmm(self.s, y_new.transpose(1, 2))  # (M, m, 1): old s · new y
        snew_y = torch.bmm(s_new, self.y.transpose(1, 2))  # (M, 1, m): new s · old y
        y_ynew = torch.bmm(self.y, y_new.transpose(1, 2))  # (M, m, 1)
        corner_sy = (s * y).sum(1)[:, None, None]
        corner_yy = (y * y).sum(1)[:, None, None]
        self.sy = torch.cat([torch.cat([self.sy, s_y], 2), torch.cat([snew_y, corner_sy], 2)], 1)
        self.yy = torch.cat([torch.cat([self.yy, y_ynew], 2), torch.cat([y_ynew.transpose(1, 2), corner_yy], 2)], 1)
        self.s = torch.cat([self.s, s_new], 1)
        self.y = torch.cat([self.y, y_new], 1)
        if self.s.shape[1] > self.size:
            self.s, self.y = self.s[:, 1:], self.y[:, 1:]
            self.sy, self.yy = self.sy[:, 1:, 1:], self.yy[:, 1:, 1:]

    def forget(self, members: torch.Tensor) -> None:
        """Drop every pair of the members flagged (M,) True."""
        for name in ("s", "y", "sy", "yy"):
            value = getattr(self, name).clone()
            value[members] = 0.0
            setattr(self, name, value)

    def apply_inverse_hessian(self, grad: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """H·g per member (M, P) for the stored pairs and initial scaling γ (M,)."""
        if self.s.shape[1] == 0:
            return gamma[:, None] * grad
        g = grad.unsqueeze(2)
        gam = gamma[:, None, None]
        s_g = torch.bmm(self.s, g)  # (M, m, 1)
        y_g = torch.bmm(self.y, g)
        upper = torch.triu(self.sy)
        diagonal = torch.diagonal(self.sy, dim1=1, dim2=2)
        unit = torch.diag_embed((diagonal == 0).to(upper.dtype))
        upper = upper + unit
        r_inv_sg = torch.linalg.solve_triangular(upper, s_g, upper=True)
        inner = diagonal.unsqueeze(2) * r_inv_sg + gam * torch.bmm(self.yy, r_inv_sg) - gam * y_g
        p = torch.linalg.solve_triangular(upper.transpose(1, 2), inner, upper=False)
        q = -r_inv_sg
        step = gam * g + torch.bmm(self.s.transpose(1, 2), p) + gam * torch.bmm(self.y.transpose(1, 2), q)
        return step.squeeze(2)


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
