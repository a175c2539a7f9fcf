"""Which atoms get a chunk this iteration, by threshold or by fraction (docs/campaign.md, "The loop")."""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable
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
    return selection_report(
        uncertainties, atoms, threshold, max_count, min_separation_angstrom, exclude, select_fraction
    ).picked


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
    delta = _validated_uncertainties(uncertainties, len(atoms))
    order_by = delta if ranking is None else _validated_uncertainties(ranking, len(atoms))
    count_limit = _validated_count(max_count)
    min_separation = float(min_separation_angstrom)
    if not np.isfinite(min_separation) or min_separation < 0.0:
        raise ValueError(f"min_separation_angstrom must be a non-negative number of Å, got {min_separation}")
    failed_atoms = _validated_exclude(failed, len(atoms))
    excluded = _validated_exclude(exclude, len(atoms)) | failed_atoms

    by_uncertainty = np.argsort(-order_by, kind="stable")
    if select_fraction is not None:
        candidates = by_uncertainty[: _fraction_count(select_fraction, len(atoms))]
    elif threshold is not None:
        candidates = by_uncertainty[delta[by_uncertainty] > _validated_threshold(threshold)]
    else:
        raise ValueError("give either threshold or select_fraction")

    free: list[int] = []
    blocked = np.zeros(len(atoms), dtype=bool)
    already_chunked = reference_failed = too_close = 0
    for index in (int(i) for i in candidates):
        if index in failed_atoms:
            reference_failed += 1
        elif index in excluded:
            already_chunked += 1
        elif blocked[index]:
            too_close += 1
        else:
            free.append(index)
            blocked |= _within(atoms, index, min_separation)
    return SelectionReport(
        picked=free[:count_limit],
        selectable=len(candidates),
        already_chunked=already_chunked,
        reference_failed=reference_failed,
        too_close=too_close,
        over_limit=max(0, len(free) - count_limit),
    )


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
        raise ValueError(
            f"threshold must be a non-negative number of eV/Å, got {value} (use select_fraction to select by fraction)"
        )
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
