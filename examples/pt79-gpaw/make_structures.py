"""Write the small GPAW campaign's structures next to this script: the target and the initial cells.

    python examples/pt79-gpaw/make_structures.py

`pt79_rattled.traj` is a Pt79 truncated octahedron (`Octahedron('Pt', 5, 1)`, 11.8 Å across)
rattled like the paper's Pt260 (normal, 0.085 Å); `bulk_cells.traj` holds 8 small strained and
rattled bulk Pt cells of 2–8 atoms, unlabelled: the campaign computes them with its GPAW parent,
so every label of the campaign comes from the same DFT settings. The output is the same on every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.cluster import Octahedron
from ase.io import write

from pipeline.science.examples import PT260_RATTLE_ANGSTROM, PT_LATTICE_CONSTANT_ANGSTROM, bulk_training_cells

HERE = Path(__file__).resolve().parent
TARGET_SEED = 0
INITIAL_CELLS = 8


def rattled_pt79(seed: int = TARGET_SEED) -> Atoms:
    """The Pt79 truncated octahedron, every atom displaced by a normal rattle of 0.085 Å (non-periodic)."""
    cluster = Octahedron("Pt", 5, 1, latticeconstant=PT_LATTICE_CONSTANT_ANGSTROM)
    atoms = Atoms(numbers=cluster.numbers, positions=cluster.positions, pbc=False)
    atoms.positions += np.random.default_rng(seed).normal(0.0, PT260_RATTLE_ANGSTROM, atoms.positions.shape)
    return atoms


def main() -> None:
    target = rattled_pt79()
    cells = bulk_training_cells(count=INITIAL_CELLS, seed=0)
    write(HERE / "pt79_rattled.traj", target)
    write(HERE / "bulk_cells.traj", cells)
    sizes = sorted({len(cell) for cell in cells})
    print(f"pt79_rattled.traj: {len(target)} atoms; bulk_cells.traj: {len(cells)} unlabelled cells of {sizes[0]}-{sizes[-1]} atoms")


if __name__ == "__main__":
    main()
