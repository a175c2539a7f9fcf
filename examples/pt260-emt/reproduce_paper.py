"""Reproduce the paper's EMT figures (docs/paper.md), one subcommand per figure.

    python examples/pt260-emt/reproduce_paper.py particles OUT_DIR [--sizes 405,561,711,1415]
    python examples/pt260-emt/reproduce_paper.py campaign RUN_DIR [--target FILE]
    python examples/pt260-emt/reproduce_paper.py cutoff-scan RUN_DIR --score FILE… [--cutoffs 4,5,6,6.5,7,8]
        [--seeds 0,1,2] [--plot PNG]
    python examples/pt260-emt/reproduce_paper.py ml-relax MODEL STRUCTURE -o OUT [--fmax 0.05 --steps 300 --compare-emt]

`particles` writes rattled Pt cuboctahedra larger than the target (`ase.cluster.Octahedron`), made
like it: the same normal rattle (0.085 Å) and the first seed whose EMT forces stay within the
paper's [0.1, 5.1] eV/Å upper bound. `campaign` copies the example (config and structures; `--target`
replaces the target) into RUN_DIR, runs `nft run` there and prints δ, chunks, the fraction of target
atoms that got a chunk and the force MAE vs EMT as JSON. `cutoff-scan` trains a fresh ensemble on the
finished campaign's training set for each model cutoff (the chunk rows built for that cutoff, as the
campaign would) and each `--seeds` seed, and scores the force MAE vs EMT on each `--score` file. `ml-relax` relaxes a
structure with a model's ensemble mean alone (BFGS; `nft relax` is the one that adds chunks) and
prints its max δ and EMT's largest force on the result (`--compare-emt`: and its RMSD to EMT's own
BFGS relaxation from the same start, to fmax 0.01 eV/Å). Outputs go where you say
(put them under /tmp); nothing in the repository is written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.cluster import Octahedron
from ase.io import read, write

from pipeline.campaign.config import load_config
from pipeline.campaign.training_set import training_structures
from pipeline.science.examples import PT260_RATTLE_ANGSTROM, PT_LATTICE_CONSTANT_ANGSTROM, emt_label
from pipeline.science.settings import TrainingSettings
from pipeline.science.training import train_ensemble
from pipeline.storage.store import CampaignStore

HERE = Path(__file__).resolve().parent
# atoms → (Octahedron length, cutoff): cuboctahedra-like truncated octahedra larger than Pt260 (8, 3)
OCTAHEDRA = {260: (8, 3), 405: (9, 3), 561: (11, 5), 711: (11, 4), 1415: (15, 7)}
MAX_FORCE_EV_PER_ANGSTROM = 5.1  # the paper's Pt260 force range is [0.1, 5.1] eV/Å


def rattled_particle(n_atoms: int, max_seeds: int = 200) -> tuple[Atoms, int, np.ndarray]:
    """The `n_atoms` octahedron rattled by 0.085 Å with the first seed whose EMT |F| ≤ 5.1 eV/Å."""
    length, cutoff = OCTAHEDRA[n_atoms]
    cluster = Octahedron("Pt", length, cutoff, latticeconstant=PT_LATTICE_CONSTANT_ANGSTROM)
    for seed in range(max_seeds):
        atoms = Atoms(numbers=cluster.numbers, positions=cluster.positions, pbc=False)
        atoms.positions += np.random.default_rng(seed).normal(0.0, PT260_RATTLE_ANGSTROM, atoms.positions.shape)
        forces = np.linalg.norm(emt_label(atoms).get_forces(), axis=1)
        if forces.max() <= MAX_FORCE_EV_PER_ANGSTROM:
            return atoms, seed, forces
    raise RuntimeError(f"no seed below {max_seeds} keeps Pt{n_atoms}'s EMT forces ≤ {MAX_FORCE_EV_PER_ANGSTROM} eV/Å")


def cmd_particles(args: argparse.Namespace) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        atoms, seed, forces = rattled_particle(size)
        path = args.out_dir / f"pt{size}_rattled.traj"
        write(path, atoms)
        print(
            json.dumps(
                {
                    "file": str(path),
                    "atoms": size,
                    "seed": seed,
                    "force_min": round(float(forces.min()), 3),
                    "force_max": round(float(forces.max()), 3),
                }
            )
        )


def cmd_campaign(args: argparse.Namespace) -> None:
    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    target = args.target or HERE / "pt260_rattled.traj"
    for source in (HERE / "bulk_train.traj", target):
        if not (run_dir / source.name).exists():
            shutil.copy(source, run_dir / source.name)
    config = (HERE / "config.toml").read_text()
    if '"pt260_rattled.traj"' not in config:
        raise SystemExit(f"{HERE / 'config.toml'}: expected the target pt260_rattled.traj in [data] targets")
    (run_dir / "config.toml").write_text(config.replace('"pt260_rattled.traj"', json.dumps(target.name)))
    started = time.perf_counter()
    subprocess.run(["nft", "run", str(run_dir / "config.toml")], check=True)
    wall = time.perf_counter() - started
    print(json.dumps(campaign_figures(run_dir, wall)))


def campaign_figures(run_dir: Path, wall: float | None = None) -> dict:
    """δ, chunks, fraction of target atoms with a chunk and force MAE of a finished campaign."""
    config = load_config(run_dir / "config.toml")
    summary = json.loads((config.workdir / "summary.json").read_text())
    target = config.targets[0]
    with CampaignStore.open(config.database_url, config.name, create=False) as store:
        centres = {int(s.center_in_parent) for s in store.structures("chunk")}
    return {
        "atoms": len(target),
        "converged": summary["converged"],
        "iterations": summary["iterations"],
        "final_delta": summary["final_uncertainty"],
        "chunks": summary["chunks"],
        "atoms_with_chunk_fraction": round(len(centres) / len(target), 4),
        "force_mae_vs_emt": summary.get("force_mae_vs_parent"),
        "campaign_wall_s": round(summary["wall_time"]["total"], 1),
        **({"command_wall_s": round(wall, 1)} if wall is not None else {}),
    }


def cmd_cutoff_scan(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    config = load_config(args.run_dir / "config.toml")
    scored = [(path.name, read(path)) for path in args.score]
    references = {name: emt_label(atoms).get_forces() for name, atoms in scored}
    base = config.file.model.model_dump()
    rows = []
    for cutoff in args.cutoffs:
        with CampaignStore.open(config.database_url, config.name, create=False) as store:
            structures = training_structures(
                store, config.parent.name, config.parent.physics(), config.file.chunks.training_environment, cutoff
            )
        for seed in args.seeds:
            settings = TrainingSettings.model_validate({**_training_keys(base), "cutoff": cutoff, "seed": seed})
            started = time.perf_counter()
            model, _ = train_ensemble(structures, settings, elements=list(config.elements))
            row = {"cutoff": cutoff, "seed": seed, "training_rows": len(structures), "training_s": round(time.perf_counter() - started, 1)}
            for name, atoms in scored:
                prediction = model.predict(atoms)
                row[f"mae {name}"] = round(float(np.abs(prediction.forces - references[name]).mean()), 4)
                row[f"max_delta {name}"] = round(float(prediction.uncertainties.max()), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.plot is not None:
        plot_cutoff_scan(rows, [name for name, _ in scored], args.plot)
        print(f"plot: {args.plot}")


def _training_keys(model_section: dict) -> dict:
    """The `[model]` keys TrainingSettings takes (the section also holds campaign-only keys)."""
    fields = TrainingSettings.model_fields
    return {key: value for key, value in model_section.items() if key in fields and value is not None}


def plot_cutoff_scan(rows: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    cutoffs = sorted({row["cutoff"] for row in rows})
    for name in names:
        medians = [np.median([row[f"mae {name}"] for row in rows if row["cutoff"] == rc]) for rc in cutoffs]
        (line,) = axis.plot(cutoffs, medians, "o-", label=f"{name} (median over seeds)")
        axis.plot([row["cutoff"] for row in rows], [row[f"mae {name}"] for row in rows], ".", color=line.get_color(), alpha=0.5)
    axis.axvspan(6, 7, color="0.9", label="paper's best (DFT)")
    axis.set_xlabel("model cutoff (Å)")
    axis.set_ylabel("force MAE vs EMT (eV/Å)")
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def cmd_ml_relax(args: argparse.Namespace) -> None:
    """Relax STRUCTURE with the model's ensemble mean alone (no chunks added; `nft relax` adds them)."""
    import torch
    from ase.optimize import BFGS

    import pipeline

    torch.set_num_threads(1)
    atoms = read(args.structure)
    atoms.calc = pipeline.load_model(str(args.model))
    converged = BFGS(atoms, logfile=None).run(fmax=args.fmax, steps=args.steps)
    delta = float(atoms.calc.results["uncertainties"].max())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    relaxed = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    write(args.output, relaxed)
    row = {
        "output": str(args.output),
        "converged": bool(converged),
        "max_delta": round(delta, 3),
        "emt_max_force": round(float(np.linalg.norm(emt_label(relaxed).get_forces(), axis=1).max()), 4),
    }
    if args.compare_emt:
        from ase.calculators.emt import EMT

        reference = read(args.structure)
        reference.calc = EMT()
        BFGS(reference, logfile=None).run(fmax=0.01, steps=10 * args.steps)
        start = read(args.structure)
        row["rmsd_to_emt_relaxed"] = round(_rmsd(relaxed.positions, reference.positions), 4)
        row["rmsd_start_to_emt_relaxed"] = round(_rmsd(start.positions, reference.positions), 4)
    print(json.dumps(row))


