"""Training time and accuracy against the number of elements, on equal data.

    .venv/bin/python bench/bench_elements.py [--elements Cu,Au,Pd,Ag] [--cells 20] [--chunks 20 --more 10]
        [--seeds 0] [--threads 1] [--extra JSON] [--primal]

For k = 1 … len(--elements): the first k elements, the same data each time — `--cells` small
periodic fcc cells of 1–8 atoms with random occupation (strained ±3 %, rattled), the central
forces of `--chunks` chunks (6.5 Å) of a rattled 147-atom random-alloy icosahedron, all labelled by
EMT — trained cold with the default `[model]` (plus `--extra`, a JSON object of `[model]` keys),
then warm (that model as the start) on the same data plus `--more` chunks, as an NFT iteration
does. Scored on the icosahedron's atoms without a chunk: force MAE against EMT, median δ, and the
coverage (share of atoms whose force error is at most δ_i). Times are wall seconds with
`--threads` torch threads; the ratio column divides by the one-element time of the same seed and
run, medians over seeds. `--primal` solves every Levenberg–Marquardt step in the P×P normal
equations, as before the Gram form (for the before/after comparison).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.cluster import Icosahedron

import common  # noqa: F401  (puts the repository root on sys.path)
from pipeline.science import levenberg_marquardt
from pipeline.science.calculator import EnsembleCalculator
from pipeline.science.chunks import carve_chunk
from pipeline.science.examples import emt_labelled, fcc_lattice_constant
from pipeline.science.settings import TrainingSettings
from pipeline.science.structures import LabelledStructure
from pipeline.science.training import train_ensemble

CELL_TEMPLATES = [
    ({}, (1, 1, 1)),
    ({}, (2, 1, 1)),
    ({"cubic": True}, (1, 1, 1)),
    ({"orthorhombic": True}, (1, 1, 1)),
    ({}, (2, 2, 1)),
    ({"cubic": True}, (2, 1, 1)),
]
"""1, 2, 4, 2, 4 and 8 atoms: the paper's kind of small bulk cells."""
CHUNK_RADIUS_ANGSTROM = 6.5


def small_cells(symbols: list[str], count: int, rng: np.random.Generator) -> list[LabelledStructure]:
    """EMT-labelled small fcc cells with random occupation, strained and rattled."""
    cells = []
    lattice = float(np.mean([fcc_lattice_constant(s) for s in symbols]))
    for k in range(count):
        keywords, repeat = CELL_TEMPLATES[k % len(CELL_TEMPLATES)]
        template = bulk("Cu", "fcc", a=lattice, **keywords).repeat(repeat)
        atoms = Atoms(symbols=list(rng.choice(symbols, size=len(template))), positions=template.positions, cell=template.cell, pbc=True)
        strain = rng.uniform(-0.03, 0.03, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.positions += rng.normal(0.0, rng.uniform(0.02, 0.12), atoms.positions.shape)
        cells.append(emt_labelled(atoms))
    return cells


def alloy_particle(symbols: list[str], rng: np.random.Generator) -> Atoms:
    """A 147-atom icosahedron with random occupation, rattled by 0.08 Å."""
    lattice = float(np.mean([fcc_lattice_constant(s) for s in symbols]))
    cluster = Icosahedron("Cu", 4, lattice)
    atoms = Atoms(symbols=list(rng.choice(symbols, size=len(cluster))), positions=cluster.positions, pbc=False)
    atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
    return atoms


def chunk_rows(particle: Atoms, centres) -> list[LabelledStructure]:
    """Each centre's chunk, labelled by EMT, training its central force only."""
    rows = []
    for centre in centres:
        chunk = carve_chunk(particle, int(centre), CHUNK_RADIUS_ANGSTROM).atoms
        mask = np.zeros(len(chunk), dtype=bool)
        mask[0] = True
        rows.append(emt_labelled(chunk, mask))
    return rows


def scored(model, particle: Atoms, chunked: np.ndarray) -> dict[str, float]:
    """Force MAE (eV/Å), median δ (eV/Å) and coverage on the atoms without a chunk."""
    reference = particle.copy()
    reference.calc = EMT()
    expected = reference.get_forces()
    atoms = particle.copy()
    atoms.calc = EnsembleCalculator(model)
    forces = atoms.get_forces()
    delta = atoms.calc.results["uncertainties"]
    free = np.setdiff1d(np.arange(len(atoms)), chunked)
    error = np.linalg.norm(forces - expected, axis=1)[free]
    return {
        "mae": float(np.abs(forces - expected)[free].mean()),
        "median_delta": float(np.median(delta[free])),
        "coverage": float(np.mean(error <= delta[free])),
    }


def one_case(symbols: list[str], args, seed: int) -> dict:
    """Cold and warm training on one element set; times and scores."""
    rng = np.random.default_rng(seed)
    cells = small_cells(symbols, args.cells, rng)
    particle = alloy_particle(symbols, rng)
    order = rng.permutation(len(particle))
    first, more = order[: args.chunks], order[args.chunks : args.chunks + args.more]
    settings = TrainingSettings.model_validate({"seed": seed, **json.loads(args.extra)})
    data = cells + chunk_rows(particle, first)
    started = time.perf_counter()
    cold, report = train_ensemble(data, settings)
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    warm, _ = train_ensemble(data + chunk_rows(particle, more), settings, start_from=cold)
    warm_s = time.perf_counter() - started
    return {
        "elements": len(symbols),
        "cold_s": cold_s,
        "warm_s": warm_s,
        "atoms": sum(len(c.atoms) for c in cells),
        "residuals": min(report.element_residuals.values()),
        "weights": report.element_weights,
        **scored(warm, particle, np.concatenate([first, more])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", default="Cu,Au,Pd,Ag")
    parser.add_argument("--cells", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--more", type=int, default=10)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", default="{}", help="JSON object of [model] keys")
    parser.add_argument(
        "--primal", action="store_true", help="solve every Levenberg–Marquardt step in the P×P normal equations (as before the Gram form)"
    )
    args = parser.parse_args()
    levenberg_marquardt.GRAM_FORM = not args.primal
    torch.set_num_threads(args.threads)
    symbols = args.elements.split(",")
    rows: dict[int, list[dict]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for k in range(1, len(symbols) + 1):
            row = one_case(symbols[:k], args, seed)
            rows.setdefault(k, []).append(row)
            print(json.dumps({"seed": seed, **row}), flush=True)
    one = {seed_index: rows[1][seed_index] for seed_index in range(len(rows[1]))}
    print(f"\n{args.cells} cells + {args.chunks} chunks, warm + {args.more}; [model] {args.extra}; medians over seeds {args.seeds}\n")
    print(
        "| elements | weights per network | fewest residuals per element | cold (s) | cold ÷ 1 element | warm (s) | warm ÷ 1 element "
        "| MAE (eV/Å) | median δ (eV/Å) | coverage |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, group in rows.items():

        def median(key: str) -> float:
            return statistics.median(row[key] for row in group)

        cold_ratio = statistics.median(row["cold_s"] / one[i]["cold_s"] for i, row in enumerate(group))
        warm_ratio = statistics.median(row["warm_s"] / one[i]["warm_s"] for i, row in enumerate(group))
        print(
            f"| {','.join(symbols[:k])} | {group[0]['weights']} | {median('residuals'):.0f} | {median('cold_s'):.1f} | "
            f"{cold_ratio:.2f} | {median('warm_s'):.1f} | {warm_ratio:.2f} | {median('mae'):.3f} | "
            f"{median('median_delta'):.3f} | {median('coverage'):.2f} |"
        )


if __name__ == "__main__":
    main()
