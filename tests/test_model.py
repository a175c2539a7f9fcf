"""The batched ensemble: exact forces, symmetry, periodic consistency, uncertainty, model files."""

import numpy as np
import pytest
import torch

import pipeline
from pipeline.science.model import EnsembleModel
from pipeline.science.structures import LabelledStructure
from pipeline.storage.model_file import ModelFileError, load_ensemble, save_model
from tests.core_helpers import finite_difference_forces, random_rotation, rattled_bulk, rattled_cluster, untrained_model

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("case", ["cluster", "mixed", "periodic"])
def test_forces_equal_finite_differences(case):
    atoms = {"cluster": rattled_cluster(), "mixed": rattled_cluster(mixed=True), "periodic": rattled_bulk()}[case]
    model = untrained_model(elements=sorted(set(atoms.numbers)))
    _, forces = model.member_energies_and_forces(atoms, block_size=5)
    indices = [0, 3, len(atoms) - 1]
    numeric = finite_difference_forces(model, atoms, indices)
    analytic = forces.numpy()[:, indices]
    scale = np.abs(analytic).max()
    assert scale > 1e-2
    assert np.abs(numeric - analytic).max() / scale < 1e-4


def test_invariant_under_rotation_translation_and_permutation():
    atoms = rattled_cluster(mixed=True)
    model = untrained_model(elements=(29, 78))
    base = model.predict(atoms)
    rotation = random_rotation()
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T + np.array([1.3, -4.0, 2.2])
    after = model.predict(moved)
    assert after.energy == pytest.approx(base.energy, abs=1e-9)
    np.testing.assert_allclose(after.forces, base.forces @ rotation.T, atol=1e-9)
    np.testing.assert_allclose(after.uncertainties, base.uncertainties, atol=1e-9)
    order = np.random.default_rng(0).permutation(len(atoms))
    permuted = model.predict(atoms[order])
    assert permuted.energy == pytest.approx(base.energy, abs=1e-9)
    np.testing.assert_allclose(permuted.forces, base.forces[order], atol=1e-9)


def test_periodic_cell_and_supercell_agree_per_atom():
    cell = rattled_bulk()
    model = untrained_model()
    small = model.predict(cell)
    large = model.predict(cell.repeat((2, 2, 2)))
    np.testing.assert_allclose(large.atomic_energies, np.tile(small.atomic_energies, 8), atol=1e-9)
    np.testing.assert_allclose(large.forces, np.tile(small.forces, (8, 1)), atol=1e-9)
    assert large.energy == pytest.approx(8 * small.energy, rel=1e-12)


def test_uncertainty_is_the_papers_definition():
    atoms = rattled_cluster()
    prediction = untrained_model(members=(0, 1, 2, 3, 4)).predict(atoms)
    f = prediction.member_forces
    expected = np.zeros(len(atoms))
    for i in range(len(atoms)):
        mean = sum(f[m, i] for m in range(len(f))) / len(f)
        expected[i] = 2.58 * np.sqrt(sum(np.sum((f[m, i] - mean) ** 2) for m in range(len(f))) / (len(f) - 1))
    np.testing.assert_allclose(prediction.uncertainties, expected, rtol=1e-12)
    assert prediction.max_delta == pytest.approx(expected.max())


def test_batched_ensemble_equals_members_evaluated_one_by_one():
    atoms = rattled_bulk(repeat=(2, 1, 1))
    ensemble = untrained_model(members=(4, 5, 6))
    batched = ensemble.predict(atoms)
    for m, seed in enumerate((4, 5, 6)):
        single = EnsembleModel(ensemble.params, member_seeds=[seed])
        single.load_state_dict({name: (t[m : m + 1] if name.startswith("networks.") else t) for name, t in ensemble.state_dict().items()})
        energy, forces = single.member_energies_and_forces(atoms)
        assert float(energy[0]) == pytest.approx(batched.member_energies[m], abs=1e-10)
        np.testing.assert_allclose(forces[0].numpy(), batched.member_forces[m], atol=1e-10)


def test_energy_uncertainty_is_the_spread_of_each_members_own_atomic_energies():
    atoms = rattled_cluster(mixed=True)
    seeds = (2, 3, 4, 5)
    ensemble = untrained_model(elements=(29, 78), members=seeds)
    prediction = ensemble.predict(atoms, block_size=7)
    per_member = []
    for m, seed in enumerate(seeds):  # each member alone, as a one-member model
        single = EnsembleModel(ensemble.params, member_seeds=[seed])
        single.load_state_dict({name: (t[m : m + 1] if name.startswith("networks.") else t) for name, t in ensemble.state_dict().items()})
        atomic, _ = single.member_atomic_energies_and_forces(atoms, 2048)
        per_member.append(atomic[0].numpy())
    expected = [
        2.58 * np.sqrt(sum((e[i] - np.mean([x[i] for x in per_member])) ** 2 for e in per_member) / (len(seeds) - 1))
        for i in range(len(atoms))
    ]
    assert np.max(expected) > 1e-3, "untrained members disagree"
    np.testing.assert_allclose(prediction.energy_uncertainties, expected, rtol=1e-9, atol=1e-12)


