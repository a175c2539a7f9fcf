"""The `nft` command: argument parsing, printing and exit codes only."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="nft",
    help="Nearsighted Force Training of machine-learned interatomic potentials.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

from pipeline.cli import _register  # noqa: E402,F401  (attaches the subcommands)