def _rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square displacement (Å) between two sets of positions of the same atoms."""
    return float(np.sqrt(((a - b) ** 2).sum(axis=1).mean()))


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    particles = commands.add_parser("particles", help="write larger rattled cuboctahedra")
    particles.add_argument("out_dir", type=Path)
    particles.add_argument("--sizes", type=lambda text: [int(v) for v in _floats(text)], default=[405, 561, 711, 1415])
    campaign = commands.add_parser("campaign", help="run the example campaign in RUN_DIR")
    campaign.add_argument("run_dir", type=Path)
    campaign.add_argument("--target", type=Path, default=None)
    scan = commands.add_parser("cutoff-scan", help="train on a finished campaign's set for each model cutoff")
    scan.add_argument("run_dir", type=Path)
    scan.add_argument("--score", type=Path, nargs="+", required=True)
    scan.add_argument("--cutoffs", type=_floats, default=[4, 5, 6, 6.5, 7, 8])
    scan.add_argument(
        "--seeds",
        type=lambda text: [int(v) for v in _floats(text)],
        default=[0],
        help="ensemble seeds (model.seed) trained at every cutoff",
    )
    scan.add_argument("--plot", type=Path, default=None)
    relax = commands.add_parser("ml-relax", help="relax a structure with a model's ensemble mean (BFGS)")
    relax.add_argument("model", type=Path)
    relax.add_argument("structure", type=Path)
    relax.add_argument("-o", "--output", type=Path, required=True)
    relax.add_argument("--fmax", type=float, default=0.05)
    relax.add_argument("--steps", type=int, default=300)
    relax.add_argument(
        "--compare-emt", action="store_true", help="also relax the start with EMT (BFGS, fmax 0.01) and print the RMSD between the two"
    )
    args = parser.parse_args(argv)
    if args.command == "particles" and any(size not in OCTAHEDRA for size in args.sizes):
        parser.error(f"--sizes: each size must be one of {sorted(OCTAHEDRA)}")
    {"particles": cmd_particles, "campaign": cmd_campaign, "cutoff-scan": cmd_cutoff_scan, "ml-relax": cmd_ml_relax}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
