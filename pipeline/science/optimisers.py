"""The optimisers that fit the members on scaled training data: Adam with per-member early
stopping, then the settings' second-order polish (L-BFGS or Levenberg–Marquardt)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable

import torch

from pipeline.science.batched_lbfgs import minimize_members
from pipeline.science.levenberg_marquardt import WeightPrior, minimize_members_lm
from pipeline.science.losses import jacobian_terms, member_losses, member_losses_with_gradients, member_residual_jacobians, member_residuals


@dataclass(frozen=True)
class TrainingProgress:
    """Where a training run is, reported after every optimiser step: the `stage` ("adam", "lbfgs" or
    "levenberg-marquardt"), its `step` (1-based) of at most `steps` (a stage may stop earlier), and
    each member's loss after it: `losses` (M,), the optimiser's objective in the scaled units it
    minimises, detached and on the training device (reading it waits for the device, so a caller
    that shows it now and then pays only then). `seeds` name the members; `refit` marks the fresh
    fits of outlier members; `done` the last report of a stage."""

    stage: str
    step: int
    steps: int
    losses: torch.Tensor
    seeds: tuple[int, ...]
    refit: bool = False
    done: bool = False

    def member_losses(self) -> list[float]:
        """Each member's loss, in the order of `seeds`."""
        return [float(value) for value in self.losses.detach().cpu().tolist()]


ProgressCallback = Callable[[TrainingProgress], None]


class _StageProgress:
    """A stage's reports: every step to `progress`, then the last step again as `done`."""

    def __init__(self, progress: ProgressCallback | None, stage: str, steps: int, seeds) -> None:
        self.progress, self.stage, self.steps = progress, stage, steps
        self.seeds = tuple(int(seed) for seed in seeds)
        self.last: TrainingProgress | None = None

    def step(self, step: int, losses: torch.Tensor) -> None:
        if self.progress is not None:
            self.last = TrainingProgress(self.stage, step, self.steps, losses.detach(), self.seeds)
            self.progress(self.last)

    def done(self) -> None:
        if self.progress is not None and self.last is not None:
            self.progress(replace(self.last, done=True))


def adam(
    model, data, weights, val_weights, settings, progress: ProgressCallback | None = None
) -> tuple[int, float, tuple[float, ...] | None]:
    """Adam with exponential learning-rate decay; early stopping per member on validation loss.

    Returns the epochs run, the last training loss and, with a validation set, each member's lowest
    validation loss, whose weights the model is left with."""
    parameters = list(model.networks.parameters())
    optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate)
    epochs = settings.epochs
    decay = (settings.final_learning_rate / settings.learning_rate) ** (1.0 / max(epochs, 1))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)
    best_val = torch.full((model.n_members,), float("inf"), dtype=torch.float64, device=weights.device)
    best_state = copy.deepcopy(model.networks.state_dict()) if val_weights is not None else None
    since_best = 0
    total = torch.tensor(0.0)
    epoch = 0
    report = _StageProgress(progress, "adam", epochs, model.member_seeds)
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad()
        losses = with_weight_decay(member_losses_with_gradients(model, data, weights, settings), parameters, settings)
        total = losses.sum()
        optimizer.step()
        scheduler.step()
        if val_weights is not None and (epoch % 10 == 0 or epoch == epochs):
            since_best = _track_best(model, data, val_weights, settings, best_val, best_state, since_best + 10)
            if since_best >= settings.patience_epochs:
                report.step(epoch, losses)
                break
        report.step(epoch, losses)
    report.done()
    if best_state is None:
        return epoch, float(total.detach()), None
    model.networks.load_state_dict(best_state)
    return epoch, float(total.detach()), tuple(float(v) for v in best_val)


def _track_best(model, data, val_weights, settings, best_val, best_state, since_best) -> int:
    """Keep each member's weights at its lowest validation loss; return epochs since any improved."""
    val = member_losses(model, data, val_weights, settings, create_graph=False).detach()
    improved = val < best_val
    if improved.any():
        best_val[improved] = val[improved]
        for name, tensor in model.networks.state_dict().items():
            best_state[name][improved] = tensor[improved]
        return 0
    return since_best


