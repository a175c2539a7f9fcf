"""evaluate_model: a model's force and energy errors against a parent, per structure and in total."""

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from pipeline.execution.evaluation import StructureErrors, evaluate_model
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
        assert np.array_equal(item.deltas, prediction.uncertainties)
        residuals = np.sqrt(((prediction.forces - reference.get_forces()) ** 2).sum(axis=1))
        assert item.residuals == pytest.approx(residuals, rel=1e-12)
        assert item.covered.tolist() == (residuals <= prediction.uncertainties).tolist()
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


def test_coverage_is_residual_norm_at_most_delta_per_atom():
    """Explicit numbers: atom 0's residual norm equals its δ (covered: ≤), atom 1's components are each
    below δ but its norm is not (not covered), atom 2 is well inside."""
    item = StructureErrors(
        n_atoms=3,
        deltas=np.array([5.0, 1.0, 0.9]),
        force_errors=np.array([[3.0, 4.0, 0.0], [0.6, 0.6, 0.6], [0.5, 0.0, 0.0]]),
        energy_error_per_atom=0.1,
    )
    assert item.residuals.tolist() == [5.0, np.sqrt(1.08), 0.5]
    assert item.covered.tolist() == [True, False, True]
    metrics = item.metrics()
    assert metrics["coverage"] == 2 / 3
    middle = np.sqrt(1.08)  # sorted norms 0.5, √1.08, 5.0: linear interpolation at rank q/100·2
    assert metrics["residual_p50"] == pytest.approx(middle, rel=1e-15)
    assert metrics["residual_p90"] == pytest.approx(middle + 0.8 * (5.0 - middle), rel=1e-15)
    assert metrics["residual_p99"] == pytest.approx(middle + 0.98 * (5.0 - middle), rel=1e-15)
    assert metrics["residual_max"] == 5.0 and metrics["max_uncertainty"] == 5.0
    assert metrics["force_max_error"] == 4.0 and metrics["force_mae"] == pytest.approx(9.3 / 9, rel=1e-15)
