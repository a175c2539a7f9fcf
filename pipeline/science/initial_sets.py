"""Initial training sets from space groups: prototype crystals, their supercells, and strained and
rattled variants drawn by rejection sampling (docs/campaign.md, "Generated initial sets").

Pure functions of `ase.Atoms` and a seed. The energy filter needs the parent's energies, so it is
split: `prototype_crystals` → (the caller relaxes each cell) → `propose_variants` (separation checked
here) → (the caller labels them) → `within_energy_window`. Everything is deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product, zip_longest
from typing import Annotated, Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols, covalent_radii
from ase.neighborlist import neighbor_list
from ase.spacegroup import crystal
from pydantic import Field, ValidationInfo, field_validator

from pipeline.science.settings import StrictSettings

SEPARATION_FRACTION = 0.75
"""Default minimum interatomic separation, as a fraction of the smallest sum of two covalent radii."""
HCP_C_OVER_A = math.sqrt(8.0 / 3.0)


@dataclass(frozen=True)
class Prototype:
    """A crystal structure type: its name, space group and how to build it from species A (and B)."""

    name: str
    space_group: int
    n_elements: int
    build: Callable[[Sequence[str]], Atoms]  # species → the conventional cell at unit nearest-neighbour scale


def _crystal(basis: Sequence[tuple[float, float, float]], space_group: int, cell: Sequence[float], species: str):
    """`build` of a prototype: `species` is a pattern over A/B ("ABBB": the basis sites' elements)."""

    def build(symbols: Sequence[str]) -> Atoms:
        names = [symbols["AB".index(site)] for site in species]
        return crystal(names, basis=list(basis), spacegroup=space_group, cellpar=list(cell), primitive_cell=True)

    return build


PROTOTYPES: tuple[Prototype, ...] = (
    Prototype("fcc", 225, 1, _crystal([(0, 0, 0)], 225, [1, 1, 1, 90, 90, 90], "A")),
    Prototype("bcc", 229, 1, _crystal([(0, 0, 0)], 229, [1, 1, 1, 90, 90, 90], "A")),
    Prototype("hcp", 194, 1, _crystal([(1 / 3, 2 / 3, 0.25)], 194, [1, 1, HCP_C_OVER_A, 90, 90, 120], "A")),
    Prototype("sc", 221, 1, _crystal([(0, 0, 0)], 221, [1, 1, 1, 90, 90, 90], "A")),
    Prototype("diamond", 227, 1, _crystal([(0, 0, 0)], 227, [1, 1, 1, 90, 90, 90], "A")),
    Prototype("L1_2 A3B", 221, 2, _crystal([(0, 0, 0), (0, 0.5, 0.5)], 221, [1, 1, 1, 90, 90, 90], "BA")),
    Prototype("L1_2 AB3", 221, 2, _crystal([(0, 0, 0), (0, 0.5, 0.5)], 221, [1, 1, 1, 90, 90, 90], "AB")),
    Prototype("L1_0", 123, 2, _crystal([(0, 0, 0), (0.5, 0.5, 0.5)], 123, [1, 1, math.sqrt(2), 90, 90, 90], "AB")),
    Prototype("B2", 221, 2, _crystal([(0, 0, 0), (0.5, 0.5, 0.5)], 221, [1, 1, 1, 90, 90, 90], "AB")),
    Prototype("rocksalt", 225, 2, _crystal([(0, 0, 0), (0.5, 0.5, 0.5)], 225, [1, 1, 1, 90, 90, 90], "AB")),
)
"""The default prototypes: one-element ones, and two-element ones of mixed composition (25, 50, 75 % B)."""

RANDOM_ALLOY_STREAM = 1
"""Second word of the random alloys' rng seed (seed, 1), apart from the variants' (seed, round)."""
CELL_RELAX_FMAX = 0.02
"""Default force limit of a cell relaxation, eV/Å (and the stress × volume in the same units)."""
CELL_RELAX_STEPS = 200
"""Default most optimiser steps of a cell relaxation."""


class InitialSetSettings(StrictSettings):
    """What `nft initial` and `[data.initial_generate]` take; defaults live here only."""

    elements: tuple[str, ...] | None = Field(
        None, description="Chemical symbols of the cells; a campaign's default: its targets' elements."
    )
    count: int = Field(20, ge=1, description="Cells kept.")
    space_groups: tuple[Annotated[int, Field(ge=1, le=230)], ...] | None = Field(
        None, description="International numbers of the prototype crystals to use; default: every one that fits the elements."
    )
    seed: int = Field(0, ge=0, description="Seed of the strains, rattles and random occupations.")
    min_separation: float | None = Field(
        None, gt=0, description="Closest two atoms of a cell may be (Å); default: 0.75 × the smallest sum of covalent radii."
    )
    energy_window: float = Field(0.3, gt=0, description="Largest energy above the relaxed cell a variant came from (eV/atom).")
    max_strain: float = Field(0.04, ge=0, lt=0.5, description="Largest component of the symmetric strain.")
    rattle: float = Field(0.1, ge=0, description="Standard deviation of the atoms' displacements (Å).")
    min_atoms: int = Field(2, ge=1, description="Fewest atoms of a cell.")
    max_atoms: int = Field(16, ge=1, description="Most atoms of a cell.")
    relax_fmax: float = Field(
        CELL_RELAX_FMAX, gt=0, description="Force (eV/Å, and stress in the same units) where a cell relaxation stops."
    )
    relax_steps: int = Field(CELL_RELAX_STEPS, ge=1, description="Optimiser steps of one cell relaxation.")
    max_rounds: int = Field(10, ge=1, description="Rounds of candidates before giving up on `count`.")
    random_alloys: int = Field(6, ge=0, description="Randomly occupied supercells of the one-element prototypes (two or more elements).")

    @field_validator("elements", "space_groups", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return tuple(value) if isinstance(value, list) else value

    @field_validator("elements")
    @classmethod
    def _known_elements(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must name at least one element")
        for symbol in value:
            if symbol not in atomic_numbers or symbol == "X":
                raise ValueError(f"{symbol!r} is not a chemical symbol")
        if len(set(value)) != len(value):
            raise ValueError(f"names an element twice: {', '.join(value)}")
        return value

    @field_validator("max_atoms")
    @classmethod
    def _sizes(cls, value: int, info: ValidationInfo) -> int:
        """A field check (not a whole-model one) so that the error names `max_atoms`."""
        min_atoms = info.data.get("min_atoms")
        if min_atoms is not None and min_atoms > value:
            raise ValueError(f"{value} is below min_atoms {min_atoms}")
        return value

    def with_elements(self, elements: Sequence[str]) -> "InitialSetSettings":
        return self.model_copy(update={"elements": tuple(elements)})


def default_min_distance(elements: Sequence[str]) -> float:
    """`SEPARATION_FRACTION` × the smallest sum of two covalent radii among `elements`, Å."""
    radii = [covalent_radii[atomic_numbers[symbol]] for symbol in elements]
    return SEPARATION_FRACTION * 2.0 * min(radii)


def prototype_crystals(elements: Sequence[str], space_groups: Sequence[int] | None = None) -> list[tuple[str, Atoms]]:
    """(name, primitive cell) of every ordered prototype that fits `elements` (and `space_groups`),
    its nearest-neighbour distance guessed as the sum of covalent radii (Å).

    The one-element prototypes of each element; for exactly two elements also the two-element ones
    (both assignments of the species where the composition is not 1:1), interleaved so that the
    first cells drawn already hold every element and mixed compositions. Empty when none fits.
    """
    return _interleaved(_ordered_groups(list(elements), space_groups))


def initial_crystals(settings: InitialSetSettings) -> list[tuple[str, Atoms]]:
    """(name, cell) of every crystal a generation relaxes: the ordered prototypes and, for two or more
    elements, `settings.random_alloys` random alloys, interleaved (A, B, …, AB, random, A, B, …).
    `ValueError` when the elements cannot all sit in a random alloy of at most `max_atoms` atoms."""
    elements = list(settings.elements or ())
    groups = _ordered_groups(elements, settings.space_groups)
    groups.append(random_alloy_crystals(elements, settings))
    return _interleaved(groups)


def _ordered_groups(elements: list[str], space_groups: Sequence[int] | None) -> list[list[tuple[str, Atoms]]]:
    """The ordered prototypes in groups: one per element, then the two-element ones (two elements only)."""
    chosen = _chosen_prototypes(space_groups)
    groups = [[(f"{symbol} {p.name}", _scaled(p.build([symbol]))) for p in chosen if p.n_elements == 1] for symbol in elements]
    if len(elements) == 2:
        groups.append([(f"{'-'.join(elements)} {p.name}", _scaled(p.build(elements))) for p in chosen if p.n_elements == 2])
    return groups


def _chosen_prototypes(space_groups: Sequence[int] | None) -> list[Prototype]:
    return [p for p in PROTOTYPES if space_groups is None or p.space_group in space_groups]


def _interleaved(groups: list[list[tuple[str, Atoms]]]) -> list[tuple[str, Atoms]]:
    """The groups' items taken in turn, one of each group per turn, while any is left."""
    return [item for row in zip_longest(*groups) for item in row if item is not None]


def random_alloy_crystals(elements: Sequence[str], settings: InitialSetSettings) -> list[tuple[str, Atoms]]:
    """`settings.random_alloys` random substitutional alloys of `elements` (two or more; none for one):
    supercells of the one-element prototypes (taken in turn, those among `space_groups`) whose sites
    are decorated at random, with compositions drawn uniformly over the simplex (each element the
    majority in turn) and every element on at least one site; the nearest-neighbour distance is twice the cell's mean covalent radius (Å).
    Ordered prototypes alone under-sample the environments of a disordered alloy. Deterministic for
    `settings.seed`; `ValueError` when no supercell of at most `max_atoms` atoms holds every element."""
    lattices = [p for p in _chosen_prototypes(settings.space_groups) if p.n_elements == 1]
    if len(elements) < 2 or not lattices:
        return []
    rng = np.random.default_rng([settings.seed, RANDOM_ALLOY_STREAM])
    cells = []
    for k in range(settings.random_alloys):
        lattice = lattices[k % len(lattices)]
        atoms = _random_alloy(lattice, elements, k % len(elements), settings.min_atoms, settings.max_atoms, rng)
        cells.append((f"{'-'.join(elements)} random {lattice.name} {atoms.get_chemical_formula()}", atoms))
    return cells


def _random_alloy(
    lattice: Prototype, elements: Sequence[str], majority: int, min_atoms: int, max_atoms: int, rng: np.random.Generator
) -> Atoms:
    """One random decoration of a supercell of `lattice`: among the upper half of the allowed sizes
    (a random alloy of two sites is an ordered one), every element present, `elements[majority]`
    the most abundant (ties allowed)."""
    base = lattice.build([elements[0]])
    repeats = supercell_repeats(len(base), max(min_atoms, len(elements)), max_atoms)
    if not repeats:
        raise ValueError(f"{len(elements)} elements do not all fit a random {lattice.name} alloy of at most {max_atoms} atoms")
    largest = max(len(base) * int(np.prod(r)) for r in repeats)
    repeats = [r for r in repeats if len(base) * int(np.prod(r)) >= largest / 2]
    atoms = base.repeat(repeats[rng.integers(len(repeats))])
    counts = composition_counts(spread_composition(len(elements), majority, rng), len(atoms))
    symbols = np.repeat(np.asarray(elements), counts)
    rng.shuffle(symbols)
    atoms.set_chemical_symbols(list(symbols))
    mean_radius = float(np.mean(covalent_radii[atoms.numbers]))
    return _scaled(atoms, 2.0 * mean_radius)


def spread_composition(n_elements: int, majority: int, rng: np.random.Generator) -> np.ndarray:
    """Fractions drawn uniformly over the simplex (a flat Dirichlet), reordered so that element
    `majority` has the largest, the others in random order: cells drawn in turn spread over every
    corner of the simplex, not only where the draws happen to fall."""
    fractions = np.sort(rng.dirichlet(np.ones(n_elements)))[::-1]
    order = [majority, *rng.permutation([i for i in range(n_elements) if i != majority])]
    spread = np.empty(n_elements)
    spread[order] = fractions
    return spread


def composition_counts(fractions: np.ndarray, n_atoms: int) -> np.ndarray:
    """Atoms per element for `n_atoms` sites (≥ the element count): one each, the rest shared by
    `fractions` (summing to 1) with largest remainders, so the counts sum to `n_atoms`."""
    spare = n_atoms - len(fractions)
    shares = np.asarray(fractions, dtype=float) * spare
    counts = np.floor(shares).astype(int)
    counts[np.argsort(counts - shares)[: spare - int(counts.sum())]] += 1
    return counts + 1


def _scaled(atoms: Atoms, bond: float | None = None) -> Atoms:
    """The cell scaled so its shortest interatomic distance is `bond` Å (default: the guessed bond
    of the closest pair, its covalent radii summed)."""
    shortest, pair = _shortest_pair(atoms)
    if bond is None:
        bond = sum(covalent_radii[z] for z in pair)
    atoms.set_cell(atoms.cell.array * (bond / shortest), scale_atoms=True)
    atoms.pbc = True
    return atoms


def _shortest_pair(atoms: Atoms) -> tuple[float, tuple[int, int]]:
    cutoff = 2.0 * float(np.max(atoms.cell.lengths()))
    i, j, d = neighbor_list("ijd", atoms, cutoff)
    k = int(np.argmin(d))
    return float(d[k]), (int(atoms.numbers[i[k]]), int(atoms.numbers[j[k]]))


def min_interatomic_distance(atoms: Atoms, cutoff_angstrom: float) -> float:
    """The shortest distance (Å) between two atoms, periodic images (of an atom itself too)
    included; `inf` when none is closer than `cutoff_angstrom`."""
    distances = neighbor_list("d", atoms, cutoff_angstrom)
    return float(distances.min()) if len(distances) else math.inf


def supercell_repeats(n_atoms: int, min_atoms: int, max_atoms: int) -> list[tuple[int, int, int]]:
    """Diagonal repeats (i ≤ 3, j ≤ 3, k ≤ 3) that give a supercell of `min_atoms`–`max_atoms` atoms."""
    return [(i, j, k) for i, j, k in product(range(1, 4), repeat=3) if min_atoms <= n_atoms * i * j * k <= max_atoms]


def propose_variants(
    relaxed: Sequence[Atoms], settings: InitialSetSettings, round_index: int, min_distance: float
) -> list[tuple[int, Atoms]]:
    """Round `round_index` of candidates: `settings.count` (relaxed cell index, variant) pairs, the
    cells taken in turn; each a supercell of 2–16 atoms (`min_atoms`–`max_atoms`), strained by a
    random symmetric strain (components ≤ `max_strain`) and rattled (`rattle` Å), redrawn until no two
    atoms are closer than `min_distance` Å. Deterministic for (seed, round). `ValueError` when a
    cell has no supercell of an allowed size or no draw keeps the separation."""
    rng = np.random.default_rng([settings.seed, round_index])
    candidates = []
    for k in range(settings.count):
        index = (round_index * settings.count + k) % len(relaxed)
        candidates.append((index, _variant(relaxed[index], settings, rng, min_distance)))
    return candidates


MAX_DRAWS = 200
"""Draws of one variant before its separation is called impossible."""


def _variant(cell: Atoms, settings: InitialSetSettings, rng: np.random.Generator, min_distance: float) -> Atoms:
    repeats = supercell_repeats(len(cell), settings.min_atoms, settings.max_atoms)
    if not repeats:
        raise ValueError(
            f"a {cell.get_chemical_formula()} cell of {len(cell)} atoms has no supercell of {settings.min_atoms}-{settings.max_atoms} atoms"
        )
    for _ in range(MAX_DRAWS):
        variant = cell.repeat(repeats[rng.integers(len(repeats))])
        strain = rng.uniform(-settings.max_strain, settings.max_strain, size=(3, 3))
        strain = 0.5 * (strain + strain.T)
        variant.set_cell(variant.cell.array @ (np.eye(3) + strain), scale_atoms=True)
        variant.positions += rng.normal(0.0, settings.rattle, size=variant.positions.shape)
        variant.wrap()
        if min_interatomic_distance(variant, min_distance) >= min_distance:
            return variant
    raise ValueError(
        f"no variant of the relaxed {cell.get_chemical_formula()} cell keeps atoms {min_distance:g} Å apart "
        f"in {MAX_DRAWS} draws (its shortest distance is {min_interatomic_distance(cell, 3 * min_distance):.3g} Å)"
    )


def within_energy_window(energy_ev: float, n_atoms: int, relaxed_energy_ev: float, relaxed_n_atoms: int, window_ev_per_atom: float) -> bool:
    """Whether a variant's energy per atom is at most `window_ev_per_atom` above its relaxed cell's."""
    return energy_ev / n_atoms - relaxed_energy_ev / relaxed_n_atoms <= window_ev_per_atom


def relax_cell(atoms: Atoms, calculator: Any, fmax: float, steps: int) -> tuple[Atoms, float, np.ndarray, bool]:
    """Relax positions and cell of `atoms` with `calculator` (it must give the stress): ASE's
    `FrechetCellFilter` under BFGS until forces (eV/Å) and stress × volume per atom fall below `fmax`
    or after `steps`. Returns the relaxed copy, its energy (eV), forces (eV/Å), and whether it converged."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    relaxed = atoms.copy()
    relaxed.calc = calculator
    # ASE's optimizers move a cell filter as they move atoms; their annotation names Atoms only
    converged = bool(BFGS(FrechetCellFilter(relaxed), logfile=None).run(fmax=fmax, steps=steps))  # type: ignore[arg-type]
    return relaxed, float(relaxed.get_potential_energy()), np.asarray(relaxed.get_forces(), dtype=float), converged


def element_symbols(numbers: Sequence[int]) -> tuple[str, ...]:
    return tuple(chemical_symbols[int(z)] for z in sorted(set(int(z) for z in numbers)))
