"""The NFT training rule (campaign/training_set.py): what each stored result trains, in which environment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.build import fcc111
from ase.calculators.emt import EMT
from ase.cluster import Octahedron

from pipeline.campaign.training_set import training_structures
from pipeline.science.chunks import carve_chunk
from pipeline.science.descriptors import SymmetryFunctionParams
from pipeline.science.model import EnsembleModel
from pipeline.storage.store import CampaignStore

PARENT = ("emt", {})
CUTOFF = 4.0


def rattled_particle():
    atoms = Octahedron("Cu", 6, 2)
    atoms.pbc = False
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def rattled_slab():
    atoms = fcc111("Pt", size=(3, 3, 3), vacuum=6.0, periodic=True)
    atoms.positions += np.random.default_rng(1).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def store_chunk(store: CampaignStore, parent, parent_id: int, centre: int) -> tuple[int, np.ndarray]:
    """Carve, store and label (EMT) one chunk; returns its job id and the chunk's EMT forces."""
    chunk = carve_chunk(parent, centre, 6.0, 4.0)
    structure_id = store.add_structure(
        "chunk",
        chunk.atoms,
        parent_id=parent_id,
        center_in_parent=centre,
        center_in_chunk=chunk.center_in_chunk,
        radius=6.0,
        vacuum=4.0,
    )
    job = store.add_job(structure_id, *PARENT)
    atoms = chunk.atoms.copy()
    atoms.calc = EMT()
    forces = atoms.get_forces()
    store.store_result(job, atoms.get_potential_energy(), forces)
    return job, forces[chunk.center_in_chunk]


@pytest.mark.parametrize("make_parent", [rattled_particle, rattled_slab])
def test_a_chunk_trains_only_its_central_force_in_either_environment(tmp_path: Path, make_parent):
    parent = make_parent()
    with CampaignStore(f"sqlite:///{tmp_path / 'nft.db'}") as store:
        store.ensure_campaign("c", {})
        parent_id = store.add_structure("target", parent)
        initial = parent.copy()
        initial.calc = EMT()
        initial_job = store.add_job(store.add_structure("initial", initial), *PARENT)
        store.store_result(initial_job, initial.get_potential_energy(), initial.get_forces())
        centre = 7
        _, central_force = store_chunk(store, parent, parent_id, centre)

        in_target = training_structures(store, *PARENT, environment="target", cutoff_angstrom=CUTOFF)
        in_chunk = training_structures(store, *PARENT, environment="chunk", cutoff_angstrom=CUTOFF)
        with pytest.raises(ValueError, match="environment"):
            training_structures(store, *PARENT, environment="nowhere")

    for rows in (in_target, in_chunk):
        assert len(rows) == 2
        full, row = rows
        assert full.energy is not None and full.force_mask.all()
        assert row.energy is None and row.force_mask.sum() == 1 and not row.atoms.pbc.any()
        assert np.array_equal(row.forces[row.force_mask][0], central_force)
    # The target environment holds every parent atom (periodic images included) within 2·Rc of the
    # centre, so an untrained model's force on the centre is the same there as in the parent itself.
    environment = in_target[1]
    model = EnsembleModel(SymmetryFunctionParams(elements=tuple(sorted(set(parent.numbers))), cutoff=CUTOFF), member_seeds=[0, 1])
    in_parent = model.predict(parent).member_forces[:, centre]
    in_environment = model.predict(environment.atoms).member_forces[:, np.flatnonzero(environment.force_mask)[0]]
    assert np.allclose(in_environment, in_parent, atol=1e-10)
    # ... which the 6 Å chunk (smaller than 2·Rc) does not give.
    chunk_row = in_chunk[1]
    in_small_chunk = model.predict(chunk_row.atoms).member_forces[:, np.flatnonzero(chunk_row.force_mask)[0]]
    assert not np.allclose(in_small_chunk, in_parent, atol=1e-6)


@pytest.mark.parametrize("make_parent", [rattled_particle, rattled_slab])
def test_rows_of_one_target_share_an_environment_and_train_the_same_forces(tmp_path: Path, make_parent):
    """Several chunks of one target become one structure with a force row per centre; an untrained
    model's force on every centre there equals its force in the target (the environment is complete),
    and each row carries its own chunk's label."""
    parent = make_parent()
    centres = [0, 3, 7, 12, 20]
    with CampaignStore(f"sqlite:///{tmp_path / 'nft.db'}") as store:
        store.ensure_campaign("c", {})
        parent_id = store.add_structure("target", parent)
        labels = {centre: store_chunk(store, parent, parent_id, centre)[1] for centre in centres}
        rows = training_structures(store, *PARENT, environment="target", cutoff_angstrom=CUTOFF)
    assert len(rows) == 1, "five nearby centres of a small target share one environment"
    shared = rows[0]
    trained = np.flatnonzero(shared.force_mask)
    assert shared.energy is None and len(trained) == len(centres) and not shared.atoms.pbc.any()
    model = EnsembleModel(SymmetryFunctionParams(elements=tuple(sorted(set(parent.numbers))), cutoff=CUTOFF), member_seeds=[0, 1])
    in_parent = model.predict(parent).member_forces[:, centres]
    in_shared = model.predict(shared.atoms).member_forces[:, trained]
    assert np.allclose(in_shared, in_parent, atol=1e-10)
    assert np.array_equal(shared.forces[trained], np.array([labels[c] for c in centres]))
    # the shared structure holds each image once: fewer atoms than the five environments together
    separate = sum(len(carve_chunk(parent, c, 2 * CUTOFF + 0.01, 0.0).atoms) for c in centres)
    assert len(shared.atoms) < separate


def test_far_apart_centres_of_a_large_target_are_grouped_within_the_budget(monkeypatch):
    """The grouping bounds each group's force rows × model rows, and every centre lands in one group."""
    from pipeline.campaign import training_set

    parent = Octahedron("Cu", 12, 4)  # 1,156 atoms
    monkeypatch.setattr(training_set, "SHARED_ROWS_BUDGET", 2_000)
    centres = list(range(0, len(parent), 37))
    groups = training_set.proximity_groups(parent, centres, CUTOFF)
    assert sorted(c for group in groups for c in group) == centres
    assert len(groups) > 1
    for group in groups:
        rows = set()
        for c in group:
            rows |= set(np.flatnonzero(parent.get_distances(c, range(len(parent))) <= CUTOFF).tolist())
        assert len(group) == 1 or len(group) * len(rows) <= 2_000
