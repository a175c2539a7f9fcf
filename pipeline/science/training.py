"""Training the ensemble on energies and masked force rows, all members in one batched pass:
scaling fitted to the data, a warm start from the previous model, the optimisers, and a fresh
fit of members whose loss ends as an outlier.

The data live in `training_data`, the loss and residuals in `losses`, the optimisers in
`optimisers`, the device in `device`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
from ase.data import chemical_symbols

from pipeline.science.descriptor_types import SymmetryFunctionParams
from pipeline.science.descriptors import DATA_ANGULAR_ETAS, median_nearest_neighbour_distance, radial_shells
from pipeline.science.device import resolve_device
from pipeline.science.losses import member_losses
from pipeline.science.model import EnsembleModel
from pipeline.science.optimisers import ProgressCallback, adam, second_order
from pipeline.science.optimisers import TrainingProgress as TrainingProgress  # re-exported: what `progress` receives
from pipeline.science.settings import TrainingSettings
from pipeline.science.structures import LabelledStructure
from pipeline.science.training_data import (
    TrainingData,
    elements_of,
    force_mae,
    predict_labels,
    prepare_training_data,
    residuals_per_element,
)

EnsembleLosses = Callable[[torch.Tensor], torch.Tensor]
"""A shard's member losses (M_shard,) → the losses of every member of the ensemble (M,)."""


@dataclass
class TrainingReport:
    """Metrics of a finished training run (eV/Å for forces, eV/atom for energies)."""

    train_force_mae: float
    train_energy_rmse_per_atom: float
    validation_force_mae: float | None
    epochs_run: int
    final_loss: float
    warm_started: bool = False
    reset_members: tuple[int, ...] = ()  # seeds of members whose outlier fit was replaced by a fresh one
    best_validation_loss: tuple[float, ...] | None = None  # per member, at the weights Adam kept
    element_residuals: dict[str, int] = field(default_factory=dict)  # residuals each element's network enters
    element_weights: int = 0  # weights of one element's network, per member
    weight_decay: float = 0.0  # the ridge the fit used ((eV/Å)² per squared weight)

    @property
    def underdetermined_elements(self) -> tuple[str, ...]:
        """Elements whose networks have more weights than residuals constrain them."""
        return tuple(symbol for symbol, count in self.element_residuals.items() if count < self.element_weights)


def fit_scaling(model: EnsembleModel, data: TrainingData, structures: Sequence[LabelledStructure]) -> None:
    """Per-element feature mean/std, per-element energy offsets (least squares), output scale."""
    features = data.features
    for k in range(model.params.n_elements):
        rows = features[data.element_index == k]
        if len(rows) == 0:
            continue
        model.feature_mean[k] = rows.mean(0)
        std = rows.std(0, unbiased=False) if len(rows) > 1 else torch.ones_like(rows[0])
        model.feature_std[k] = torch.where(std > 1e-8, std, torch.ones_like(std))
    labelled = [item for item in structures if item.energy is not None]
    if labelled:
        counts = np.array([[np.sum(item.atoms.numbers == z) for z in model.params.elements] for item in labelled])
        offsets, *_ = np.linalg.lstsq(counts.astype(float), np.array([item.energy for item in labelled]), rcond=None)
        model.energy_offset.copy_(torch.from_numpy(offsets))
    if len(data.forces):
        model.energy_scale.fill_(max(float(data.forces.std()), 0.05))


def _split(n_structures: int, fraction: float, generator: np.random.Generator) -> np.ndarray:
    """Boolean mask of validation structures."""
    mask = np.zeros(n_structures, dtype=bool)
    n_val = int(round(fraction * n_structures))
    if fraction > 0 and n_structures >= 5:
        mask[generator.permutation(n_structures)[: max(n_val, 1)]] = True
    return mask


def _member_weights(n_members: int, n_structures: int, train: np.ndarray, bootstrap: bool, generator) -> torch.Tensor:
    """(M, n_structures) sample weights: 1 on training structures, bootstrap counts if asked."""
    weights = np.tile(train.astype(float), (n_members, 1))
    if bootstrap and train.any():
        idx = np.flatnonzero(train)
        for m in range(n_members):
            weights[m, idx] = np.bincount(generator.choice(idx, size=len(idx)), minlength=n_structures)[idx]
    return torch.from_numpy(weights)


