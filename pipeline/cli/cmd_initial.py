"""`nft initial`: an initial training set of small bulk cells generated from space groups."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from pipeline.cli import app
from pipeline.cli.common import PARENT_HELP, PARENT_OPTION_HELP, check_output_file, checked_parent, exit_codes, former_name
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
    output: Path = typer.Option(..., "-o", "--output", help="Labelled set to write, format by its name: .traj, .extxyz or .xyz."),
    parent: Optional[str] = typer.Option(None, "--parent", help=PARENT_HELP + " Default emt."),
    parent_options: Optional[list[str]] = typer.Option(None, "--parent-option", metavar="KEY=VALUE", help=PARENT_OPTION_HELP),
    former_calculator: Optional[str] = typer.Option(None, "--calculator", hidden=True, help="Former name of --parent."),
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
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
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
    chosen = checked_parent(former_name(parent, former_calculator, None, "--parent", "--calculator") or "emt", parent_options or [])
    problem = settings_problem(settings, chosen)
    if problem:
        raise BadInput(f"{OPTION_NAMES[problem[0]]}: {problem[1]}")
    check_output_file(output, "-o", holds="labelled set")
    workdir = workdir if workdir is not None else output.with_name(output.name + WORKDIR_SUFFIX)
    if workdir.exists() and not workdir.is_dir():
        raise BadInput(f"--workdir: {workdir} is a file, not a folder")
    workdir_problem = writable_problem(workdir)
    if workdir_problem:
        raise BadInput(f"--workdir: {workdir_problem}")
    check_site(site, {})
    cells = generate_initial_set(
        f"sqlite:///{workdir.resolve() / 'nft.db'}", "initial", chosen, settings, workdir.resolve(), site, observer=_display()
    )
    write_labelled_set(output, cells)
    sizes = sorted(len(atoms) for atoms in cells)
    if as_json:
        report = {"output": str(output), "cells": len(cells), "atoms_per_cell": sizes, "workdir": str(workdir)}
        print(json.dumps({**report, "wall_time_s": time.perf_counter() - started}, indent=2))
        return
    print(
        f"{len(cells)} cells of {sizes[0]}-{sizes[-1]} atoms written to {output} ({time.perf_counter() - started:.1f} s; jobs in {workdir})"
    )


def _numbers(text: Optional[str]) -> Optional[list[int]]:
    """Comma-separated space-group numbers; `BadInput` naming --space-groups for anything else."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"--space-groups: expected space-group numbers separated by commas, e.g. 225,229, got {text!r}") from None


def _display() -> Any:
    """Progress on stderr as `nft run` prints it without a terminal: a timestamped line per event
    (reference jobs counted every few seconds), in a terminal too."""
    from rich.console import Console

    from pipeline.cli.cmd_campaign import PlainDisplay

    return PlainDisplay(Console(stderr=True))
