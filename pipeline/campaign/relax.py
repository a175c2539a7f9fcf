"""`nft relax`: relaxation with uncertainty in a campaign (docs/campaign.md, "Relaxation with
uncertainty"). The science (`science.relaxation`) decides when to ask for a better model; this
module answers: it stores the uncertain geometry as a `snapshot`, carves chunks there with the loop's
selection, computes them through the campaign's DAG and database (`ReferenceJobRunner`) and trains
the next iteration of the campaign. Outputs are written as the relaxation goes, so a killed run
resumes: the database holds snapshots, chunk jobs and models, `OUT-steps.json` the last geometry.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.io import iread, read, write

from pipeline.campaign.campaign_log import campaign_log, logging_observer
from pipeline.campaign.config import CampaignConfig
from pipeline.campaign.files import RELAXATIONS_NAME, check_workdir_owner
from pipeline.campaign.identity import check_same_campaign
from pipeline.campaign.history import history_entry
from pipeline.campaign.loop import TRAINING_STRUCTURES_KEY, Campaign, Driver, IterationTimer, run_heading
from pipeline.campaign.metrics import finite_or_none
from pipeline.campaign.observer import CampaignObserver
from pipeline.campaign.status import open_existing_store
from pipeline.errors import BadInput
from pipeline.execution.apps import make_apps
from pipeline.execution.payloads import TargetPrediction
from pipeline.execution.parsl_session import parsl_session
from pipeline.execution.sites import PARSL_DIR_NAME, check_site, load_site
from pipeline.science.calculator import EnsembleCalculator
from pipeline.science.initial_sets import element_symbols
from pipeline.science.structures import ase_can_write
from pipeline.science.relaxation import (
    DEFAULT_FMAX,
    DEFAULT_MAX_STEPS,
    DEFAULT_OPTIMIZER,
    OPTIMIZERS,
    Improvement,
    RelaxationStep,
    relax_with_uncertainty,
)
from pipeline.storage.lease import held_lease, this_process
from pipeline.storage.model_file import load_ensemble
from pipeline.storage.atomic import write_atomically, write_text_atomically
from pipeline.storage.hashing import atoms_geometry_hash

RELAXATION_KEY = "relaxation"
"""Model metric of an iteration trained by `nft relax`: the snapshot and step it was trained for."""
STEP_COLUMNS = ("step", "model", "energy", "fmax", "delta", "chunks_added")


@dataclass(frozen=True)
class RelaxOutputs:
    """The files of one relaxation: OUT (the relaxed structure), and beside it the trajectory (every
    evaluation, per-atom δ_i in `arrays["delta"]`) and the steps table as CSV and JSON (the JSON
    also holds the geometry to resume from)."""

    structure: Path

    @property
    def trajectory(self) -> Path:
        return self.structure.with_name(self.structure.stem + "-trajectory.extxyz")

    @property
    def steps_csv(self) -> Path:
        return self.structure.with_name(self.structure.stem + "-steps.csv")

    @property
    def steps_json(self) -> Path:
        return self.structure.with_name(self.structure.stem + "-steps.json")


def check_relax_options(fmax: float, optimizer: str, steps: int) -> None:
    """BadInput naming the option when fmax (eV/Å), the optimizer name or the step limit is unusable."""
    if not (np.isfinite(fmax) and fmax > 0):
        raise BadInput(f"--fmax: must be a positive force in eV/Å, not {fmax}")
    if optimizer not in OPTIMIZERS:
        raise BadInput(f"--relax-optimizer: must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
    if steps < 0:
        raise BadInput(f"--steps: must be 0 or more, not {steps}")


def relax_structure(
    config: CampaignConfig,
    atoms: Atoms,
    structure_label: str,
    output: Path,
    fmax: float = DEFAULT_FMAX,
    optimizer: str = DEFAULT_OPTIMIZER,
    max_steps: int = DEFAULT_MAX_STEPS,
    site: str | None = None,
    observer: CampaignObserver | None = None,
) -> dict[str, Any]:
    """Relax `atoms` with the campaign's latest model, adding chunks where δ exceeds the campaign's
    threshold; writes the outputs (`RelaxOutputs`) and returns the summary (the steps JSON).

    Bad input (options, elements the model lacks, an output format ASE cannot write, no trained
    model in the campaign) raises `BadInput` before anything is written. Run again with the same
    structure and OUT, it resumes from the last geometry written.
    """
    observer = logging_observer(observer)
    check_relax_options(fmax, optimizer, max_steps)
    unknown = sorted(set(int(z) for z in atoms.numbers) - set(config.elements))
    if unknown:
        raise BadInput(
            f"{structure_label}: element(s) {' '.join(element_symbols(unknown))} not in the campaign's initial set "
            f"({' '.join(element_symbols(config.elements))})"
        )
    if not ase_can_write(output):
        raise BadInput(f"-o: {output.name}: ASE has no writer for this file name (use e.g. .traj, .extxyz, .xyz)")
    site_name = site or config.site
    site_options = dict(config.file.site.options)
    check_site(site_name, site_options)  # bad site or options: BadInput now
    outputs = RelaxOutputs(output)
    check_workdir_owner(config.workdir, config.name)
    with open_existing_store(config) as store:
        if not store.models():
            raise BadInput(f"{config.path.name}: campaign {config.name} has no trained model yet (run `nft run {config.path.name}` first)")
        check_same_campaign(store, config)
        store.model_file(store.models()[-1])  # the model it starts from is the one recorded: BadInput now
        with (
            held_lease(store),  # one driver at a time: nft run and nft relax take turns
            campaign_log(config.workdir, run_heading(f"nft relax {structure_label} -o {output}", config, site_name)),
        ):
            output.parent.mkdir(parents=True, exist_ok=True)
            _register_relaxation(config, outputs.steps_json)
            campaign = Campaign(config, store, observer)
            campaign.prepare()
            parsl_config = load_site(site_name, config.workdir / PARSL_DIR_NAME, site_options)
            with parsl_session(parsl_config):
                driver = Driver(campaign, make_apps(parsl_config))
                return _Relaxation(driver, outputs, atoms, fmax, optimizer, max_steps).run()


class _Relaxation:
    """One run of `nft relax` over one campaign driver: the callback the science asks for a better
    model, and the outputs written as it goes."""

    def __init__(self, driver: Driver, outputs: RelaxOutputs, start: Atoms, fmax: float, optimizer: str, max_steps: int) -> None:
        self.driver = driver
        self.campaign = driver.campaign
        self.store = driver.store
        self.config = driver.config
        self.observer = driver.observer
        self.outputs = outputs
        self.start = start
        self.fmax = fmax
        self.optimizer = optimizer
        self.max_steps = max_steps
        self.started = time.perf_counter()
        self.state = self._resumed_state()
        self.trained_on = 0  # labelled structures the current model was trained on (set by run)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = self.state["steps"]
        if self.state.get("finished"):
            self.observer.message(f"already relaxed ({self.outputs.steps_json.name}): nothing to run")
            if not self.outputs.structure.is_file():
                write(str(self.outputs.structure), read_last_frame(self.outputs.trajectory))
            return self.summary()
        current = _atoms_from_state(self.state["current"]) if rows else self.start.copy()
        if rows:
            self.observer.message(f"resuming the relaxation at step {rows[-1]['step']} ({len(rows)} evaluation(s) written)")
        self._trim_trajectory(len(rows))
        leftover = self.campaign.pending_jobs()
        if leftover:
            self.observer.message(f"{len(leftover)} pending reference job(s) from an earlier run")
            self.driver.run_reference_jobs(leftover)
        model = self.store.models()[-1]
        self.trained_on = int(model.metrics.get(TRAINING_STRUCTURES_KEY, self._labelled_count()))
        if self._labelled_count() > self.trained_on:  # results a killed run computed but did not train on
            self._retrain(snapshot_id=None, step=rows[-1]["step"] if rows else 0)
            model = self.store.models()[-1]
        result = relax_with_uncertainty(
            current,
            self._calculator(Path(model.path)),
            self.config.threshold,
            self.improve,
            fmax=self.fmax,
            optimizer=self.optimizer,
            max_steps=self.max_steps,
            first_step=rows[-1]["step"] if rows else 0,
            model=model.iteration,
            on_frame=self.frame,
        )
        self.state.update(reason=result.reason, converged=result.converged, finished=True)
        self._write_state()
        write(str(self.outputs.structure), result.atoms)
        return self.summary()

    def improve(self, frame: Atoms, results: Mapping[str, Any]) -> Improvement | None:
        """Store the geometry as a snapshot, carve chunks around its most uncertain atoms (the loop's
        selection), compute them and train the next iteration; None when nothing new was learnt."""
        store, campaign = self.store, self.campaign
        frame.calc = None
        prediction = TargetPrediction(
            energy=results["energy"],
            forces=results["forces"],
            uncertainties=results["uncertainties"],
            energy_uncertainties=results["energy_uncertainties"],
        )
        with store.transaction():  # the snapshot, its chunks with their jobs and their count: all or none
            snapshot_id = store.add_structure("snapshot", frame)
            parents = {snapshot_id: frame}
            centres, selection = campaign.select([prediction], parents)
            added = campaign.add_chunks(centres, parents)
            if added:
                self._count_chunks(added)
        self.observer.message(
            f"δ {prediction.max_delta:.3f} eV/Å above the threshold {self.config.threshold:g}: "
            f"snapshot {snapshot_id}, {added} chunk(s) added ({selection['already_chunked']} already chunked)"
        )
        pending = campaign.pending_jobs()
        if pending:
            self.driver.run_reference_jobs(pending)
        if self._labelled_count() <= self.trained_on:
            self.observer.message("no new reference result to learn from here: relaxing on with this model")
            return None
        number = self._retrain(snapshot_id, int(frame.info["step"]))
        model = self.store.models()[-1]
        return Improvement(self._calculator(Path(model.path)), added, number)

    def frame(self, atoms: Atoms, row: RelaxationStep) -> None:
        """Write one evaluation: a trajectory frame, the steps table and the geometry to resume from."""
        atoms.info.update(step=row.step, fmax=row.fmax, max_delta=row.delta, chunks_added=row.chunks_added)
        if row.model is not None:
            atoms.info["model_iteration"] = row.model
        write(str(self.outputs.trajectory), atoms, format="extxyz", append=True)
        self.state["steps"].append(row.as_dict())
        self.state["current"] = _state_geometry(atoms)
        self._write_state()
        self.observer.message(
            f"step {row.step}: E {row.energy:.4f} eV, fmax {row.fmax:.4f} eV/Å, δ {row.delta:.4f} eV/Å"
            + (f", {row.chunks_added} chunk(s) added" if row.chunks_added else "")
        )

    # -- training -------------------------------------------------------------------------------

    def _retrain(self, snapshot_id: int | None, step: int) -> int:
        """Train the campaign's next iteration on everything labelled, record it like the loop's
        (δ on the targets, no selection on them); returns its number."""
        driver, campaign, store = self.driver, self.campaign, self.store
        number = campaign.last_iteration() + 1
        timer = IterationTimer()
        model_path, metrics = driver.train(number, timer)
        predictions, model_metrics = driver.measure(number, model_path, metrics, timer)
        model_metrics[RELAXATION_KEY] = {"snapshot": snapshot_id, "step": step, "structure": str(self.outputs.structure)}
        campaign.record_iteration(number, model_path, model_metrics, predictions, finite_or_none(metrics.get("train_force_mae")), timer)
        campaign.keep_best_model()
        campaign.write_metrics()
        self.trained_on = int(metrics[TRAINING_STRUCTURES_KEY])
        self.observer.iteration_done(history_entry(store.iterations()[-1], model_metrics))
        return number

    def _count_chunks(self, added: int) -> None:
        """Count chunks carved with the latest model in its iteration's record, as the loop does."""
        last = self.store.iterations()[-1]
        self.store.record_iteration(
            last.iteration,
            last.delta_per_target,
            last.chunks_added + added,
            last.train_force_mae,
            last.wall_time,
            max_delta=last.max_delta,
            carved=last.carved,
        )

    def _labelled_count(self) -> int:
        return len(self.store.labelled_structures(self.campaign.calculator, self.campaign.job_params))

    def _calculator(self, model_path: Path) -> EnsembleCalculator:
        """The model in float64 (a relaxation compares forces near zero, step after step); the file
        must be the one the campaign recorded (`CampaignStore.model_file`)."""
        record = next((item for item in self.store.models() if Path(item.path) == Path(model_path)), None)
        checked = self.store.model_file(record) if record is not None else model_path
        return EnsembleCalculator(load_ensemble(checked, dtype=torch.float64), dtype=torch.float64, device=self.config.file.model.device)

    # -- outputs --------------------------------------------------------------------------------

    def _resumed_state(self) -> dict[str, Any]:
        """The steps JSON of an earlier run of this relaxation (same structure, campaign and
        options), or a fresh state."""
        fresh = {
            "campaign": self.config.name,
            "structure_hash": atoms_geometry_hash(self.start),
            "fmax": self.fmax,
            "optimizer": self.optimizer,
            "threshold": self.config.threshold,
            "output": str(self.outputs.structure),
            "driver": this_process(),  # host:pid of the run, for `nft status` (`relaxation_state`)
            "steps": [],
        }
        try:
            earlier = json.loads(self.outputs.steps_json.read_text())
        except (OSError, ValueError):
            return fresh
        same = all(earlier.get(key) == fresh[key] for key in ("campaign", "structure_hash", "optimizer", "threshold"))
        if not same or not earlier.get("steps") or "current" not in earlier:
            return fresh
        if earlier.get("finished") and earlier.get("converged") and earlier.get("fmax") == self.fmax:
            return earlier  # done before with these options: nothing to run
        earlier.pop("finished", None)
        return {**earlier, "fmax": self.fmax, "driver": fresh["driver"]}

    def _trim_trajectory(self, frames: int) -> None:
        """Keep the first `frames` frames of the trajectory (those the steps JSON knows)."""
        path = self.outputs.trajectory
        kept: list[Atoms] = []
        if frames and path.is_file():
            try:
                for atoms in iread(str(path), format="extxyz"):
                    if len(kept) == frames:
                        break
                    kept.append(atoms)
            except Exception:  # a frame cut short by a kill: the ones before it are kept
                pass
        path.unlink(missing_ok=True)
        if kept:
            write(str(path), kept, format="extxyz")

    def _write_state(self) -> None:
        self.state["wall_time_s"] = self.state.get("wall_time_s", 0.0) + (time.perf_counter() - self.started)
        self.started = time.perf_counter()
        write_text_atomically(self.outputs.steps_json, json.dumps(self.state, indent=1) + "\n")
        _write_steps_csv(self.outputs.steps_csv, self.state["steps"])

    def summary(self) -> dict[str, Any]:
        rows = self.state["steps"]
        last = rows[-1]
        return {
            "converged": self.state["converged"],
            "reason": self.state["reason"],
            "steps": last["step"],
            "evaluations": len(rows),
            "chunks_added": sum(row["chunks_added"] for row in rows),
            "fmax": last["fmax"],
            "delta": last["delta"],
            "energy": last["energy"],
            "model_iteration": last["model"],
            "threshold": self.config.threshold,
            "fmax_target": self.fmax,
            "wall_time_s": self.state["wall_time_s"],
            "outputs": {
                "structure": str(self.outputs.structure),
                "trajectory": str(self.outputs.trajectory),
                "steps_csv": str(self.outputs.steps_csv),
                "steps_json": str(self.outputs.steps_json),
            },
            "table": rows,
        }


