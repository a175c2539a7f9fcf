"""The NFT loop (docs/campaign.md, "The loop"): train → predict δ on the targets → converged? →
select → carve → reference jobs → store → repeat. The driver is the only writer of the database; it
writes every reference result as its future completes, so a kill loses at most the jobs in flight,
and running the same config again resumes from the database.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from pipeline.campaign import history as campaign_history
from pipeline.campaign.campaign_log import METRICS_NAME, campaign_log, log, logging_observer, write_metrics_csv
from pipeline.campaign.config import CampaignConfig, radius_warning
from pipeline.campaign.files import MODEL_NAME, SUMMARY_NAME, claim_workdir
from pipeline.campaign.identity import check_same_campaign, check_stored_campaign
from pipeline.campaign.history import (
    CONVERGED,
    SELECTION_KEYS,
    Iteration,
    MeasuredIteration,
    delta_location,
    history_entry,
    history_with_measured,
    no_new_chunks_reason,
    stall_diagnosis,
    stop_reason,
    trains_from_scratch,
)
from pipeline.campaign.observer import CampaignObserver
from pipeline.campaign.reference_jobs import ReferenceJobRunner
from pipeline.campaign.calibration import CALIBRATION_KEY, calibration, centre_predictions
from pipeline.campaign.metrics import finite_or_none, fit_determination
from pipeline.campaign.training_set import chunk_labels, training_structures
from pipeline.errors import RunFailed, error_text
from pipeline.execution.apps import SiteApps, make_apps
from pipeline.execution.payloads import TargetPrediction, labelled_to_payload
from pipeline.execution.parsl_session import parsl_session
from pipeline.execution.sites import PARSL_DIR_NAME, check_site, load_site
from pipeline.execution.training_progress import ProgressReader, progress_path
from pipeline.science.chunks import carve_chunk
from pipeline.science.selection import candidate_pool, farthest_point_reports, most_uncertain_report
from pipeline.science.structures import atoms_to_payload
from pipeline.storage.atomic import write_atomically, write_text_atomically
from pipeline.storage.lease import held_lease
from pipeline.storage.records import JobRecord
from pipeline.storage.hashing import file_sha256
from pipeline.storage.store import CampaignStore
from pipeline.storage.structure_file import stored_labels

WALL_TIME_PARTS = ("training", "prediction", "reference", "overhead")
TRAINING_STRUCTURES_KEY = "training_structures"
"""Model metric: how many labelled reference results (initial cells and chunks) the model was trained on."""
PROGRESS_POLL_S = 1.0
"""Seconds between two looks at a running training job's progress file."""


@dataclass
class IterationTimer:
    """Wall time of one iteration by part, seconds; overhead is what the parts leave of the total."""

    started: float = field(default_factory=time.perf_counter)
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WALL_TIME_PARTS[:-1], 0.0))

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] += seconds

    def split(self) -> dict[str, float]:
        total = time.perf_counter() - self.started
        parts = dict(self.parts)
        parts["overhead"] = max(0.0, total - sum(parts.values()))
        parts["total"] = total
        return parts


def run_campaign(
    config: CampaignConfig,
    site: str | None = None,
    observer: CampaignObserver | None = None,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Run or resume the campaign of `config` to its end; returns the summary (also in summary.json).

    `site` (a name in site_configs/ or a path) replaces the config's `[site] name`. `retry_failed`
    puts the campaign's failed jobs back to pending first (a finished campaign then trains on those
    that succeed). Bad input raises `BadInput` before anything is written; a run that cannot go on
    raises `RunFailed`.
    """
    observer = logging_observer(observer)
    warning = radius_warning(config.file)
    site_name = site or config.site
    site_options = dict(config.file.site.options)
    if warning:
        observer.display.message(f"warning: {warning}")  # the log has it once the workdir is the campaign's
    check_site(site_name, site_options)  # bad site or options: BadInput now
    stored = check_stored_campaign(config)  # another campaign under this name: BadInput now
    claim_workdir(config.workdir, config.name, new_campaign=not stored)  # another campaign's workdir: BadInput now
    with campaign_log(config.workdir, run_heading("nft run", config, site_name)):
        if warning:
            log.warning("warning: %s", warning)
        return _run_claimed(config, site_name, site_options, observer, retry_failed)


def run_heading(command: str, config: CampaignConfig, site_name: str) -> str:
    """The log's first line of a run: what runs which campaign where, and with which nft."""
    from pipeline import __version__

    return f"{command}: campaign {config.name} from {config.path}, site {site_name}, nft {__version__}, pid {os.getpid()}"


