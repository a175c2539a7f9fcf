"""Generating an initial training set as reference jobs in a campaign database (docs/campaign.md,
"Generated initial sets"): every prototype crystal is stored (kind `prototype`) with a cell-relaxation
job; variants drawn from the relaxed cells are stored as `initial` structures with a normal reference
job each; those within the energy window are kept, labelled. Jobs run through `ReferenceJobRunner`,
so a killed generation run again recomputes nothing that finished.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from pipeline.campaign.campaign_log import campaign_log, log, logging_observer
from pipeline.campaign.config import CampaignConfig
from pipeline.campaign.observer import CampaignObserver
from pipeline.campaign.reference_jobs import ReferenceJobRunner, Submit
from pipeline.errors import RunFailed
from pipeline.execution.apps import SiteApps, make_apps
from pipeline.execution.parents import Parent
from pipeline.execution.parsl_session import parsl_session
from pipeline.execution.sites import PARSL_DIR_NAME, load_site
from pipeline.science.initial_sets import (
    InitialSetSettings,
    default_min_distance,
    initial_crystals,
    min_interatomic_distance,
    propose_variants,
    within_energy_window,
)
from pipeline.storage.atomic import write_atomically
from pipeline.storage.lease import held_lease
from pipeline.storage.store import CampaignStore

RELAXATION_PARAM = "relax_cell"
"""The job parameter that makes a cell relaxation a job of its own (beside the parent's physics)."""
GENERATION_SUFFIX = "/initial"
"""A campaign's generation is campaign NAME/initial of its database (its rejected candidates stay there)."""


def settings_problem(settings: InitialSetSettings, parent: Parent) -> tuple[str, str] | None:
    """(settings field, what is wrong) when `settings` cannot make a set with `parent`, else None:
    elements the parent lacks, no prototype for the elements (or the chosen space groups), more
    elements than a random alloy's sites, a minimum separation no crystal of these elements keeps."""
    elements = settings.elements or ()
    problem = parent.element_problem(elements)
    if problem:
        return "elements", problem
    try:
        crystals = initial_crystals(settings)
    except ValueError as error:
        return "elements", str(error)
    if not crystals:
        groups = ", ".join(map(str, settings.space_groups or ()))
        return "space_groups", f"no space group among {groups} has a prototype for {len(elements)} element(s) ({', '.join(elements)})"
    separation = min_distance(settings)
    bond = max(min_interatomic_distance(atoms, 4.0 * separation) for _, atoms in crystals)
    if separation >= bond:
        return "min_separation", (
            f"{separation:g} Å is not below the bond length of any prototype (at most {bond:.3g} Å, "
            "the sum of covalent radii): no cell keeps its atoms that far apart"
        )
    return None


def min_distance(settings: InitialSetSettings) -> float:
    """The closest two atoms of a generated cell may be, Å: `min_separation`, or the default from
    covalent radii (not `chunks.min_separation`, the spacing of chunk centres)."""
    if settings.min_separation is not None:
        return settings.min_separation
    return default_min_distance(settings.elements or ())


class InitialSetGenerator:
    """One generation over one store: relax the prototypes, then draw, label and keep variants in rounds.

    `apps()` gives the site's apps, started only when a job must be computed (a finished generation
    run again starts no Parsl)."""

    def __init__(
        self,
        store: CampaignStore,
        parent: Parent,
        settings: InitialSetSettings,
        workdir: Path,
        observer: CampaignObserver,
        apps: Callable[[], SiteApps],
    ) -> None:
        self.store, self.parent, self.settings, self.workdir = store, parent, settings, workdir
        self.observer, self.apps = observer, apps
        self.label_params = parent.physics()
        self.relax_params = {**self.label_params, RELAXATION_PARAM: {"fmax": settings.relax_fmax, "steps": settings.relax_steps}}

    def generate(self) -> list[Atoms]:
        """The kept cells, `settings.count` of them, each with its energy (eV) and forces (eV/Å) as a
        `SinglePointCalculator`; `RunFailed` when every relaxation fails or the rounds run out."""
        settings, store = self.settings, self.store
        store.reset_unfinished()
        relaxed = self.relaxed_cells()
        separation = min_distance(settings)
        kept: list[Atoms] = []
        for round_index in range(settings.max_rounds):
            try:
                candidates = propose_variants([atoms for atoms, _ in relaxed], settings, round_index, separation)
            except ValueError as error:
                raise RunFailed(f"initial set: {error}") from None
            jobs = [
                (index, atoms, store.add_job(store.add_structure("initial", atoms), self.parent.name, self.label_params))
                for index, atoms in candidates
            ]
            self.compute([job_id for _, _, job_id in jobs], self._submit_label)
            before = len(kept)
            for index, atoms, job_id in jobs:
                result = store.result(job_id)
                reference = relaxed[index][1]
                if result is None or not within_energy_window(
                    result.energy, len(atoms), reference, len(relaxed[index][0]), settings.energy_window
                ):
                    continue
                atoms = atoms.copy()
                atoms.calc = SinglePointCalculator(atoms, energy=result.energy, forces=result.forces)
                kept.append(atoms)
                if len(kept) == settings.count:
                    log.info("initial set: round %d: %d cell(s) kept of %d candidate(s)", round_index + 1, len(kept) - before, len(jobs))
                    self.observer.message(f"initial set: {len(kept)} cells kept from {round_index + 1} round(s) of candidates")
                    return kept
            log.info(
                "initial set: round %d: %d cell(s) kept of %d candidate(s) (within %g eV/atom of their relaxed cell), %d of %d so far",
                round_index + 1,
                len(kept) - before,
                len(jobs),
                settings.energy_window,
                len(kept),
                settings.count,
            )
        raise RunFailed(
            f"initial set: only {len(kept)} of {settings.count} candidate cells within energy_window = "
            f"{settings.energy_window:g} eV/atom of their relaxed cell after max_rounds = {settings.max_rounds} rounds"
        )

    def relaxed_cells(self) -> list[tuple[Atoms, float]]:
        """(relaxed cell, its energy in eV) of every prototype whose cell relaxation succeeded."""
        store = self.store
        prototypes = initial_crystals(self.settings)
        jobs = []
        for name, atoms in prototypes:
            jobs.append((name, atoms, store.add_job(store.add_structure("prototype", atoms), self.parent.name, self.relax_params)))
        self.compute([job_id for _, _, job_id in jobs], self._submit_relaxation)
        relaxed = []
        for name, atoms, job_id in jobs:
            result = store.result(job_id)
            if result is None:
                self.observer.message(f"initial set: the cell relaxation of {name} failed: {store.job(job_id).error}")
                continue
            cell = Atoms(numbers=atoms.numbers, positions=result.final_positions, cell=result.final_cell, pbc=True)
            relaxed.append((cell, result.energy))
        if not relaxed:
            raise RunFailed("initial set: every cell relaxation failed (see the messages above)")
        return relaxed

    def compute(self, job_ids: list[int], submit: Submit) -> None:
        """Compute the jobs among `job_ids` that are not done yet (none: no Parsl is started)."""
        pending = [job for job in (self.store.job(job_id) for job_id in job_ids) if job.status in ("pending", "running")]
        if pending:
            ReferenceJobRunner(self.store, self.parent, self.observer, self.workdir, submit).run(pending)

    def _submit_label(self, parent: Parent, payload: Mapping[str, Any], job_dir: str | None, attempt: int) -> Any:
        return self.apps().reference_app(parent, payload, job_dir, attempt)

    def _submit_relaxation(self, parent: Parent, payload: Mapping[str, Any], job_dir: str | None, attempt: int) -> Any:
        return self.apps().cell_relaxation_app(
            parent, payload, job_dir, attempt, fmax=self.settings.relax_fmax, steps=self.settings.relax_steps
        )


@contextmanager
def lazy_site_apps(site: str, run_dir: Path, options: Mapping[str, Any] | None) -> Iterator[Callable[[], SiteApps]]:
    """A function giving the site's apps, which loads Parsl at its first call (and cleans up at the end)."""
    with ExitStack() as stack:

        @functools.cache
        def apps() -> SiteApps:
            config = load_site(site, run_dir, options)
            stack.enter_context(parsl_session(config))
            return make_apps(config)

        yield apps


def generate_initial_set(
    database_url: str,
    campaign: str,
    parent: Parent,
    settings: InitialSetSettings,
    workdir: Path,
    site: str,
    site_options: Mapping[str, Any] | None = None,
    observer: CampaignObserver | None = None,
) -> list[Atoms]:
    """Generate (or resume generating) an initial set as campaign `campaign` of the database, its jobs'
    folders and Parsl's run directory under `workdir`; returns the kept labelled cells."""
    observer = logging_observer(observer)
    workdir.mkdir(parents=True, exist_ok=True)
    heading = f"initial set of {', '.join(settings.elements or ())}: campaign {campaign}, parent {parent.name}, site {site}"
    with (
        campaign_log(workdir, heading),
        CampaignStore.open(database_url, campaign, {"initial_generate": settings.model_dump(mode="json")}) as store,
        held_lease(store),
        lazy_site_apps(site, workdir / PARSL_DIR_NAME, site_options) as apps,
    ):
        return InitialSetGenerator(store, parent, settings, workdir, observer, apps).generate()


def with_generated_initial_set(
    config: CampaignConfig, site: str, site_options: Mapping[str, Any], observer: CampaignObserver
) -> CampaignConfig:
    """The campaign with its `[data.initial_generate]` set as `initial`: generated (or resumed) in the
    campaign's database as campaign NAME/initial, written to WORKDIR/initial.traj. The kept cells'
    jobs are the campaign's initial jobs then, done already: nothing is labelled twice."""
    settings = config.initial_generate
    assert settings is not None
    cells = generate_initial_set(
        config.database_url,
        f"{config.name}{GENERATION_SUFFIX}",
        config.parent,
        settings,
        config.workdir,
        site,
        site_options,
        observer,
    )
    write_labelled_set(config.generated_initial_file, cells)
    return dataclasses.replace(config, initial=tuple(cells))


def write_labelled_set(path: Path, cells: list[Atoms]) -> None:
    """Write the labelled cells to `path` (format from its name) atomically: all of it or nothing."""
    from ase.io import write

    try:
        with write_atomically(path) as temporary:
            write(str(temporary), cells)
    except Exception as error:
        raise RunFailed(f"{path}: cannot write the initial set ({error})") from None
