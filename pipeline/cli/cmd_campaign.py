"""`nft run`, `nft status`, `nft export` and `nft report`: the NFT campaign from the command line."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pipeline.campaign.observer import CampaignObserver
from pipeline.cli import app
from pipeline.cli.common import check_output_file, exit_codes
from pipeline.errors import BadInput

if TYPE_CHECKING:
    from pipeline.science.optimisers import TrainingProgress


@app.command()
@exit_codes
def run(
    config: Path = typer.Argument(..., metavar="CONFIG.toml", help="Campaign config (TOML, docs/campaign.md)."),
    site: Optional[str] = typer.Option(None, "--site", help="A site in site_configs/ (local, slurm, …) or a path to a site file."),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Put the campaign's failed reference jobs back to pending and run them again."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json when the campaign ends (the progress goes to stderr)."),
) -> None:
    """Run or resume a campaign; writes WORKDIR/summary.json and WORKDIR/model.nft.

    Exits 0 when the campaign ends (converged or not: see summary.json), 1 when it fails, 2 on bad
    input or while another `nft run` drives the campaign. Run it again on the same config to resume
    after a kill or Ctrl-C.
    """
    signal.signal(signal.SIGUSR1, _interrupt)  # Slurm's warning before the walltime (slurm/nft-driver.sbatch)
    from pipeline.campaign.config import load_config
    from pipeline.campaign.loop import run_campaign

    campaign = load_config(config)
    console = Console(stderr=as_json)
    display = LiveDisplay(console, campaign.threshold) if console.is_terminal else PlainDisplay(console)
    with display:
        summary = run_campaign(campaign, site=site, observer=display, retry_failed=retry_failed)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    state = "converged" if summary["converged"] else f"not converged ({summary['stop_reason']})"
    console.print(
        f"{campaign.name}: {state} after {summary['iterations']} iteration(s); "
        f"δ = {summary['final_uncertainty']:.4f} eV/Å (threshold {summary['threshold']:g}); "
        f"{summary['chunks']} chunks; model {summary['model']}",
        highlight=False,
    )


@app.command()
@exit_codes
def status(
    config: Path = typer.Argument(..., metavar="CONFIG.toml", help="Campaign config (TOML)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Iterations, max δ, chunks and reference jobs of a campaign (reads its database only)."""
    from pipeline.campaign.config import load_config
    from pipeline.campaign.status import campaign_status

    report = campaign_status(load_config(config))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_status(Console(), report)


