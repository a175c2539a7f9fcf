"""Training the ensemble on energies and masked force rows, all members in one batched pass.

Pair sums S and their Jacobians ∂S/∂R do not depend on the weights, so they are computed once
per structure; every epoch then costs one pass through the small networks plus one sparse
product F^m = −(∂S/∂R)ᵀ ∂E^m/∂S. A chunk keeps only the rows its central atom's force needs.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Sequence, get_args

import numpy as np
import torch

from pipeline.science.batched_lbfgs import minimize_members
from pipeline.science.levenberg_marquardt import minimize_members_lm
from pipeline.science.descriptors import (
    DATA_ANGULAR_ETAS,
    SymmetryFunctionParams,
    median_nearest_neighbour_distance,
    radial_shells,
)
from pipeline.science.model import EnsembleModel, ResidualPairs
from pipeline.science.settings import DeviceName, TrainingSettings
from pipeline.science.structures import LabelledStructure

ProgressCallback = Callable[[int, int, float], None]
EnsembleLosses = Callable[[torch.Tensor], torch.Tensor]
"""A shard's member losses (M_shard,) → the losses of every member of the ensemble (M,)."""


@dataclass
class TrainingData:
    """Concatenated (unscaled) features of the rows that matter, energy segments, force Jacobians.

    Features G(S) and ∂G/∂R = ∂G/∂S·∂S/∂R do not depend on the weights, so an epoch is only the
    networks on (M, R, F) plus one sparse product with M columns.
    """

    features: torch.Tensor  # (R, F)
    element_index: torch.Tensor  # (R,)
    energy_rows: torch.Tensor  # rows that belong to energy-labelled structures
    energy_segment: torch.Tensor  # structure slot of each energy row
    energies: torch.Tensor  # (S_E,) eV
    energy_atoms: torch.Tensor  # (S_E,) atoms per energy-labelled structure
    energy_structure: torch.Tensor  # (S_E,) index of the structure in the input list
    force_jacobian: torch.Tensor  # sparse CSR (3·F, R·n_features): ∂G/∂R for trained force rows
    force_jacobian_t: torch.Tensor  # its transpose, CSR, for the backward pass
    forces: torch.Tensor  # (F, 3) eV/Å reference
    force_structure: torch.Tensor  # (F,) index of the structure in the input list

    scaled: bool = False  # features (G − mean)/std and Jacobians ∂G_scaled/∂R, fixed for training

    def to(self, device: str | torch.device) -> "TrainingData":
        """The same data on another device (CUDA training)."""
        fields = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in vars(self).items()}
        return TrainingData(**fields)

    def scaled_by(self, model: EnsembleModel) -> "TrainingData":
        """Features and Jacobians in the model's scaled feature space, computed once for all epochs."""
        mean = model.feature_mean[self.element_index]
        std = model.feature_std[self.element_index]
        column_factor = (1.0 / std).reshape(-1)  # one per (row, feature) column of the Jacobian
        jac, jac_t = self.force_jacobian, self.force_jacobian_t
        scaled_values = jac.values() * column_factor[jac.col_indices()]
        rows_t = torch.repeat_interleave(torch.arange(jac_t.shape[0]), jac_t.crow_indices().diff())
        scaled_values_t = jac_t.values() * column_factor[rows_t]
        fields = dict(vars(self))
        fields.update(
            features=(self.features - mean) / std,
            force_jacobian=_csr_like(jac, scaled_values),
            force_jacobian_t=_csr_like(jac_t, scaled_values_t),
            scaled=True,
        )
        return TrainingData(**fields)