def test_blocks_do_not_change_results():
    atoms = rattled_cluster()
    model = untrained_model()
    a = model.predict(atoms, block_size=3)
    b = model.predict(atoms, block_size=4096)
    np.testing.assert_allclose(a.member_forces, b.member_forces, atol=1e-11)


def test_model_file_round_trip_and_calculator(tmp_path):
    atoms = rattled_cluster(mixed=True)
    model = untrained_model(elements=(29, 78))
    path = save_model(model, tmp_path / "model.nft")
    atoms.calc = pipeline.load_model(path, dtype=torch.float64)
    direct = model.predict(atoms)
    assert atoms.get_potential_energy() == pytest.approx(direct.energy, abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), direct.forces, atol=1e-10)
    assert atoms.calc.results["uncertainties"].shape == (len(atoms),)
    np.testing.assert_allclose(atoms.calc.results["uncertainties"], direct.uncertainties, atol=1e-10)


def test_float32_inference_is_close_to_float64(tmp_path):
    atoms = rattled_bulk(repeat=(2, 2, 2))
    path = save_model(untrained_model(), tmp_path / "m.nft")
    f64 = load_ensemble(path).predict(atoms)
    f32 = load_ensemble(path, dtype=torch.float32).predict(atoms)
    assert np.abs(f32.forces - f64.forces).max() < 1e-4 * max(1.0, np.abs(f64.forces).max())


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}      "])
def test_corrupt_or_foreign_model_files_are_rejected(tmp_path, content):
    path = tmp_path / "bad.nft"
    path.write_bytes(content)
    with pytest.raises(ModelFileError) as error:
        load_ensemble(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_truncated_model_file_is_rejected(tmp_path):
    path = save_model(untrained_model(), tmp_path / "m.nft")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFileError):
        load_ensemble(path)


def test_unknown_element_is_named():
    with pytest.raises(ValueError, match="Cu"):
        untrained_model().predict(rattled_cluster(mixed=True))


def test_g4_option_forces_and_training_path_are_exact():
    """The paper's G4 descriptor: autograd forces equal finite differences and the trainer's Jacobians."""
    from pipeline.science.structures import LabelledStructure
    from pipeline.science.training_data import predict_labels, prepare_training_data

    atoms = rattled_cluster(mixed=True)
    model = untrained_model(elements=(29, 78), kind="g4")
    _, forces = model.member_energies_and_forces(atoms)
    numeric = finite_difference_forces(model, atoms, [0, 11])
    assert np.abs(numeric - forces.numpy()[:, [0, 11]]).max() / np.abs(forces.numpy()).max() < 1e-4
    mask = np.zeros(len(atoms), dtype=bool)
    mask[[5, 11]] = True
    data = prepare_training_data([LabelledStructure(atoms, None, np.zeros((len(atoms), 3)), mask)], model.descriptor)
    _, trained_rows = predict_labels(model, data, create_graph=False)
    np.testing.assert_allclose(trained_rows.detach().numpy(), forces.numpy()[:, [5, 11]], atol=1e-10)


@pytest.mark.parametrize("hidden", [(5, 5), (4,), (3, 4, 2)])
def test_renormalising_keeps_every_members_energies_and_forces(hidden):
    """Warm start adopts a grown data set's feature scaling; the function must not change."""
    model = untrained_model(elements=(29, 78))
    model = EnsembleModel(model.params, hidden=hidden, member_seeds=[0, 1, 2])
    cluster = rattled_cluster(mixed=True)
    before = model.predict(cluster)
    generator = torch.Generator().manual_seed(3)
    shape = model.feature_mean.shape
    model.renormalise_(
        torch.rand(shape, generator=generator, dtype=torch.float64),
        torch.rand(shape, generator=generator, dtype=torch.float64) * 3 + 0.2,
        torch.tensor([-3.0, -5.5], dtype=torch.float64),
        torch.tensor(0.37, dtype=torch.float64),
    )
    after = model.predict(cluster)
    assert float(model.energy_scale) == pytest.approx(0.37)
    np.testing.assert_allclose(after.member_energies, before.member_energies, atol=1e-10)
    np.testing.assert_allclose(after.member_forces, before.member_forces, atol=1e-10)


@pytest.mark.parametrize("kind", ["g5-moments", "g4"])
def test_prediction_features_are_the_scaled_inputs_of_the_training_path(kind):
    """The features kept by predict(with_features=True) are, atom by atom and in any block size, the
    training path's features scaled by each atom's own element (what selection compares)."""
    atoms = rattled_cluster(mixed=True)
    model = untrained_model(elements=(29, 78), kind=kind)
    item = LabelledStructure(atoms, 0.0, np.zeros((len(atoms), 3)))
    rows, pair_sums, _, _ = model.descriptor.training_terms(item, torch.float64)
    element = torch.from_numpy(model.element_indices(atoms.numbers[rows]))
    expected = ((model.descriptor.features(pair_sums) - model.feature_mean[element]) / model.feature_std[element]).numpy()
    for block_size in (5, 4096):
        prediction = model.predict(atoms, block_size=block_size, with_features=True)
        assert prediction.features.shape == (len(atoms), model.params.n_features)
        np.testing.assert_allclose(prediction.features[rows], expected, atol=1e-10)
    assert model.predict(atoms).features is None
