"""`nft report` on a small real campaign (EMT): report.md, the PNGs it links, its δ figures equal to
`nft status --json`, and a report that reads the database and model files only (no Parsl); figures
that do not overstate: coverage with n and Wilson intervals against the 3-D expectation, training
rows labelled as such beside the target's error against the parent, one axis for chunk counts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.plugins.campaign_fixtures import REPO_ROOT, run_nft, write_campaign

pytestmark = pytest.mark.timeout(240)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_FIGURE_BYTES = 10_000
"""A figure with axes, labels and data is tens of kB; an empty canvas is a few."""
EXPECTED_FIGURES = {
    "delta_per_iteration.png",
    "chunks_per_iteration.png",
    "force_parity.png",
    "residual_vs_delta.png",
    "target_delta.png",
    "calibration_per_iteration.png",
}


@pytest.fixture(scope="module")
def finished_campaign(tmp_path_factory) -> Path:
    """A campaign of two iterations (the second has chunks, so δ at atoms with a chunk is recorded)."""
    config = write_campaign(tmp_path_factory.mktemp("report") / "campaign", {"active": {"max_iterations": 2}})
    result = run_nft("run", config)
    assert result.returncode == 0, result.stderr
    return config


@pytest.fixture(scope="module")
def default_report(finished_campaign) -> Path:
    """`nft report CONFIG` into its default folder, WORKDIR/report."""
    result = run_nft("report", finished_campaign, timeout=120)
    assert result.returncode == 0, result.stderr
    return finished_campaign.parent / "run" / "report"


def test_report_md_links_every_figure_and_each_is_a_real_png(default_report):
    text = (default_report / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(linked) == EXPECTED_FIGURES
    for name in linked:
        data = (default_report / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > MIN_FIGURE_BYTES, f"{name}: {len(data)} bytes"
    assert sorted(path.name for path in default_report.iterdir()) == sorted(EXPECTED_FIGURES | {"report.md"})
    assert "No locality test of this campaign's parent is recorded" in text and "## Relaxation" not in text  # neither ran here


def test_the_report_draws_the_locality_curve_that_nft_locality_config_recorded(finished_campaign, tmp_path):
    """`nft locality --config` leaves WORKDIR/locality.json (what --json prints); the report draws it."""
    from ase.io import read, write

    target = read(finished_campaign.parent / "target.traj")
    write(tmp_path / "target.traj", target)
    locality = run_nft(
        "locality", tmp_path / "target.traj", "--config", finished_campaign, "--radii", "3,4", "--atoms", "2", "--json", timeout=180
    )
    assert locality.returncode == 0, locality.stderr
    recorded = json.loads((finished_campaign.parent / "run" / "locality.json").read_text())
    assert recorded == json.loads(locality.stdout)
    out = tmp_path / "report"
    result = run_nft("report", finished_campaign, "-o", out, timeout=120)
    assert result.returncode == 0, result.stderr
    data = (out / "locality.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > MIN_FIGURE_BYTES
    text = (out / "report.md").read_text()
    assert "## Locality of the parent" in text and "![Locality of the parent](locality.png)" in text
    assert "No locality test" not in text
    (finished_campaign.parent / "run" / "locality.json").unlink()  # the module's other tests expect none


def test_report_delta_figures_equal_the_database(finished_campaign, default_report):
    status = json.loads(run_nft("status", finished_campaign, "--json", timeout=60).stdout)
    text = (default_report / "report.md").read_text()

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = re.findall(r"^\| (\d+) \| (\S+) \| (\S+) \| (\S+) \| (\d+) \| (\S+) \|$", text, flags=re.MULTILINE)
    assert len(rows) == status["iterations"] == 2
    for row, entry in zip(rows, status["history"]):
        assert row == (
            str(entry["iteration"]),
            cell(entry["uncertainty"]),
            cell(entry["delta_chunked_max"]),
            cell(entry["delta_unchunked_max"]),
            str(entry["chunks_added"]),
            cell(entry["train_force_mae"]),
        )
    assert rows[1][2] != "-"  # the second iteration has chunks: δ there is recorded and reported
    assert f"| final δ (eV/Å) | {cell(status['latest_uncertainty'])} |" in text
    assert f"| best δ (eV/Å) | {cell(status['best_uncertainty'])} (iteration {status['best_iteration']}) |" in text
    assert f"| threshold (eV/Å) | {status['threshold']:g} |" in text
    assert f"| chunks | {status['chunks']} |" in text
    assert f"| stop reason | {status['stop_reason']} |" in text


def test_report_into_another_folder_needs_no_parsl(finished_campaign, tmp_path):
    """The kept model's δ on the target equals the recorded best δ; nothing imports Parsl."""
    output = tmp_path / "elsewhere"
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from pipeline.campaign.config import load_config\n"
        "from pipeline.campaign.report import campaign_report\n"
        "from pipeline.cli.report_figures import write_report\n"
        f"report = campaign_report(load_config({str(finished_campaign)!r}))\n"
        f"Path({str(output)!r}).mkdir()\n"
        f"written = write_report(report, Path({str(output)!r}))\n"
        "print(json.dumps({'parsl': 'parsl' in sys.modules, 'written': [p.name for p in written],\n"
        "  'kept_delta': max(float(t.kept.max()) for t in report.targets), 'best': report.status['best_uncertainty'],\n"
        "  'chunk_rows': int(report.labelled.is_chunk_centre.sum()), 'chunks': report.status['chunks']}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["parsl"] is False
    assert set(facts["written"]) == EXPECTED_FIGURES | {"report.md"}
    assert facts["kept_delta"] == pytest.approx(facts["best"], rel=1e-5)
    assert facts["chunk_rows"] == facts["chunks"]