def prepare_training_data(
    structures: Sequence[LabelledStructure], descriptor, dtype: torch.dtype = torch.float64
) -> TrainingData:
    """Pair sums and force Jacobians of every structure, computed once and concatenated."""
    params = descriptor.params
    width = params.n_features
    feature_jacobian = torch.func.vmap(torch.func.jacrev(descriptor.features))
    sums, elements, jac_idx, jac_val, forces, force_struct = [], [], [], [], [], []
    energy_rows, energy_segment, energies, energy_atoms, energy_struct = [], [], [], [], []
    row_offset = force_offset = 0
    for s, item in enumerate(structures):
        rows, pair_sums, force_atoms, pair_sum_jacobian = descriptor.training_terms(item, dtype)
        sums.append(descriptor.features(pair_sums))
        d_features = feature_jacobian(pair_sums).flatten(2)  # (rows, F, n_el·C)
        jacobian = torch.einsum("fxrc,rgc->fxrg", pair_sum_jacobian, d_features)
        elements.append(params.element_lookup()[item.atoms.numbers[rows]])
        if item.energy is not None:
            energy_rows.append(np.arange(row_offset, row_offset + len(rows)))
            energy_segment.append(np.full(len(rows), len(energies)))
            energies.append(float(item.energy))
            energy_atoms.append(len(item.atoms))
            energy_struct.append(s)
        if len(force_atoms):
            dense = jacobian.reshape(len(force_atoms) * 3, len(rows) * width)
            nz = dense.nonzero(as_tuple=True)
            jac_idx.append(torch.stack([nz[0] + 3 * force_offset, nz[1] + row_offset * width]))
            jac_val.append(dense[nz])
            forces.append(item.forces[force_atoms])
            force_struct.append(np.full(len(force_atoms), s))
        row_offset += len(rows)
        force_offset += len(force_atoms)
    indices = torch.cat(jac_idx, dim=1) if jac_idx else torch.zeros(2, 0, dtype=torch.int64)
    values = torch.cat(jac_val) if jac_val else torch.zeros(0, dtype=dtype)
    shape = (3 * force_offset, row_offset * width)
    jacobian = torch.sparse_coo_tensor(indices, values, shape, check_invariants=False).coalesce()
    jacobian_t = torch.sparse_coo_tensor(indices.flip(0), values, shape[::-1], check_invariants=False).coalesce()

    def cat(chunks, dtype_=torch.int64, empty_shape=(0,)):
        return torch.from_numpy(np.concatenate(chunks)).to(dtype_) if chunks else torch.zeros(empty_shape, dtype=dtype_)

    return TrainingData(
        features=torch.cat(sums) if sums else torch.zeros(0, width, dtype=dtype),
        element_index=cat(elements),
        energy_rows=cat(energy_rows),
        energy_segment=cat(energy_segment),
        energies=torch.tensor(energies, dtype=dtype),
        energy_atoms=torch.tensor(energy_atoms, dtype=dtype),
        energy_structure=torch.tensor(energy_struct, dtype=torch.int64),
        force_jacobian=_csr(jacobian),
        force_jacobian_t=_csr(jacobian_t),
        forces=torch.from_numpy(np.concatenate(forces)).to(dtype) if forces else torch.zeros(0, 3, dtype=dtype),
        force_structure=cat(force_struct),
    )


def _csr(matrix: torch.Tensor) -> torch.Tensor:
    """COO → CSR, without torch's 'beta' warning for CSR tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return matrix.to_sparse_csr()


def _csr_like(matrix: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A CSR matrix with the sparsity of `matrix` and new values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(matrix.crow_indices(), matrix.col_indices(), values, matrix.shape)


def elements_of(structures: Sequence[LabelledStructure]) -> tuple[int, ...]:
    """Sorted atomic numbers present in a data set."""
    return tuple(sorted({int(z) for item in structures for z in item.atoms.numbers}))


def predict_labels(model: EnsembleModel, data: TrainingData, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Member energies (M, S_E) eV and trained force rows (M, F, 3) eV/Å for prepared data."""
    atomic, grads = model.energies_and_feature_gradients(
        data.features, data.element_index, create_graph, scaled=data.scaled
    )
    n_members = atomic.shape[0]
    energies = atomic.new_zeros(n_members, len(data.energies))
    energies = energies.index_add(1, data.energy_segment, atomic[:, data.energy_rows])
    flat_grads = grads.reshape(n_members, -1).T  # (R·width, M)
    forces = -_SparseProduct.apply(data.force_jacobian, data.force_jacobian_t, flat_grads)  # (3F, M)
    return energies, forces.T.reshape(n_members, -1, 3)


class _SparseProduct(torch.autograd.Function):
    """y = J x with a precomputed CSR transpose for the backward pass (no re-sorting per epoch)."""

    @staticmethod
    def forward(ctx, matrix, matrix_t, dense):
        ctx.matrix_t = matrix_t
        return matrix @ dense

    @staticmethod
    def backward(ctx, grad_output):
        return None, None, ctx.matrix_t @ grad_output


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


