"""Locality of a parent calculator through Parsl: the whole structure and every chunk as reference jobs.

The same jobs `nft run` sends for its chunks (`SiteApps.reference_app`: plain data, a GPAW chunk an
MPI job with the parent's ranks), all submitted at once; a failed attempt is tried again up to the
parent's `retries`, as in the campaign. Carving and the comparison are the science module's
(`pipeline.science.locality`); only where the forces are computed differs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from pipeline.errors import RunFailed, error_text
from pipeline.execution.apps import SiteApps, make_apps
from pipeline.execution.parents import Parent
from pipeline.execution.parsl_session import parsl_session
from pipeline.execution.sites import PARSL_DIR_NAME, check_site, load_site
from pipeline.science.locality import LocalityChunks, LocalityResult, locality_chunks, locality_from_forces
from pipeline.science.structures import atoms_to_payload

JOBS_DIR_NAME = "jobs"

JobProgress = Callable[[int, int], None]
"""Called with (jobs done, jobs in all) as reference jobs finish."""


def parent_locality(
    atoms: Atoms,
    parent: Parent,
    radii: Sequence[float],
    sample_indices: Sequence[int],
    apps: SiteApps,
    vacuum: float = 6.0,
    workdir: Path | None = None,
    progress: JobProgress | None = None,
) -> LocalityResult:
    """`central_force_locality` with every force (eV/Å) computed by `parent` as a reference job on
    the loaded site of `apps`: radii and `vacuum` in Å. A parent that keeps job folders (GPAW) keeps
    them under ``workdir/jobs`` (without `workdir`, in scratch folders that go). A job that fails
    every attempt raises `RunFailed` naming it and the last attempt's reason."""
    plan = locality_chunks(atoms, radii, sample_indices, vacuum)
    jobs = _locality_jobs(plan)
    forces = _reference_forces(jobs, parent, apps, workdir, progress)
    whole, *chunks = forces
    per_radius = [chunks[r * plan.sample_indices.size : (r + 1) * plan.sample_indices.size] for r in range(plan.radii.size)]
    return locality_from_forces(plan, whole, per_radius)


def site_locality(
    atoms: Atoms,
    parent: Parent,
    radii: Sequence[float],
    sample_indices: Sequence[int],
    site: str | os.PathLike[str] = "local",
    site_options: Mapping[str, Any] | None = None,
    vacuum: float = 6.0,
    workdir: Path | None = None,
    progress: JobProgress | None = None,
) -> LocalityResult:
    """`parent_locality` in a Parsl session of `site` (a name in site_configs/ or a path, as `nft
    run --site` takes) with `site_options` (a campaign's `[site.options]`). Parsl's run folder is
    ``workdir/runinfo``; without `workdir` a temporary folder in the current directory (which a
    batch site's nodes can write to), removed afterwards. A bad site or option raises `SiteError`
    (`BadInput`) before anything is computed or written."""
    check_site(site, site_options)  # bad site: BadInput now, nothing written

    def in_session(run_root: Path) -> LocalityResult:
        config = load_site(site, run_root / PARSL_DIR_NAME, site_options)
        with parsl_session(config):
            return parent_locality(atoms, parent, radii, sample_indices, make_apps(config), vacuum, workdir, progress)

    if workdir is not None:
        return in_session(Path(workdir))
    with tempfile.TemporaryDirectory(prefix=".nft-locality-", dir=Path.cwd()) as scratch:
        return in_session(Path(scratch))


def _locality_jobs(plan: LocalityChunks) -> list[tuple[str, str, Atoms]]:
    """(description, job folder name, structure) of every reference job: the whole structure first,
    then the chunks radius by radius, sample atom by sample atom."""
    jobs = [("the whole structure", "whole", plan.whole)]
    for radius, row in zip(plan.radii, plan.chunks):
        for chunk in row:
            jobs.append(
                (
                    f"the {radius:g} Å chunk around atom {chunk.center_in_parent}",
                    f"chunk-r{radius:g}-atom{chunk.center_in_parent}",
                    chunk.atoms,
                )
            )
    return jobs


def _reference_forces(
    jobs: Sequence[tuple[str, str, Atoms]],
    parent: Parent,
    apps: SiteApps,
    workdir: Path | None,
    progress: JobProgress | None,
) -> list[np.ndarray]:
    """Forces (eV/Å) of every job's structure, in the order of `jobs`; each job gets 1 + `parent.retries`
    attempts, and one that fails them all raises `RunFailed` (the Parsl session's end stops the rest)."""
    payloads = [atoms_to_payload(structure) for _, _, structure in jobs]
    job_dirs = [str(workdir / JOBS_DIR_NAME / folder) if parent.needs_job_dir and workdir is not None else None for _, folder, _ in jobs]
    attempts = [0] * len(jobs)
    forces: dict[int, np.ndarray] = {}  # by job index
    running: dict[Any, int] = {}

    def submit(k: int) -> None:
        attempts[k] += 1
        running[apps.reference_app(parent, payloads[k], job_dirs[k], attempts[k])] = k

    for k in range(len(jobs)):
        submit(k)
    done = 0
    if progress:
        progress(done, len(jobs))
    while running:
        finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for future in finished:
            k = running.pop(future)
            try:
                forces[k] = np.asarray(future.result()["forces"], dtype=float)
            except Exception as error:  # the job's own failure, or its worker's
                if attempts[k] <= parent.retries:
                    submit(k)
                    continue
                raise RunFailed(
                    f"{parent.name} on {jobs[k][0]} failed after {attempts[k]} attempt(s): {error_text(error).splitlines()[0]}"
                ) from None
            done += 1
            if progress:
                progress(done, len(jobs))
    return [forces[k] for k in range(len(jobs))]