def _run_claimed(
    config: CampaignConfig, site_name: str, site_options: dict[str, Any], observer: CampaignObserver, retry_failed: bool
) -> dict[str, Any]:
    """`run_campaign` once the input is checked and the workdir is the campaign's."""
    if config.initial_generate is not None:
        from pipeline.campaign.initial_set import with_generated_initial_set

        config = with_generated_initial_set(config, site_name, site_options, observer)
    with (
        CampaignStore.open(config.database_url, config.name, config.as_dict(), files_root=config.workdir) as store,
        held_lease(store) as stale,
    ):
        check_same_campaign(store, config)  # again under the lease: a driver may have created it meanwhile
        if store.migration_note:
            observer.message(store.migration_note)
        if stale:
            observer.message(f"took over the driver lease of {stale} (no heartbeat, or its process is gone)")
        campaign = Campaign(config, store, observer)
        campaign.prepare(retry_failed)
        reason = None
        if campaign.finished_reason() is None or campaign.pending_jobs():
            parsl_config = load_site(site_name, config.workdir / PARSL_DIR_NAME, site_options)
            with parsl_session(parsl_config):
                reason = Driver(campaign, make_apps(parsl_config)).run()
        else:
            observer.message(f"campaign already finished ({campaign.finished_reason()}); nothing to run")
        return campaign.finish(reason)