def _fit_scaling(model: EnsembleModel, data: TrainingData, structures: Sequence[LabelledStructure]) -> None:
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


def _member_losses(model, data, weights, settings, create_graph=True) -> torch.Tensor:
    """The loss per member: w_E Σ_s ((E−Ê)/N)² + w_F mean over trained force rows ‖F−F̂‖²."""
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


def _member_losses_with_gradients(model: EnsembleModel, data: TrainingData, weights: torch.Tensor, settings) -> torch.Tensor:
    """`_member_losses` (M,), with ∂loss_m/∂θ_m added to every network parameter's .grad.

    The chain rule is written out: ∂L/∂E and ∂L/∂F from the residuals, ∂L/∂F through the transposed
    force Jacobian to the weights u of the networks' input gradients, and the networks' own
    hand-written parameter gradient (`EnsembleNetworks.accumulate_parameter_gradients`). Falls back
    to autograd for unscaled data or networks without a hidden layer.
    """
    if not data.scaled or model.networks.n_layers < 2:
        losses = _member_losses(model, data, weights, settings)
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


def force_mae(model: EnsembleModel, data: TrainingData, structure_mask: np.ndarray) -> float:
    """Mean absolute error of the ensemble-mean force components over the selected structures."""
    rows = torch.from_numpy(structure_mask)[data.force_structure]
    if not rows.any():
        return float("nan")
    _, forces = predict_labels(model, data, create_graph=False)
    return float((forces.mean(0)[rows] - data.forces[rows]).abs().mean())


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
    `elements` (atomic numbers; default: those in the data) may name more than the data hold;
    `member_seeds` (default: `settings.seeds()`) trains a subset of members, e.g. one shard; a
    shard passes `ensemble_losses` (this shard's member losses → every member's, gathered from all
    shards) so that outliers are judged against the whole ensemble, as in one process.
    """
    run = _Run(tuple(int(z) for z in elements) if elements else None,
               tuple(int(s) for s in member_seeds) if member_seeds is not None else tuple(settings.seeds()),
               ensemble_losses)
    return _train(structures, settings, run, progress, start_from, refit_outliers=True)


@dataclass(frozen=True)
class _Run:
    """What a training run needs beyond the settings: the model's elements and its members' seeds."""

    elements: tuple[int, ...] | None
    member_seeds: tuple[int, ...]
    ensemble_losses: EnsembleLosses | None = None  # None: these members are the whole ensemble


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
        raise ValueError(f"training data has atomic numbers {missing} outside the model's elements {tuple(elements)}")
    params = descriptor_params(structures, tuple(elements), settings)
    model = EnsembleModel(params, hidden=settings.hidden, member_seeds=list(run.member_seeds))
    data = prepare_training_data(structures, model.descriptor)
    _fit_scaling(model, data, structures)
    warm = start_from is not None and warm_start(model, start_from)
    data = data.scaled_by(model)
    device = resolve_device(settings.device)
    model, data = model.to(device), data.to(device)
    validation = _split(len(structures), settings.validation_fraction, generator)
    weights = _member_weights(model.n_members, len(structures), ~validation, settings.bootstrap, generator).to(device)
    val_weights = torch.from_numpy(np.tile(validation.astype(float), (model.n_members, 1))).to(device)
    adam_settings = settings
    if warm:
        adam_settings = settings.model_copy(update={"epochs": 0 if settings.second_order_steps else settings.epochs,
                                                    "learning_rate": settings.final_learning_rate})
    epochs_run, loss, best_validation = _adam(
        model, data, weights, val_weights if validation.any() else None, adam_settings, progress
    )
    loss = _second_order(model, data, weights, settings, loss)
    reset: tuple[int, ...] = ()
    if refit_outliers and (adam_settings.epochs or settings.second_order_steps):
        reset = _refit_outlier_members(model, data, weights, structures, settings, run)
        if reset:
            loss = float(_member_losses(model, data, weights, settings, create_graph=False).sum())
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
    )
    return model, report


OUTLIER_LOSS_FACTOR = 3.0
"""A member whose training loss ends above this many times the members' median is fitted again."""
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
) -> tuple[int, ...]:
    """Fit every member whose loss is an outlier again from fresh initialisations; returns their seeds.

    Some initialisations end in a minimum that fits most rows and misses a few by 0.2–0.3 eV/Å
    (seen on Ag309 with a loss 200× the median), and a warm start keeps such a member there. Each
    outlier gets `RESTARTS_PER_OUTLIER` cold fits from other initialisations, all in one batched
    training on the same data (so the same scaling), and keeps the best if it beats its own loss.
    The member keeps its seed as its name, so a later warm start still finds it.
    """
    losses = _member_losses(model, data, weights, settings, create_graph=False).detach()
    every_loss = run.ensemble_losses(losses) if run.ensemble_losses is not None else losses
    outliers = np.flatnonzero((losses > OUTLIER_LOSS_FACTOR * every_loss.median()).cpu().numpy())
    if len(outliers) == 0 or len(every_loss) < 3:
        return ()
    seeds = [int(model.member_seeds[m]) for m in outliers]
    restart_seeds = [seed + k * RESTART_SEED_STRIDE for seed in seeds for k in range(1, RESTARTS_PER_OUTLIER + 1)]
    fresh, _ = _train(structures, settings, replace(run, member_seeds=tuple(restart_seeds)), None, None, refit_outliers=False)
    fresh = fresh.to(losses.device)
    rows = torch.from_numpy(np.repeat(outliers, RESTARTS_PER_OUTLIER)).to(losses.device)
    fresh_losses = _member_losses(fresh, data, weights[rows], settings, create_graph=False).detach()
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


