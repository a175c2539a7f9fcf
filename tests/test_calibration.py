"""Calibration a campaign buys for free (docs/campaign.md, "Is δ honest?"): every chunk centre's force
and δ_i predicted before its reference ran are stored; once labelled, the realised error and the
coverage (error ≤ δ_i) per iteration, with a Wilson interval, appear in `nft status`, summary.json and
the report, and a coverage significantly below the one δ_i = 2.58σ gives a 3-D force error (not the
one-dimensional 99 %) is warned about.

The per-iteration numbers are recomputed here from the iteration's saved model (through the ASE
calculator) and the stored reference results, independently of the campaign code.
"""

import io
import json
import math
from itertools import product

import numpy as np
import pytest
from ase.io import read
from rich.console import Console

from pipeline import load_model
from pipeline.campaign.calibration import (
    binomial_lower_tail,
    calibration,
    coverage_warning,
    expected_coverage,
    norm_within,
    wilson_interval,
)
from pipeline.campaign.config import load_config
from pipeline.campaign.status import campaign_status
from pipeline.cli.cmd_campaign import print_status
from pipeline.science.uncertainty import atomic_uncertainty
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import run_nft, write_campaign

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def three_iterations(tmp_path_factory):
    """The small campaign stopped by max_iterations = 3: iterations 1 and 2 carve chunks that are labelled."""
    config = write_campaign(tmp_path_factory.mktemp("calibration") / "campaign", {"active": {"max_iterations": 3}})
    result = run_nft("run", config)
    assert result.returncode == 0, result.stderr
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    return config, summary


def _independent_calibration(config):
    """Per carving iteration, (errors, δ_i) at its chunk centres: the iteration's saved model on the
    whole target through the ASE calculator, against the stored central force of each chunk."""
    campaign = load_config(config)
    target = read(config.parent / "target.traj")
    with CampaignStore.open(campaign.database_url, campaign.name, create=False) as store:
        history = store.iterations()
        models = {record.iteration: record.path for record in store.models()}
        chunks = store.structures("chunk")  # in the order the iterations carved them
        labels = {}
        for chunk in chunks:
            [job] = [job for job in store.jobs(kind="chunk") if job.structure_id == chunk.id]
            if job.status == "done":
                labels[chunk.center_in_parent] = store.result(job.id).forces[chunk.center_in_chunk]
    per_iteration, start = {}, 0
    for record in history:
        carved = chunks[start : start + record.chunks_added]
        start += record.chunks_added
        if not carved:
            continue
        atoms = target.copy()
        atoms.calc = load_model(models[record.iteration])
        forces, delta = atoms.get_forces(), atoms.calc.results["uncertainties"]
        centres = [chunk.center_in_parent for chunk in carved if chunk.center_in_parent in labels]
        errors = np.array([np.linalg.norm(forces[c] - labels[c]) for c in centres])
        per_iteration[record.iteration] = (errors, delta[centres], len(carved))
    return per_iteration


def test_each_iteration_reports_the_error_and_coverage_of_its_chunk_centres(three_iterations):
    config, summary = three_iterations
    expected = _independent_calibration(config)
    assert len(expected) >= 2, "iterations 1 and 2 carved labelled chunks"
    status = campaign_status(load_config(config))
    assert status["calibration"] == summary["calibration"], "status and summary.json report the same"
    rows = {row["iteration"]: row for row in status["calibration"]["iterations"]}
    assert set(rows) == set(expected)
    all_errors, all_deltas = [], []
    for iteration, (errors, deltas, carved) in expected.items():
        row = rows[iteration]
        assert (row["predicted"], row["labelled"]) == (carved, len(errors))
        assert row["covered"] == int(np.sum(errors <= deltas))
        assert row["error_median"] == pytest.approx(np.median(errors), rel=1e-4, abs=1e-6)
        assert row["error_max"] == pytest.approx(errors.max(), rel=1e-4, abs=1e-6)
        assert row["delta_median"] == pytest.approx(np.median(deltas), rel=1e-4, abs=1e-6)
        all_errors.extend(errors)
        all_deltas.extend(deltas)
        assert row["interval"] == pytest.approx(wilson_interval(row["covered"], row["labelled"]))
    overall = status["calibration"]["overall"]
    assert overall["labelled"] == len(all_errors)
    assert overall["coverage"] == pytest.approx(np.mean(np.array(all_errors) <= np.array(all_deltas)))
    expected = status["calibration"]["expected_coverage"]
    assert expected == pytest.approx(expected_coverage(status["calibration"]["members"]))
    assert expected != pytest.approx(0.99, abs=0.005), "2.58σ on a 3-D error is not the 1-D 99 %"
    assert status["calibration"]["warning"] == coverage_warning(overall["covered"], overall["labelled"], expected)


def test_nft_status_prints_the_calibration_table_and_its_warning(three_iterations):
    config, _ = three_iterations
    report = campaign_status(load_config(config))
    buffer = io.StringIO()
    print_status(Console(file=buffer, width=200), report)
    text = buffer.getvalue()
    assert "calibration at the chunk centres" in text
    overall = report["calibration"]["overall"]
    assert f"{overall['covered']} ({overall['coverage']:.0%})" in text
    report["calibration"]["warning"] = coverage_warning(0, overall["labelled"], 0.978)  # as if δ had covered none
    buffer = io.StringIO()
    print_status(Console(file=buffer, width=400), report)
    assert "warning: δ is over-confident" in buffer.getvalue()


