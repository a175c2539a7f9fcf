"""Calibration that a campaign buys for free (docs/campaign.md, "Is δ honest?").

Every chunk's central atom had a predicted force and δ_i before its reference was computed: the
iteration that carved it records both in its model metrics (`CALIBRATION_KEY`). Once the parent's
label is stored, the realised error |F_model − F_parent| at that atom is known, so each iteration
gives an out-of-sample test of δ_i: the coverage is the fraction of those atoms whose error is ≤ δ_i,
which δ_i = 2.58·σ promises to be about 99 %. Chunk centres are the most uncertain atoms, so this is
where δ matters most.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.execution.payloads import TargetPrediction

CALIBRATION_KEY = "calibration_predictions"
"""Model-metrics key: per carved centre, the target id, atom index, δ_i (eV/Å) and force (eV/Å) predicted."""
PROMISED_COVERAGE = 0.99
"""The fraction of atoms with error ≤ δ_i that the confidence factor 2.58 promises."""
WARNING_P_VALUE = 0.05
"""Warn when a coverage this low or lower has less than this chance under the promised 99 %."""


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


def calibration(metrics_by_iteration: Mapping[int, Mapping[str, Any]], labels: Mapping[int, Mapping[int, np.ndarray]]) -> dict[str, Any]:
    """Per iteration and over all, the realised error at the chunk centres it carved against their
    labels (`labels[target id][atom]`, the parent's force, eV/Å) and the coverage; and a one-line
    `warning` when the coverage so far is significantly below the promised 99 % (else None)."""
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
    return {"iterations": rows, "overall": overall, "warning": coverage_warning(overall["covered"], overall["labelled"])}


def coverage_warning(covered: int, labelled: int) -> str | None:
    """A one-line warning when `covered` of `labelled` atoms within δ_i is significantly below 99 %
    (binomial lower tail under the promised rate below `WARNING_P_VALUE`), else None."""
    if labelled == 0:
        return None
    p_value = binomial_lower_tail(covered, labelled, PROMISED_COVERAGE)
    if p_value >= WARNING_P_VALUE:
        return None
    return (
        f"δ is over-confident: at {labelled} chunk centres the model's error was ≤ δ_i at only {covered} "
        f"({covered / labelled:.1%}, the factor 2.58 promises {PROMISED_COVERAGE:.0%}; p = {p_value:.2g}). "
        "Read δ as a lower bound of the error: lower active.threshold, or raise model.ensemble for a wider spread."
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
    """Counts, coverage and medians of the realised errors and δ_i (eV/Å); None where nothing is labelled."""
    covered = sum(1 for error, delta in zip(errors, deltas) if error <= delta)
    return {
        "labelled": len(errors),
        "covered": covered,
        "coverage": covered / len(errors) if errors else None,
        "error_median": float(np.median(errors)) if errors else None,
        "error_max": float(np.max(errors)) if errors else None,
        "delta_median": float(np.median(deltas)) if deltas else None,
    }
