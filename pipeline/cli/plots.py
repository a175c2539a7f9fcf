"""PNG figures the commands write (matplotlib's Agg canvas: no display, no global backend switch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.science.locality import LocalityResult


def write_locality_plot(result: LocalityResult, tolerance: float, path: Path, title: str) -> None:
    """`write_locality_curve` of a locality analysis (its suggested radius for `tolerance`)."""
    write_locality_curve(
        result.radii, result.max_difference, result.mean_difference, tolerance, result.suggested_radius(tolerance), path, title
    )


def write_locality_report_plot(report: dict, path: Path, title: str) -> None:
    """`write_locality_curve` of a stored `nft locality --json` report (its rows and suggestion)."""
    rows = report["radii"]
    write_locality_curve(
        np.array([row["radius"] for row in rows]),
        np.array([row["max_force_difference"] for row in rows]),
        np.array([row["mean_force_difference"] for row in rows]),
        float(report["tolerance"]),
        report.get("suggested_radius"),
        path,
        title,
    )


def write_locality_curve(
    radii: np.ndarray,
    max_difference: np.ndarray,
    mean_difference: np.ndarray,
    tolerance: float,
    suggested: float | None,
    path: Path,
    title: str,
) -> None:
    """Max and mean |ΔF| (eV/Å, log axis) against the chunk radius (Å), with the tolerance line and
    the suggested radius (Å, or None), written to `path` as PNG.

    A difference of exactly 0 (a chunk that holds everything the force depends on can match to the
    last bit) has no place on a log axis: it is drawn as a hollow marker on the axis floor, a decade
    below the smallest value shown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    radii = np.asarray(radii, dtype=float)
    series = {"max |ΔF|": np.asarray(max_difference, dtype=float), "mean |ΔF|": np.asarray(mean_difference, dtype=float)}
    positive = np.concatenate([values[values > 0] for values in series.values()] + [np.array([tolerance])])
    floor = 10.0 ** (np.floor(np.log10(positive.min())) - 1.0)

    figure = Figure(figsize=(6.0, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for (label, values), style in zip(series.items(), ("o-", "s--")):
        (line,) = axes.plot(radii, np.where(values > 0, values, floor), style, label=label)
        zero = values <= 0
        if zero.any():
            axes.plot(
                radii[zero],
                np.full(zero.sum(), floor),
                "o",
                markersize=11,
                markerfacecolor="none",
                color=line.get_color(),
                label=f"{label} = 0 (on the floor)",
            )
    axes.axhline(tolerance, color="black", linestyle=":", label=f"tolerance {tolerance:g} eV/Å")
    if suggested is not None:
        axes.axvline(suggested, color="grey", linestyle="-.", label=f"suggested chunks.radius {suggested:g} Å")
    axes.set_yscale("log")
    axes.set_ylim(bottom=floor / 2.0)
    axes.set_xlabel("chunk radius (Å)")
    axes.set_ylabel("central-force difference |ΔF| (eV/Å)")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png")
