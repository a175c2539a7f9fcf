"""`nft train` and `nft evaluate`: the ML core from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from pipeline.cli import app
from pipeline.cli.progress import TrainingBar
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
from pipeline.errors import BadInput, first_problem
from pipeline.science.settings import TrainingSettings
from pipeline.science.structures import LabelledStructure

console = Console(stderr=True)


def labelled_structures(path: Path) -> list[LabelledStructure]:
    """Images with their stored energies and forces (and optional per-atom `force_mask`)."""
    from pipeline.storage.structure_file import stored_labels

    structures = []
    for index, atoms in enumerate(read_images(path)):
        labels = stored_labels(atoms)
        if labels is None:
            raise BadInput(
                f"{path}: image {index} has no forces, or forces that are not finite and N×3 (a labelled file with forces is expected)"
            )
        structures.append(LabelledStructure(atoms.copy(), labels.energy, labels.forces, atoms.arrays.get("force_mask")))
    return structures


def checked_device(name: str) -> str:
    """A --device value ("auto", "cpu", "cuda") that this machine can honour; BadInput otherwise."""
    from pipeline.science.device import DEVICES, resolve_device

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


DEFAULTS = TrainingSettings()
"""`nft train`'s option defaults: the settings schema's own."""
TRAIN_OPTIONS = {
    "ensemble": "--ensemble",
    "cutoff": "--cutoff",
    "hidden": "--hidden",
    "epochs": "--epochs",
    "lbfgs_steps": "--lbfgs-steps",
    "optimizer": "--optimizer",
    "lm_steps": "--lm-steps",
    "validation_fraction": "--validation-fraction",
    "bootstrap": "--bootstrap",
    "descriptor.kind": "--descriptor",
    "seed": "--seed",
    "device": "--device",
}
"""The settings field behind each option, to name the option in a one-line error."""


@app.command()
@exit_codes
def train(
    data: Path = typer.Argument(..., help="ASE-readable labelled file (energies/forces; optional force_mask)."),
    output: Path = typer.Option(..., "-o", "--output", help="Model file to write."),
    ensemble: int = typer.Option(DEFAULTS.ensemble, help="Number of ensemble members."),
    cutoff: float = typer.Option(DEFAULTS.cutoff, help="Descriptor cutoff radius in Å."),
    hidden: str = typer.Option(",".join(map(str, DEFAULTS.hidden)), help="Hidden layer widths, comma-separated."),
    epochs: Optional[int] = typer.Option(
        None, help="Adam epochs before the second-order fit (default: the settings' default for the optimizer)."
    ),
    optimizer: Optional[str] = typer.Option(
        None,
        help=f"Second-order fit: levenberg-marquardt or lbfgs (default {DEFAULTS.optimizer}; lbfgs when only --lbfgs-steps is given).",
    ),
    lbfgs_steps: Optional[int] = typer.Option(
        None, "--lbfgs-steps", help=f"L-BFGS iterations after Adam (with --optimizer lbfgs; default {DEFAULTS.lbfgs_steps})."
    ),
    lm_steps: Optional[int] = typer.Option(
        None, "--lm-steps", help=f"Levenberg–Marquardt iterations (with --optimizer levenberg-marquardt; default {DEFAULTS.lm_steps})."
    ),
    validation_fraction: Optional[float] = typer.Option(
        None,
        "--validation-fraction",
        help=f"Fraction of structures held out for early stopping (default {DEFAULTS.validation_fraction:g}).",
    ),
    former_lbfgs: Optional[int] = typer.Option(None, "--lbfgs", hidden=True, help="Former name of --lbfgs-steps."),
    former_lm: Optional[int] = typer.Option(None, "--lm", hidden=True, help="Former name of --lm-steps."),
    former_validation: Optional[float] = typer.Option(None, "--validation", hidden=True, help="Former name of --validation-fraction."),
    bootstrap: bool = typer.Option(DEFAULTS.bootstrap, help="Bootstrap-resample the data per member."),
    descriptor: str = typer.Option(DEFAULTS.descriptor.kind, help="Angular terms: g5-moments or g4."),
    seed: int = typer.Option(DEFAULTS.seed, help="Random seed (initialisation, splits, bootstrap)."),
    device: str = typer.Option(DEFAULTS.device, help="auto (cuda when torch sees a GPU, else cpu), cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the training's report as JSON."),
):
    """Train an ensemble on a labelled structure file."""
    from pipeline.science.training import train_ensemble
    from pipeline.storage.model_file import save_model

    checked_device(device)
    options: dict = dict(
        ensemble=ensemble,
        hidden=parse_hidden(hidden),
        cutoff=cutoff,
        bootstrap=bootstrap,
        seed=seed,
        descriptor={"kind": descriptor},
        device=device,
    )
    given = {
        "epochs": epochs,
        "optimizer": optimizer,
        "lbfgs_steps": former_name(lbfgs_steps, former_lbfgs, None, "--lbfgs-steps", "--lbfgs"),
        "lm_steps": former_name(lm_steps, former_lm, None, "--lm-steps", "--lm"),
        "validation_fraction": former_name(validation_fraction, former_validation, None, "--validation-fraction", "--validation"),
    }
    options.update({key: value for key, value in given.items() if value is not None})  # unset: the settings decide
    try:
        settings = TrainingSettings.model_validate(options)
    except ValidationError as error:
        raise BadInput(first_problem(error, TRAIN_OPTIONS)) from None
    problem = settings.fit_problem()
    if problem:
        raise BadInput(f"{TRAIN_OPTIONS.get(problem[0], problem[0])}: {problem[1]}")
    check_output_file(output, "-o", holds=None)
    structures = labelled_structures(data)
    cutoff_problem = settings.cutoff_problem([item.atoms for item in structures])
    if cutoff_problem:
        raise BadInput(f"--cutoff: {cutoff_problem}")
    with TrainingBar(console) as progress:
        model, report = train_ensemble(structures, settings, progress=progress)
    save_model(model, output, extra={"training": settings.model_dump(mode="json"), "report": report.__dict__, "data": str(data)})
    if as_json:
        typer.echo(
            json.dumps({"model": str(output), "members": model.n_members, "structures": len(structures), **report.__dict__}, indent=2)
        )
        return
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
    structures: list[Path] = typer.Argument(
        ..., metavar="FILES...", help="ASE-readable structure files (every image of each is evaluated)."
    ),
    parent: Optional[str] = typer.Option(None, "--parent", help=PARENT_HELP),
    parent_options: Optional[list[str]] = typer.Option(None, "--parent-option", metavar="KEY=VALUE", help=PARENT_OPTION_HELP),
    former_reference: Optional[str] = typer.Option(None, "--reference", hidden=True, help="Former name of --parent."),
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        metavar="CONFIG.toml",
        help="Instead of --parent: a campaign config, whose parent (with its options) and chunks.vacuum are used.",
    ),
    vacuum: Optional[float] = typer.Option(
        None,
        "--vacuum",
        help="Vacuum (Å) of the box a non-periodic structure without a cell gets for the parent (default: the config's chunks.vacuum, else 6).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the aggregate and per-structure metrics as JSON."),
    device: str = typer.Option("auto", help="auto (cuda when torch sees a GPU, else cpu), cpu or cuda."),
):
    """Errors of a model against a parent calculator (eV/Å, eV/atom) on every image of every file,
    per structure and in total, predicted as the ASE calculator predicts (its default precision and
    block size); coverage is the fraction of atoms whose force residual norm is ≤ their δ_i."""
    from pipeline.errors import RunFailed
    from pipeline.execution.evaluation import Evaluation, evaluate_model
    from pipeline.execution.parents import ReferenceFailed
    from pipeline.science.calculator import PREDICTION_DTYPE
    from pipeline.storage.model_file import load_ensemble

    parent = former_name(parent, former_reference, None, "--parent", "--reference")
    reference, vacuum, _ = parent_and_vacuum(parent, parent_options or [], config, vacuum)
    model = load_ensemble(model_path, dtype=PREDICTION_DTYPE, device=checked_device(device))
    files = [(path, read_images(path)) for path in structures]
    for path, images in files:
        check_parent_elements(reference, images, path)
        for index, atoms in enumerate(images):
            try:
                model.element_indices(atoms.numbers)
            except ValueError as error:
                raise BadInput(f"{path}: image {index}: {error}") from None
    rows: list[dict[str, Any]] = []
    evaluated = []
    for path, images in files:
        try:
            evaluation = evaluate_model(model, images, reference, vacuum=vacuum)
        except ReferenceFailed as error:
            raise RunFailed(f"parent {reference.name} on {path}: {error.reason}") from None
        for index, item in enumerate(evaluation.structures):
            rows.append({"file": str(path), "image": index, **item.metrics()})
        evaluated.extend(evaluation.structures)
    aggregate = Evaluation(evaluated).metrics()
    if as_json:
        typer.echo(json.dumps({**aggregate, "aggregate": aggregate, "structures": rows}))
        return
    width = max(len(row["file"]) for row in rows)
    typer.echo(f"{'file':<{width}}  image   atoms  MAE eV/Å  max eV/Å  max δ eV/Å  coverage")
    for row in rows:
        typer.echo(
            f"{row['file']:<{width}}  {row['image']:>5}  {row['n_atoms']:>6}  {row['force_mae']:>8.4f}  "
            f"{row['force_max_error']:>8.4f}  {row['max_uncertainty']:>10.4f}  {row['coverage']:>8.3f}"
        )
    typer.echo(f"structures             {len(rows)} in {len(files)} file(s)")
    typer.echo(f"atoms                  {aggregate['n_atoms']}")
    typer.echo(f"force MAE              {aggregate['force_mae']:.4f} eV/Å")
    typer.echo(f"max force error        {aggregate['force_max_error']:.4f} eV/Å")
    typer.echo(f"max uncertainty δ      {aggregate['max_uncertainty']:.4f} eV/Å")
    typer.echo(f"energy error per atom  {aggregate['energy_error_per_atom']:.4f} eV")
    typer.echo(f"coverage (residual≤δ)  {aggregate['coverage']:.3f} of atoms")
    typer.echo(
        f"residual p50/p90/p99   {aggregate['residual_p50']:.4f} / {aggregate['residual_p90']:.4f} / "
        f"{aggregate['residual_p99']:.4f} eV/Å (max {aggregate['residual_max']:.4f})"
    )
