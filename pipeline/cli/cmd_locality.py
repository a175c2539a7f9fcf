"""`nft locality`: how large a chunk the parent calculator needs, from central-force differences."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.campaign.config import ChunksSection
from pipeline.cli import app
from pipeline.cli.progress import JobsBar
from pipeline.cli.common import (
    PARENT_HELP,
    PARENT_OPTION_HELP,
    check_output_file,
    check_parent_elements,
    exit_codes,
    former_name,
    parent_and_vacuum,
    read_images,
)
from pipeline.errors import BadInput
from pipeline.science.locality import LocalityResult

DEFAULT_SAMPLE_ATOMS = 8
DEFAULT_TOLERANCE = 0.1
"""eV/Å: the EMT campaign's default δ threshold; a chunk's central force should be at least this good."""
CHUNK_DEFAULTS = ChunksSection()
"""`[chunks]` defaults of a campaign: the vacuum (Å) that chunks get here too."""


@app.command()
@exit_codes
def locality(
    structure: Path = typer.Argument(..., metavar="STRUCTURE", help="ASE-readable structure file (its last image is used)."),
    parent_name: Optional[str] = typer.Option(None, "--parent", help=PARENT_HELP),
    parent_options: Optional[list[str]] = typer.Option(None, "--parent-option", metavar="KEY=VALUE", help=PARENT_OPTION_HELP),
    former_calculator: Optional[str] = typer.Option(None, "--calculator", hidden=True, help="Former name of --parent."),
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        metavar="CONFIG.toml",
        help="Instead of --parent: a campaign config, whose parent (with its options), chunks.vacuum and site are used.",
    ),
    radii: str = typer.Option(..., "--radii", help="Chunk radii in Å, comma-separated, e.g. 4,5,6,7,8."),
    sample_atoms: int = typer.Option(
        DEFAULT_SAMPLE_ATOMS, "--atoms", help="Sample atoms, half surface, half core (all atoms when the structure has fewer)."
    ),
    tolerance: float = typer.Option(DEFAULT_TOLERANCE, "--tolerance", help="Largest max |ΔF| (eV/Å) the suggested chunks.radius may have."),
    vacuum: Optional[float] = typer.Option(
        None, "--vacuum", help=f"Vacuum around each chunk, Å (default: the config's chunks.vacuum, else {CHUNK_DEFAULTS.vacuum:g})."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample-atom draw."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows and the suggestion as JSON."),
    plot: Optional[Path] = typer.Option(
        None, "--plot", metavar="FILE.png", help="Also write max and mean |ΔF| against the radius as a PNG."
    ),
    site: Optional[str] = typer.Option(
        None, "--site", help="A site in site_configs/ (local, slurm, …) or a path to a site file (default: the config's site, else local)."
    ),
    workdir: Optional[Path] = typer.Option(
        None,
        "--workdir",
        help="Folder for Parsl's run files and GPAW's job folders (kept); default: a temporary one in the current folder.",
    ),
) -> None:
    """Central-atom force of chunks of each radius against the same atom's force in the whole
    structure, for sample atoms; every force is a reference job of the parent, run through Parsl on
    the site as `nft run` runs its chunks. Prints max and mean |ΔF| (eV/Å) per radius and the
    smallest radius whose max |ΔF| is below the tolerance, the chunks.radius to use."""
    from pipeline.science.locality import locality_sample_atoms

    parent_name = former_name(parent_name, former_calculator, None, "--parent", "--calculator")
    radii_angstrom = parse_radii(radii)
    if sample_atoms < 1:
        raise BadInput(f"--atoms: expected a number of sample atoms >= 1, got {sample_atoms}")
    if not math.isfinite(tolerance) or tolerance <= 0:
        raise BadInput(f"--tolerance: expected a force difference in eV/Å > 0, got {tolerance:g}")
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise BadInput(f"--plot: expected a .png file name, got {str(plot)!r}")
        check_output_file(plot, "--plot", holds=None)
    if workdir is not None:
        _check_workdir(workdir)
    parent, vacuum, campaign = parent_and_vacuum(parent_name, parent_options or [], config, vacuum)
    site_options = dict(campaign.file.site.options) if campaign is not None else {}
    site = site or (campaign.site if campaign is not None else "local")
    atoms = read_images(structure)[-1]
    check_parent_elements(parent, [atoms], structure)
    _check_radii_fit(atoms, radii_angstrom)
    samples = locality_sample_atoms(atoms, sample_atoms, seed=seed)
    from pipeline.execution.locality import site_locality  # Parsl: loaded once the input is known good

    console = Console(stderr=True)
    jobs = 1 + len(radii_angstrom) * len(samples)  # the whole structure, a chunk per radius and atom
    with JobsBar(console, "reference jobs", total=jobs) as progress:
        result = site_locality(
            atoms,
            parent,
            radii_angstrom,
            samples,
            site=site,
            site_options=site_options,
            vacuum=vacuum,
            workdir=workdir,
            progress=progress,
        )
    report = locality_report(result, tolerance, structure, len(atoms), parent.name, parent.physics(), vacuum)
    if campaign is not None:  # the campaign's report draws the curve (docs/campaign.md, nft report)
        _record_in_campaign(campaign.workdir, report)
    if plot is not None:
        from pipeline.cli.plots import write_locality_plot

        write_locality_plot(result, tolerance, plot, f"{parent.name.upper()} locality, {structure.name} ({len(atoms)} atoms)")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    print_locality(Console(), report)
    if plot is not None:
        typer.echo(f"plot: {plot}")


def _record_in_campaign(workdir: Path, report: dict[str, Any]) -> None:
    """Write the report as WORKDIR/locality.json (whole or not at all), where `nft report` finds it."""
    from pipeline.campaign.files import LOCALITY_NAME
    from pipeline.storage.atomic import write_text_atomically

    workdir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(workdir / LOCALITY_NAME, json.dumps(report, indent=2))


def _check_workdir(workdir: Path) -> None:
    """--workdir must be a folder (or one that can be made) where files can be written."""
    from pipeline.campaign.config import writable_problem

    if workdir.exists() and not workdir.is_dir():
        raise BadInput(f"--workdir: {workdir} is a file, not a folder")
    problem = writable_problem(workdir)
    if problem:
        raise BadInput(f"--workdir: {problem}")


def _check_radii_fit(atoms: Any, radii: list[float]) -> None:
    """No radius may make chunks absurdly large for the structure (`neighbours.sphere_problem`): a
    periodic structure's chunk grows as r³ and would never be carved, let alone computed."""
    from pipeline.science.neighbours import sphere_problem

    problem = sphere_problem(atoms, max(radii))
    if problem:
        raise BadInput(f"--radii: {problem}")