def _register_relaxation(config: CampaignConfig, steps_json: Path) -> None:
    """Add the run's steps file to WORKDIR/relaxations.json, where `nft report` finds it."""
    registry = config.workdir / RELAXATIONS_NAME
    try:
        paths = json.loads(registry.read_text())
    except (OSError, ValueError):
        paths = []
    path = str(steps_json.resolve())
    if path not in paths:
        write_text_atomically(registry, json.dumps([*paths, path], indent=1) + "\n")


def read_last_frame(path: Path) -> Atoms:
    """The last frame of a relaxation trajectory (its geometry, results and per-atom δ_i)."""
    frame = read(str(path), index=-1, format="extxyz")
    if not isinstance(frame, Atoms):  # one index reads one frame
        raise ValueError(f"{path}: no single last frame")
    return frame


def _state_geometry(atoms: Atoms) -> dict[str, Any]:
    """A geometry as plain JSON that reads back bit-exact (Python writes floats round-trip)."""
    return {
        "numbers": [int(z) for z in atoms.numbers],
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(),
        "pbc": [bool(flag) for flag in atoms.pbc],
    }


def _atoms_from_state(state: Mapping[str, Any]) -> Atoms:
    return Atoms(numbers=state["numbers"], positions=state["positions"], cell=state["cell"], pbc=state["pbc"])


def _write_steps_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with write_atomically(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=STEP_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row[key] is None else row[key]) for key in STEP_COLUMNS})
