"""Shared CLI plumbing: turn our exceptions into one-line messages and exit codes."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer

from pipeline.errors import BadInput, RunFailed

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
