"""Why a campaign stalls (docs/campaign.md): per iteration, where δ lives (atoms with a chunk or
without), the model's error at the chunk centres, what selection skipped and why; and, for a campaign
that stopped without converging, whether it is a fit or a coverage problem and what to change.

Small real campaigns (local Parsl, SQLite, EMT); every reported number is recomputed here from the
database and the saved model of its iteration.
"""

import io
import json
import shutil

import numpy as np
import pytest
from ase.io import read
from rich.console import Console

from pipeline import load_model
from pipeline.campaign.config import load_config
from pipeline.campaign.history import delta_location, stall_diagnosis
from pipeline.execution.payloads import TargetPrediction
from pipeline.campaign.status import campaign_status
from pipeline.cli.cmd_campaign import print_status
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import rattled_cluster, run_nft, write_campaign

pytestmark = pytest.mark.timeout(240)

THRESHOLD = 1.2
TWO_ITERATIONS = {"active": {"threshold": THRESHOLD, "max_iterations": 2}}
CHEAP_TRAINING = {"epochs": 20, "optimizer": "lbfgs", "lbfgs_steps": 20}
SKIP_REASONS = ("already_chunked", "reference_failed", "too_close", "over_limit")


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    """The small campaign stopped by max_iterations = 2: (config path, summary, `nft run` stdout)."""
    config = write_campaign(tmp_path_factory.mktemp("stall") / "campaign", TWO_ITERATIONS)
    result = run_nft("run", config)
    assert result.returncode == 0, result.stderr
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    return config, summary, result.stdout


def _database(config):
    """Everything the checks need from the database: history, chunks, their jobs and results, models."""
    campaign = load_config(config)
    with CampaignStore.open(campaign.database_url, campaign.name, create=False) as store:
        history = store.iterations()
        chunks = store.structures("chunk")
        jobs = {job.structure_id: job for job in store.jobs(kind="chunk")}
        results = {job.id: store.result(job.id) for job in jobs.values() if job.status == "done"}
        models = {record.iteration: record.path for record in store.models()}
    return campaign, history, chunks, jobs, results, models


def _greedy(delta, positions, threshold, limit, separation, excluded):
    """Selection by brute force (non-periodic): (picked, too close, over the limit) among δ > threshold."""
    free, too_close = [], 0
    for index in np.argsort(-delta, kind="stable"):
        if delta[index] <= threshold or index in excluded:
            continue
        if any(np.linalg.norm(positions[index] - positions[other]) < separation for other in free):
            too_close += 1
        else:
            free.append(int(index))
    return free[:limit], too_close, max(0, len(free) - limit)


def test_each_iteration_says_where_delta_lives_as_the_saved_model_and_the_database_do(two_iterations):
    config, summary, _ = two_iterations
    campaign, history, chunks, jobs, results, models = _database(config)
    target = read(config.parent / "target.traj")
    chunk_settings = campaign.file.chunks
    assert summary["stop_reason"] == "max_iterations" and len(summary["history"]) == len(history) == 2
    carved_before = 0
    for entry, record in zip(summary["history"], history):
        atoms = target.copy()
        atoms.calc = load_model(models[record.iteration])
        forces = atoms.get_forces()
        delta = atoms.calc.results["uncertainties"]
        assert delta.max() == pytest.approx(entry["uncertainty"], rel=1e-6)
        # The model of iteration k is trained on the chunks carved before it (all of them done here).
        trained = chunks[:carved_before]
        assert all(jobs[chunk.id].status == "done" for chunk in trained)
        labels = {chunk.center_in_parent: results[jobs[chunk.id].id].forces[chunk.center_in_chunk] for chunk in trained}
        mask = np.zeros(len(atoms), dtype=bool)
        mask[list(labels)] = True
        assert entry["chunked_atoms"] == len(labels)
        assert entry["delta_unchunked_max"] == pytest.approx(delta[~mask].max(), rel=1e-6)
        if labels:
            errors = [np.linalg.norm(forces[centre] - label) for centre, label in labels.items()]
            assert entry["delta_chunked_max"] == pytest.approx(delta[mask].max(), rel=1e-6)
            assert entry["chunk_force_error_max"] == pytest.approx(max(errors), rel=1e-5, abs=1e-8)
            assert entry["chunk_force_error_median"] == pytest.approx(float(np.median(errors)), rel=1e-5, abs=1e-8)
        else:
            assert entry["delta_chunked_max"] is None
            assert entry["chunk_force_error_max"] is None and entry["chunk_force_error_median"] is None
        # Selection: the same picks and skip counts as a brute-force greedy pass over δ > threshold.
        picked, too_close, over_limit = _greedy(
            delta, atoms.positions, THRESHOLD, chunk_settings.max_per_iteration, chunk_settings.min_separation, set(labels)
        )
        selection = entry["selection"]
        assert selection == {
            "selectable": int(np.sum(delta > THRESHOLD)),
            "selected": len(picked),
            "already_chunked": int(np.sum(delta[mask] > THRESHOLD)),
            "reference_failed": 0,
            "too_close": too_close,
            "over_limit": over_limit,
            "carved": record.iteration < 2,
        }
        assert selection["selected"] + sum(selection[key] for key in SKIP_REASONS) == selection["selectable"]
        carved = [chunk.center_in_parent for chunk in chunks[carved_before : carved_before + record.chunks_added]]
        assert carved == (picked if selection["carved"] else [])
        carved_before += record.chunks_added
    assert carved_before == len(chunks) > 0