def test_a_report_without_model_files_keeps_the_history_and_says_why(finished_campaign, tmp_path):
    """Model figures need the stored models: without them report.md has the history and calibration
    figures (from the database alone) and a line saying what is left out; several targets get a
    figure each."""
    from pipeline.campaign.config import load_config
    from pipeline.campaign.report import CampaignReport, TargetDeltas, campaign_report
    from pipeline.cli.report_figures import write_report

    full = campaign_report(load_config(finished_campaign))
    without_models = CampaignReport(full.status, 1, 2, None, None, [], "model file models/iteration-001.nft is missing")
    written = write_report(without_models, tmp_path)
    assert [path.name for path in written] == [
        "delta_per_iteration.png",
        "chunks_per_iteration.png",
        "calibration_per_iteration.png",
        "report.md",
    ]
    assert "left out: model file models/iteration-001.nft is missing" in (tmp_path / "report.md").read_text()

    target = full.targets[0]
    swapped = TargetDeltas(target.atoms, first=target.kept, kept=target.first)
    two_targets = CampaignReport(full.status, 1, 2, full.kept_model, full.labelled, [target, swapped])
    (tmp_path / "two").mkdir()
    names = [path.name for path in write_report(two_targets, tmp_path / "two")]
    assert "target_0_delta.png" in names and "target_1_delta.png" in names and "target_delta.png" not in names


