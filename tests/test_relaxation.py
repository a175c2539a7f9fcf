"""The pure relaxation-with-uncertainty logic (science/relaxation.py): when it asks for a better
model, what it does with the answer, and why it stops. Real ensembles (random weights) as the
calculators; the callback is a plain function, as a notebook would pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.science.calculator import EnsembleCalculator
from pipeline.science.relaxation import Improvement, relax_with_uncertainty
from tests.core_helpers import rattled_cluster, untrained_model


def ensemble(first_seed: int) -> EnsembleCalculator:
    return EnsembleCalculator(untrained_model(members=(first_seed, first_seed + 1, first_seed + 2)), dtype=torch.float64, device="cpu")


def test_an_uncertain_geometry_gets_a_new_model_and_is_evaluated_again_at_the_same_step():
    atoms = rattled_cluster()
    start = atoms.positions.copy()
    asked = []

    def improve(frame, results):
        asked.append((frame.positions.copy(), float(np.max(results["uncertainties"])), frame.info["step"]))
        if len(asked) > 2:
            return None  # nothing more to learn: relax on with the model it has
        return Improvement(ensemble(10 * len(asked)), chunks_added=len(asked), model=len(asked))

    frames = []
    result = relax_with_uncertainty(
        atoms, ensemble(0), 0.0, improve, fmax=1e-9, max_steps=3, model=0, on_frame=lambda frame, row: frames.append((frame, row))
    )
    rows = [(row.step, row.model, row.chunks_added) for row in result.steps]
    # Step 0: model 0 asks (2 chunks' worth of improvement, two new models), model 2 gets None and goes on.
    assert rows == [(0, 0, 1), (0, 1, 2), (0, 2, 0), (1, 2, 0), (2, 2, 0), (3, 2, 0)]
    # Every evaluation was above the threshold 0, so each asked, with its own geometry, step and δ.
    assert [(delta, step) for _, delta, step in asked] == [(row.delta, row.step) for row in result.steps]
    for positions, _, _ in asked[:3]:
        np.testing.assert_array_equal(positions, start)  # the same geometry, asked again with each new model
    assert result.reason == "steps" and not result.converged
    np.testing.assert_array_equal(atoms.positions, start)  # the input is left as it was
    assert [row for _, row in frames] == result.steps
    for frame, row in frames:
        assert frame.arrays["delta"].max() == row.delta
        assert np.sqrt((frame.get_forces() ** 2).sum(axis=1)).max() == pytest.approx(row.fmax, rel=1e-12)
    assert not np.array_equal(result.atoms.positions, start)  # it moved


@pytest.mark.parametrize(
    "threshold, answer, reason, evaluations",
    [
        (np.inf, None, "converged", 1),  # certain everywhere, forces below a loose target at once
        (0.0, None, "uncertain", 1),  # forces below the target, δ above the threshold, nothing to learn
    ],
)
def test_it_stops_at_the_force_target_and_says_whether_delta_was_below_the_threshold(threshold, answer, reason, evaluations):
    asked = []
    result = relax_with_uncertainty(
        rattled_cluster(), ensemble(0), threshold, lambda *args: asked.append(args) or answer, fmax=1e6, max_steps=5
    )
    assert result.reason == reason and len(result.steps) == evaluations and result.steps[0].step == 0
    assert len(asked) == (0 if threshold == np.inf else 1)


def test_unknown_optimizer_and_non_positive_fmax_are_refused():
    with pytest.raises(ValueError, match="BFGS, FIRE, LBFGS"):
        relax_with_uncertainty(rattled_cluster(), ensemble(0), 1.0, lambda *args: None, optimizer="SD")
    with pytest.raises(ValueError, match="fmax"):
        relax_with_uncertainty(rattled_cluster(), ensemble(0), 1.0, lambda *args: None, fmax=0.0)
