"""Calibration that a campaign buys for free (docs/campaign.md, "Is δ honest?").

Every chunk's central atom had a predicted force and δ_i before its reference was computed: the
iteration that carved it records both in its model metrics (`CALIBRATION_KEY`). Once the parent's
label is stored, the realised error |F_model − F_parent| at that atom is known, so each iteration
gives an out-of-sample test of δ_i: the coverage is the fraction of those atoms whose error is ≤ δ_i,
with a Wilson score interval, against the coverage δ_i = 2.58·σ gives a 3-D force error
(`expected_coverage`; not the one-dimensional 99 % that 2.58 stands for). The sample is the chunk
centres only: atoms the selection picked for their high δ_i, not a random draw of the target's atoms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.execution.payloads import TargetPrediction
from pipeline.science.uncertainty import CONFIDENCE_FACTOR

CALIBRATION_KEY = "calibration_predictions"
"""Model-metrics key: per carved centre, the target id, atom index, δ_i (eV/Å) and force (eV/Å) predicted."""
INTERVAL_LEVEL = 0.95
"""Confidence level of the coverage intervals (Wilson score)."""
WILSON_Z = 1.959963984540054
"""The standard normal quantile of a two-sided `INTERVAL_LEVEL` interval."""
WARNING_P_VALUE = 0.05
"""Warn when a coverage this low or lower has less than this chance under the expected coverage."""


def norm_within(radius: float) -> float:
    """P(‖z‖ ≤ radius) for z a standard normal 3-vector (chi distribution, 3 degrees of freedom):
    erf(r/√2) − √(2/π)·r·exp(−r²/2). At r = 2.58 it is 0.916, not the 0.990 of one dimension."""
    return math.erf(radius / math.sqrt(2.0)) - math.sqrt(2.0 / math.pi) * radius * math.exp(-0.5 * radius**2)


def expected_coverage(members: int | None, factor: float = CONFIDENCE_FACTOR) -> float:
    """The fraction of atoms with |F_parent − F̄| ≤ δ_i = factor·σ if the parent's force scattered about
    the ensemble mean F̄ as one more member's does (isotropic 3-D Gaussian, spread s per component).

    σ² sums the members' variances over the three components (science.uncertainty), so σ estimates
    √3·s. With `members` M, σ is estimated from M forces (3(M − 1) degrees of freedom) and F̄ itself
    carries s²/M per component: |F_parent − F̄|²/σ² ~ (1 + 1/M)·F(3, 3(M − 1)). With None, σ is taken
    as exact and F̄ as the mean (M → ∞): P(χ²₃ ≤ 3·factor²). At 2.58: 0.9780 for M = 4, 0.9973 for
    M = 10, 0.9998 for M → ∞."""
    if members is None:
        return norm_within(math.sqrt(3.0) * factor)
    if members < 2:
        raise ValueError(f"an ensemble has at least 2 members, not {members}")
    from scipy.special import betainc  # scipy comes with ASE

    dof = 3 * (members - 1)
    ratio = factor**2 / (1.0 + 1.0 / members)  # the F(3, dof) quantile that δ_i stands for
    return float(betainc(1.5, 0.5 * dof, 3.0 * ratio / (3.0 * ratio + dof)))


def wilson_interval(successes: int, trials: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval (low, high) of a binomial rate from `successes` of `trials` (≥ 1);
    z = 1.96 gives 95 %. Unlike p ± z·√(p(1 − p)/n) it stays inside [0, 1] and is wide at small n:
    2 of 2 gives (0.342, 1)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"a Wilson interval needs 0 ≤ successes ≤ trials ≥ 1, not {successes} of {trials}")
    rate, z2 = successes / trials, z * z
    centre = (rate + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(rate * (1 - rate) / trials + z2 / (4 * trials * trials))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends, not 1 − 1e-16
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def centre_predictions(
    centres: Sequence[tuple[int, int]], predictions: Sequence[TargetPrediction], target_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """What the model predicted at each chunk centre (target id, atom) before its reference ran:
    δ_i (eV/Å) and the ensemble-mean force (eV/Å), from the per-target `predictions`."""
    by_target = dict(zip(target_ids, predictions))
    recorded = []
    for target_id, atom in centres:
        prediction = by_target[target_id]
        force = prediction.forces[atom]
        recorded.append(
            {
                "target": int(target_id),
                "atom": int(atom),
                "delta": float(prediction.uncertainties[atom]),
                "force": [float(value) for value in force],
            }
        )
    return recorded


def calibration(
    metrics_by_iteration: Mapping[int, Mapping[str, Any]],
    labels: Mapping[int, Mapping[int, np.ndarray]],
    members: int | None = None,
) -> dict[str, Any]:
    """Per iteration and over all, the realised error at the chunk centres it carved against their
    labels (`labels[target id][atom]`, the parent's force, eV/Å), the coverage and its Wilson interval;
    the coverage expected of an ensemble of `members` (`expected_coverage`; None: σ taken as exact);
    and a one-line `warning` when the coverage so far is significantly below that (else None)."""
    expected = expected_coverage(members)
    rows = []
    all_errors: list[float] = []
    all_deltas: list[float] = []
    for iteration in sorted(metrics_by_iteration):
        predicted = (metrics_by_iteration[iteration] or {}).get(CALIBRATION_KEY)
        if not predicted:
            continue
        errors, deltas = _errors_and_deltas(predicted, labels)
        all_errors.extend(errors)
        all_deltas.extend(deltas)
        rows.append({"iteration": iteration, "predicted": len(predicted), **_statistics(errors, deltas)})
    overall = _statistics(all_errors, all_deltas)
    return {
        "iterations": rows,
        "overall": overall,
        "expected_coverage": expected,
        "members": members,
        "interval_level": INTERVAL_LEVEL,
        "warning": coverage_warning(overall["covered"], overall["labelled"], expected),
    }


def coverage_warning(covered: int, labelled: int, expected: float) -> str | None:
    """A one-line warning when `covered` of `labelled` atoms within δ_i is significantly below the
    `expected` coverage (binomial lower tail under it below `WARNING_P_VALUE`), else None."""
    if labelled == 0:
        return None
    p_value = binomial_lower_tail(covered, labelled, expected)
    if p_value >= WARNING_P_VALUE:
        return None
    return (
        f"δ is over-confident: at {labelled} chunk centres the model's error was ≤ δ_i at only {covered} "
        f"({covered / labelled:.1%}; an ensemble whose spread matched its error would cover {expected:.1%}, "
        f"p = {p_value:.2g}). Read δ as a lower bound of the error: lower active.threshold, or raise model.ensemble "
        "for a wider spread."
    )


def binomial_lower_tail(successes: int, trials: int, rate: float) -> float:
    """P(X ≤ successes) for X ~ Binomial(trials, rate), summed in logs (no underflow at large trials)."""
    if successes >= trials:
        return 1.0
    log_terms = [
        math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * math.log(rate) + (trials - k) * math.log1p(-rate)
        for k in range(successes + 1)
    ]
    peak = max(log_terms)
    return min(1.0, math.exp(peak) * sum(math.exp(term - peak) for term in log_terms))


def _errors_and_deltas(
    predicted: Sequence[Mapping[str, Any]], labels: Mapping[int, Mapping[int, np.ndarray]]
) -> tuple[list[float], list[float]]:
    """|F_model − F_parent| and δ_i (eV/Å) at the recorded centres whose label is stored."""
    errors, deltas = [], []
    for item in predicted:
        label = labels.get(int(item["target"]), {}).get(int(item["atom"]))
        if label is None:  # not computed yet, or its job failed
            continue
        errors.append(float(np.linalg.norm(np.asarray(item["force"], dtype=float) - np.asarray(label, dtype=float))))
        deltas.append(float(item["delta"]))
    return errors, deltas


def _statistics(errors: Sequence[float], deltas: Sequence[float]) -> dict[str, Any]:
    """Counts, coverage with its Wilson interval [low, high], and medians of the realised errors and
    δ_i (eV/Å); None where nothing is labelled."""
    covered = sum(1 for error, delta in zip(errors, deltas) if error <= delta)
    return {
        "labelled": len(errors),
        "covered": covered,
        "coverage": covered / len(errors) if errors else None,
        "interval": list(wilson_interval(covered, len(errors))) if errors else None,
        "error_median": float(np.median(errors)) if errors else None,
        "error_max": float(np.max(errors)) if errors else None,
        "delta_median": float(np.median(deltas)) if deltas else None,
    }
