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
StepReport = Callable[[int, torch.Tensor], None]
"""(iteration, 1-based; the members' losses (M,) after it) — called once per iteration."""


def minimize_members(
    objective: LossAndGradient,
    start: torch.Tensor,
    max_iterations: int,
    history_size: int = 300,
    max_backtracks: int = 12,
    gradient_tolerance: float = 1e-9,
    deadline: Callable[[], bool] | None = None,
    on_step: StepReport | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise M independent objectives; return (parameters (M, P), losses (M,)).

    `objective(x)` takes parameters (M, P) and returns per-member losses (M,) and gradients (M, P).
    A member whose line search fails keeps its point and drops its history (steepest descent next).
    A long history pays on ensemble training (bench/RESULTS.md, "Campaign"). The inverse Hessian is
    applied in its compact form (`CurvatureHistory`), a few batched matrix products instead of a loop
    over the pairs. `deadline()` True ends the run early (a wall-time budget). `on_step` receives
    each iteration's number and losses (on the device, not read: that is its choice).
    """
    x = start.detach().clone()
    loss, grad = objective(x)
    history = CurvatureHistory(x.shape[0], x.shape[1], history_size, x.dtype, x.device)
    gamma = 1.0 / grad.norm(dim=1).clamp_min(1.0)  # first step no longer than 1 in parameter space
    for iteration in range(1, max_iterations + 1):
        if bool((grad.norm(dim=1) <= gradient_tolerance).all()) or (deadline is not None and deadline()):
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
        if on_step is not None:
            on_step(iteration, loss)
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
        # The pairs live in buffers twice the history long; the window [start, end) holds them oldest
        # first. Appending writes one row and column; the window is moved back to the front only when
        # it reaches the end of the buffers, once every `size` pairs, instead of copying every step.
        self.size = size
        capacity = 2 * max(size, 1)
        self._s = torch.zeros(n_members, capacity, n_parameters, dtype=dtype, device=device)
        self._y = torch.zeros_like(self._s)
        # R = triu(SᵀY) with 1 on the diagonal where a pair was not kept (zeros), so it decouples
        self._r = torch.zeros(n_members, capacity, capacity, dtype=dtype, device=device)
        self._d = torch.zeros(n_members, capacity, dtype=dtype, device=device)  # D = diag(SᵀY), zeros kept
        self._yy = torch.zeros_like(self._r)  # y_i · y_j
        # R⁻¹, kept up to date as pairs come and go: the window of an upper triangular matrix that
        # drops its first row and column has the window of the inverse as its inverse, and a new
        # column costs one matrix-vector product, so applying H needs no triangular solves.
        self._r_inv = torch.zeros_like(self._r)
        self._start = self._end = 0

    @property
    def s(self) -> torch.Tensor:
        """The kept s pairs (M, m, P), oldest first."""
        return self._s[:, self._start : self._end]

    @property
    def y(self) -> torch.Tensor:
        return self._y[:, self._start : self._end]

    @property
    def r(self) -> torch.Tensor:
        """(M, m, m): R = triu(SᵀY) of the kept pairs (s_i · y_j for i ≤ j, zero below, 1 on the
        diagonal of a pair that is zeros)."""
        return self._r[:, self._start : self._end, self._start : self._end]

    @property
    def d(self) -> torch.Tensor:
        """(M, m): D = diag(SᵀY) of the kept pairs."""
        return self._d[:, self._start : self._end]

    @property
    def yy(self) -> torch.Tensor:
        return self._yy[:, self._start : self._end, self._start : self._end]

    def append(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Add one pair (M, P) per member, dropping the oldest beyond `size`."""
        if self.size == 0:
            return
        if self._end - self._start == self.size:
            self._start += 1
        if self._end == self._s.shape[1]:
            self._compact()
        old_s, old_y = self.s, self.y
        new = self._end
        self._s[:, new], self._y[:, new] = s, y
        window = slice(self._start, new)
        self._r[:, window, new] = torch.bmm(old_s, y.unsqueeze(2)).squeeze(2)  # old s · new y
        self._r[:, new, window] = 0.0  # below the diagonal (the buffer row may hold an older pair's)
        y_old_new = torch.bmm(old_y, y.unsqueeze(2)).squeeze(2)
        self._yy[:, window, new] = y_old_new
        self._yy[:, new, window] = y_old_new
        self._d[:, new] = (s * y).sum(1)
        self._r[:, new, new] = torch.where(self._d[:, new] == 0, 1.0, self._d[:, new])
        self._yy[:, new, new] = (y * y).sum(1)
        diagonal_inverse = 1.0 / self._r[:, new, new]
        old_inverse = self._r_inv[:, window, window]
        column = torch.bmm(old_inverse, self._r[:, window, new].unsqueeze(2)).squeeze(2)
        self._r_inv[:, window, new] = -column * diagonal_inverse[:, None]
        self._r_inv[:, new, window] = 0.0
        self._r_inv[:, new, new] = diagonal_inverse
        self._end = new + 1

    def _compact(self) -> None:
        """Move the window to the front of the buffers."""
        count = self._end - self._start
        for buffer in (self._s, self._y, self._d):
            buffer[:, :count] = buffer[:, self._start : self._end].clone()
        for buffer in (self._r, self._yy, self._r_inv):
            buffer[:, :count, :count] = buffer[:, self._start : self._end, self._start : self._end].clone()
        self._start, self._end = 0, count

    def forget(self, members: torch.Tensor) -> None:
        """Drop every pair of the members flagged (M,) True."""
        for buffer in (self._s, self._y, self._r, self._d, self._yy, self._r_inv):
            buffer[members] = 0.0
        torch.diagonal(self._r, dim1=1, dim2=2)[members] = 1.0
        torch.diagonal(self._r_inv, dim1=1, dim2=2)[members] = 1.0

    def apply_inverse_hessian(self, grad: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """H·g per member (M, P) for the stored pairs and initial scaling γ (M,)."""
        if self.s.shape[1] == 0:
            return gamma[:, None] * grad
        g = grad.unsqueeze(2)
        gam = gamma[:, None, None]
        s_g = torch.bmm(self.s, g)  # (M, m, 1)
        y_g = torch.bmm(self.y, g)
        window = slice(self._start, self._end)
        upper_inverse = self._r_inv[:, window, window]
        r_inv_sg = torch.bmm(upper_inverse, s_g)
        inner = self.d.unsqueeze(2) * r_inv_sg + gam * torch.bmm(self.yy, r_inv_sg) - gam * y_g
        p = torch.bmm(upper_inverse.transpose(1, 2), inner)
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
