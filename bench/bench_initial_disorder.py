"""Does a generated initial set with random alloys fit a disordered alloy better than one of ordered
prototypes alone? (issue 13: ordered prototypes under-sample disorder.)

For `--random-alloys 0` and the default, `nft initial Pt,Au` makes a labelled set, `nft train` fits
the default ensemble to it, and `nft evaluate` compares it with EMT on two random Pt-Au alloys the
sets never saw: a rattled periodic fcc cell of 108 atoms and a rattled 147-atom cuboctahedron.
Prints one row per set: force MAE and max error (eV/Å) on each. Usage:
    python bench/bench_initial_disorder.py WORKDIR [--count 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.cluster import Octahedron
from ase.io import write

NFT = [str(Path(sys.executable).parent / "nft")]
GOLD_FRACTION = 0.5
RATTLE_ANGSTROM = 0.1
VEGARD_LATTICE_ANGSTROM = 0.5 * (3.92 + 4.08)  # fcc Pt and Au, Å


def random_alloy(atoms: Atoms, seed: int) -> Atoms:
    """`atoms` with half its sites Au at random and every atom rattled by `RATTLE_ANGSTROM`."""
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.numbers[rng.permutation(len(atoms))[: int(GOLD_FRACTION * len(atoms))]] = 79
    atoms.positions += rng.normal(0.0, RATTLE_ANGSTROM, size=atoms.positions.shape)
    return atoms


def targets(workdir: Path) -> list[Path]:
    """The two evaluation alloys, written to `workdir`: bulk PtAu108 and the cuboctahedron PtAu147."""
    cell = random_alloy(bulk("Pt", "fcc", a=VEGARD_LATTICE_ANGSTROM, cubic=True).repeat(3), seed=11)
    cluster = Octahedron("Pt", 7, 3, latticeconstant=VEGARD_LATTICE_ANGSTROM)
    particle = random_alloy(Atoms(numbers=cluster.numbers, positions=cluster.positions), seed=12)
    paths = [workdir / "ptau108_bulk.traj", workdir / "ptau147_particle.traj"]
    for path, atoms in zip(paths, (cell, particle)):
        write(path, atoms)
    return paths


def run(*args: object) -> str:
    result = subprocess.run(NFT + [str(a) for a in args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"nft {' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    options.workdir.mkdir(parents=True, exist_ok=True)
    evaluated = targets(options.workdir)
    print("| random alloys | cells | bulk PtAu108 MAE / max (eV/Å) | particle PtAu147 MAE / max (eV/Å) |")
    print("| --- | --- | --- | --- |")
    for random_alloys in (0, 6):
        labelled = options.workdir / f"set_random{random_alloys}.traj"
        model = options.workdir / f"model_random{random_alloys}.pt"
        run("initial", "Pt,Au", "-o", labelled, "--count", options.count, "--seed", options.seed, "--random-alloys", random_alloys)
        run("train", labelled, "-o", model, "--seed", options.seed)
        rows = json.loads(run("evaluate", model, *evaluated, "--parent", "emt", "--json"))["structures"]
        cells = " | ".join(f"{row['force_mae']:.4f} / {row['force_max_error']:.3f}" for row in rows)
        print(f"| {random_alloys} | {options.count} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
