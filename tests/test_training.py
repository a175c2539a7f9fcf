"""Training: masked force rows, determinism, and real accuracy on EMT Pt cells."""

import numpy as np
import pytest
import torch

from pipeline.science.chunks import carve_chunk
from pipeline.science.examples import bulk_training_cells, emt_labelled, rattled_cuboctahedron
from pipeline.science.structures import LabelledStructure
from pipeline.science.settings import TrainingSettings
from pipeline.science.losses import member_losses, member_losses_with_gradients
from pipeline.science.training import _split, fitted_loss_floor, train_ensemble
from pipeline.science.training_data import predict_labels, prepare_training_data
from tests.core_helpers import rattled_cluster, untrained_model

pytestmark = pytest.mark.timeout(300)


def labelled(atoms_list):
    return [emt_labelled(atoms) for atoms in atoms_list]


def chunk_structures(count=4, seed=0):
    """EMT-labelled 6 Å chunks of the rattled Pt260 where only the central force is trained."""
    parent = rattled_cuboctahedron()
    chunks = []
    for center in np.random.default_rng(seed).choice(len(parent), count, replace=False):
        chunk = carve_chunk(parent, int(center), 6.0, 4.0).atoms
        mask = np.zeros(len(chunk), dtype=bool)
        mask[0] = True
        chunks.append(emt_labelled(chunk, mask))
    return chunks


def test_prepared_labels_equal_direct_prediction():
    """The precomputed Jacobian path used in training gives the same forces as inference."""
    cluster = rattled_cluster(mixed=True)
    mask = np.zeros(len(cluster), dtype=bool)
    mask[[2, 9, 30]] = True
    items = [LabelledStructure(cluster, None, np.zeros((len(cluster), 3)), mask)]
    model = untrained_model(elements=(29, 78))
    data = prepare_training_data(items, model.descriptor)
    _, forces = predict_labels(model, data, create_graph=False)
    _, direct = model.member_energies_and_forces(cluster)
    np.testing.assert_allclose(forces.detach().numpy(), direct.numpy()[:, [2, 9, 30]], atol=1e-10)


def two_element_problem(hidden, n_members, seed, element_networks="per-element"):
    """A Cu/Pt model and its scaled data with energies, full forces and chunk rows of a mixed
    cluster, bootstrap-like weights per member and unequal loss weights: (model, data, weights, settings)."""
    from pipeline.science.model import EnsembleModel

    cluster = rattled_cluster(mixed=True)
    mask = np.zeros(len(cluster), dtype=bool)
    mask[[2, 9, 30]] = True
    rng = np.random.default_rng(seed)
    cells = labelled(bulk_training_cells(3, seed=2))
    items = cells + [LabelledStructure(cluster, None, rng.normal(size=(len(cluster), 3)), mask)]
    members = tuple(range(n_members))
    reference = untrained_model(elements=(29, 78), members=members)
    model = EnsembleModel(reference.params, hidden=hidden, member_seeds=list(members), element_networks=element_networks)
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("networks.")}, strict=False)
    with torch.no_grad():
        model.energy_scale.fill_(0.7)
        model.energy_offset.copy_(torch.tensor([-3.0, -5.5], dtype=torch.float64))
    data = prepare_training_data(items, model.descriptor).scaled_by(model)
    weights = torch.from_numpy(rng.integers(0, 3, size=(n_members, len(items))).astype(float))
    return model, data, weights, TrainingSettings(energy_weight=2.0, force_weight=3.0)


@pytest.mark.parametrize("element_networks", ["per-element", "shared"])
@pytest.mark.parametrize("hidden", [(5, 5), (7,), (4, 3, 2)])
def test_hand_written_loss_gradient_equals_autograd(hidden, element_networks):
    """The training step's hand-written chain rule (energies, masked force rows through the sparse
    Jacobian, the networks' tangent and reverse sweeps) gives autograd's loss and gradient, for a
    two-element data set with energies, full forces and chunk rows, bootstrap weights per member."""
    model, data, weights, settings = two_element_problem(hidden, n_members=4, seed=4, element_networks=element_networks)
    parameters = list(model.networks.parameters())
    losses = member_losses(model, data, weights, settings)
    expected = torch.autograd.grad(losses.sum(), parameters)
    for p in parameters:
        p.grad = None
    hand = member_losses_with_gradients(model, data, weights, settings)
    torch.testing.assert_close(hand, losses.detach(), rtol=1e-12, atol=1e-12)
    assert sum(float(grad.abs().max() > 0) for grad in expected) >= len(expected) - 1  # Cu's output bias: no Cu energy
    for p, grad in zip(parameters, expected):
        torch.testing.assert_close(p.grad, grad, rtol=1e-10, atol=1e-12)