class Campaign:
    """A campaign's records over one store, as a driver keeps them: set-up, selection and carving,
    recording iterations, the kept model and the summary; all database writes of a campaign happen
    here. Needs no Parsl: the `Driver` runs the jobs."""

    def __init__(self, config: CampaignConfig, store: CampaignStore, observer: CampaignObserver) -> None:
        self.config = config
        self.store = store
        self.observer = observer
        self.parent = config.parent
        self.calculator = config.parent.name
        self.job_params = config.parent.physics()  # what identifies a reference job in the store
        self.target_ids: list[int] = []
        self.target_atoms: dict[int, Atoms] = {}

    # -- set-up --------------------------------------------------------------------------------

    def prepare(self, retry_failed: bool = False) -> None:
        """Register the targets and initial set (labels from the file where present); with
        `retry_failed`, the campaign's failed jobs go back to pending (attempts kept)."""
        store, config = self.store, self.config
        for atoms in config.targets:
            target_id = store.add_structure("target", atoms)
            if target_id not in self.target_atoms:
                self.target_ids.append(target_id)
                self.target_atoms[target_id] = store.atoms(target_id)
        labelled = 0
        for atoms in config.initial:
            structure_id = store.add_structure("initial", atoms)
            job_id = store.add_job(structure_id, self.calculator, self.job_params)
            labels = stored_labels(atoms)
            if labels is not None and labels.energy is not None and store.job(job_id).status != "done":
                store.store_result(job_id, labels.energy, labels.forces, host="input file")  # no calculation ran: no wall time
                labelled += 1
        self.repair_chunks()
        reset = store.reset_unfinished()
        if retry_failed:
            self.observer.message(f"{store.reset_unfinished(include_failed=True)} failed reference job(s) back to pending")
        history = store.iterations()
        if history or reset:
            done = sum(1 for job in store.jobs() if job.status == "done")
            self.observer.message(
                f"resuming: {len(history)} iteration(s) recorded, {done} reference job(s) done, {reset} interrupted job(s) back to pending"
            )
        if labelled:
            self.observer.message(f"initial set: {labelled} structure(s) labelled in the input file")

    def repair_chunks(self) -> None:
        """Make the campaign's chunks those of its recorded iterations, each with its reference job,
        as an uninterrupted run has them. Carving is one transaction with its iteration's record
        now; a database from an older nft killed while carving may hold chunks carved after the last
        recorded iteration (its selection will run again from the same model and pick them again:
        they are forgotten, their results kept for reuse) and chunks without a job (given theirs)."""
        store = self.store
        chunks = store.structures("chunk")  # in the order they were carved
        counted = sum(record.chunks_added for record in store.iterations())
        unrecorded = chunks[counted:]
        if unrecorded:
            store.forget_structures([chunk.id for chunk in unrecorded])
            self.observer.message(
                f"{len(unrecorded)} chunk(s) carved by an interrupted selection whose iteration was not recorded: it runs again"
            )
        with_job = {
            job.structure_id for job in store.jobs(kind="chunk") if job.calculator == self.calculator and job.params == self.job_params
        }
        jobless = [chunk for chunk in chunks[:counted] if chunk.id not in with_job]
        if jobless:
            with store.transaction():
                for chunk in jobless:
                    store.add_job(chunk.id, self.calculator, self.job_params)
            self.observer.message(f"{len(jobless)} chunk(s) without a reference job (an interrupted carving): job(s) added")

    def pending_jobs(self) -> list[JobRecord]:
        """The campaign's jobs without a result: pending, or running under another campaign's driver."""
        return [job for job in self.store.jobs() if job.status in ("pending", "running")]

    def finished_reason(self) -> str | None:
        """Why the recorded history says the campaign is over, or None if it should go on."""
        return stop_reason(self.store.iterations(), self.config)

    # -- selection, carving and records -------------------------------------------------------

    def target_deltas(self, predictions: Sequence[TargetPrediction]) -> dict[int, float]:
        """δ (eV/Å) per target id, from one prediction per target in the campaign's target order."""
        return {target_id: item.max_delta for target_id, item in zip(self.target_ids, predictions)}

    def record_iteration(
        self,
        number: int,
        model_path: Path,
        model_metrics: Mapping[str, Any],
        predictions: Sequence[TargetPrediction],
        train_force_mae: float | None,
        timer: IterationTimer,
        chunks_added: int = 0,
        carved: bool = False,
    ) -> None:
        """Record iteration `number`: its model (file and metrics) and its row (δ per target from
        `predictions`, chunks added, train force MAE eV/Å, the wall time so far, whether it carved)."""
        self.store.record_model(number, model_path, model_metrics)
        self.store.record_iteration(number, self.target_deltas(predictions), chunks_added, train_force_mae, timer.split(), carved=carved)

    def select(
        self, predictions: Sequence[TargetPrediction], parents: Mapping[int, Atoms] | None = None
    ) -> tuple[list[tuple[int, int]], dict[str, int]]:
        """Chunk centres (parent id, atom) over the parent structures (the targets, or `parents`: id
        → atoms in the order of `predictions`, e.g. a relaxation snapshot), at most
        `chunks.max_per_iteration`, by `active.selection_rule`: most uncertain first (by δ_i, or by
        δE_i with `active.selection_uncertainty = "energy"`), or farthest-point in descriptor space
        when the predictions carry features; and the selection's counts summed over the parents (see
        `SelectionReport`; centres cut by the limit over all parents count as `over_limit`)."""
        config, store = self.config, self.store
        parents = self.target_atoms if parents is None else parents
        chunks, active = config.file.chunks, config.file.active
        limit = chunks.max_per_iteration
        failed = self._failed_chunk_centers(parents)
        pools = []
        trained = []
        for target_id, prediction in zip(parents, predictions):
            trained.append(store.chunk_centers(target_id, chunks.radius))
            pools.append(
                candidate_pool(
                    prediction.uncertainties,
                    parents[target_id],
                    None if active.select_fraction is not None else config.threshold,
                    exclude=trained[-1],
                    select_fraction=active.select_fraction,
                    failed=failed.get(target_id, set()),
                    ranking=_selection_ranking(prediction, active.selection_uncertainty),
                )
            )
        parent_ids = list(parents)
        features = [prediction.features for prediction in predictions if prediction.features is not None]
        if active.selection_rule == "farthest-point" and len(features) == len(predictions):
            elements = [parents[target_id].numbers for target_id in parent_ids]  # rows compared within an element
            picks, reports = farthest_point_reports(pools, features, elements, trained, limit, config.min_separation)
            centres = [(parent_ids[position], atom) for position, atom in picks]
            over_limit = 0
        else:  # most uncertain first; also for relaxation snapshots, whose predictions carry no features
            reports = [most_uncertain_report(pool, limit, config.min_separation) for pool in pools]
            candidates = [
                (float(pool.priority[centre]), target_id, centre)
                for target_id, pool, report in zip(parent_ids, pools, reports)
                for centre in report.picked
            ]
            candidates.sort(key=lambda item: (-item[0], item[1], item[2]))
            centres = [(target_id, centre) for _, target_id, centre in candidates[:limit]]
            over_limit = len(candidates) - len(centres)
        counts = {key: sum(report.counts()[key] for report in reports) for key in SELECTION_KEYS[:-1]}
        counts["over_limit"] += over_limit
        counts["selected"] = len(centres)
        return centres, counts

    def add_chunks(self, centres: Sequence[tuple[int, int]], parents: Mapping[int, Atoms] | None = None) -> int:
        """Carve the chunks around `centres` (parent id, atom; parents are the targets unless given)
        and store them with a pending reference job each, in one transaction (a kill leaves all of
        them or none: never a chunk without its job); returns how many were added."""
        settings = self.config.file.chunks
        parents = self.target_atoms if parents is None else parents
        carved = [(target_id, carve_chunk(parents[target_id], centre, settings.radius, settings.vacuum)) for target_id, centre in centres]
        with self.store.transaction():
            for target_id, chunk in carved:
                structure_id = self.store.add_structure(
                    "chunk",
                    chunk.atoms,
                    parent_id=target_id,
                    center_in_parent=chunk.center_in_parent,
                    center_in_chunk=chunk.center_in_chunk,
                    radius=chunk.radius,
                    vacuum=chunk.vacuum,
                )
                self.store.add_job(structure_id, self.calculator, self.job_params)
        return len(centres)

    def chunk_centre_labels(self) -> dict[int, dict[int, np.ndarray]]:
        """Per target id, the label of every chunk centre with a done reference job (`chunk_labels`)."""
        return chunk_labels(self.store, self.calculator, self.job_params, self.target_atoms)

    def _failed_chunk_centers(self, parents: Mapping[int, Atoms]) -> dict[int, set[int]]:
        """Per parent id, the centres (at the configured radius) of chunks whose reference job failed."""
        radius = self.config.file.chunks.radius
        failed: dict[int, set[int]] = {}
        for job in self.store.jobs(status="failed", kind="chunk"):
            if job.calculator != self.calculator:
                continue
            structure = self.store.structure(job.structure_id)
            parent = structure.parent_id
            if parent is not None and parent in parents and abs(structure.chunk_radius - radius) < 1e-6:
                failed.setdefault(parent, set()).add(structure.parent_center)
        return failed

    def recorded_metrics(self) -> dict[int, dict[str, Any]]:
        """The recorded model metrics per iteration."""
        return {record.iteration: record.metrics for record in self.store.models()}

    def write_metrics(self) -> None:
        """Write WORKDIR/metrics.csv from the database: one row per recorded iteration (`campaign_log`)."""
        metrics = self.recorded_metrics()
        entries = [history_entry(record, metrics.get(record.iteration)) for record in self.store.iterations()]
        write_metrics_csv(self.config.workdir / METRICS_NAME, entries, metrics)

    # -- the end -------------------------------------------------------------------------------

    def finish(self, reason: str | None = None) -> dict[str, Any]:
        """Write summary.json (docs/campaign.md, "WORKDIR/summary.json": with the wall-time split and,
        for a cheap parent such as EMT, the final model's force MAE) and return it; the stop reason
        is `reason` (the driver's) or the recorded history's."""
        config, store = self.config, self.store
        history = store.iterations()
        reason = reason or stop_reason(history, config)
        best = self.keep_best_model()
        summary_counts = store.summary()
        best_iteration = campaign_history.best_iteration(history)
        metrics = self.recorded_metrics()
        numbers = campaign_history.target_numbers(store, config)
        entries = [campaign_history.numbered_targets(history_entry(record, metrics.get(record.iteration)), numbers) for record in history]
        wall = {part: sum(entry["wall_time"].get(part, 0.0) for entry in entries) for part in (*WALL_TIME_PARTS, "total")}
        summary: dict[str, Any] = {
            "converged": reason == CONVERGED,
            "iterations": len(history),
            "final_uncertainty": best_iteration.max_delta if best_iteration else None,
            "chunks": summary_counts.chunks,
            "reference_atoms": summary_counts.reference_atoms,
            "model": str(best) if best else None,
            "history": entries,
            "threshold": config.threshold,
            "stop_reason": reason,
            "best_iteration": best_iteration.iteration if best_iteration else None,
            "best_model": self._model_path(best_iteration.iteration) if best_iteration else None,
            "last_iteration": history[-1].iteration if history else None,
            "last_model": self._model_path(history[-1].iteration) if history else None,
            "jobs": summary_counts.jobs,
            "wall_time": wall,
            "stall": stall_diagnosis(entries[-1], reason, config) if entries else None,
            "calibration": calibration(metrics, self.chunk_centre_labels(), members=self.config.file.model.ensemble),
        }
        if summary["calibration"]["warning"]:
            self.observer.message(summary["calibration"]["warning"])
        if self.parent.evaluates_targets and best_iteration is not None:
            summary["force_mae_vs_parent"] = self._force_mae_vs_parent(config.workdir / MODEL_NAME)
        if summary["stall"] is not None:
            self.observer.message(f"not converged ({reason}): a {summary['stall']['kind']} problem. {summary['stall']['advice']}")
        _write_json(config.workdir / SUMMARY_NAME, summary)
        self.write_metrics()
        log.info(
            "campaign %s: %s after %d iteration(s); best δ %s eV/Å (threshold %g) at iteration %s; %d chunk(s); model %s",
            config.name,
            "converged" if summary["converged"] else f"not converged ({reason})",
            summary["iterations"],
            "-" if summary["final_uncertainty"] is None else f"{summary['final_uncertainty']:.4f}",
            config.threshold,
            summary["best_iteration"],
            summary["chunks"],
            summary["model"],
        )
        return summary

    def _force_mae_vs_parent(self, model_path: Path) -> dict[str, float]:
        """Force MAE (eV/Å, over all components) of the kept model against the parent on every target."""
        from pipeline.execution.evaluation import evaluate_model

        targets = [self.target_atoms[target_id] for target_id in self.target_ids]
        evaluation = evaluate_model(model_path, targets, self.parent, self.config.file.model.device, skip_failed=True)
        errors = {}
        for k, (atoms, item) in enumerate(zip(targets, evaluation.structures)):
            mae = item.force_mae
            if item.failure is not None or mae is None:
                self.observer.message(f"no force MAE for target {k}: {item.failure}")
                continue
            errors[f"target {k}"] = mae
            self.observer.message(f"final model vs {self.parent.name.upper()} on target {k} ({len(atoms)} atoms): force MAE {mae:.4f} eV/Å")
        return errors

    def _model_path(self, iteration: int) -> str | None:
        """The stored model file of `iteration` (models/iteration-NNN.nft), or None."""
        return next((record.path for record in self.store.models() if record.iteration == iteration), None)

    def keep_best_model(self) -> Path | None:
        """Copy the model of the lowest-δ iteration to WORKDIR/model.nft (when it changed)."""
        record = campaign_history.best_model(self.store.models(), self.store.iterations())
        if record is None or not Path(record.path).is_file():
            return None
        source = self.store.model_file(record)
        destination = self.config.workdir / MODEL_NAME
        if not destination.is_file() or file_sha256(destination) != record.sha256:
            with write_atomically(destination) as temporary:
                shutil.copyfile(source, temporary)
        return destination

    def last_iteration(self) -> int:
        """The number of the last recorded iteration (0: none yet)."""
        history = self.store.iterations()
        return history[-1].iteration if history else 0