@app.command()
@exit_codes
def export(
    config: Path = typer.Argument(..., metavar="CONFIG.toml", help="Campaign config (TOML)."),
    output: Path = typer.Option(..., "-o", "--output", help="extxyz file to write (.extxyz or .xyz)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Write the campaign's training set as extxyz (chunks carry a per-atom force_mask)."""
    from pipeline.campaign.config import load_config
    from pipeline.campaign.status import export_training_set

    check_output_file(output, "-o", holds="extxyz")
    count = export_training_set(load_config(config), output)
    if as_json:
        print(json.dumps({"output": str(output), "structures": count}, indent=2))
        return
    print(f"{count} structures written to {output}")


@app.command()
@exit_codes
def report(
    config: Path = typer.Argument(..., metavar="CONFIG.toml", help="Campaign config (TOML)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder to write (default WORKDIR/report)."),
    as_json: bool = typer.Option(False, "--json", help="Print the folder and the files written as JSON."),
) -> None:
    """Figures (PNG) and report.md of a campaign: δ and chunks per iteration, force parity, residual
    against δ and the target coloured by δ; from its database and stored models only."""
    from pipeline.campaign.config import load_config
    from pipeline.campaign.files import REPORT_DIR_NAME
    from pipeline.campaign.report import campaign_report
    from pipeline.cli.report_figures import write_report

    campaign = load_config(config)
    directory = output if output is not None else campaign.workdir / REPORT_DIR_NAME
    if directory.exists() and not directory.is_dir():
        raise BadInput(f"-o: {directory} is a file, not a folder")
    gathered = campaign_report(campaign)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(f"-o: cannot create {directory} ({error.strerror or error})") from None
    written = write_report(gathered, directory)
    if as_json:
        print(json.dumps({"directory": str(directory), "files": [str(path) for path in written]}, indent=2))
        return
    print(f"{len(written)} files written to {directory}: " + ", ".join(path.name for path in written))


def _interrupt(signum: int, frame: Any) -> None:
    """Slurm's warning before the walltime (SIGUSR1) ends the run as Ctrl-C does: Parsl is cleaned up
    on the way out and the run exits 130 (the job then requeues itself and resumes)."""
    raise KeyboardInterrupt


def print_status(console: Console, report: Mapping[str, Any]) -> None:
    if report["converged"]:
        state = "converged"
    elif report["finished"]:
        state = f"stopped ({report['stop_reason']})"
    elif report["iterations"]:
        state = "in progress or interrupted (run again to resume)"
    else:
        state = "not started"
    relaxations = report.get("relaxations") or []
    driving = next((item for item in relaxations if item["state"] != "interrupted"), None)
    if driving is not None:  # converged or not, the campaign goes on while nft relax adds chunks to it
        state = f"relaxation {driving['state']} (nft relax drives the campaign); targets {state}"
    jobs = report["jobs"]
    if report.get("database_note"):
        console.print(report["database_note"], highlight=False)
    console.print(f"campaign {report['campaign']}: {state}", highlight=False, soft_wrap=True)
    for relaxation in relaxations:
        console.print(
            f"relaxation {relaxation['state']}: {relaxation['output'] or relaxation['steps_file']} at step {relaxation['step']}, "
            f"fmax {relaxation['fmax']:.4f} eV/Å (target {relaxation['fmax_target']:g}), δ {relaxation['delta']:.4f} eV/Å"
            + ("; run the same nft relax again to resume" if relaxation["state"] == "interrupted" else ""),
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"iterations {report['iterations']}, best δ {_number(report['best_uncertainty'])} eV/Å "
        f"(threshold {report['threshold']:g}), chunks {report['chunks']}, reference atoms {report['reference_atoms']}",
        highlight=False,
    )
    console.print(
        f"reference jobs: {jobs.get('done', 0)} done ({report.get('reused_jobs', 0)} reused from other campaigns), "
        f"{jobs.get('pending', 0)} pending, "
        f"{jobs.get('running', 0)} running, {jobs.get('failed', 0)} failed",
        highlight=False,
    )
    if report["history"]:
        table = Table("iteration", "δ (eV/Å)", "δE (eV)", "chunks added", "train MAE (eV/Å)", "wall (s)")
        for entry in report["history"]:
            table.add_row(
                str(entry["iteration"]),
                _number(entry["uncertainty"]),
                _number(entry.get("energy_uncertainty")),
                str(entry["chunks_added"]),
                _number(entry["train_force_mae"]),
                f"{entry['wall_time'].get('total', 0.0):.1f}",
            )
        console.print(table)
        console.print(_where_delta_lives(report["history"]))
        console.print(_selection_table(report["history"]))
    calibration = report.get("calibration") or {}
    if calibration.get("iterations"):
        console.print(_calibration_table(calibration))
    if calibration.get("warning"):
        console.print(f"warning: {calibration['warning']}", highlight=False)
    if report.get("fit"):
        console.print(f"latest model: {report['fit']}", highlight=False)
    if report.get("stall"):
        console.print(f"stalled: a {report['stall']['kind']} problem. {report['stall']['advice']}", highlight=False)
    if report["failed_jobs"]:
        console.print(_failed_jobs_table(report["failed_jobs"], jobs.get("failed", 0)))
    if report["model"]:
        console.print(f"model: {report['model']}", highlight=False)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _failed_jobs_table(failed: list[Mapping[str, Any]], total: int) -> Table:
    """The failed reference jobs shown: id, structure, attempts and the last attempt's reason."""
    shown = f"{len(failed)} of {total}" if total > len(failed) else str(len(failed))
    table = Table(
        "job",
        "structure",
        "attempts",
        "reason (last attempt)",
        title=f"failed reference jobs ({shown}; `nft run --retry-failed` runs them again)",
    )
    for job in failed:
        table.add_row(str(job["id"]), str(job["structure"]), str(job["attempts"]), job["error"])
    return table


def _calibration_table(calibration: Mapping[str, Any]) -> Table:
    """Per iteration: the chunk centres it carved, their realised error against the parent and the
    coverage (error ≤ δ_i predicted before the reference ran)."""
    table = Table(
        "iteration",
        "centres labelled",
        "error ≤ δ_i",
        "median error",
        "max error",
        "median δ_i",
        title="calibration at the chunk centres (eV/Å; predicted before their reference ran)",
    )
    for row in [*calibration["iterations"], {"iteration": "all", **calibration["overall"]}]:
        coverage = row.get("coverage")
        table.add_row(
            str(row["iteration"]),
            f"{row['labelled']}" + (f" of {row['predicted']}" if "predicted" in row else ""),
            "-" if coverage is None else f"{row['covered']} ({coverage:.0%})",
            _number(row.get("error_median")),
            _number(row.get("error_max")),
            _number(row.get("delta_median")),
        )
    return table


def _where_delta_lives(history: list[Mapping[str, Any]]) -> Table:
    """Per iteration: max δ at target atoms with and without a chunk, the model's error at the chunk centres."""
    table = Table(
        "iteration",
        "atoms with a chunk",
        "max δ there",
        "max δ elsewhere",
        "error there: max",
        "median",
        title="where δ lives (eV/Å; error |F_model − F_label| at the chunk centres)",
    )
    for entry in history:
        chunked = entry.get("chunked_atoms")
        table.add_row(
            str(entry["iteration"]),
            "-" if chunked is None else str(chunked),
            _number(entry.get("delta_chunked_max")),
            _number(entry.get("delta_unchunked_max")),
            _number(entry.get("chunk_force_error_max")),
            _number(entry.get("chunk_force_error_median")),
        )
    return table


def _selection_table(history: list[Mapping[str, Any]]) -> Table:
    """Per iteration: selectable atoms, how many were picked, and the others by why they were skipped."""
    table = Table(
        "iteration",
        "selectable",
        "picked",
        "chunked",
        "failed",
        "too close",
        "over limit",
        title="selection: selectable atoms, picked or skipped (already chunked, reference job failed, closer than "
        "min_separation, over max_per_iteration); a stopped campaign's last iteration carves nothing",
    )
    keys = ("selectable", "selected", "already_chunked", "reference_failed", "too_close", "over_limit")
    for entry in history:
        selection = entry.get("selection") or {}
        table.add_row(str(entry["iteration"]), *(str(selection[key]) if key in selection else "-" for key in keys))
    return table


# ---------------------------------------------------------------------------------------------
# Progress displays: a live table on a terminal, plain lines otherwise.


class PlainDisplay(CampaignObserver):
    """One line per event, for logs and pipes."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.perf_counter()
        self._last_jobs_line = 0.0
        self._last_training_line = -float("inf")

    def __enter__(self) -> PlainDisplay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def _line(self, text: str) -> None:
        self.console.print(f"[{time.perf_counter() - self.started:7.1f}s] {text}", highlight=False, markup=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self._line(text)

    def phase(self, iteration: int, name: str) -> None:
        self._line(f"iteration {iteration}: {name}")

    def jobs(self, done: int, running: int, failed: int, total: int) -> None:
        now = time.perf_counter()
        if running == 0 or now - self._last_jobs_line > 5.0:
            self._last_jobs_line = now
            self._line(f"reference jobs: {done} done, {running} running, {failed} failed of {total}")

    def training_progress(self, iteration: int, progress: TrainingProgress) -> None:
        from pipeline.campaign.campaign_log import progress_text
        from pipeline.cli.progress import PLAIN_INTERVAL_S

        now = time.perf_counter()
        if progress.done or now - self._last_training_line >= PLAIN_INTERVAL_S:
            self._last_training_line = now
            self._line(f"iteration {iteration}: training: {progress_text(progress)}")

    def iteration_done(self, entry: Mapping[str, Any]) -> None:
        wall = entry["wall_time"]
        self._line(
            f"iteration {entry['iteration']}: δ = {entry['uncertainty']:.4f} eV/Å "
            f"(atoms with a chunk {_number(entry.get('delta_chunked_max'))}, without {_number(entry.get('delta_unchunked_max'))}), "
            f"{entry['chunks_added']} chunks added, train MAE {_number(entry['train_force_mae'])} eV/Å, "
            f"{wall.get('total', 0.0):.1f} s (training {wall.get('training', 0.0):.1f}, "
            f"prediction {wall.get('prediction', 0.0):.1f}, reference {wall.get('reference', 0.0):.1f})"
        )


class LiveDisplay(CampaignObserver):
    """A live table: iterations so far, the current phase and the reference jobs in flight."""

    def __init__(self, console: Console, threshold: float) -> None:
        self.console = console
        self.threshold = threshold
        self.started = time.perf_counter()
        self.history: list[Mapping[str, Any]] = []
        self.status = "starting"
        self.job_counts = (0, 0, 0, 0)
        self.training: tuple[str, int, int] | None = None  # the latest training report: text, step, steps
        self.messages: list[str] = []
        self.live = Live(console=console, refresh_per_second=4, get_renderable=self._render, transient=False)

    def __enter__(self) -> LiveDisplay:
        self.live.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.live.__exit__(exc_type, exc, traceback)

    def _render(self) -> Group:
        table = Table(
            "iteration", "δ (eV/Å)", "chunks added", "train MAE", "wall (s)", title=f"NFT campaign (δ threshold {self.threshold:g} eV/Å)"
        )
        for entry in self.history:
            delta = entry["uncertainty"]
            style = "green" if delta < self.threshold else ""
            table.add_row(
                str(entry["iteration"]),
                Text(f"{delta:.4f}", style=style),
                str(entry["chunks_added"]),
                _number(entry["train_force_mae"]),
                f"{entry['wall_time'].get('total', 0.0):.1f}",
            )
        done, running, failed, total = self.job_counts
        lines = [Text(line) for line in self.messages[-5:]]
        lines.append(Text(f"{self.status}   [{time.perf_counter() - self.started:.0f} s]", style="bold"))
        if total:
            lines.append(Text(f"reference jobs: {done} done, {running} running, {failed} failed of {total}"))
        if self.training is None:
            return Group(table, *lines)
        text, step, steps = self.training
        return Group(table, *lines, ProgressBar(total=max(steps, 1), completed=step, width=40), Text(f"training: {text}"))

    def message(self, text: str) -> None:
        self.messages.append(text)

    def phase(self, iteration: int, name: str) -> None:
        self.status = f"iteration {iteration}: {name}"
        self.training = None
        if name != "reference jobs":
            self.job_counts = (0, 0, 0, 0)

    def training_progress(self, iteration: int, progress: TrainingProgress) -> None:
        from pipeline.campaign.campaign_log import progress_text

        self.training = (progress_text(progress), progress.step, progress.steps)

    def jobs(self, done: int, running: int, failed: int, total: int) -> None:
        self.job_counts = (done, running, failed, total)

    def iteration_done(self, entry: Mapping[str, Any]) -> None:
        self.history.append(entry)
        self.job_counts = (0, 0, 0, 0)
        self.status = f"iteration {entry['iteration']} done"
