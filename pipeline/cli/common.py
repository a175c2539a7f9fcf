"""Shared CLI plumbing: one-line messages and exit codes for our exceptions, and reading structure files."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import typer

from pipeline.errors import BadInput, RunFailed

if TYPE_CHECKING:
    from ase import Atoms

F = TypeVar("F", bound=Callable)


def exit_codes(command: F) -> F:
    """Run a command body; BadInput exits 2 and RunFailed exits 1, each with one line on stderr."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BadInput as error:
            print(f"error: {error}", file=sys.stderr)
            raise typer.Exit(2) from None
        except RunFailed as error:
            print(f"failed: {error}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def read_images(path: Path) -> list[Atoms]:
    """Every image of an ASE-readable file; BadInput naming the file when it can't be read."""
    from ase.io import read

    from pipeline.science.structures import structure_problem

    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    try:
        images = read(str(path), index=":")
    except Exception as error:  # ASE raises many types for unreadable files
        reason = str(error).splitlines()[0][:120] if str(error) else error.__class__.__name__
        raise BadInput(f"{path}: not a readable structure file ({reason})") from None
    if not images:
        raise BadInput(f"{path}: contains no structures")
    for index, atoms in enumerate(images):
        problem = structure_problem(atoms)
        if problem:
            raise BadInput(f"{path}: image {index} {problem}")
    return images