class Driver:
    """One run of the loop: a campaign (`Campaign`, which records everything) and its site's apps,
    which run the training, prediction and reference jobs."""

    def __init__(self, campaign: Campaign, apps: SiteApps) -> None:
        self.campaign = campaign
        self.apps = apps
        self.config = campaign.config
        self.store = campaign.store
        self.observer = campaign.observer

    def run(self) -> str | None:
        """Run the loop until the campaign stops; returns why (`history.stop_reason`'s reasons)."""
        timer = IterationTimer()  # the first iteration also pays for Parsl's start and leftover jobs
        pending = self.campaign.pending_jobs()
        labelled = 0
        if pending:
            self.observer.message(f"{len(pending)} pending reference job(s) from set-up or an earlier run")
            started = time.perf_counter()
            labelled = self.run_reference_jobs(pending)
            timer.add("reference", time.perf_counter() - started)
        reason = self.carve_for_stopped_iteration()
        if reason is not None and labelled:  # results after the campaign stopped (--retry-failed): train on them
            self.observer.message(f"{labelled} new result(s) since the campaign stopped ({reason}): one more iteration")
            reason = None
        while reason is None:
            reason = self.iteration(self.campaign.last_iteration() + 1, timer)
            timer = IterationTimer()
        return reason

    def iteration(self, number: int, timer: IterationTimer) -> str | None:
        """One NFT iteration; returns the stop reason when the campaign ends with it."""
        model_path, metrics = self.train(number, timer)
        if determination := fit_determination(metrics):
            self.observer.message(f"iteration {number}: {determination}")
        predictions, model_metrics = self.measure(number, model_path, metrics, timer)
        draft = history_with_measured(self.store.iterations(), number, model_metrics["max_delta"])
        train_mae = finite_or_none(metrics.get("train_force_mae"))
        return self.select_and_compute(number, model_path, model_metrics, predictions, train_mae, timer, draft)

    def measure(
        self, number: int, model_path: Path, metrics: Mapping[str, Any], timer: IterationTimer
    ) -> tuple[list[TargetPrediction], dict[str, Any]]:
        """δ of iteration `number`'s model on the targets: the predictions (one per target) and the
        metrics to record with the model (training metrics, max δ and δE, where δ lives)."""
        self.observer.phase(number, "prediction")
        started = time.perf_counter()
        predictions = self._predict(model_path)
        timer.add("prediction", time.perf_counter() - started)
        labels = self.campaign.chunk_centre_labels()
        target_ids = self.campaign.target_ids
        model_metrics = {
            **_plain(metrics),
            "max_delta": max(item.max_delta for item in predictions),
            "max_energy_delta": max(item.max_energy_delta for item in predictions),
            "training_environment": self.config.file.chunks.training_environment,
            "delta_location": delta_location(predictions, [labels.get(target_id, {}) for target_id in target_ids]),
        }
        return predictions, model_metrics

    def train(self, number: int, timer: IterationTimer) -> tuple[Path, dict[str, Any]]:
        """Train iteration `number`'s model on every labelled structure of the campaign (through the
        DAG); returns its file (models/iteration-NNN.nft) and the training metrics, which record how
        many labelled reference results it saw (chunk rows of one target share a training structure)."""
        config = self.config
        calculator, job_params = self.campaign.calculator, self.campaign.job_params
        results = len(self.store.labelled_structures(calculator, job_params))
        training_set = training_structures(
            self.store, calculator, job_params, config.file.chunks.training_environment, config.file.model.cutoff
        )
        if not training_set:
            raise RunFailed("no labelled structures to train on: every reference job of the initial set failed")
        self.observer.phase(number, "training")
        model_path = config.workdir / "models" / f"iteration-{number:03d}.nft"
        started = time.perf_counter()
        warm_start = self._warm_start_model(number)
        model = config.file.model
        log.info(
            "iteration %d: training %d member(s) on %d structure(s) (%d reference result(s)) with %s, from %s",
            number,
            model.ensemble,
            len(training_set),
            results,
            model.optimizer,
            f"the weights of {Path(warm_start).name} (warm start)" if warm_start else "fresh weights",
        )
        arguments = (
            [labelled_to_payload(item) for item in training_set],
            model.model_dump(mode="json"),
            str(model_path),
            model.training_processes,
            warm_start,
            list(config.elements),
        )
        progress = ProgressReader(progress_path(model_path))

        def submit() -> Any:
            progress.restart()  # a submission after a lost worker starts a fresh file
            return self.apps.training_app(*arguments, progress_path=str(progress.path))

        def forward_progress() -> None:
            for report in progress.new_reports():
                self.observer.training_progress(number, report)

        metrics = self._result(submit, "training", while_waiting=forward_progress)
        progress.restart()  # the log holds what it said
        timer.add("training", time.perf_counter() - started)
        self._log_training(number, metrics, time.perf_counter() - started)
        return model_path, {**metrics, TRAINING_STRUCTURES_KEY: results}

    def _log_training(self, number: int, metrics: Mapping[str, Any], seconds: float) -> None:
        """The end of iteration `number`'s training in the log; its outlier refits also on the display."""
        validation = finite_or_none(metrics.get("validation_force_mae"))
        log.info(
            "iteration %d: trained in %.1f s (%s, world size %s): %s epoch(s), final loss %s, train force MAE %s eV/Å%s%s",
            number,
            seconds,
            metrics.get("device", "?"),
            metrics.get("world_size", 1),
            metrics.get("epochs_run", "?"),
            _float_text(metrics.get("final_loss")),
            _float_text(metrics.get("train_force_mae")),
            "" if validation is None else f", validation {validation:.4f} eV/Å",
            ", warm-started" if metrics.get("warm_started") else "",
        )
        refitted = list(metrics.get("reset_members") or ())
        if refitted:
            self.observer.message(
                f"iteration {number}: {len(refitted)} outlier member(s) refitted from fresh starts (seeds {', '.join(map(str, refitted))})"
            )

    def select_and_compute(
        self,
        number: int,
        model_path: Path,
        model_metrics: dict[str, Any],
        predictions: Sequence[TargetPrediction],
        train_mae: float | None,
        timer: IterationTimer,
        draft: Sequence[Iteration],
    ) -> str | None:
        """The second half of iteration `number` (its model trained and δ measured): stop, or carve
        chunks and compute them; record the model and the iteration; returns the stop reason."""
        campaign, config, store, observer = self.campaign, self.config, self.store, self.observer
        deltas = campaign.target_deltas(predictions)
        reason = stop_reason(draft, config)
        chunks_added = 0
        carved = reason is None
        if carved:
            observer.phase(number, "selection")
        centres, selection = campaign.select(predictions)  # also when stopping: the report says what was left
        if reason is not None:
            log.info(
                "iteration %d: the campaign stops: %s (max δ %.4f eV/Å, threshold %g)",
                number,
                reason,
                max(deltas.values()),
                config.threshold,
            )
        with store.transaction():  # the chunks, their jobs, the model and the iteration: all or none
            if carved:
                chunks_added = campaign.add_chunks(centres)
                model_metrics[CALIBRATION_KEY] = centre_predictions(centres, predictions, campaign.target_ids)
                if chunks_added == 0:
                    reason = no_new_chunks_reason(draft, config)
            model_metrics["selection"] = {**selection, "carved": carved}
            campaign.record_iteration(
                number, model_path, model_metrics, predictions, train_mae, timer, chunks_added=chunks_added, carved=carved
            )
        if carved:
            log.info(
                "iteration %d: selection: %d chunk(s) carved (%s)%s",
                number,
                chunks_added,
                ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in selection.items()),
                f"; the campaign stops: {reason}" if reason is not None else "",
            )
        campaign.keep_best_model()
        if reason is None:
            observer.phase(number, "reference jobs")
            started = time.perf_counter()
            self.run_reference_jobs(campaign.pending_jobs())
            timer.add("reference", time.perf_counter() - started)
            store.record_iteration(number, deltas, chunks_added, train_mae, timer.split(), carved=carved)
        campaign.write_metrics()
        observer.iteration_done(history_entry(store.iterations()[-1], campaign.recorded_metrics().get(number)))
        return reason

    def carve_for_stopped_iteration(self) -> str | None:
        """When the last iteration stopped the campaign before selection and the config now lets it
        go on (a raised `max_iterations` or `patience`, a lower threshold), carve and compute its
        chunks from its own model, as it would have; returns the stop reason (None: go on)."""
        history = self.store.iterations()
        if not history or history[-1].carved:
            return self.campaign.finished_reason()
        last = history[-1]
        draft: list[Iteration] = [*history[:-1], MeasuredIteration(last.iteration, last.max_delta)]
        if stop_reason(draft, self.config) is not None:
            return stop_reason(draft, self.config)
        model = next(record for record in self.store.models() if record.iteration == last.iteration)
        self.observer.message(f"iteration {last.iteration} stopped before selection; the config now goes on: carving its chunks")
        timer = IterationTimer()
        timer.parts.update({part: value for part, value in last.wall_time.items() if part in timer.parts})
        model_path = self.store.model_file(model)
        predictions = self._predict(model_path)
        metrics = {key: value for key, value in model.metrics.items() if key not in ("selection", CALIBRATION_KEY)}
        return self.select_and_compute(last.iteration, model_path, metrics, predictions, last.train_force_mae, timer, draft)

    def _warm_start_model(self, number: int) -> str | None:
        """The latest earlier iteration's model file, to start training from (None: from scratch,
        also when the warm start before found nothing new and did not lower δ: `trains_from_scratch`)."""
        if not self.config.file.model.warm_start:
            return None
        if trains_from_scratch(self.store.iterations(), number):
            self.observer.message(
                f"iteration {number}: the last warm start found no new chunk and did not lower δ; training from fresh weights"
            )
            return None
        earlier = [record for record in self.store.models() if record.iteration < number and Path(record.path).is_file()]
        return str(self.store.model_file(earlier[-1])) if earlier else None

    def _predict(self, model_path: Path) -> list[TargetPrediction]:
        """The model's prediction on each target, in the campaign's target order."""
        payloads = [atoms_to_payload(self.campaign.target_atoms[target_id]) for target_id in self.campaign.target_ids]
        with_features = self.config.file.active.selection_rule == "farthest-point"
        device = self.config.file.model.device
        return self._result(lambda: self.apps.prediction_app(str(model_path), payloads, device, with_features), "prediction")

    def run_reference_jobs(self, jobs: Sequence[JobRecord]) -> int:
        """Compute the jobs through the DAG into the store (`ReferenceJobRunner`); how many are done."""
        runner = ReferenceJobRunner(self.store, self.campaign.parent, self.observer, self.config.workdir, self.apps.reference_app)
        return runner.run(jobs)

    def _result(self, submit: Callable[[], Any], what: str, while_waiting: Callable[[], None] | None = None) -> Any:
        """The result of a training or prediction job, `submit()` returning its future. A job whose
        worker was lost (its worker pool or node gone) is submitted again, to run on the executor's
        fresh block, at most `lost_worker_retries` times, each with the reason shown; any other
        failure, or one loss too many, fails the run (RunFailed). `while_waiting()` is called every
        `PROGRESS_POLL_S` while the job runs, and once when it has ended."""
        apps = self.apps
        lost = 0
        while True:
            try:
                future = submit()
                if while_waiting is not None:
                    while not wait([future], timeout=PROGRESS_POLL_S).done:
                        while_waiting()
                    while_waiting()
                return future.result()
            except Exception as error:
                lines = [line for line in error_text(error).splitlines() if line.strip()]
                detail = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1].strip()}"
                if not apps.is_lost_worker(error):
                    raise RunFailed(f"{what} job failed: {detail}") from error
                lost += 1
                if lost > apps.lost_worker_retries:
                    raise RunFailed(f"{what} job failed: its worker was lost {lost} times; the last: {detail}") from error
                self.observer.message(
                    f"{what} job lost its worker ({detail}); submitting it again (retry {lost} of {apps.lost_worker_retries})"
                )


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _float_text(value: Any) -> str:
    """A metric in the log: 4 significant digits, "-" when missing or not finite."""
    number = finite_or_none(value)
    return "-" if number is None else f"{number:.4g}"


def _selection_ranking(prediction: TargetPrediction, measure: str) -> np.ndarray:
    """What orders a target's atoms for selection: δ_i (eV/Å) for "force", δE_i (eV) for "energy"."""
    return prediction.energy_uncertainties if measure == "energy" else prediction.uncertainties


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as plain JSON (NaN and infinities become null)."""
    finite = {key: (None if isinstance(value, float) and not math.isfinite(value) else value) for key, value in metrics.items()}
    return json.loads(json.dumps(finite, default=str))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (`write_text_atomically`)."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")
