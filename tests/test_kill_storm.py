"""A kill storm: `nft run` SIGKILLed at 20 random moments over a small campaign, then let finish.

After every kill: no process of the campaign is alive, no finished reference result is lost or
changed, no chunk is stored twice. At the end: no job was computed again after its result was
stored, and the δ history is the one of an uninterrupted run. The test prints its figures.
"""
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest

from pipeline.campaign.config import load_config
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import EMT_DELAY_VARIABLE, NFT, logged_emt_calls, positions_digest, run_nft, write_campaign
from tests.test_resume import WORKERS_END_WITHIN_S, campaign_processes, kill_workers_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KILLS = 20
THREE_ITERATIONS = {"active": {"threshold": 0.05, "max_iterations": 3}}
TARGETS = ("start-up", "training", "reference jobs", "prediction", "final model")
"""Each run is killed a random moment (up to `KILL_DELAY_S`) after announcing one of these phases,
in turn, so that kills land in set-up, training, reference jobs and the summary, not only where the
time goes (training)."""
KILL_DELAY_S = 0.4
MARKERS = {"initial set": "set-up", "training": "training", "prediction": "prediction", "selection": "selection",
           "reference jobs": "reference jobs", "final model": "summary", "pt55-test:": "summary"}


def stored_results(campaign):
    """Done jobs: id -> (structure, attempts, finished_at, energy, forces bytes)."""
    try:
        store = CampaignStore.open(campaign.database_url, campaign.name, create=False)
    except Exception:  # not created yet
        return {}, [], {}
    with store:
        done = {}
        for job in store.jobs(status="done"):
            result = store.result(job.id)
            done[job.id] = (job.structure_id, job.attempts, job.finished_at, result.energy, result.forces.tobytes())
        chunks = [(s.parent_id, s.center_in_parent, s.radius) for s in store.structures() if s.kind == "chunk"]
        geometry = {job.id: positions_digest(store.atoms(job.structure_id)) for job in store.jobs(status="done")}
    return done, chunks, geometry


def phase_of(lines: list[str]) -> str:
    """The last phase the driver announced."""
    last = "start-up"
    for line in lines:
        for marker, phase in MARKERS.items():
            if marker in line:
                last = phase
    return last


def run_and_kill(config, env, target: str, rng: random.Random) -> tuple[bool, str]:
    """Start `nft run`, SIGKILL its process group soon after it announces `target`; (finished, phase)."""
    process = subprocess.Popen(NFT + ["run", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if target == "start-up" or any(target in line for line in list(lines)):
            break
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, KILL_DELAY_S if target != "start-up" else 4.0))
    finished = process.poll() is not None
    if not finished:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    reader.join(timeout=10)
    return finished, phase_of(lines)


def history(summary):
    return [(entry["iteration"], entry["uncertainty"], entry["chunks_added"]) for entry in summary["history"]]


def test_kill_storm_loses_nothing_duplicates_nothing_and_repeats_the_history(tmp_path, emt_call_log, capsys):
    env, call_log = emt_call_log
    uninterrupted = write_campaign(tmp_path / "uninterrupted", THREE_ITERATIONS)
    result = run_nft("run", uninterrupted, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = json.loads((uninterrupted.parent / "run" / "summary.json").read_text())

    config = write_campaign(tmp_path / "storm", THREE_ITERATIONS)
    campaign = load_config(config)
    rng = random.Random(2026)
    kept: dict[int, tuple] = {}  # every result seen stored, as first seen
    stored_before_call: list[tuple[int, set[str]]] = []  # (call-log length, digests stored by then)
    phases, lost, changed, duplicated, alive_after = Counter(), 0, 0, 0, 0
    env[EMT_DELAY_VARIABLE] = "0.3"  # chunk jobs take long enough for kills to land among them
    kills = runs = 0
    while kills < KILLS and runs < 3 * KILLS:
        finished, phase = run_and_kill(config, env, TARGETS[runs % len(TARGETS)], rng)
        runs += 1
        kills += not finished
        phases["finished" if finished else phase] += 1
        deadline = time.monotonic() + WORKERS_END_WITHIN_S
        while campaign_processes(campaign.workdir) and time.monotonic() < deadline:
            time.sleep(0.2)
        if campaign_processes(campaign.workdir):
            alive_after += 1
            kill_workers_of(campaign.workdir)
        done, chunks, geometry = stored_results(campaign)
        lost += sum(1 for job_id in kept if job_id not in done)
        changed += sum(1 for job_id, row in kept.items() if job_id in done and done[job_id] != row)
        duplicated += sum(count - 1 for count in Counter(chunks).values())
        kept.update({job_id: row for job_id, row in done.items() if job_id not in kept})
        stored_before_call.append((len(logged_emt_calls(call_log)), set(geometry.values())))

    result = run_nft("run", config, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((campaign.workdir / "summary.json").read_text())
    calls = logged_emt_calls(call_log)
    recomputed = sum(
        1 for (start, digests), (end, _) in zip(stored_before_call, stored_before_call[1:] + [(len(calls), set())])
        for _, _, digest in calls[start:end] if digest in digests
    )
    with capsys.disabled():  # the figures show in the CI log
        print(f"\nkill storm: {kills} kills in {runs} runs, by phase {dict(phases)}; results lost {lost}, changed {changed}, "
          f"chunks duplicated {duplicated}, jobs recomputed after stored {recomputed}, "
          f"kills leaving processes alive {alive_after}; δ history {history(summary)} "
          f"(uninterrupted {history(expected)})")
    assert kills == KILLS
    assert (lost, changed, duplicated, recomputed, alive_after) == (0, 0, 0, 0, 0)
    assert [entry[2] for entry in history(summary)] == [entry[2] for entry in history(expected)]
    for got, want in zip(history(summary), history(expected)):
        assert got[1] == pytest.approx(want[1], rel=1e-6), (got, want)
    assert summary["chunks"] == expected["chunks"] and summary["stop_reason"] == expected["stop_reason"]
