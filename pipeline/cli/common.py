"""Shared CLI plumbing: one-line messages and exit codes for our exceptions, and reading structure files."""

from __future__ import annotations

import functools
import sys
import tomllib
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Literal, ParamSpec, TypeVar

import typer

from pipeline.cli import INTERRUPTED_EXIT_CODE, INTERRUPTED_MESSAGE, stop_at_once
from pipeline.errors import BadInput, RunFailed

if TYPE_CHECKING:
    from ase import Atoms

    from pipeline.campaign.config import CampaignConfig
    from pipeline.execution.parents import Parent

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

PARENT_HELP = (
    "Parent calculator: emt, gpaw, cp2k, or ase (any ASE calculator by import path), with its default options unless --parent-option."
)
PARENT_OPTION_HELP = (
    "KEY=VALUE, repeatable: an option of the parent as in its \\[parent.NAME] table of a campaign config "
    "(value in TOML, e.g. ecut=300, mode=pw, kpts=\\[2,2,2])."
)
"""The help of `--parent` and `--parent-option`, the same on every command that runs the parent
(a bracket that rich would read as markup is escaped: `[parent.NAME]` must show as written)."""

OutputFormat = Literal["structure", "labelled set", "extxyz", "toml"]
"""What an output file holds, which decides the names it may have: one structure (any format ASE
writes), a labelled set (several structures with energies and forces), extxyz, or a TOML config."""
LABELLED_SET_FORMATS = ("traj", "extxyz", "json")
"""ASE formats that hold several structures with their energies and forces (.traj, .extxyz or
.xyz, ASE's .json database): any other loses the labels or holds one structure only."""


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


def former_name(value: T, former: T | None, default: T, name: str, old: str) -> T:
    """An option's value, given by its name or by its former name `old` (a hidden option, kept so
    that scripts written for an earlier nft still run). BadInput when both are given."""
    if former is None:
        return value
    if value != default:
        raise BadInput(f"{name}: given twice, also as {old} (its former name)")
    return former


def parent_options(items: Sequence[str]) -> dict[str, Any]:
    """--parent-option KEY=VALUE items, each VALUE read as a TOML value (a bare word as a string);
    `BadInput` naming --parent-option for an item without "="."""
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


def checked_parent(name: str, items: Sequence[str] = ()) -> Parent:
    """The parent called `name` with the --parent-option `items`; a wrong one is `BadInput` naming
    --parent or the --parent-option."""
    from pipeline.execution.parents import ParentConfigError, parent_for

    try:
        return parent_for(name, parent_options(items))
    except ParentConfigError as error:
        option = "--parent" if error.field == "parent.calculator" else f"--parent-option {error.field.split('.', 2)[-1]}"
        raise BadInput(f"{option}: {error.problem}") from None


def parent_and_vacuum(
    parent: str | None, items: Sequence[str], config: Path | None, vacuum: float | None
) -> tuple[Parent, float, CampaignConfig | None]:
    """The parent a command computes with and the vacuum (Å) its boxes get: a campaign config's
    parent (with its options) and `chunks.vacuum`, else `parent` with the --parent-option `items`
    and the default `chunks.vacuum`; `vacuum` overrides either. Returns the loaded config too (None
    without one). BadInput for neither or both of `parent` and `config`, options with `config`, or
    a negative or non-finite `vacuum`."""
    import math

    from pipeline.campaign.config import ChunksSection, load_config
    from pipeline.execution.parents import PARENTS

    if parent is None and config is None:
        raise BadInput(f"--parent: required (a parent calculator: {', '.join(PARENTS)}), unless --config CONFIG.toml gives [parent]")
    if parent is not None and config is not None:
        raise BadInput("--parent: not with --config (the config's [parent] is the parent)")
    if items and config is not None:
        raise BadInput("--parent-option: not with --config (the config's [parent.NAME] table holds the parent's options)")
    if vacuum is not None and (not math.isfinite(vacuum) or vacuum < 0):
        raise BadInput(f"--vacuum: expected a vacuum in Å >= 0, got {vacuum:g}")
    if config is not None:
        campaign = load_config(config)
        return campaign.parent, campaign.file.chunks.vacuum if vacuum is None else vacuum, campaign
    assert parent is not None
    return checked_parent(parent, items), ChunksSection().vacuum if vacuum is None else vacuum, None


def check_output_file(path: Path, option: str, *, holds: OutputFormat | None, create_folder: bool = False) -> None:
    """An output file a command will write, checked before any work: not a folder, in a folder that
    exists (with `create_folder`: in one that can be made) and can be written, and named for what
    it `holds` (`output_format_problem`). BadInput naming `option` (e.g. ``-o``) otherwise."""
    from pipeline.campaign.config import writable_problem

    if path.is_dir():
        raise BadInput(f"{option}: {path} is a folder, not a file")
    if not create_folder and not path.parent.is_dir():
        raise BadInput(f"{option}: folder {path.parent} does not exist")
    problem = writable_problem(path.parent)
    if problem:
        raise BadInput(f"{option}: {problem}")
    problem = output_format_problem(path, holds) if holds is not None else None
    if problem:
        raise BadInput(f"{option}: {path.name}: {problem}")


def output_format_problem(path: Path, holds: OutputFormat) -> str | None:
    """Why a file named `path` cannot hold what a command writes (`OutputFormat`), or None: known
    from the name alone, before any work, so that no command computes for an hour to fail on the write."""
    from ase.io.formats import filetype

    from pipeline.science.structures import ase_can_write

    if holds == "toml":
        return None if path.suffix == ".toml" else "a campaign config is TOML: name it e.g. campaign.toml"
    if holds == "structure":
        return None if ase_can_write(path) else "ASE has no writer for this file name (use e.g. .traj, .extxyz, .xyz)"
    try:
        format_name = filetype(str(path), read=False)
    except Exception:  # ASE raises several types for names it cannot place
        format_name = None
    if holds == "extxyz":
        return None if format_name == "extxyz" else "the training set is written as extxyz: name it .extxyz or .xyz"
    if format_name in LABELLED_SET_FORMATS:
        return None
    if not ase_can_write(path):
        return "ASE has no writer for this file name (use .traj, .extxyz or .xyz)"
    return "this format cannot hold several structures with their energies and forces (use .traj, .extxyz or .xyz)"


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
