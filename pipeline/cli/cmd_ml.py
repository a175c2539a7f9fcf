"""`nft train` and `nft evaluate`: the ML core from the command line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.cli import app
from pipeline.cli.common import exit_codes
from pipeline.errors import BadInput
from pipeline.science.structures import LabelledStructure

console = Console(stderr=True)


def read_images(path: Path):
    """Every image of an ASE-readable file; BadInput naming the file when it can't be read."""
    from ase.io import read

    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    try:
        images = read(str(path), index=":")
    except Exception as error:  # ASE raises many types for unreadable files
        reason = str(error).splitlines()[0][:120] if str(error) else error.__class__.__name__
        raise BadInput(f"{path}: not a readable structure file ({reason})") from None
    if not images:
        raise BadInput(f"{path}: contains no structures")
    return images


def labelled_structures(path: Path) -> list[LabelledStructure]:
    """Images with their stored energies and forces (and optional per-atom `force_mask`)."""
    structures = []
    for index, atoms in enumerate(read_images(path)):
        calc = atoms.calc
        forces = calc.results.get("forces") if calc is not None else None
        if forces is None:
            raise BadInput(f"{path}: image {index} has no forces (a labelled file with forces is expected)")
        energy = calc.results.get("energy", calc.results.get("free_energy"))
        mask = atoms.arrays.get("force_mask")
        labelled = atoms.copy()
        structures.append(
            LabelledStructure(labelled, None if energy is None else float(energy), np.array(forces), mask)
        )
    return structures


def checked_device(name: str) -> str:
    """A --device value ("auto", "cpu", "cuda") that this machine can honour; BadInput otherwise."""
    from pipeline.science.training import DEVICES, resolve_device

    if name not in DEVICES:
        raise BadInput(f"--device: expected {', '.join(DEVICES)}, got {name!r}")
    try:
        resolve_device(name)
    except ValueError:
        raise BadInput("--device: cuda, but torch sees no CUDA GPU on this machine (use auto or cpu)") from None
    return name


def parse_hidden(text: str) -> tuple[int, ...]:
    """'5,5' → (5, 5); BadInput on anything else."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BadInput(f"--hidden: expected comma-separated layer widths like 5,5, got {text!r}") from None
    if not widths or any(w < 1 for w in widths):
        raise BadInput(f"--hidden: layer widths must be ≥ 1, got {text!r}")
    return widths


@app.command()
@exit_codes
def train(
    data: Path = typer.Argument(..., help="ASE-readable labelled file (energies/forces; optional force_mask)."),
    output: Path = typer.Option(..., "-o", "--output", help="Model file to write."),
    ensemble: int = typer.Option(10, help="Number of ensemble members."),
    cutoff: float = typer.Option(6.5, help="Descriptor cutoff radius in Å."),
    hidden: str = typer.Option("5,5", help="Hidden layer widths, comma-separated."),
    epochs: int = typer.Option(300, help="Adam epochs, before L-BFGS."),
    lbfgs: int = typer.Option(1000, help="L-BFGS iterations after Adam (per-member batched L-BFGS)."),
    validation: float = typer.Option(0.0, help="Fraction of structures held out for early stopping."),
    bootstrap: bool = typer.Option(False, help="Bootstrap-resample the data per member."),
    descriptor: str = typer.Option("g5-moments", help="Angular terms: g5-moments or g4."),
    seed: int = typer.Option(0, help="Random seed (initialisation, splits, bootstrap)."),
    device: str = typer.Option("auto", help="auto (cuda when torch sees a GPU, else cpu), cpu or cuda."),
):
    """Train an ensemble on a labelled structure file."""
    from pipeline.science.training import TrainingSettings, train_ensemble
    from pipeline.storage.model_file import save_model

    if ensemble < 2:
        raise BadInput(f"--ensemble: needs at least 2 members for an uncertainty, got {ensemble}")
    if cutoff <= 0:
        raise BadInput(f"--cutoff: must be > 0 Å, got {cutoff}")
    if epochs < 0:
        raise BadInput(f"--epochs: must be ≥ 0, got {epochs}")
    if descriptor not in ("g5-moments", "g4"):
        raise BadInput(f"--descriptor: expected g5-moments or g4, got {descriptor!r}")
    checked_device(device)
    if not output.parent.exists():
        raise BadInput(f"{output}: folder {output.parent} does not exist")
    structures = labelled_structures(data)
    try:
        settings = TrainingSettings(
            ensemble=ensemble, hidden=parse_hidden(hidden), cutoff=cutoff, epochs=epochs, lbfgs_steps=lbfgs,
            validation_fraction=validation, bootstrap=bootstrap, seed=seed, descriptor={"kind": descriptor},
            device=device,
        )
    except ValueError as error:
        raise BadInput(str(error)) from None
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                  TextColumn("loss {task.fields[loss]:.4g}"), TimeRemainingColumn(), console=console,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("train", total=epochs, loss=float("nan"))
        model, report = train_ensemble(
            structures, settings, progress=lambda epoch, total, loss: progress.update(task, completed=epoch, loss=loss)
        )
    save_model(model, output, extra={"training": settings.to_dict(), "report": report.__dict__, "data": str(data)})
    typer.echo(
        f"trained {model.n_members} members on {len(structures)} structures: "
        f"train force MAE {report.train_force_mae:.4f} eV/Å"
        + (f", validation {report.validation_force_mae:.4f} eV/Å" if report.validation_force_mae is not None else "")
        + f" -> {output}"
    )


@app.command()
@exit_codes
def evaluate(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model file written by nft train / nft run."),
    structure: Path = typer.Argument(..., help="ASE-readable structure file (every image is evaluated)."),
    reference: str = typer.Option(..., "--reference", help="Reference calculator name, e.g. emt."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    device: str = typer.Option("auto", help="auto (cuda when torch sees a GPU, else cpu), cpu or cuda."),
):
    """Errors of a model against a reference calculator (eV/Å, eV/atom), predicted as the ASE
    calculator predicts (its default precision and block size)."""
    from pipeline.errors import RunFailed
    from pipeline.execution.evaluation import evaluate_model
    from pipeline.execution.parents import PARENTS, ReferenceFailed, parent_for
    from pipeline.science.calculator import PREDICTION_DTYPE
    from pipeline.storage.model_file import load_ensemble

    if reference not in PARENTS:
        raise BadInput(f"--reference: unknown calculator {reference!r} (known: {', '.join(PARENTS)})")
    model = load_ensemble(model_path, dtype=PREDICTION_DTYPE, device=checked_device(device))
    images = read_images(structure)
    try:
        metrics = evaluate_model(model, images, parent_for(reference)).metrics()
    except ValueError as error:  # an element the model lacks
        raise BadInput(str(error)) from None
    except ReferenceFailed as error:
        raise RunFailed(f"reference {reference}: {error.reason}") from None
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    typer.echo(f"atoms                  {metrics['n_atoms']}")
    typer.echo(f"force MAE              {metrics['force_mae']:.4f} eV/Å")
    typer.echo(f"max force error        {metrics['force_max_error']:.4f} eV/Å")
    typer.echo(f"max uncertainty δ      {metrics['max_uncertainty']:.4f} eV/Å")
    typer.echo(f"energy error per atom  {metrics['energy_error_per_atom']:.4f} eV")