def test_masked_rows_do_not_influence_training():
    settings = TrainingSettings(ensemble=3, epochs=40, optimizer="lbfgs", lbfgs_steps=0, seed=1)
    data = labelled(bulk_training_cells(4, seed=3)) + chunk_structures()
    model_a, _ = train_ensemble(data, settings)
    changed = []
    for item in data:
        forces = item.forces.copy()
        forces[~item.force_mask] += 5.0  # only rows that are masked out change
        changed.append(LabelledStructure(item.atoms, item.energy, forces, item.force_mask))
    model_b, _ = train_ensemble(changed, settings)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    trained_row = data[-1]
    forces = trained_row.forces.copy()
    forces[0] += 5.0
    model_c, _ = train_ensemble(data[:-1] + [LabelledStructure(trained_row.atoms, None, forces, trained_row.force_mask)], settings)
    assert not torch.equal(model_a.networks.weights[0], model_c.networks.weights[0])


def test_training_is_deterministic_and_members_differ():
    data = labelled(bulk_training_cells(4, seed=5))
    settings = TrainingSettings(ensemble=3, epochs=20, optimizer="lbfgs", lbfgs_steps=0, seed=4, bootstrap=True)
    a, report_a = train_ensemble(data, settings)
    b, report_b = train_ensemble(data, settings)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert report_a.train_force_mae == report_b.train_force_mae
    w = a.networks.weights[0]
    assert not torch.allclose(w[0], w[1])


