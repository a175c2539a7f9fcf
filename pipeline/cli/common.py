"""Shared CLI plumbing: one-line messages and exit codes for our exceptions, and reading structure files."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, ParamSpec, TypeVar

import typer

from pipeline.cli import INTERRUPTED_EXIT_CODE, INTERRUPTED_MESSAGE, stop_at_once
from pipeline.errors import BadInput, RunFailed

if TYPE_CHECKING:
    from ase import Atoms

    from pipeline.campaign.config import CampaignConfig
    from pipeline.execution.parents import Parent

P = ParamSpec("P")
R = TypeVar("R")


def exit_codes(command: Callable[P, R]) -> Callable[P, R]:
    """Run a command body; BadInput exits 2, RunFailed 1 and an interruption 130, each with one line
    on stderr. Once the body has ended there is nothing left to clean up: a stopping signal from
    then on exits 130 at once (`stop_at_once`), not inside click, which would print "Aborted!"."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            result = command(*args, **kwargs)
        except BadInput as error:
            stop_at_once()
            print(f"error: {error}", file=sys.stderr)
            raise typer.Exit(2) from None
        except RunFailed as error:
            stop_at_once()
            print(f"failed: {error}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:  # Ctrl-C, or a stopping signal (`pipeline.cli.STOP_SIGNALS`)
            stop_at_once()
            print(INTERRUPTED_MESSAGE, file=sys.stderr)
            raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
        stop_at_once()
        return result

    return wrapper


def parent_and_vacuum(calculator: str | None, config: Path | None, vacuum: float | None) -> tuple[Parent, float, CampaignConfig | None]:
    """The parent a command computes with and the vacuum (Å) its boxes get: a campaign config's
    parent (with its options) and `chunks.vacuum`, else `calculator` with its default options and
    the default `chunks.vacuum`; `vacuum` overrides either. Returns the loaded config too (None
    without one). BadInput for a negative or non-finite `vacuum`."""
    import math

    from pipeline.campaign.config import ChunksSection, load_config
    from pipeline.execution.parents import parent_for

    if vacuum is not None and (not math.isfinite(vacuum) or vacuum < 0):
        raise BadInput(f"--vacuum: expected a vacuum in Å >= 0, got {vacuum:g}")
    if config is not None:
        campaign = load_config(config)
        return campaign.parent, campaign.file.chunks.vacuum if vacuum is None else vacuum, campaign
    return parent_for(calculator), ChunksSection().vacuum if vacuum is None else vacuum, None


def check_output_file(path: Path, option: str, *, structure: bool, create_folder: bool = False) -> None:
    """An output file a command will write, checked before any work: not a folder, in a folder that
    exists (with `create_folder`: in one that can be made) and can be written, and with `structure`
    a name whose format ASE can write. BadInput naming `option` (e.g. ``-o``) otherwise."""
    from pipeline.campaign.config import writable_problem
    from pipeline.science.structures import ase_can_write

    if path.is_dir():
        raise BadInput(f"{option}: {path} is a folder, not a file")
    if not create_folder and not path.parent.is_dir():
        raise BadInput(f"{option}: folder {path.parent} does not exist")
    problem = writable_problem(path.parent)
    if problem:
        raise BadInput(f"{option}: {problem}")
    if structure and not ase_can_write(path):
        raise BadInput(f"{option}: {path.name}: ASE has no writer for this file name (use e.g. .traj, .extxyz, .xyz)")


def check_parent_elements(parent: Parent, images: Sequence[Atoms], label: Path | str) -> None:
    """BadInput naming `label` (a file) when `parent` has no parameters for an element of `images`:
    `Parent.element_problem`, the check `nft initial` and a campaign config make, before any job."""
    from pipeline.science.initial_sets import element_symbols

    for index, atoms in enumerate(images):
        problem = parent.element_problem(element_symbols([int(z) for z in atoms.numbers]))
        if problem:
            where = f"image {index}: " if len(images) > 1 else ""
            raise BadInput(f"{label}: {where}{problem}")


def read_images(path: Path) -> list[Atoms]:
    """Every image of a structure file given on the command line (`read_structure_file`); BadInput
    naming the file when it is missing, a folder or can't be read."""
    from pipeline.storage.structure_file import read_structure_file

    if path.is_dir():
        raise BadInput(f"{path}: is a folder, not a structure file")
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    return read_structure_file(path, str(path))