def test_a_stopped_campaign_says_whether_fit_or_coverage_and_what_to_change(two_iterations):
    config, summary, stdout = two_iterations
    last = summary["history"][-1]
    chunked, unchunked = last["delta_chunked_max"], last["delta_unchunked_max"]
    expected = "fit" if chunked is not None and chunked >= THRESHOLD and chunked >= unchunked else "coverage"
    stall = summary["stall"]
    assert stall["kind"] == expected and stall["iteration"] == 2
    if expected == "fit":
        assert "model.lbfgs_steps" in stall["advice"] and "model.descriptor" in stall["advice"]
    else:
        assert "active.max_iterations" in stall["settings"] and "raise active.max_iterations" in stall["advice"].lower()
        if last["selection"]["over_limit"]:
            assert stall["settings"][0] == "chunks.max_per_iteration"
            assert f"{last['selection']['over_limit']} beyond chunks.max_per_iteration" in stall["advice"]
    assert f"not converged (max_iterations): a {expected} problem. {stall['advice']}" in " ".join(stdout.split())

    status = json.loads(run_nft("status", config, "--json").stdout)
    assert status["stall"] == stall
    keys = ("chunked_atoms", "delta_chunked_max", "delta_unchunked_max", "chunk_force_error_max", "chunk_force_error_median", "selection")
    assert [{key: entry[key] for key in keys} for entry in status["history"]] == [
        {key: entry[key] for key in keys} for entry in summary["history"]
    ]
    table = run_nft("status", config)
    assert table.returncode == 0, table.stderr
    assert f"stalled: a {expected} problem" in table.stdout and "where δ lives" in table.stdout


def test_a_campaign_stopped_after_one_iteration_is_a_coverage_problem(small_campaign):
    config = small_campaign({"active": {"max_iterations": 1}, "model": CHEAP_TRAINING})
    result = run_nft("run", config)
    assert result.returncode == 0, result.stderr
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "max_iterations" and summary["chunks"] == 0
    (entry,) = summary["history"]
    assert entry["chunked_atoms"] == 0 and entry["delta_chunked_max"] is None
    assert entry["delta_unchunked_max"] == pytest.approx(entry["uncertainty"])
    assert entry["selection"]["carved"] is False and entry["selection"]["selected"] > 0
    stall = summary["stall"]
    assert stall["kind"] == "coverage" and "raise active.max_iterations" in stall["advice"].lower()
    assert "a coverage problem" in result.stdout
    status = json.loads(run_nft("status", config, "--json").stdout)
    assert status["stall"] == stall and status["history"][0]["selection"] == entry["selection"]


def test_atoms_whose_chunk_failed_are_counted_apart(small_campaign):
    """The centre atom of the target pushed to 1.4 Å of a neighbour (EMT's forces there exceed the
    parent's max_force): every chunk containing the pair fails as an invalid result."""
    from tests.test_campaign import squeeze_to_neighbour

    target = rattled_cluster()
    squeeze_to_neighbour(target, 0, 1.4)
    threshold = 0.05
    config = small_campaign(
        {
            "active": {"threshold": threshold, "max_iterations": 2},
            "chunks": {"max_per_iteration": 6, "min_separation": 2.0},
            "model": CHEAP_TRAINING,
        },
        target=target,
    )
    result = run_nft("run", config)
    assert result.returncode == 0, result.stderr
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    _, history, chunks, jobs, _, models = _database(config)
    failed = {chunk.center_in_parent for chunk in chunks if jobs[chunk.id].status == "failed"}
    done = {chunk.center_in_parent for chunk in chunks if jobs[chunk.id].status == "done"}
    assert failed and len(history) == 2
    atoms = target.copy()
    atoms.calc = load_model(models[2])
    atoms.get_forces()
    delta = atoms.calc.results["uncertainties"]
    selection = summary["history"][1]["selection"]
    assert selection["reference_failed"] == sum(delta[index] > threshold for index in failed)
    assert selection["already_chunked"] == sum(delta[index] > threshold for index in done)
    assert summary["history"][1]["chunked_atoms"] == len(done)
    if selection["reference_failed"] and summary["stall"]["kind"] == "coverage":
        assert "reference job failed" in summary["stall"]["advice"]


