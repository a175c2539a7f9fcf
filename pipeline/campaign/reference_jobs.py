"""Running reference jobs through the DAG into the store: claim, submit, retry, store or record
failed. Shared by everything in the campaign layer that asks the parent for labels (the NFT loop,
and any command whose expensive steps are reference jobs), so they resume and fail the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.campaign.campaign_log import log
from pipeline.campaign.observer import CampaignObserver
from pipeline.errors import error_text
from pipeline.execution.parents.base import Parent
from pipeline.science.structures import atoms_to_payload
from pipeline.storage.jobs import CLAIMED, ELSEWHERE, JobAlreadyDone
from pipeline.storage.records import JobRecord
from pipeline.storage.store import CampaignStore

JOB_POLL_S = 1.0
"""Seconds between two looks at a job another campaign's driver is computing."""

Submit = Callable[[Parent, dict[str, Any], str | None, int], Any]
"""(parent, structure payload, job directory or None, attempt) → a future of the job's result dict."""


class ReferenceJobRunner:
    """Computes reference jobs of one store with one parent: each result is stored as its future
    completes (a kill loses only the jobs in flight); a failed attempt is retried `parent.retries`
    times in this run, then the job is recorded failed with the last attempt's reason."""

    def __init__(self, store: CampaignStore, parent: Parent, observer: CampaignObserver, workdir: Path, submit: Submit) -> None:
        self.store = store
        self.parent = parent
        self.observer = observer
        self.workdir = workdir
        self.submit = submit
        self._submitted: dict[int, float] = {}  # job id → when its current attempt was submitted (perf_counter)

    def run(self, jobs: Sequence[JobRecord]) -> int:
        """Submit the jobs this driver claims at once; a job another campaign's live driver computes
        is waited for, not submitted. Returns how many of `jobs` are done now (computed, or settled
        by another campaign)."""
        if not jobs:
            return 0
        store, observer = self.store, self.observer
        futures: dict[Any, JobRecord] = {}
        tries: dict[int, int] = {}  # attempts this run, per job id
        done = failed = 0
        unclaimed = list(jobs)
        observer.jobs(done, len(jobs), failed, len(jobs))
        while unclaimed or futures:
            elsewhere = []
            for job in unclaimed:
                claim = store.claim_job(job.id)
                if claim == ELSEWHERE:
                    elsewhere.append(job)
                    continue
                if claim != CLAIMED:  # settled meanwhile by another campaign's driver: reused
                    done, failed = done + (claim == "done"), failed + (claim == "failed")
                    log.info("reference job %d: %s by another campaign's driver (reused)", job.id, claim)
                    continue
                futures[self._submit(job, tries)] = job
            unclaimed = elsewhere
            if not futures:
                observer.jobs(done, len(jobs) - done - failed, failed, len(jobs))
                time.sleep(JOB_POLL_S if unclaimed else 0.0)
                continue
            completed, _ = wait(futures, timeout=JOB_POLL_S if unclaimed else None, return_when=FIRST_COMPLETED)
            for future in completed:
                job = futures.pop(future)
                reason = self._store_outcome(job, future)
                seconds = time.perf_counter() - self._submitted.pop(job.id, time.perf_counter())
                if reason is None:
                    done += 1
                    log.info("reference job %d: done after %.1f s", job.id, seconds)
                    observer.jobs(done, len(jobs) - done - failed, failed, len(jobs))
                    continue
                log.info("reference job %d: attempt %d ended without a result after %.1f s", job.id, tries[job.id], seconds)
                if tries[job.id] <= self.parent.retries:
                    observer.message(f"reference job {job.id} attempt {tries[job.id]} failed, retrying: {reason.splitlines()[0]}")
                    try:
                        store.mark_running(job.id)  # one more attempt
                    except JobAlreadyDone:  # a driver that took the job over stored it meanwhile
                        done += 1
                    else:
                        futures[self._submit(job, tries)] = job
                else:
                    store.mark_failed(job.id, reason)
                    failed += 1
                    observer.message(f"reference job {job.id} failed after {tries[job.id]} attempt(s): {reason.splitlines()[0]}")
                observer.jobs(done, len(jobs) - done - failed, failed, len(jobs))
        return done

    def _submit(self, job: JobRecord, tries: dict[int, int]) -> Any:
        """Submit the next attempt of a job this driver has started (claimed or marked running)."""
        tries[job.id] = tries.get(job.id, 0) + 1
        record = self.store.structure(job.structure_id)
        structure = record.atoms
        job_dir = str(self.workdir / "jobs" / f"job-{job.id:06d}") if self.parent.needs_job_dir else None
        attempt = self.store.job(job.id).attempts  # over the job's life, so a retry differs from the try before
        future = self.submit(self.parent, atoms_to_payload(structure), job_dir, attempt)
        self._submitted[job.id] = time.perf_counter()
        log.info(
            "reference job %d: submitted: %s structure %d (%d atom(s)), parent %s, attempt %d",
            job.id,
            record.kind,
            record.id,
            len(structure),
            self.parent.name,
            attempt,
        )
        return future

    def _store_outcome(self, job: JobRecord, future: Any) -> str | None:
        """Store the result of a completed attempt (with the end geometry of a relaxation job where
        it has one); the reason it gave none (it raised, its worker died, it passed its walltime, or
        its result was invalid or refused by the store), or None."""
        try:
            result = future.result()
        except Exception as error:  # the job's own failure, or its worker's
            return error_text(error)
        try:
            final_positions = result.get("final_positions")
            final_cell = result.get("final_cell")
            self.store.store_result(
                job.id,
                result["energy"],
                np.asarray(result["forces"]),
                result.get("wall_time_s"),
                result.get("host"),
                external_id=result.get("external_id"),
                final_positions=None if final_positions is None else np.asarray(final_positions),
                final_cell=None if final_cell is None else np.asarray(final_cell),
            )
        except JobAlreadyDone:  # a driver that took the job over stored the same physics first
            pass
        except (ValueError, KeyError, TypeError) as error:  # not a result: the store's last line of defence
            return f"invalid result: {error_text(error)}"
        return None
