"""The NFT training rule: what each stored reference result trains (shared by training and export).

An initial structure trains its energy and every force. A chunk trains only the force on its central
atom, with no energy. That label is the parent's force on the atom *in the target* (the parent is
nearsighted), so by default the row is trained in the target's own environment of the atom: every
target atom within 2·Rc of it, the atoms the model's force on it depends on. The chunk's cut
surface then never enters the model. `environment = "chunk"` trains the row in the carved chunk
instead, as the paper does. See docs/campaign.md, "Where a chunk's force is trained".
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal, get_args

import numpy as np
from ase import Atoms

from pipeline.science.chunks import carve_chunk
from pipeline.science.structures import LabelledStructure
from pipeline.storage.records import ResultRecord, StructureRecord
from pipeline.storage.store import CampaignStore

TrainingEnvironment = Literal["target", "chunk"]
TRAINING_ENVIRONMENTS: tuple[str, ...] = get_args(TrainingEnvironment)

ENVIRONMENT_SLACK_ANGSTROM = 0.01
"""The target environment reaches this much beyond 2·Rc, so no atom at exactly 2·Rc is lost to rounding."""


def training_structures(
    store: CampaignStore,
    calculator: str,
    params: Mapping[str, Any],
    environment: TrainingEnvironment = "target",
    cutoff_angstrom: float = 6.5,
) -> list[LabelledStructure]:
    """Everything the campaign's reference results train, oldest first (see the module docstring)."""
    if environment not in TRAINING_ENVIRONMENTS:
        raise ValueError(f"environment must be one of {TRAINING_ENVIRONMENTS}, not {environment!r}")
    parents: dict[int, Atoms] = {}
    labelled = []
    for structure, result in store.labelled_structures(calculator, params):
        if structure.kind != "chunk":
            labelled.append(LabelledStructure(structure.atoms, result.energy, result.forces))
            continue
        if environment == "chunk" or structure.parent_id is None:
            center = int(structure.center_in_chunk)
            labelled.append(central_force_row(structure.atoms, center, result.forces[center]))
            continue
        if structure.parent_id not in parents:
            parents[structure.parent_id] = store.atoms(structure.parent_id)
        labelled.append(target_environment_row(parents[structure.parent_id], structure, result, cutoff_angstrom))
    return labelled


def chunk_labels(
    store: CampaignStore, calculator: str, params: Mapping[str, Any], parent_ids: Collection[int] | None = None
) -> dict[int, dict[int, np.ndarray]]:
    """Per parent id (of `parent_ids`, or all), the label of every chunk centre with a done reference
    job: the parent's force on the central atom, eV/Å, shape (3,). What training uses."""
    labels: dict[int, dict[int, np.ndarray]] = {}
    for structure, result in store.labelled_structures(calculator, params):
        if structure.kind != "chunk" or (parent_ids is not None and structure.parent_id not in parent_ids):
            continue
        forces = np.asarray(result.forces, dtype=float)
        labels.setdefault(int(structure.parent_id), {})[int(structure.center_in_parent)] = forces[int(structure.center_in_chunk)]
    return labels


def central_force_row(atoms: Atoms, center: int, force: np.ndarray) -> LabelledStructure:
    """`atoms` training only `force` (eV/Å) on atom `center`: no energy, one force row."""
    mask = np.zeros(len(atoms), dtype=bool)
    mask[center] = True
    forces = np.zeros((len(atoms), 3))
    forces[center] = force
    return LabelledStructure(atoms, None, forces, mask)


def target_environment_row(
    parent: Atoms, chunk: StructureRecord, result: ResultRecord, cutoff_angstrom: float
) -> LabelledStructure:
    """The chunk's central force (from `result`) as a row of the parent's atoms within 2·Rc of it."""
    environment = carve_chunk(parent, int(chunk.center_in_parent), 2.0 * cutoff_angstrom + ENVIRONMENT_SLACK_ANGSTROM, 0.0)
    return central_force_row(environment.atoms, environment.center_in_chunk, result.forces[chunk.center_in_chunk])
