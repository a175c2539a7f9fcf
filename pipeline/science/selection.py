"""Which atoms get a chunk this iteration, by threshold or by fraction (docs/campaign.md, "The loop")."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.geometry import get_distances


@dataclass(frozen=True)
class SelectionReport:
    """What one selection picked and why the other selectable atoms were skipped (counts of atoms).

    `selectable` atoms (δ_i above the threshold, or the `select_fraction` most uncertain) are each
    counted once: `picked`, or skipped as `reference_failed` (their chunk's reference job failed),
    `already_chunked` (their chunk is in the database), `too_close` (closer than the minimum
    separation to an atom picked before them) or `over_limit` (free, but beyond `max_count`: a
    larger limit would pick exactly these).
    """

    picked: list[int]
    selectable: int
    already_chunked: int
    reference_failed: int
    too_close: int
    over_limit: int

    def counts(self) -> dict[str, int]:
        """The report as plain counts (JSON): selectable, selected and one count per skip reason."""
        return {
            "selectable": self.selectable,
            "selected": len(self.picked),
            "already_chunked": self.already_chunked,
            "reference_failed": self.reference_failed,
            "too_close": self.too_close,
            "over_limit": self.over_limit,
        }


def select_chunk_centers(
    uncertainties: np.ndarray,
    atoms: Atoms,
    threshold: float | None,
    max_count: int,
    min_separation_angstrom: float,
    exclude: Iterable[int] = (),
    select_fraction: float | None = None,
) -> list[int]:
    """Indices of the atoms to carve chunks around, most uncertain first.

    Candidates are the atoms whose δ_i (eV/Å) exceeds `threshold`, or, when `select_fraction` is
    given (it then replaces the threshold), that fraction of all atoms, the most uncertain ones
    (at least one). Atoms in `exclude` (their chunk is already in the database) are skipped, and so
    is any atom closer than `min_separation_angstrom` (minimum image when periodic) to one already
    picked; at most `max_count` are returned. Equal δ_i are taken in increasing atom index.
    """
    return selection_report(uncertainties, atoms, threshold, max_count, min_separation_angstrom, exclude, select_fraction).picked


def selection_report(
    uncertainties: np.ndarray,
    atoms: Atoms,
    threshold: float | None,
    max_count: int,
    min_separation_angstrom: float,
    exclude: Iterable[int] = (),
    select_fraction: float | None = None,
    failed: Iterable[int] = (),
    ranking: np.ndarray | None = None,
) -> SelectionReport:
    """`select_chunk_centers` with the reasons: the same picks, and every other selectable atom
    counted by why it was skipped (see `SelectionReport`). Atoms in `failed` (a subset of the
    skipped ones: their chunk's reference job failed) are skipped and counted apart from `exclude`.

    The rule is the greedy pass without the limit (most uncertain first, each free atom blocks the
    atoms within `min_separation_angstrom` of it); its first `max_count` free atoms are picked.
    `ranking` (shape (N,), e.g. the energy-based δE_i) replaces δ_i in "most uncertain first" and
    in choosing the `select_fraction`; the threshold still applies to δ_i (the campaign's δ).
    """
    pool = candidate_pool(uncertainties, atoms, threshold, exclude, select_fraction, failed, ranking)
    return most_uncertain_report(pool, max_count, min_separation_angstrom)


def most_uncertain_report(pool: "CandidatePool", max_count: int, min_separation_angstrom: float) -> SelectionReport:
    """The greedy rule on one parent's free candidates: most uncertain first, each pick blocking the
    atoms within `min_separation_angstrom` of it; the first `max_count` picks are kept."""
    count_limit = _validated_count(max_count)
    min_separation = _validated_separation(min_separation_angstrom)
    free: list[int] = []
    blocked = np.zeros(len(pool.atoms), dtype=bool)
    too_close = 0
    for index in (int(i) for i in pool.free):
        if blocked[index]:
            too_close += 1
        else:
            free.append(index)
            blocked |= _within(pool.atoms, index, min_separation)
    return _report(pool, free[:count_limit], too_close, max(0, len(free) - count_limit))


@dataclass(frozen=True)
class CandidatePool:
    """One parent's selectable atoms after the atoms with a chunk or a failed job are set aside.

    `free` holds atom indices, most uncertain first (by the ranking); `priority` is that ranking for
    every atom of the parent, shape (N,)."""

    atoms: Atoms
    free: np.ndarray
    priority: np.ndarray
    selectable: int
    already_chunked: int
    reference_failed: int


def candidate_pool(
    uncertainties: np.ndarray,
    atoms: Atoms,
    threshold: float | None,
    exclude: Iterable[int] = (),
    select_fraction: float | None = None,
    failed: Iterable[int] = (),
    ranking: np.ndarray | None = None,
) -> CandidatePool:
    """The selectable atoms of one parent (see `selection_report` for the arguments), without the
    ones in `failed` or `exclude`, counted by why they were set aside."""
    delta = _validated_uncertainties(uncertainties, len(atoms))
    order_by = delta if ranking is None else _validated_uncertainties(ranking, len(atoms))
    failed_atoms = _validated_exclude(failed, len(atoms))
    excluded = _validated_exclude(exclude, len(atoms)) | failed_atoms

    by_uncertainty = np.argsort(-order_by, kind="stable")
    if select_fraction is not None:
        candidates = by_uncertainty[: _fraction_count(select_fraction, len(atoms))]
    elif threshold is not None:
        candidates = by_uncertainty[delta[by_uncertainty] > _validated_threshold(threshold)]
    else:
        raise ValueError("give either threshold or select_fraction")
    reference_failed = sum(1 for i in candidates if int(i) in failed_atoms)
    already_chunked = sum(1 for i in candidates if int(i) in excluded) - reference_failed
    free = np.array([int(i) for i in candidates if int(i) not in excluded], dtype=np.int64)
    return CandidatePool(atoms, free, order_by, len(candidates), already_chunked, reference_failed)


def farthest_point_reports(
    pools: Sequence[CandidatePool],
    features: Sequence[np.ndarray],
    elements: Sequence[np.ndarray],
    trained: Sequence[Iterable[int]],
    max_count: int,
    min_separation_angstrom: float,
) -> tuple[list[tuple[int, int]], list[SelectionReport]]:
    """Farthest-point selection in descriptor space over the free candidates of all parents.

    `features[p]` (N_p, F) are parent p's scaled model features, `elements[p]` (N_p,) its element
    indices, `trained[p]` the atoms whose environments the training set already holds (chunk
    centres). Each pick is the candidate farthest (Euclidean, same element only) from every trained
    environment and every earlier pick, ties (e.g. nothing trained yet) to the most uncertain; a pick
    blocks the atoms of its parent within `min_separation_angstrom`. Returns the picks (parent
    position, atom) in the order taken, at most `max_count`, and one report per parent.
    """
    count_limit = _validated_count(max_count)
    min_separation = _validated_separation(min_separation_angstrom)
    owner = np.concatenate([np.full(len(pool.free), p, dtype=np.int64) for p, pool in enumerate(pools)] or [np.zeros(0, np.int64)])
    atom = np.concatenate([pool.free for pool in pools] or [np.zeros(0, np.int64)])
    if len(atom) == 0:
        return [], [_report(pool, [], 0, 0) for pool in pools]
    rows = np.concatenate([np.asarray(features[p], dtype=float)[pool.free] for p, pool in enumerate(pools)])
    row_element = np.concatenate([np.asarray(elements[p])[pool.free] for p, pool in enumerate(pools)])
    priority = np.concatenate([pool.priority[pool.free] for pool in pools])
    trained_rows = [np.asarray(features[p], dtype=float)[sorted(set(trained[p]))] for p in range(len(pools))]
    trained_elements = [np.asarray(elements[p])[sorted(set(trained[p]))] for p in range(len(pools))]
    nearest = _nearest_distances(rows, row_element, np.concatenate(trained_rows), np.concatenate(trained_elements))

    blocked = np.zeros(len(atom), dtype=bool)
    picks: list[int] = []
    while len(picks) < count_limit and not blocked.all():
        open_rows = np.flatnonzero(~blocked)
        farthest = nearest[open_rows].max()
        tied = open_rows[nearest[open_rows] == farthest]
        chosen = int(tied[np.argmax(priority[tied])])  # first of equal priority: the more uncertain pool order
        picks.append(chosen)
        same = row_element == row_element[chosen]
        nearest[same] = np.minimum(nearest[same], np.linalg.norm(rows[same] - rows[chosen], axis=1))
        parent = owner[chosen]
        mine = owner == parent
        blocked[mine] |= _within(pools[parent].atoms, int(atom[chosen]), min_separation)[atom[mine]]
        blocked[chosen] = True
    reports = []
    for p, pool in enumerate(pools):
        mine = owner == p
        too_close = int(np.sum(mine & blocked)) - sum(1 for k in picks if owner[k] == p)
        left = int(np.sum(mine & ~blocked))
        reports.append(_report(pool, [int(atom[k]) for k in picks if owner[k] == p], too_close, left))
    return [(int(owner[k]), int(atom[k])) for k in picks], reports


def _nearest_distances(rows: np.ndarray, row_elements: np.ndarray, trained: np.ndarray, trained_elements: np.ndarray) -> np.ndarray:
    """Each row's Euclidean distance to the nearest trained row of its element (inf if none), (K,)."""
    nearest = np.full(len(rows), np.inf)
    for element in np.unique(row_elements):
        mine, theirs = row_elements == element, trained_elements == element
        if theirs.any():
            a, b = rows[mine], trained[theirs]
            squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
            nearest[mine] = np.sqrt(np.clip(squared, 0.0, None).min(axis=1))
    return nearest


def _report(pool: CandidatePool, picked: list[int], too_close: int, over_limit: int) -> SelectionReport:
    return SelectionReport(
        picked=picked,
        selectable=pool.selectable,
        already_chunked=pool.already_chunked,
        reference_failed=pool.reference_failed,
        too_close=too_close,
        over_limit=over_limit,
    )


def _validated_separation(min_separation_angstrom: float) -> float:
    min_separation = float(min_separation_angstrom)
    if not np.isfinite(min_separation) or min_separation < 0.0:
        raise ValueError(f"min_separation_angstrom must be a non-negative number of Å, got {min_separation}")
    return min_separation


def _within(atoms: Atoms, index: int, min_separation: float) -> np.ndarray:
    """Which atoms lie closer than `min_separation` Å to atom `index` (minimum image), shape (N,)."""
    if min_separation == 0.0:
        return np.zeros(len(atoms), dtype=bool)
    _, distances = get_distances(atoms.positions[index], atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    return distances[0] < min_separation


def _validated_uncertainties(uncertainties: np.ndarray, n_atoms: int) -> np.ndarray:
    delta = np.asarray(uncertainties, dtype=float)
    if delta.shape != (n_atoms,):
        raise ValueError(f"uncertainties must have shape ({n_atoms},) to match the atoms, got {delta.shape}")
    if not np.all(np.isfinite(delta)):
        raise ValueError("uncertainties must be finite")
    return delta


def _validated_count(max_count: int) -> int:
    try:
        count = operator.index(max_count)
    except TypeError:
        raise ValueError(f"max_count must be an integer, got {max_count!r}") from None
    if count < 1:
        raise ValueError(f"max_count must be at least 1, got {count}")
    return count


def _validated_threshold(threshold: float) -> float:
    value = float(threshold)
    if not np.isfinite(value) or value < 0.0:
        raise ValueError(f"threshold must be a non-negative number of eV/Å, got {value} (use select_fraction to select by fraction)")
    return value


def _fraction_count(select_fraction: float, n_atoms: int) -> int:
    """How many atoms `select_fraction` of `n_atoms` means: rounded down, at least one."""
    fraction = float(select_fraction)
    if not np.isfinite(fraction) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"select_fraction must lie in (0, 1], got {fraction}")
    return max(1, math.floor(fraction * n_atoms + 1e-9))


def _validated_exclude(exclude: Iterable[int], n_atoms: int) -> set[int]:
    excluded = set()
    for item in exclude:
        try:
            index = operator.index(item)
        except TypeError:
            raise ValueError(f"exclude must hold atom indices, got {item!r}") from None
        if not 0 <= index < n_atoms:
            raise ValueError(f"exclude index {index} is out of range for {n_atoms} atoms")
        excluded.add(index)
    return excluded
