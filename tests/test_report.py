"""`nft report` on a small real campaign (EMT): report.md, the PNGs it links, its δ figures equal to
`nft status --json`, and a report that reads the database and model files only (no Parsl)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

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
