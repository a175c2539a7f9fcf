"""The campaign log (WORKDIR/nft.log), the metrics (WORKDIR/metrics.csv) and progress inside
training, with real parts: EMT, a local Parsl executor, SQLite, `nft` in a subprocess without a TTY.

A campaign runs one iteration and stops (max_iterations = 1), then is resumed with two: the log
must hold both runs, the second appended, and name every reference job, every training with its
steps and losses, and every decision; metrics.csv must have one row per iteration of summary.json.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import time
from datetime import datetime

import pytest
import torch
from ase.io import write

from pipeline.campaign.config import load_config
from pipeline.campaign.campaign_log import METRICS_COLUMNS
from pipeline.execution.training_progress import ProgressReader, ProgressWriter, progress_record
from pipeline.science.examples import bulk_training_cells, emt_label
from pipeline.science.optimisers import TrainingProgress
from pipeline.science.settings import TrainingSettings
from pipeline.science.structures import LabelledStructure
from pipeline.science.training import train_ensemble
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import NFT, REPO_ROOT, run_nft, toml_text, merged, SMALL_CAMPAIGN, write_campaign

pytestmark = pytest.mark.timeout(300)

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d) (INFO|WARNING|ERROR) (.+)$")


@pytest.fixture(scope="module")
def resumed_campaign(tmp_path_factory):
    """A campaign run for one iteration, then resumed for a second: (config, first log, first
    summary, log, summary, stdout of the second run)."""
    config = write_campaign(tmp_path_factory.mktemp("logged") / "campaign", {"active": {"max_iterations": 1}})
    workdir = config.parent / "run"
    first = run_nft("run", config)
    assert first.returncode == 0, first.stderr
    first_log = (workdir / "nft.log").read_text()
    first_summary = json.loads((workdir / "summary.json").read_text())
    config.write_text(toml_text(merged(SMALL_CAMPAIGN, {"active": {"max_iterations": 2}})))
    (workdir / "metrics.csv").unlink()  # rebuilt from the database by the resumed run
    second = run_nft("run", config)
    assert second.returncode == 0, second.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    return config, first_log, first_summary, (workdir / "nft.log").read_text(), summary, second.stdout


def log_messages(text: str) -> list[str]:
    """The messages of a log, every line checked to be one timestamped record, in time order."""
    messages, times = [], []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        assert match, f"not a log line: {line!r}"
        times.append(datetime.fromisoformat(match.group(1)))
        messages.append(match.group(3))
    assert times == sorted(times)
    return messages


def test_a_resumed_run_appends_to_the_log(resumed_campaign):
    config, first_log, first_summary, log, summary, _ = resumed_campaign
    assert first_summary["iterations"] == 1 and summary["iterations"] == 2
    assert log.startswith(first_log) and len(log) > len(first_log)
    headings = [message for message in log_messages(log) if message.startswith("nft run: campaign pt55-test")]
    assert len(headings) == 2 and all(str(config) in heading for heading in headings)
    assert "resuming: 1 iteration(s) recorded" in log[len(first_log) :]


def test_the_log_names_every_reference_job_with_its_seconds(resumed_campaign):
    config, _, _, log, _, _ = resumed_campaign
    campaign = load_config(config)
    with CampaignStore.open(campaign.database_url, campaign.name, create=False) as store:
        jobs = store.jobs()
    assert jobs and all(job.status == "done" for job in jobs)
    messages = log_messages(log)
    computed = [job for job in jobs if job.host != "input file"]  # the initial set is labelled in its file
    assert computed, "the resumed run carves chunks: their jobs run"
    for job in computed:
        assert any(
            re.fullmatch(rf"reference job {job.id}: submitted: chunk structure \d+ \(\d+ atom\(s\)\), parent emt, attempt 1", m)
            for m in messages
        )
        assert any(re.fullmatch(rf"reference job {job.id}: done after \d+\.\d s", m) for m in messages)


def test_the_log_holds_every_training_with_its_steps_and_losses(resumed_campaign):
    _, _, _, log, summary, _ = resumed_campaign
    messages = log_messages(log)
    seeds = TrainingSettings.model_validate(SMALL_CAMPAIGN["model"]).seeds()
    for entry in summary["history"]:
        n = entry["iteration"]
        assert any(m.startswith(f"iteration {n}: training 4 member(s) on ") for m in messages)
        stages = [m for m in messages if re.match(rf"iteration {n}: training: (adam|lbfgs) done after \d+ step\(s\): loss ", m)]
        assert stages and stages[-1].startswith(f"iteration {n}: training: lbfgs done after ")  # at most lbfgs_steps = 300
        by_seed = stages[-1].split("by seed: ")[1].split(", ")
        assert [int(item.split()[0]) for item in by_seed] == list(seeds)
        assert all(float(item.split()[1]) >= 0 for item in by_seed)
        assert any(re.match(rf"iteration {n}: trained in \d+\.\d s \(cpu, world size 1\): ", m) for m in messages)
        assert f"iteration {n} done: max δ {entry['uncertainty']:.4f} eV/Å, {entry['chunks_added']} chunk(s) added" in log
    first_training = next(m for m in messages if m.startswith("iteration 1: training: "))
    assert first_training.startswith("iteration 1: training: adam step 1/100: loss ")  # progress while Adam runs, not only at its end


def test_the_log_holds_every_decision(resumed_campaign):
    _, first_log, first_summary, log, summary, _ = resumed_campaign
    assert first_summary["stop_reason"] == summary["stop_reason"] == "max_iterations"
    first = log_messages(first_log)
    assert any(m.startswith("iteration 1: the campaign stops: max_iterations (max δ ") for m in first)
    resumed = log_messages(log[len(first_log) :])
    carved = {entry["iteration"]: entry["chunks_added"] for entry in summary["history"]}
    assert carved[1] > 0
    assert any(m.startswith(f"iteration 1: selection: {carved[1]} chunk(s) carved (selectable ") for m in resumed)
    assert any(m.startswith("iteration 2: the campaign stops: max_iterations") for m in resumed)
    assert any(re.match(r"iteration \d: fit underdetermined: ", m) for m in first)  # Pt with 6 cells: the ridge holds
    verdict = [m for m in resumed if m.startswith("campaign pt55-test: ")]
    assert verdict == [
        f"campaign pt55-test: not converged (max_iterations) after 2 iteration(s); best δ {summary['final_uncertainty']:.4f} eV/Å "
        f"(threshold 1.2) at iteration {summary['best_iteration']}; {summary['chunks']} chunk(s); model {summary['model']}"
    ]


def test_metrics_csv_has_one_row_per_iteration_of_summary_json(resumed_campaign):
    config, _, _, _, summary, _ = resumed_campaign
    with open(config.parent / "run" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
        assert tuple(rows[0]) == METRICS_COLUMNS
    assert [int(row["iteration"]) for row in rows] == [entry["iteration"] for entry in summary["history"]] == [1, 2]
    chunks = 0
    for row, entry in zip(rows, summary["history"]):
        chunks += entry["chunks_added"]
        assert float(row["max_delta_eV_per_A"]) == entry["uncertainty"]
        assert float(row["train_force_mae_eV_per_A"]) == entry["train_force_mae"]
        assert int(row["chunks_added"]) == entry["chunks_added"] and int(row["chunks_total"]) == chunks
        for part in ("training", "prediction", "reference", "total"):
            assert float(row[f"{part}_s"]) == entry["wall_time"][part]
        assert int(row["epochs_run"]) >= 0 and float(row["final_loss"]) > 0
    assert chunks == summary["chunks"]
    assert rows[1]["warm_started"] == "true"


def test_nft_run_without_a_tty_shows_progress_inside_training(resumed_campaign):
    *_, stdout = resumed_campaign
    lines = stdout.splitlines()
    progress = [
        line
        for line in lines
        if re.match(r"\[ *\d+\.\ds\] iteration 2: training: lbfgs (step \d+/300|done after \d+ step\(s\)): loss ", line)
    ]
    assert progress, stdout
    done = lines.index(next(line for line in lines if "iteration 2: training: lbfgs done after" in line))
    assert "iteration 2: prediction" in "\n".join(lines[done:])  # shown while training, before the iteration goes on


def test_nft_train_without_a_tty_prints_progress_before_the_end(tmp_path):
    data = tmp_path / "train.extxyz"
    write(data, [emt_label(cell) for cell in bulk_training_cells(6, seed=1)])
    command = NFT + ["train", str(data), "-o", str(tmp_path / "m.nft"), "--ensemble", "3", "--epochs", "60"]
    command += ["--optimizer", "lbfgs", "--lbfgs-steps", "150"]
    started = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT) as process:
        assert process.stderr is not None
        first = process.stderr.readline()
        running_at_first_line = process.poll() is None
        rest, stdout = process.stderr.read(), process.stdout.read() if process.stdout else ""
        process.wait(timeout=240)
    assert process.returncode == 0, first + rest
    assert running_at_first_line, f"the first progress line came only at the end ({time.perf_counter() - started:.1f} s)"
    assert re.fullmatch(r"\[ *\d+\.\ds\] training: adam step 1/60: loss \S+ over 3 member\(s\) \(\S+ to \S+\)\n", first)
    lines = (first + rest).splitlines()
    for stage, steps in (("adam", 60), ("lbfgs", 150)):
        done = [line for line in lines if f"training: {stage} done after {steps} step(s)" in line]
        assert len(done) == 1 and "by seed: 0 " in done[0], lines
    assert "trained 3 members on 6 structures" in stdout


# ---------------------------------------------------------------------------------------------
# The parts: the science's reports, and the file that carries them from a worker to the driver.


def training_data() -> list[LabelledStructure]:
    cells = [emt_label(cell) for cell in bulk_training_cells(4, seed=2)]
    return [LabelledStructure(atoms, atoms.get_potential_energy(), atoms.get_forces()) for atoms in cells]


@pytest.mark.parametrize(
    "settings, second",
    [
        (TrainingSettings(ensemble=3, epochs=12, optimizer="lbfgs", lbfgs_steps=9, device="cpu"), "lbfgs"),
        (TrainingSettings(ensemble=3, epochs=0, optimizer="levenberg-marquardt", lm_steps=4, device="cpu"), "levenberg-marquardt"),
    ],
)
def test_training_reports_every_step_of_every_stage_and_is_unchanged_by_it(settings, second):
    reports: list[TrainingProgress] = []
    watched, _ = train_ensemble(training_data(), settings, progress=reports.append)
    unwatched, _ = train_ensemble(training_data(), settings)
    for name, tensor in watched.state_dict().items():
        assert torch.equal(tensor, unwatched.state_dict()[name]), name
    stages = [report.stage for report in reports if report.done]
    assert stages == (["adam", second] if settings.epochs else [second])
    for stage in stages:
        steps = [report for report in reports if report.stage == stage and not report.done]
        assert [report.step for report in steps] == list(range(1, len(steps) + 1))
        assert 1 <= len(steps) <= steps[0].steps
        final = next(report for report in reports if report.stage == stage and report.done)
        assert final.step == steps[-1].step and torch.equal(final.losses, steps[-1].losses)
    assert all(report.seeds == tuple(settings.seeds()) and report.losses.shape == (3,) for report in reports)
    assert all(not report.refit for report in reports)


def report(step: int, done: bool = False) -> TrainingProgress:
    return TrainingProgress("lbfgs", step, 10, torch.tensor([0.5, 0.25]), (7, 8), done=done)


def test_a_worker_writes_progress_now_and_then_and_every_stage_end(tmp_path):
    path = tmp_path / "models" / "iteration-001.progress.jsonl"
    writer, reader = ProgressWriter(path, interval_s=3600.0), ProgressReader(path)
    assert reader.new_reports() == []  # no file yet
    for step in range(1, 6):
        writer(report(step))
    writer(report(5, done=True))
    seen = reader.new_reports()
    assert [(item.step, item.done) for item in seen] == [(1, False), (5, True)]
    assert seen[1].losses.tolist() == [0.5, 0.25] and seen[1].seeds == (7, 8)
    assert reader.new_reports() == []  # each report once


def test_the_driver_reads_whole_lines_only_and_starts_afresh_on_a_resubmission(tmp_path):
    path = tmp_path / "p.jsonl"
    reader = ProgressReader(path)
    line = json.dumps(progress_record(report(3)))
    path.write_text(line[:20])  # a worker in the middle of a write
    assert reader.new_reports() == []
    with open(path, "a") as file:
        file.write(line[20:] + "\n")
    assert [item.step for item in reader.new_reports()] == [3]
    reader.restart()
    assert not path.exists()
    ProgressWriter(path)(report(1))
    assert [item.step for item in reader.new_reports()] == [1]


def test_a_distributed_training_reports_its_first_ranks_members(tmp_path):
    from pipeline.execution.distributed_training import member_shards, train_distributed
    from pipeline.execution.payloads import labelled_to_payload

    settings = TrainingSettings(ensemble=4, epochs=15, optimizer="lbfgs", lbfgs_steps=5, seed=3, device="cpu")
    progress = tmp_path / "ddp.progress.jsonl"
    payloads = [labelled_to_payload(item) for item in training_data()]
    train_distributed(payloads, settings, tmp_path / "ddp.nft", world_size=2, backend="gloo", progress_path=progress)
    reports = ProgressReader(progress).new_reports()
    rank_zero = tuple(member_shards(settings.seeds(), 2)[0])
    assert [(item.stage, item.step) for item in reports if item.done] == [("adam", 15), ("lbfgs", 5)]
    assert reports and all(item.seeds == rank_zero and item.losses.shape == (2,) for item in reports)