def test_early_stopping_stops_and_restores_each_members_best_weights():
    """A large constant learning rate makes the validation loss stall: training stops early and hands
    back every member at its lowest validation loss, not at its last epoch."""
    data = labelled(bulk_training_cells(10, seed=6))
    settings = TrainingSettings(
        ensemble=2,
        epochs=2000,
        validation_fraction=0.2,
        patience_epochs=30,
        learning_rate=0.05,
        final_learning_rate=0.05,
        optimizer="lbfgs",
        lbfgs_steps=0,
        seed=0,
    )
    model, report = train_ensemble(data, settings)
    assert report.validation_force_mae is not None
    assert report.epochs_run < settings.epochs, "early stopping never stopped"
    validation = _split(len(data), settings.validation_fraction, np.random.default_rng(settings.seed))
    prepared = prepare_training_data(data, model.descriptor).scaled_by(model)
    weights = torch.from_numpy(np.tile(validation.astype(float), (model.n_members, 1)))
    kept = member_losses(model, prepared, weights, settings, create_graph=False).detach().numpy()
    np.testing.assert_allclose(kept, report.best_validation_loss, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_model_trained_on_emt_cells_predicts_held_out_forces():
    """30 strained/rattled Pt cells → held-out force MAE < 0.1 eV/Å (measured ≈0.04)."""
    train = labelled(bulk_training_cells(30, seed=0))
    test = labelled(bulk_training_cells(10, seed=11))
    model, report = train_ensemble(train, TrainingSettings(seed=0))  # the defaults
    errors = np.concatenate([np.abs(model.predict(item.atoms).forces - item.forces).ravel() for item in test])
    assert report.train_force_mae < 0.1
    assert errors.mean() < 0.1


def test_warm_start_continues_from_the_previous_members():
    """A warm start on a grown set begins where the previous model ended and keeps each member's identity."""
    data = labelled(bulk_training_cells(5, seed=8))
    settings = TrainingSettings(ensemble=3, epochs=30, optimizer="lbfgs", lbfgs_steps=15, seed=2)
    first, first_report = train_ensemble(data, settings)
    grown = data + chunk_structures(3, seed=4)
    warm, warm_report = train_ensemble(grown, settings, start_from=first)
    assert warm_report.warm_started and not first_report.warm_started
    assert warm_report.epochs_run == 0, "with L-BFGS on, a warm start skips Adam"

    # no steps at all: the warm model is the first model, rescaled to the grown set's statistics
    frozen, frozen_report = train_ensemble(
        grown, TrainingSettings(ensemble=3, epochs=0, optimizer="lbfgs", lbfgs_steps=0, seed=2), start_from=first
    )
    assert warm_report.train_force_mae < frozen_report.train_force_mae
    cluster = grown[-1].atoms
    np.testing.assert_allclose(frozen.predict(cluster).member_forces, first.predict(cluster).member_forces, atol=1e-9)
    assert not torch.equal(frozen.feature_mean, first.feature_mean)

    # a shard of the members (distributed training) picks its own members by seed
    shard, _ = train_ensemble(
        grown, TrainingSettings(ensemble=3, epochs=0, optimizer="lbfgs", lbfgs_steps=0, seed=2), start_from=first, member_seeds=(2001,)
    )
    _, shard_forces = shard.member_energies_and_forces(cluster)
    np.testing.assert_allclose(shard_forces[0].numpy(), first.predict(cluster).member_forces[1], atol=1e-9)


def test_an_incompatible_start_model_is_ignored():
    data = labelled(bulk_training_cells(4, seed=9))
    first, _ = train_ensemble(data, TrainingSettings(ensemble=2, epochs=5, optimizer="lbfgs", lbfgs_steps=0, hidden=(4,), seed=1))
    settings = TrainingSettings(ensemble=2, epochs=5, optimizer="lbfgs", lbfgs_steps=0, seed=1)
    model, report = train_ensemble(data, settings, start_from=first)
    reference, _ = train_ensemble(data, settings)
    assert not report.warm_started
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_a_member_with_an_outlier_loss_is_fitted_again_from_fresh_starts():
    """Warm start cannot get stuck: a member whose loss ends far above the others' is replaced by the
    best of fresh fits from other initialisations; the healthy members keep their warm start."""
    data = labelled(bulk_training_cells(5, seed=8))
    settings = TrainingSettings(ensemble=4, epochs=60, optimizer="lbfgs", lbfgs_steps=20, seed=3)
    first, _ = train_ensemble(data, settings)
    with torch.no_grad():  # member 1 leaves the previous iteration stuck: a saturated first layer
        first.networks.weights[0][1].mul_(60.0)
    grown = data + chunk_structures(2, seed=5)
    warm, report = train_ensemble(grown, settings, start_from=first)
    stuck_seed = first.member_seeds[1]
    assert report.warm_started and report.reset_members == (stuck_seed,)
    assert warm.member_seeds == first.member_seeds, "the refitted member keeps its seed as its name"
    prepared = prepare_training_data(grown, warm.descriptor).scaled_by(warm)
    weights = torch.ones(warm.n_members, len(grown), dtype=torch.float64)
    losses = member_losses(warm, prepared, weights, settings, create_graph=False).detach()
    assert losses[1] < 3.0 * losses.median(), losses
    cluster = grown[-1].atoms
    _, healthy_report = train_ensemble(grown, settings, start_from=train_ensemble(data, settings)[0])
    assert healthy_report.reset_members == ()
    # without the refit (a 2-member ensemble has no median to speak of) the stuck member stays stuck
    pair, pair_report = train_ensemble(grown, settings.with_changes(ensemble=2), start_from=first)
    assert pair_report.reset_members == ()
    assert np.abs(pair.predict(cluster).member_forces[1] - warm.predict(cluster).member_forces[1]).max() > 1e-3


def test_members_that_fit_exactly_are_never_refitted():
    """An exact fit is no outlier: with every member at round-off (≈1e-28) but one a little behind
    (≈1e-11, a million million times the median, yet far below label noise), no member is refitted."""
    data = labelled(bulk_training_cells(3, seed=2))
    settings = TrainingSettings(ensemble=4, seed=1, weight_decay=0.0)  # no ridge: the fits are exact
    first, _ = train_ensemble(data, settings)
    with torch.no_grad():
        first.networks.weights[0][1].mul_(1.001)
    warm, report = train_ensemble(data, settings.with_changes(lm_steps=1), start_from=first)
    prepared = prepare_training_data(data, warm.descriptor).scaled_by(warm)
    weights = torch.ones(warm.n_members, len(data), dtype=torch.float64)
    losses = member_losses(warm, prepared, weights, settings, create_graph=False).detach()
    assert losses[1] > 1e6 * losses.median(), "the relative rule alone would refit member 1"
    assert losses.max() < fitted_loss_floor(prepared, weights, settings).min()
    assert report.warm_started and report.reset_members == ()


def test_a_shard_judges_outliers_against_the_whole_ensemble():
    """Distributed training trains shards of members; an outlier is judged against every member's
    loss (`ensemble_losses`, gathered from all shards), so a shard refits exactly what one process
    would: here a 2-member shard, which alone has no median to speak of, refits its stuck member."""
    data = labelled(bulk_training_cells(5, seed=8))
    settings = TrainingSettings(ensemble=4, epochs=60, optimizer="lbfgs", lbfgs_steps=20, seed=3)
    first, _ = train_ensemble(data, settings)
    with torch.no_grad():  # member 1 leaves the previous iteration stuck (as in the test above)
        first.networks.weights[0][1].mul_(60.0)
    grown = data + chunk_structures(2, seed=5)
    whole, whole_report = train_ensemble(grown, settings, start_from=first)
    seeds = first.member_seeds
    healthy_losses = []

    def other_shard(losses):
        healthy_losses.append(losses)
        return losses

    _, healthy_report = train_ensemble(grown, settings, start_from=first, member_seeds=seeds[2:], ensemble_losses=other_shard)
    gathered = []

    def whole_ensemble(losses):
        gathered.append(losses)
        return torch.cat([losses, healthy_losses[0]])

    shard, shard_report = train_ensemble(grown, settings, start_from=first, member_seeds=seeds[:2], ensemble_losses=whole_ensemble)
    assert len(gathered) == 1, "one gather per training, at the outlier check"
    assert shard_report.reset_members == whole_report.reset_members == (seeds[1],)
    assert healthy_report.reset_members == ()
    cluster = grown[-1].atoms
    np.testing.assert_allclose(shard.predict(cluster).member_forces, whole.predict(cluster).member_forces[:2], atol=1e-8)
    _, alone_report = train_ensemble(grown, settings, start_from=first, member_seeds=seeds[:2])
    assert alone_report.reset_members == (), "judged alone, a 2-member shard refits nothing"


def test_lbfgs_after_adam_reaches_a_lower_loss_than_adam_alone_in_as_many_steps():
    """The default optimiser (Adam, then per-member L-BFGS) against Adam for the same number of steps."""
    data = labelled(bulk_training_cells(6, seed=12)) + chunk_structures(3, seed=2)
    adam_steps, lbfgs_steps = 100, 150
    _, adam = train_ensemble(data, TrainingSettings(ensemble=3, epochs=adam_steps + lbfgs_steps, optimizer="lbfgs", lbfgs_steps=0, seed=5))
    _, lbfgs = train_ensemble(data, TrainingSettings(ensemble=3, epochs=adam_steps, optimizer="lbfgs", lbfgs_steps=lbfgs_steps, seed=5))
    assert lbfgs.final_loss < 0.5 * adam.final_loss, (lbfgs.final_loss, adam.final_loss)
    assert lbfgs.train_force_mae < adam.train_force_mae


def test_a_shared_network_serves_every_element_and_warm_starts_unchanged(tmp_path):
    """`element_networks = "shared"`: one network per member whatever the number of elements (its
    weights fewer than two per-element networks'), every residual counted against it, a model file
    that reloads as shared with the same forces, and a warm start with no steps that keeps every
    member's forces (the start's scaling is kept: one network cannot absorb a per-element change)."""
    from pipeline.storage.model_file import load_ensemble, save_model

    cells = labelled(bulk_training_cells(4, seed=3, symbol="Cu")) + labelled(bulk_training_cells(4, seed=5, symbol="Pt"))
    mixed = rattled_cluster(mixed=True)
    settings = TrainingSettings(ensemble=3, lm_steps=5, seed=1, element_networks="shared")
    shared, report = train_ensemble(cells, settings)
    per_element, per_report = train_ensemble(cells, settings.model_copy(update={"element_networks": "per-element"}))
    assert shared.networks.shared and not per_element.networks.shared
    assert len(list(shared.networks.parameters())) == len(list(per_element.networks.parameters())) // 2
    assert report.element_weights < 2 * per_report.element_weights
    assert list(report.element_residuals) == ["Cu+Pt"]
    assert report.element_residuals["Cu+Pt"] == sum(per_report.element_residuals.values())  # cells hold one element each
    path = save_model(shared, tmp_path / "shared.nft")
    reloaded = load_ensemble(path)
    assert reloaded.element_networks == "shared"
    np.testing.assert_allclose(reloaded.predict(mixed).member_forces, shared.predict(mixed).member_forces, atol=1e-10)
    grown = cells + chunk_structures(2, seed=4)
    frozen, frozen_report = train_ensemble(grown, settings.model_copy(update={"lm_steps": 0}), start_from=shared)
    assert frozen_report.warm_started
    np.testing.assert_allclose(frozen.predict(mixed).member_forces, shared.predict(mixed).member_forces, atol=1e-9)
    # and a per-element model is no start for a shared one
    _, cold = train_ensemble(grown, settings.model_copy(update={"lm_steps": 0}), start_from=per_element)
    assert not cold.warm_started
