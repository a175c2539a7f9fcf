"""`nft relax`: relaxation with uncertainty in a campaign (chunks added where δ exceeds the threshold)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli import app
from pipeline.cli.cmd_campaign import PlainDisplay
from pipeline.cli.common import check_output_file, check_parent_elements, exit_codes, former_name, read_images
from pipeline.errors import BadInput, RunFailed
from pipeline.science.relaxation import DEFAULT_FMAX, DEFAULT_MAX_STEPS, DEFAULT_OPTIMIZER

if TYPE_CHECKING:
    from pipeline.campaign.config import CampaignConfig


@app.command()
@exit_codes
def relax(
    config: Path = typer.Argument(..., metavar="CONFIG.toml", help="Campaign config (TOML) with a trained model."),
    structure: Path = typer.Argument(..., metavar="STRUCTURE", help="ASE-readable file; its last image is relaxed."),
    output: Path = typer.Option(
        ...,
        "-o",
        "--output",
        help="Relaxed structure to write (e.g. relaxed.traj); OUT-trajectory.extxyz and OUT-steps.csv/json go beside it.",
    ),
    fmax: float = typer.Option(DEFAULT_FMAX, "--fmax", help="Stop when the largest force is below this (eV/Å)."),
    optimizer: Optional[str] = typer.Option(
        None,
        "--relax-optimizer",
        help=f"ASE optimizer of the relaxation: BFGS, FIRE or LBFGS (not the training's); default {DEFAULT_OPTIMIZER}.",
    ),
    former_optimizer: Optional[str] = typer.Option(None, "--optimizer", hidden=True, help="Former name of --relax-optimizer."),
    steps: int = typer.Option(DEFAULT_MAX_STEPS, "--steps", help="At most this many optimizer steps."),
    site: Optional[str] = typer.Option(None, "--site", help="A site in site_configs/ or a path (default: the config's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
) -> None:
    """Relax STRUCTURE with the campaign's latest model; wherever δ exceeds the campaign's threshold,
    carve chunks there, compute them with the parent, retrain (a new campaign iteration) and go on.

    Exits 0 when fmax and δ end below their limits, 1 when the relaxation stops short (steps used
    up, or δ above the threshold with nothing more to learn) or fails, 2 on bad input. Run the same
    command again to resume after a kill.
    """
    from pipeline.campaign.config import load_config
    from pipeline.campaign.relax import check_relax_options, relax_structure

    ase_optimizer = former_name(optimizer, former_optimizer, None, "--relax-optimizer", "--optimizer") or DEFAULT_OPTIMIZER
    check_relax_options(fmax, ase_optimizer, steps)
    check_output_file(output, "-o", holds="structure", create_folder=True)
    campaign = load_config(config)
    atoms = read_images(structure)[-1]
    check_parent_elements(campaign.parent, [atoms], structure)
    verify_latest_model(campaign)
    console = Console()
    summary = relax_structure(
        campaign, atoms, str(structure), output, fmax, ase_optimizer, steps, site, observer=PlainDisplay(Console(stderr=True))
    )
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(steps_table(summary))
        console.print(
            f"{summary['reason']} after {summary['steps']} step(s): fmax {summary['fmax']:.4f} eV/Å "
            f"(target {summary['fmax_target']:g}), δ {summary['delta']:.4f} eV/Å (threshold {summary['threshold']:g}), "
            f"{summary['chunks_added']} chunk(s) added, {summary['wall_time_s']:.1f} s; wrote {output}",
            highlight=False,
        )
    if not summary["converged"]:
        raise RunFailed(f"relaxation stopped short ({summary['reason']}); outputs written, see {summary['outputs']['steps_csv']}")


def verify_latest_model(campaign: CampaignConfig) -> None:
    """Load the campaign's latest model, its recorded sha256 checked, before Parsl starts or a file
    is written: a corrupt or replaced model is refused in one line with the disk as it was. A
    campaign without a database or a model is left to `relax_structure`, which says so in its turn."""
    from pipeline.campaign.status import open_existing_store
    from pipeline.storage.model_file import load_ensemble

    try:
        store = open_existing_store(campaign)
    except BadInput:
        return
    with store:
        models = store.models()
        if models:
            load_ensemble(store.model_file(models[-1]))


def steps_table(summary: Mapping[str, Any]) -> Table:
    """The steps table: one row per evaluation (a retrained model evaluates the same step again)."""
    table = Table("step", "model", "energy (eV)", "fmax (eV/Å)", "δ (eV/Å)", "chunks added", title="relaxation")
    for row in summary["table"]:
        table.add_row(
            str(row["step"]),
            "-" if row["model"] is None else str(row["model"]),
            f"{row['energy']:.4f}",
            f"{row['fmax']:.4f}",
            f"{row['delta']:.4f}",
            str(row["chunks_added"]),
        )
    return table