def parse_radii(text: str) -> list[float]:
    """'4,6,8' → [4.0, 6.0, 8.0] (Å, sorted, each once); BadInput unless every one is a positive number."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise BadInput(f"--radii: expected comma-separated chunk radii in Å like 4,6,8, got {text!r}")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise BadInput(f"--radii: expected comma-separated chunk radii in Å like 4,6,8, got {text!r}") from None
    if not all(math.isfinite(value) and value > 0 for value in values):
        raise BadInput(f"--radii: every radius must be a positive number of Å, got {text!r}")
    return sorted(set(values))


def locality_report(
    result: LocalityResult,
    tolerance: float,
    structure: Path,
    n_atoms: int,
    calculator: str,
    parent_options: dict[str, Any],
    vacuum: float,
) -> dict[str, Any]:
    """What `nft locality --json` prints: the rows (Å, atoms, eV/Å) and the suggested chunks.radius
    (Å; None when no radius has max |ΔF| below `tolerance`, eV/Å)."""
    suggested = result.suggested_radius(tolerance)
    above_again = [
        float(radius)
        for radius, largest in zip(result.radii, result.max_difference)
        if suggested is not None and radius > suggested and largest >= tolerance
    ]
    return {
        "structure": str(structure),
        "n_atoms": n_atoms,
        "calculator": calculator,
        "parent_options": parent_options,
        "vacuum": vacuum,
        "tolerance": tolerance,
        **result.to_dict(),
        "suggested_radius": suggested,
        "larger_radii_above_tolerance": above_again,
    }


def print_locality(console: Console, report: dict[str, Any]) -> None:
    """The rows as a table, then the suggestion in words."""
    tolerance = report["tolerance"]
    console.print(
        f"{report['calculator']} locality of {report['structure']} ({report['n_atoms']} atoms): "
        f"{len(report['sample_indices'])} sample atoms, chunks with {report['vacuum']:g} Å vacuum",
        highlight=False,
        soft_wrap=True,
    )
    table = Table("radius (Å)", "chunk atoms", "max |ΔF| (eV/Å)", "mean |ΔF| (eV/Å)")
    for row in report["radii"]:
        table.add_row(
            f"{row['radius']:g}",
            f"{row['mean_chunk_atoms']:.0f} ({row['min_chunk_atoms']}–{row['max_chunk_atoms']})",
            f"{row['max_force_difference']:.3g}",
            f"{row['mean_force_difference']:.3g}",
            style="green" if row["max_force_difference"] < tolerance else None,
        )
    console.print(table)
    console.print("chunk atoms: mean (min–max) over the sample atoms", highlight=False, soft_wrap=True)
    suggested = report["suggested_radius"]
    if suggested is None:
        largest = report["radii"][-1]
        console.print(
            f"no radius qualifies: max |ΔF| is not below the tolerance {tolerance:g} eV/Å at any radius "
            f"(at the largest, {largest['radius']:g} Å: {largest['max_force_difference']:.3g} eV/Å); try larger radii",
            highlight=False,
            soft_wrap=True,
        )
        return
    console.print(
        f"suggested chunks.radius = {suggested:g} Å: the smallest radius whose max |ΔF| is below the tolerance {tolerance:g} eV/Å",
        highlight=False,
        soft_wrap=True,
    )
    if report["larger_radii_above_tolerance"]:
        console.print(
            "but max |ΔF| is at or above the tolerance again at "
            + ", ".join(f"{radius:g}" for radius in report["larger_radii_above_tolerance"])
            + " Å",
            highlight=False,
            soft_wrap=True,
        )