def descriptor_params(
    structures: Sequence[LabelledStructure], elements: tuple[int, ...], settings: TrainingSettings
) -> SymmetryFunctionParams:
    """The descriptor of a training run: the settings' keys, with radial shells (and angular η) that
    the settings leave unset derived from the data's nearest-neighbour distance (`radial_shells`).

    Only full structures (the initial set) are measured when there are any, so that every NFT
    iteration derives the same shells and a warm start stays possible.
    """
    keys = settings.descriptor.explicit()
    if settings.descriptor.derives_radial_shells:
        full = [item.atoms for item in structures if item.energy is not None] or [item.atoms for item in structures]
        keys["radial_centers"], keys["radial_etas"] = radial_shells(median_nearest_neighbour_distance(full), settings.cutoff)
        keys.setdefault("angular_etas", DATA_ANGULAR_ETAS)
    return SymmetryFunctionParams(elements=elements, cutoff=settings.cutoff, **keys)


def train_ensemble(
    structures: Sequence[LabelledStructure],
    settings: TrainingSettings,
    progress: ProgressCallback | None = None,
    start_from: EnsembleModel | None = None,
    elements: Sequence[int] | None = None,
    member_seeds: Sequence[int] | None = None,
    ensemble_losses: EnsembleLosses | None = None,
) -> tuple[EnsembleModel, TrainingReport]:
    """Train an ensemble on labelled structures; deterministic for given settings (and start model).

    `start_from` (the previous NFT iteration's model) warm-starts every member whose seed it holds,
    when its descriptor and network shape match the settings; Adam is then skipped when the
    second-order fit has steps (or runs at `final_learning_rate`), so a grown data set costs a
    polish, not a fresh fit.
    A member whose loss ends as an outlier is fitted again from fresh starts (`_refit_outlier_members`).
    `progress` (optional) receives a `TrainingProgress` after every optimiser step, the refit's too.
    `elements` (atomic numbers; default: those in the data) may name more than the data hold;
    `member_seeds` (default: `settings.seeds()`) trains a subset of members, e.g. one shard; a
    shard passes `ensemble_losses` (this shard's member losses → every member's, gathered from all
    shards) so that outliers are judged against the whole ensemble, as in one process.
    """
    run = _Run(
        tuple(int(z) for z in elements) if elements else None,
        tuple(int(s) for s in member_seeds) if member_seeds is not None else tuple(settings.seeds()),
        ensemble_losses,
    )
    return _train(structures, settings, run, progress, start_from, refit_outliers=True)


@dataclass(frozen=True)
class _Run:
    """What a training run needs beyond the settings: the model's elements and its members' seeds."""

    elements: tuple[int, ...] | None
    member_seeds: tuple[int, ...]
    ensemble_losses: EnsembleLosses | None = None  # None: these members are the whole ensemble
    prepared: TrainingData | None = None  # the structures' unscaled data, when already computed (refits)


