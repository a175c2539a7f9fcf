"""`nft initial`: an initial training set of small bulk cells generated from space groups."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from pipeline.cli import app
from pipeline.cli.common import check_output_file, exit_codes
from pipeline.errors import BadInput, first_problem

OPTION_NAMES = {
    "elements": "ELEMENTS",
    "count": "--count",
    "space_groups": "--space-groups",
    "seed": "--seed",
    "min_separation": "--min-separation",
    "energy_window": "--energy-window",
    "random_alloys": "--random-alloys",
    "min_atoms": "--min-atoms",
    "max_atoms": "--max-atoms",
}
WORKDIR_SUFFIX = ".nft"


@app.command()
@exit_codes
def initial(
    elements: str = typer.Argument(..., metavar="ELEMENTS", help="Chemical symbols, comma-separated: Pt, Cu,Au or Cu,Ag,Au (any number)."),
    output: Path = typer.Option(..., "-o", "--output", help="Labelled set to write (any ASE format by its name: .traj, .extxyz)."),
    calculator: str = typer.Option(
        "emt", "--calculator", help="Parent calculator: emt or gpaw (its default options unless --parent-option)."
    ),
    parent_options: Optional[list[str]] = typer.Option(
        None,
        "--parent-option",
        help="KEY=VALUE, repeatable: an option of the parent as in [parent.NAME] (value in TOML, e.g. ecut=300, mode=pw, kpts=[2,2,2]).",
    ),
    count: int = typer.Option(20, "--count", help="Cells to keep."),
    space_groups: Optional[str] = typer.Option(
        None, "--space-groups", help="Space-group numbers of the prototypes to use, comma-separated (default: all that fit the elements)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the strains and rattles."),
    min_separation: Optional[float] = typer.Option(
        None,
        "--min-separation",
        help="Smallest interatomic distance a cell may have, Å (default 0.75 × the smallest sum of covalent radii).",
    ),
    energy_window: float = typer.Option(0.3, "--energy-window", help="Largest energy above the relaxed cell, eV/atom."),
    random_alloys: int = typer.Option(
        6,
        "--random-alloys",
        help="Random substitutional alloys of the one-element prototypes to relax and draw from (two or more elements).",
    ),
    min_atoms: int = typer.Option(2, "--min-atoms", help="Fewest atoms of a kept cell."),
    max_atoms: int = typer.Option(16, "--max-atoms", help="Most atoms of a kept cell (and of a random alloy)."),
    site: str = typer.Option("local", "--site", help="A site in site_configs/ (local, slurm, …) or a path to a site file."),
    workdir: Optional[Path] = typer.Option(
        None,
        "--workdir",
        help="Folder of the generation's database and job files (default FILE.nft beside the output); run again to resume.",
    ),
) -> None:
    """Relax a prototype crystal per space group (and random alloys of two or more elements) with the
    parent (cell and positions), draw strained and rattled supercells of 2-16 atoms that keep the
    minimum separation, label them with the parent
    and keep those within the energy window, until --count cells. Every relaxation and label is a
    reference job through Parsl into a database in the work folder: run the same command again after
    a kill and nothing finished is computed again."""
    from pipeline.campaign.config import writable_problem
    from pipeline.campaign.initial_set import generate_initial_set, settings_problem, write_labelled_set
    from pipeline.execution.sites import check_site
    from pipeline.science.initial_sets import InitialSetSettings

    started = time.perf_counter()
    try:
        settings = InitialSetSettings.model_validate(
            dict(
                elements=elements,
                count=count,
                space_groups=_numbers(space_groups),
                seed=seed,
                min_separation=min_separation,
                energy_window=energy_window,
                random_alloys=random_alloys,
                min_atoms=min_atoms,
                max_atoms=max_atoms,
            )
        )
    except ValidationError as error:
        raise BadInput(first_problem(error, OPTION_NAMES)) from None
    parent = checked_parent(calculator, _parent_options(parent_options or []))
    problem = settings_problem(settings, parent)
    if problem:
        raise BadInput(f"{OPTION_NAMES[problem[0]]}: {problem[1]}")
    check_output_file(output, "-o", structure=True)
    workdir = workdir if workdir is not None else output.with_name(output.name + WORKDIR_SUFFIX)
    if workdir.exists() and not workdir.is_dir():
        raise BadInput(f"--workdir: {workdir} is a file, not a folder")
    workdir_problem = writable_problem(workdir)
    if workdir_problem:
        raise BadInput(f"--workdir: {workdir_problem}")
    check_site(site, {})
    cells = generate_initial_set(f"sqlite:///{workdir.resolve() / 'nft.db'}", "initial", parent, settings, workdir.resolve(), site)
    write_labelled_set(output, cells)
    sizes = sorted(len(atoms) for atoms in cells)
    print(
        f"{len(cells)} cells of {sizes[0]}-{sizes[-1]} atoms written to {output} ({time.perf_counter() - started:.1f} s; jobs in {workdir})"
    )


def checked_parent(calculator: str, options: dict[str, Any]) -> Any:
    """The parent with `options`; a wrong one is `BadInput` naming --calculator or --parent-option."""
    from pipeline.execution.parents import ParentConfigError, parent_for

    try:
        return parent_for(calculator, options)
    except ParentConfigError as error:
        option = "--calculator" if error.field == "parent.calculator" else f"--parent-option {error.field.split('.', 2)[-1]}"
        raise BadInput(f"{option}: {error.problem}") from None


def _parent_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs, each VALUE read as a TOML value (a bare word as a string); `BadInput` naming
    --parent-option for an item without "="."""
    options: dict[str, Any] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise BadInput(f"--parent-option: expected KEY=VALUE, e.g. ecut=300, got {item!r}")
        try:
            options[key.strip()] = tomllib.loads(f"value = {value}")["value"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = value.strip()
    return options


def _numbers(text: Optional[str]) -> Optional[list[int]]:
    """Comma-separated space-group numbers; `BadInput` naming --space-groups for anything else."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"--space-groups: expected space-group numbers separated by commas, e.g. 225,229, got {text!r}") from None
