"""`nft report`: the PNG figures (matplotlib's Agg canvas, as plots.py) and report.md linking them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.campaign.report import CampaignReport, HeldOutErrors, LabelledForces, TargetDeltas

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


def chunks_figure(history: Sequence[Mapping[str, Any]], title: str) -> Figure:
    """One count axis: per iteration, the chunks of the training set after it as a bar, split into
    those from earlier iterations and those it added (labelled +n)."""
    figure = _figure()
    axes = figure.add_subplot()
    iterations = [entry["iteration"] for entry in history]
    added = np.array([entry["chunks_added"] for entry in history])
    before = np.cumsum(added) - added
    axes.bar(iterations, before, color="tab:gray", alpha=0.5, label="chunks from earlier iterations")
    bars = axes.bar(iterations, added, bottom=before, color="tab:blue", alpha=0.8, label="chunks added in this iteration")
    axes.bar_label(bars, labels=[f"+{count}" for count in added], padding=2, fontsize=8)
    axes.set_xlabel("iteration")
    axes.set_ylabel("chunks")
    axes.set_xticks(iterations)
    axes.set_ylim(0, max(1.0, 1.3 * float((before + added).max(initial=0))))
    axes.set_title(title)
    axes.legend(loc="upper center", ncol=2, fontsize=8)
    return figure


def write_chunks_plot(history: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """`chunks_figure` as PNG."""
    chunks_figure(history, title).savefig(path, format="png")


def _row_groups(labelled: LabelledForces) -> list[tuple[str, np.ndarray, str]]:
    """(legend label, rows, marker) of the labelled rows: the initial-set atoms and chunk centres the
    model trained on, and chunk centres it did not (carved by its iteration or later), where any."""
    centre = labelled.is_chunk_centre
    groups = [
        ("initial-set atoms (training)", ~centre, "o"),
        ("chunk centres (training)", centre & labelled.trained, "^"),
        ("chunk centres carved later (not trained on)", centre & ~labelled.trained, "s"),
    ]
    return [(label, rows, marker) for label, rows, marker in groups if rows.any()]


def held_out_lines(held_out: HeldOutErrors | None, kept_iteration: int | None) -> list[str]:
    """One line per held-out error of the model against the parent (MAE, eV/Å), or why there is none."""
    if held_out is None:
        return []
    lines = []
    if held_out.target_mae:
        measured = held_out.target_mae_iteration
        which = "kept model" if measured == kept_iteration else f"model of iteration {measured}"
        for name, mae in held_out.target_mae.items():
            lines.append(f"{name}, every atom, {which} vs {held_out.parent.upper()}: force MAE {mae:.4f} eV/Å")
    elif held_out.why_no_target:
        lines.append(f"no error on the whole targets: {held_out.why_no_target}")
    if held_out.validation_mae is not None:
        lines.append(
            f"validation structures (held out of the kept model's training; among the rows drawn, not marked): "
            f"force MAE {held_out.validation_mae:.4f} eV/Å"
        )
    return lines


def write_parity_plot(labelled: LabelledForces, held_out: Sequence[str], path: Path, title: str) -> None:
    """Predicted against reference force components (eV/Å) on the labelled rows (the training data),
    the diagonal with their MAE, and the `held_out` error lines (`held_out_lines`) below the axes."""
    import textwrap

    text = [part for line in ["Held out:", *held_out] for part in textwrap.wrap(line, 88, subsequent_indent="    ")]
    figure = _figure(5.6, 5.4 + (0.15 * len(text) if held_out else 0.0))
    if held_out:
        axes, text_axes = figure.subplots(2, 1, height_ratios=(5.0, 0.15 * len(text)))
        text_axes.axis("off")
        note = text_axes.text(0.0, 1.0, "\n".join(text), va="top", fontsize=8, transform=text_axes.transAxes)
        note.set_in_layout(False)  # its panel is sized for it; the layout need not fit the text again
    else:
        axes = figure.add_subplot()
    for label, rows, marker in _row_groups(labelled):
        axes.plot(
            labelled.reference[rows].ravel(),
            labelled.predicted[rows].ravel(),
            marker,
            linestyle="none",
            markersize=4,
            alpha=0.6,
            label=f"{label}: {rows.sum()} atoms × 3",
        )
    low = float(min(labelled.reference.min(), labelled.predicted.min()))
    high = float(max(labelled.reference.max(), labelled.predicted.max()))
    margin = 0.05 * (high - low or 1.0)
    limits = (low - margin, high + margin)
    axes.plot(limits, limits, color="black", linewidth=0.8, label=f"y = x (MAE on these rows {labelled.force_mae:.4f} eV/Å)")
    axes.set_xlim(limits)
    axes.set_ylim(limits)
    axes.set_aspect("equal")
    axes.set_xlabel("reference force component (eV/Å)")
    axes.set_ylabel("predicted force component (eV/Å)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    figure.savefig(path, format="png")


def write_residual_plot(labelled: LabelledForces, path: Path, title: str) -> None:
    """Residual |F_pred − F_ref| against δ_i (eV/Å, log axes) on the labelled rows (the training
    data), with y = x: a point on or under it is an error δ bounds. Zeros sit on the axis floor."""
    figure = _figure(5.5, 5.0)
    axes = figure.add_subplot()
    residuals, deltas = labelled.residuals, labelled.deltas
    positive = np.concatenate([residuals[residuals > 0], deltas[deltas > 0]])
    floor = 10.0 ** np.floor(np.log10(positive.min())) if positive.size else 1e-6
    top = 10.0 ** np.ceil(np.log10(positive.max())) if positive.size else 1.0
    for label, rows, marker in _row_groups(labelled):
        axes.plot(
            np.maximum(deltas[rows], floor),
            np.maximum(residuals[rows], floor),
            marker,
            linestyle="none",
            markersize=4,
            alpha=0.6,
            label=f"{label}: {rows.sum()}",
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
    axes.legend(loc="upper left", fontsize=8)
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


@dataclass(frozen=True)
class CoverageBar:
    """One bar of the calibration figure: `covered` of `labelled` chunk centres had error ≤ δ_i;
    `low`–`high` the Wilson interval of that rate (fractions)."""

    label: str  # the iteration, or "all"
    covered: int
    labelled: int
    low: float
    high: float

    @property
    def coverage(self) -> float:
        return self.covered / self.labelled


def coverage_bars(calibration: Mapping[str, Any]) -> list[CoverageBar]:
    """The calibration figure's bars: each iteration with labelled centres, then all of them."""
    rows = [row for row in calibration["iterations"] if row["labelled"]]
    if len(rows) > 1:
        rows.append({"iteration": "all", **calibration["overall"]})
    return [CoverageBar(str(row["iteration"]), row["covered"], row["labelled"], *row["interval"]) for row in rows]