def second_order(model, data, weights, settings, loss: float, progress: ProgressCallback | None = None) -> float:
    """The settings' second-order fit after Adam (`lbfgs` or `levenberg_marquardt`, its steps from the
    settings); returns the summed member loss, `loss` (Adam's) when it has no steps."""
    if settings.optimizer == "levenberg-marquardt" and settings.lm_steps:
        return levenberg_marquardt(model, data, weights, settings, settings.lm_steps, progress=progress)
    if settings.optimizer == "lbfgs" and settings.lbfgs_steps:
        return lbfgs(model, data, weights, settings, progress=progress)
    return loss


def lbfgs(model, data, weights, settings, deadline: Callable[[], bool] | None = None, progress: ProgressCallback | None = None) -> float:
    """L-BFGS polish for `settings.lbfgs_steps` steps (or until `deadline()`), with a history and line
    search of its own per member (batched_lbfgs); returns the summed member loss (the data's, without
    the weight decay)."""
    parameters = list(model.networks.parameters())
    n_members = model.n_members

    def objective(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _assign_flat(parameters, flat)
        for p in parameters:
            p.grad = None
        losses = with_weight_decay(member_losses_with_gradients(model, data, weights, settings), parameters, settings)
        grad = torch.cat([p.grad.reshape(n_members, -1) for p in parameters], dim=1)
        return losses, grad

    report = _StageProgress(progress, "lbfgs", settings.lbfgs_steps, model.member_seeds)
    final, _ = minimize_members(objective, _flat(parameters, n_members), settings.lbfgs_steps, deadline=deadline, on_step=report.step)
    report.done()
    _assign_flat(parameters, final)
    return float(member_losses(model, data, weights, settings, create_graph=False).sum())


def _flat(parameters: list[torch.Tensor], n_members: int) -> torch.Tensor:
    """The members' parameters as one (M, P) matrix, in `parameters` order (what the optimisers move)."""
    return torch.cat([p.detach().reshape(n_members, -1) for p in parameters], dim=1)


def _assign_flat(parameters: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy an (M, P) matrix laid out as `_flat` back into the parameters."""
    with torch.no_grad():
        for p, chunk in zip(parameters, flat.split([p[0].numel() for p in parameters], dim=1)):
            p.copy_(chunk.reshape(p.shape))


def levenberg_marquardt(
    model, data, weights, settings, steps: int, deadline: Callable[[], bool] | None = None, progress: ProgressCallback | None = None
) -> float:
    """Levenberg–Marquardt for `steps` steps (or until `deadline()`) on the members' residuals
    (levenberg_marquardt); `data` scaled, as `train_ensemble` makes it; returns the summed member loss."""
    parameters = list(model.networks.parameters())
    terms = jacobian_terms(data)

    def residuals_and_jacobian(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _assign_flat(parameters, flat)
        residuals = member_residuals(model, data, weights, settings)
        return residuals, member_residual_jacobians(model, data, weights, settings, terms)

    def losses(flat: torch.Tensor) -> torch.Tensor:
        _assign_flat(parameters, flat)
        return member_losses(model, data, weights, settings, create_graph=False).detach()

    start = _flat(parameters, model.n_members)
    prior = _weight_prior(start, settings)
    report = _StageProgress(progress, "levenberg-marquardt", steps, model.member_seeds)
    final, final_losses = minimize_members_lm(
        residuals_and_jacobian, losses, start, steps, deadline=deadline, prior=prior, on_step=report.step
    )
    report.done()
    _assign_flat(parameters, final)
    return float(final_losses.sum())


def _weight_prior(start: torch.Tensor, settings) -> WeightPrior | None:
    """The settings' ridge as Levenberg–Marquardt's prior: weight_decay·‖θ‖², toward zero."""
    if not settings.weight_decay:
        return None
    strength = torch.full((start.shape[0],), float(settings.weight_decay), dtype=start.dtype, device=start.device)
    return WeightPrior(torch.zeros_like(start), strength)


def with_weight_decay(losses: torch.Tensor, parameters: list[torch.Tensor], settings) -> torch.Tensor:
    """`losses` (M,) plus weight_decay·‖θ_m‖² per member, its gradient added to every parameter's .grad
    (Adam and L-BFGS minimise what Levenberg–Marquardt does)."""
    decay = settings.weight_decay
    if not decay:
        return losses
    with torch.no_grad():
        for p in parameters:
            p.grad.add_(p, alpha=2.0 * decay)
        return losses + decay * sum(p.pow(2).reshape(p.shape[0], -1).sum(1) for p in parameters)
