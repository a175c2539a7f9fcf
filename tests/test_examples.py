"""The example structures: the paper's Pt260 target and bulk initial set, made deterministically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from pipeline.science.examples import bulk_training_cells, emt_label, rattled_cuboctahedron

pytestmark = pytest.mark.timeout(60)

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "pt260-emt"


def test_pt260_is_the_rattled_cuboctahedron_with_the_papers_force_span():
    """Paper: EMT forces of the rattled Pt260 span [0.1, 5.1] eV/Å; ours span 0.106–4.86."""
    cluster = rattled_cuboctahedron()
    assert len(cluster) == 260
    assert set(cluster.get_chemical_symbols()) == {"Pt"}
    assert not cluster.pbc.any()
    forces = np.linalg.norm(emt_label(cluster).get_forces(), axis=1)
    assert 0.1 <= forces.min() < 0.2
    assert 4.5 < forces.max() <= 5.1


def test_pt260_is_deterministic_for_a_seed():
    np.testing.assert_array_equal(rattled_cuboctahedron().positions, rattled_cuboctahedron().positions)
    assert not np.allclose(rattled_cuboctahedron(seed=1).positions, rattled_cuboctahedron().positions)
    unrattled = rattled_cuboctahedron(rattle_angstrom=0.0)
    displacement = np.linalg.norm(rattled_cuboctahedron().positions - unrattled.positions, axis=1)
    assert 0.05 < displacement.mean() < 0.2


def test_bulk_training_cells_are_small_strained_rattled_and_periodic():
    cells = bulk_training_cells(count=20, seed=0)
    assert len(cells) == 20
    sizes = [len(cell) for cell in cells]
    assert min(sizes) == 2 and max(sizes) == 16 and len(set(sizes)) >= 6
    for cell in cells:
        assert cell.pbc.all()
        assert set(cell.get_chemical_symbols()) == {"Pt"}
        volume_per_atom = cell.get_volume() / len(cell)
        assert 0.9 * 3.92**3 / 4 < volume_per_atom < 1.1 * 3.92**3 / 4
    volumes = {round(cell.get_volume() / len(cell), 6) for cell in cells}
    assert len(volumes) == 20, "every cell carries its own strain"
    forces = [np.linalg.norm(emt_label(cell).get_forces(), axis=1).max() for cell in cells]
    assert min(forces) > 0.05 and max(forces) < 10.0


def test_bulk_training_cells_are_deterministic_for_a_seed():
    first, second = bulk_training_cells(seed=3), bulk_training_cells(seed=3)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell.array, b.cell.array)
    assert not np.allclose(bulk_training_cells(seed=4)[0].cell.array, first[0].cell.array)
    assert len(bulk_training_cells(count=30)) == 30


def test_emt_label_attaches_energy_and_forces_to_a_copy():
    cell = bulk_training_cells(count=1)[0]
    labelled = emt_label(cell)
    assert cell.calc is None
    assert isinstance(labelled.calc, SinglePointCalculator)
    reference = cell.copy()
    reference.calc = EMT()
    assert labelled.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(labelled.get_forces(), reference.get_forces(), atol=1e-12)


def test_committed_example_files_are_what_the_code_makes():
    target = read(EXAMPLE_DIR / "pt260_rattled.traj")
    np.testing.assert_allclose(target.positions, rattled_cuboctahedron().positions, atol=1e-12)
    initial = read(EXAMPLE_DIR / "bulk_train.traj", index=":")
    cells = bulk_training_cells(count=20, seed=0)
    assert len(initial) == 20
    for stored, made in zip(initial, cells):
        np.testing.assert_allclose(stored.positions, made.positions, atol=1e-12)
        np.testing.assert_allclose(stored.get_forces(), emt_label(made).get_forces(), atol=1e-9)


def test_the_example_config_is_the_default_config_plus_its_structures():
    """Nothing in the example is tuned: its [model], [chunks] and [active] are the defaults."""
    from pipeline.campaign.config import ActiveSection, ChunksSection, load_config
    from pipeline.science.settings import TrainingSettings

    config = load_config(EXAMPLE_DIR / "config.toml")
    assert config.file.model == TrainingSettings()
    assert config.file.chunks == ChunksSection()
    assert config.file.active == ActiveSection()
    assert config.file.parent.calculator == "emt"


GPAW_EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "pt79-gpaw"


def test_the_gpaw_example_files_are_what_its_script_makes_and_its_config_loads():
    """examples/pt79-gpaw: the committed Pt79 target and unlabelled bulk cells equal what
    make_structures.py builds; the config's GPAW parent carries the reduced-scale settings."""
    import importlib.util

    from pipeline.campaign.config import load_config

    spec = importlib.util.spec_from_file_location("make_pt79", GPAW_EXAMPLE_DIR / "make_structures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    target = read(GPAW_EXAMPLE_DIR / "pt79_rattled.traj")
    # The committed file was written on another machine: its floats may differ in the last bit (measured 2e-16 Å).
    np.testing.assert_allclose(target.positions, module.rattled_pt79().positions, rtol=0, atol=1e-9)
    assert len(target) == 79 and not target.pbc.any()
    cells = read(GPAW_EXAMPLE_DIR / "bulk_cells.traj", ":")
    expected = bulk_training_cells(count=module.INITIAL_CELLS, seed=0)
    assert len(cells) == len(expected) == 8
    for cell, made in zip(cells, expected):
        np.testing.assert_allclose(cell.positions, made.positions, rtol=0, atol=1e-9)
        assert cell.calc is None  # unlabelled: the campaign's GPAW parent computes them
    config = load_config(GPAW_EXAMPLE_DIR / "config.toml")
    assert config.parent.name == "gpaw" and config.parent.mode == "lcao" and config.parent.setups == {"Pt": "10"}
    assert config.threshold == pytest.approx(0.3)  # the DFT default