def expected_coverage_basis(calibration: Mapping[str, Any]) -> str:
    """What the expected coverage assumes, in words."""
    members = calibration.get("members")
    return f"δ = 2.58σ, 3-D Gaussian error, σ from {members} members" if members else "δ = 2.58σ, 3-D Gaussian error, σ taken as exact"


def expected_coverage_label(calibration: Mapping[str, Any]) -> str:
    """The expected-coverage line's legend label."""
    return f"expected {100 * calibration['expected_coverage']:.2f}% ({expected_coverage_basis(calibration)})"


def calibration_figure(calibration: Mapping[str, Any], title: str) -> Figure:
    """Left, per iteration and over all, at the chunk centres carved (the atoms picked for high δ_i,
    not a random sample): the coverage (error ≤ δ_i predicted before the reference ran), n and a
    Wilson interval per bar, against the coverage a 3-D Gaussian error expects. Right: the median
    and max error beside the median δ_i (eV/Å)."""
    from matplotlib.ticker import FormatStrFormatter

    bars = coverage_bars(calibration)
    level = calibration.get("interval_level", 0.95)
    figure = _figure(10.5, 5.0)
    coverage_axes, error_axes = figure.subplots(1, 2)
    positions = np.arange(len(bars))
    rates = np.array([100 * bar.coverage for bar in bars])
    coverage_axes.bar(
        positions,
        rates,
        color=["tab:green" if bar.label != "all" else "tab:olive" for bar in bars],
        alpha=0.6,
        label="error ≤ δ_i at the chunk centres",
    )
    coverage_axes.errorbar(
        positions,
        rates,
        yerr=np.clip(
            [[rate - 100 * bar.low for rate, bar in zip(rates, bars)], [100 * bar.high - rate for rate, bar in zip(rates, bars)]], 0, None
        ),
        fmt="none",
        ecolor="black",
        capsize=5,
        linewidth=1.2,
        label=f"{level:.0%} Wilson interval",
    )
    for position, bar in zip(positions, bars):
        coverage_axes.annotate(f"{bar.covered} of\nn = {bar.labelled}", (position, 3), ha="center", va="bottom", fontsize=9)
    coverage_axes.axhline(100 * calibration["expected_coverage"], color="black", linestyle="-.", label=expected_coverage_label(calibration))
    coverage_axes.set_ylim(0, 112)
    coverage_axes.set_xticks(positions, [bar.label for bar in bars])
    coverage_axes.set_xlabel("iteration that carved the chunks (covered of n centres labelled)")
    coverage_axes.set_ylabel("coverage (%)")
    coverage_axes.set_title("coverage at the chunk centres only\n(atoms picked for high δ_i, not a random sample)", fontsize=10)
    coverage_axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8)
    rows = [row for row in calibration["iterations"] if row["labelled"]]
    iterations = [row["iteration"] for row in rows]
    error_axes.plot(iterations, [row["error_median"] for row in rows], "o-", label="median |F_model − F_parent|")
    error_axes.plot(iterations, [row["error_max"] for row in rows], "v:", label="max |F_model − F_parent|")
    error_axes.plot(iterations, [row["delta_median"] for row in rows], "s--", label="median δ_i (predicted)")
    error_axes.set_yscale("log")
    values = [row[key] for row in rows for key in ("error_median", "error_max", "delta_median") if row[key] and row[key] > 0]
    decades = np.floor(np.log10(values)) if values else np.zeros(0)
    if values and decades.min() == decades.max():  # within one decade: down to its mark, so a labelled tick is under the points
        error_axes.set_ylim(bottom=10.0 ** decades.min())
    error_axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    error_axes.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    error_axes.set_xlabel("iteration that carved the chunks")
    error_axes.set_ylabel("eV/Å")
    error_axes.set_xticks(iterations)
    error_axes.set_title("error and δ_i at the same centres", fontsize=10)
    error_axes.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def write_calibration_plot(calibration: Mapping[str, Any], path: Path, title: str) -> None:
    """`calibration_figure` as PNG."""
    calibration_figure(calibration, title).savefig(path, format="png")


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
        add(
            CHUNKS_PNG,
            "Chunks",
            "Chunks in the campaign after each iteration, on one count axis: those from earlier iterations (grey) "
            "and those the iteration added (blue, +n).",
        )
    calibration = status.get("calibration") or {}
    if any(row["labelled"] for row in calibration.get("iterations", [])):
        write_calibration_plot(calibration, directory / CALIBRATION_PNG, f"{name}: is δ honest? (chunk centres only)")
        add(CALIBRATION_PNG, "Calibration per iteration", calibration_caption(calibration))
    labelled = report.labelled
    if labelled is not None:
        held_out = held_out_lines(report.held_out, report.kept_iteration)
        rows = "its training rows" if labelled.trained.all() else "the labelled rows"
        write_parity_plot(labelled, held_out, directory / PARITY_PNG, f"{name}: kept model (iteration {report.kept_iteration}) on {rows}")
        untrained = int((~labelled.trained).sum())
        add(
            PARITY_PNG,
            "Force parity (training rows)",
            f"Force components of the kept model (ensemble mean, iteration {report.kept_iteration}) against the stored "
            f"reference forces on the campaign's labelled rows, its training data: every initial-set atom and each "
            f"chunk's central atom (predicted in the whole target)"
            + (f"; {untrained} chunk centres carved by its iteration or later, which it did not train on" if untrained else "")
            + f". MAE {labelled.force_mae:.4f} eV/Å over {labelled.reference.size} components: a fit, not the error "
            "off the training set. " + ("Held out: " + "; ".join(held_out) + "." if held_out else ""),
        )
        write_residual_plot(labelled, directory / RESIDUAL_PNG, f"{name}: residual ≤ δ? ({rows.removeprefix('its ')})")
        add(
            RESIDUAL_PNG,
            "Residual against δ (training rows)",
            f"|F_pred − F_ref| against δ_i on the same rows (training data, so in-sample); "
            f"{100 * labelled.covered_fraction:.0f}% of {len(labelled.deltas)} rows lie on or under y = x (δ bounds "
            "their error). The out-of-sample test of δ is the calibration figure.",
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


def calibration_caption(calibration: Mapping[str, Any]) -> str:
    """The calibration figure's caption: what was sampled, what is expected and the overall coverage."""
    overall = calibration["overall"]
    low, high = overall["interval"]
    level = calibration.get("interval_level", 0.95)
    return (
        "At the chunk centres each iteration carved (the atoms the selection picked for their high δ_i, not a random "
        "sample of the targets' atoms), the model's force error against the parent's label, with the force and δ_i "
        "predicted before the reference ran: the coverage (error ≤ δ_i) with n and a "
        f"{level:.0%} Wilson interval per bar, and the median error beside the median δ_i. 2.58 is the one-dimensional "
        f"99% quantile; for the norm of a 3-D force error an ensemble whose spread matched its error would cover "
        f"{100 * calibration['expected_coverage']:.2f}% ({expected_coverage_basis(calibration)}). "
        f"Over all: {overall['covered']} of {overall['labelled']} ({100 * overall['coverage']:.0f}%, "
        f"{level:.0%} interval {100 * low:.0f}–{100 * high:.0f}%)."
    )


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
        *_held_out_rows(report),
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
        level = calibration.get("interval_level", 0.95)
        lines += [
            "## Calibration (at the chunk centres, predicted before their reference ran)",
            "",
            "The chunk centres are the atoms the selection picked for their high δ_i, not a random sample. "
            f"Coverage {expected_coverage_label(calibration)}; the intervals are {level:.0%} Wilson score intervals.",
            "",
            f"| iteration | centres labelled | error ≤ δ_i | {level:.0%} interval | median error (eV/Å) | max error (eV/Å) "
            "| median δ_i (eV/Å) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in [*calibration["iterations"], {"iteration": "all", **calibration["overall"]}]:
            covered = "-" if row["coverage"] is None else f"{row['covered']} ({100 * row['coverage']:.0f}%)"
            interval = "-" if row.get("interval") is None else f"{100 * row['interval'][0]:.0f}–{100 * row['interval'][1]:.0f}%"
            lines.append(
                f"| {row['iteration']} | {row['labelled']} | {covered} | {interval} | {_number(row['error_median'])} | "
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


def _held_out_rows(report: CampaignReport) -> list[str]:
    """Summary-table rows: the force error against the parent off the training rows (eV/Å)."""
    held_out = report.held_out
    if held_out is None:
        return []
    parent = held_out.parent.upper()
    rows = []
    for name, mae in held_out.target_mae.items():
        measured = held_out.target_mae_iteration
        model = "kept model" if measured == report.kept_iteration else f"model of iteration {measured}"
        rows.append(f"| force MAE vs {parent}, {name}, every atom (eV/Å; {model}, summary.json) | {mae:.4f} |")
    if not held_out.target_mae:
        rows.append(f"| force MAE vs {parent} on the targets | - ({held_out.why_no_target}) |")
    if held_out.validation_mae is not None:
        rows.append(f"| force MAE on the validation structures (eV/Å; kept model) | {held_out.validation_mae:.4f} |")
    return rows


def _number(value: float | None) -> str:
    """δ and MAE values as `nft status` prints them (4 decimals, eV/Å); '-' where none."""
    return "-" if value is None else f"{value:.4f}"