def _train(
    structures: Sequence[LabelledStructure],
    settings: TrainingSettings,
    run: _Run,
    progress: ProgressCallback | None,
    start_from: EnsembleModel | None,
    refit_outliers: bool,
) -> tuple[EnsembleModel, TrainingReport]:
    """`train_ensemble`, with the outlier refit optional (the refit's own fits do not refit)."""
    if not structures:
        raise ValueError("no training structures")
    torch.manual_seed(settings.seed)
    generator = np.random.default_rng(settings.seed)
    elements = run.elements or elements_of(structures)
    missing = sorted(set(elements_of(structures)) - set(elements))
    if missing:
        raise ValueError(
            f"training data has element(s) {' '.join(chemical_symbols[z] for z in missing)} outside the model's elements "
            f"{' '.join(chemical_symbols[int(z)] for z in elements)}"
        )
    params = descriptor_params(structures, tuple(elements), settings)
    model = EnsembleModel(params, hidden=settings.hidden, member_seeds=list(run.member_seeds), element_networks=settings.element_networks)
    data = run.prepared if run.prepared is not None else prepare_training_data(structures, model.descriptor)
    run = replace(run, prepared=data)
    element_residuals = network_residuals(data, elements, model.networks.shared)
    settings = _with_weight_decay_if_underdetermined(settings, element_residuals, model.networks.weights_per_element)
    fit_scaling(model, data, structures)
    warm = start_from is not None and warm_start(model, start_from)
    data = data.scaled_by(model)
    device = resolve_device(settings.device)
    model, data = model.to(device), data.to(device)
    validation = _split(len(structures), settings.validation_fraction, generator)
    weights = _member_weights(model.n_members, len(structures), ~validation, settings.bootstrap, generator).to(device)
    val_weights = torch.from_numpy(np.tile(validation.astype(float), (model.n_members, 1))).to(device)
    adam_settings = settings
    if warm:
        adam_settings = settings.model_copy(
            update={"epochs": 0 if settings.second_order_steps else settings.epochs, "learning_rate": settings.final_learning_rate}
        )
    epochs_run, loss, best_validation = adam(model, data, weights, val_weights if validation.any() else None, adam_settings, progress)
    loss = second_order(model, data, weights, settings, loss, progress)
    reset: tuple[int, ...] = ()
    if refit_outliers and (adam_settings.epochs or settings.second_order_steps):
        reset = _refit_outlier_members(model, data, weights, structures, settings, run, progress)
        if reset:
            loss = float(member_losses(model, data, weights, settings, create_graph=False).sum())
    model.eval()
    energies, _ = predict_labels(model, data, create_graph=False)
    energies = energies.detach()
    train_e = torch.from_numpy(~validation).to(device)[data.energy_structure]
    rmse = float("nan")
    if train_e.any():
        err = (energies.mean(0) - data.energies) / data.energy_atoms
        rmse = float(err[train_e].pow(2).mean().sqrt())
    model = model.to("cpu")
    data = data.to("cpu")
    report = TrainingReport(
        train_force_mae=force_mae(model, data, ~validation),
        train_energy_rmse_per_atom=rmse,
        validation_force_mae=force_mae(model, data, validation) if validation.any() else None,
        epochs_run=epochs_run,
        final_loss=float(loss),
        warm_started=warm,
        reset_members=reset,
        best_validation_loss=best_validation,
        element_residuals=element_residuals,
        element_weights=model.networks.weights_per_element,
        weight_decay=settings.weight_decay,
    )
    return model, report


def network_residuals(data: TrainingData, elements: Sequence[int], shared: bool) -> dict[str, int]:
    """Residuals each network's weights enter, by the elements it serves: one entry per element, or
    one for all of them ("Cu+Au+Pd") when a shared network serves every element."""
    if not shared or len(elements) == 1:
        return {chemical_symbols[z]: n for z, n in zip(elements, residuals_per_element(data, len(elements)))}
    return {"+".join(chemical_symbols[z] for z in elements): len(data.energies) + data.force_jacobian.shape[0]}


def _with_weight_decay_if_underdetermined(
    settings: TrainingSettings, element_residuals: dict[str, int], element_weights: int
) -> TrainingSettings:
    """The settings a fit runs with: its `weight_decay` only when some element's network has fewer
    residuals than weights (the ridge keeps that fit well-posed); 0 otherwise, since on well-determined
    data it only biases the fit (convergence bench, seed 0, applied to every fit: force MAE against EMT
    0.0097 and 0.0135 eV/Å on the Cu309 and Au146 targets, against 0.0040 without)."""
    if settings.weight_decay and all(count >= element_weights for count in element_residuals.values()):
        return settings.model_copy(update={"weight_decay": 0.0})
    return settings


OUTLIER_LOSS_FACTOR = 3.0
"""A member whose training loss ends above this many times the members' median is fitted again..."""
FITTED_FORCE_RMS = 0.01  # eV/Å
FITTED_ENERGY_RMS_PER_ATOM = 0.001  # eV/atom
"""...unless its loss is at most what errors of these sizes on every trained force row and energy give:
a fit that good is at the labels' noise (DFT's force noise is of this order) or at round-off, and
comparing it with a median that sits at round-off calls exact fits outliers (issue 27: 2–5 of 10
exactly fitted alloy members refitted from cold starts in most iterations)."""
RESTARTS_PER_OUTLIER = 3
RESTART_SEED_STRIDE = 1_000_003
"""Restart k of the member with seed s starts from the initialisation of seed s + k·stride."""


