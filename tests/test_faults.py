"""Faults and retries with real parts: `nft run` on a local Parsl site, an SQLite file and EMT behind
the test-only `FaultInjectingParent` (tests/plugins/fault_injecting.py), which raises, ends its
worker, hangs past its walltime or returns NaN or absurd forces.

Every job ends done or failed with its reason, within 1 + retries attempts; nothing non-finite or
absurd is stored; a hang is cut at its walltime; `nft run --retry-failed` makes failed jobs done and
a finished campaign trains on them.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import SMALL_CAMPAIGN, run_nft, write_campaign
from tests.plugins.fault_injecting import FAULTS, fault_kind

pytestmark = pytest.mark.timeout(420)

FAULTY = "fault-injecting"
RETRY_LINE = re.compile(r"reference job (\d+) attempt (\d+) failed, retrying: (.*)$")
FAILED_LINE = re.compile(r"reference job (\d+) failed after (\d+) attempt\(s\): (.*)$")


def faulty_campaign(directory: Path, faults: dict, active: dict, chunks: dict) -> Path:
    """A small campaign whose parent is EMT behind the fault injector with `faults` as its options."""
    return write_campaign(directory, {"parent": {"calculator": FAULTY, FAULTY: faults}, "active": active, "chunks": chunks})


def stored_jobs(config: Path):
    """(jobs, {job id: result}) of the campaign, read from its database."""
    url = f"sqlite:///{config.parent / 'run' / 'nft.db'}"  # not load_config: this process does not know the parent
    with CampaignStore.open(url, SMALL_CAMPAIGN["campaign"]["name"], create=False) as store:
        jobs = store.jobs()
        results = {job.id: store.result(job.id) for job in jobs if job.status == "done"}
        chunk_ids = {structure.id for structure in store.structures("chunk")}
        labelled = {structure.id for structure, _ in store.labelled_structures()}
    return jobs, results, chunk_ids, labelled


def failures_by_kind(stdout: str) -> Counter:
    """Every failed attempt the run reported (retried or final), by fault kind."""
    kinds: Counter = Counter()
    for line in stdout.splitlines():
        match = RETRY_LINE.search(line) or FAILED_LINE.search(line)
        if match:
            kinds[fault_kind(match.group(3))] += 1
    return kinds


@pytest.mark.parametrize("energy, poison", [(-3.0, np.nan), (np.inf, 0.0), (-3.0, -np.inf)])
def test_the_store_refuses_a_non_finite_result(tmp_path, energy, poison):
    """The last line of defence behind `result_problem`: nothing non-finite is data, and the job stays open."""
    with CampaignStore.open(f"sqlite:///{tmp_path / 'nft.db'}", "refusing") as store:
        structure_id = store.add_structure("initial", bulk("Pt", "fcc", a=3.92))
        job_id = store.add_job(structure_id, "emt", {})
        forces = np.zeros((1, 3))
        forces[0, 1] = poison
        with pytest.raises(ValueError, match=f"result of job {job_id} is not finite"):
            store.store_result(job_id, energy, forces)
        assert store.result(job_id) is None and store.job(job_id).status == "pending"


def test_a_campaign_with_faults_finishes_with_every_job_done_or_failed_and_only_sane_data(tmp_path, fault_injecting_env, capsys):
    retries, walltime_s, hang_s = 2, 3.0, 60.0
    faults = {  # the schedule makes every kind happen whichever chunks the model picks; then random draws
        "raise_probability": 0.15,
        "exit_probability": 0.1,
        "hang_probability": 0.1,
        "nan_probability": 0.1,
        "absurd_probability": 0.1,
        "seed": 6,
        "retries": retries,
        "walltime_s": walltime_s,
        "hang_s": hang_s,
        "schedule": list(FAULTS),
        "schedule_file": str(tmp_path / "fault-schedule"),
    }
    config = faulty_campaign(tmp_path / "campaign", faults, {"max_iterations": 3}, {"max_per_iteration": 6})
    started = time.monotonic()
    result = run_nft("run", config, env=fault_injecting_env, timeout=360)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((config.parent / "run" / "summary.json").read_text())

    jobs, results, chunk_ids, _ = stored_jobs(config)
    computed = [job for job in jobs if job.attempts > 0]  # the initial set is labelled in its file
    assert computed and all(job.structure_id in chunk_ids for job in computed)
    assert {job.status for job in jobs} <= {"done", "failed"}
    assert all(1 <= job.attempts <= 1 + retries for job in computed), [(job.id, job.attempts) for job in computed]
    for job in jobs:
        if job.status == "failed":
            assert job.error and job.attempts == 1 + retries, (job.id, job.attempts, job.error)
            assert fault_kind(job.error) in FAULTS, job.error
        else:
            assert job.error is None
    for job_id, stored in results.items():  # nothing non-finite or absurd is data
        forces = np.asarray(stored.forces)
        assert np.isfinite(stored.energy) and np.all(np.isfinite(forces)), job_id
        assert np.linalg.norm(forces, axis=1).max() <= 50.0, job_id

    kinds = failures_by_kind(result.stdout)
    retried = sum(job.attempts - 1 for job in computed)
    failed = [job for job in jobs if job.status == "failed"]
    assert sum(kinds.values()) == retried + len(failed) - sum(1 for job in failed if job.attempts == 0)
    assert all(kinds[kind] >= 1 for kind in FAULTS) and kinds["other"] == 0, kinds
    assert elapsed < hang_s * kinds["hang"] + 120, "hangs must be cut at walltime_s, not slept out"
    with capsys.disabled():  # the figures show in the CI log
        print(
            f"\nfaulty campaign: {len(computed)} reference jobs computed ({sum(j.status == 'done' for j in computed)} done, "
            f"{len(failed)} failed), {sum(j.attempts for j in computed)} attempts, {retried} retries used; "
            f"failed attempts by kind {dict(sorted(kinds.items()))}; final failures by kind "
            f"{dict(Counter(fault_kind(job.error) for job in failed))}; {summary['iterations']} iterations, "
            f"stop reason {summary['stop_reason']}, {elapsed:.0f} s"
        )


def test_a_job_failing_every_attempt_is_recorded_failed_and_retry_failed_makes_it_done(tmp_path, fault_injecting_env, capsys):
    retries, walltime_s, hang_s = 1, 2.0, 120.0
    faults = {"hang_probability": 1.0, "retries": retries, "walltime_s": walltime_s, "hang_s": hang_s}
    config = faulty_campaign(tmp_path / "campaign", faults, {"max_iterations": 2}, {"max_per_iteration": 3})
    env = fault_injecting_env
    started = time.monotonic()
    first = run_nft("run", config, env=env, timeout=300)
    elapsed = time.monotonic() - started
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert elapsed < hang_s, f"every attempt hangs for {hang_s} s: the run took {elapsed:.0f} s, so none was cut"

    jobs, _, chunk_ids, labelled = stored_jobs(config)
    chunk_jobs = [job for job in jobs if job.structure_id in chunk_ids]
    assert len(chunk_jobs) == 3
    for job in chunk_jobs:
        assert job.status == "failed" and job.attempts == 1 + retries, (job.id, job.status, job.attempts)
        assert job.error == f"WalltimeExceeded: {FAULTY}: exceeded walltime_s = {walltime_s:g} s", job.error
    assert not labelled & chunk_ids
    first_summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert first_summary["stop_reason"] == "max_iterations" and first_summary["iterations"] == 2

    status = run_nft("status", config, "--json", env=env, timeout=60)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["jobs"]["failed"] == 3 and report["finished"] is True
    assert sorted(job["id"] for job in report["failed_jobs"]) == sorted(job.id for job in chunk_jobs)
    assert all(job["attempts"] == 2 and "exceeded walltime_s" in job["error"] for job in report["failed_jobs"])
    table = run_nft("status", config, env=env, timeout=60)
    assert table.returncode == 0 and "failed reference jobs" in table.stdout and table.stdout.count("WalltimeExceeded") == 3

    config.write_text(config.read_text().replace("hang_probability = 1.0", "hang_probability = 0.0"))  # the fault is gone
    second = run_nft("run", config, "--retry-failed", env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "3 failed reference job(s) back to pending" in second.stdout
    jobs, results, chunk_ids, labelled = stored_jobs(config)
    chunk_jobs = [job for job in jobs if job.structure_id in chunk_ids]
    assert len(chunk_jobs) == 3  # the same jobs: their hashes did not change with the fault options
    for job in chunk_jobs:
        assert job.status == "done" and job.error is None and job.attempts == 2 + retries, (job.id, job.status, job.attempts)
    assert chunk_ids <= labelled  # ordinary chunks now, in the training set
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert summary["iterations"] == 3, "the finished campaign trains once more on the jobs that succeeded"
    assert summary["chunks"] == 3 and summary["stop_reason"] == "max_iterations"
    with capsys.disabled():  # the figures show in the CI log
        print(
            f"\nevery attempt hangs: 3 jobs failed after {1 + retries} attempts each in {elapsed:.0f} s "
            f"(walltime {walltime_s:g} s, hang {hang_s:g} s); --retry-failed: 3 done, iterations 2 -> 3"
        )
