"""Write the Pt260 EMT campaign's inputs next to this script: targets, initial set and config.

    python examples/pt260-emt/make_structures.py

`pt260_rattled.traj` is the rattled Pt260 cuboctahedron (unlabelled target); `bulk_train.traj` holds
20 small strained and rattled bulk Pt cells labelled by EMT; `config.toml` is the campaign (SPEC §2).
The output is the same on every run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.io import write

from pipeline.science.examples import bulk_training_cells, emt_label, rattled_cuboctahedron

HERE = Path(__file__).resolve().parent

CONFIG_TOML = """\
# The paper's EMT test case: a rattled Pt260 cuboctahedron learned from 20 small bulk cells plus
# chunks. Made by make_structures.py; paths are relative to this file.

[campaign]
name = "pt260-emt"
workdir = "runs/pt260-emt"
database = "sqlite:///nft.db"

[data]
targets = ["pt260_rattled.traj"]
initial = "bulk_train.traj"

[parent]
calculator = "emt"

[chunks]
radius = 8.0
vacuum = 6.0
max_per_iteration = 10

[model]
cutoff = 6.5
hidden = [5, 5]
ensemble = 10

[active]
threshold = 0.1
max_iterations = 20
"""


def main() -> None:
    target = rattled_cuboctahedron()
    initial = [emt_label(cell) for cell in bulk_training_cells(count=20, seed=0)]
    write(HERE / "pt260_rattled.traj", target)
    write(HERE / "bulk_train.traj", initial)
    (HERE / "config.toml").write_text(CONFIG_TOML)

    target_forces = np.linalg.norm(emt_label(target).get_forces(), axis=1)
    sizes = sorted({len(cell) for cell in initial})
    print(f"pt260_rattled.traj: {len(target)} atoms, EMT |F| {target_forces.min():.3f}-{target_forces.max():.3f} eV/Å")
    print(f"bulk_train.traj: {len(initial)} EMT-labelled cells of {sizes[0]}-{sizes[-1]} atoms")
    print(f"config.toml written in {HERE}")


if __name__ == "__main__":
    main()