def _refit_outlier_members(
    model: EnsembleModel,
    data: TrainingData,
    weights: torch.Tensor,
    structures: Sequence[LabelledStructure],
    settings: TrainingSettings,
    run: _Run,
    progress: ProgressCallback | None = None,
) -> tuple[int, ...]:
    """Fit every member whose loss is an outlier again from fresh initialisations; returns their seeds.

    Some initialisations end in a minimum that fits most rows and misses a few by 0.2–0.3 eV/Å
    (seen on Ag309 with a loss 200× the median), and a warm start keeps such a member there. Each
    outlier gets `RESTARTS_PER_OUTLIER` cold fits from other initialisations, all in one batched
    training on the same data (so the same scaling), and keeps the best if it beats its own loss.
    The member keeps its seed as its name, so a later warm start still finds it.
    """
    losses = member_losses(model, data, weights, settings, create_graph=False).detach()
    every_loss = run.ensemble_losses(losses) if run.ensemble_losses is not None else losses
    outlying = (losses > OUTLIER_LOSS_FACTOR * every_loss.median()) & (losses > fitted_loss_floor(data, weights, settings))
    outliers = np.flatnonzero(outlying.cpu().numpy())
    if len(outliers) == 0 or len(every_loss) < 3:
        return ()
    seeds = [int(model.member_seeds[m]) for m in outliers]
    restart_seeds = [seed + k * RESTART_SEED_STRIDE for seed in seeds for k in range(1, RESTARTS_PER_OUTLIER + 1)]
    refit_progress = None if progress is None else (lambda report: progress(replace(report, refit=True)))
    fresh, _ = _train(
        structures, settings, replace(run, member_seeds=tuple(restart_seeds)), refit_progress, None, refit_outliers=False
    )  # `run` carries the prepared data: same descriptor, same rows
    fresh = fresh.to(losses.device)
    rows = torch.from_numpy(np.repeat(outliers, RESTARTS_PER_OUTLIER)).to(losses.device)
    fresh_losses = member_losses(fresh, data, weights[rows], settings, create_graph=False).detach()
    fresh_losses = fresh_losses.reshape(len(outliers), RESTARTS_PER_OUTLIER)
    best = fresh_losses.argmin(dim=1)
    replaced = []
    with torch.no_grad():
        for k, member in enumerate(outliers):
            if fresh_losses[k, best[k]] >= losses[member]:
                continue
            source = k * RESTARTS_PER_OUTLIER + int(best[k])
            for target, candidate in zip(model.networks.parameters(), fresh.networks.parameters()):
                target[member] = candidate[source].detach().to(dtype=target.dtype)
            replaced.append(seeds[k])
    return tuple(replaced)


def fitted_loss_floor(data: TrainingData, weights: torch.Tensor, settings: TrainingSettings) -> torch.Tensor:
    """Per member (M,): the loss (`member_losses`) of a fit whose every trained force row is off by
    `FITTED_FORCE_RMS` and every energy by `FITTED_ENERGY_RMS_PER_ATOM`: no member at or below it is
    an outlier, whatever the median."""
    energy_weights = weights[:, data.energy_structure].sum(1) if len(data.energies) else weights.new_zeros(len(weights))
    force_term = settings.force_weight * FITTED_FORCE_RMS**2 if len(data.forces) else 0.0
    return settings.energy_weight * FITTED_ENERGY_RMS_PER_ATOM**2 * energy_weights + force_term


def warm_start(model: EnsembleModel, start: EnsembleModel) -> bool:
    """Copy `start`'s members into `model` (matched by seed), keeping `model`'s freshly fitted
    scaling; False (nothing changed) when descriptor, network shape or seeds do not match."""
    if start.params != model.params or start.networks.hidden != model.networks.hidden or start.element_networks != model.element_networks:
        return False
    start_seeds = list(start.member_seeds)
    if not set(model.member_seeds) <= set(start_seeds):
        return False
    members = torch.tensor([start_seeds.index(seed) for seed in model.member_seeds])
    fitted = [model.feature_mean.clone(), model.feature_std.clone(), model.energy_offset.clone(), model.energy_scale.clone()]
    with torch.no_grad():
        for target, source in zip(model.networks.parameters(), start.networks.parameters()):
            target.copy_(source.detach().to(target.dtype)[members])
        for name in ("feature_mean", "feature_std", "energy_offset", "energy_scale"):
            getattr(model, name).copy_(getattr(start, name))
    if model.networks.shared:  # one network cannot absorb a per-element change of scaling: keep the start's
        return True
    model.renormalise_(*fitted)
    return True
