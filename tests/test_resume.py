"""A killed campaign resumes with nothing lost or duplicated.

`nft run` runs as a subprocess (its own process group, Parsl workers included) with the test-only
hooks of campaign_fixtures: every EMT calculation is logged with the digest of its positions, and
chunk calculations are slowed down (fault injection) so that the SIGKILL lands while jobs are in
flight. The database is polled until some chunk results are stored; then the whole group is killed.
"""

import json
import os
import signal
import subprocess
import time
from collections import Counter

import pytest

from pipeline.campaign.config import load_config
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import (
    EMT_DELAY_VARIABLE,
    NFT,
    logged_emt_calls,
    positions_digest,
    run_nft,
)

pytestmark = pytest.mark.timeout(300)

WORKERS_END_WITHIN_S = 10.0
"""A killed driver's local workers must be gone this soon (their watchdog polls every second)."""

# Low threshold: the campaign runs all its iterations; three of them, six chunks each.
RESUMABLE = {
    "active": {"threshold": 0.01, "max_iterations": 3},
    "chunks": {"max_per_iteration": 6, "min_separation": 2.0},
}


def done_chunk_jobs(database_url):
    """Done chunk jobs, read while another process writes (WAL: readers never block it)."""
    try:
        with CampaignStore(database_url, create=False) as store:
            return store.jobs(status="done", kind="chunk")
    except Exception:  # not created yet
        return []


def campaign_processes(workdir):
    """Pids of the Parsl worker pools of this campaign (found by their log directory) and their children."""
    marker = str(workdir / "runinfo").encode()
    parents, pools = {}, []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker in handle.read():
                    pools.append(int(entry))
        except (FileNotFoundError, ProcessLookupError):
            continue
    doomed = set(pools)
    while True:
        children = {pid for pid, parent in parents.items() if parent in doomed} - doomed
        if not children:
            break
        doomed |= children
    return doomed


def kill_workers_of(workdir):
    """SIGKILL whatever of this campaign is still alive (cleanup after a failed assertion)."""
    for pid in campaign_processes(workdir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def snapshot(campaign):
    with CampaignStore.open(campaign.database_url, campaign.name, create=False) as store:
        jobs = store.jobs()
        structures = {record.id: record for record in store.structures()}
        return {
            "jobs": {job.id: job for job in jobs},
            "structures": structures,
            "iterations": [record.iteration for record in store.iterations()],
        }


def test_a_killed_campaign_resumes_without_recomputing_or_duplicating(small_campaign, emt_call_log):
    env, call_log = emt_call_log
    env[EMT_DELAY_VARIABLE] = "0.7"
    config = small_campaign(RESUMABLE)
    campaign = load_config(config)

    process = subprocess.Popen(
        NFT + ["run", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while len(done_chunk_jobs(campaign.database_url)) < 2:
            assert process.poll() is None, f"nft run ended before the kill:\n{process.stdout.read()}"
            assert time.monotonic() < deadline, "no chunk result stored in time"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the interchange: a crash
        process.wait(timeout=30)
    try:  # the worker pool runs in a process group of its own: the driver watchdog must end it
        deadline = time.monotonic() + WORKERS_END_WITHIN_S
        while campaign_processes(campaign.workdir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not campaign_processes(campaign.workdir), "workers outlived the killed driver"
    finally:
        kill_workers_of(campaign.workdir)

    before = snapshot(campaign)
    done_before = {job_id: job for job_id, job in before["jobs"].items() if job.status == "done"}
    unfinished_before = [job for job in before["jobs"].values() if job.status in ("running", "pending")]
    assert any(before["structures"][job.structure_id].kind == "chunk" for job in done_before.values())
    assert unfinished_before, "the kill should interrupt jobs in flight (raise the EMT delay if not)"
    calls_before = len(logged_emt_calls(call_log))

    env[EMT_DELAY_VARIABLE] = "0"
    result = run_nft("run", config, env=env, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming" in result.stdout

    after = snapshot(campaign)
    summary = json.loads((campaign.workdir / "summary.json").read_text())

    # Finished: every job done, the history continued to the configured end.
    assert all(job.status == "done" for job in after["jobs"].values())
    assert after["iterations"] == [1, 2, 3] and summary["iterations"] == 3
    assert summary["stop_reason"] == "max_iterations" and summary["converged"] is False
    assert summary["chunks"] == sum(1 for record in after["structures"].values() if record.kind == "chunk")

    # No chunk stored twice: one per (parent, centre, radius), one job per chunk.
    chunks = [record for record in after["structures"].values() if record.kind == "chunk"]
    keys = Counter((record.parent_id, record.center_in_parent, record.radius) for record in chunks)
    assert max(keys.values()) == 1
    jobs_per_structure = Counter(job.structure_id for job in after["jobs"].values())
    assert max(jobs_per_structure.values()) == 1

    # No finished job recomputed: its row unchanged, its geometry computed by EMT exactly once.
    calls = Counter(digest for _, _, digest in logged_emt_calls(call_log)[calls_before:])
    for job_id, job in done_before.items():
        assert after["jobs"][job_id].attempts == job.attempts
        assert after["jobs"][job_id].finished_at == job.finished_at
        atoms = after["structures"][job.structure_id].atoms
        if not atoms.pbc.any():  # chunk jobs (the initial set was labelled in the file: 0 attempts)
            assert job.attempts == 1
            assert calls[positions_digest(atoms)] == 0, f"done job {job_id} was computed again"
    # The interrupted ones were resubmitted: computed by the second run.
    for job in unfinished_before:
        atoms = after["structures"][job.structure_id].atoms
        assert calls[positions_digest(atoms)] == 1, [
            (index, pid) for index, (pid, _, digest) in enumerate(logged_emt_calls(call_log)) if digest == positions_digest(atoms)
        ] + [calls_before]
        assert after["jobs"][job.id].attempts == job.attempts + 1


def test_sigterm_stops_cleanly_and_the_run_resumes(small_campaign, emt_call_log):
    env, _ = emt_call_log
    env[EMT_DELAY_VARIABLE] = "0.7"
    config = small_campaign(RESUMABLE)
    campaign = load_config(config)
    process = subprocess.Popen(NFT + ["run", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len(done_chunk_jobs(campaign.database_url)) < 1:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    env[EMT_DELAY_VARIABLE] = "0"
    result = run_nft("run", config, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((campaign.workdir / "summary.json").read_text())["iterations"] == 3
