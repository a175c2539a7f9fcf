"""The default config converges on a target nobody tuned for (issue 10): a rattled Ag55 icosahedron
(forces 0.2–4 eV/Å, the paper's range) from ten generated bulk Ag cells, with nothing but the
campaign, the files and the EMT parent in the config, to δ < 0.15 eV/Å."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.cluster import Icosahedron
from ase.io import read, write

from pipeline import load_model
from pipeline.science.examples import bulk_training_cells, emt_label, fcc_lattice_constant
from tests.plugins.campaign_fixtures import run_nft

THRESHOLD = 0.15  # eV/Å: issue 10 asks for no looser than 0.15 (the older test campaigns use 1.2)


def rattled_icosahedron(symbol: str = "Ag", shells: int = 3, rattle_angstrom: float = 0.12, seed: int = 3) -> Atoms:
    cluster = Icosahedron(symbol, shells, latticeconstant=fcc_lattice_constant(symbol))
    atoms = Atoms(numbers=cluster.numbers, positions=cluster.positions, pbc=False)
    atoms.positions += np.random.default_rng(seed).normal(0.0, rattle_angstrom, size=atoms.positions.shape)
    return atoms


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_default_config_converges_on_an_untuned_target(tmp_path: Path):
    target = rattled_icosahedron()
    forces = np.linalg.norm(emt_label(target).get_forces(), axis=1)
    assert 2.0 < forces.max() < 6.0, "the target should sit in the paper's force range"
    write(tmp_path / "target.traj", target)
    write(tmp_path / "initial.traj", [emt_label(cell) for cell in bulk_training_cells(10, seed=4, symbol="Ag")])
    (tmp_path / "config.toml").write_text(
        '[campaign]\nname = "ag55"\nworkdir = "run"\n\n'
        '[data]\ntargets = ["target.traj"]\ninitial = "initial.traj"\n\n'
        f'[parent]\ncalculator = "emt"\n\n[active]\nthreshold = {THRESHOLD}\n'
    )
    result = run_nft("run", tmp_path / "config.toml", timeout=840)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    history = " ".join(f"{entry['uncertainty']:.3f}" for entry in summary["history"])
    print(f"Ag55 default config: δ per iteration {history}, {summary['chunks']} chunks, {summary['wall_time']['total']:.0f} s")
    assert summary["converged"], f"did not converge: δ {history}"
    assert summary["final_uncertainty"] < THRESHOLD
    assert summary["chunks"] < len(target), "NFT should not need a chunk on every atom"
    # The kept model is accurate, not just confident: its force error against EMT on the target.
    kept = read(tmp_path / "target.traj")
    kept.calc = load_model(summary["model"])
    reference = kept.copy()
    reference.calc = EMT()
    assert np.abs(kept.get_forces() - reference.get_forces()).mean() < 0.03