def test_a_database_from_before_the_diagnostics_reports_them_as_null(two_iterations, tmp_path):
    config, summary, _ = two_iterations
    copy = tmp_path / "old"
    shutil.copytree(config.parent, copy)
    campaign = load_config(copy / "config.toml")
    with CampaignStore.open(campaign.database_url, campaign.name, create=False) as store:
        for record in store.models():
            old = {key: value for key, value in record.metrics.items() if key not in ("delta_location", "selection")}
            store.record_model(record.iteration, record.path, old)
    report = campaign_status(campaign)  # what `nft status --json` prints (in-process: one CLI start less)
    assert report["stall"] is None and report["stop_reason"] == "max_iterations"
    for entry in report["history"]:
        assert entry["selection"] is None and entry["delta_chunked_max"] is None and entry["chunked_atoms"] is None
    table = io.StringIO()
    print_status(Console(file=table, width=100), report)
    assert "where δ lives" in table.getvalue() and "stalled" not in table.getvalue()
    again = run_nft("run", copy / "config.toml")  # finished: only rewrites summary.json
    assert again.returncode == 0, again.stderr
    rewritten = json.loads((copy / "run" / "summary.json").read_text())
    assert rewritten["stall"] is None and rewritten["history"][0]["delta_unchunked_max"] is None


def _config(small_campaign, **active):
    return load_config(small_campaign({"active": {"threshold": 0.1, "max_iterations": 5, **active}}))


def test_the_fit_or_coverage_rule_on_hand_made_entries(small_campaign):
    config = _config(small_campaign)
    selection = {
        "selectable": 9,
        "selected": 2,
        "already_chunked": 1,
        "reference_failed": 1,
        "too_close": 2,
        "over_limit": 3,
        "carved": True,
    }

    def entry(chunked, unchunked):
        return {
            "iteration": 4,
            "delta_chunked_max": chunked,
            "delta_unchunked_max": unchunked,
            "chunk_force_error_max": 0.2,
            "chunk_force_error_median": 0.05,
            "selection": selection,
        }

    fit = stall_diagnosis(entry(0.5, 0.3), "patience", config)
    assert fit["kind"] == "fit" and fit["settings"] == ["model.lbfgs_steps", "model.descriptor"]
    assert "0.2 max, 0.05 median" in fit["advice"]
    lm_config = load_config(
        small_campaign({"active": {"threshold": 0.1, "max_iterations": 5}, "model": {"optimizer": "levenberg-marquardt"}})
    )
    lm_fit = stall_diagnosis(entry(0.5, 0.3), "patience", lm_config)
    assert lm_fit["settings"] == ["model.lm_steps", "model.descriptor"] and "model.lm_steps" in lm_fit["advice"]
    assert stall_diagnosis(entry(0.5, 0.5), "patience", config)["kind"] == "fit"  # ties: fit
    coverage = stall_diagnosis(entry(0.3, 0.5), "max_iterations", config)
    assert coverage["kind"] == "coverage"
    assert coverage["settings"] == ["chunks.max_per_iteration", "chunks.min_separation", "active.max_iterations"]
    for part in ("3 beyond chunks.max_per_iteration", "2 closer than chunks.min_separation", "1 whose chunk's reference job failed"):
        assert part in coverage["advice"]
    assert stall_diagnosis(entry(0.05, 0.5), "patience", config)["settings"] == [
        "chunks.max_per_iteration",
        "chunks.min_separation",
        "active.patience",
        "active.max_iterations",
    ]
    assert stall_diagnosis(entry(None, 0.5), "no_new_chunks", config)["kind"] == "coverage"
    assert stall_diagnosis(entry(0.05, 0.09), "converged", config) is None
    assert stall_diagnosis(entry(0.5, 0.3), None, config) is None
    assert stall_diagnosis(entry(None, None), "max_iterations", config) is None  # an older database
    by_fraction = load_config(small_campaign({"active": {"threshold": 0.1, "select_fraction": 0.2}}))
    assert "active.select_fraction" in stall_diagnosis(entry(0.05, 0.5), "no_new_chunks", by_fraction)["settings"]


def test_delta_location_on_hand_made_numbers():
    predictions = [
        TargetPrediction(0.0, [[0, 0, 0], [1, 0, 0], [0, 0, 2]], [0.1, 0.7, 0.3], energy_uncertainties=[0.0] * 3),
        TargetPrediction(0.0, [[0, 0, 0], [0, 3, 0]], [0.9, 0.2], energy_uncertainties=[0.0] * 2),
    ]
    labels = [{1: np.array([1.0, 0.0, 0.0]), 2: np.array([0.0, 0.0, 1.0])}, {1: np.array([0.0, 0.0, 4.0])}]
    # chunked: δ 0.7, 0.3, 0.2; errors |0|, |(0,0,1)| = 1, |(0,3,-4)| = 5; unchunked: δ 0.1, 0.9
    assert delta_location(predictions, labels) == {
        "chunked_atoms": 3,
        "delta_chunked_max": 0.7,
        "delta_unchunked_max": 0.9,
        "chunk_force_error_max": 5.0,
        "chunk_force_error_median": 1.0,
    }
    assert delta_location(predictions[:1], [{}]) == {
        "chunked_atoms": 0,
        "delta_chunked_max": None,
        "delta_unchunked_max": 0.7,
        "chunk_force_error_max": None,
        "chunk_force_error_median": None,
    }
