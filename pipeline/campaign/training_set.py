"""The NFT training rule: what each stored reference result trains (shared by training and export).

An initial structure trains its energy and every force. A chunk trains only the force on its central
atom, with no energy. That label is the parent's force on the atom *in the target* (the parent is
nearsighted), so by default the row is trained in the target's own environment of the atom: every
target atom within 2·Rc of it, the atoms the model's force on it depends on. The chunk's cut
surface then never enters the model. `environment = "chunk"` trains the row in the carved chunk
instead, as the paper does. See docs/campaign.md, "Where a chunk's force is trained".

Rows in the target share their environment: the centres of one target are grouped by proximity and
each group is one structure (the union of its centres' 2·Rc spheres) with one force row per centre.
The loss is the same as with one structure per row (the model's force on a centre sees the same
atoms), but an atom near many centres is featurised once instead of once per centre, which makes a
campaign's training several times cheaper once chunks cover much of a target.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal, get_args

import numpy as np
from ase import Atoms

from pipeline.science.chunks import shared_environment
from pipeline.science.settings import TrainingSettings
from pipeline.science.structures import LabelledStructure
from pipeline.storage.store import CampaignStore

TrainingEnvironment = Literal["target", "chunk"]
TRAINING_ENVIRONMENTS: tuple[str, ...] = get_args(TrainingEnvironment)

ENVIRONMENT_SLACK_ANGSTROM = 0.01
"""The target environment reaches this much beyond 2·Rc, so no atom at exactly 2·Rc is lost to rounding."""
SHARED_ROWS_BUDGET = 60_000
"""A group of centres sharing one environment holds at most this many (force row × model row) pairs,
the size of its dense force Jacobian before sparsification (≈ 100 MB with two elements)."""


def training_structures(
    store: CampaignStore,
    calculator: str,
    params: Mapping[str, Any],
    environment: TrainingEnvironment = "target",
    cutoff_angstrom: float = TrainingSettings.model_fields["cutoff"].default,
) -> list[LabelledStructure]:
    """Everything the campaign's reference results train, oldest first (see the module docstring)."""
    if environment not in TRAINING_ENVIRONMENTS:
        raise ValueError(f"environment must be one of {TRAINING_ENVIRONMENTS}, not {environment!r}")
    labelled = []
    rows_by_parent: dict[int, dict[int, np.ndarray]] = {}  # parent id → centre index → label, eV/Å
    for structure, result in store.labelled_structures(calculator, params):
        if structure.kind != "chunk":
            labelled.append(LabelledStructure(structure.atoms, result.energy, result.forces))
            continue
        center = structure.chunk_center
        if environment == "chunk" or structure.parent_id is None:
            labelled.append(central_force_row(structure.atoms, center, result.forces[center]))
            continue
        rows_by_parent.setdefault(structure.parent_id, {})[structure.parent_center] = result.forces[center]
    for parent_id, labels in rows_by_parent.items():
        labelled.extend(target_environment_rows(store.atoms(parent_id), labels, cutoff_angstrom))
    return labelled


def chunk_labels(
    store: CampaignStore, calculator: str, params: Mapping[str, Any], parent_ids: Collection[int] | None = None
) -> dict[int, dict[int, np.ndarray]]:
    """Per parent id (of `parent_ids`, or all), the label of every chunk centre with a done reference
    job: the parent's force on the central atom, eV/Å, shape (3,). What training uses."""
    labels: dict[int, dict[int, np.ndarray]] = {}
    for structure, result in store.labelled_structures(calculator, params):
        parent = structure.parent_id
        if structure.kind != "chunk" or parent is None or (parent_ids is not None and parent not in parent_ids):
            continue
        forces = np.asarray(result.forces, dtype=float)
        labels.setdefault(parent, {})[structure.parent_center] = forces[structure.chunk_center]
    return labels


def central_force_row(atoms: Atoms, center: int, force: np.ndarray) -> LabelledStructure:
    """`atoms` training only `force` (eV/Å) on atom `center`: no energy, one force row."""
    mask = np.zeros(len(atoms), dtype=bool)
    mask[center] = True
    forces = np.zeros((len(atoms), 3))
    forces[center] = force
    return LabelledStructure(atoms, None, forces, mask)


def target_environment_rows(parent: Atoms, labels: Mapping[int, np.ndarray], cutoff_angstrom: float) -> list[LabelledStructure]:
    """The central forces `labels` (parent atom index → force, eV/Å) as rows of the parent's own
    atoms within 2·Rc of them, nearby centres grouped into one structure (`SHARED_ROWS_BUDGET`)."""
    radius = 2.0 * cutoff_angstrom + ENVIRONMENT_SLACK_ANGSTROM
    rows = []
    for group in proximity_groups(parent, sorted(labels), cutoff_angstrom):
        atoms, centers = shared_environment(parent, group, radius)
        forces = np.zeros((len(atoms), 3))
        mask = np.zeros(len(atoms), dtype=bool)
        forces[centers] = [labels[index] for index in group]
        mask[centers] = True
        rows.append(LabelledStructure(atoms, None, forces, mask))
    return rows


def proximity_groups(parent: Atoms, centers: list[int], cutoff_angstrom: float) -> list[list[int]]:
    """The centres in groups of nearby ones: each group starts at the first centre left and takes the
    nearest remaining ones (minimum-image distance) while its force rows × model rows (atoms within
    Rc of a centre, counted once) stay within `SHARED_ROWS_BUDGET`. Each group is in ascending order."""
    if not centers:
        return []
    periodic, everyone = bool(np.any(parent.pbc)), np.arange(len(parent))
    model_rows, between = {}, {}
    for center in centers:
        distances = parent.get_distances(center, everyone, mic=periodic)
        model_rows[center] = set(np.flatnonzero(distances <= cutoff_angstrom).tolist())
        between[center] = dict(zip(centers, distances[centers].tolist()))
    left = list(centers)
    groups = []
    while left:
        seed = left[0]
        ordered = sorted(left, key=lambda c: (between[seed][c], c))
        group: list[int] = []
        covered: set[int] = set()
        for center in ordered:
            grown = covered | model_rows[center]
            if group and (len(group) + 1) * len(grown) > SHARED_ROWS_BUDGET:
                break
            group.append(center)
            covered = grown
        groups.append(sorted(group))
        taken = set(group)
        left = [c for c in left if c not in taken]
    return groups
