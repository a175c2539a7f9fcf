"""When a campaign stops (docs/campaign.md, "The loop", step 4), on histories written by hand."""

from datetime import datetime, timezone

import pytest

from pipeline.campaign.config import load_config
from pipeline.campaign.history import MeasuredIteration, history_with_measured, stop_reason, trains_from_scratch
from pipeline.storage.records import IterationRecord

pytestmark = pytest.mark.timeout(60)


def history(*rows):
    """IterationRecords from (max δ eV/Å, chunks added) pairs, iterations 1, 2, …"""
    now = datetime.now(timezone.utc)
    return [IterationRecord(k, {1: delta}, delta, chunks, 0.01, {}, now) for k, (delta, chunks) in enumerate(rows, start=1)]


@pytest.fixture
def config(small_campaign):
    def make(**model):
        changes = {"active": {"threshold": 0.1, "max_iterations": 10, "patience": 3}, "model": model}
        return load_config(small_campaign(changes))

    return make


def test_converged_max_iterations_and_patience(config):
    cold = config()
    assert stop_reason([], cold) is None
    assert stop_reason(history((0.5, 5), (0.09, 0)), cold) == "converged"
    assert stop_reason(history(*[(1.0 - 0.05 * k, 3) for k in range(10)]), cold) == "max_iterations"
    assert stop_reason(history((0.4, 5), (0.5, 5), (0.6, 5), (0.45, 5)), cold) == "patience"
    assert stop_reason(history((0.4, 5), (0.3, 5)), cold) is None


def test_nothing_new_to_compute_stops_unless_warm_training_still_helps(config):
    cold, warm = config(warm_start=False), config()  # warm start is the default
    still_falling = history((0.5, 5), (0.3, 0))
    assert stop_reason(still_falling, cold) == "no_new_chunks"  # retraining from scratch gives the same model
    assert stop_reason(still_falling, warm) is None  # continuing the optimisation lowered δ: go on
    assert stop_reason(history((0.5, 0)), warm) == "no_new_chunks"  # iteration 1 was trained from scratch


def test_a_warm_start_stuck_with_nothing_new_restarts_once_from_fresh_weights(config):
    """A warm-started iteration that found no new chunk and did not lower δ does not stop the campaign:
    the next iteration trains from fresh weights; only when that one does not lower δ either does it stop."""
    cold, warm = config(warm_start=False), config()
    stuck = history((0.5, 5), (0.3, 0), (0.31, 0))
    assert stop_reason(stuck, cold) == "no_new_chunks"
    assert stop_reason(stuck, warm) is None
    assert [trains_from_scratch(stuck, k) for k in (1, 2, 3, 4)] == [False, False, False, True]
    restart_no_better = history((0.5, 5), (0.3, 0), (0.31, 0), (0.32, 0))
    assert stop_reason(restart_no_better, warm) == "no_new_chunks"
    assert not trains_from_scratch(restart_no_better, 5)  # one restart per stall, not one per iteration
    restart_better = history((0.5, 5), (0.3, 0), (0.31, 0), (0.25, 0))
    assert stop_reason(restart_better, warm) is None  # the fresh fit lowered δ: warm again from it
    assert not trains_from_scratch(restart_better, 5)
    with_chunks = history((0.5, 5), (0.3, 4), (0.31, 3))
    assert not trains_from_scratch(with_chunks, 4)  # new chunks came in: the usual warm start


def test_an_iteration_measured_before_selection_is_judged_by_delta_alone(config):
    cold = config(warm_start=False)
    recorded = history((0.5, 5), (0.4, 0))
    measured = history_with_measured(recorded[:1], 2, 0.4)
    assert measured[-1] == MeasuredIteration(2, 0.4)
    assert stop_reason(recorded, cold) == "no_new_chunks"  # recorded: it carved nothing
    assert stop_reason(measured, cold) is None  # not yet selected: no chunk count to judge
    assert stop_reason(history_with_measured(recorded[:1], 2, 0.09), cold) == "converged"
    assert history_with_measured(recorded, 2, 0.3)[:-1] == recorded[:1]  # a re-measured iteration replaces its record


def test_an_iteration_that_stopped_before_selection_does_not_mean_nothing_is_left(small_campaign):
    """Stopped by max_iterations, the last iteration carved nothing; raising the limit goes on."""
    from dataclasses import replace

    stopped = history((1.0, 5), (0.8, 0))
    stopped[-1] = replace(stopped[-1], carved=False)
    two = load_config(small_campaign({"active": {"threshold": 0.1, "max_iterations": 2}, "model": {"warm_start": False}}))
    five = load_config(small_campaign({"active": {"threshold": 0.1, "max_iterations": 5}, "model": {"warm_start": False}}))
    assert stop_reason(stopped, two) == "max_iterations"
    assert stop_reason(stopped, five) is None
    stopped[-1] = replace(stopped[-1], carved=True)  # selection ran and found nothing: a real stop
    assert stop_reason(stopped, five) == "no_new_chunks"
