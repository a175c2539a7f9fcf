"""`nft relax`: relaxation with uncertainty in a trained campaign (real EMT parent, real local Parsl,
real SQLite). The campaign is trained once per module on a mildly rattled Pt55; each test relaxes a
copy of it from a strained and more strongly rattled start, away from the training data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.io import read, write
from ase.optimize import BFGS

from pipeline.campaign.config import load_config
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import (
    EMT_DELAY_VARIABLE,
    NFT,
    logged_emt_calls,
    positions_digest,
    rattled_cluster,
    run_nft,
    write_campaign,
)
from tests.test_bad_input import disk_state
from tests.test_resume import WORKERS_END_WITHIN_S, campaign_processes

pytestmark = pytest.mark.timeout(300)

THRESHOLD = 0.6
"""δ threshold (eV/Å) of the test campaign: reached by its small ensemble on the rattled Pt55 in a few iterations."""
FMAX = 0.05
"""Force target of the relaxations, eV/Å."""
TRAINED = {"active": {"threshold": THRESHOLD, "max_iterations": 8}}


def displaced_start() -> Atoms:
    """The training target strained by 3 % and rattled by 0.1 Å: geometry the campaign never saw."""
    atoms = rattled_cluster()
    atoms.positions *= 1.03
    atoms.positions += np.random.default_rng(11).normal(0.0, 0.1, size=atoms.positions.shape)
    return atoms


def rmsd(a: Atoms, b: Atoms) -> float:
    """Root-mean-square displacement between two geometries of the same atoms, Å."""
    return float(np.sqrt(((a.positions - b.positions) ** 2).sum(axis=1).mean()))


def max_force(forces: np.ndarray) -> float:
    return float(np.sqrt((forces**2).sum(axis=1)).max())


@pytest.fixture(scope="module")
def trained_campaign(tmp_path_factory):
    """A converged campaign (its folder) and the start structure to relax, written beside it."""
    root = tmp_path_factory.mktemp("relax")
    config = write_campaign(root / "campaign", TRAINED)
    result = run_nft("run", config)
    assert result.returncode == 0, result.stdout + result.stderr
    write(root / "start.traj", displaced_start())
    return root


@pytest.fixture
def campaign_copy(trained_campaign, tmp_path):
    """A private copy of the trained campaign (its database's models stay readable where they were)."""
    shutil.copytree(trained_campaign / "campaign", tmp_path / "campaign")
    shutil.copy(trained_campaign / "start.traj", tmp_path / "start.traj")
    return tmp_path / "campaign" / "config.toml", tmp_path / "start.traj"


def stored(config: Path) -> dict:
    campaign = load_config(config)
    with CampaignStore.open(campaign.database_url, campaign.name, create=False) as store:
        structures = {record.id: record for record in store.structures()}
        return {
            "structures": structures,
            "jobs": {job.id: job for job in store.jobs()},
            "iterations": [record.iteration for record in store.iterations()],
            "models": [record.iteration for record in store.models()],
        }


@pytest.mark.slow
def test_relaxation_adds_chunks_and_ends_where_emt_relaxes(campaign_copy, tmp_path):
    config, start = campaign_copy
    before = stored(config)
    out = tmp_path / "out" / "relaxed.traj"
    result = run_nft("relax", config, start, "-o", out, "--fmax", FMAX, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)

    # Started away from the training data: δ above the threshold at once, chunks added, retrained.
    table = summary["table"]
    assert table[0]["delta"] > THRESHOLD and table[0]["chunks_added"] > 0
    assert summary["chunks_added"] == sum(row["chunks_added"] for row in table) > 0
    # Ends below both limits, with the model it ended on.
    assert summary["converged"] and summary["reason"] == "converged"
    assert summary["fmax"] < FMAX and summary["delta"] <= THRESHOLD
    # Every evaluation above the threshold asked for chunks or had none left to add; each model
    # change follows an evaluation that added chunks.
    for previous, row in zip(table, table[1:]):
        if row["model"] != previous["model"]:
            assert previous["chunks_added"] > 0 and row["step"] == previous["step"]

    # The database: snapshots with their chunks, every chunk job done, one new iteration and model per retraining.
    after = stored(config)
    snapshots = {sid for sid, record in after["structures"].items() if record.kind == "snapshot"}
    chunks = [record for record in after["structures"].values() if record.kind == "chunk" and record.parent_id in snapshots]
    assert len(chunks) == summary["chunks_added"]
    assert all(after["jobs"][job_id].status == "done" for job_id in after["jobs"] if job_id not in before["jobs"])
    retrained = sum(1 for previous, row in zip(table, table[1:]) if row["model"] != previous["model"])
    assert after["iterations"] == after["models"] == before["iterations"] + [before["iterations"][-1] + k for k in range(1, retrained + 1)]

    # Outputs: the relaxed structure, one trajectory frame per evaluation with per-atom δ_i, the table.
    relaxed = read(out)
    frames = read(out.with_name("relaxed-trajectory.extxyz"), ":")
    assert len(frames) == len(table)
    for frame, row in zip(frames, table):  # extxyz keeps 8 decimals
        assert frame.arrays["delta"].shape == (len(relaxed),)
        assert frame.arrays["delta"].max() == pytest.approx(row["delta"], abs=1e-7)
        assert max_force(frame.get_forces()) == pytest.approx(row["fmax"], abs=1e-7)
    np.testing.assert_allclose(frames[-1].positions, relaxed.positions, atol=1e-7)
    csv_lines = out.with_name("relaxed-steps.csv").read_text().splitlines()
    assert csv_lines[0] == "step,model,energy,fmax,delta,chunks_added" and len(csv_lines) == len(table) + 1

    # Run again: already relaxed, nothing computed or trained.
    again = run_nft("relax", config, start, "-o", out, "--fmax", FMAX, "--json")
    assert again.returncode == 0 and "already relaxed" in again.stderr, again.stderr
    assert json.loads(again.stdout)["table"] == table and stored(config)["iterations"] == after["iterations"]

    # nft report draws the relaxation curve from the steps file the run registered.
    report = run_nft("report", config, "-o", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    png = (tmp_path / "report" / "relaxation.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "![Relaxation](relaxation.png)" in (tmp_path / "report" / "report.md").read_text()

    # Against EMT's own relaxation from the same start. δ_i bounds |F_model − F_EMT| on atom i (99 %),
    # so EMT's largest force on the ML-relaxed structure is at most fmax + δ; and the ML relaxation
    # must have done the EMT relaxation's work: what is left is a small part of the path.
    emt_relaxed = read(start)
    emt_relaxed.calc = EMT()
    BFGS(emt_relaxed, logfile=None).run(fmax=0.01)
    relaxed.calc = EMT()
    assert max_force(relaxed.get_forces()) <= FMAX + summary["delta"]
    assert rmsd(relaxed, emt_relaxed) < 0.1 * rmsd(read(start), emt_relaxed)


def files_of(state: dict) -> dict:
    return {path: entry for path, entry in state.items() if entry[0] >= 0}


def done_snapshot_chunk_jobs(config: Path) -> list:
    """Done reference jobs of chunks carved from relaxation snapshots (read while another process writes)."""
    try:
        state = stored(config)
    except Exception:  # not readable yet
        return []
    snapshots = {sid for sid, record in state["structures"].items() if record.kind == "snapshot"}
    return [job for job in state["jobs"].values() if job.status == "done" and state["structures"][job.structure_id].parent_id in snapshots]


@pytest.mark.slow
def test_a_killed_relaxation_resumes_without_recomputing(campaign_copy, tmp_path, emt_call_log):
    config, start = campaign_copy
    env, call_log = emt_call_log
    env[EMT_DELAY_VARIABLE] = "0.7"  # chunk jobs slowed down, so the kill lands while some are in flight
    out = tmp_path / "relaxed.traj"
    trained_last = stored(config)["iterations"][-1]
    process = subprocess.Popen(
        NFT + ["relax", str(config), str(start), "-o", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while len(done_snapshot_chunk_jobs(config)) < 2:
            assert process.poll() is None, f"nft relax ended before the kill:\n{process.stdout.read()}"
            assert time.monotonic() < deadline, "no snapshot chunk result stored in time"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    wait_for_workers_to_end(config)  # the killed driver's workers notice and end (test_resume checks that they do)
    before = stored(config)
    done_before = {job.id: job for job in done_snapshot_chunk_jobs(config)}
    unfinished = [job for job in before["jobs"].values() if job.status in ("pending", "running")]
    assert unfinished, "the kill should interrupt chunk jobs in flight (raise the EMT delay if not)"
    calls_before = len(logged_emt_calls(call_log))

    env[EMT_DELAY_VARIABLE] = "0"
    result = run_nft("relax", config, start, "-o", out, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pending reference job(s) from an earlier run" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["converged"] and summary["fmax"] < FMAX and summary["delta"] <= THRESHOLD

    after = stored(config)
    calls = Counter(digest for _, _, digest in logged_emt_calls(call_log)[calls_before:])
    for job_id, job in done_before.items():  # done before the kill: not computed again
        assert after["jobs"][job_id].finished_at == job.finished_at
        assert calls[positions_digest(after["structures"][job.structure_id].atoms)] == 0
    for job in unfinished:  # interrupted: computed once by the rerun
        assert after["jobs"][job.id].status == "done"
        assert calls[positions_digest(after["structures"][job.structure_id].atoms)] == 1
    chunk_keys = Counter(
        (record.parent_id, record.center_in_parent, record.radius) for record in after["structures"].values() if record.kind == "chunk"
    )
    assert max(chunk_keys.values()) == 1
    # The rerun trained on the killed run's chunks before its first step.
    assert summary["table"][0]["step"] == 0 and summary["table"][0]["model"] > trained_last


def test_a_campaign_without_a_model_is_refused(tmp_path):
    config = write_campaign(tmp_path / "campaign", TRAINED)
    campaign = load_config(config)
    campaign.workdir.mkdir(parents=True)
    with CampaignStore.open(campaign.database_url, campaign.name, campaign.as_dict()):
        pass  # the campaign exists in its database, nothing trained yet
    write(tmp_path / "start.traj", displaced_start())
    before = disk_state(tmp_path)
    result = run_nft("relax", config, tmp_path / "start.traj", "-o", tmp_path / "o.traj")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: config.toml: campaign {campaign.name} has no trained model yet (run `nft run config.toml` first)"
    ]
    assert files_of(disk_state(tmp_path)) == files_of(before)  # reading the database may touch its folder's time


@pytest.mark.slow
def test_a_relaxation_killed_between_steps_goes_on_from_its_last_geometry(campaign_copy, tmp_path):
    config, start = campaign_copy
    out = tmp_path / "relaxed.traj"
    steps_json = tmp_path / "relaxed-steps.json"
    process = subprocess.Popen(
        NFT + ["relax", str(config), str(start), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"nft relax ended before the kill:\n{process.stdout.read()}"
            assert time.monotonic() < deadline, "no five evaluations written in time"
            try:
                if len(json.loads(steps_json.read_text())["steps"]) >= 5:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    wait_for_workers_to_end(config)
    written = json.loads(steps_json.read_text())
    rows_before, last = written["steps"], written["current"]

    result = run_nft("relax", config, start, "-o", out, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming the relaxation at step {rows_before[-1]['step']}" in result.stderr
    summary = json.loads(result.stdout)
    table = summary["table"]
    assert table[: len(rows_before)] == rows_before  # the rows written before the kill are kept
    assert table[len(rows_before)]["step"] == rows_before[-1]["step"]  # and it went on from that step ...
    frames = read(out.with_name("relaxed-trajectory.extxyz"), ":")
    assert len(frames) == len(table)
    np.testing.assert_allclose(frames[len(rows_before)].positions, np.asarray(last["positions"]), atol=1e-7)  # ... and geometry
    assert summary["converged"] and summary["fmax"] < FMAX and summary["delta"] <= THRESHOLD


def wait_for_workers_to_end(config: Path) -> None:
    """Poll until the campaign's worker pools (left by a SIGKILLed driver) are gone, at most
    `WORKERS_END_WITHIN_S`; they must not write while the test reads the store."""
    workdir = load_config(config).workdir
    deadline = time.monotonic() + WORKERS_END_WITHIN_S
    while campaign_processes(workdir):
        assert time.monotonic() < deadline, f"workers of {workdir} still running {WORKERS_END_WITHIN_S} s after the kill"
        time.sleep(0.1)