def test_the_calibration_shows_n_and_a_wilson_interval_per_bar_against_the_3d_expectation(finished_campaign, default_report):
    from pipeline.campaign.calibration import expected_coverage, wilson_interval
    from pipeline.cli.report_figures import calibration_figure, coverage_bars

    status = json.loads(run_nft("status", finished_campaign, "--json", timeout=60).stdout)
    calibration = status["calibration"]
    assert calibration["members"] in (None, 4), "σ taken as exact, or the campaign's ensemble of 4"
    assert calibration["expected_coverage"] == pytest.approx(expected_coverage(calibration["members"]))
    assert abs(calibration["expected_coverage"] - 0.99) > 0.005, "not the one-dimensional 99 %"
    bars = coverage_bars(calibration)
    assert bars and all(bar.labelled > 0 for bar in bars)
    for bar in bars:
        assert (bar.low, bar.high) == pytest.approx(wilson_interval(bar.covered, bar.labelled))
        assert bar.low < bar.coverage or bar.covered == 0
    assert bars[0].high - bars[0].low > 0.1, "a handful of centres cannot pin the coverage down"

    axes = calibration_figure(calibration, "test").axes[0]
    [errorbars] = [container for container in axes.containers if type(container).__name__ == "ErrorbarContainer"]
    segments = np.array([segment for collection in errorbars.lines[2] for segment in collection.get_segments()])
    assert segments[:, :, 1] == pytest.approx(np.array([(100 * bar.low, 100 * bar.high) for bar in bars]))
    texts = [text.get_text() for text in axes.texts]
    assert all(f"n = {bar.labelled}" in text for bar, text in zip(bars, texts))
    [expected_line] = [line for line in axes.lines if "expected" in str(line.get_label())]
    assert np.asarray(expected_line.get_ydata()) == pytest.approx(100 * calibration["expected_coverage"])
    assert "not a random sample" in axes.get_title()

    text = (default_report / "report.md").read_text()
    overall = calibration["overall"]
    low, high = overall["interval"]
    assert (
        f"| all | {overall['labelled']} | {overall['covered']} ({100 * overall['coverage']:.0f}%) | {100 * low:.0f}–{100 * high:.0f}% |"
        in text
    )
    assert f"expected {100 * calibration['expected_coverage']:.2f}%" in text and "not a random sample" in text
    assert "promises 99%" not in text


def test_report_md_gives_the_targets_error_against_the_parent_and_labels_training_rows(finished_campaign, default_report):
    from pipeline.campaign.config import load_config
    from pipeline.campaign.report import campaign_report, carved_after
    from pipeline.campaign.status import open_existing_store

    summary = json.loads((finished_campaign.parent / "run" / "summary.json").read_text())
    text = (default_report / "report.md").read_text()
    [(name, mae)] = summary["force_mae_vs_parent"].items()
    assert summary["best_iteration"] == 2
    assert f"| force MAE vs EMT, {name}, every atom (eV/Å; kept model, summary.json) | {mae:.4f} |" in text
    assert "## Force parity (training rows)" in text and "its training data" in text
    assert f"Held out: {name}, every atom, kept model vs EMT: force MAE {mae:.4f} eV/Å." in text
    assert "## Residual against δ (training rows)" in text

    config = load_config(finished_campaign)
    report = campaign_report(config)
    assert report.held_out is not None and report.held_out.target_mae == pytest.approx(summary["force_mae_vs_parent"])
    assert report.labelled is not None and report.labelled.trained.all(), "the kept model (2) trained on the chunks 1 carved"
    with open_existing_store(config) as store:
        models, chunks = store.models(), store.structures("chunk")
    assert carved_after(models, 1) == {(chunk.parent_id, chunk.center_in_parent) for chunk in chunks}
    assert carved_after(models, 2) == set(), "the last iteration carves nothing"


def test_the_chunks_figure_has_one_count_axis(finished_campaign):
    from pipeline.cli.report_figures import chunks_figure

    history = json.loads(run_nft("status", finished_campaign, "--json", timeout=60).stdout)["history"]
    figure = chunks_figure(history, "test")
    [axes] = figure.axes
    earlier, added = axes.containers
    added_counts = [entry["chunks_added"] for entry in history]
    assert [patch.get_height() for patch in added] == added_counts
    totals = [patch.get_y() + patch.get_height() for patch in added]
    assert totals == list(np.cumsum(added_counts))
    assert [patch.get_height() for patch in earlier] == [total - count for total, count in zip(totals, added_counts)]
    assert axes.get_ylabel() == "chunks"
