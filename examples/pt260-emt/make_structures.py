"""Write the Pt260 EMT campaign's structures next to this script: the target and the initial set.

    python examples/pt260-emt/make_structures.py

`pt260_rattled.traj` is the rattled Pt260 cuboctahedron (unlabelled target); `bulk_train.traj` holds
20 small strained and rattled bulk Pt cells labelled by EMT. The output is the same on every run.
The campaign itself, `config.toml`, is a hand-tuned file kept beside them (not written here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.io import write

from pipeline.science.examples import bulk_training_cells, emt_label, rattled_cuboctahedron

HERE = Path(__file__).resolve().parent


def main() -> None:
    target = rattled_cuboctahedron()
    initial = [emt_label(cell) for cell in bulk_training_cells(count=20, seed=0)]
    write(HERE / "pt260_rattled.traj", target)
    write(HERE / "bulk_train.traj", initial)

    target_forces = np.linalg.norm(emt_label(target).get_forces(), axis=1)
    sizes = sorted({len(cell) for cell in initial})
    print(f"pt260_rattled.traj: {len(target)} atoms, EMT |F| {target_forces.min():.3f}-{target_forces.max():.3f} eV/Å")
    print(f"bulk_train.traj: {len(initial)} EMT-labelled cells of {sizes[0]}-{sizes[-1]} atoms")


if __name__ == "__main__":
    main()
