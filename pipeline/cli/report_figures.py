"""`nft report`: the PNG figures (matplotlib's Agg canvas, as plots.py) and report.md linking them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.campaign.report import CampaignReport, LabelledForces, TargetDeltas

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DELTA_HISTORY_PNG = "delta_per_iteration.png"
CHUNKS_PNG = "chunks_per_iteration.png"
PARITY_PNG = "force_parity.png"
RESIDUAL_PNG = "residual_vs_delta.png"
TARGET_PNG = "target_delta.png"
CALIBRATION_PNG = "calibration_per_iteration.png"
RELAXATION_PNG = "relaxation.png"
LOCALITY_PNG = "locality.png"
REPORT_MD = "report.md"
TARGET_ATOM_RADIUS_SCALE = 0.7
"""Atoms drawn at this fraction of their covalent radius, so that atoms behind the surface show."""
TARGET_VIEW_ROTATION = "10x,-15y"


def _figure(width_inch: float = 6.0, height_inch: float = 4.0) -> Figure:
    """A figure of that size (inches) on its own Agg canvas: no display, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_inch, height_inch), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def write_delta_history_plot(history: Sequence[Mapping[str, Any]], threshold: float, path: Path, title: str) -> None:
    """Max δ over the targets (eV/Å, log axis) per iteration with the threshold line, and where the
    history has them, max δ at target atoms with a chunk and without one."""
    from matplotlib.ticker import FormatStrFormatter

    figure = _figure()
    axes = figure.add_subplot()
    iterations = [entry["iteration"] for entry in history]
    axes.plot(
        iterations,
        [entry["uncertainty"] for entry in history],
        "o-",
        markersize=10,
        markerfacecolor="none",
        linewidth=2.5,
        alpha=0.6,
        label="max δ (all target atoms)",
    )
    for key, label, style in (
        ("delta_chunked_max", "max δ at atoms with a chunk", "s--"),
        ("delta_unchunked_max", "max δ at atoms without a chunk", "^:"),
    ):
        points = [(entry["iteration"], entry[key]) for entry in history if entry.get(key) is not None]
        if points:
            axes.plot(*zip(*points), style, label=label)
    axes.axhline(threshold, color="black", linestyle="-.", label=f"threshold {threshold:g} eV/Å")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # δ spans a decade or two: plain numbers read best
    axes.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    axes.set_xlabel("iteration")
    axes.set_ylabel("uncertainty δ (eV/Å)")
    axes.set_xticks(iterations)
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png")


