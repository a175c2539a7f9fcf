"""evaluate_model: a model's force and energy errors against a parent, per structure and in total."""
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from pipeline.execution.evaluation import evaluate_model
from pipeline.execution.parents import ReferenceFailed, parent_for
from pipeline.science.calculator import PREDICTION_BLOCK_SIZE
from tests.core_helpers import rattled_bulk, rattled_cluster, untrained_model

pytestmark = pytest.mark.timeout(120)


def test_errors_against_emt_are_the_explicit_sums():
    model = untrained_model()
    images = [rattled_bulk(), rattled_cluster()]
    evaluation = evaluate_model(model, images, parent_for("emt"))
    all_errors, energy_errors = [], []
    for atoms, item in zip(images, evaluation.structures):
        prediction = model.predict(atoms, block_size=PREDICTION_BLOCK_SIZE)
        reference = atoms.copy()
        reference.calc = EMT()
        errors = np.abs(prediction.forces - reference.get_forces())
        assert item.n_atoms == len(atoms) and item.failure is None
        assert item.force_mae == pytest.approx(errors.mean(), rel=1e-12)
        assert item.force_max_error == pytest.approx(errors.max(), rel=1e-12)
        energy_error = abs(prediction.energy - reference.get_potential_energy()) / len(atoms)
        assert item.energy_error_per_atom == pytest.approx(energy_error, rel=1e-12)
        assert item.max_delta == pytest.approx(prediction.max_delta, rel=1e-12)
        all_errors.append(errors.ravel())
        energy_errors.append(energy_error)
    metrics = evaluation.metrics()
    assert metrics["n_atoms"] == sum(len(atoms) for atoms in images)
    assert metrics["force_mae"] == pytest.approx(np.concatenate(all_errors).mean(), rel=1e-12)  # over all components
    assert metrics["force_max_error"] == pytest.approx(np.concatenate(all_errors).max(), rel=1e-12)
    assert metrics["energy_error_per_atom"] == pytest.approx(np.mean(energy_errors), rel=1e-12)


def test_a_structure_the_parent_cannot_label_fails_or_is_left_out():
    model = untrained_model(elements=(14, 78))
    images = [rattled_bulk(), bulk("Si", "diamond", a=5.43)]  # EMT has no Si
    with pytest.raises(ReferenceFailed, match="No EMT-potential for Si"):
        evaluate_model(model, images, parent_for("emt"))
    evaluation = evaluate_model(model, images, parent_for("emt"), skip_failed=True)
    labelled, failed = evaluation.structures
    assert failed.failure is not None and "No EMT-potential for Si" in failed.failure and failed.force_mae is None
    assert evaluation.metrics()["n_atoms"] == len(images[0])
    assert evaluation.metrics()["force_mae"] == labelled.force_mae


def test_an_element_the_model_lacks_is_a_value_error():
    with pytest.raises(ValueError):
        evaluate_model(untrained_model(), [bulk("Cu", cubic=True)], parent_for("emt"))