def test_the_binomial_tail_equals_a_direct_sum_and_the_warning_needs_significance():
    for trials, successes in product((1, 5, 12), range(0, 13)):
        if successes > trials:
            continue
        direct = sum(math.comb(trials, k) * 0.99**k * 0.01 ** (trials - k) for k in range(successes + 1))
        assert binomial_lower_tail(successes, trials, 0.99) == pytest.approx(direct, rel=1e-9, abs=1e-300)
    assert coverage_warning(40, 40, 0.99) is None and coverage_warning(0, 0, 0.99) is None
    assert coverage_warning(7, 8, 0.99) is None, "1 miss in 8 happens 7.7 % of the time at 99 %: not significant"
    warning = coverage_warning(30, 40, expected_coverage(4))
    assert warning is not None and "\n" not in warning and "30" in warning and "75.0%" in warning and "97.8%" in warning
    assert coverage_warning(995, 1000, 0.99) is None and coverage_warning(970, 1000, 0.99) is not None
    assert coverage_warning(970, 1000, 0.9) is None, "97 % is no warning where 90 % is expected"


def test_the_wilson_interval_equals_published_values_and_solves_its_defining_equation():
    """Newcombe (1998, Stat. Med. 17, 857), Table I, method 3 (score, no continuity correction); and
    2 of 2 centres covered reads (0.342, 1), not 100 %."""
    newcombe = {
        (81, 263): (0.2553, 0.3662),
        (15, 148): (0.0624, 0.1605),
        (0, 20): (0.0, 0.1611),
        (1, 29): (0.0061, 0.1718),
        (29, 29): (0.8830, 1.0),
    }
    for (successes, trials), published in newcombe.items():
        assert wilson_interval(successes, trials) == pytest.approx(published, abs=6e-5), (successes, trials)
    assert wilson_interval(2, 2) == pytest.approx((0.3424, 1.0), abs=1e-4)
    z = 1.959963984540054
    for successes, trials in ((3, 7), (29, 30), (81, 263), (500, 1000)):
        rate = successes / trials
        low, high = wilson_interval(successes, trials)
        assert low < rate < high
        for bound in (low, high):  # the score test's boundary: |p̂ − p| = z·sqrt(p(1 − p)/n)
            assert (rate - bound) ** 2 == pytest.approx(z * z * bound * (1 - bound) / trials, rel=1e-9)
    assert wilson_interval(8, 8)[0] > wilson_interval(2, 2)[0], "more centres, a narrower interval"
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


def test_the_expected_coverage_of_a_3d_error_equals_monte_carlo():
    """2.58σ covers 99 % of a 1-D Gaussian, 91.6 % of the norm of a 3-D one with per-component σ; δ_i's
    σ sums the three components' variances, and an ensemble of M members estimates it: drawn here
    with the campaign's own `atomic_uncertainty` and a parent that scatters as one more member."""
    rng = np.random.default_rng(0)
    samples = 400_000
    assert norm_within(2.58) == pytest.approx(0.91631, abs=1e-5)
    norms = np.linalg.norm(rng.normal(size=(samples, 3)), axis=1)
    for radius in (1.0, 2.58, 2.58 * math.sqrt(3.0)):
        assert norm_within(radius) == pytest.approx(np.mean(norms <= radius), abs=2e-3)
    assert math.erf(2.58 / math.sqrt(2.0)) == pytest.approx(0.99012, abs=1e-5), "the 1-D 99 % of the factor"
    assert expected_coverage(None) == pytest.approx(norm_within(2.58 * math.sqrt(3.0)))
    for members in (2, 4, 10):
        forces = rng.normal(size=(members + 1, samples // 4, 3))  # members, then the parent
        deltas = atomic_uncertainty(forces[:members])
        errors = np.linalg.norm(forces[members] - forces[:members].mean(axis=0), axis=1)
        simulated = float(np.mean(errors <= deltas))
        assert expected_coverage(members) == pytest.approx(simulated, abs=3e-3), members
    assert expected_coverage(4) == pytest.approx(0.97803, abs=1e-5)
    assert expected_coverage(2) < expected_coverage(4) < expected_coverage(10) < expected_coverage(None) < 1.0


def test_centres_without_a_label_yet_are_counted_as_predicted_only():
    predicted = [
        {"target": 1, "atom": 0, "delta": 0.5, "force": [0.0, 0.0, 0.0]},
        {"target": 1, "atom": 1, "delta": 0.1, "force": [0.0, 0.0, 0.0]},
        {"target": 1, "atom": 2, "delta": 0.1, "force": [0.0, 0.0, 0.0]},
    ]
    labels = {1: {0: np.array([0.3, 0.0, 0.4]), 1: np.array([0.0, 0.2, 0.0])}}  # atom 2 not computed yet
    result = calibration({1: {"calibration_predictions": predicted}, 2: {}}, labels, members=4)
    [row] = result["iterations"]
    assert (row["predicted"], row["labelled"], row["covered"]) == (3, 2, 1)  # |0.5| ≤ 0.5 covered, 0.2 > 0.1 not
    assert row["error_median"] == pytest.approx(0.35) and row["error_max"] == pytest.approx(0.5)
    assert row["interval"] == pytest.approx(wilson_interval(1, 2)) and row["interval"][1] - row["interval"][0] > 0.8
    assert (result["members"], result["expected_coverage"]) == (4, pytest.approx(0.97803, abs=1e-5))