def warm_start(model: EnsembleModel, start: EnsembleModel) -> bool:
    """Copy `start`'s members into `model` (matched by seed), keeping `model`'s freshly fitted
    scaling; False (nothing changed) when descriptor, network shape or seeds do not match."""
    if start.params != model.params or start.networks.hidden != model.networks.hidden:
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
    model.renormalise_(*fitted)
    return True


def _adam(model, data, weights, val_weights, settings, progress) -> tuple[int, float, tuple[float, ...] | None]:
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
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad()
        total = _member_losses_with_gradients(model, data, weights, settings).sum()
        optimizer.step()
        scheduler.step()
        if val_weights is not None and (epoch % 10 == 0 or epoch == epochs):
            since_best = _track_best(model, data, val_weights, settings, best_val, best_state, since_best + 10)
            if since_best >= settings.patience_epochs:
                break
        if progress is not None:
            progress(epoch, epochs, float(total.detach()))
    if best_state is None:
        return epoch, float(total.detach()), None
    model.networks.load_state_dict(best_state)
    return epoch, float(total.detach()), tuple(float(v) for v in best_val)


def _track_best(model, data, val_weights, settings, best_val, best_state, since_best) -> int:
    """Keep each member's weights at its lowest validation loss; return epochs since any improved."""
    val = _member_losses(model, data, val_weights, settings, create_graph=False).detach()
    improved = val < best_val
    if improved.any():
        best_val[improved] = val[improved]
        for name, tensor in model.networks.state_dict().items():
            best_state[name][improved] = tensor[improved]
        return 0
    return since_best


def _second_order(model, data, weights, settings, loss: float) -> float:
    """The settings' second-order fit after Adam; returns the summed member loss."""
    if settings.optimizer == "levenberg-marquardt" and settings.lm_steps:
        return _levenberg_marquardt(model, data, weights, settings, settings.lm_steps)
    if settings.optimizer == "lbfgs" and settings.lbfgs_steps:
        return _lbfgs(model, data, weights, settings)
    return loss