def write_chunks_plot(history: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Chunks added per iteration (bars) and their cumulative count (line, right axis)."""
    figure = _figure()
    axes = figure.add_subplot()
    iterations = [entry["iteration"] for entry in history]
    added = [entry["chunks_added"] for entry in history]
    bars = axes.bar(iterations, added, color="tab:blue", alpha=0.7, label="chunks added")
    axes.set_xlabel("iteration")
    axes.set_ylabel("chunks added")
    axes.set_xticks(iterations)
    total_axes = axes.twinx()
    (line,) = total_axes.plot(iterations, np.cumsum(added), "o-", color="tab:orange", label="cumulative chunks")
    total_axes.set_ylabel("cumulative chunks")
    total_axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.legend(handles=[bars, line], loc="upper left")
    figure.savefig(path, format="png")


def write_parity_plot(labelled: LabelledForces, path: Path, title: str) -> None:
    """Predicted against reference force components (eV/Å) on the labelled rows, the diagonal and the MAE."""
    figure = _figure(5.0, 5.0)
    axes = figure.add_subplot()
    groups = (("initial-set atoms", ~labelled.is_chunk_centre, "o"), ("chunk centres", labelled.is_chunk_centre, "^"))
    for label, rows, marker in groups:
        if rows.any():
            axes.plot(
                labelled.reference[rows].ravel(),
                labelled.predicted[rows].ravel(),
                marker,
                linestyle="none",
                markersize=4,
                alpha=0.6,
                label=f"{label} ({rows.sum()} atoms × 3)",
            )
    low = float(min(labelled.reference.min(), labelled.predicted.min()))
    high = float(max(labelled.reference.max(), labelled.predicted.max()))
    margin = 0.05 * (high - low or 1.0)
    limits = (low - margin, high + margin)
    axes.plot(limits, limits, color="black", linewidth=0.8, label=f"y = x (MAE {labelled.force_mae:.4f} eV/Å)")
    axes.set_xlim(limits)
    axes.set_ylim(limits)
    axes.set_aspect("equal")
    axes.set_xlabel("reference force component (eV/Å)")
    axes.set_ylabel("predicted force component (eV/Å)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left")
    figure.savefig(path, format="png")


def write_residual_plot(labelled: LabelledForces, path: Path, title: str) -> None:
    """Residual |F_pred − F_ref| against δ_i (eV/Å, log axes) on the labelled rows, with y = x: a
    point on or under it is an error δ bounds. Zeros sit on the axis floor."""
    figure = _figure(5.5, 5.0)
    axes = figure.add_subplot()
    residuals, deltas = labelled.residuals, labelled.deltas
    positive = np.concatenate([residuals[residuals > 0], deltas[deltas > 0]])
    floor = 10.0 ** np.floor(np.log10(positive.min())) if positive.size else 1e-6
    top = 10.0 ** np.ceil(np.log10(positive.max())) if positive.size else 1.0
    for label, rows, marker in (("initial-set atoms", ~labelled.is_chunk_centre, "o"), ("chunk centres", labelled.is_chunk_centre, "^")):
        if rows.any():
            axes.plot(
                np.maximum(deltas[rows], floor),
                np.maximum(residuals[rows], floor),
                marker,
                linestyle="none",
                markersize=4,
                alpha=0.6,
                label=f"{label} ({rows.sum()})",
            )
    axes.plot(
        (floor, top),
        (floor, top),
        color="black",
        linewidth=0.8,
        label=f"residual = δ ({100 * labelled.covered_fraction:.0f}% of rows on or under it)",
    )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(floor, top)
    axes.set_ylim(floor, top)
    axes.set_xlabel("uncertainty δ_i (eV/Å)")
    axes.set_ylabel("residual |F_pred − F_ref| (eV/Å)")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="upper left")
    figure.savefig(path, format="png")


def write_target_plot(target: TargetDeltas, first_iteration: int, kept_iteration: int, path: Path, title: str) -> None:
    """The target (seen along z, tilted by TARGET_VIEW_ROTATION), each atom coloured by δ_i (eV/Å) of the first and the kept model,
    one colour scale for both (ase.visualize.plot.plot_atoms)."""
    from ase.visualize.plot import plot_atoms
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    figure = _figure(9.0, 4.4)
    values = np.concatenate([target.first, target.kept])
    low = max(float(values[values > 0].min()) if (values > 0).any() else 1e-6, 1e-6)
    norm = LogNorm(vmin=low, vmax=max(float(values.max()), low * 10))
    colour_map = colormaps["viridis"]
    panels = figure.subplots(1, 2)
    for axes, deltas, label in zip(
        panels, (target.first, target.kept), (f"first model (iteration {first_iteration})", f"kept model (iteration {kept_iteration})")
    ):
        plot_atoms(
            target.atoms,
            axes,
            colors=[colour_map(norm(max(value, low))) for value in deltas],
            radii=TARGET_ATOM_RADIUS_SCALE,
            rotation=TARGET_VIEW_ROTATION,
        )
        axes.set_title(f"{label}: max δ {deltas.max():.3f} eV/Å", fontsize=10)
    figure.colorbar(ScalarMappable(norm=norm, cmap=colour_map), ax=list(panels), label="δ_i (eV/Å)", shrink=0.9)
    figure.suptitle(title)
    figure.savefig(path, format="png")


def write_calibration_plot(calibration: Mapping[str, Any], path: Path, title: str) -> None:
    """Per iteration, at the chunk centres it carved: the coverage (fraction with realised error ≤ δ_i
    predicted before the reference ran) against the promised 99 %, and the median error beside the
    median δ_i (eV/Å)."""
    from matplotlib.ticker import FormatStrFormatter

    from pipeline.campaign.calibration import PROMISED_COVERAGE

    rows = [row for row in calibration["iterations"] if row["labelled"]]
    iterations = [row["iteration"] for row in rows]
    figure = _figure(10.0, 4.0)
    coverage_axes, error_axes = figure.subplots(1, 2)
    coverage_axes.bar(
        iterations, [100 * row["coverage"] for row in rows], color="tab:green", alpha=0.7, label="error ≤ δ_i at the chunk centres"
    )
    for iteration, row in zip(iterations, rows):
        coverage_axes.annotate(
            f"{row['covered']}/{row['labelled']}", (iteration, 100 * row["coverage"]), ha="center", va="bottom", fontsize=8
        )
    coverage_axes.axhline(100 * PROMISED_COVERAGE, color="black", linestyle="-.", label=f"promised {PROMISED_COVERAGE:.0%}")
    coverage_axes.set_ylim(0, 105)
    coverage_axes.set_xlabel("iteration")
    coverage_axes.set_ylabel("coverage (%)")
    coverage_axes.set_xticks(iterations)
    coverage_axes.legend(loc="lower left")
    error_axes.plot(iterations, [row["error_median"] for row in rows], "o-", label="median |F_model − F_parent|")
    error_axes.plot(iterations, [row["error_max"] for row in rows], "v:", label="max |F_model − F_parent|")
    error_axes.plot(iterations, [row["delta_median"] for row in rows], "s--", label="median δ_i (predicted)")
    error_axes.set_yscale("log")
    error_axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    error_axes.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    error_axes.set_xlabel("iteration")
    error_axes.set_ylabel("eV/Å")
    error_axes.set_xticks(iterations)
    error_axes.legend()
    figure.suptitle(title)
    figure.savefig(path, format="png")


def write_relaxation_plot(relaxation: Mapping[str, Any], path: Path, title: str) -> None:
    """One `nft relax` run: fmax and δ (eV/Å, log axis) at every evaluation against the force target
    and the threshold, with a line where chunks were added and the model retrained."""
    from matplotlib.ticker import FormatStrFormatter

    rows = relaxation["steps"]
    evaluations = np.arange(len(rows))
    figure = _figure(7.0, 4.0)
    axes = figure.add_subplot()
    axes.plot(evaluations, [row["fmax"] for row in rows], "o-", markersize=3, label="fmax (model)")
    axes.plot(evaluations, [row["delta"] for row in rows], "s-", markersize=3, label="δ = max δ_i")
    axes.axhline(relaxation["fmax"], color="tab:blue", linestyle=":", label=f"fmax target {relaxation['fmax']:g} eV/Å")
    axes.axhline(relaxation["threshold"], color="black", linestyle="-.", label=f"δ threshold {relaxation['threshold']:g} eV/Å")
    retrained = [k for k, row in enumerate(rows) if row["chunks_added"]]
    for number, k in enumerate(retrained):
        axes.axvline(k + 0.5, color="tab:red", alpha=0.4, label="chunks added, retrained" if number == 0 else None)
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.set_xlabel(f"evaluation ({rows[-1]['step']} optimizer steps; a retrained model evaluates its step again)")
    axes.set_ylabel("eV/Å")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, format="png")


def write_report(report: CampaignReport, directory: Path) -> list[Path]:
    """Write every figure the campaign has data for and report.md linking them into `directory`
    (which must exist); returns the files written, report.md last."""
    status = report.status
    name = status["campaign"]
    history = status["history"]
    written: list[Path] = []
    figures: list[tuple[str, str, str]] = []  # (file, heading, caption)

    def add(file: str, heading: str, caption: str) -> None:
        written.append(directory / file)
        figures.append((file, heading, caption))

    if history:
        write_delta_history_plot(history, status["threshold"], directory / DELTA_HISTORY_PNG, f"{name}: δ per iteration")
        add(
            DELTA_HISTORY_PNG,
            "δ per iteration",
            "Max δ over the targets (eV/Å, log axis) against the threshold; where recorded, max δ at target atoms "
            "with a chunk and without one.",
        )
        write_chunks_plot(history, directory / CHUNKS_PNG, f"{name}: chunks")
        add(CHUNKS_PNG, "Chunks", "Chunks added per iteration (bars) and their cumulative count (line).")
    calibration = status.get("calibration") or {}
    if any(row["labelled"] for row in calibration.get("iterations", [])):
        write_calibration_plot(calibration, directory / CALIBRATION_PNG, f"{name}: is δ honest?")
        overall = calibration["overall"]
        add(
            CALIBRATION_PNG,
            "Calibration per iteration",
            f"At the chunk centres each iteration carved, the model's force error against the parent's label, with "
            f"the force and δ_i predicted before the reference ran: the coverage (error ≤ δ_i; 2.58σ promises 99%) "
            f"and the median error beside the median δ_i. Over all: {overall['covered']} of {overall['labelled']} "
            f"({100 * overall['coverage']:.0f}%).",
        )
    labelled = report.labelled
    if labelled is not None:
        write_parity_plot(labelled, directory / PARITY_PNG, f"{name}: kept model (iteration {report.kept_iteration})")
        add(
            PARITY_PNG,
            "Force parity",
            f"Force components of the kept model (ensemble mean, iteration {report.kept_iteration}) against the stored "
            f"reference forces on the labelled rows: every initial-set atom and each chunk's central atom (predicted "
            f"in the whole target). MAE {labelled.force_mae:.4f} eV/Å over {labelled.reference.size} components.",
        )
        write_residual_plot(labelled, directory / RESIDUAL_PNG, f"{name}: residual ≤ δ?")
        add(
            RESIDUAL_PNG,
            "Residual against δ",
            f"|F_pred − F_ref| against δ_i on the same rows; {100 * labelled.covered_fraction:.0f}% of "
            f"{len(labelled.deltas)} rows lie on or under y = x (δ bounds their error).",
        )
    first, kept = report.first_iteration, report.kept_iteration
    if first is not None and kept is not None:  # both, where the campaign has models
        for index, target in enumerate(report.targets):
            file = TARGET_PNG if len(report.targets) == 1 else f"target_{index}_delta.png"
            write_target_plot(target, first, kept, directory / file, f"{name}: target {index} ({len(target.atoms)} atoms) coloured by δ_i")
            add(file, f"Target {index} coloured by δ", "Per-atom δ_i (eV/Å) of the first and the kept model, one colour scale.")
    for index, relaxation in enumerate(report.relaxations):
        file = RELAXATION_PNG if len(report.relaxations) == 1 else f"relaxation_{index}.png"
        rows = relaxation["steps"]
        write_relaxation_plot(relaxation, directory / file, f"{name}: nft relax → {Path(relaxation['file']).name}")
        add(
            file,
            f"Relaxation {index}" if len(report.relaxations) > 1 else "Relaxation",
            f"`nft relax` ({relaxation['optimizer']}, steps in {relaxation['file']}): fmax and δ at each of "
            f"{len(rows)} evaluations over {rows[-1]['step']} steps; {sum(row['chunks_added'] for row in rows)} chunks "
            f"added at {sum(1 for row in rows if row['chunks_added'])} geometries; ended with fmax "
            f"{rows[-1]['fmax']:.4f} eV/Å and δ {rows[-1]['delta']:.4f} eV/Å ({relaxation.get('reason', 'in progress')}).",
        )
    if report.locality is not None:
        from pipeline.cli.plots import write_locality_report_plot

        locality = report.locality
        write_locality_report_plot(
            locality, directory / LOCALITY_PNG, f"{name}: {locality['calculator']} locality, {Path(locality['structure']).name}"
        )
        suggested = locality.get("suggested_radius")
        add(
            LOCALITY_PNG,
            "Locality of the parent",
            f"`nft locality --config` on {locality['structure']} ({locality['n_atoms']} atoms, "
            f"{len(locality['sample_indices'])} sample atoms): max and mean |ΔF| of the central force against the chunk "
            f"radius; "
            + (
                f"suggested chunks.radius {suggested:g} Å (max |ΔF| < {locality['tolerance']:g} eV/Å)."
                if suggested is not None
                else f"no radius reached max |ΔF| < {locality['tolerance']:g} eV/Å."
            ),
        )
    report_path = directory / REPORT_MD
    report_path.write_text(report_markdown(report, figures))
    written.append(report_path)
    return written


def report_markdown(report: CampaignReport, figures: Sequence[tuple[str, str, str]]) -> str:
    """report.md: a summary table, δ per iteration as recorded (`nft status --json`), the figures."""
    status = report.status
    if status["converged"]:
        state = "yes"
    elif status["finished"]:
        state = "no"
    else:
        state = "no (in progress or interrupted)"
    lines = [
        f"# NFT campaign report: {status['campaign']}",
        "",
        "| | |",
        "|---|---|",
        f"| iterations | {status['iterations']} |",
        f"| final δ (eV/Å) | {_number(status['latest_uncertainty'])} |",
        f"| best δ (eV/Å) | {_number(status['best_uncertainty'])} (iteration {status['best_iteration']}) |",
        f"| threshold (eV/Å) | {status['threshold']:g} |",
        f"| converged | {state} |",
        f"| stop reason | {status['stop_reason'] or '-'} |",
        f"| chunks | {status['chunks']} |",
        f"| reference atoms | {status['reference_atoms']} |",
        f"| kept model | {report.kept_model or '-'} |",
        "",
        "## History (as `nft status --json` reports it)",
        "",
        "| iteration | δ (eV/Å) | δ at atoms with a chunk | δ at atoms without | chunks added | train MAE (eV/Å) |",
        "|---|---|---|---|---|---|",
    ]
    for entry in status["history"]:
        lines.append(
            f"| {entry['iteration']} | {_number(entry['uncertainty'])} | {_number(entry.get('delta_chunked_max'))} | "
            f"{_number(entry.get('delta_unchunked_max'))} | {entry['chunks_added']} | {_number(entry['train_force_mae'])} |"
        )
    lines.append("")
    calibration = status.get("calibration") or {}
    if calibration.get("iterations"):
        lines += [
            "## Calibration (at the chunk centres, predicted before their reference ran)",
            "",
            "| iteration | centres labelled | error ≤ δ_i | median error (eV/Å) | max error (eV/Å) | median δ_i (eV/Å) |",
            "|---|---|---|---|---|---|",
        ]
        for row in [*calibration["iterations"], {"iteration": "all", **calibration["overall"]}]:
            covered = "-" if row["coverage"] is None else f"{row['covered']} ({100 * row['coverage']:.0f}%)"
            lines.append(
                f"| {row['iteration']} | {row['labelled']} | {covered} | {_number(row['error_median'])} | "
                f"{_number(row['error_max'])} | {_number(row['delta_median'])} |"
            )
        lines.append("")
        if calibration.get("warning"):
            lines += [f"Warning: {calibration['warning']}", ""]
    if status.get("stall"):
        lines += [f"Stalled: a {status['stall']['kind']} problem. {status['stall']['advice']}", ""]
    if report.missing_model:
        lines += [f"Model figures (parity, residual, target) are left out: {report.missing_model}.", ""]
    for file, heading, caption in figures:
        lines += [f"## {heading}", "", caption, "", f"![{heading}]({file})", ""]
    if report.locality is None:
        lines += [
            "## Locality",
            "",
            "No locality test of this campaign's parent is recorded: `nft locality STRUCTURE --config CONFIG.toml "
            "--radii …` writes WORKDIR/locality.json, and the report then draws its curve. Relaxations (`nft relax`) "
            "appear above when the campaign has run one.",
            "",
        ]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    """δ and MAE values as `nft status` prints them (4 decimals, eV/Å); '-' where none."""
    return "-" if value is None else f"{value:.4f}"