def _lbfgs(model, data, weights, settings, deadline: Callable[[], bool] | None = None) -> float:
    """L-BFGS polish with a history and line search of its own per member (batched_lbfgs)."""
    parameters = list(model.networks.parameters())
    n_members = model.n_members

    def objective(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _assign_flat(parameters, flat)
        for p in parameters:
            p.grad = None
        losses = _member_losses_with_gradients(model, data, weights, settings)
        grad = torch.cat([p.grad.reshape(n_members, -1) for p in parameters], dim=1)
        return losses, grad

    final, losses = minimize_members(objective, _flat(parameters, n_members), settings.lbfgs_steps, deadline=deadline)
    _assign_flat(parameters, final)
    return float(losses.sum())


def _flat(parameters: list[torch.Tensor], n_members: int) -> torch.Tensor:
    """The members' parameters as one (M, P) matrix, in `parameters` order (what the optimisers move)."""
    return torch.cat([p.detach().reshape(n_members, -1) for p in parameters], dim=1)


def _assign_flat(parameters: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy an (M, P) matrix laid out as `_flat` back into the parameters."""
    with torch.no_grad():
        for p, chunk in zip(parameters, flat.split([p[0].numel() for p in parameters], dim=1)):
            p.copy_(chunk.reshape(p.shape))


def _residual_factors(data: TrainingData, weights: torch.Tensor, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member factors (M, S_E) and (M, F) that turn energy and force errors into residuals whose
    squares sum to `_member_losses`: √(w_E·w)/N per structure, √(w_F·w/Σw) per force row."""
    energy = (settings.energy_weight * weights[:, data.energy_structure]).sqrt() / data.energy_atoms
    w = weights[:, data.force_structure]
    force = (settings.force_weight * w / w.sum(1, keepdim=True).clamp_min(1.0)).sqrt()
    return energy, force


def _member_residuals(model: EnsembleModel, data: TrainingData, weights: torch.Tensor, settings) -> torch.Tensor:
    """Residuals (M, S_E + 3F): energy errors, then force components, each times its factor."""
    energies, forces = predict_labels(model, data, create_graph=False)
    energy_factor, force_factor = _residual_factors(data, weights, settings)
    energy_part = (energies.detach() - data.energies) * energy_factor
    force_part = (forces.detach() - data.forces) * force_factor.unsqueeze(2)
    return torch.cat([energy_part, force_part.reshape(force_part.shape[0], -1)], dim=1)


@dataclass
class _JacobianTerms:
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


def _jacobian_terms(data: TrainingData) -> _JacobianTerms:
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
    return _JacobianTerms(
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
            blocks.append(_PairBlock(element, element_pairs[in_block], residuals[chosen],
                                     ResidualPairs.of(position[local[in_block]])))
            start = end
    return blocks


def _member_residual_jacobians(
    model: EnsembleModel, data: TrainingData, weights: torch.Tensor, settings, terms: _JacobianTerms
) -> torch.Tensor:
    """∂residuals/∂θ (M, S_E + 3F, P): each residual's parameter gradient, summed over its pairs,
    times the residual's factor and the output scale (negative for forces)."""
    energy_factor, force_factor = _residual_factors(data, weights, settings)
    scale = model.energy_scale
    factors = torch.cat([energy_factor * scale, (force_factor * -scale).repeat_interleave(3, dim=1)], dim=1)  # (M, N)
    n_residuals = factors.shape[1]
    n_parameters = sum(p[0].numel() for p in model.networks.parameters())
    jacobians = data.features.new_zeros(model.n_members, n_residuals, n_parameters)
    for block in terms.blocks:
        pairs = block.pairs
        sums, columns = model.networks.residual_parameter_jacobian(
            data.features[terms.row[pairs]], block.element, terms.output_weight[pairs], terms.input_weight[pairs],
            block.layout)
        jacobians[:, block.residuals.unsqueeze(1), columns.unsqueeze(0)] = sums
    return jacobians * factors.unsqueeze(2)


def _levenberg_marquardt(model, data, weights, settings, steps: int, deadline: Callable[[], bool] | None = None) -> float:
    """Levenberg–Marquardt on the members' residuals (levenberg_marquardt); `data` scaled, as `_train` makes it."""
    parameters = list(model.networks.parameters())
    terms = _jacobian_terms(data)

    def residuals_and_jacobian(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _assign_flat(parameters, flat)
        residuals = _member_residuals(model, data, weights, settings)
        return residuals, _member_residual_jacobians(model, data, weights, settings, terms)

    def losses(flat: torch.Tensor) -> torch.Tensor:
        _assign_flat(parameters, flat)
        return _member_losses(model, data, weights, settings, create_graph=False).detach()

    start = _flat(parameters, model.n_members)
    final, final_losses = minimize_members_lm(residuals_and_jacobian, losses, start, steps, deadline=deadline)
    _assign_flat(parameters, final)
    return float(final_losses.sum())


DEVICES: tuple[str, ...] = get_args(DeviceName)


def resolve_device(name: str) -> torch.device:
    """The torch device of a `device` setting: "auto" is cuda when torch sees a GPU, else cpu.

    ValueError for "cuda" when torch sees no GPU (a CPU-only torch or no visible device).
    """
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device 'cuda': torch {torch.__version__} sees no CUDA GPU here (use 'auto' or 'cpu')")
    return torch.device(name)
